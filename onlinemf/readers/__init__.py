"""Readers: stream cells x genes row blocks from .h5ad, 10x .h5 and in-memory data."""

from ._base import MemorySource, Source, check_values

__all__ = ["MemorySource", "Source", "check_values"]
