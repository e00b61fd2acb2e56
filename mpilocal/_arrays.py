"""What kind of array a value is (NumPy or CuPy), without importing CuPy unless it is loaded."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_array", "is_cupy", "namespace", "kind_name", "require_array", "short_repr", "host_to_cupy"]


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


def host_to_cupy(a):
    """Host array ``a`` (NumPy, or a NumPy scalar) copied to a CuPy array, bit for bit.

    ``cupy.asarray`` fills a 0-d result with ``ndarray.fill(value)``, which memsets the array to zero
    when ``value == 0``: -0.0 (and -0.0+0j) arrive as +0.0. A 0-d array therefore travels as one
    element of a 1-d array (a plain memory copy) and is reshaped to 0-d on the device. CuPy holds
    native byte order only: a non-native dtype is converted to the native one (same values)."""
    import cupy

    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.ndim == 0:
        return cupy.asarray(a.reshape(1)).reshape(())
    return cupy.asarray(a)


def kind_name(x) -> str:
    return "cupy" if is_cupy(x) else "numpy"


def short_repr(x, limit: int = 60) -> str:
    """``repr(x)`` cut at a word boundary near ``limit`` characters (never mid-word), with "..."."""
    try:
        text = " ".join(repr(x).split())
    except Exception:
        text = f"<{type(x).__name__}>"
    if len(text) <= limit:
        return text
    cut = text[:limit]
    at = max(cut.rfind(c) for c in " ,(=")
    return (cut[:at] if at > limit // 2 else cut).rstrip(" ,(=") + " ..."


def require_array(x, caller: str, what: str = "input"):
    if type(x) is np.ndarray:
        return x
    if not (isinstance(x, np.ndarray) or is_cupy(x)):
        if type(x).__name__ == "DTensor" and hasattr(x, "to_local"):  # without importing dtensor (above us)
            hint = ("pass this rank's shard x.to_local() (or the global array x.full_tensor(), a collective); "
                    "the functional collectives work on local arrays")
        else:
            hint = "convert it with numpy.asarray(...) first"
        raise TypeError(
            f"{caller}: {what} must be a NumPy or CuPy array, got {type(x).__name__} ({short_repr(x)}); {hint}"
        )
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{caller}: {what} is a masked array; collectives move and reduce the data only, so its mask "
            f"would be lost. Pass x.filled(value) (e.g. 0 for a sum), or reduce the mask separately"
        )
    return x
