"""Progress reporting: the library takes a factory; the CLI passes tqdm bars on stderr."""

from __future__ import annotations

from ._files import raise_if_interrupted


class _NullBar:
    total = None
    n = 0

    def update(self, n=1):
        raise_if_interrupted()

    def set_postfix(self, *args, **kwargs):
        pass

    def refresh(self):
        raise_if_interrupted()

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

    class Bar(tqdm):
        # Every update is a safe point to re-raise an interrupt Python swallowed elsewhere.
        def update(self, n=1):
            raise_if_interrupted()
            return super().update(n)

        def refresh(self, *args, **kwargs):
            raise_if_interrupted()
            return super().refresh(*args, **kwargs)

    return Bar(total=total, desc=desc, unit=unit, unit_scale=unit == "cells", leave=True, dynamic_ncols=True, mininterval=0.5)
