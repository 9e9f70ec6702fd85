"""Image layers in the single-rank model (local, l2pool, lcn): shapes, the numpy twins of the
kernels chained by hand, and finite differences of the whole model."""

import numpy as np
import pytest

from cython_kernels import reference as ref
from dbmpi.errors import ConfigError
from dbmpi.model import Model
from dbmpi.model.spec import resolve

STACK = [
    {"type": "local", "filters": 3, "kernel": 3, "stride": 1, "activation": "relu"},
    {"type": "l2pool", "size": 2, "stride": 1},
    {"type": "lcn", "size": 3},
    {"type": "local", "filters": 4, "kernel": 2, "stride": 2, "activation": "tanh"},
    {"type": "dense", "units": 6, "activation": "sigmoid"},
]
IN_SHAPE = (11, 9, 2)


def test_resolve_shapes():
    specs = resolve(IN_SHAPE, STACK, 5)
    assert [s.kind for s in specs] == ["local", "l2pool", "lcn", "local", "dense", "dense"]
    assert [s.out_shape for s in specs] == [(9, 7, 3), (8, 6, 3), (8, 6, 3), (4, 3, 4), (6,), (5,)]
    assert specs[0].num_params() == 9 * 7 * 3 * (3 * 3 * 2 + 1)
    assert specs[-1].index == -1 and specs[4].n_in == 48
    assert resolve((6, 6), [{"type": "lcn", "size": 3}], 2)[0].in_shape == (6, 6, 1)


@pytest.mark.parametrize("layers,match", [
    ([{"type": "local", "filters": 2, "kernel": 7}], r"model.layers\[0\].kernel"),
    ([{"type": "lcn", "size": 4}], r"model.layers\[0\].size"),
    ([{"type": "dense", "units": 3}, {"type": "l2pool", "size": 2}], r"model.layers\[1\]"),
])
def test_resolve_errors_name_the_layer(layers, match):
    with pytest.raises(ConfigError, match=match):
        resolve((6, 6), layers, 2)


def _reference_forward(params, x, specs):
    """The model computed with the numpy twins of the kernels, float64."""
    h, off = x.astype(np.float64), 0
    for s in specs:
        B = h.shape[0]
        if s.kind == "dense":
            n = s.n_in * s.n_out
            W = params[off:off + n].reshape(s.n_in, s.n_out)
            b = params[off + n:off + n + s.n_out]
            off += n + s.n_out
            h = ref._act(h.reshape(B, -1) @ W + b, s.opts["activation"])
            continue
        y = np.empty((B, *s.out_shape))
        if s.kind == "local":
            F, k, C = s.opts["filters"], s.opts["kernel"], s.in_shape[2]
            OH, OW = s.out_shape[:2]
            nW = OH * OW * F * k * k * C
            W = params[off:off + nW].reshape(OH, OW, F, k, k, C)
            b = params[off + nW:off + nW + OH * OW * F].reshape(OH, OW, F)
            off += nW + OH * OW * F
            ref.local_forward(h, W, b, s.opts["stride"], y)
            y = ref._act(y, s.opts["activation"])
        elif s.kind == "l2pool":
            ref.l2pool_forward(h, s.opts["size"], s.opts["stride"], y)
        else:
            ref.lcn_forward(h, s.opts["size"], y, np.empty_like(y), np.empty(y.shape[:3]))
        h = y
    return h


def test_image_model_matches_numpy_twins_and_finite_differences():
    rng = np.random.default_rng(0)
    m = Model.from_spec(IN_SHAPE, STACK, num_classes=5)
    specs = resolve(IN_SHAPE, STACK, 5)
    assert m.num_params == sum(s.num_params() for s in specs)
    m.init_params(3)
    m.params += rng.normal(0, 0.05, m.num_params).astype(np.float32)
    x = rng.normal(size=(4, *IN_SHAPE)).astype(np.float32)
    y = rng.integers(0, 5, 4)
    logits = m.forward(x).copy()
    p64 = m.params.astype(np.float64)
    want = _reference_forward(p64, x, specs)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    loss, _ = m.forward_backward(x, y)

    def loss_of(p):
        z = _reference_forward(p, x, specs)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    assert loss == pytest.approx(loss_of(p64), rel=1e-5)
    eps = 1e-5
    idx = np.concatenate([rng.choice(specs[0].num_params(), 20, replace=False),
                          m.num_params - rng.choice(200, 10, replace=False) - 1])
    for i in idx:
        e = np.zeros_like(p64)
        e[i] = eps
        fd = (loss_of(p64 + e) - loss_of(p64 - e)) / (2 * eps)
        assert m.grads[i] == pytest.approx(fd, rel=2e-3, abs=2e-6), i


def test_l2pool_default_stride_is_its_size():
    s = resolve((8, 8), [{"type": "l2pool", "size": 2}], 2)[0]
    assert s.opts["stride"] == 2 and s.out_shape == (4, 4, 1)
