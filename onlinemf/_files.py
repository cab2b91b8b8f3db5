"""Output-file safety: outputs are written under a temporary name and renamed, never over an input.

:func:`atomic_output` is the one writer of every output file (results, model files, checkpoints, plots).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
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


def check_output_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
    """Validate an output path before any work starts.

    Raises InputError when the folder is missing or not writable, when the path is a folder, or when it
    names one of the inputs.
    """
    path = Path(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        msg = f"{what} {path}: the folder {parent} does not exist"
        raise InputError(msg)
    if is_zarr_path(path):
        _check_zarr_output(path, what)
    elif path.is_dir():
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


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Whether an output path names a zarr store (a folder): its name ends in ``.zarr``."""
    return Path(path).suffix.lower() == ".zarr"


def _check_zarr_output(path: Path, what: str) -> None:
    """A ``.zarr`` output may replace nothing but an empty folder or a results store written before.

    As with files, a previous output is replaced (whole, once the new one is complete); any other folder
    holds data of the user's, and is refused.
    """
    if path.exists() and not path.is_dir():
        msg = f"{what} {path}: expected a .zarr folder (or a new name), found a file"
        raise InputError(msg)
    if path.is_dir() and any(path.iterdir()) and not is_results_store(path):
        msg = (f"{what} {path}: the folder exists and is not an earlier onlinemf results store; "
               f"choose another name (folders are never overwritten)")
        raise InputError(msg)


def is_results_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr store that onlinemf wrote as results (an AnnData with ``uns['inmf']``)."""
    from ._keys import UNS

    group = Path(path) / "uns" / UNS
    return (Path(path) / "obsm").is_dir() and any((group / marker).is_file() for marker in ("zarr.json", ".zgroup"))


def temporary_prefix(path: str | os.PathLike) -> str:
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


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
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
            if tmp.is_dir() and not tmp.is_symlink():  # a .zarr output's temporary store
                shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                tmp.unlink()
            removed.append(tmp)
    if removed:
        logger.info("removed %d temporary file(s) of %s left by an interrupted run", len(removed), path)
    return removed


def _new_temporary(path: Path) -> tuple[Path, int]:
    """Create an empty temporary beside ``path``; returns it and the mode the system gave it.

    Created like any new file (``open`` with mode 0666, so the umask and a folder's default ACL apply),
    not with ``mkstemp``'s 0600: the finished output then has the permissions a user expects of new files.
    """
    folder = path.resolve().parent
    for _ in range(100):
        tmp = folder / f"{temporary_prefix(path)}{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    msg = f"{path}: could not create a temporary file in {folder}"
    raise FileExistsError(msg)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure remove it.

    The one writer of every output (results, model files, checkpoints, plots): an existing ``path`` is only
    replaced by a completely written file, nothing is renamed into place after an interrupt, and the
    output's mode is that of any new file (``0666 & ~umask``), whatever the writer did to the temporary.
    """
    path = Path(path)
    tmp, mode = _new_temporary(path)
    try:
        yield tmp
        publish(tmp, path, mode=mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed.

    The folder counterpart of :func:`atomic_output`, for ``.zarr`` stores. A folder cannot be renamed over a
    non-empty one, so an earlier ``path`` is first renamed aside (to a temporary name) and removed after the new
    store is in place: ``path`` is missing only between two renames, and never half-written.
    """
    path = Path(path)
    tmp = _new_temporary_dir(path)
    try:
        yield tmp
        raise_if_interrupted()
        old = None
        if path.is_dir():
            old = _new_temporary_dir(path)
            os.replace(path, old)  # replaces the empty placeholder folder
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def _new_temporary_dir(path: Path) -> Path:
    """Create an empty temporary folder beside ``path`` (named as :func:`remove_stale_temporaries` expects)."""
    folder = path.resolve().parent
    for _ in range(100):
        tmp = folder / f"{temporary_prefix(path)}{secrets.token_hex(4)}.tmp"
        try:
            tmp.mkdir(mode=0o777)  # less the umask, as any new folder
        except FileExistsError:
            continue
        return tmp
    msg = f"{path}: could not create a temporary folder in {folder}"
    raise FileExistsError(msg)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, mode: int | None = None) -> None:
    """Rename the finished temporary ``tmp`` to ``path`` (atomic within one folder) with permissions ``mode``.

    ``mode`` defaults to that of a new file (``0666 & ~umask``). Prefer :func:`atomic_output`.
    """
    if mode is None:
        mode = 0o666 & ~_umask()
    # A writer may have replaced the temporary by a file of its own making (e.g. mode 0600).
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)
    raise_if_interrupted()
    os.replace(tmp, path)


def _umask() -> int:
    # Read without changing it where the system allows (Linux): os.umask can only set it, which races with
    # files other threads create meanwhile.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
