"""What kind of array a value is (NumPy or CuPy), without importing CuPy unless it is loaded."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["is_array", "is_cupy", "namespace", "kind_name", "require_array", "short_repr"]


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
