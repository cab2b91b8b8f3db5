"""How many CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota.

``os.cpu_count()`` counts the machine's cores, not the ones a container, ``taskset`` or a batch
scheduler grants; sizing a thread pool by it oversubscribes the CPUs the process really has.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_quota_cores(path: Path = CGROUP_CPU_MAX) -> int | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``), rounded up.

    None when the file is absent, unreadable, malformed or sets no limit.
    """
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The number of cores this process may run on (at least 1).

    The CPUs of its affinity mask (``os.sched_getaffinity``; ``os.cpu_count()`` where the platform
    has no affinity, e.g. macOS), capped by the cgroup v2 CPU quota in ``cpu_max`` if one is set.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota_cores(cpu_max)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
_heap_limited = False


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes and more by mmap, so freeing them returns
    the memory to the system at once. Idempotent; returns whether the setting is in effect.

    By default glibc raises its mmap threshold (up to 32 MiB) after each large free, and later
    blocks of that size then come from per-thread heaps that keep the pages after ``free``. With
    blocks decoded and prepared on helper threads this kept about 300 MB more resident memory
    at 200k cells (peak RSS 856 MB against 567 MB with the threshold fixed; benchmarks/README.md).
    Does nothing on other C libraries (macOS, musl), whose allocators do not do this.
    """
    global _heap_limited
    if _heap_limited:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _heap_limited = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        _heap_limited = False
    return _heap_limited
