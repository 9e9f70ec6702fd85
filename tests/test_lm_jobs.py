"""Whole neural-LM jobs under mpiexec: dense and sparse embedding traffic, and neighbours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import kill_after_checkpoints, run_job, write_config

import cython_kernels.reference as ref
from data_tools.text import build_text
from dbmpi.__main__ import main as dbmpi_main
from dbmpi.checkpoint import load_params
from dbmpi.data import open_dataset
from dbmpi.lm import load_lm, nearest
from dbmpi.model import Model

pytestmark = pytest.mark.job  # every test here starts an MPI job

LAYERS = [{"type": "embedding", "dim": 6}, {"type": "dense", "units": 16, "activation": "tanh"}]
BATCH, STEPS, LR, EPS, SEED = 16, 60, 0.1, 1e-8, 2


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A tiny corpus from a toy grammar: 400 sentences, vocabulary 30, context 3."""
    rng = np.random.default_rng(0)
    nouns = ["king", "queen", "man", "woman", "son", "daughter", "lord", "servant"]
    verbs = ["saw", "loved", "served", "called", "blessed", "followed"]
    places = ["city", "house", "land", "temple", "field"]
    lines = []
    for _ in range(460):
        s = f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}"
        if rng.random() < 0.5:
            s += f" in the {rng.choice(places)}"
        lines.append(s + rng.choice([" .", " ;", " ."]))
    src = tmp_path_factory.mktemp("text")
    (src / "train.txt").write_text("\n".join(lines[:400]) + "\n")
    (src / "valid.txt").write_text("\n".join(lines[400:430]) + "\n")
    (src / "test.txt").write_text("\n".join(lines[430:]) + "\n")
    out = src / "shards"
    build_text(src, out, vocab=30, context=3, shards=2)
    return out


def _config(tmp_path, data, name, replicas=1, sparse=True, layers=LAYERS, loss="softmax",
            checkpoint=None, **downpour):
    return write_config(tmp_path / f"{name}.toml", {
        "topology": {"shards": 2, "replicas": replicas},
        "model": {"layers": layers, "loss": loss},
        "data": {"path": data, "batch_size": BATCH, "eval_split": "valid"},
        "optimizer": {"name": "adagrad", "learning_rate": LR, "eps": EPS},
        "downpour": {"steps": STEPS, "eval_every_s": 60.0, "read_own_pushes": True,
                     "sparse": sparse, "log_every": 10, **downpour},
        "checkpoint": {"every_s": 0, **(checkpoint or {})},
        "run": {"dir": tmp_path / name, "seed": SEED}})


def _serial_adagrad(data, layers=LAYERS, loss="softmax"):
    """One process: the same model, minibatches and Adagrad (numpy twin) over the flat vector
    (and the same random draws: dropout masks, corrupt words, seeded as replica 0's)."""
    ds = open_dataset(data)
    model = Model.from_spec(ds.feature_shape, layers, ds.num_classes, loss)
    model.seed_training([SEED, 0])
    p = model.init_params(SEED).copy()
    accum = np.zeros_like(p)
    reader = ds.reader("train", replica=0, num_replicas=1, batch_size=BATCH,
                       shuffle_buffer=8192, seed=SEED * 1000)
    for _ in range(STEPS):
        x, y = reader.next_batch()
        model.params[:] = p
        model.forward_backward(x, y)
        ref.adagrad_dense(p, model.grads, accum, LR, EPS)
    return p


def test_one_replica_sparse_and_dense_equal_serial_adagrad(tmp_path, text_data):
    """One replica with read_own_pushes is serial Adagrad: pushing only the touched rows (the
    shards update only those) ends where dense pushes and a one-process numpy Adagrad end.
    RMA calls only for the sparse job (indexed-datatype Gets, as between nodes)."""
    expected = _serial_adagrad(text_data)
    ds = open_dataset(text_data)
    init = Model.from_spec(ds.feature_shape, LAYERS, ds.num_classes).init_params(SEED)
    for sparse, shared in ((True, "0"), (False, "1")):
        name = f"run-{'sparse' if sparse else 'dense'}"
        proc = run_job(4, ["train", str(_config(tmp_path, text_data, name, sparse=sparse))],
                       env={"DBMPI_RMA_SHARED": shared})
        assert proc.returncode == 0, proc.stderr[-3000:]
        params, _ = load_params(tmp_path / name / "params.h5")
        np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)
        assert not np.allclose(params, init, atol=1e-3)
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        train = [r for r in recs if r["kind"] == "train"]
        assert train and all("fetch_bytes" in r and "push_bytes" in r for r in train)
        if sparse:
            n = init.size
            table = ds.num_classes * 6
            # a step moves the dense rest plus at most batch x context rows
            assert all(4 * (n - table) < r["push_bytes"] < 4 * n for r in train)
            assert all(0 < r["rows"] <= min(BATCH * 3, ds.num_classes) for r in train)
        else:
            assert all(r["fetch_bytes"] == r["push_bytes"] == 4 * init.size for r in train)


