"""Output-file safety: outputs are written under a temporary name and renamed, never over an input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ._errors import InputError


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


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path in the same folder; on success rename it to ``path``, on failure remove it.

    An existing ``path`` is only replaced by a completely written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
