"""What kind of array a value is (NumPy or CuPy), without importing CuPy unless it is loaded."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_array", "is_cupy", "namespace", "kind_name", "require_array"]


def is_cupy(x) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def is_array(x) -> bool:
    return isinstance(x, np.ndarray) or is_cupy(x)


def namespace(x):
    """The module (numpy or cupy) that owns array ``x``."""
    if is_cupy(x):  # first: lets a NumPy-backed CuPy stand-in (tests/fake_cupy) pass for CuPy
        return sys.modules["cupy"]
    if isinstance(x, np.ndarray):
        return np
    raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")


def kind_name(x) -> str:
    return "cupy" if is_cupy(x) else "numpy"


def require_array(x, caller: str, what: str = "input"):
    if type(x) is np.ndarray:
        return x
    if not (isinstance(x, np.ndarray) or is_cupy(x)):
        raise TypeError(
            f"{caller}: {what} must be a NumPy or CuPy array, got {type(x).__name__} ({x!r:.60}); "
            f"convert it with numpy.asarray(...) first"
        )
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{caller}: {what} is a masked array; collectives move and reduce the data only, so its mask "
            f"would be lost. Pass x.filled(value) (e.g. 0 for a sum), or reduce the mask separately"
        )
    return x
