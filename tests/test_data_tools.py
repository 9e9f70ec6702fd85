"""data_tools: idx files, the synthetic data set, the shard writer, manifest and CLI."""

import gzip
import hashlib
import json

import h5py
import numpy as np
import pytest

from data_tools import synth
from data_tools.__main__ import main
from data_tools.idx import IDX_FILES, read_idx, read_idx_split, write_idx
from data_tools.shards import assign_rows, build_manifest, parse_compression, write_split
from dbmpi.data import DataError, open_dataset
from dbmpi.data.schema import SCHEMA_NAME, SCHEMA_VERSION, shard_name


def write_mnist_like(src, n_train=300, n_test=70, seed=0, compress=False, shape=(28, 28)):
    """Random MNIST-style idx files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        sfx = ".gz" if compress else ""
        write_idx(src / (IDX_FILES[(split, "images")] + sfx), x)
        write_idx(src / (IDX_FILES[(split, "labels")] + sfx), y)
        out[split] = (x, y)
    return out


# -- idx ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype,shape", [(np.uint8, (5, 4, 3)), (np.int32, (17,)),
                                         (np.float32, (3, 2)), (np.int16, (2, 2, 2, 2))])
def test_idx_round_trip(tmp_path, compress, dtype, shape):
    a = (np.arange(np.prod(shape)) * 7 - 3).reshape(shape).astype(dtype)
    p = tmp_path / ("a.idx" + (".gz" if compress else ""))
    write_idx(p, a)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_idx_header_is_mnist_format(tmp_path):
    p = tmp_path / "l"
    write_idx(p, np.array([1, 2, 3], dtype=np.uint8))
    assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    p = tmp_path / "plain-name"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 9, 8]))
    np.testing.assert_array_equal(read_idx(p), [9, 8])


@pytest.mark.parametrize("blob", [b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02",  # truncated
                                  b"PK\x03\x04junk", b"\x00"])
def test_idx_bad_file_raises_dataerror_naming_it(tmp_path, blob):
    p = tmp_path / "bad-idx"
    p.write_bytes(blob)
    with pytest.raises(DataError, match="bad-idx"):
        read_idx(p)


def test_read_idx_split_finds_plain_and_gz(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ref = write_mnist_like(src, compress=True)
    x, y, paths = read_idx_split(src, "test")
    assert paths[0].name.endswith(".gz")
    np.testing.assert_array_equal(x, ref["test"][0])
    np.testing.assert_array_equal(y, ref["test"][1])
    with pytest.raises(DataError, match="t10k-images"):
        read_idx_split(tmp_path, "test")


# -- synth -------------------------------------------------------------------------------------
def test_synth_deterministic_balanced_and_shaped():
    x1, y1 = synth.make_split(503, seed=3, split_id=0)
    x2, y2 = synth.make_split(503, seed=3, split_id=0)
    x3, _ = synth.make_split(503, seed=4, split_id=0)
    assert x1.shape == (503, 28, 28) and x1.dtype == np.uint8 and y1.dtype == np.uint8
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    counts = np.bincount(y1, minlength=10)
    assert counts.min() == 50 and counts.max() == 51
    # strokes are drawn: every image has bright pixels well above the noise
    assert (x1.reshape(503, -1).max(axis=1) > 120).all()
    # class means differ: the classes carry signal
    means = np.stack([x1[y1 == k].mean(axis=0) for k in range(10)])
    assert np.abs(means[:, None] - means[None]).sum(axis=(2, 3)).max() > 1000


def test_synth_cli_writes_mnist_files(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--train", "120", "--test", "40",
                 "--seed", "1", "--gzip"]) == 0
    x, _y, paths = read_idx_split(tmp_path, "train")
    assert x.shape == (120, 28, 28) and paths[0].suffix == ".gz"
    xt, _, _ = read_idx_split(tmp_path, "test")
    assert xt.shape == (40, 28, 28)
    assert (tmp_path / "classes.txt").read_text().split() == synth.CLASS_NAMES
    # train data does not depend on the test size
    np.testing.assert_array_equal(x, synth.make_split(120, 1, 0)[0])


# -- writer ------------------------------------------------------------------------------------
def test_assign_rows_is_a_seeded_partition():
    parts = assign_rows(103, 4, seed=7)
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    for a, b in zip(parts, assign_rows(103, 4, seed=7)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(parts[0], assign_rows(103, 4, seed=8)[0])
    np.testing.assert_array_equal(np.concatenate(assign_rows(10, 3, None)), np.arange(10))
    with pytest.raises(DataError):
        assign_rows(3, 4, seed=0)


def test_parse_compression():
    assert parse_compression("gzip-1") == ("gzip", 1, False)
    assert parse_compression("gzip-4+shuffle") == ("gzip", 4, True)
    assert parse_compression("lzf") == ("lzf", None, False)
    assert parse_compression("none") == (None, None, False)
    with pytest.raises(ValueError):
        parse_compression("zstd")


@pytest.mark.parametrize("compress", [False, True])
def test_shard_idx_attributes_chunks_and_checksum(tmp_path, compress):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    ref = write_mnist_like(src, n_train=301, compress=compress)
    assert main(["shard", "idx", "--src", str(src), "--out", str(out), "--shards", "3",
                 "--class-names", "fashion-mnist"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "test-00000-of-00001.h5", "train-00000-of-00003.h5",
                     "train-00001-of-00003.h5", "train-00002-of-00003.h5"]
    seen_labels = []
    for i in range(3):
        p = out / shard_name("train", i, 3)
        with h5py.File(p, "r") as f:
            x, y = f["features"], f["labels"]
            assert x.dtype == np.float32 and y.dtype == np.int32
            assert x.chunks[0] == y.chunks[0] >= 1 and x.compression == "gzip"
            a = dict(f.attrs)
            assert a["schema"] == SCHEMA_NAME and a["schema_version"] == SCHEMA_VERSION
            assert a["split"] == "train" and a["shard_index"] == i and a["num_shards"] == 3
            assert tuple(a["feature_shape"]) == (28, 28) and a["feature_dtype"] == "float32"
            assert a["num_classes"] == 10 and a["num_examples"] == x.shape[0]
            assert "src" in a["source"] and a["shuffle_seed"] == 0
            xa, ya = x[()], y[()]
            assert 0.0 <= xa.min() and xa.max() <= 1.0
            want = hashlib.sha256(xa.astype("<f4").tobytes() + ya.astype("<i4").tobytes())
            assert a["checksum"] == "sha256:" + want.hexdigest()
            seen_labels.append(ya)
            assert len(np.unique(ya)) == 10  # the seeded shuffle gives each shard a class mix
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["feature_shape"] == [28, 28]
    assert m["num_classes"] == 10 and m["class_names"][0] == "T-shirt/top"
    assert m["normalization"].startswith("uint8 / 255")
    assert "shard idx" in m["command"] and m["shuffle_seed"] == 0
    assert [e["num_examples"] for e in m["splits"]["train"]] == [101, 100, 100]
    assert m["splits"]["test"][0]["num_examples"] == 70
    np.testing.assert_array_equal(np.sort(np.concatenate(seen_labels)), np.sort(ref["train"][1]))


def test_multi_task_sharding_then_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_mnist_like(src, n_train=200, n_test=50)
    one, many = tmp_path / "one", tmp_path / "many"
    assert main(["shard", "idx", "--src", str(src), "--out", str(one), "--shards", "5",
                 "--test-shards", "2"]) == 0
    common = ["shard", "idx", "--src", str(src), "--out", str(many), "--shards", "5",
              "--test-shards", "2", "--n-tasks", "3"]
    assert main([*common, "--task", "1"]) == 0
    assert sorted(p.name for p in many.iterdir()) == [
        "test-00001-of-00002.h5", "train-00001-of-00005.h5", "train-00004-of-00005.h5"]
    with pytest.raises(DataError, match="manifest.json"):
        open_dataset(many)
    with pytest.raises(DataError, match=r"train-00000-of-00005\.h5: missing"):
        build_manifest(many)
    assert main([*common, "--task", "0"]) == 0
    assert main([*common, "--task", "2"]) == 0
    assert not (many / "manifest.json").exists()
    assert main(["manifest", "--out", str(many), "--verify"]) == 0
    a = json.loads((one / "manifest.json").read_text())["splits"]
    b = json.loads((many / "manifest.json").read_text())["splits"]
    assert a == b  # same files, same counts, same checksums


def test_reshard_removes_stale_set_and_no_tmp_left(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_mnist_like(src, n_train=100, n_test=20)
    assert main(["shard", "idx", "--src", str(src), "--out", str(out), "--shards", "4"]) == 0
    assert main(["shard", "idx", "--src", str(src), "--out", str(out), "--shards", "2"]) == 0
    assert len(list(out.glob("train-*.h5"))) == 2 and not list(out.glob("*.tmp"))
    assert open_dataset(out).num_examples("train") == 100


def test_manifest_rejects_shards_with_different_shapes(tmp_path):
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(4, 3), (4, 2)]):
        x = rng.random((10, *shape), dtype=np.float32)
        write_split(tmp_path, "train", x, np.zeros(10, np.int32), num_shards=2, seed=None,
                    num_classes=2, source="t")
        # keep one shard of each shape
        (tmp_path / shard_name("train", 1 - i, 2)).replace(tmp_path / f"keep{i}")
    (tmp_path / "keep0").replace(tmp_path / shard_name("train", 1, 2))
    (tmp_path / "keep1").replace(tmp_path / shard_name("train", 0, 2))
    with pytest.raises(DataError, match=r"train-00001-of-00002\.h5.*shape"):
        build_manifest(tmp_path)


def test_shard_cli_errors_exit_2(tmp_path, capsys):
    assert main(["shard", "idx", "--src", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--shards", "2"]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_check_cli_reads_everything(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    write_mnist_like(src, n_train=60, n_test=20)
    assert main(["shard", "idx", "--src", str(src), "--out", str(out), "--shards", "2"]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": {"shards": 2, "examples": 60},
                                 "test": {"shards": 1, "examples": 20}}
    (out / "train-00001-of-00002.h5").unlink()
    assert main(["check", str(out)]) == 2
    assert "train-00001-of-00002.h5: shard file" in capsys.readouterr().err
