"""Output-file safety: outputs are written under a temporary name and renamed, never over an input."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

from ._errors import InputError

logger = logging.getLogger(__name__)


#: Set by the CLI's SIGINT/SIGTERM handler. Python swallows a KeyboardInterrupt raised inside a weakref
#: callback or ``__del__`` ("Exception ignored in ..."), so long loops and every rename check this flag too:
#: an interrupt is never lost, and nothing is published after one.
interrupt_requested = threading.Event()


def raise_if_interrupted() -> None:
    if interrupt_requested.is_set():
        raise KeyboardInterrupt


def check_output_path(path, *, inputs=(), what: str = "output") -> Path:
    """Validate an output path before any work starts.

    Raises InputError when the folder is missing or not writable, when the path is a folder, or when it
    names one of the inputs.
    """
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        msg = f"{what} {path}: the folder {parent} does not exist"
        raise InputError(msg)
    if path.is_dir():
        msg = f"{what} {path}: expected a file path, found a folder"
        raise InputError(msg)
    if not os.access(parent, os.W_OK):
        msg = f"{what} {path}: the folder {parent} is not writable"
        raise InputError(msg)
    for inp in inputs:
        inp = Path(inp)
        if inp.exists() and path.exists() and os.path.samefile(inp, path) or path.resolve() == inp.resolve():
            msg = f"{what} {path}: is also an input; choose another name (inputs are never overwritten)"
            raise InputError(msg)
    return path


def temporary_prefix(path) -> str:
    """Name prefix of the temporaries written beside ``path``.

    It carries the writer's process id, so that a later run can tell the temporaries of a killed
    process (SIGKILL, power loss: no cleanup ran) from those of a live one.
    """
    return f".{Path(path).name}.{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run; returns what was removed.

    Matches the names :func:`temporary_prefix` makes, also nested ones (a temporary of a temporary).
    """
    path = Path(path)
    folder = path.resolve().parent
    pattern = re.compile(rf"\.+{re.escape(path.name)}\..*?(\d+)-[a-z0-9_]+\.tmp")
    removed = []
    for tmp in folder.glob(f".*{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            removed.append(tmp)
    if removed:
        logger.info("removed %d temporary file(s) of %s left by an interrupted run", len(removed), path)
    return removed


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path in the same folder; on success rename it to ``path``, on failure remove it.

    An existing ``path`` is only replaced by a completely written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def publish(tmp, path) -> None:
    """Rename the finished temporary ``tmp`` to ``path`` (atomic within one folder)."""
    # mkstemp creates mode 0600; a finished output gets the permissions of any new file (umask).
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)
    raise_if_interrupted()
    os.replace(tmp, path)
