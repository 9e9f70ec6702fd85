"""dbmpi's compiled kernels (Cython, float32 and float64, cores without the GIL).

Every function takes preallocated C-contiguous numpy arrays of one float dtype and writes its
outputs in place; a non-contiguous array, a dtype mismatch or a wrong shape raises ValueError
naming the argument and the fix. :mod:`cython_kernels.reference` holds a plain numpy twin of
each kernel with the same name and signature (the specification the tests check against).

========================  ===================================================================
dense_forward/backward    y = act(x @ W + b), W (n_in, n_out); act in linear/relu/sigmoid/tanh
softmax_xent              mean cross-entropy and (softmax - onehot) / B in one stable pass
multiclass_hinge          Weston-Watkins hinge loss and its gradient
sgd_dense, adagrad_dense  in-place updates of a flat vector; adagrad_rows on a set of rows
embedding_*               lookup, scatter-add (duplicates summed), sparse gradient rows
local_forward/backward    locally connected layer (untied weights), channels-last
l2pool_forward/backward   sqrt(L2POOL_EPS + sum of squares) over each window
lcn_forward/backward      local contrast normalisation (box, same-padding, all channels)
========================  ===================================================================

Build with ``make build`` (or ``pip install -e .``, or
``python setup.py build_ext --inplace``) in the project root.
"""
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
        local_forward,
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
    "local_forward",
    "multiclass_hinge",
    "sgd_dense",
    "softmax_xent",
]
