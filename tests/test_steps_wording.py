"""``downpour.steps`` counts each replica's steps: every line that prints steps says both the
count per replica and the sum over replicas (issue 20), and summary.json keeps ``steps`` as
the sum with ``steps_per_replica`` beside it. ``eval`` names what it scored in the data set's
own words (images, frames)."""

from __future__ import annotations

import json

import pytest
from conftest import run_job, write_config

from dbmpi.evaluate import summary_line, task_unit
from dbmpi.progress import steps_per_replica, steps_phrase

STEPS = 120  # per replica


def test_steps_phrase():
    assert steps_phrase(10000, 2) == "5000 steps per replica (10000 in all)"
    assert steps_phrase(10000, 2, [5000, 5000]) == "5000 steps per replica (10000 in all)"
    # replicas that stopped apart (a target accuracy, SIGTERM): the spread, not a mean
    assert steps_phrase(9975, 2, [4975, 5000]) == "4975-5000 steps per replica (9975 in all)"
    assert steps_phrase(7, 2) == "~4 steps per replica (7 in all)"
    assert steps_phrase(300, 1) == "300 steps (1 replica)"
    assert steps_per_replica(10000, 2, [5000, 5000]) == 5000
    assert steps_per_replica(9975, 2, [4975, 5000]) == 4987.5


def test_eval_line_says_images_or_frames(tmp_path):
    r = {"split": "test", "frame_accuracy": 0.8912, "frames": 10000}
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "images.json").write_text("{}")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "speech.json").write_text("{}")
    assert task_unit(tmp_path / "img") == "image"
    assert task_unit(tmp_path / "sp", (40,)) == "frame"
    assert task_unit(tmp_path, (28, 28)) == "image"  # an IDX or synthetic set: 2-d examples
    assert task_unit(tmp_path, (100,)) == "example"
    assert summary_line({**r, "unit": "image"}) == "test: image accuracy 0.8912 (10000 images)"
    assert summary_line({**r, "unit": "frame"}) == "test: frame accuracy 0.8912 (10000 frames)"


@pytest.mark.job
def test_log_and_summary_say_steps_per_replica_and_in_all(tmp_path, small_data):
    cfg = write_config(tmp_path / "job.toml", {
        "topology": {"shards": 1, "replicas": 2},
        "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}]},
        "data": {"path": small_data, "batch_size": 32, "eval_limit": 200},
        "optimizer": {"name": "adagrad", "learning_rate": 0.05},
        "downpour": {"steps": STEPS, "eval_every_s": 60.0},
        "run": {"dir": tmp_path / "run", "seed": 1}})
    proc = run_job(4, ["train", cfg])
    assert proc.returncode == 0, proc.stderr[-2000:]
    phrase = f"{STEPS} steps per replica ({2 * STEPS} in all)"
    log = proc.stderr.splitlines()
    done = [ln for ln in log if " done: " in ln]
    assert len(done) == 1 and f"done: {phrase} in " in done[0], proc.stderr[-2000:]
    assert any(f"written: {phrase}, " in ln and ln.endswith("(final)") for ln in log
               if "checkpoint" in ln), proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[-2].startswith("final test accuracy ") and f" after {phrase} in " in out[-2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 * STEPS  # the sum, as readers of summary.json expect
    assert summary["steps_per_replica"] == STEPS
    assert summary["replica_steps"] == [STEPS, STEPS]
    # the eval records' steps are sums too: the last one is the sum over replicas
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in recs if r["kind"] == "eval"][-1] == 2 * STEPS
