"""Corrupt checkpoints: every file verified, bad ones moved aside, numbering past them.

Written as an outside tester found them failing: a corrupt newest checkpoint made every
re-run die on ``os.replace`` onto the corrupt directory's number, one flipped value in
``checkpoint.h5``'s ``workers`` was trusted (a replica "resumed" at step 8,323,771), and with
every checkpoint corrupt the run silently restarted from step 0.
"""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pytest
from conftest import error_lines, kill_after_checkpoints, run_job, write_config

from dbmpi import checkpoint as ckpt_mod

N = 10  # parameters, two shards of 5


def _write(run, sequence: int, steps: int = 30, workers=None) -> None:
    rng = np.random.default_rng(sequence)
    for s, (lo, hi) in enumerate(((0, 5), (5, 10))):
        ckpt_mod.write_shard(run, sequence, s, lo, hi, rng.standard_normal(hi - lo)
                             .astype(np.float32), np.ones((1, hi - lo), np.float32), 7,
                             ("sum_sq",))
    rows = np.array([[steps, 1, 40]], np.int64) if workers is None else workers
    ckpt_mod.commit(run, sequence, steps=steps, num_params=N, num_shards=2, workers=rows,
                    final=False, model={}, config={"topology": {"partitions": 1}}, keep=10)


def _flip(path, dataset: str) -> None:
    with h5py.File(path, "r+") as f:
        f[dataset][0] += 8_323_741


def test_a_flipped_value_in_checkpoint_h5_is_caught(tmp_path):
    _write(tmp_path, 1)
    d = ckpt_mod.checkpoint_root(tmp_path) / "ckpt-00000001"
    assert ckpt_mod.open_checkpoint(d).workers.tolist() == [[30, 1, 40]]
    _flip(d / "checkpoint.h5", "workers")
    with pytest.raises(ValueError, match="checkpoint.h5: checksum mismatch"):
        ckpt_mod.open_checkpoint(d)


def test_rows_that_do_not_add_up_are_refused_even_with_a_good_checksum(tmp_path):
    _write(tmp_path, 1, steps=30, workers=np.array([[8_323_771, 1, 40]], np.int64))
    with pytest.raises(ValueError, match="do not add up to its 30 steps"):
        ckpt_mod.open_checkpoint(ckpt_mod.checkpoint_root(tmp_path) / "ckpt-00000001")


def test_corrupt_newest_is_moved_aside_and_numbering_continues_past_it(tmp_path, caplog):
    for k in (1, 2, 3):
        _write(tmp_path, k, steps=10 * k, workers=np.array([[10 * k, 0, k]], np.int64))
    root = ckpt_mod.checkpoint_root(tmp_path)
    _flip(root / "ckpt-00000003" / "shard-0001.h5", "params")
    with caplog.at_level(logging.WARNING):
        ck = ckpt_mod.resume_point(tmp_path)
    assert ck.sequence == 2 and ck.steps == 20
    assert (root / "ckpt-00000003.corrupt" / "shard-0001.h5").exists()  # kept, not deleted
    assert not (root / "ckpt-00000003").exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "ckpt-00000003" in warned[0] and "moved aside" in warned[0]
    assert ckpt_mod.highest_sequence(tmp_path) == 3  # the next one is 4, not 3 again


def test_every_checkpoint_corrupt_refuses_instead_of_starting_over(tmp_path):
    for k in (1, 2):
        _write(tmp_path, k, steps=10 * k, workers=np.array([[10 * k, 0, k]], np.int64))
    root = ckpt_mod.checkpoint_root(tmp_path)
    _flip(root / "ckpt-00000001" / "checkpoint.h5", "workers")
    _flip(root / "ckpt-00000002" / "shard-0000.h5", "params")
    with pytest.raises(ckpt_mod.NoValidCheckpoint) as exc:
        ckpt_mod.resume_point(tmp_path)
    text = str(exc.value)
    assert "no valid checkpoint" in text and "ckpt-00000001" in text and "ckpt-00000002" in text
    assert "shard-0000.h5" in text and "another run.dir" in text


def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path):
    """Adagrad's accumulator is not Adam's moments: a resume that changes optimizer.name is
    refused, naming the checkpoint and both names (other changes, e.g. the rate, are fine)."""
    from dbmpi import config as config_mod
    from dbmpi.runner import resume_mismatch

    _write(tmp_path, 1)
    ck = ckpt_mod.open_checkpoint(ckpt_mod.checkpoint_root(tmp_path) / "ckpt-00000001")
    ck.config = {"topology": {"partitions": 1}, "optimizer": {"name": "adagrad"}}
    path = tmp_path / "c.toml"
    path.write_text('[data]\npath = "x"\n[downpour]\nsteps = 10\n')
    same = config_mod.load(path, ["optimizer.learning_rate=0.3"])
    assert resume_mismatch(ck, same, N) is None
    other = config_mod.load(path, ["optimizer.name='adam'"])
    msg = resume_mismatch(ck, other, N)
    assert "optimizer.name = 'adagrad'" in msg and "'adam'" in msg and "\n" not in msg
    assert "parameters" in resume_mismatch(ck, same, N + 1)


@pytest.mark.job
def test_a_run_with_a_corrupt_newest_checkpoint_resumes_and_finishes(tmp_path, small_data):
    """Killed after its checkpoints began, the newest one corrupted: the same command
    resumes from the one before, writes its next checkpoints past the corrupt number and
    finishes; with every checkpoint corrupt it refuses in one line, exit 2."""
    steps = 120
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "job.toml", {
        "topology": {"shards": 2, "replicas": 1},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": small_data, "batch_size": 32},
        "downpour": {"steps": steps, "eval_every_s": 60.0, "straggler_replica": 0,
                     "straggler_factor": 50.0, "log_every": 1},
        "checkpoint": {"every_steps": 10, "keep": 10},
        "run": {"dir": run, "seed": 2}})
    assert kill_after_checkpoints(4, cfg, run, rank=3, count=2).returncode != 0
    newest = ckpt_mod.find_latest(run)
    _flip(newest.shard_files[0][2], "params")
    again = run_job(4, ["train", str(cfg), "--set", "downpour.straggler_factor=1.0"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{newest.path.name} cannot be trusted" in again.stderr
    assert (newest.path.parent / f"{newest.path.name}.corrupt").is_dir()
    assert json.loads((run / "summary.json").read_text())["steps"] == steps
    # now corrupt every checkpoint of the finished run but mark none final: nothing to trust
    for d in ckpt_mod.checkpoint_root(run).glob("ckpt-????????"):
        _flip(d / "shard-0000.h5", "params")
    proc = run_job(4, ["train", str(cfg)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "holds no valid checkpoint" in lines[0], proc.stderr[-2000:]
