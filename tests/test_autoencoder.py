"""The sparse autoencoder (reconstruction TICA over local / L2-pool / LCN stages): its objective
against an independent float64 numpy implementation, its gradient against finite differences of
that implementation, its config checks, and the optimal-stimulus routine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cython_kernels import reference as ref
from dbmpi import config as config_mod
from dbmpi.errors import ConfigError
from dbmpi.model import Model
from dbmpi.model.autoencoder import Autoencoder
from dbmpi.model.spec import resolve

STACKS = {
    # lcn first (the input normalised locally), then two Le et al. stages
    "two-stages": ((9, 9), [
        {"type": "lcn", "size": 3},
        {"type": "local", "filters": 3, "kernel": 3},
        {"type": "l2pool", "size": 2, "stride": 1},
        {"type": "lcn", "size": 3},
        {"type": "local", "filters": 2, "kernel": 2, "stride": 2},
        {"type": "l2pool", "size": 2},
    ]),
    # two input channels, a strided local layer, pooling as the last layer
    "channels-stride": ((8, 8, 2), [
        {"type": "local", "filters": 4, "kernel": 4, "stride": 2},
        {"type": "l2pool", "size": 2},
    ]),
    # a local layer last (no pooling after it), sparsity 0 on nothing
    "local-last": ((7, 7), [
        {"type": "local", "filters": 2, "kernel": 3},
        {"type": "l2pool", "size": 2, "stride": 1},
        {"type": "local", "filters": 2, "kernel": 2},
    ]),
}


def reference_objective(input_shape, layers, params: np.ndarray, x: np.ndarray,
                        sparsity: float) -> float:
    """The objective in float64 with numpy (the kernels' numpy twins), written from the
    formula: sum over local layers of 1/2 ||W^T z - h||^2 plus sparsity * sum of the pooled
    outputs, averaged over the batch."""
    specs = resolve(input_shape, layers, 1)[:-1]
    B = x.shape[0]
    h = x.reshape(B, *specs[0].in_shape).astype(np.float64)
    off = 0
    total = 0.0
    for s in specs:
        if s.kind == "local":
            OH, OW, F = s.out_shape
            k, C = s.opts["kernel"], s.in_shape[2]
            nw = OH * OW * F * k * k * C
            W = params[off:off + nw].reshape(OH, OW, F, k, k, C)
            b = params[off + nw:off + nw + OH * OW * F].reshape(OH, OW, F)
            off += nw + OH * OW * F
            z = np.empty((B, OH, OW, F))
            ref.local_forward(h, W, b, s.opts["stride"], z)
            xhat = np.empty_like(h)  # W^T z: the data gradient of the layer for dy = z
            ref.local_backward(h, W, z, s.opts["stride"], np.empty_like(W), np.empty_like(b),
                               xhat)
            total += 0.5 * np.sum((xhat - h) ** 2)
            h = z
        elif s.kind == "l2pool":
            y = np.empty((B, *s.out_shape))
            ref.l2pool_forward(h, s.opts["size"], s.opts["stride"], y)
            total += sparsity * y.sum()
            h = y
        else:
            y = np.empty_like(h)
            ref.lcn_forward(h, s.opts["size"], y, np.empty_like(h), np.empty(h.shape[:3]))
            h = y
    assert off == params.size
    return total / B


@pytest.mark.parametrize("name", sorted(STACKS))
def test_objective_matches_numpy_and_gradient_matches_finite_differences(name):
    input_shape, layers = STACKS[name]
    sparsity = 0.3
    model = Model.from_spec(input_shape, layers, 10, "autoencoder", sparsity=sparsity)
    assert isinstance(model, Autoencoder)
    rng = np.random.default_rng(7)
    model.init_params(1)
    model.params += rng.normal(0, 0.05, model.num_params).astype(np.float32)  # nonzero biases
    x = rng.normal(0.5, 0.3, (4, math.prod(input_shape))).astype(np.float32)
    loss, correct = model.forward_backward(x, np.zeros(4, np.int64))
    assert correct == 0
    p64 = model.params.astype(np.float64)
    expected = reference_objective(input_shape, layers, p64, x.astype(np.float64), sparsity)
    assert loss == pytest.approx(expected, rel=2e-5)
    terms = model.last_terms
    assert terms["reconstruction"] > 0 and terms["sparsity"] > 0
    assert terms["loss"] == pytest.approx(terms["reconstruction"] + terms["sparsity"])
    # central differences of the float64 reference on a sample of coordinates of every layer
    grads = model.grads.copy()
    idx = np.unique(np.concatenate([rng.choice(model.num_params, 60, replace=False),
                                    [0, model.num_params - 1]]))
    h = 1e-5
    fd = np.empty(len(idx))
    for t, i in enumerate(idx):
        pp, pm = p64.copy(), p64.copy()
        pp[i] += h
        pm[i] -= h
        fd[t] = (reference_objective(input_shape, layers, pp, x, sparsity)
                 - reference_objective(input_shape, layers, pm, x, sparsity)) / (2 * h)
    scale = np.abs(fd).max()
    assert scale > 0
    np.testing.assert_allclose(grads[idx], fd, rtol=0, atol=2e-4 * scale)
    # the gradient of the whole vector is not mostly zero (every layer gets one)
    for layer, off in zip(model.layers, model.offsets):
        if layer.num_params:
            assert np.abs(grads[off:off + layer.num_params]).max() > 0


def test_gradient_of_earlier_stage_includes_later_stage_terms():
    """Joint training (Le et al.): stage 2's reconstruction moves stage 1's weights. With
    sparsity 0 and stage 1 alone it would give a different gradient."""
    input_shape, layers = STACKS["two-stages"]
    model = Model.from_spec(input_shape, layers, 10, "autoencoder", sparsity=0.0)
    model.init_params(3)
    x = np.random.default_rng(0).random((3, 81)).astype(np.float32)
    model.forward_backward(x)
    full = model.grads[:model.layers[1].num_params].copy()
    first = Model.from_spec(input_shape, layers[:3], 10, "autoencoder", sparsity=0.0)
    first.params[:] = model.params[:first.num_params]
    first.forward_backward(x)
    alone = first.grads[:first.layers[1].num_params]
    assert not np.allclose(full, alone, rtol=1e-3, atol=1e-6)


def test_descent_lowers_the_objective():
    input_shape, layers = STACKS["two-stages"]
    model = Model.from_spec(input_shape, layers, 10, "autoencoder", sparsity=0.1)
    model.init_params(0)
    x = np.random.default_rng(1).random((16, 81)).astype(np.float32)
    first, _ = model.forward_backward(x)
    for _ in range(30):
        model.forward_backward(x)
        model.params -= 0.05 * model.grads
    last = model.objective(x)["loss"]
    assert last < 0.7 * first


def _cfg(**model):
    raw = {"model": {"loss": "autoencoder",
                     "layers": [{"type": "local", "filters": 4, "kernel": 5},
                                {"type": "l2pool", "size": 2}], **model},
           "topology": {"shards": 1, "replicas": 1}}
    return raw


def test_config_accepts_an_autoencoder():
    cfg = config_mod.from_dict(_cfg(sparsity=0.5))
    assert cfg.model.loss == "autoencoder" and cfg.model.sparsity == 0.5
    model = Model.from_config(cfg.model, (12, 12), 10)
    assert isinstance(model, Autoencoder) and model.sparsity == 0.5
    assert model.num_params == 8 * 8 * 4 * 26 and model.num_features == 4 * 4 * 4


@pytest.mark.parametrize("change,field", [
    ({"sparsity": -1.0}, "model.sparsity"),
    ({"layers": [{"type": "l2pool", "size": 2}]}, "model.layers"),
    ({"layers": [{"type": "local", "filters": 2, "kernel": 3, "activation": "relu"}]},
     "model.layers[0].activation"),
    ({"layers": [{"type": "local", "filters": 2, "kernel": 3}, {"type": "dense", "units": 4}]},
     "model.layers[1]"),
])
def test_config_rejects_bad_autoencoders(change, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        config_mod.from_dict(_cfg(**change))


@pytest.mark.parametrize("section,key,value", [
    ("topology", "partitions", 2), ("downpour", "target_accuracy", 0.5),
])
def test_config_rejects_autoencoder_options_it_lacks(section, key, value):
    raw = _cfg()
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        config_mod.from_dict(raw)
