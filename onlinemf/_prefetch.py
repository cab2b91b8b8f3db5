"""Bounded prefetching: run a block iterator on a helper thread while the caller computes.

The readers' heavy steps (HDF5 reads, chunk decoding, scipy's canonical-format checks) mostly run
outside the GIL, so reading block i+1 on a helper thread overlaps the statistics or preparation
of block i. At most ``depth`` finished items wait in the queue, so memory stays bounded by
``depth + 2`` blocks (queued, being produced, being consumed).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ._cores import return_large_frees_to_the_os
from .readers import read_threads, set_read_threads

T = TypeVar("T")

_DONE = object()
# How often a blocked producer re-checks whether the consumer has gone away.
_POLL_S = 0.1


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield the items of ``items``, produced on a helper thread up to ``depth`` items ahead.

    Items come in order; an exception raised while producing is raised here, at the item where it
    happened. Closing the generator early (``break``, an error in the caller) stops the producer
    after the item it is making. The caller's chunk-decoding thread count
    (:func:`onlinemf.readers._decode.set_read_threads`) applies on the helper thread too.
    """
    if depth < 1:
        yield from items
        return
    return_large_frees_to_the_os()  # blocks freed on other threads: see the function
    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    threads = read_threads()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        with set_read_threads(threads):
            try:
                for item in items:
                    if not put(item):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(_Failure(exc))
                return
            put(_DONE)

    worker = threading.Thread(target=produce, name="onlinemf-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = box.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
        close = getattr(items, "close", None)
        if close is not None:  # a generator: run its finally blocks (it is no longer running)
            close()
