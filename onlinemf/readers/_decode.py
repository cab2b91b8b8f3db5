"""Reading compressed HDF5 chunks on several threads.

h5py serialises every call behind one global lock, so threads that call ``dataset[a:b]`` decode
gzip chunks one at a time. Here the caller's thread reads the raw (still compressed) chunks of a
row range with ``read_direct_chunk`` and a thread pool undoes the filters: ``zlib.decompress``
releases the GIL, and the shuffle filter is a numpy byte transpose. Each task writes its own
disjoint part of the output, so the result is the same, bit for bit, for any number of threads.

Decoded here: deflate (gzip) and shuffle, in any order, with any per-chunk filter mask. Anything
else (lzf, szip, fletcher32, third-party plugins, contiguous or unchunked storage, files without
direct chunk access) goes through plain h5py, which gives the same values, only serially.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np

from .._cores import usable_cores

logger = logging.getLogger(__name__)

FILTER_DEFLATE = h5py.h5z.FILTER_DEFLATE
FILTER_SHUFFLE = h5py.h5z.FILTER_SHUFFLE
DECODABLE = frozenset({FILTER_DEFLATE, FILTER_SHUFFLE})
# Decoded bytes per pool task: enough to amortise the task overhead on small (e.g. 38 KB) chunks.
TASK_BYTES = 1 << 21

_settings = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def read_threads() -> int:
    """Threads that decode chunks in this thread's reads: :func:`set_read_threads`'s value or every usable core."""
    return getattr(_settings, "threads", None) or usable_cores()


@contextlib.contextmanager
def set_read_threads(threads: int | None):
    """Decode with ``threads`` threads inside the ``with`` block (None: every usable core).

    The setting belongs to the calling thread (a prefetching thread inherits it from the caller
    through :func:`onlinemf.readers._prefetch.prefetch`).
    """
    previous = getattr(_settings, "threads", None)
    _settings.threads = None if threads is None else max(1, int(threads))
    try:
        yield
    finally:
        _settings.threads = previous


def thread_pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``threads`` threads (made on first use) that decodes chunks."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="onlinemf-decode")
        return pool


def decode_pipeline(dataset: h5py.Dataset) -> list[int] | None:
    """The dataset's filter ids in pipeline (write) order when this module can decode its chunks
    and at least one filter compresses; None when plain h5py reads it as fast or must read it."""
    if dataset.chunks is None or dataset.dtype.hasobject or dataset.dtype.kind not in "iufb":
        return None
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if FILTER_DEFLATE not in filters or not set(filters) <= DECODABLE:
        return None
    return filters


def unshuffle(raw: bytes, itemsize: int) -> bytes:
    """Undo HDF5's shuffle filter: byte planes back to interleaved items (trailing bytes stay as stored)."""
    n = len(raw) // itemsize
    if itemsize == 1 or n == 0:
        return raw
    planes = np.frombuffer(raw, dtype=np.uint8, count=n * itemsize).reshape(itemsize, n)
    out = np.ascontiguousarray(planes.T).tobytes()
    return out + raw[n * itemsize :]


def decode_chunk(raw: bytes, filters: list[int], mask: int, itemsize: int, size: int = zlib.DEF_BUF_SIZE) -> bytes:
    """Undo ``filters`` (pipeline order) on one stored chunk; bit i of ``mask`` set = filter i was skipped.

    ``size`` is the decoded size, so zlib allocates its output once instead of growing it from 16 KiB."""
    for i in range(len(filters) - 1, -1, -1):
        if mask & (1 << i):
            continue
        if filters[i] == FILTER_DEFLATE:
            try:
                raw = zlib.decompress(raw, bufsize=size)
            except zlib.error as exc:
                msg = f"a gzip chunk does not decompress ({exc})"
                raise OSError(msg) from None
        else:
            raw = unshuffle(raw, itemsize)
    return raw


class _Chunk:
    """One stored chunk and where its overlap with the wanted rows goes."""

    __slots__ = ("mask", "raw", "source", "target")

    def __init__(self, raw: bytes, mask: int, source: tuple, target: tuple):
        self.raw, self.mask, self.source, self.target = raw, mask, source, target


