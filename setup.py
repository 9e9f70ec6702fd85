"""Build the Cython kernels.

All of them share one set of compiler directives. ``DBMPI_CYTHON_DEBUG=1`` turns bounds,
wraparound and initialisation checks back on (and drops -O3) for debugging a kernel.
``DBMPI_NO_KERNELS=1`` builds nothing (see the Makefile's setup target).
"""
import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("DBMPI_CYTHON_DEBUG", "0") == "1"

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "nonecheck": DEBUG,
}
# -fno-math-errno lets sqrt vectorise (we never read errno). -fno-trapping-math lets gcc
# compute both sides of a select (sigmoid's `z >= 0 ? r : e * r`, exp's clamps) as AVX2 and
# SSE2 blends: without it only the AVX-512 clone, whose masked lanes cannot trap, vectorises
# those loops, and the AVX2 one ran scalar (sigmoid over 128x2560: 2346 against 237 us,
# benchmarks/vecmath.py). Results are unchanged (same bits, tests/test_vecmath_flags.py): it
# only lets gcc evaluate operations whose floating-point exception flags nobody reads. No
# -ffast-math.
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]

extensions = [
    Extension(
        f"cython_kernels.{pyx.stem}",
        [str(pyx)],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=CFLAGS,
        # build_ext recompiles a module only when a file listed here (or its source) is newer
        # than the built one: the flags above and the C headers every module includes
        depends=["setup.py", *map(str, sorted(Path("cython_kernels").glob("*.h"))),
                 "cython_kernels/_common.pxd"],
    )
    for pyx in sorted(Path("cython_kernels").glob("*.pyx"))
]

# `make setup` installs the dependencies and the editable link with DBMPI_NO_KERNELS=1, and
# `make build` compiles the kernels in place: once, instead of in both steps.
if os.environ.get("DBMPI_NO_KERNELS") == "1":
    setup()
else:
    setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, quiet=True))
