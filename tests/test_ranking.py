"""Collobert & Weston's ranking objective (dbmpi.model.ranking) without MPI: corrupt words,
the gradient against an independent float64 implementation, the rows a step reads, the
evaluation, and learning a toy language."""

import numpy as np
import pytest

from dbmpi.model import Model
from dbmpi.model.ranking import EVAL_SEED, RankingLM

V, CTX, D, H = 17, 3, 5, 7
LAYERS = [{"type": "embedding", "dim": D}, {"type": "dense", "units": H, "activation": "tanh"}]


def _model(seed=0):
    m = Model.from_spec((CTX,), LAYERS, V, "ranking")
    m.init_params(seed)
    return m


def _numpy_scores(m, windows):
    emb, hid, out = m.layers
    h = emb.E.astype(np.float64)[windows].reshape(len(windows), -1)
    h = np.tanh(h @ hid.W + hid.b)
    return (h @ out.W + out.b)[:, 0]


def _numpy_loss(m, x, y, w):
    pos = _numpy_scores(m, np.column_stack([x, y]))
    neg = _numpy_scores(m, np.column_stack([x, w]))
    return float(np.maximum(1 - pos + neg, 0).mean())


def test_shapes_and_parameter_count():
    m = _model()
    assert isinstance(m, RankingLM) and m.num_classes == V
    assert m.layers[0].context == CTX + 1  # the window: context and candidate word
    assert m.num_params == V * D + ((CTX + 1) * D * H + H) + (H + 1)


def test_corrupt_words_are_uniform_over_the_other_words():
    rng = np.random.default_rng(0)
    y = np.full(170_000, 4)
    w = RankingLM.corrupt(y, V, rng)
    assert not np.any(w == y) and w.min() == 0 and w.max() == V - 1
    counts = np.bincount(w, minlength=V)
    others = np.delete(counts, 4)
    assert np.all(np.abs(others / len(y) - 1 / (V - 1)) < 0.003)


def test_gradient_against_float64_finite_differences():
    m = _model()
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, V, (12, CTX)), rng.integers(0, V, 12)
    m.seed_training(3)
    rows = m.rows_read(x, y)
    w = m._prepared[1]
    np.testing.assert_array_equal(rows, np.unique(np.concatenate([x.ravel(), y, w])))
    loss, right = m.forward_backward(x, y)
    assert loss == pytest.approx(_numpy_loss(m, x, y, w), rel=1e-5)
    pos = _numpy_scores(m, np.column_stack([x, y]))
    neg = _numpy_scores(m, np.column_stack([x, w]))
    assert right == np.count_nonzero(pos > neg)
    g = m.grads.copy()
    base = m.params.astype(np.float64)
    # every row with a gradient is one the step said it reads
    dE = g[:V * D].reshape(V, D)
    assert set(np.flatnonzero(np.abs(dE).sum(1))) <= set(rows.tolist())

    def loss_at(i, v):
        m.params[:] = base
        m.params[i] = v
        return _numpy_loss(m, x, y, w)

    idx = [*(w[:3] * D + 1), *(y[:3] * D + 2), m.offsets[1] + 5, m.offsets[1] + 60,
           m.offsets[2], m.num_params - 1]
    for i in idx:
        h = 1e-4
        fd = (loss_at(i, base[i] + h) - loss_at(i, base[i] - h)) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-3, abs=1e-6), i


def test_without_rows_read_a_step_draws_its_own_corruption():
    a, b = _model(), _model()
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, V, (8, CTX)), rng.integers(0, V, 8)
    a.seed_training(5)
    b.seed_training(5)
    a.rows_read(x, y)  # prepared draw ...
    la, _ = a.forward_backward(x, y)
    lb, _ = b.forward_backward(x, y)  # ... equals the draw made in the step
    assert la == lb and np.array_equal(a.grads, b.grads)
    # a prepared draw is used once, and only for the batch it was drawn for
    a.rows_read(x, y)
    y2 = y.copy()
    a.forward_backward(x, y2)
    assert a._prepared is None


def test_evaluate_is_fixed_draw_ranking_accuracy():
    m = _model()
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, V, (300, CTX)), rng.integers(0, V, 300)
    w = RankingLM.corrupt(y, V, np.random.default_rng(EVAL_SEED))
    pos = _numpy_scores(m, np.column_stack([x, y]))
    neg = _numpy_scores(m, np.column_stack([x, w]))
    loss, acc = m.evaluate(x, y, batch=64)
    assert acc == pytest.approx(np.mean(pos > neg))
    assert loss == pytest.approx(np.maximum(1 - pos + neg, 0).mean(), rel=1e-5)
    assert m.evaluate(x, y) == pytest.approx((loss, acc), rel=1e-6)  # the same draw again


def test_sgd_learns_a_deterministic_language():
    """Next word = (last context word + 1) mod V: ranking accuracy goes from chance to ~1."""
    m = _model()
    m.seed_training(0)
    rng = np.random.default_rng(5)
    x_test = rng.integers(0, V, (500, CTX))
    y_test = (x_test[:, -1] + 1) % V
    _, before = m.evaluate(x_test, y_test)
    for _ in range(600):
        x = rng.integers(0, V, (32, CTX))
        m.forward_backward(x, (x[:, -1] + 1) % V)
        m.params -= 1.0 * m.grads
    _, after = m.evaluate(x_test, y_test)
    assert before < 0.75 and after > 0.97


def test_config_errors(tmp_path):
    from dbmpi import config
    from dbmpi.errors import ConfigError

    for text, needle in [
        ('[model]\nloss = "ranking"\nlayers = [{units = 4}]\n', "embedding layer"),
        (('algorithm = "sandblaster"\n[model]\nloss = "ranking"\n'
          'layers = [{type = "embedding", dim = 4}]\n'), "downpour"),
    ]:
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=needle) as info:
            config.load(p)
        assert "model.loss" in str(info.value) and "\n" not in str(info.value)
