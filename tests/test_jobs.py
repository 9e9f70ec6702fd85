"""Whole Downpour jobs under mpiexec (each test starts its own job, watched by conftest.Job)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import error_lines, run_job, write_config

from dbmpi.checkpoint import load_params
from dbmpi.data import open_dataset
from dbmpi.model import Model
from dbmpi.ps import ParamLayout

pytestmark = pytest.mark.job  # every test here starts an MPI job

HIDDEN = 32
BATCH = 32
STEPS = 200
LR = 0.05
EPS = 1e-8
SEED = 3


def numpy_adagrad_reference(data_path, params0: np.ndarray, n: int = 1) -> np.ndarray:
    """Serial numpy MLP (784-32 ReLU-10 softmax) + Adagrad on the replica's minibatches; with
    ``n`` > 1 the gradients of n minibatches at the same parameters are summed per update
    (one replica with n_fetch = n_push = n)."""
    ds = open_dataset(data_path)
    reader = ds.reader("train", replica=0, num_replicas=1, batch_size=BATCH,
                       shuffle_buffer=8192, seed=SEED * 1000)
    n_in = 28 * 28
    p = params0.astype(np.float32).copy()
    accum = np.zeros_like(p)
    k1 = n_in * HIDDEN
    sizes = [k1, HIDDEN, HIDDEN * 10, 10]
    offs = np.cumsum([0] + sizes)
    total = np.zeros_like(p)
    for step in range(STEPS):
        x, y = reader.next_batch()
        x = x.reshape(BATCH, -1)
        W1 = p[offs[0]:offs[1]].reshape(n_in, HIDDEN)
        b1 = p[offs[1]:offs[2]]
        W2 = p[offs[2]:offs[3]].reshape(HIDDEN, 10)
        b2 = p[offs[3]:offs[4]]
        z1 = x @ W1 + b1
        h = np.maximum(z1, 0)
        logits = h @ W2 + b2
        e = np.exp(logits - logits.max(1, keepdims=True))
        prob = e / e.sum(1, keepdims=True)
        dlog = prob
        dlog[np.arange(BATCH), y] -= 1
        dlog /= BATCH
        gW2 = h.T @ dlog
        gb2 = dlog.sum(0)
        dh = dlog @ W2.T * (z1 > 0)
        gW1 = x.T @ dh
        gb1 = dh.sum(0)
        total += np.concatenate([gW1.ravel(), gb1, gW2.ravel(), gb2]).astype(np.float32)
        if (step + 1) % n:
            continue
        g, total = total, np.zeros_like(p)
        accum += g * g
        p -= LR * g / (np.sqrt(accum) + EPS)
    return p


def job_config(tmp_path, data, shards, replicas, hidden=HIDDEN, lr=LR, curve=False,
               **downpour):
    return write_config(tmp_path / "job.toml", {
        "topology": {"shards": shards, "replicas": replicas},
        "model": {"layers": [{"type": "dense", "units": hidden, "activation": "relu"}]},
        "data": {"path": data, "batch_size": BATCH},
        "optimizer": {"name": "adagrad", "learning_rate": lr, "eps": EPS},
        "downpour": {"n_fetch": 1, "n_push": 1, "steps": STEPS, "eval_every_s": 60.0,
                     "read_own_pushes": True, **downpour},
        "run": {"dir": tmp_path / "run", "seed": SEED, "learning_curve": curve}})


@pytest.mark.parametrize("shards,shared", [(1, "1"), (2, "1"), (3, "1"), (2, "0")],
                         ids=["1-shard", "2-shards", "3-shards", "2-shards-rma-only"])
def test_one_replica_equals_serial_numpy_adagrad(tmp_path, small_data, shards, shared):
    """... with bulk data through on-node shared memory, and through RMA calls only (as
    between nodes: DBMPI_RMA_SHARED=0)."""
    cfg = job_config(tmp_path, small_data, shards, 1)
    proc = run_job(2 + shards, ["train", str(cfg)], env={"DBMPI_RMA_SHARED": shared})
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, _ = load_params(tmp_path / "run" / "params.h5")
    model = Model.from_spec((28, 28), [{"type": "dense", "units": HIDDEN}], 10)
    # the shard edges fall inside the first weight matrix (784 x 32 = 25088 weights)
    edges = ParamLayout.even(model.num_params, shards).bounds[1:-1]
    assert all(0 < e < 28 * 28 * HIDDEN for e in edges)
    expected = numpy_adagrad_reference(small_data, model.init_params(SEED))
    assert not np.allclose(expected, model.init_params(SEED))  # training moved the weights
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert not (tmp_path / "run" / "learning_curve.png").exists()  # run.learning_curve = false


@pytest.mark.parametrize("n", [4])
def test_one_replica_with_n_fetch_push_equals_serial_accumulated_adagrad(tmp_path, small_data,
                                                                         n):
    """n_push > 1: the backward passes sum their gradients straight into the push slot; the
    result equals serial Adagrad on the sum of n minibatch gradients per update."""
    cfg = job_config(tmp_path, small_data, 2, 1, n_fetch=n, n_push=n)
    proc = run_job(4, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, _ = load_params(tmp_path / "run" / "params.h5")
    model = Model.from_spec((28, 28), [{"type": "dense", "units": HIDDEN}], 10)
    expected = numpy_adagrad_reference(small_data, model.init_params(SEED), n)
    np.testing.assert_allclose(params, expected, rtol=1e-4, atol=2e-5)
    # and it is not the n = 1 trajectory
    assert not np.allclose(params, numpy_adagrad_reference(small_data, model.init_params(SEED)),
                           rtol=1e-4, atol=2e-5)


def test_two_replicas_train_and_write_run_directory(tmp_path, small_data):
    # 1000 steps per replica: at 300 the asynchronous runs ended anywhere between 23% and 57%
    # test accuracy (how the replicas interleave early on matters at that length)
    steps = 1000
    cfg = job_config(tmp_path, small_data, 2, 2, steps=steps, warm_start_steps=50, log_every=25,
                  read_own_pushes=False, eval_every_s=0.5, curve=True)
    proc = run_job(5, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 * steps
    assert summary["final_test_accuracy"] > 0.3  # far above the 10% of chance
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert "[downpour]" in (run / "config.toml").read_text()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    pushes = [r for r in recs if r["kind"] == "push"]
    for rep in (0, 1):
        mine = [r["push"] for r in pushes if r["replica"] == rep]
        assert mine == list(range(1, steps + 1))  # every push acknowledged and logged once
    assert all(len(r["staleness"]) == 2 and min(r["staleness"]) >= 0 for r in pushes)
    train = [r for r in recs if r["kind"] == "train"]
    assert {r["replica"] for r in train} == {0, 1}
    assert all(r["samples_per_s"] > 0 for r in train)
    # warm start: replica 1 started only after replica 0 released it at step 50
    released = [r for r in recs if r["kind"] == "released"]
    started = {r["replica"]: r for r in recs if r["kind"] == "started"}
    assert [(r["replica"], r["step"]) for r in released] == [(0, 50)]
    assert started[1]["time"] >= released[0]["time"] and started[0]["time"] <= released[0]["time"]
    assert "final test accuracy" in proc.stdout and str(run) in proc.stdout


@pytest.mark.parametrize("rank,label", [(0, "coordinator"), (1, "shard 0"), (4, "replica 1")])
def test_exception_on_one_rank_ends_the_job(tmp_path, small_data, rank, label):
    cfg = job_config(tmp_path, small_data, 2, 2, steps=100000, read_own_pushes=False)
    proc = run_job(5, ["train", str(cfg)], env={"DBMPI_FAULT": f"{rank}:1.0"})
    assert proc.returncode != 0
    assert f"error on rank {rank} ({label}): InjectedFault" in proc.stderr


def test_wrong_rank_count_is_one_line_error(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2)
    proc = run_job(4, ["train", str(cfg)])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1
    assert "needs 5 MPI ranks" in lines[0] and "this job has 4" in lines[0]


@pytest.mark.parametrize("override,field", [
    ("optimizer.learning_rate=-0.1", "optimizer.learning_rate"),
    ("downpour.n_fetch=0", "downpour.n_fetch"),
    ("downpour.n_fech=2", "downpour.n_fech"),
    ("topology.shards='two'", "topology.shards"),
])
def test_bad_config_value_is_one_line_error(tmp_path, small_data, override, field):
    cfg = job_config(tmp_path, small_data, 2, 2)
    proc = run_job(5, ["train", str(cfg), "--set", override])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and field in lines[0], proc.stderr


def test_too_few_shards_for_replicas(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 1, 5)
    proc = run_job(7, ["train", str(cfg)])
    assert proc.returncode == 2
    assert "re-shard" in proc.stderr


def test_target_accuracy_stops_every_rank(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2, steps=1_000_000, target_accuracy=0.25,
                  eval_every_s=0.3, read_own_pushes=False)
    proc = run_job(5, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target_reached"] is True
    assert summary["best_test_accuracy"] >= 0.25
    assert summary["steps"] < 2 * 1_000_000


def test_epoch_budget(tmp_path, small_data):
    # 2 replicas x 1 epoch of their 1200 examples each at batch 32 = 38 steps each
    cfg = job_config(tmp_path, small_data, 1, 2, steps=0, epochs=1.0, read_own_pushes=False)
    proc = run_job(4, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 * 38
