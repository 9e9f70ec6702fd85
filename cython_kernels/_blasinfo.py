"""Which BLAS the kernels call, and how many threads it uses.

numpy's and scipy's wheels each bundle an OpenBLAS, often of different releases, each with its
own thread pool. The kernels call numpy's when its library exports the 64-bit-integer Fortran
entry points they need (numpy's own wheels: ``scipy_sgemm_64_`` ...): that is the pool a
user's array code (and dbmpi's own ``np.dot``) runs on, so a step never hands work between two
pools; in speed the two measured level here (docs/performance.md). Otherwise (numpy
built against MKL, Accelerate, a distribution's BLAS) they call ``scipy.linalg.cython_blas``.
``DBMPI_BLAS=scipy`` forces scipy's, ``DBMPI_BLAS=numpy`` requires numpy's (ImportError if it
cannot be reached); unset or ``auto``, the rule above.

The thread count is asked of that library (it can change at run time, e.g. through
threadpoolctl); any other BLAS, or a platform without /proc, falls back to the usual
environment variables.
"""
from __future__ import annotations

import ctypes
import os

ENV = "DBMPI_BLAS"
CHOICES = ("auto", "numpy", "scipy")
# (sgemm, dgemm, saxpy, daxpy) and the thread-count getter, by symbol-name convention: numpy
# 2's scipy-openblas64 wheels, then numpy 1.2x's openblas64_ builds
_ILP64_NAMES = [
    (("scipy_sgemm_64_", "scipy_dgemm_64_", "scipy_saxpy_64_", "scipy_daxpy_64_"),
     ("scipy_openblas_get_num_threads64_",)),
    (("sgemm_64_", "dgemm_64_", "saxpy_64_", "daxpy_64_"), ("openblas_get_num_threads64_",)),
]
_SCIPY_GETTERS = ("scipy_openblas_get_num_threads", "openblas_get_num_threads")

_chosen: dict | None = None


def _loaded_libraries(marker: str) -> list[str]:
    """Paths of loaded OpenBLAS libraries whose path contains ``marker`` (from /proc)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "openblas" in line and marker in line})
    except OSError:
        return []


def _numpy_blas() -> dict | None:
    import numpy  # noqa: F401 - loads numpy's BLAS

    for path in _loaded_libraries("numpy.libs"):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for routines, getters in _ILP64_NAMES:
            fns = [getattr(lib, name, None) for name in routines]
            if all(fn is not None for fn in fns):
                getter = next((getattr(lib, g) for g in getters if hasattr(lib, g)), None)
                return {"library": "numpy", "getter": getter,
                        "pointers": tuple(ctypes.cast(fn, ctypes.c_void_p).value
                                          for fn in fns)}
    return None


def _scipy_blas() -> dict:
    import scipy.linalg.cython_blas  # noqa: F401 - make sure scipy's BLAS is loaded

    for path in _loaded_libraries("scipy.libs"):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SCIPY_GETTERS:
            if hasattr(lib, name):
                return {"library": "scipy", "getter": getattr(lib, name),
                        "pointers": (0, 0, 0, 0)}
    return {"library": "scipy", "getter": None, "pointers": (0, 0, 0, 0)}


def _wanted() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def choice_error() -> str | None:
    """The fix for a ``DBMPI_BLAS`` value that is not one of the choices, else None."""
    if _wanted() in CHOICES:
        return None
    return f"{ENV}={os.environ[ENV]!r} is not one of auto, numpy, scipy: unset it or pick one"


def kernel_blas() -> dict:
    """The BLAS the kernels call: ``library`` ("numpy" or "scipy"), ``getter`` (its thread
    count, or None) and ``pointers`` (sgemm, dgemm, saxpy, daxpy addresses for _blas.h; zeros
    mean scipy's cython_blas)."""
    global _chosen
    if _chosen is None:
        error = choice_error()
        if error:
            raise ImportError(error)
        want = _wanted()
        found = _numpy_blas() if want != "scipy" else None
        if found is None and want == "numpy":
            raise ImportError(f"{ENV}=numpy, but numpy's BLAS has no 64-bit OpenBLAS entry "
                              "points to call: unset it to use scipy's")
        chosen = found or _scipy_blas()
        if chosen["getter"] is not None:
            chosen["getter"].restype = ctypes.c_int
            chosen["getter"].argtypes = []
        _chosen = chosen
    return _chosen


def _from_env() -> int:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            return max(1, int(os.environ[var].split(",")[0]))
        except (KeyError, ValueError):
            pass
    return os.cpu_count() or 1


def blas_threads() -> int:
    """Threads the kernels' BLAS will use for a large call (>= 1)."""
    fn = kernel_blas()["getter"]
    if fn is not None:
        return max(1, int(fn()))
    return _from_env()
