"""The seam of the layer registry: a layer kind defined here, in the test, and registered
through :func:`dbmpi.model.registry.register` alone, passes config validation, ``resolve``, a
single-rank model (gradient checked by finite differences of an independent float64 numpy
objective) and a 2-partition plan (whose slices, run one after another, give the single-rank
model's logits). Nothing in dbmpi/ names the kind (it is in ``tests/scale_kind.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from scale_kind import CLASSES, LAYERS, SHAPE, Scale, ScaleKind

from dbmpi import config
from dbmpi.errors import ConfigError
from dbmpi.model import Model
from dbmpi.model.partition import PartitionPlan
from dbmpi.model.registry import LAYER_KINDS, register, unregister
from dbmpi.model.spec import resolve


@pytest.fixture
def scale_kind():
    kind = register(ScaleKind())
    yield kind
    unregister("scale")


def _load(tmp_path, layers_toml: str, extra: str = ""):
    p = tmp_path / "c.toml"
    p.write_text(f"{extra}[model]\nlayers = [{layers_toml}]\n")
    return config.load(p)


def test_config_validation_accepts_it_and_checks_its_keys(tmp_path, scale_kind):
    text = ('{type = "dense", units = 6}, {type = "scale"}, {type = "dense", units = 4}')
    cfg = _load(tmp_path, text, "[topology]\npartitions = 2\n")
    assert [layer.get("type") for layer in cfg.model.layers] == ["dense", "scale", "dense"]
    with pytest.raises(ConfigError, match=r"model.layers\[0\] has unknown keys \['units'\] "
                                          r"\(allowed for 'scale': \['type'\]\)"):
        _load(tmp_path, '{type = "scale", units = 3}')
    # a flat kind flattens: no image layer after it (the generic rule, not a name check)
    with pytest.raises(ConfigError, match=r"model.layers\[1\] is a 'lcn' layer after a dense"):
        _load(tmp_path, '{type = "scale"}, {type = "lcn", size = 3}')


def test_unregistered_it_is_an_unknown_type(tmp_path):
    assert "scale" not in LAYER_KINDS
    with pytest.raises(ConfigError, match=r"model.layers\[0\].type must be one of \('dense', "
                                          r"'local', 'l2pool', 'lcn', 'embedding'\), got 'scale'"):
        _load(tmp_path, '{type = "scale"}')
    with pytest.raises(ConfigError, match="unknown layer type 'scale'"):
        resolve(SHAPE, LAYERS, CLASSES)


def test_spec_resolves_it(scale_kind):
    specs = resolve(SHAPE, LAYERS, CLASSES)
    assert [s.kind for s in specs] == ["dense", "scale", "dense", "dense"]
    assert specs[1].in_shape == specs[1].out_shape == (6,)
    assert specs[1].num_params() == 12 and specs[1].num_params(2) == 4
    assert specs[1].rows_needed(2, 5) == (2, 5) and not specs[1].spatial


def test_scale_gradient_by_finite_differences():
    """The layer alone, float64: L = sum(w * y) against central differences."""
    rng = np.random.default_rng(0)
    layer = Scale(5)
    params, grads = rng.normal(size=10), np.zeros(10)
    layer.bind(params, grads)
    x, w = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    layer.forward(x)
    dx = layer.backward(w.copy(), need_dx=True)

    def loss(p, xx):
        return float((w * (xx * p[:5] + p[5:])).sum())

    eps = 1e-6
    num = np.array([(loss(params + eps * e, x) - loss(params - eps * e, x)) / (2 * eps)
                    for e in np.eye(10)])
    np.testing.assert_allclose(grads, num, rtol=1e-7, atol=1e-8)
    num_x = np.array([(loss(params, x + eps * e.reshape(3, 5)) -
                       loss(params, x - eps * e.reshape(3, 5))) / (2 * eps)
                      for e in np.eye(15)]).reshape(3, 5)
    np.testing.assert_allclose(dx, num_x, rtol=1e-7, atol=1e-8)


def _reference_loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """dense(tanh, 6) -> scale -> dense(sigmoid, 4) -> dense(linear, 5) -> mean softmax
    cross-entropy, in float64 numpy, parameters laid out as the model's flat vector."""
    h, off = x.reshape(len(x), -1), 0

    def take(n):
        nonlocal off
        off += n
        return theta[off - n:off]

    for n_out, act in ((6, np.tanh), (None, None), (4, lambda z: 1 / (1 + np.exp(-z))),
                       (CLASSES, lambda z: z)):
        if n_out is None:
            a, b = take(h.shape[1]), take(h.shape[1])
            h = h * a + b
            continue
        W = take(h.shape[1] * n_out).reshape(h.shape[1], n_out)
        h = act(h @ W + take(n_out))
    h = h - h.max(axis=1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def test_a_single_rank_model_trains_it(scale_kind):
    model = Model.from_spec(SHAPE, LAYERS, CLASSES)
    assert isinstance(model.layers[1], Scale)
    assert model.num_params == (12 * 6 + 6) + 12 + (6 * 4 + 4) + (4 * 5 + 5)
    rng = np.random.default_rng(1)
    model.init_params(3)
    b_at = model.offsets[1] + 6
    model.params[b_at:b_at + 6] = rng.normal(0, 0.5, 6)  # init gives b = 0: test it nonzero
    x = rng.normal(size=(7, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, 7)
    loss, _ = model.forward_backward(x, y)
    theta = model.params.astype(np.float64)
    assert loss == pytest.approx(_reference_loss(theta, x.astype(np.float64), y), rel=1e-5)
    eps = 1e-5
    num = np.array([(_reference_loss(theta + eps * e, x, y) -
                     _reference_loss(theta - eps * e, x, y)) / (2 * eps)
                    for e in np.eye(model.num_params)])
    np.testing.assert_allclose(model.grads, num, rtol=2e-3, atol=2e-5)
    # accumulate: a second pass adds the same gradient
    first = model.grads.copy()
    model.forward_backward(x, y, accumulate=True)
    np.testing.assert_allclose(model.grads, 2 * first, rtol=1e-5, atol=1e-7)


def test_a_two_partition_plan_cuts_it(scale_kind):
    plan = PartitionPlan(SHAPE, LAYERS, CLASSES, 2)
    row = plan.parts[1]
    assert [part.units for part in row] == [(0, 3), (3, 6)]
    assert [part.need for part in row] == [part.own_in for part in row]  # elementwise
    assert plan.transfers[1] == []  # so nothing crosses partitions for it
    assert [part.num_params for part in row] == [6, 6]

    model = Model.from_spec(SHAPE, LAYERS, CLASSES)
    model.init_params(5)
    theta = model.params.copy()
    glob = plan.from_model(theta)
    np.testing.assert_array_equal(plan.to_model(glob), theta)
    # partition 1 holds a[3:6] and b[3:6] of the scale layer, after its dense slice
    scale_at = model.offsets[1]
    p1 = plan.partition_from_model(1, theta)
    dense_slice = plan.parts[0][1].num_params
    np.testing.assert_array_equal(p1[dense_slice:dense_slice + 3], theta[scale_at + 3:scale_at + 6])
    np.testing.assert_array_equal(p1[dense_slice + 3:dense_slice + 6],
                                  theta[scale_at + 9:scale_at + 12])

    # the partitions' slices, run one after another on this rank, give the model's logits
    x = np.random.default_rng(2).normal(size=(4, *SHAPE)).astype(np.float32)
    vecs = [plan.partition_from_model(p, theta) for p in range(2)]
    offs = [0, 0]
    h = x.reshape(4, -1)
    for row in plan.parts:
        out = np.empty((4, row[0].spec.n_out), np.float32)
        for p, part in enumerate(row):
            layer = part.spec.impl.make_part(part)
            v = vecs[p][offs[p]:offs[p] + part.num_params]
            layer.bind(v, np.zeros_like(v))
            offs[p] += part.num_params
            out[:, part.out_cols[0]:part.out_cols[1]] = layer.forward(
                np.ascontiguousarray(h[:, part.need[0]:part.need[1]]))
        h = out
    np.testing.assert_allclose(h, model.forward(x), rtol=1e-5, atol=1e-6)
