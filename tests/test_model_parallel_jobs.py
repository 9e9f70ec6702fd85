"""Whole Downpour jobs with partitioned replicas (topology.partitions > 1) under mpiexec."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from conftest import run_job

from dbmpi.checkpoint import load_params
from dbmpi.model.partition import PartitionPlan
from dbmpi.ps import ParamLayout

pytestmark = pytest.mark.job  # every test here starts an MPI job

DENSE = '[{type = "dense", units = 48, activation = "relu"}, ' \
        '{type = "dense", units = 24, activation = "relu"}]'
LOCAL = '[{type = "local", filters = 4, kernel = 5, stride = 2, activation = "relu"}, ' \
        '{type = "l2pool", size = 2, stride = 1}, {type = "lcn", size = 3}, ' \
        '{type = "dense", units = 32, activation = "relu"}]'


def _config(tmp_path, data, name, layers, replicas, partitions, lr=0.05, seed=5, extra="",
            **downpour):
    dp = {"n_fetch": 1, "n_push": 1, "steps": 150, "eval_every_s": 60.0, "log_every": 25,
          **downpour}
    dp_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dp.items())
    text = f"""
[topology]
shards = 2
replicas = {replicas}
partitions = {partitions}
[model]
layers = {layers}
[data]
path = "{data}"
batch_size = 32
[optimizer]
name = "adagrad"
learning_rate = {lr}
[downpour]
{dp_lines}
[run]
dir = "{tmp_path / name}"
seed = {seed}
{extra}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _run(tmp_path, data, name, layers, replicas, partitions, **kw):
    cfg = _config(tmp_path, data, name, layers, replicas, partitions, **kw)
    proc = run_job(1 + 2 + replicas * partitions, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / name
    summary = json.loads((run / "summary.json").read_text())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return run, summary, recs


@pytest.mark.parametrize("layers", [DENSE, LOCAL], ids=["dense", "local"])
def test_one_replica_of_two_partitions_equals_one_rank(tmp_path, small_data, layers):
    """With one replica that reads its own pushes Downpour is serial Adagrad, so the final
    parameters of P = 2 and P = 1 agree up to float32 summation order."""
    got = {}
    for P in (1, 2):
        run, summary, recs = _run(tmp_path, small_data, f"p{P}", layers, 1, P,
                                  read_own_pushes=True, steps=60)
        assert summary["steps"] == 60
        got[P] = load_params(run / "params.h5")[0]
        train = [r for r in recs if r["kind"] == "train"]
        assert len(train) == 60 // 25  # one record per replica, not one per partition
        if P == 2:
            plan = PartitionPlan((28, 28), tomllib.loads(f"v = {layers}")["v"], 10, 2)
            assert all(r["partition_bytes"] == sum(plan.bytes_per_step(32)) for r in train)
            pushes = [r for r in recs if r["kind"] == "push"]
            layout = ParamLayout.even(plan.num_params, 2)
            for p in (0, 1):  # each partition pushes its own range, every push logged once,
                mine = [r for r in pushes if r["partition"] == p]
                assert [r["push"] for r in mine] == list(range(1, 61))
                # ... to the shards holding that range only
                n_shards = len(layout.segments(*plan.param_range(p)))
                assert all(len(r["staleness"]) == n_shards for r in mine)
    assert not np.allclose(got[1], got[2], atol=0)  # different summation order, but...
    np.testing.assert_allclose(got[2], got[1], rtol=1e-3, atol=1e-4)


def test_two_replicas_of_two_partitions_train_like_unpartitioned(tmp_path, small_data):
    """R = 2 replicas of P = 2 partitions reach about the accuracy of R = 2 of P = 1."""
    acc = {}
    for P in (1, 2):
        _, summary, recs = _run(tmp_path, small_data, f"r2p{P}", DENSE, 2, P, lr=0.01,
                                steps=200, warm_start_steps=30, eval_every_s=1.0)
        assert summary["steps"] == 400
        acc[P] = summary["final_test_accuracy"]
        train = [r for r in recs if r["kind"] == "train"]
        assert {r["replica"] for r in train} == {0, 1} and len(train) == 2 * (200 // 25)
        assert all(("partition_bytes" in r) == (P > 1) for r in train)
    assert acc[1] > 0.35 and acc[2] > 0.35, acc  # chance is 0.1; measured about 0.55
    assert abs(acc[1] - acc[2]) < 0.1, acc


def test_partitions_agree_on_checkpoint_pauses_and_stop(tmp_path, small_data):
    """Checkpoint requests and the coordinator's STOP reach the partitions of a replica at
    different times; they act on partition 0's reading, so none is left waiting for a peer."""
    _, summary, recs = _run(tmp_path, small_data, "stop", DENSE, 2, 2, lr=0.01,
                            steps=1_000_000, target_accuracy=0.3, eval_every_s=0.5,
                            extra="[checkpoint]\nevery_steps = 40\nevery_s = 0")
    assert summary["target_reached"] is True
    ckpts = [r for r in recs if r["kind"] == "checkpoint"]
    assert len(ckpts) >= 2  # at least one pause while training, and the final one
    done = [r for r in recs if r["kind"] == "worker_done"]
    for rep in (0, 1):  # the partitions of a replica stopped at the same step
        steps = {r["steps"] for r in done if r["replica"] == rep}
        assert len(steps) == 1, done
