"""Bad input that used to be accepted (issue 19, item 8): a batch larger than a replica's data,
a config without [data] path, a shard of another data set among a split's shards, a WAV file
whose header is cut short. Each is refused up front with one line naming the file or field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import error_lines, run_job
from test_jobs import job_config
from test_speech import write_corpus

from data_tools.__main__ import main as data_tools_main
from data_tools.shards import build_manifest
from data_tools.synth import write_synth
from dbmpi import config
from dbmpi.data import DataError, open_dataset
from dbmpi.errors import ConfigError, DbmpiError
from dbmpi.runner import _check_data


def _cfg(data: Path | str, replicas: int, batch: int, algorithm: str = "downpour"):
    return config.from_dict({"algorithm": algorithm, "topology": {"replicas": replicas},
                             "data": {"path": str(data), "batch_size": batch}})


# -- data.batch_size against the smallest replica's share ---------------------------------------
def test_batch_larger_than_a_replicas_data_is_refused(small_data):
    counts = [e["num_examples"] for e in
              json.loads((small_data / "manifest.json").read_text())["splits"]["train"]]
    assert len(counts) == 4
    for replicas in (1, 2, 3, 4):
        shares = [sum(counts[r::replicas]) for r in range(replicas)]  # replica r's shards
        smallest = min(shares)
        _check_data(_cfg(small_data, replicas, smallest))  # a batch of all of it is fine
        with pytest.raises(DbmpiError) as info:
            _check_data(_cfg(small_data, replicas, smallest + 1))
        msg = str(info.value)
        assert "data.batch_size" in msg and f"replica {shares.index(smallest)}'s" in msg
        assert f"({smallest} examples" in msg and f"data.batch_size <= {smallest}" in msg
        assert "\n" not in msg
    # sandblaster reads sandblaster.batch_size, not data.batch_size
    _check_data(_cfg(small_data, 4, 10 ** 6, algorithm="sandblaster"))


# -- config files a job cannot run from -----------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: empty config file") and "[data] path" in msg and "\n" not in msg


def test_config_without_data_path_does_not_train_a_default_set(tmp_path, small_data,
                                                               monkeypatch):
    # the old default, data/demo/shards, exists here: it used to be trained silently
    monkeypatch.chdir(tmp_path)
    shutil.copytree(small_data, tmp_path / "data" / "demo" / "shards")
    p = tmp_path / "c.toml"
    p.write_text("[topology]\nshards = 1\nreplicas = 1\n")
    cfg = config.load(p)
    with pytest.raises(DbmpiError) as info:
        _check_data(cfg)
    msg = str(info.value)
    assert msg.startswith("data.path:") and "[data]" in msg and "--set data.path" in msg
    _check_data(config.load(p, [f"data.path='{small_data}'"]))  # given on the command line


@pytest.mark.job
@pytest.mark.parametrize("text,sets,needle", [
    ("", [], "empty config file"),
    ("[topology]\nshards = 1\nreplicas = 2\n", [], "data.path:"),
    (None, ["data.batch_size=1201"], "data.batch_size = 1201"),  # 2 replicas x 1200
])
def test_job_refuses_before_training(tmp_path, small_data, text, sets, needle):
    cfg = job_config(tmp_path, small_data, 1, 2)
    if text is not None:
        cfg.write_text(text)
    proc = run_job(4, ["train", str(cfg), *[a for s in sets for a in ("--set", s)]])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# -- a shard of another data set ----------------------------------------------------------------
def _shards(root: Path, seed: int, *extra: str) -> Path:
    write_synth(root / "idx", n_train=400, n_test=100, seed=seed)
    out = root / "shards"
    assert data_tools_main(["shard", "idx", "--src", str(root / "idx"), "--out", str(out),
                            "--shards", "4", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> tuple[Path, Path]:
    a = _shards(tmp_path_factory.mktemp("a"), 1)
    b = _shards(tmp_path_factory.mktemp("b"), 2)
    return a, b


def _mixed(two_sets, tmp_path) -> tuple[Path, Path]:
    a, b = two_sets
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    name = "train-00002-of-00004.h5"
    shutil.copy(b / name, mixed / name)  # same shape, dtype, classes and name: only the origin
    return mixed, mixed / name


def _assert_names_both(msg: str, copied: Path) -> None:
    assert msg.startswith(str(copied)) and "train-00000-of-00004.h5" in msg
    assert "attribute 'source'" in msg and "\n" not in msg


def test_manifest_refuses_a_shard_of_another_data_set(two_sets, tmp_path, capsys):
    mixed, copied = _mixed(two_sets, tmp_path)
    before = (mixed / "manifest.json").read_text()
    with pytest.raises(DataError) as info:
        build_manifest(mixed)
    _assert_names_both(str(info.value), copied)
    assert data_tools_main(["manifest", "--out", str(mixed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attribute 'source'" in err[0]
    assert (mixed / "manifest.json").read_text() == before  # not rewritten


def test_reader_refuses_a_shard_of_another_data_set(two_sets, tmp_path, capsys):
    # a manifest that lists the copy with its own count and checksum (as the manifest command
    # wrote before it compared origins): only the origin attributes tell the shards apart
    mixed, copied = _mixed(two_sets, tmp_path)
    m = json.loads((mixed / "manifest.json").read_text())
    with h5py.File(copied, "r") as f:
        m["splits"]["train"][2].update(num_examples=int(f.attrs["num_examples"]),
                                       checksum=str(f.attrs["checksum"]))
    (mixed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as info:
        open_dataset(mixed)
    _assert_names_both(str(info.value), copied)
    assert data_tools_main(["check", str(mixed), "--verify"]) == 2
    assert "attribute 'source'" in capsys.readouterr().err


def test_shards_of_one_multi_task_run_still_agree(tmp_path):
    # the tasks' command lines differ in --task only
    write_synth(tmp_path / "idx", n_train=400, n_test=100, seed=3)
    out = tmp_path / "shards"
    for task in ("0", "1"):
        assert data_tools_main(["shard", "idx", "--src", str(tmp_path / "idx"), "--out",
                                str(out), "--shards", "4", "--n-tasks", "2",
                                "--task", task]) == 0
    m = build_manifest(out)
    assert [len(m["splits"][s]) for s in ("train", "test")] == [4, 1]
    assert open_dataset(out).num_examples("train") == 400


# -- WAV files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [20, 30, 40])
def test_wav_with_truncated_header_names_the_file(tmp_path, capsys, keep):
    src = write_corpus(tmp_path / "wav", speakers=2, indices=2)
    bad = src / "one_spk1_1.wav"
    bad.write_bytes(bad.read_bytes()[:keep])  # the header is 44 bytes
    out = tmp_path / "out"
    assert data_tools_main(["shard", "speech", "--src", str(src), "--out", str(out),
                            "--shards", "1", "--test-index", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "truncated header" in err[0], err
    assert "remove it from --src" in err[0]
    assert not (out / "manifest.json").exists()
