"""The scikit-learn parameter protocol for onlinemf's estimators, without importing scikit-learn.

``get_params``/``set_params``/``repr`` read the parameters from a class-level ``_constraints`` table (name ->
(check, expected)), which also validates them with scikit-learn's message template. scikit-learn stays an
optional dependency: only its own checks call ``__sklearn_tags__``, which imports it.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import numpy as np

from ._errors import InputError


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= lo


def constraints() -> dict:
    """OnlineINMF's parameters: name -> (check, what is expected)."""
    return {
        "n_components": (lambda v: _is_int(v, 1), "an int >= 1"),
        "lam": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(float(v)) and float(v) >= 0,
                "a float >= 0"),
        "batch_size": (lambda v: _is_int(v, 1), "an int >= 1"),
        "max_epochs": (lambda v: _is_int(v, 1), "an int >= 1"),
        "chunk_size": (lambda v: _is_int(v, 1), "an int >= 1"),
        "hals_iter": (lambda v: _is_int(v, 1), "an int >= 1"),
        "h_sweeps": (lambda v: _is_int(v, 1), "an int >= 1"),
        "dtype": (lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
        "random_state": (lambda v: v is None or _is_int(v, 0) or isinstance(v, np.random.Generator),
                         "None, an int >= 0 or a numpy Generator"),
        "n_threads": (lambda v: v is None or _is_int(v, 1), "None or an int >= 1"),
    }


class ParamsMixin:
    """Parameters as scikit-learn estimators have them; subclasses set ``_constraints``."""

    _constraints: dict = {}

    def get_params(self, deep: bool = True) -> dict:
        """The constructor parameters (``deep`` is accepted for scikit-learn; there are no sub-estimators)."""
        return {name: getattr(self, name) for name in self._constraints}

    def set_params(self, **params: Any) -> Any:
        """Set constructor parameters (validated at the next fit); returns self."""
        unknown = sorted(set(params) - set(self._constraints))
        if unknown:
            msg = f"set_params: expected parameters among {sorted(self._constraints)}, found {unknown}"
            raise InputError(msg)
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        signature = inspect.signature(type(self).__init__)
        changed = [f"{k}={v!r}" for k, v in self.get_params().items()
                   if not _same(v, signature.parameters[k].default)]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):  # only scikit-learn calls this, so it is imported here
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=[self.dtype]),
                    input_tags=InputTags(sparse=True, positive_only=True))

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "W_")

    def _validate_params(self) -> None:
        for name, (ok, expected) in self._constraints.items():
            value = getattr(self, name)
            if not ok(value):
                msg = f"The {name!r} parameter of {type(self).__name__} must be {expected}. Got {value!r} instead."
                raise InputError(msg)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError):
        return a is b
