"""The floating dtypes a check runs at, by name, and their NumPy dtypes (bfloat16 from ml_dtypes)."""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float64", "bfloat16", "float16")

# ml_dtypes ships with jaxlib; numpy has no bfloat16 of its own.
try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - jax always brings it
    _BF16 = None


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name; raises RuntimeError for bfloat16 without ml_dtypes."""
    if name == "bfloat16":
        if _BF16 is None:
            raise RuntimeError("bfloat16 needs the ml_dtypes package (installed with jaxlib)")
        return _BF16
    return np.dtype(name)
