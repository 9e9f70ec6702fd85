"""A full disk (issue 19, item 3), without filling one: ``DBMPI_FAULT_ENOSPC=PATTERN`` makes
the write of a matching file fail with ENOSPC exactly where a full disk would.

Found failing as an outside tester: ENOSPC while writing a checkpoint printed two lines and
a traceback per shard; after space was freed, the run died at its very end on the torn JSON
line the full disk had left in a rank's metrics file (exit 1, no summary.json), and the same
command then said "holds a finished run: nothing to do" so the summary was never written.
"""

from __future__ import annotations

import errno
import json
import logging

import numpy as np
import pytest
from conftest import error_lines, run_job, write_config

from dbmpi import checkpoint as ckpt_mod
from dbmpi import metrics as metrics_mod
from dbmpi.rundir import _read_jsonl

N = 10  # parameters, two shards of 5


def _write(run, sequence: int, final: bool = False) -> None:
    for s, (lo, hi) in enumerate(((0, 5), (5, 10))):
        ckpt_mod.write_shard(run, sequence, s, lo, hi, np.arange(lo, hi, dtype=np.float32),
                             np.ones((1, hi - lo), np.float32), 7, ("sum_sq",))
    ckpt_mod.commit(run, sequence, steps=30, num_params=N, num_shards=2,
                    workers=np.array([[30, 1, 40]], np.int64), final=final, model={},
                    config={"topology": {"partitions": 1}}, keep=10)


@pytest.mark.parametrize("name", ["shard-0001.h5", "checkpoint.h5"])
def test_enospc_in_a_checkpoint_is_one_line_and_nothing_is_committed(tmp_path, monkeypatch,
                                                                     name):
    _write(tmp_path, 1)
    monkeypatch.setenv("DBMPI_FAULT_ENOSPC", name)
    with pytest.raises(ckpt_mod.DiskWriteError) as exc:
        _write(tmp_path, 2)
    msg = str(exc.value)
    assert f"ckpt-00000002.tmp/{name}" in msg and "No space left on device [ENOSPC]" in msg
    assert "free space" in msg and "run.dir" in msg and "\n" not in msg
    assert exc.value.exit_code == 74
    root = ckpt_mod.checkpoint_root(tmp_path)
    assert not (root / "ckpt-00000002").exists()  # the pending directory is never renamed
    monkeypatch.delenv("DBMPI_FAULT_ENOSPC")
    assert ckpt_mod.resume_point(tmp_path).sequence == 1  # the previous one stands


def test_an_h5py_full_disk_error_and_a_read_only_one_are_named(tmp_path, monkeypatch):
    """h5py reports the C library's errno only in its text; a read-only file system gets
    the other fix."""
    def full(*a, **k):
        raise OSError("Unable to synchronously create file (file write failed: time = x, "
                      "errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(ckpt_mod.h5py, "File", full)
    with pytest.raises(ckpt_mod.DiskWriteError, match=r"params.h5: No space left on device "
                                                      r"\[ENOSPC\]: free space"):
        ckpt_mod.save_params(tmp_path / "params.h5", np.zeros(3), {})
    assert not (tmp_path / "params.h5").exists()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "summary.json"))

    monkeypatch.undo()
    monkeypatch.setattr("pathlib.Path.replace", read_only)
    (tmp_path / "metrics").mkdir()
    with pytest.raises(ckpt_mod.DiskWriteError, match=r"\[EROFS\]: make it writable"):
        metrics_mod.merge(tmp_path)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()  # its space given back


def _torn_rank_files(run) -> None:
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "rank-00000.jsonl").write_text(
        '{"kind": "eval", "time": 2.0, "step": 10, "loss": 0.5, "accuracy": 0.75}\n'
        '{"kind": "eval", "time": 4.0, "step": 20, "loss": 0.4, "accuracy": 0.8}\n')
    (run / "metrics" / "rank-00001.jsonl").write_text(
        '{"kind": "train", "time": 1.0, "loss": 0.9}\n{"kind": "train", "time": 3.0, "lo')


