"""Adam in a whole Downpour job: checkpointed with its whole state, resumed.

One replica reading its own pushes is deterministic, so a run killed after its first
checkpoint and resumed by the same command must end on the uninterrupted run's parameters bit
for bit: that holds only if every state row of the optimizer (Adam's m, v and step counts)
went into the checkpoint and came back. The rules themselves are checked against serial numpy
in tests/mpi/test_optimizers_ps.py.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import kill_after_checkpoints, run_job, write_config

from dbmpi import checkpoint as ckpt_mod
from dbmpi.checkpoint import load_params

pytestmark = pytest.mark.job  # every test here starts an MPI job
STEPS = 120


def _config(path, data, run_dir, name: str, **downpour):
    return write_config(path, {
        "topology": {"shards": 2, "replicas": 1},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": data, "batch_size": 32},
        "optimizer": {"name": name, "learning_rate": 0.01 if name == "adam" else 0.02},
        "downpour": {"steps": STEPS, "eval_every_s": 60.0, "read_own_pushes": True,
                     "log_every": 1, **downpour},
        "checkpoint": {"every_steps": 10},
        "run": {"dir": run_dir, "seed": 4}})


# Adam: three state rows, the most to lose (momentum's one row takes the same path; both rules
# are checked against numpy at the shards in tests/mpi/test_optimizers_ps.py)
@pytest.mark.parametrize("name,rows", [("adam", ["m", "v", "t"])])
def test_killed_and_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, small_data,
                                                                     name, rows):
    whole = _config(tmp_path / "whole.toml", small_data, tmp_path / "whole", name)
    proc = run_job(4, ["train", str(whole)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, _ = load_params(tmp_path / "whole" / "params.h5")
    # the replica sleeps to make each step 50x longer (numerically irrelevant): the run is
    # still going when its first checkpoint appears
    run = tmp_path / "cut"
    cfg = _config(tmp_path / "cut.toml", small_data, run, name, straggler_replica=0,
                  straggler_factor=50.0)
    assert kill_after_checkpoints(4, cfg, run, rank=3).returncode != 0
    latest = ckpt_mod.find_latest(run)
    assert 0 < latest.steps < STEPS and not latest.final
    with h5py.File(latest.shard_files[0][2], "r") as f:  # every state row, by name
        assert json.loads(f.attrs["state_names"]) == rows
        assert f["state"].shape == (len(rows), f["params"].shape[0])
        assert np.abs(f["state"][...]).max() > 0
    again = run_job(4, ["train", str(cfg), "--set", "downpour.straggler_factor=1.0"])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"]["steps"] == latest.steps and summary["steps"] == STEPS
    params, _ = load_params(run / "params.h5")
    np.testing.assert_array_equal(params, expected)
