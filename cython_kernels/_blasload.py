"""Load ``scipy.linalg.cython_blas`` (the BLAS the kernels ``cimport``) without the rest of
``scipy.linalg``.

A Cython ``cimport`` of it imports the module when ours load, and importing a submodule
runs its package's ``__init__`` first: all of ``scipy.linalg`` and, through it, scipy's
array-API layer, numpy.testing and f2py. That took 0.3 s of a rank's start here (0.6 s of CPU
each with 5 ranks starting on 2 cores), which every rank of every job pays, on a cluster
from a shared file system. The extension module itself needs none of it, so it is loaded
from its file under its own name; ``scipy.linalg`` imported later finds it (a module already
in ``sys.modules`` is not loaded again) and gets it as its attribute, as an ordinary import
would have left it. Where the file cannot be found (another layout of scipy) the import is
the ordinary one.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

NAME = "scipy.linalg.cython_blas"
PACKAGE, _, ATTR = NAME.rpartition(".")


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """When ``scipy.linalg`` is imported, set its ``cython_blas`` attribute afterwards."""

    def find_spec(self, name, path, target=None):
        if name != PACKAGE:
            return None
        # PathFinder directly: the meta path (and this finder on it) is not searched again;
        # this finder leaves it once the package is loaded, not while the import system is
        # iterating over it
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if not hasattr(module, ATTR) and NAME in sys.modules:
                setattr(module, ATTR, sys.modules[NAME])
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module
        return spec


def load() -> None:
    if NAME in sys.modules:
        return
    try:
        import scipy
    except ImportError:
        return  # the kernels' own import then says what is missing
    folder = os.path.join(os.path.dirname(scipy.__file__), "linalg")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "cython_blas" + suffix)
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(NAME, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[NAME] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[NAME]
                raise
            if PACKAGE in sys.modules:
                setattr(sys.modules[PACKAGE], ATTR, module)
            else:
                sys.meta_path.insert(0, _AttachOnImport())
            return
