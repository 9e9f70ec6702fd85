"""The unsupervised image model of Le et al. (ICML 2012): stages of locally connected filtering,
L2 pooling and local contrast normalisation, trained as a reconstruction-TICA autoencoder.

``[model] loss = "autoencoder"`` turns the configured image layers into the encoder (no output
layer is added; labels are ignored). The objective of a batch ``x`` of ``B`` examples is

    L = 1/B * sum_n [ sum over local layers l   1/2 ||W_l^T z_l - h_l||^2
                      + sparsity * sum over l2pool layers p   sum of p's outputs ]

where ``h_l`` is the input of local layer ``l`` (the previous stage's output), ``z_l = W_l h_l
+ b_l`` its output, and ``W_l^T z_l`` the tied-weight reconstruction: exactly the data gradient
that the local layer's backward pass computes (``local_backward`` with ``dy = z``). The pooled
outputs ``sqrt(eps + sum z^2)`` over a window are the TICA sparsity penalty (Le et al.'s
``sum sqrt(eps + H (W x)^2)``). As in Le et al., all stages are trained jointly on the sum of
their objectives, so the gradient of a later stage's terms flows back into earlier stages
through the pooling and LCN layers. Local layers must be linear (the encoder of RICA).

Gradient of the reconstruction term of one local layer (``r = W^T z - h``, scaled by 1/B):

* through ``z``: ``dL/dz += W r``  (``local_forward`` of ``r`` with zero bias);
* through the decoder's ``W^T``: ``dL/dW += z (x) patches(r)``  (``local_backward`` with input
  ``r`` and ``dy = z``);
* directly: ``dL/dh -= r``.

The first two are added to what the later layers send back; the usual backward pass of the
layer then turns ``dL/dz`` into ``dW``, ``db`` and ``dL/dh``. ``tests/test_autoencoder.py``
checks the gradient against finite differences of an independent float64 numpy objective.
"""

from __future__ import annotations

import numpy as np

import cython_kernels as ck

from .image import L2Pool, Local, image_view
from .model import Model, flat_batch
from .spec import make_layer, resolve


