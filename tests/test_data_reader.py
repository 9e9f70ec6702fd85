"""dbmpi.data: open_dataset validation, load, and the per-replica ShardReader stream."""

import json
import shutil

import h5py
import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.idx import IDX_FILES, write_idx
from data_tools.shards import build_manifest, write_split
from dbmpi.data import DataError, open_dataset, schema
from dbmpi.data.schema import shard_name

C = 7  # classes


def make_ids_dataset(path, n, num_shards, *, shape=(3,), dtype=np.float32, n_test=0, seed=5):
    """Features encode the example id (row i: all entries = i), labels = i % C."""
    ids = np.arange(n)
    x = np.broadcast_to(ids.reshape(-1, *([1] * len(shape))), (n, *shape)).astype(dtype)
    write_split(path, "train", x, (ids % C).astype(np.int32), num_shards=num_shards, seed=seed,
                num_classes=C, source="test ids")
    if n_test:
        t = np.arange(n_test)
        xt = np.broadcast_to(t.reshape(-1, *([1] * len(shape))), (n_test, *shape)).astype(dtype)
        write_split(path, "test", xt + 10**6, (t % C).astype(np.int32), num_shards=2, seed=None,
                    num_classes=C, source="test ids")
    build_manifest(path)
    return open_dataset(path)


def ids_of(x):
    return x.reshape(len(x), -1)[:, 0].astype(np.int64)


