"""A feed-forward model over a flat parameter vector, with a softmax or hinge output.

Models with another objective (:mod:`~dbmpi.model.autoencoder`, :mod:`~dbmpi.model.ranking`)
subclass :class:`Model` with ``objective=<loss name>``, which registers them, so that
``Model.from_spec(..., loss=name)`` builds them without this module importing theirs (the
package's ``__init__`` imports them, and every import of this module runs it first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

import cython_kernels as ck

from .base import FlatVectors, Layer, bind_all
from .spec import make_layer, resolve

if TYPE_CHECKING:  # config imports the layer registry, which is in this package
    from ..config import ModelConfig


class Model(FlatVectors):
    """Layers in sequence, then a linear output layer of ``num_classes`` units and a loss.

    ``params`` and ``grads`` are flat float32 vectors; every layer holds views into them.
    """

    # loss name -> the Model subclass that implements it (see the module doc)
    objectives: ClassVar[dict[str, type[Model]]] = {}

    def __init_subclass__(cls, objective: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if objective is not None:
            Model.objectives[objective] = cls

    def __init__(self, layers: list[Layer], loss: str = "softmax"):
        if loss not in ("softmax", "hinge"):
            raise ValueError(f"loss must be 'softmax' or 'hinge', got {loss!r}")
        self.loss = loss
        self._bind_layers(layers)
        self._dlogits: dict[int, np.ndarray] = {}

    def _bind_layers(self, layers: list[Layer]) -> None:
        """Allocate the flat parameter and gradient vectors; every layer gets views of them."""
        self.layers = layers
        self.num_params = sum(layer.num_params for layer in layers)
        self.param_range = (0, self.num_params)  # its range of the replica's global vector
        self.params = np.zeros(self.num_params, dtype=np.float32)
        self.grads = np.zeros(self.num_params, dtype=np.float32)
        self.offsets = bind_all(layers, self.params, self.grads)

    @classmethod
    def from_spec(cls, input_shape, layers, num_classes: int, loss: str = "softmax",
                  **opts) -> Model:
        """Build from config-style layer tables, e.g. ``[{"type": "dense", "units": 256}]``
        (the kinds of :mod:`dbmpi.model.registry`). A registered objective builds its own
        model: ``loss = "autoencoder"`` the unsupervised
        :class:`~dbmpi.model.autoencoder.Autoencoder` (``sparsity``), ``loss = "ranking"``
        Collobert & Weston's :class:`~dbmpi.model.ranking.RankingLM`."""
        if loss in Model.objectives:
            return Model.objectives[loss].from_spec(input_shape, layers, num_classes, **opts)
        return cls([make_layer(s) for s in resolve(input_shape, layers, num_classes)], loss)

    @classmethod
    def from_config(cls, cfg: ModelConfig, input_shape, num_classes: int) -> Model:
        if cfg.loss == "autoencoder":
            return cls.from_spec(input_shape, cfg.layers, num_classes, cfg.loss,
                                 sparsity=cfg.sparsity)
        return cls.from_spec(input_shape, cfg.layers, num_classes, cfg.loss)

    @property
    def num_classes(self) -> int:
        return self.layers[-1].n_out

    def init_params(self, seed: int) -> np.ndarray:
        """Deterministic initial parameters (written into and returning ``self.params``)."""
        for i, (layer, off) in enumerate(zip(self.layers, self.offsets)):
            layer.init(self.params[off:off + layer.num_params], np.random.default_rng([seed, i]))
        return self.params

    def _flat(self, x: np.ndarray) -> np.ndarray:
        # an embedding layer takes word ids: no float cast
        return flat_batch(x, self.layers[0].input_dtype)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        """Logits for a batch (a view of an internal buffer: copy it to keep it); ``train``:
        as in a training step (layers with dropout drop units)."""
        h = self._flat(x)
        for layer in self.layers:
            h = layer.forward(h, train=train)
        return h

    def seed_training(self, seed) -> None:
        """Seed the random draws of training steps (each replica its own): the dropout masks
        of every layer that has dropout, one stream per layer."""
        for i, layer in enumerate(self.layers):
            if layer.dropout is not None:
                layer.dropout.seed([*np.atleast_1d(seed).tolist(), i])

    def forward_backward(self, x: np.ndarray, labels: np.ndarray,
                         accumulate: bool = False) -> tuple[float, int]:
        """Mean loss and number of correct predictions; writes d(mean loss)/d(params) to
        ``self.grads`` (adds it there with ``accumulate``, see :attr:`can_accumulate`)."""
        if accumulate and not self.can_accumulate:
            raise ValueError("this model's layers cannot accumulate gradients in place")
        logits = self.forward(x, train=True)
        batch = logits.shape[0]
        n_correct = int(np.count_nonzero(logits.argmax(axis=1) == labels))
        d = self._dlogits.get(batch)
        if d is None:
            d = self._dlogits[batch] = np.empty_like(logits)
        if self.loss == "softmax":
            loss = ck.softmax_xent(logits, labels, d)
        else:
            loss = ck.multiclass_hinge(logits, labels, d)
        self._backward(d, accumulate)
        return float(loss), n_correct

    def _backward(self, d: np.ndarray, accumulate: bool) -> None:
        """From d(loss)/d(output) of the last forward pass down to every layer's gradient."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            d = layer.backward(d, need_dx=i > 0, accumulate=accumulate and layer.num_params > 0)

    def rows_read(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Embedding rows (sorted, unique int64) that a training step on ``(x, labels)``
        reads: what a sparse fetch must bring (:mod:`dbmpi.train.downpour.sparse_worker`)."""
        return np.unique(x).astype(np.int64)

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch: int = 1024) -> tuple[float, float]:
        """(mean loss, accuracy) over a data set, in batches."""
        return evaluate_in_batches(self, x, labels, batch)


def flat_batch(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A batch as the (B, features) C-contiguous matrix the kernels take; copies only if needed."""
    x = x.reshape(x.shape[0], -1)
    if x.dtype != dtype or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=dtype)
    return x


def evaluate_in_batches(model, x: np.ndarray, labels: np.ndarray,
                        batch: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) of anything with ``forward(x) -> logits`` and ``loss``."""
    total_loss, correct = 0.0, 0
    n = x.shape[0]
    for lo in range(0, n, batch):
        xb, yb = x[lo:lo + batch], labels[lo:lo + batch]
        logits = model.forward(xb)
        correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
        d = np.empty_like(logits)
        if model.loss == "softmax":
            total_loss += ck.softmax_xent(logits, yb, d) * len(yb)
        else:
            total_loss += ck.multiclass_hinge(logits, yb, d) * len(yb)
    return total_loss / max(n, 1), correct / max(n, 1)
