"""The autoencoder end to end: Downpour trains it (one replica = serial Adagrad exactly), the
optimal-stimulus routine raises its neuron's activation, and the probe / neurons commands run on
a finished run. Data made by the tests (conftest's synthetic images)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import error_lines, run_command, run_job, write_config
from PIL import Image

from dbmpi.checkpoint import load_params
from dbmpi.data import open_dataset
from dbmpi.model import Model
from dbmpi.neurons import optimal_stimulus
from dbmpi.probe import softmax_regression

LAYERS = [{"type": "lcn", "size": 3},
          {"type": "local", "filters": 4, "kernel": 7, "stride": 3},
          {"type": "l2pool", "size": 2, "stride": 1},
          {"type": "lcn", "size": 3}]
BATCH, STEPS, LR, EPS, SEED, SPARSITY = 16, 40, 0.02, 1e-8, 5, 0.2


def _config(tmp_path, data, replicas=1, **downpour):
    return write_config(tmp_path / "ae.toml", {
        "topology": {"shards": 1, "replicas": replicas},
        "model": {"loss": "autoencoder", "sparsity": SPARSITY, "layers": LAYERS},
        "data": {"path": data, "batch_size": BATCH},
        "optimizer": {"name": "adagrad", "learning_rate": LR, "eps": EPS},
        "downpour": {"steps": STEPS, "eval_every_s": 60.0, "read_own_pushes": True,
                     **downpour},
        "run": {"dir": tmp_path / "run", "seed": SEED, "learning_curve": True}})


def _serial_adagrad(data) -> np.ndarray:
    ds = open_dataset(data)
    model = Model.from_spec(ds.feature_shape, LAYERS, ds.num_classes, "autoencoder",
                            sparsity=SPARSITY)
    p = model.init_params(SEED).copy()
    reader = ds.reader("train", replica=0, num_replicas=1, batch_size=BATCH,
                       shuffle_buffer=8192, seed=SEED * 1000)
    accum = np.zeros_like(p)
    for _ in range(STEPS):
        x, _y = reader.next_batch()
        model.params[:] = p
        model.forward_backward(x)
        g = model.grads
        accum += g * g
        p -= LR * g / (np.sqrt(accum) + EPS)
    return p


@pytest.mark.job
def test_downpour_one_replica_equals_serial_adagrad_and_lowers_reconstruction(tmp_path,
                                                                              small_data):
    proc = run_job(3, ["train", str(_config(tmp_path, small_data))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    params, model_cfg = load_params(run / "params.h5")
    assert model_cfg["loss"] == "autoencoder" and model_cfg["sparsity"] == SPARSITY
    np.testing.assert_allclose(params, _serial_adagrad(small_data), rtol=1e-4, atol=2e-5)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[-1]["reconstruction"] < 0.9 * evals[0]["reconstruction"]
    assert all(r["loss"] == pytest.approx(r["reconstruction"] + r["sparsity"]) for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_test_reconstruction"] == pytest.approx(evals[-1]["reconstruction"])
    assert "test reconstruction" in proc.stderr or summary["steps"] == STEPS


@pytest.mark.job
def test_autoencoder_with_partitions_is_one_line_error(tmp_path, small_data):
    cfg = _config(tmp_path, small_data)
    proc = run_job(3, ["train", str(cfg), "--set", "topology.partitions=2"])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "topology.partitions" in lines[0]


def test_optimal_stimulus_increases_its_neurons_activation():
    model = Model.from_spec((12, 12), [
        {"type": "lcn", "size": 3}, {"type": "local", "filters": 3, "kernel": 5, "stride": 1},
        {"type": "l2pool", "size": 2, "stride": 2}, {"type": "lcn", "size": 3}],
        10, "autoencoder")
    model.init_params(0)
    rng = np.random.default_rng(0)
    radius = 5.0
    for unit in (0, 31, model.num_features - 1):
        x, hist = optimal_stimulus(model, unit, radius, steps=60, step=0.1, seed=unit)
        assert np.linalg.norm(x) <= radius * (1 + 1e-5)
        assert hist[-1] > hist[0] + 0.1
        # better than any of 200 random inputs of the same norm
        r = rng.normal(size=(200, 144)).astype(np.float32)
        r *= radius / np.linalg.norm(r, axis=1, keepdims=True)
        assert hist[-1] > model.encode(r)[:, unit].max()
        assert model.encode(x[None])[0, unit] == pytest.approx(hist[-1], rel=1e-5)


def test_input_gradient_matches_finite_differences():
    model = Model.from_spec((13, 13), LAYERS[1:3], 10, "autoencoder")
    model.init_params(1)
    x = np.random.default_rng(1).random((1, 169)).astype(np.float32)
    unit = 5
    _, g = model.activation_and_input_grad(x, unit)
    d = np.random.default_rng(2).normal(size=(1, 169)).astype(np.float32)
    h = 1e-2
    fd = (model.encode(x + h * d)[0, unit] - model.encode(x - h * d)[0, unit]) / (2 * h)
    assert float((g * d).sum()) == pytest.approx(float(fd), rel=2e-3)


def test_softmax_regression_separates_separable_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 4, (3, 5))
    y = rng.integers(0, 3, 300)
    X = centers[y] + rng.normal(0, 0.5, (300, 5))
    W, b = softmax_regression(X, y, 3, l2=1e-4)
    assert np.mean((X @ W + b).argmax(1) == y) > 0.98


@pytest.mark.job
def test_probe_and_neurons_commands_on_a_finished_run(tmp_path, small_data):
    proc = run_job(3, ["train", str(_config(tmp_path, small_data, steps=20))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    p = run_command([sys.executable, "-m", "dbmpi", "probe", str(run), "--train-limit", "600",
                     "--finetune-epochs", "1", "--scratch"])
    assert p.returncode == 0, p.stderr
    out = json.loads((run / "probe.json").read_text())
    assert out["train_examples"] == 600 and out["test_examples"] == 400
    for k in ("random", "learned"):
        assert 0.1 < out["probe"][k]["test_accuracy"] <= 1.0
    assert len(out["finetune"]["history"]) == 1 and "scratch" in out
    docs = tmp_path / "docs"
    p = run_command([sys.executable, "-m", "dbmpi", "neurons", str(run), "--count", "3",
                     "--top", "4", "--steps", "30", "--docs", str(docs), "--name", "t"])
    assert p.returncode == 0, p.stderr
    info = json.loads((run / "neurons.json").read_text())
    assert len(info["neurons"]) == 3
    assert all(n["activation"] > n["activation_start"] for n in info["neurons"])
    with Image.open(docs / "neurons_t.png") as im:
        assert im.width > im.height > 0  # 3 rows of 1 + 4 pictures
    with Image.open(docs / "neurons_t_optimal.png") as im:
        assert im.width > 0
    # no run directory, and `eval` (a classifier's score) on an autoencoder run: one line
    p = run_command([sys.executable, "-m", "dbmpi", "neurons", str(tmp_path / "nope")])
    assert p.returncode == 2 and "config.toml" in p.stderr
    p = run_command([sys.executable, "-m", "dbmpi", "eval", str(run)])
    assert p.returncode == 2 and "autoencoder run" in p.stderr and "probe" in p.stderr
    assert (run / "learning_curve.png").stat().st_size > 1000
