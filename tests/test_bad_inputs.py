"""Bad input, end to end: every case ends the job with a one-line error that names the file or
field, and a non-zero exit status; none hangs (a job that stops advancing fails its test).

More cases live beside the features they guard: wrong rank count, unknown config key, bad
values and too few shards (test_jobs.py), diverging training (test_faults.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import error_lines, run_job
from test_jobs import job_config

pytestmark = pytest.mark.job  # every test here starts an MPI job


def _copy(small_data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(small_data, dst)
    return dst


def _shard(data: Path, i: int = 1) -> Path:
    return sorted(data.glob("train-*.h5"))[i]


def _rewrite(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


def _truncate(data):
    p = _shard(data)
    p.write_bytes(p.read_bytes()[:2000])
    return p.name


def _rename_dataset(data):
    p = _shard(data)
    _rewrite(p, lambda f: f.move("features", "images"))
    return p.name


def _float_labels(data):
    p = _shard(data)

    def edit(f):
        y = f["labels"][...].astype(np.float32)
        del f["labels"]
        f.create_dataset("labels", data=y)
    _rewrite(p, edit)
    return p.name


def _shape_mismatch(data):
    p = _shard(data)

    def edit(f):
        x = f["features"][...].reshape(len(f["features"]), -1)[:, :700]
        del f["features"]
        f.create_dataset("features", data=x)
        f.attrs["feature_shape"] = np.array([700])
    _rewrite(p, edit)
    return p.name


def _empty(data):
    p = _shard(data)

    def edit(f):
        for name, shape in (("features", (0, 28, 28)), ("labels", (0,))):
            dt = f[name].dtype
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dt)
        f.attrs["num_examples"] = 0
    _rewrite(p, edit)
    return p.name


def _schema_version(data):
    p = _shard(data)
    _rewrite(p, lambda f: f.attrs.__setitem__("schema_version", 99))
    return p.name


def _nan_features(data):
    p = _shard(data, 0)  # read by replica 0 in its first epoch

    def edit(f):
        x = f["features"]
        x[5, 3, 3] = np.nan
    _rewrite(p, edit)
    return p.name


def _label_range(data):
    p = _shard(data, 0)

    def edit(f):
        f["labels"][7] = 10  # 10 classes: valid labels are 0..9
    _rewrite(p, edit)
    return p.name


def _missing_manifest(data):
    (data / "manifest.json").unlink()
    return "manifest.json"


def _bad_manifest(data):
    (data / "manifest.json").write_text("{not json")
    return "manifest.json"


def _missing_shard(data):
    p = _shard(data, 2)
    p.unlink()
    return p.name


DATA_CASES = {
    "truncated HDF5 shard": _truncate,
    "wrong dataset name": _rename_dataset,
    "float labels": _float_labels,
    "feature shapes differ between shards": _shape_mismatch,
    "empty shard": _empty,
    "unknown schema version": _schema_version,
    "NaN features": _nan_features,
    "label out of range": _label_range,
    "missing manifest": _missing_manifest,
    "manifest not JSON": _bad_manifest,
    "missing shard file": _missing_shard,
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(tmp_path, small_data, case):
    data = _copy(small_data, tmp_path)
    name = DATA_CASES[case](data)
    cfg = job_config(tmp_path, data, 2, 2, steps=400, read_own_pushes=False)
    proc = run_job(5, ["train", str(cfg)])
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) >= 1 and name in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # user errors are one line, not a stack trace


def test_unwritable_run_dir(tmp_path, small_data):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"  # root may write anywhere: make the path impossible instead
        blocker.write_text("x")
        run_dir = blocker / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        run_dir = ro / "run"
    cfg = job_config(tmp_path, small_data, 2, 2)
    proc = run_job(5, ["train", str(cfg), "--set", f"run.dir={json.dumps(str(run_dir))}"])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "run.dir" in lines[0] and str(run_dir) in lines[0]


@pytest.mark.parametrize("text,needle", [
    (None, "no such config file"),
    ("[topology\nshards = 2", "not valid TOML"),
])
def test_config_file_problems(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    if text is not None:
        path.write_text(text)
    proc = run_job(5, ["train", str(path)])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0]


def test_missing_eval_split(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2)
    proc = run_job(5, ["train", str(cfg), "--set", "data.eval_split='valid'"])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "data.eval_split" in lines[0]


def test_checkpoint_of_another_model(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2, steps=50, read_own_pushes=False)
    assert run_job(5, ["train", str(cfg)]).returncode == 0  # leaves a checkpoint
    proc = run_job(5, ["train", str(cfg), "--set",
                       "model.layers=[{type='dense', units=7}]"])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "checkpoint of a model" in lines[0] and "run.dir" in lines[0]


def test_resume_without_a_run(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 2, 2)
    text = cfg.read_text().replace(f'dir = "{tmp_path / "run"}"', 'name = "never-ran-x91"')
    cfg.write_text(text)
    proc = run_job(5, ["train", str(cfg), "--resume"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "--resume" in lines[0]


def test_checkpoint_with_other_partition_count(tmp_path, small_data):
    cfg = job_config(tmp_path, small_data, 1, 1, steps=20, read_own_pushes=False)
    assert run_job(3, ["train", str(cfg)]).returncode == 0  # leaves a checkpoint
    proc = run_job(4, ["train", str(cfg), "--set", "topology.partitions=2",
                       "--set", "downpour.steps=40"])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "topology.partitions = 1" in lines[0], proc.stderr[-2000:]