def _chunk_grid(shape: tuple, chunks: tuple, lo: int, hi: int):
    """Yield ``(offset, source, target)`` per chunk meeting rows ``lo:hi`` (all of the other axes):
    the chunk's start coordinates, its slices to copy, and their place in the output."""
    first, last = lo // chunks[0], (hi - 1) // chunks[0]
    other = [range(0, n, c) for n, c in zip(shape[1:], chunks[1:], strict=True)]
    for k in range(first, last + 1):
        r0 = k * chunks[0]
        a, b = max(lo, r0), min(hi, r0 + chunks[0])
        for rest in np.ndindex(*[len(r) for r in other]) if other else [()]:
            starts = [r0] + [other[d][i] for d, i in enumerate(rest)]
            source = [slice(a - r0, b - r0)]
            target = [slice(a - lo, b - lo)]
            for d, s in enumerate(starts[1:], start=1):
                stop = min(s + chunks[d], shape[d])
                source.append(slice(0, stop - s))
                target.append(slice(s, stop))
            yield tuple(starts), tuple(source), tuple(target)


def _decode_into(out: np.ndarray, tasks: list[_Chunk], filters, dtype: np.dtype, chunks: tuple) -> None:
    out_bytes = int(np.prod(chunks)) * dtype.itemsize
    for chunk in tasks:
        decoded = decode_chunk(chunk.raw, filters, chunk.mask, dtype.itemsize, out_bytes)
        if len(decoded) < out_bytes:
            msg = f"a chunk decodes to {len(decoded)} bytes, expected {out_bytes}"
            raise OSError(msg)
        values = np.frombuffer(decoded, dtype=dtype, count=int(np.prod(chunks))).reshape(chunks)
        out[chunk.target] = values[chunk.source]


def read_range(dataset, lo: int, hi: int, *, threads: int | None = None) -> np.ndarray:
    """``dataset[lo:hi]`` (rows of axis 0, every other axis whole) as stored (same dtype).

    gzip(+shuffle) chunks are decoded on ``threads`` threads (default :func:`read_threads`); any
    other dataset, or a numpy array, is sliced as usual. Raises OSError for unreadable chunks.
    """
    if not isinstance(dataset, h5py.Dataset):
        return np.asarray(dataset[lo:hi])
    n = dataset.shape[0]
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    filters = decode_pipeline(dataset) if hi > lo else None
    if filters is None:
        return dataset[lo:hi]
    dtype, chunks = dataset.dtype, dataset.chunks
    out = np.empty((hi - lo, *dataset.shape[1:]), dtype=dtype)
    groups: list[list[_Chunk]] = [[]]
    group_bytes, chunk_bytes = 0, int(np.prod(chunks)) * dtype.itemsize
    dsid = dataset.id
    for offset, source, target in _chunk_grid(dataset.shape, chunks, lo, hi):
        try:
            mask, raw = dsid.read_direct_chunk(offset)
        except RuntimeError:  # a chunk never written (fill values): h5py knows what it holds
            return dataset[lo:hi]
        if group_bytes >= TASK_BYTES:
            groups.append([])
            group_bytes = 0
        groups[-1].append(_Chunk(raw, mask, source, target))
        group_bytes += chunk_bytes
    threads = read_threads() if threads is None else max(1, int(threads))
    if threads == 1 or len(groups) == 1:
        for group in groups:
            _decode_into(out, group, filters, dtype, chunks)
        return out
    futures = [thread_pool(threads).submit(_decode_into, out, group, filters, dtype, chunks) for group in groups]
    for future in futures:
        future.result()
    return out


def source_is_compressed(source) -> bool:
    """Whether a reader's source stores its matrix values with an HDF5 compression filter
    (decoding it again costs more than reading a plain copy)."""
    reader = getattr(source, "_reader", None)
    for name in ("_data", "_dataset"):
        dataset = getattr(reader, name, None)
        if isinstance(dataset, h5py.Dataset) and dataset.compression is not None:
            return True
    return False
