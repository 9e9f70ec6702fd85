"""An elementwise scale layer kind that dbmpi/ does not know: the tests register it through
:func:`dbmpi.model.registry.register` alone (``tests/test_layers_registry.py`` and, over MPI
ranks, ``tests/mpi/test_layer_kind.py``)."""

from __future__ import annotations

import math

from dbmpi.model import Layer, LayerKind, LayerSpec


class Scale(Layer):
    """``y = a * x + b`` per feature: parameters ``a`` (n) then ``b`` (n)."""

    can_accumulate = True

    def __init__(self, n: int):
        self.n_in = self.n_out = int(n)
        self.out_shape = (self.n_out,)
        self.num_params = 2 * self.n_out

    def bind(self, params, grads):
        n = self.n_out
        self.a, self.b, self.da, self.db = params[:n], params[n:2 * n], grads[:n], grads[n:2 * n]

    def init(self, params, rng):
        n = self.n_out
        params[:n] = rng.uniform(0.5, 1.5, n)
        params[n:2 * n] = 0.0

    def forward(self, x, train=False, out=None):
        self._check_io(out)
        self.x = x
        return x * self.a + self.b

    def backward(self, dy, need_dx=True, accumulate=False, dx_out=None):
        self._check_io(None, dx_out)
        da, db = (dy * self.x).sum(axis=0), dy.sum(axis=0)
        if accumulate:
            self.da += da
            self.db += db
        else:
            self.da[...] = da
            self.db[...] = db
        return dy * self.a if need_dx else None


class ScaleKind(LayerKind):
    """Elementwise over flat features: a slice of output units ``[u0, u1)`` reads input
    features ``[u0, u1)`` only (no halo) and holds ``a[u0:u1]``, ``b[u0:u1]``."""

    name = "scale"

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        n = math.prod(in_shape)
        return LayerSpec(self.name, index, (n,), (n,), {}, self)

    def rows_needed(self, spec, a, b):
        return a, b

    def num_params(self, spec, units):
        return 2 * units

    def param_pieces(self, spec, part, offset):
        a, b = part.units
        yield "range", offset + a, b - a
        yield "range", offset + spec.n_out + a, b - a

    def make(self, spec, units=None):
        a, b = (0, spec.out_units) if units is None else units
        return Scale(b - a)


LAYERS = [{"type": "dense", "units": 6, "activation": "tanh"}, {"type": "scale"},
          {"type": "dense", "units": 4, "activation": "sigmoid"}]
SHAPE, CLASSES = (3, 4), 5