class Autoencoder(Model, objective="autoencoder"):
    """The encoder's layers over one flat parameter vector, with the RICA objective.

    It has the interface Downpour uses of :class:`~dbmpi.model.Model` (``params``, ``grads``,
    ``set_grads``, ``init_params``, ``forward_backward``, ``evaluate``), so replicas, shards
    and checkpoints treat it like any model. ``forward`` returns the encoder's output (the
    features a classifier is put on).
    """

    unsupervised = True

    def __init__(self, layers: list, sparsity: float = 0.1):
        if not any(isinstance(layer, Local) for layer in layers):
            raise ValueError("an autoencoder needs at least one local layer")
        for layer in layers:
            if isinstance(layer, Local) and layer.activation != "linear":
                raise ValueError("the local layers of an autoencoder must be linear")
        self.loss = "autoencoder"
        self.sparsity = float(sparsity)
        self._bind_layers(layers)
        self._scratch: dict[tuple, np.ndarray] = {}
        self.last_terms: dict[str, float] = {}

    @classmethod
    def from_spec(cls, input_shape, layers, num_classes: int = 1, loss: str = "autoencoder",
                  sparsity: float = 0.1) -> Autoencoder:
        specs = resolve(input_shape, layers, max(int(num_classes), 1))[:-1]  # no output layer
        return cls([make_layer(s) for s in specs], sparsity)

    @classmethod
    def from_config(cls, cfg, input_shape, num_classes: int = 1) -> Autoencoder:
        return cls.from_spec(input_shape, cfg.layers, num_classes, sparsity=cfg.sparsity)

    @property
    def num_classes(self) -> int:  # no classes: the output is the feature vector
        return 0

    @property
    def num_features(self) -> int:
        return self.layers[-1].n_out

    @property
    def can_accumulate(self) -> bool:
        return False

    def _buf(self, key, shape) -> np.ndarray:
        a = self._scratch.get((key, shape))
        if a is None:
            a = self._scratch[(key, shape)] = np.empty(shape, np.float32)
        return a

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The encoder's output for a batch (a view of an internal buffer: copy to keep)."""
        h = flat_batch(x)
        for layer in self.layers:
            h = layer.forward(h)
        return h

    def _forward_all(self, x: np.ndarray) -> list[np.ndarray]:
        hs = [flat_batch(x)]
        for layer in self.layers:
            hs.append(layer.forward(hs[-1]))
        return hs

    def _reconstruct(self, i: int, layer: Local, h: np.ndarray, z: np.ndarray) -> np.ndarray:
        """r = W^T z - h of local layer ``i`` (a scratch buffer)."""
        r = self._buf(("r", i), h.shape)
        dW = self._buf(("dW", i), layer.W.shape)
        db = self._buf(("db", i), layer.b.shape)
        ck.local_backward(image_view(h, layer.in_shape), layer.W, image_view(z, layer.out_shape),
                          layer.s, dW, db, image_view(r, layer.in_shape))
        r -= h
        return r

    def objective(self, x: np.ndarray) -> dict[str, float]:
        """Mean reconstruction and sparsity terms and their sum over a batch (no gradient)."""
        hs = self._forward_all(x)
        return self._terms(hs)

    def _terms(self, hs: list[np.ndarray]) -> dict[str, float]:
        B = hs[0].shape[0]
        rec = sp = 0.0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Local):
                r = self._reconstruct(i, layer, hs[i], hs[i + 1])
                rec += 0.5 * float(np.dot(r.ravel(), r.ravel()))
            elif isinstance(layer, L2Pool):
                sp += float(hs[i + 1].sum(dtype=np.float64))
        rec /= B
        sp *= self.sparsity / B
        return {"loss": rec + sp, "reconstruction": rec, "sparsity": sp}

    def forward_backward(self, x: np.ndarray, labels: np.ndarray | None = None,
                         accumulate: bool = False) -> tuple[float, int]:
        """Mean objective (labels ignored, 0 correct); writes dL/dparams to ``self.grads``."""
        if accumulate:
            raise ValueError("the autoencoder cannot accumulate gradients in place")
        hs = self._forward_all(x)
        B = hs[0].shape[0]
        terms = self._terms(hs)  # leaves r of every local layer in its scratch buffer
        self.last_terms = terms
        inv = np.float32(1.0 / B)
        g = self._buf(("g", len(self.layers)), hs[-1].shape)
        g[...] = 0
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if isinstance(layer, L2Pool):
                g += np.float32(self.sparsity) * inv
            if layer.num_params == 0:
                g = layer.backward(g, need_dx=True) if i > 0 else None
                continue
            # local layer i: add the reconstruction's gradient through z, then backprop
            r = self._scratch[(("r", i), hs[i].shape)]
            wr = self._buf(("wr", i), hs[i + 1].shape)
            zero_b = self._buf(("b0", i), layer.b.shape)
            zero_b[...] = 0
            ck.local_forward(image_view(r, layer.in_shape), layer.W, zero_b, layer.s,
                             image_view(wr, layer.out_shape))
            g += inv * wr
            dx = layer.backward(g, need_dx=i > 0)
            # the decoder's W^T: dW += z (x) patches(r) / B
            dW = self._buf(("dW", i), layer.W.shape)
            db = self._buf(("db", i), layer.b.shape)
            ck.local_backward(image_view(r, layer.in_shape), layer.W,
                              image_view(hs[i + 1], layer.out_shape), layer.s, dW, db, None)
            layer.dW += inv * dW
            if dx is not None:
                dx -= inv * r
            g = dx
        return terms["loss"], 0

    def evaluate(self, x: np.ndarray, labels: np.ndarray | None = None,
                 batch: int = 1024) -> tuple[float, float]:
        """(mean objective, 0.0): an autoencoder has no accuracy. The mean reconstruction and
        sparsity terms are left in :attr:`last_eval`."""
        n = x.shape[0]
        tot = {"loss": 0.0, "reconstruction": 0.0, "sparsity": 0.0}
        for lo in range(0, n, batch):
            t = self.objective(x[lo:lo + batch])
            m = min(batch, n - lo)
            for k in tot:
                tot[k] += t[k] * m
        self.last_eval = {k: v / max(n, 1) for k, v in tot.items()}
        return self.last_eval["loss"], 0.0

    def encode(self, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        """(N, num_features) float32 encoder outputs of a data set, in batches."""
        out = np.empty((x.shape[0], self.num_features), np.float32)
        for lo in range(0, x.shape[0], batch):
            out[lo:lo + batch] = self.forward(x[lo:lo + batch])
        return out

    def activation_and_input_grad(self, x: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """Activation of output feature ``unit`` for each example of ``x`` and its gradient with
        respect to the input, ``(B,)`` and ``(B, input features)``. Overwrites ``grads``."""
        hs = self._forward_all(x)
        act = hs[-1][:, unit].copy()
        g = self._buf(("sel", len(self.layers)), hs[-1].shape)
        g[...] = 0
        g[:, unit] = 1
        for i in range(len(self.layers) - 1, -1, -1):
            g = self.layers[i].backward(g, need_dx=True)
        return act, g.copy()
