"""The progress line (dbmpi.progress): its wording and ETA arithmetic, drawn in place only on a
terminal, and a job whose output is not a terminal carries no carriage return."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_synth_shards, run_job, write_config

from dbmpi import config as config_mod
from dbmpi.data import open_dataset
from dbmpi.progress import (
    LiveLine,
    eta_seconds,
    format_duration,
    live_wanted,
    progress_line,
    steps_done,
    work_line,
)


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(125) == "2:05"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(-3) == "0:00"


def test_eta_against_hand_values():
    # 2400 of 10000 steps in 60 s since the start (at 0): 40 steps/s, 7600 left -> 190 s
    assert eta_seconds(2400, 10000, 0, 60.0) == pytest.approx(190.0)
    # a resumed run: 4000 steps were there at the start; 1000 more in 50 s -> 20 steps/s,
    # 5000 left -> 250 s
    assert eta_seconds(5000, 10000, 4000, 50.0) == pytest.approx(250.0)
    assert eta_seconds(10000, 10000, 0, 10.0) == 0.0
    # no end in steps, no progress yet, no time yet: no ETA
    assert eta_seconds(100, 0, 0, 10.0) is None
    assert eta_seconds(4000, 10000, 4000, 10.0) is None
    assert eta_seconds(100, 10000, 0, 0.0) is None


def test_progress_line_wording():
    line = progress_line(2400, 2, 5000, 3520.4, 0.87123, 41.0, 190.0)
    assert line == ("1200/5000 steps per replica (2400/10000 in all, 24%) | 3520 samples/s | "
                    "test accuracy 0.8712 | 0:41, ETA 3:10")
    # before the first evaluation, and with no end in steps (a target accuracy only)
    assert progress_line(300, 3, 0, None, None, 5.0, None) == \
        "100 steps per replica (300 in all) | 0:05"
    assert steps_done(50, 1, 200) == "50/200 steps (25%, 1 replica)"


def test_live_line_only_where_wanted():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert live_wanted(Tty(), env={}) is True
    assert live_wanted(io.StringIO(), env={}) is False
    # dbmpi launch decides for rank 0, whose stderr is mpiexec's pipe
    assert live_wanted(io.StringIO(), env={"DBMPI_PROGRESS": "tty"}) is True
    assert live_wanted(Tty(), env={"DBMPI_PROGRESS": "plain"}) is False
    out = io.StringIO()
    live = LiveLine(True, out, every_s=0.0)
    live.show("a long first line")
    live.show("short")
    live.clear()
    assert out.getvalue() == "\ra long first line\x1b[K\rshort\x1b[K\r\x1b[K"
    quiet = io.StringIO()
    off = LiveLine(False, quiet)
    off.show("x")
    off.clear()
    assert quiet.getvalue() == "" and not off.due()


def job_config(tmp_path, data, name):
    return write_config(tmp_path / f"{name}.toml", {
        "topology": {"shards": 1, "replicas": 2},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": data, "batch_size": 32, "eval_limit": 200},
        "optimizer": {"name": "adagrad", "learning_rate": 0.05},
        "downpour": {"steps": 150, "eval_every_s": 0.5},
        "run": {"dir": tmp_path / name, "seed": 1}})


@pytest.mark.job
def test_job_output_has_no_carriage_return_unless_a_terminal(tmp_path, small_data):
    # stdout and stderr are files here: plain log lines only
    plain = run_job(4, ["train", job_config(tmp_path, small_data, "plain")],
                    env={"DBMPI_PROGRESS": ""})
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "\r" not in plain.stdout and "\r" not in plain.stderr
    assert "\x1b" not in plain.stderr
    assert "done: 150 steps per replica (300 in all)" in plain.stderr
    # the same job told that there is a terminal draws the line in place (as `dbmpi launch`
    # does at one): the check above would see it
    live = run_job(4, ["train", job_config(tmp_path, small_data, "live")],
                   env={"DBMPI_PROGRESS": "tty"})
    assert live.returncode == 0, live.stderr[-2000:]
    drawn = [seg for seg in live.stderr.split("\r") if "steps per replica (" in seg
             and "in all, " in seg]
    assert drawn, live.stderr[-2000:]
    assert "/150 steps per replica (" in drawn[0] and "/300 in all, " in drawn[0]


def test_epoch_budget_gives_the_steps_per_replica(tmp_path):
    from dbmpi.train.downpour.coordinator import Coordinator

    # 2400 training examples in 4 shards of 600: 2 replicas read 1200 each; batch 32
    data = make_synth_shards(tmp_path, 2400, 100, seed=2)
    coord = Coordinator.__new__(Coordinator)  # only the budget: no job
    for downpour, each in (({"steps": 0, "epochs": 2}, 75),  # ceil(2 * 1200 / 32)
                           ({"steps": 0, "epochs": 0.5}, 19),  # ceil(18.75)
                           ({"steps": 50, "epochs": 2}, 50),  # whichever ends first
                           ({"steps": 0, "target_accuracy": 0.5}, 0)):  # no end in steps
        cfg = write_config(tmp_path / "c.toml", {
            "topology": {"shards": 1, "replicas": 2},
            "data": {"path": data, "batch_size": 32}, "downpour": downpour})
        coord.cfg = config_mod.load(cfg, [])
        assert coord._budget_each(open_dataset(data)) == each, downpour


def test_work_line_against_hand_values():
    # 22,500 of 60,000 examples in 18.75 s: 1200 examples/s, 37,500 left: 31.25 s
    assert work_line("train", 22500, 60000, "examples", 18.75, "3/8 shards") == \
        "train: 3/8 shards, 22500/60000 examples, 1200 examples/s, ETA 0:31"
    assert work_line("test", 0, 10, "examples", 0.0) == \
        "test: 0/10 examples, 0 examples/s, ETA ?"


@pytest.mark.parametrize("mode", ["tty", "plain"])
def test_sharding_draws_its_line_only_on_a_terminal(tmp_path, mode):
    """``data_tools shard``: one in-place line per split on a terminal (forced here with
    DBMPI_PROGRESS=tty, as a pipe is no terminal), none in a log; the plain lines stay."""
    from data_tools.synth import write_synth

    write_synth(tmp_path / "idx", n_train=300, n_test=50, seed=0)
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "shard", "idx", "--src", str(tmp_path / "idx"),
         "--out", str(tmp_path / "shards"), "--shards", "3"], cwd=ROOT, capture_output=True,
        env={**os.environ, "DBMPI_PROGRESS": mode}, timeout=120)
    err = proc.stderr.decode()  # bytes: text mode would turn the \r into newlines
    assert proc.returncode == 0, err
    assert err.count("wrote ") >= 4  # 3 train shards, 1 test shard, the manifest
    if mode == "tty":
        assert "\rtrain: 3/3 shards, 300/300 examples" in err
    else:
        assert "\r" not in err and "\x1b" not in err
