"""How many threads the BLAS behind scipy.linalg.cython_blas (the one the kernels call) uses.

The dense kernels pick their GEMM route by it (see ``_dense.GEMM``). OpenBLAS is asked
directly (its thread count can change at run time, e.g. through threadpoolctl); any other
BLAS, or a platform without /proc, falls back to the usual environment variables.
"""
from __future__ import annotations

import ctypes
import os

_SYMBOLS = ("scipy_openblas_get_num_threads", "openblas_get_num_threads")
_getter = None
_searched = False


def _find_getter():
    global _getter, _searched
    _searched = True
    import scipy.linalg.cython_blas  # noqa: F401 - make sure scipy's BLAS is loaded

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line and "scipy.libs" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                fn.argtypes = []
                _getter = fn
                return fn
    return None


def _from_env() -> int:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[var].split(",")[0]))
        except (KeyError, ValueError):
            pass
    return os.cpu_count() or 1


def blas_threads() -> int:
    """Threads scipy's BLAS will use for a large call (>= 1)."""
    fn = _getter if _searched else _find_getter()
    if fn is not None:
        return max(1, int(fn()))
    return _from_env()
