"""A recorded asynchronous run replayed bit for bit (issue 23, ``run.record_order``,
``python -m dbmpi replay``): the replay, in one process, ends on the run's own ``params.h5``
with every bit equal, and ``--until`` stops where a shorter run ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_job
from test_jobs import job_config

from dbmpi import order
from dbmpi.checkpoint import load_params
from dbmpi.config import ConfigError, load

RECORD = ["--set", "run.record_order=true"]


def _replay(run, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbmpi", "replay", str(run), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **env})


def _pushes(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").open()) if r["kind"] == "push"]


def _bits(path) -> np.ndarray:
    return load_params(path)[0].view(np.uint32)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, small_data):
    """3 replicas, 2 shards, no waiting for their own pushes: an asynchronous run."""
    tmp = tmp_path_factory.mktemp("recorded")
    cfg = job_config(tmp, small_data, 2, 3, steps=80, read_own_pushes=False)
    proc = run_job(6, ["train", str(cfg), *RECORD])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.job
def test_an_asynchronous_run_replays_to_its_parameters_bit_for_bit(recorded):
    # the run was asynchronous: pushes were applied on parameters others had moved since
    assert any(max(r["staleness"]) > 0 for r in _pushes(recorded))
    proc = _replay(recorded)
    assert proc.returncode == 0, proc.stderr
    assert "equal to" in proc.stdout and "bit for bit" in proc.stdout
    assert "replayed 480 pushes on 2 shards" in proc.stdout  # 3 x 80 pushes, on each shard
    np.testing.assert_array_equal(_bits(recorded / "replay_params.h5"),
                                  _bits(recorded / "params.h5"))


@pytest.mark.job
@pytest.mark.parametrize("variant", ["rma-only-n3", "staleness-aware"])
def test_other_transports_and_rules_replay_bit_for_bit(tmp_path, small_data, variant):
    """Fetches through MPI_Get (as between nodes) with n_fetch = n_push = 3 (gradients summed
    in the slot); staleness-aware steps (the shard's divisor is recorded) with dropout."""
    if variant == "rma-only-n3":
        cfg = job_config(tmp_path, small_data, 2, 2, steps=45, read_own_pushes=False,
                         n_fetch=3, n_push=3)
        env = {"DBMPI_RMA_SHARED": "0"}
    else:  # with dropout: each replica's masks come from the run's seed
        cfg = job_config(tmp_path, small_data, 1, 3, steps=60, read_own_pushes=False,
                         staleness_aware=True)
        text = cfg.read_text()
        assert 'activation = "relu"}' in text
        cfg.write_text(text.replace('activation = "relu"}', 'activation = "relu", dropout = 0.3}'))
        env = {}
    proc = run_job(1 + 2 + 2 if variant == "rma-only-n3" else 1 + 1 + 3,
                   ["train", str(cfg), *RECORD], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    if variant == "staleness-aware":
        with h5py.File(order.shard_file(run, 0)) as f:
            divisors = f["applies"][:, 2]
        assert divisors.max() > 1  # some pushes were applied with a smaller step
    proc = _replay(run)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_bits(run / "replay_params.h5"), _bits(run / "params.h5"))


@pytest.mark.job
def test_until_stops_where_a_shorter_run_ends(tmp_path, small_data):
    """One replica reading its own pushes is deterministic: the 60-step run replayed to step
    25 holds what the 25-step run of the same config ends with, bit for bit."""
    (tmp_path / "long").mkdir()
    (tmp_path / "short").mkdir()
    long_cfg = job_config(tmp_path / "long", small_data, 2, 1, steps=60)
    short_cfg = job_config(tmp_path / "short", small_data, 2, 1, steps=25)
    for cfg in (long_cfg, short_cfg):
        proc = run_job(4, ["train", str(cfg), *RECORD])
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _replay(tmp_path / "long" / "run", "--until", "25")
    assert proc.returncode == 0, proc.stderr
    got = _bits(tmp_path / "long" / "run" / "replay_params_until_25.h5")
    np.testing.assert_array_equal(got, _bits(tmp_path / "short" / "run" / "params.h5"))
    assert not np.array_equal(got, _bits(tmp_path / "long" / "run" / "params.h5"))


@pytest.mark.job
def test_a_replay_on_other_blas_threads_or_library_is_refused_with_the_fix(recorded):
    """Bit for bit needs the floats of the run: the same BLAS thread count and library."""
    with h5py.File(order.worker_file(recorded, 0), "r") as f:
        ran = str(f.attrs["blas_library"])
    if ran != "numpy":
        pytest.skip("numpy's BLAS cannot be reached here: there is no other library to try")
    other = "scipy"
    proc = _replay(recorded, DBMPI_BLAS=other)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"dbmpi: error: the run's kernels called {ran}'s BLAS, this "
                           f"replay's {other}'s: the same library gives the same floats; run "
                           f"the replay with DBMPI_BLAS={ran}\n")
    proc = _replay(recorded, OPENBLAS_NUM_THREADS="2")
    assert proc.returncode == 2, proc.stderr
    assert "run the replay with OPENBLAS_NUM_THREADS=1" in proc.stderr


@pytest.mark.job
def test_a_record_that_does_not_fit_is_named_and_a_changed_one_is_caught(tmp_path, recorded):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    # a wrong-schema order file: one line naming it and the fix, status 2
    worker1 = order.worker_file(run, 1)
    with h5py.File(worker1, "r+") as f:
        f.attrs["schema"] = "something.else"
    proc = _replay(run)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(worker1) in proc.stderr and "run.record_order=true" in proc.stderr
    with h5py.File(worker1, "r+") as f:
        f.attrs["schema"] = order.SCHEMA
    # two pushes of other workers swapped in shard 0's order: the replay still fits the
    # record, but ends elsewhere, and says so with status 1
    with h5py.File(order.shard_file(run, 0), "r+") as f:
        applies = f["applies"][...]
        i = next(k for k in range(len(applies) - 1)
                 if applies[k, 0] != applies[k + 1, 0])
        applies[[i, i + 1]] = applies[[i + 1, i]]
        f["applies"][...] = applies
    proc = _replay(run)
    assert proc.returncode in (1, 2), proc.stderr
    assert proc.stderr.startswith("dbmpi: error:") and "Traceback" not in proc.stderr


def test_record_order_refuses_what_it_cannot_replay(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2)
    text = cfg.read_text().replace("[run]\n", "[run]\nrecord_order = true\n")
    cfg.write_text(text.replace("[topology]\n", "[topology]\npartitions = 2\n"))
    with pytest.raises(ConfigError, match="run.record_order"):
        load(cfg)


def test_a_run_not_recorded_is_refused_with_one_line(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(cfg, run / "config.toml")
    proc = _replay(run)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "run.record_order is false" in proc.stderr
