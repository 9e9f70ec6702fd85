"""The model over a flat parameter vector, against an independent numpy MLP and finite
differences."""

import numpy as np
import pytest

from dbmpi.model import Model


def _numpy_mlp_loss(params, sizes, acts, x, y, loss="softmax"):
    off, h = 0, x.reshape(len(x), -1).astype(np.float64)
    for (n_in, n_out), act in zip(sizes, acts):
        W = params[off:off + n_in * n_out].reshape(n_in, n_out)
        off += n_in * n_out
        b = params[off:off + n_out]
        off += n_out
        h = h @ W + b
        h = {"relu": lambda z: np.maximum(z, 0), "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
             "tanh": np.tanh, "linear": lambda z: z}[act](h)
    if loss == "softmax":
        z = h - h.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
    margins = np.maximum(0, 1 + h - h[np.arange(len(y)), y][:, None])
    margins[np.arange(len(y)), y] = 0
    return float(margins.sum(1).mean())


@pytest.mark.parametrize("loss", ["softmax", "hinge"])
@pytest.mark.parametrize("acts", [("relu", "tanh"), ("sigmoid", "sigmoid")])
def test_forward_backward_matches_numpy_and_finite_differences(loss, acts):
    rng = np.random.default_rng(1)
    spec = [{"type": "dense", "units": 7, "activation": acts[0]},
            {"type": "dense", "units": 5, "activation": acts[1]}]
    m = Model.from_spec((3, 4), spec, num_classes=3, loss=loss)
    sizes = [(12, 7), (7, 5), (5, 3)]
    assert m.num_params == sum(a * b + b for a, b in sizes)
    m.init_params(5)
    m.params += rng.normal(0, 0.1, m.num_params).astype(np.float32)  # non-zero biases
    x = rng.normal(size=(11, 3, 4)).astype(np.float32)
    y = rng.integers(0, 3, 11)
    got_loss, correct = m.forward_backward(x, y)
    p64 = m.params.astype(np.float64)
    all_acts = list(acts) + ["linear"]
    ref = _numpy_mlp_loss(p64, sizes, all_acts, x, y, loss)
    assert got_loss == pytest.approx(ref, rel=1e-5)
    # central differences in float64 on a sample of coordinates
    eps = 1e-6
    for i in rng.choice(m.num_params, 40, replace=False):
        e = np.zeros_like(p64)
        e[i] = eps
        fd = (_numpy_mlp_loss(p64 + e, sizes, all_acts, x, y, loss)
              - _numpy_mlp_loss(p64 - e, sizes, all_acts, x, y, loss)) / (2 * eps)
        assert m.grads[i] == pytest.approx(fd, rel=2e-3, abs=2e-5)
    logits = m.forward(x).copy()
    assert correct == int((logits.argmax(1) == y).sum())


def test_layers_are_views_of_the_flat_vectors():
    m = Model.from_spec((4,), [{"type": "dense", "units": 3}], 2)
    m.params[:] = np.arange(m.num_params)
    assert m.layers[0].W[0, 0] == 0 and m.layers[0].b[0] == 12
    assert m.layers[1].W[0, 0] == 15
    m.grads[:] = 0
    m.forward_backward(np.ones((2, 4), np.float32), np.array([0, 1]))
    assert np.shares_memory(m.layers[1].dW, m.grads)


def test_init_is_deterministic_and_scaled():
    m = Model.from_spec((100,), [{"type": "dense", "units": 50, "activation": "relu"}], 10)
    a = m.init_params(7).copy()
    b = m.init_params(7).copy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, m.init_params(8))
    W = a[:5000]
    assert abs(W.std() - np.sqrt(2 / 100)) < 0.02  # He scaling for ReLU
    assert (a[5000:5050] == 0).all()  # biases


def test_evaluate_matches_forward():
    rng = np.random.default_rng(0)
    m = Model.from_spec((6,), [{"type": "dense", "units": 4}], 3)
    m.init_params(0)
    x = rng.normal(size=(37, 6)).astype(np.float32)
    y = rng.integers(0, 3, 37)
    loss, acc = m.evaluate(x, y, batch=8)
    assert acc == pytest.approx((m.forward(x).argmax(1) == y).mean())
    ref = _numpy_mlp_loss(m.params.astype(np.float64), [(6, 4), (4, 3)], ["relu", "linear"], x, y)
    assert loss == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("spec,shape", [
    ([{"type": "dense", "units": 6, "activation": "relu"}], (9,)),
    ([{"type": "local", "filters": 2, "kernel": 3, "stride": 1},
      {"type": "l2pool", "size": 2}, {"type": "lcn", "size": 3}], (8, 8, 2)),
])
def test_set_grads_writes_the_whole_gradient_into_the_given_buffer(spec, shape):
    """Downpour points the backward pass at a push slot that still holds an old push: every
    element must be overwritten (a stale or NaN value left there would be pushed)."""
    rng = np.random.default_rng(3)
    m = Model.from_spec(shape, spec, num_classes=4)
    m.init_params(1)
    x = rng.normal(size=(5, *shape)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    m.forward_backward(x, y)
    expected = m.grads.copy()
    slot = np.full(m.num_params, np.nan, np.float32)
    m.set_grads(slot)
    m.forward_backward(x, y)
    assert m.grads is slot
    np.testing.assert_array_equal(slot, expected)
    with pytest.raises(ValueError, match="float32 of shape"):
        m.set_grads(np.zeros(m.num_params + 1, np.float32))


def test_forward_backward_accumulate_sums_batches():
    """accumulate=True adds a batch's gradient to model.grads: two batches summed in place
    equal the two gradients computed apart and added (Downpour's n_push > 1 path)."""
    rng = np.random.default_rng(4)
    m = Model.from_spec((6,), [{"type": "dense", "units": 5, "activation": "tanh"}], 3)
    m.init_params(2)
    assert m.can_accumulate
    xs = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2)]
    ys = [rng.integers(0, 3, 4) for _ in range(2)]
    parts = []
    for x, y in zip(xs, ys):
        m.forward_backward(x, y)
        parts.append(m.grads.copy())
    m.forward_backward(xs[0], ys[0])
    m.forward_backward(xs[1], ys[1], accumulate=True)
    np.testing.assert_allclose(m.grads, parts[0] + parts[1], rtol=1e-6, atol=1e-7)
    image = Model.from_spec((6, 6, 1), [{"type": "local", "filters": 2, "kernel": 3}], 3)
    assert not image.can_accumulate
    with pytest.raises(ValueError, match="cannot accumulate"):
        image.forward_backward(np.zeros((1, 6, 6, 1), np.float32), np.zeros(1, np.int64),
                               accumulate=True)
