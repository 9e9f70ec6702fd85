"""Argument checks shared by the kernels: one place for the error messages.

Every kernel takes preallocated C-contiguous arrays and writes its outputs in place, so the
checks below are the whole contract: dtype (float32 or float64, one dtype per call), rank,
shape, C-contiguity and, for outputs, writeability. Each error names the argument and the fix.
"""
from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))
_INT32_MAX = 2**31 - 1


def _array(name: str, a: object) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}: "
                        f"pass np.asarray({name})")
    return a


def _contig(name: str, a: np.ndarray, out: bool) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous: pass np.ascontiguousarray({name})")
    if out and not a.flags.writeable:
        raise ValueError(f"{name} is written in place but is read-only: pass a writeable copy")


def _shape(name: str, a: np.ndarray, shape: tuple) -> None:
    if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {a.shape} but must have shape {want}")


def floats(name: str, a: object, shape: tuple, dtype: np.dtype | None = None, ref: str = "",
           out: bool = False) -> np.dtype:
    """Check a float array; ``dtype=None`` means 'any of float32/float64' (returns it).

    ``shape`` is a tuple of ints or None (any size in that axis); ``ref`` names the argument
    whose dtype this one must share.
    """
    a = _array(name, a)
    if dtype is None:
        if a.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {a.dtype} but must be float32 or float64: "
                             f"pass {name}.astype(np.float32)")
    elif a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but {ref} is {dtype.name}: all float "
                         f"arrays of one call share a dtype: pass {name}.astype(np.{dtype.name})")
    _shape(name, a, shape)
    _contig(name, a, out)
    if any(s > _INT32_MAX for s in a.shape):
        raise ValueError(f"{name} has an axis longer than 2**31 - 1 ({a.shape}): split the call")
    return a.dtype


def indices(name: str, a: object, shape: tuple) -> np.ndarray:
    """Check an integer index array (int64, or int32 which is widened: one copy)."""
    a = _array(name, a)
    if a.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} has dtype {a.dtype} but must be int64 (or int32): "
                         f"pass {name}.astype(np.int64)")
    _shape(name, a, shape)
    _contig(name, a, False)
    if a.dtype != np.int64:
        a = a.astype(np.int64)
    return a


def positive(name: str, v: int) -> int:
    v = int(v)
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v
