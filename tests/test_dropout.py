"""Dropout on dense and embedding layers: the masks, the gradient through them, evaluation
without them, and each replica's own stream (no MPI)."""

import numpy as np
import pytest

from dbmpi.model import Model


def _lm(p_emb, p_hidden, V=11, ctx=3, d=4, hidden=8):
    model = Model.from_spec((ctx,), [
        {"type": "embedding", "dim": d, "dropout": p_emb},
        {"type": "dense", "units": hidden, "activation": "tanh", "dropout": p_hidden}], V)
    model.init_params(0)
    return model


def _numpy_logits(model, x, masks=None):
    """Independent float64 forward pass of the embedding -> tanh -> linear LM, with the given
    (scaled) masks on the embedding and hidden outputs."""
    emb, hid, out = model.layers
    h = emb.E.astype(np.float64)[x].reshape(len(x), -1)
    if masks is not None:
        h = h * masks[0]
    h = np.tanh(h @ hid.W + hid.b)
    if masks is not None:
        h = h * masks[1]
    return h @ out.W + out.b


def _draw(seed, shape, p):
    """The masks as documented: uniform float32 draws >= p, scaled by 1 / (1 - p)."""
    u = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return (u >= p) / (1 - p)


def test_training_forward_drops_units_with_the_seeded_masks():
    model = _lm(0.25, 0.5)
    x = np.random.default_rng(1).integers(0, 11, (64, 3))
    model.seed_training([7, 3])
    got = model.forward(x, train=True).astype(np.float64)
    masks = [_draw([7, 3, 0], (64, 12), 0.25), _draw([7, 3, 1], (64, 8), 0.5)]
    np.testing.assert_allclose(got, _numpy_logits(model, x, masks), rtol=1e-5, atol=1e-5)
    # evaluation (and train=False) uses every unit, unscaled
    np.testing.assert_allclose(model.forward(x).astype(np.float64), _numpy_logits(model, x),
                               rtol=1e-5, atol=1e-5)
    loss, _ = model.evaluate(x, np.zeros(64, np.int64))
    assert loss == pytest.approx(model.evaluate(x, np.zeros(64, np.int64))[0])


def test_drop_rate_and_expected_scale():
    model = Model.from_spec((50,), [{"units": 400, "activation": "linear", "dropout": 0.3}], 2)
    model.init_params(0)
    x = np.random.default_rng(0).standard_normal((500, 50)).astype(np.float32)
    model.seed_training(0)
    model.forward(x, train=True)
    mask = model.layers[0].dropout.mask
    assert np.mean(mask == 0) == pytest.approx(0.3, abs=0.01)
    assert np.unique(mask).tolist() == pytest.approx([0.0, 1 / 0.7])
    assert mask.mean() == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean


def test_gradient_through_masks_by_finite_differences():
    """With the masks fixed (the same seed before every pass), backward is the derivative of
    the training loss: central differences of an independent float64 forward pass."""
    model = _lm(0.3, 0.4)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 11, (16, 3)), rng.integers(0, 11, 16)
    model.seed_training(5)
    model.forward_backward(x, y)
    g = model.grads.copy()
    masks = [_draw([5, 0], (16, 12), 0.3), _draw([5, 1], (16, 8), 0.4)]
    base = model.params.astype(np.float64)

    def loss_at(i, v):
        model.params[:] = base
        model.params[i] = v
        z = _numpy_logits(model, x, masks)
        m = z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z - m).sum(1)) + m[:, 0] - z[np.arange(16), y]))

    emb_rows = np.unique(x)[:3] * 4
    hidden_w = model.offsets[1] + np.arange(0, 12 * 8, 13)[:5]
    out_w = model.offsets[2] + np.array([0, 9, 30, 77])
    for i in [*emb_rows, *(emb_rows + 2), *hidden_w, *out_w]:
        h = 1e-3
        fd = (loss_at(i, base[i] + h) - loss_at(i, base[i] - h)) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=2e-3, abs=1e-5), i
    # a dropped hidden unit passes no gradient to its incoming weights
    dropped = np.flatnonzero((masks[1] == 0).all(axis=0))
    hid = model.layers[1]
    for u in dropped:
        assert not hid.dW[:, u].any() and hid.db[u] == 0


def test_replicas_draw_different_masks_and_a_seed_repeats():
    a, b = _lm(0.5, 0.5), _lm(0.5, 0.5)
    x = np.random.default_rng(0).integers(0, 11, (32, 3))
    a.seed_training([0, 0])
    b.seed_training([0, 1])
    za, zb = a.forward(x, train=True).copy(), b.forward(x, train=True).copy()
    assert not np.allclose(za, zb)
    b.seed_training([0, 0])
    np.testing.assert_array_equal(za, b.forward(x, train=True))


def test_sparse_embedding_gradient_goes_through_the_mask():
    dense, sparse = _lm(0.5, 0.0), _lm(0.5, 0.0)
    sparse.layers[0].sparse = True
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 11, (20, 3)), rng.integers(0, 11, 20)
    for m in (dense, sparse):
        m.seed_training(9)
        m.forward_backward(x, y)
    rows, grad_rows = sparse.layers[0].take_rows()
    np.testing.assert_allclose(grad_rows, dense.layers[0].dE[rows], rtol=1e-6, atol=1e-7)