def test_metrics_merge_skips_counts_and_warns_about_a_torn_last_line(tmp_path, caplog):
    _torn_rank_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        out = metrics_mod.merge(tmp_path)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["time"] for r in recs] == [1.0, 2.0, 4.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "rank-00001.jsonl" in warned[0] and "skipped 1 line" in warned[0]
    # every reader of JSON lines in dbmpi tolerates it the same way
    (tmp_path / "metrics.jsonl").write_text(out.read_text() + '{"kind": "ev')
    assert len(metrics_mod.read(tmp_path)) == 3
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 3


def _job(tmp_path, small_data, steps: int = 60):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "job.toml", {
        "topology": {"shards": 2, "replicas": 1},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": small_data, "batch_size": 32},
        "downpour": {"steps": steps, "eval_every_s": 60.0, "log_every": 5},
        "checkpoint": {"every_steps": 20, "keep": 10},
        "run": {"dir": run, "seed": 2, "learning_curve": True}})
    return run, cfg


@pytest.mark.job
def test_a_full_disk_under_a_shard_ends_the_job_in_one_line(tmp_path, small_data):
    run, cfg = _job(tmp_path, small_data)
    proc = run_job(4, ["train", str(cfg)], env={"DBMPI_FAULT_ENOSPC": "shard-0001.h5"})
    assert proc.returncode == 74, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "ckpt-00000001.tmp/shard-0001.h5" in lines[0] and "[ENOSPC]" in lines[0]
    assert "Traceback" not in proc.stderr
    root = ckpt_mod.checkpoint_root(run)
    assert not list(root.glob("ckpt-????????")) and (root / "ckpt-00000001.tmp").is_dir()


@pytest.mark.job
def test_a_full_disk_in_the_final_write_is_one_line_and_the_rerun_writes_it(
        tmp_path, small_data):
    """The disk fills in the final write of summary.json: one line, exit 74, the final
    checkpoint committed; the same command, space freed, writes the summary."""
    steps = 60
    run, cfg = _job(tmp_path, small_data, steps)
    proc = run_job(4, ["train", str(cfg)], env={"DBMPI_FAULT_ENOSPC": "summary.json"})
    assert proc.returncode == 74, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and f"{run}/summary.json" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (run / "summary.json").exists()
    assert ckpt_mod.find_latest(run).final
    again = run_job(4, ["train", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rebuilt the missing summary.json" in again.stderr, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == steps


@pytest.mark.job
def test_a_finished_run_that_lost_its_outputs_rebuilds_them_with_the_same_command(
        tmp_path, small_data):
    """A finished run whose summary, merged metrics, params and curve are gone and whose
    rank metrics end in a torn line (what a disk-full death leaves): the same command
    rebuilds all four from the final checkpoint and the rank files, and says so; the
    rebuilt files agree with the originals; a third run has nothing to do."""
    steps = 60
    run, cfg = _job(tmp_path, small_data, steps)
    first = run_job(4, ["train", str(cfg)])
    assert first.returncode == 0, first.stderr[-3000:]
    original = json.loads((run / "summary.json").read_text())
    params_before, _ = ckpt_mod.load_params(run / "params.h5")
    for name in ("summary.json", "metrics.jsonl", "params.h5", "learning_curve.png"):
        (run / name).unlink()
    with (run / "metrics" / "rank-00000.jsonl").open("a") as fh:
        fh.write('{"kind": "eval", "time": 9')  # torn by the full disk
    again = run_job(4, ["train", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rebuilt the missing params.h5, metrics.jsonl, summary.json, learning_curve.png" \
        in again.stderr, again.stderr[-3000:]
    assert "skipped 1 line" in again.stderr
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "final_test_accuracy", "final_test_loss", "best_test_accuracy",
                "replica_steps"):
        assert summary[key] == original[key], key
    params, _ = ckpt_mod.load_params(run / "params.h5")
    np.testing.assert_array_equal(params, params_before)
    assert (run / "learning_curve.png").stat().st_size > 0
    third = run_job(4, ["train", str(cfg)])
    assert third.returncode == 0 and "nothing to do" in third.stderr
