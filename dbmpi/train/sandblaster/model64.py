"""Sandblaster's replicas in float64: the same network as :class:`~dbmpi.model.Model` with
float64 parameters, gradients and activations, so that the distributed iterates equal a serial
float64 L-BFGS up to rounding (``sandblaster.dtype = "float64"``, the default)."""

from __future__ import annotations

import numpy as np

from ...config import Config
from ...errors import DbmpiError
from ...model import Dense, Model
from ...model.model import flat_batch


def Dense64(n_in: int, n_out: int, activation: str = "relu") -> Dense:
    """:class:`Dense` with float64 activations (the kernels are fused over float and double)."""
    return Dense(n_in, n_out, activation, dtype=np.float64)


class Model64(Model):
    """The same network as :class:`Model`, with float64 parameters, gradients and arithmetic."""

    def __init__(self, layers: list, loss: str = "softmax"):
        super().__init__(layers, loss)
        self.params = np.zeros(self.num_params, dtype=np.float64)
        self.grads = np.zeros(self.num_params, dtype=np.float64)
        for layer, off in zip(self.layers, self.offsets):
            layer.bind(self.params[off:off + layer.num_params],
                       self.grads[off:off + layer.num_params])

    def _flat(self, x: np.ndarray) -> np.ndarray:
        return flat_batch(x, np.float64)


def build_model(cfg: Config, dataset) -> Model:
    """The configured model, computing in ``sandblaster.dtype``."""
    model = Model.from_config(cfg.model, dataset.feature_shape, dataset.num_classes)
    if cfg.sandblaster.dtype == "float32":
        return model
    layers = [layer.float64() for layer in model.layers]  # None: no float64 kernels
    if any(layer is None for layer in layers):
        raise DbmpiError("sandblaster.dtype: float64 replicas support dense layers only; set "
                         "sandblaster.dtype = \"float32\" for this model")
    return Model64(layers, cfg.model.loss)
