"""Readers: stream cells x genes row blocks from .h5ad, 10x .h5 and in-memory data."""

from .._source import MemorySource, Source, check_values
from ._decode import read_threads, set_read_threads, source_is_compressed, thread_pool
from ._h5 import open_h5
from ._h5ad import H5adSource, iter_split_blocks, split_groups
from ._open import (
    BATCH_KEY_CANDIDATES,
    as_source,
    batch_rows,
    describe,
    file_format,
    guess_batch_key,
    open_source,
    open_sources,
    read_obs,
    shared_genes,
)
from ._tenx import TenxH5Source
from ._zarr import (
    ZarrSource,
    is_zarr_store,
    open_zarr_sources,
    zarr_batch_rows,
    zarr_n_obs,
)

__all__ = [
    "BATCH_KEY_CANDIDATES",
    "H5adSource",
    "MemorySource",
    "Source",
    "TenxH5Source",
    "ZarrSource",
    "as_source",
    "batch_rows",
    "check_values",
    "describe",
    "file_format",
    "guess_batch_key",
    "is_zarr_store",
    "iter_split_blocks",
    "open_h5",
    "open_source",
    "open_sources",
    "open_zarr_sources",
    "read_obs",
    "read_threads",
    "set_read_threads",
    "shared_genes",
    "source_is_compressed",
    "split_groups",
    "thread_pool",
    "zarr_batch_rows",
    "zarr_n_obs",
]
