"""``python -m data_tools shard images``: PNG/JPEG folders and idx files to shards, random
patches, ZCA whitening, and the one-line errors of bad input. Images are made here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from data_tools.idx import write_idx
from data_tools.images import read_whitening
from dbmpi.data import open_dataset


def _shard(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "data_tools", "shard", "images", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _png_folder(root, n_per_class=6, size=(6, 5), classes=("cat", "dog"), mode="L", seed=0):
    """Random images saved as PNG; returns {(class, index): uint8 array}."""
    rng = np.random.default_rng(seed)
    made = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = size if mode == "L" else (*size, 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode=mode).save(root / c / f"img{i:02d}.png")
            made[(c, i)] = a
    return made


def _all(ds):
    xs, ys = zip(*(ds.load(s) for s in ("train", "test")))
    return np.concatenate(xs), np.concatenate(ys)


def test_png_folder_becomes_shards_with_exact_pixels(tmp_path):
    made = _png_folder(tmp_path / "src")
    _shard("--src", tmp_path / "src", "--out", tmp_path / "out", "--shards", 2,
           "--test-fraction", 0.25)
    ds = open_dataset(tmp_path / "out")
    assert ds.feature_shape == (6, 5) and ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"]
    assert ds.num_examples("train") == 9 and ds.num_examples("test") == 3
    x, y = _all(ds)
    # every stored image is exactly one source PNG / 255 with its class as label
    expected = {a.astype(np.float32).tobytes(): ["cat", "dog"].index(c)
                for (c, _), a in made.items()}
    got = {}
    for xi, yi in zip(x, y):
        key = (xi * 255).round().astype(np.float32).tobytes()
        assert np.array_equal(xi, (xi * 255).round() / 255)
        got[key] = int(yi)
    assert got == expected
    info = json.loads((tmp_path / "out" / "images.json").read_text())
    assert info["schema"] == "dbmpi.images" and info["schema_version"] == 1
    assert info["num_train"] == 9 and info["num_test"] == 3


def test_rgb_folder_with_train_test_split_and_resize(tmp_path):
    _png_folder(tmp_path / "src" / "train", 3, (8, 8), mode="RGB")
    _png_folder(tmp_path / "src" / "test", 2, (10, 12), mode="RGB", seed=1)
    p = _shard("--src", tmp_path / "src", "--out", tmp_path / "out", "--shards", 1, check=False)
    assert p.returncode == 2 and "--size" in p.stderr and ".png" in p.stderr
    jpg = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(jpg, mode="RGB").save(tmp_path / "src" / "train" / "dog" / "extra.JPG")
    _shard("--src", tmp_path / "src", "--out", tmp_path / "out", "--shards", 1, "--size", "8x8")
    ds = open_dataset(tmp_path / "out")
    assert ds.feature_shape == (8, 8, 3)
    assert ds.num_examples("train") == 7 and ds.num_examples("test") == 4  # JPEG read too
    x, _ = ds.load("train")
    with Image.open(tmp_path / "src" / "train" / "cat" / "img00.png") as im:
        a = np.asarray(im, np.float32) / 255
    assert any(np.array_equal(a, xi) for xi in x)


def test_idx_patches_are_windows_of_their_images(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "idx"
    src.mkdir()
    imgs = {"train": rng.integers(0, 256, (5, 9, 9), dtype=np.uint8),
            "t10k": rng.integers(0, 256, (3, 9, 9), dtype=np.uint8)}
    for stem, a in imgs.items():
        write_idx(src / f"{stem}-images-idx3-ubyte", a)
        write_idx(src / f"{stem}-labels-idx1-ubyte", np.arange(len(a), dtype=np.uint8) % 3)
    _shard("--src", src, "--out", tmp_path / "out", "--shards", 2, "--patch", 4,
           "--patches-per-image", 6)
    ds = open_dataset(tmp_path / "out")
    assert ds.feature_shape == (4, 4)
    assert ds.num_examples("train") == 30 and ds.num_examples("test") == 18
    for split, stem in (("train", "train"), ("test", "t10k")):
        x, y = ds.load(split)
        src_imgs = imgs[stem].astype(np.float32) / 255
        for xi, yi in zip(x, y):
            # the patch is a 4x4 window of an image of its label
            hits = [i for i in range(len(src_imgs)) if i % 3 == yi and any(
                np.array_equal(src_imgs[i, r:r + 4, c:c + 4], xi)
                for r in range(6) for c in range(6))]
            assert hits, f"a {split} patch is no window of any image of class {yi}"


def test_zca_whitening_matches_numpy_and_is_stored(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "idx"
    src.mkdir()
    base = rng.integers(0, 256, (200, 4, 4)).astype(np.float64)
    train = np.clip(base + base.mean(axis=2, keepdims=True), 0, 255).astype(np.uint8)
    test = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    write_idx(src / "train-images-idx3-ubyte", train)
    write_idx(src / "train-labels-idx1-ubyte", np.zeros(200, np.uint8))
    write_idx(src / "t10k-images-idx3-ubyte", test)
    write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(20, np.uint8))
    eps = 0.01
    _shard("--src", src, "--out", tmp_path / "out", "--shards", 1, "--whiten", "zca",
           "--whiten-eps", eps)
    ds = open_dataset(tmp_path / "out")
    # independent reference: the SVD of the centred training data
    X = train.reshape(200, -1) / 255.0
    mu = X.mean(0)
    _, S, Vt = np.linalg.svd(X - mu, full_matrices=False)
    s = S ** 2 / 200
    M = Vt.T @ np.diag(1 / np.sqrt(s + eps)) @ Vt
    x_test, _ = ds.load("test")
    np.testing.assert_allclose(x_test.reshape(20, -1), (test.reshape(20, -1) / 255.0 - mu) @ M,
                               rtol=1e-4, atol=1e-4)
    x_train, _ = ds.load("train")
    cov = np.cov(x_train.reshape(len(x_train), -1).T, bias=True)
    np.testing.assert_allclose(cov, Vt.T @ np.diag(s / (s + eps)) @ Vt, atol=1e-3)
    w = read_whitening(tmp_path / "out" / "whitening.h5")
    np.testing.assert_allclose(w["matrix"], M, rtol=1e-5, atol=1e-6)  # float32 pixels
    assert w["eps"] == eps and w["feature_shape"] == (4, 4)
    info = json.loads((tmp_path / "out" / "images.json").read_text())
    assert info["whitening"] == {"method": "zca", "eps": eps, "file": "whitening.h5"}


def _one_error(p, *needles):
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()
             and not ln.startswith("[data_tools]")]  # progress lines
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_folder_without_images_is_one_line_error(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "notes.txt").write_text("no images here")
    p = _shard("--src", tmp_path / "src", "--out", tmp_path / "out", check=False)
    _one_error(p, str(tmp_path / "src"), "no PNG/JPEG images")


def test_corrupt_png_is_one_line_error_naming_it(tmp_path):
    _png_folder(tmp_path / "src", 3)
    bad = tmp_path / "src" / "dog" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated
    p = _shard("--src", tmp_path / "src", "--out", tmp_path / "out", "--shards", 1,
               "--test-fraction", 0.3, check=False)
    _one_error(p, str(bad), "not a readable image", "remove or replace")


@pytest.mark.parametrize("args,needle", [
    (["--patch", "7", "--patches-per-image", "2"], "--patch 7"),
    (["--patch", "3"], "--patches-per-image"),
    (["--patch", "-2", "--patches-per-image", "2"], "--patch -2"),
    (["--whiten-eps", "0", "--whiten", "zca"], "--whiten-eps"),
    (["--size", "8by8"], "--size"),
    (["--class-names", "a,b,c"], "--class-names"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, needle):
    _png_folder(tmp_path / "src", 3)
    p = _shard("--src", tmp_path / "src", "--out", tmp_path / "out", "--shards", 1, *args,
               check=False)
    _one_error(p, needle)
