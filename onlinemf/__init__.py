"""onlinemf: streaming online integrative NMF (online iNMF) for single-cell data."""

from ._errors import InputError, ModelError

__version__ = "0.1.0"

__all__ = ["InputError", "ModelError", "__version__"]
