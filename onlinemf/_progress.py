"""Progress reporting: the library takes a factory; the CLI passes tqdm bars on stderr."""

from __future__ import annotations


class _NullBar:
    total = None
    n = 0

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def NullProgress(total=None, desc="", unit="it"):  # noqa: N802 - used like a class
    """A progress factory that shows nothing (the library default)."""
    return _NullBar()


def tqdm_progress(total=None, desc="", unit="it"):
    """A progress factory of tqdm bars on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "cells", leave=True, dynamic_ncols=True, mininterval=0.5)