def stream(reader, n_batches):
    xs, ys = zip(*(reader.next_batch() for _ in range(n_batches)))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows so that shards have many blocks."""
    monkeypatch.setattr(schema, "CHUNK_ROWS", 16)


# -- open_dataset and load ---------------------------------------------------------------------
def test_open_dataset_attributes_and_load(tmp_path, small_chunks):
    ds = make_ids_dataset(tmp_path, 203, 4, n_test=51)
    assert ds.path == tmp_path and ds.feature_shape == (3,) and ds.num_classes == C
    assert ds.feature_dtype == np.float32 and ds.class_names is None
    assert [p.name for p in ds.splits["train"]] == [shard_name("train", i, 4) for i in range(4)]
    assert ds.num_examples("train") == 203 and ds.num_examples("test") == 51
    x, y = ds.load("test")  # the test split keeps its exact source order
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (51, 3)
    np.testing.assert_array_equal(ids_of(x), np.arange(51) + 10**6)
    np.testing.assert_array_equal(y, np.arange(51) % C)
    x, y = ds.load("train")  # as a multiset of (row, label) pairs
    order = np.argsort(ids_of(x))
    np.testing.assert_array_equal(ids_of(x)[order], np.arange(203))
    np.testing.assert_array_equal(y[order], np.arange(203) % C)
    x, y = ds.load("test", limit=30)
    np.testing.assert_array_equal(ids_of(x), np.arange(30) + 10**6)
    with pytest.raises(DataError, match="no split 'valid'"):
        ds.load("valid")


def test_open_dataset_from_idx_equals_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    ref = {}
    for split, n in (("train", 150), ("test", 40)):
        ref[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n, dtype=np.uint8))
        write_idx(src / (IDX_FILES[(split, "images")] + ".gz"), ref[split][0])
        write_idx(src / IDX_FILES[(split, "labels")], ref[split][1])
    assert main(["shard", "idx", "--src", str(src), "--out", str(tmp_path / "o"),
                 "--shards", "2", "--class-names", "mnist"]) == 0
    ds = open_dataset(tmp_path / "o", verify=True)
    assert ds.feature_shape == (28, 28) and ds.class_names == [str(d) for d in range(10)]
    x, y = ds.load("test")
    np.testing.assert_array_equal(x, ref["test"][0].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, ref["test"][1])
    x, y = ds.load("train")
    want = {(r.tobytes(), int(lab)) for r, lab in
            zip(ref["train"][0].astype(np.float32) / np.float32(255), ref["train"][1])}
    assert {(r.tobytes(), int(lab)) for r, lab in zip(x, y)} == want
    with ds.reader(batch_size=32, num_replicas=2, replica=1) as rd:
        xb, yb = rd.next_batch()
        assert xb.shape == (32, 28, 28) and xb.dtype == np.float32 and xb.flags.c_contiguous
        assert yb.shape == (32,) and yb.dtype == np.int64


def test_int_features_keep_their_dtype(tmp_path):
    ds = make_ids_dataset(tmp_path, 50, 2, shape=(5,), dtype=np.int64)
    assert ds.feature_dtype == np.int64
    x, _ = ds.reader(batch_size=8).next_batch()
    assert x.dtype == np.int64 and x.shape == (8, 5)


# -- the reader stream -------------------------------------------------------------------------
@pytest.mark.parametrize("R,shards,n,batch,buffer", [
    (1, 1, 37, 5, 0),
    (1, 3, 100, 7, 20),
    (2, 4, 203, 10, 40),
    (3, 5, 211, 13, 1000),  # buffer larger than the data
    (4, 4, 130, 32, 16),  # batch larger than a replica's shard
    (2, 7, 150, 1, 3),
])
def test_each_example_once_per_epoch_and_replicas_disjoint(tmp_path, small_chunks, R, shards,
                                                           n, batch, buffer):
    ds = make_ids_dataset(tmp_path, n, shards)
    epochs = 3
    seen = []
    for r in range(R):
        with ds.reader("train", replica=r, num_replicas=R, batch_size=batch,
                       shuffle_buffer=buffer, seed=11) as rd:
            n_r = rd.num_examples
            nb = -(-epochs * n_r // batch)
            x, y = stream(rd, nb)
            assert x.shape == (nb * batch, 3) and x.dtype == np.float32
            ids = ids_of(x)
            np.testing.assert_array_equal(y, ids % C)
            for e in range(epochs):
                ep = np.sort(ids[e * n_r:(e + 1) * n_r])
                assert len(np.unique(ep)) == n_r
                if e == 0:
                    mine = ep
                np.testing.assert_array_equal(ep, mine)
            if buffer and n_r > 2:
                assert not np.array_equal(ids[:n_r], ids[n_r:2 * n_r])  # reshuffled per epoch
            assert rd.epoch == nb * batch // n_r
            assert rd.epochs_done == pytest.approx(nb * batch / n_r)
        seen.append(mine)
    all_ids = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(n))  # disjoint, complete


def test_replica_gets_shards_i_mod_R(tmp_path):
    ds = make_ids_dataset(tmp_path, 60, 6)
    rd = ds.reader(replica=1, num_replicas=4)
    assert [p.name for p in rd.paths] == [shard_name("train", 1, 6), shard_name("train", 5, 6)]


def test_no_shuffle_is_file_order(tmp_path, small_chunks):
    ds = make_ids_dataset(tmp_path, 40, 2)
    with ds.reader(batch_size=8, shuffle_buffer=0) as rd:
        x, _ = stream(rd, 5)
    ref, _ = ds.load("train")
    np.testing.assert_array_equal(x, ref)


def test_same_seed_same_stream_other_seed_differs(tmp_path, small_chunks):
    ds = make_ids_dataset(tmp_path, 300, 3)
    kw = {"batch_size": 17, "shuffle_buffer": 50, "num_replicas": 1}
    a = stream(ds.reader(seed=3, **kw), 40)[0]
    b = stream(ds.reader(seed=3, **kw), 40)[0]
    c = stream(ds.reader(seed=4, **kw), 40)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("skip", [0, 3, 17, 18, 40])
def test_restore_resumes_the_same_stream(tmp_path, small_chunks, skip):
    ds = make_ids_dataset(tmp_path, 180, 4)
    kw = {"replica": 1, "num_replicas": 2, "batch_size": 7, "shuffle_buffer": 30, "seed": 9}
    with ds.reader(**kw) as rd:
        stream(rd, skip) if skip else None
        state = rd.state()
        assert all(isinstance(v, int) for v in state.values())
        json.dumps(state)
        want = stream(rd, 30)
    with ds.reader(**kw) as rd2:
        stream(rd2, 5)  # restore works from any point, not just a fresh reader
        rd2.restore(state)
        assert rd2.epoch == state["epoch"] and rd2.position == state["position"]
        got = stream(rd2, 30)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    bad = dict(kw, seed=10)
    with pytest.raises(DataError, match="seed"):
        ds.reader(**bad).restore(state)


def test_close_and_reopen(tmp_path):
    ds = make_ids_dataset(tmp_path, 40, 2)
    rd = ds.reader(batch_size=4)
    rd.next_batch()
    assert any(s._f is not None for s in rd.shards)
    rd.close()
    assert all(s._f is None for s in rd.shards)
    rd.next_batch()  # files reopen lazily
    rd.close()


def test_fewer_shards_than_replicas(tmp_path):
    ds = make_ids_dataset(tmp_path, 40, 2)
    with pytest.raises(DataError, match=r"manifest\.json.*2 shards.*3 replicas.*--shards"):
        ds.reader(num_replicas=3, replica=0)


# -- bad inputs: each raises DataError naming the file -------------------------------------------
@pytest.fixture
def good(tmp_path):
    d = tmp_path / "ds"
    make_ids_dataset(d, 60, 3)
    return d


def shard(d, i=1):
    return d / shard_name("train", i, 3)


def edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def rewrite_shard(p, **changes):
    """Copy shard ``p`` with datasets/attrs replaced (``features``, ``labels``, ``attrs``,
    ``names``)."""
    with h5py.File(p, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    attrs.update(changes.pop("attrs", {}))
    data.update({k: v for k, v in changes.items() if k in ("features", "labels")})
    names = changes.get("names", {})
    with h5py.File(p, "w") as f:
        for k, v in data.items():
            f.create_dataset(names.get(k, k), data=v)
        f.attrs.update(attrs)


def test_missing_directory_and_manifest(tmp_path, good):
    with pytest.raises(DataError, match=r"nope/manifest\.json: no such directory"):
        open_dataset(tmp_path / "nope")
    (good / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"ds/manifest\.json: manifest\.json not found.*data_tools"):
        open_dataset(good)


def test_manifest_invalid_json(good):
    (good / "manifest.json").write_text('{"schema": ')
    with pytest.raises(DataError, match=r"manifest\.json: invalid JSON"):
        open_dataset(good)


def test_manifest_unknown_schema_version(good):
    edit_manifest(good, lambda m: m.update(schema_version=2))
    with pytest.raises(DataError, match=r"manifest\.json: field 'schema_version' is 2"):
        open_dataset(good)


def test_shard_unknown_schema_version(good):
    rewrite_shard(shard(good), attrs={"schema_version": 7})
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: attribute 'schema_version'"):
        open_dataset(good)


def test_missing_shard_file(good):
    shard(good, 2).unlink()
    with pytest.raises(DataError, match=r"train-00002-of-00003\.h5: shard file .* missing"):
        open_dataset(good)


def test_truncated_shard(good):
    p = shard(good)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: not a readable HDF5"):
        open_dataset(good)


def test_garbage_shard(good):
    shard(good, 0).write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(DataError, match=r"train-00000-of-00003\.h5: not a readable HDF5"):
        open_dataset(good)


def test_wrong_dataset_name(good):
    rewrite_shard(shard(good), names={"labels": "label"})
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: dataset 'labels' not found"):
        open_dataset(good)


def test_float_labels(good):
    with h5py.File(shard(good), "r") as f:
        y = f["labels"][()]
    rewrite_shard(shard(good), labels=y.astype(np.float32))
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: dataset 'labels' has dtype "
                                        r"float32, expected an integer type.*data_tools shard"):
        open_dataset(good)


def test_float64_features(good):
    with h5py.File(shard(good), "r") as f:
        x = f["features"][()]
    rewrite_shard(shard(good), features=x.astype(np.float64), attrs={"feature_dtype": "float64"})
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: dataset 'features' has dtype"):
        open_dataset(good)


def test_feature_shape_differs_between_shards(good):
    with h5py.File(shard(good, 2), "r") as f:
        x = f["features"][()]
    rewrite_shard(shard(good, 2), features=x[:, :2].copy(), attrs={"feature_shape": [2]})
    with pytest.raises(DataError, match=r"train-00002-of-00003\.h5: dataset 'features' has "
                                        r"per-example shape \(2,\) but the manifest says \(3,\)"):
        open_dataset(good)


def test_empty_shard(good):
    with h5py.File(shard(good), "r") as f:
        x, y = f["features"][()], f["labels"][()]
    rewrite_shard(shard(good), features=x[:0], labels=y[:0], attrs={"num_examples": 0})
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: empty shard"):
        open_dataset(good)


def test_count_differs_from_manifest(good):
    edit_manifest(good, lambda m: m["splits"]["train"][0].update(num_examples=999))
    with pytest.raises(DataError, match=r"train-00000-of-00003\.h5: holds 20 examples but the "
                                        r"manifest says 999"):
        open_dataset(good)


def test_checksum_attribute_differs_from_manifest(good, tmp_path):
    other = tmp_path / "other"
    make_ids_dataset(other, 60, 3, seed=99)  # same shapes, other content
    shutil.copy(shard(other), shard(good))
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: attribute 'checksum'"):
        open_dataset(good)


def test_checksum_mismatch_when_verifying(good):
    with h5py.File(shard(good), "r+") as f:
        f["features"][3, 0] += 0.5  # still valid data, only the checksum can tell
    open_dataset(good)  # the cheap checks pass
    with pytest.raises(DataError, match=r"train-00001-of-00003\.h5: checksum of the data"):
        open_dataset(good, verify=True)


def test_label_out_of_range_named_at_read(good):
    with h5py.File(shard(good, 0), "r+") as f:
        f["labels"][5] = C
    ds = open_dataset(good)  # up-front checks do not read data
    with pytest.raises(DataError, match=r"train-00000-of-00003\.h5: row 5 of dataset 'labels' "
                                        r"is 7, outside \[0, 7\)"):
        ds.load("train")
    with pytest.raises(DataError, match=r"train-00000-of-00003\.h5: row 5"):
        stream(ds.reader(batch_size=8), 10)


def test_nan_feature_named_at_read(good):
    with h5py.File(shard(good, 2), "r+") as f:
        f["features"][11, 1] = np.nan
    ds = open_dataset(good)
    with pytest.raises(DataError, match=r"train-00002-of-00003\.h5: row 11 of dataset "
                                        r"'features' contains NaN or Inf"):
        stream(ds.reader(batch_size=8, replica=0, num_replicas=1), 10)


def test_dataerror_is_one_line_valueerror(good):
    (good / "manifest.json").unlink()
    with pytest.raises(ValueError) as e:
        open_dataset(good)
    assert "\n" not in str(e.value)
