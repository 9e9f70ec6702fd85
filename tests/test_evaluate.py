"""``python -m dbmpi eval``: utterance decisions from frame posteriors, and a whole run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_job
from test_speech import write_corpus

from data_tools.__main__ import main as data_tools_main
from dbmpi import checkpoint as ckpt_mod
from dbmpi import config as config_mod
from dbmpi.__main__ import main as dbmpi_main
from dbmpi.checkpoint import save_params
from dbmpi.data import open_dataset
from dbmpi.evaluate import (
    evaluate_run,
    log_softmax,
    utterance_scores,
    utterance_truth,
    word_classes,
)
from dbmpi.model import Model
from dbmpi.optim.rules import Adagrad

NAMES = ["sil", "a/0", "a/1", "b/0", "b/1"]


def test_word_classes_from_names():
    assert word_classes(NAMES, 5) == (["a", "b"], [[1, 2], [3, 4]], [0])
    # plain class names (no WORD/STATE): every class is a word, none is silence
    assert word_classes(None, 3) == (["0", "1", "2"], [[0], [1], [2]], [])


def test_utterance_scores_sum_word_log_posteriors():
    _, members, sil = word_classes(NAMES, 5)
    p = np.array([
        # utterance 0: two frames lean to a, one strongly to b
        [0.0, 0.3, 0.3, 0.2, 0.2],
        [0.0, 0.2, 0.4, 0.2, 0.2],
        [0.0, 0.05, 0.05, 0.5, 0.4],
        # utterance 1: a silence frame that favours b, then two b frames
        [0.8, 0.0, 0.01, 0.1, 0.09],
        [0.1, 0.2, 0.1, 0.3, 0.3],
        [0.1, 0.1, 0.1, 0.4, 0.3],
    ])
    p = np.maximum(p, 1e-12)  # no log(0)
    g = np.array([0, 0, 0, 7, 7, 7])
    ids, scores = utterance_scores(np.log(p), g, members, sil, "all")
    np.testing.assert_array_equal(ids, [0, 7])
    want0 = [np.log(0.6) + np.log(0.6) + np.log(0.1), np.log(0.4) * 2 + np.log(0.9)]
    np.testing.assert_allclose(scores[0], want0)
    # sum of logs, not of probabilities: b wins utterance 0 (0.4 * 0.4 * 0.9 > 0.6 * 0.6 * 0.1)
    assert scores.argmax(axis=1).tolist() == [1, 1]
    # --frames speech drops frame 3 (its argmax is silence) from utterance 1
    _, sp = utterance_scores(np.log(p), g, members, sil, "speech")
    np.testing.assert_allclose(sp[1], [np.log(0.3) + np.log(0.2), np.log(0.6) + np.log(0.7)])
    np.testing.assert_allclose(sp[0], scores[0])
    # labels -> the word of each utterance (silence frames ignored)
    y = np.array([0, 1, 2, 0, 3, 4])
    np.testing.assert_array_equal(utterance_truth(y, g, members), [0, 1])


def _train_tiny(data: Path, steps: int = 300) -> tuple[np.ndarray, dict]:
    ds = open_dataset(data)
    x, y = ds.load("train")
    layers = [{"type": "dense", "units": 32, "activation": "relu"}]
    model = Model.from_spec(ds.feature_shape, layers, ds.num_classes)
    model.init_params(0)
    opt = Adagrad(0.05)
    state = opt.init_state(model.num_params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        model.forward_backward(x[idx], y[idx])
        opt.step(model.params, model.grads, state)
    return model.params.copy(), {"layers": layers, "loss": "softmax"}


@pytest.fixture(scope="module")
def speech_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaldata")
    src = write_corpus(root / "wav", speakers=2, indices=6)
    assert data_tools_main(["shard", "speech", "--src", str(src), "--out", str(root / "d"),
                            "--shards", "2", "--test-index", "0-1"]) == 0
    return root / "d"


def test_eval_command_writes_frame_and_utterance_accuracy(speech_shards, tmp_path, capsys):
    params, model = _train_tiny(speech_shards)
    run = tmp_path / "run"
    run.mkdir()
    save_params(run / "params.h5", params, model, step=300)
    (run / "config.toml").write_text(f'[data]\npath = "{speech_shards}"\n')
    assert dbmpi_main(["eval", str(run)]) == 0
    assert "utterance accuracy" in capsys.readouterr().out
    r = json.loads((run / "eval.json").read_text())
    assert r["frames"] == open_dataset(speech_shards).num_examples("test")
    assert r["utterances"] == 12 and r["words"] == ["one", "two", "zero"]
    assert r["utterance_accuracy"] == 1.0  # three tones are easy to tell apart
    assert r["frame_accuracy"] > 0.6
    assert np.trace(np.array(r["confusion"])) == 12
    # frame accuracy agrees with the model's own evaluation
    ds = open_dataset(speech_shards)
    m = Model.from_spec(ds.feature_shape, model["layers"], ds.num_classes)
    m.params[:] = params
    x, y = ds.load("test")
    assert r["frame_accuracy"] == pytest.approx(m.evaluate(x, y)[1])
    assert np.allclose(np.exp(log_softmax(m.forward(x[:5]))).sum(axis=1), 1.0)
    # errors name the file and the fix
    assert dbmpi_main(["eval", str(tmp_path / "nowhere")]) != 0
    assert "config.toml" in capsys.readouterr().err
    assert evaluate_run(run, frames="speech", write=False)["utterance_accuracy"] == 1.0


def test_speech_configs_are_valid():
    for name in ("speech_sgd", "speech_downpour", "speech_downpour_adagrad"):
        cfg = config_mod.load(ROOT / "jobs" / "configs" / f"{name}.toml")
        assert cfg.data.path == "data/fsdd"
        assert [layer["units"] for layer in cfg.model.layers] == [512, 512, 512]
    assert config_mod.load(ROOT / "jobs/configs/speech_sgd.toml").topology.replicas == 1


@pytest.mark.job
def test_speech_job_then_eval(speech_shards, tmp_path):
    """A short Downpour job on the speech shards with the shipped config, then `eval`."""
    run = tmp_path / "job"
    r = run_job(3, ["train", "jobs/configs/speech_sgd.toml", "--set", f"data.path={speech_shards}",
                    "--set", "downpour.epochs=0", "--set", "downpour.steps=60",
                    "--set", "downpour.eval_every_s=1.0", "--set", f"run.dir={run}",
                    "--set", "optimizer.learning_rate=0.02"])  # pure tones: a gentler rate
    assert r.returncode == 0, r.stderr[-3000:]
    assert dbmpi_main(["eval", str(run)]) == 0
    e = json.loads((run / "eval.json").read_text())
    assert e["utterances"] == 12 and 0 <= e["utterance_accuracy"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert e["frame_accuracy"] == pytest.approx(summary["final_test_accuracy"], abs=1e-6)


@pytest.mark.job
def test_downpour_record_iterates_then_eval_iterates(speech_shards, tmp_path):
    """downpour.record_iterates: the coordinator records instead of evaluating; `eval
    --iterates` scores the rows afterwards, each timed by when it was fetched."""
    run = tmp_path / "dp"
    r = run_job(4, ["train", "jobs/configs/speech_downpour.toml",
                    "--set", f"data.path={speech_shards}", "--set", "topology.shards=1",
                    "--set", "topology.replicas=2", "--set", "downpour.epochs=0",
                    "--set", "downpour.steps=400", "--set", "downpour.eval_every_s=0.3",
                    "--set", 'model.layers=[{type = "dense", units = 64}]',
                    "--set", "downpour.record_iterates=true", "--set", f"run.dir={run}"])
    assert r.returncode == 0, r.stderr[-3000:]
    # only the final evaluation ran during the run
    evals = [json.loads(line) for line in (run / "metrics.jsonl").open()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 1
    with h5py.File(run / "iterates.h5", "r") as f:
        assert f.attrs["schema"] == "dbmpi.iterates" and f.attrs["schema_version"] == 1
        rows, params = f["iterates"].shape[0], f["iterates"][-1]
        steps = f["step"][:]
    assert rows >= 2 and np.all(np.diff(steps) >= 0) and steps[-1] == 2 * 400
    # the last row is the final parameters
    final, _ = ckpt_mod.load_params(run / "params.h5")
    np.testing.assert_array_equal(params, final)
    assert dbmpi_main(["eval", str(run), "--iterates"]) == 0
    recs = [json.loads(line) for line in (run / "eval_iterates.jsonl").open()]
    assert len(recs) == rows and [x["step"] for x in recs] == steps.astype(int).tolist()
    assert recs == sorted(recs, key=lambda x: x["wall_s"])
    assert recs[-1]["accuracy"] == pytest.approx(evals[0]["accuracy"], abs=1e-6)
    assert recs[0]["accuracy"] < recs[-1]["accuracy"]  # it learned, and the curve shows it


@pytest.mark.job
def test_sandblaster_speech_job_then_eval_iterates(speech_shards, tmp_path, capsys):
    """The shipped Sandblaster config, shrunk: its recorded iterates become a curve."""
    run = tmp_path / "sb"
    r = run_job(3, ["train", "jobs/configs/speech_sandblaster.toml",
                    "--set", f"data.path={speech_shards}", "--set", "topology.shards=1",
                    "--set", "topology.replicas=1", "--set", "sandblaster.iterations=3",
                    "--set", "sandblaster.batch_size=512",
                    "--set", 'model.layers=[{type = "dense", units = 16}]',
                    "--set", f"run.dir={run}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert dbmpi_main(["eval", str(run), "--iterates"]) == 0
    recs = [json.loads(line) for line in (run / "eval_iterates.jsonl").open()]
    assert [x["iteration"] for x in recs] == list(range(len(recs))) and len(recs) >= 2
    assert all(0 <= x["accuracy"] <= 1 and x["wall_s"] > 0 for x in recs)
    assert recs == sorted(recs, key=lambda x: x["wall_s"])
    # the last iterate is the final parameters: the same frame accuracy as eval.json
    e = json.loads((run / "eval.json").read_text())
    assert recs[-1]["accuracy"] == pytest.approx(e["frame_accuracy"], abs=1e-6)
    out = tmp_path / "f.png"
    assert dbmpi_main(["plot", str(run), "--out", str(out)]) == 0
    assert "Sandblaster L-BFGS [1]" in capsys.readouterr().out
