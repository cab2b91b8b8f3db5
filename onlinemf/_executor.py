"""Executors: what runs the independent work units of a step (:mod:`onlinemf._step`) or of an H pass.

An executor has one method, ``map(fn, items) -> list``, returning ``[fn(item) for item in items]`` in order.
The estimator adds results in that order, so every executor gives the same numbers.

- :class:`SerialExecutor` runs them in the calling thread.
- :class:`ThreadExecutor` runs them on a pool of threads. The work is in scipy's sparse kernels, BLAS and numpy
  ufuncs, which release the GIL (measured: two threads on the two row halves of a CSR x dense product run 1.92x
  faster than one). BLAS itself is pinned to one thread while the executor is open: the K x K and genes x K
  products are too small for BLAS threads to pay, and OpenBLAS's spinning threads slowed the sparse kernels
  beside them by 1.5x (``reference/kernel-notes.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from threadpoolctl import threadpool_limits

from ._cores import usable_cores


class Executor(Protocol):
    """Runs ``fn`` over ``items`` and returns the results in item order."""

    n_workers: int

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list: ...


class SerialExecutor:
    """Runs every item in the calling thread."""

    n_workers = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list:
        return [fn(item) for item in items]


class ThreadExecutor:
    """Runs items on ``n_threads`` threads of one pool, results in item order.

    A phased function (``products``/``solve``/``finish``, see :class:`onlinemf._step.UnitTask`) has its sparse
    products on the pool and its H solve in the calling thread, overlapped: the solve's many short numpy
    calls thrash the GIL when two threads run them, while scipy's sparse kernels run beside it freely.
    """

    def __init__(self, pool: ThreadPoolExecutor, n_threads: int):
        self._pool = pool
        self.n_workers = n_threads

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list:
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        if _phased(fn):
            return list(self.imap(fn, items, ahead=len(items)))
        return list(self._pool.map(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], ahead: int | None = None) -> Iterator:
        """Results of ``fn`` over a (lazy) iterable in order, at most ``ahead`` items in flight (bounded memory)."""
        ahead = 2 * self.n_workers if ahead is None else ahead
        if not _phased(fn):
            pending: list = []
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()
            return
        # products of the next items run on the pool while this thread solves the oldest one, whose finish
        # then goes to the pool; results come back in item order.
        started: list = []  # (item, future of products)
        finishing: list = []  # future of finish
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(started) + len(finishing) < ahead:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                else:
                    started.append((item, self._pool.submit(fn.products, item)))  # type: ignore[attr-defined]  # phased
            if started:
                item, future = started.pop(0)
                XL = future.result()
                finishing.append(self._pool.submit(fn.finish, item, XL, fn.solve(item, XL)))  # type: ignore[attr-defined]
            while finishing and (finishing[0].done() or not started):
                yield finishing.pop(0).result()
            if exhausted and not started and not finishing:
                return


_END = object()


def _phased(fn: Any) -> bool:
    return all(callable(getattr(fn, name, None)) for name in ("products", "solve", "finish"))


def resolve_threads(n_threads: int | None) -> int:
    """``n_threads``, or every core this process may use when None."""
    return usable_cores() if n_threads is None else int(n_threads)


@contextlib.contextmanager
def local_executor(n_threads: int | None) -> Iterator[SerialExecutor | ThreadExecutor]:
    """An executor for ``n_threads`` threads (None: all usable cores), BLAS pinned to one thread inside."""
    n = resolve_threads(n_threads)
    with threadpool_limits(limits=1, user_api="blas"):
        if n <= 1:
            yield SerialExecutor()
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="onlinemf") as pool:
            yield ThreadExecutor(pool, n)


def imap(executor: SerialExecutor | ThreadExecutor, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator:
    """Ordered, lazy map over ``items`` with any executor (threads keep a bounded number in flight)."""
    if isinstance(executor, ThreadExecutor):
        yield from executor.imap(fn, items)
    else:
        for item in items:
            yield fn(item)
