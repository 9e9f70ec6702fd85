"""Word embedding layer: the first layer of a neural language model (Bengio et al. 2003).

Input: a batch of context windows, ``(B, context)`` integer word ids. Output: the embeddings
of the ``context`` words, concatenated, ``(B, context * dim)``: one table ``E`` (``vocab x
dim``) shared by every context position. ``E`` is the first ``vocab * dim`` elements of the
model's flat parameter vector, row ``r`` = word ``r``, so the parameter server can address a
word's row directly (:mod:`dbmpi.ps.sparse`).

Backward: ``dE[idx] += dout`` (duplicates summed), into the dense gradient vector
(``sparse = False``), or, with ``sparse = True``, no dense write at all: the layer keeps the
ids and output gradients of every backward pass since :meth:`take_rows` was last called, and
:meth:`take_rows` returns the touched rows (sorted, unique) and their summed gradients. That
is what a replica pushes when only the touched rows travel.
"""

from __future__ import annotations

import numpy as np

import cython_kernels as ck

from .base import Layer
from .layers import Dropout


class Embedding(Layer):
    """``y[b] = concat(E[x[b, 0]], ..., E[x[b, context - 1]])``."""

    input_dtype = np.int64  # the model passes ids through unconverted (no float cast)
    can_accumulate = True

    def __init__(self, vocab: int, dim: int, context: int, dropout: float = 0.0):
        self.vocab, self.dim, self.context = int(vocab), int(dim), int(context)
        self.dropout = Dropout(dropout) if dropout > 0 else None
        self._dropped = False
        self.n_in, self.n_out = self.context, self.context * self.dim
        self.out_shape = (self.n_out,)
        self.num_params = self.vocab * self.dim
        self.sparse = False
        self._buffers: dict[int, np.ndarray] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        self.E = params[:self.num_params].reshape(self.vocab, self.dim)
        self.dE = grads[:self.num_params].reshape(self.vocab, self.dim)

    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        """Uniform in [-0.1, 0.1) (word2vec-style small random vectors)."""
        params[:self.num_params] = rng.uniform(-0.1, 0.1, self.num_params).astype(np.float32)

    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        """The concatenated embeddings; with ``train``, after dropout (when the layer has it)."""
        self._check_io(out)
        B = x.shape[0]
        idx = np.ascontiguousarray(x, dtype=np.int64).reshape(B * self.context)
        y = self._buffers.get(B)
        if y is None:
            y = self._buffers[B] = np.empty((B, self.n_out), np.float32)
        ck.embedding_lookup(self.E, idx, y.reshape(B * self.context, self.dim))
        self.idx = idx
        self._dropped = train and self.dropout is not None
        return self.dropout.forward(y) if self._dropped else y

    def backward(self, dy: np.ndarray, need_dx: bool = False, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> None:
        """Add the gradient of ``E`` (dense: into dE, zeroed first unless ``accumulate``;
        sparse: kept for :meth:`take_rows`). Ids have no gradient: returns None."""
        self._check_io(None, dx_out)
        if self._dropped:
            self.dropout.backward(dy)
        dout = dy.reshape(-1, self.dim)
        if self.sparse:
            if not accumulate:
                self._pending.clear()
            self._pending.append((dout.copy(), self.idx.copy()))
            return
        if not accumulate:
            self.dE.fill(0.0)
        ck.embedding_scatter_add(dout, self.idx, self.dE)
        return

    def take_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, grad_rows) summed over the backward passes since the last call: sorted
        unique int64 rows and their (k, dim) float32 gradients. Clears the pending passes."""
        if not self._pending:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        if len(self._pending) == 1:
            dout, idx = self._pending[0]
        else:
            dout = np.concatenate([d for d, _ in self._pending])
            idx = np.concatenate([i for _, i in self._pending])
        self._pending.clear()
        return ck.embedding_grad_rows(dout, idx)
