"""onlinemf: streaming online integrative NMF (online iNMF) for single-cell data."""

from ._errors import InputError, ModelError
from .engine import OnlineINMF
from .model_io import save_model, load_model

__version__ = "0.1.0"

__all__ = ["InputError", "ModelError", "__version__"]
__all__ += ["OnlineINMF", "save_model", "load_model"]
