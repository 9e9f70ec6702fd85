"""dbmpi's compiled kernels (Cython, float32 and float64, cores without the GIL).

Every function takes preallocated numpy arrays of one float dtype and writes its outputs in
place. Arrays must be C-contiguous, except that the image kernels also take batches whose
examples are each C-contiguous with any stride between them (row slabs of a wider buffer,
as model partitions use); anything else, a dtype mismatch or a wrong shape raises ValueError
naming the argument and the fix. :mod:`cython_kernels.reference` holds a plain numpy twin of
each kernel with the same name and signature (the specification the tests check against).

========================  ===================================================================
dense_forward/backward    y = act(x @ W + b), W (n_in, n_out); act in linear/relu/sigmoid/tanh
softmax_xent              mean cross-entropy and (softmax - onehot) / B in one stable pass
multiclass_hinge          Weston-Watkins hinge loss and its gradient
sgd_dense, adagrad_dense  in-place updates of a flat vector (adagrad_dense can refuse NaN/Inf
                          on its own pass); adagrad_rows on a set of rows
embedding_*               lookup, scatter-add (duplicates summed), sparse gradient rows
local_forward/backward    locally connected layer (untied weights), channels-last
local_forward/backward_at the same on a range of output locations (a partition's share)
l2pool_forward/backward   sqrt(L2POOL_EPS + sum of squares) over each window
lcn_forward/backward      local contrast normalisation (box, same-padding, all channels),
                          optionally on a range of output rows
========================  ===================================================================

Build with ``make build`` (or ``pip install -e .``, or
``python setup.py build_ext --inplace``) in the project root.
"""
from cython_kernels import _blasinfo, _blasload

_blasload.load()  # before the kernels: their cimport of cython_blas would import scipy.linalg
if _blasinfo.choice_error():  # said here: the "not built" message below would hide it
    raise ImportError(_blasinfo.choice_error())

try:
    from cython_kernels._dense import (
        dense_backward,
        dense_forward,
        multiclass_hinge,
        softmax_xent,
    )
    from cython_kernels._embedding import (
        embedding_grad_rows,
        embedding_lookup,
        embedding_scatter_add,
    )
    from cython_kernels._image import (
        L2POOL_EPS,
        LCN_EPS,
        l2pool_backward,
        l2pool_forward,
        lcn_backward,
        lcn_forward,
        local_backward,
        local_backward_at,
        local_forward,
        local_forward_at,
    )
    from cython_kernels._optim import adagrad_dense, adagrad_rows, sgd_dense
except ImportError as e:  # pragma: no cover - exercised by a test that hides the module
    raise ImportError(
        "dbmpi's Cython kernels are not built: run `make build` (or `pip install -e .`) "
        f"in the project root (original error: {e})"
    ) from e

__all__ = [
    "L2POOL_EPS",
    "LCN_EPS",
    "adagrad_dense",
    "adagrad_rows",
    "dense_backward",
    "dense_forward",
    "embedding_grad_rows",
    "embedding_lookup",
    "embedding_scatter_add",
    "l2pool_backward",
    "l2pool_forward",
    "lcn_backward",
    "lcn_forward",
    "local_backward",
    "local_backward_at",
    "local_forward",
    "local_forward_at",
    "multiclass_hinge",
    "sgd_dense",
    "softmax_xent",
]