def test_sparse_run_killed_then_resumed_equals_serial_adagrad(tmp_path, text_data):
    """The replica is killed after the first checkpoint; the same command resumes from the
    newest checkpoint (parameters, row-aligned shard blocks, Adagrad state, data position)
    and ends exactly where serial Adagrad ends."""
    from dbmpi import checkpoint as ckpt_mod

    expected = _serial_adagrad(text_data)
    # the replica sleeps to make each step 400x longer (numerically irrelevant): the run is
    # still going when its first checkpoint appears
    cfg = _config(tmp_path, text_data, "resume", straggler_replica=0, straggler_factor=400.0,
                  checkpoint={"every_steps": 10})
    run = tmp_path / "resume"
    assert kill_after_checkpoints(4, cfg, run, rank=3).returncode != 0
    latest = ckpt_mod.find_latest(run)
    assert 0 < latest.steps < STEPS and not latest.final
    again = run_job(4, ["train", str(cfg), "--set", "downpour.straggler_factor=1.0"])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"]["steps"] == latest.steps and summary["steps"] == STEPS
    params, _ = load_params(run / "params.h5")
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)


def test_one_replica_ranking_with_dropout_equals_serial_adagrad(tmp_path, text_data, capsys):
    """Collobert & Weston's objective with dropout, sparse traffic: the replica fetches the
    rows of the corrupt and target words too (RankingLM.rows_read), or it would train on stale
    rows and end elsewhere than the serial run."""
    layers = [{"type": "embedding", "dim": 6, "dropout": 0.2},
              {"type": "dense", "units": 16, "activation": "tanh", "dropout": 0.3}]
    expected = _serial_adagrad(text_data, layers, "ranking")
    proc = run_job(4, ["train", str(_config(tmp_path, text_data, "rank", layers=layers,
                                            loss="ranking"))], env={"DBMPI_RMA_SHARED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, _ = load_params(tmp_path / "rank" / "params.h5")
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)
    summary = json.loads((tmp_path / "rank" / "summary.json").read_text())
    assert 0.5 < summary["final_test_accuracy"] <= 1  # ranking accuracy: better than chance
    # `eval` (class probabilities) refuses a ranking run with one line; `neighbors` works
    assert dbmpi_main(["eval", str(tmp_path / "rank")]) == 2
    err = capsys.readouterr().err.strip()
    assert "ranking-objective run" in err and len(err.splitlines()) == 1
    assert dbmpi_main(["neighbors", str(tmp_path / "rank"), "--word", "king", "-k", "2"]) == 0


def test_two_replicas_sparse_train_and_neighbors(tmp_path, text_data, capsys):
    cfg = _config(tmp_path, text_data, "run2", replicas=2, read_own_pushes=False,
                  warm_start_steps=10, steps=150)
    proc = run_job(5, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["steps"] == 300
    assert np.exp(summary["final_test_loss"]) < 30 / 2  # learned something: ppl far below V
    model, _ds, vocab = load_lm(tmp_path / "run2")
    assert dbmpi_main(["neighbors", str(tmp_path / "run2"), "--word", "king", "--word", "saw",
                       "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("king: ") and out[1].startswith("saw: ")
    # against a direct cosine computation
    E = model.layers[0].E.astype(np.float64)
    i = vocab["words"].index("king")
    cos = E @ E[i] / (np.linalg.norm(E, axis=1) * np.linalg.norm(E[i]))
    cos[i] = -np.inf
    want = [vocab["words"][j] for j in np.argsort(-cos)[:3]]
    assert out[0] == "king: " + ", ".join(
        f"{w} ({s:.2f})" for w, (_, s) in zip(want, nearest(model.layers[0].E, i, 3)))
    assert dbmpi_main(["neighbors", str(tmp_path / "run2"), "--word", "zebra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dbmpi: error: --word 'zebra': not in the run's vocabulary")
    assert len(err.splitlines()) == 1
