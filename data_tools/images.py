"""``python -m data_tools shard images``: image sets -> shards, with patches and ZCA whitening.

Sources (``--src``):

* MNIST-style idx files (the four ``train-``/``t10k-`` files, gzipped or not);
* a folder of PNG/JPEG images, one subfolder per class (``SRC/CLASS/*.png``), split into train
  and test by ``--test-fraction`` (seeded), or already split as ``SRC/train/CLASS/...`` and
  ``SRC/test/CLASS/...``. Images are read with Pillow, as grey (``(H, W)``) or RGB
  (``(H, W, 3)``) by ``--color`` (``auto``: grey when every image is), scaled to [0, 1], and all
  must have one size unless ``--size HxW`` resizes them (bilinear).

Options applied in this order, to both splits:

* ``--patch K --patches-per-image N``: N random K x K patches of every image (seeded; a patch
  keeps its image's label), for training on patches as Le et al. did.
* ``--whiten zca --whiten-eps E``: ZCA whitening with statistics of the training split:
  ``x' = (x - mean) U diag(1 / sqrt(s + E)) U^T`` where ``U diag(s) U^T`` is the covariance of the
  training features. The mean and matrix go to ``OUT/whitening.h5`` (schema ``dbmpi.whitening``
  v1) so a classifier or a picture can apply or undo them; ``OUT/images.json`` (schema
  ``dbmpi.images`` v1) records the source, the options and the counts.

Errors are one line naming the file or option and the fix (a folder without images, a corrupt
or truncated image, images of different sizes, a patch larger than the images).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np

from dbmpi.data.schema import DataError

from .idx import IDX_FILES, read_idx_split
from .shards import build_manifest, command_line, parse_compression, write_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
IMAGES_SCHEMA, IMAGES_VERSION = "dbmpi.images", 1
WHITENING_SCHEMA, WHITENING_VERSION = "dbmpi.whitening", 1
MAX_WHITEN_FEATURES = 8192


def _is_idx(src: Path) -> bool:
    return any((src / (stem + ext)).is_file() for stem in IDX_FILES.values() for ext in ("", ".gz"))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_folder(src: Path) -> dict[str, list[tuple[Path, str]]]:
    """``{"all": [(file, class name), ...]}`` or ``{"train": ..., "test": ...}`` when SRC is
    already split. Raises :class:`DataError` when no image is found."""
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --src must be a folder of class subfolders "
                        "with PNG/JPEG images, or hold MNIST-style idx files")
    layout = {}
    if (src / "train").is_dir() and (src / "test").is_dir():
        roots = {"train": src / "train", "test": src / "test"}
    else:
        roots = {"all": src}
    for split, root in roots.items():
        files = []
        for d in _class_dirs(root):
            files += [(p, d.name) for p in _image_files(d)]
        if not files:
            raise DataError(f"{root}: no PNG/JPEG images in class subfolders ({root}/CLASS/"
                            "*.png|jpg); put each class's images in a subfolder named after it")
        layout[split] = files
    return layout


def read_image(path: Path, color: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as float32 in [0, 1], ``(H, W)`` for grey, ``(H, W, 3)`` for RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if color == "gray" else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e}); remove or replace the file") \
            from None
    return a.astype(np.float32) / np.float32(255)


def _image_mode(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e}); remove or replace the file") \
            from None


def read_folder(files: list[tuple[Path, str]], classes: list[str], color: str,
                size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels (index in ``classes``) of ``files``; one size for all."""
    first = read_image(files[0][0], color, size)
    x = np.empty((len(files), *first.shape), np.float32)
    y = np.empty(len(files), np.int32)
    for i, (p, cls) in enumerate(files):
        a = first if i == 0 else read_image(p, color, size)
        if a.shape != first.shape:
            raise DataError(f"{p}: image of size {a.shape[1]}x{a.shape[0]}, but "
                            f"{files[0][0]} is {first.shape[1]}x{first.shape[0]}; pass "
                            f"--size HxW to resize all images")
        x[i] = a
        y[i] = classes.index(cls)
    return x, y


def parse_size(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    m = re.fullmatch(r"(\d+)x(\d+)", spec.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--size {spec!r}: expected HxW with positive integers, e.g. 32x32")
    return int(m.group(1)), int(m.group(2))


def extract_patches(x: np.ndarray, y: np.ndarray, k: int, per_image: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_image`` random ``k x k`` patches of every image: ``(patches, labels, corners)``
    with ``corners[i] = (image, row, col)`` of patch i (image-major order)."""
    n, H, W = x.shape[:3]
    rows = rng.integers(0, H - k + 1, size=(n, per_image))
    cols = rng.integers(0, W - k + 1, size=(n, per_image))
    out = np.empty((n * per_image, k, k, *x.shape[3:]), np.float32)
    corners = np.empty((n * per_image, 3), np.int64)
    t = 0
    for i in range(n):
        for j in range(per_image):
            r, c = rows[i, j], cols[i, j]
            out[t] = x[i, r:r + k, c:c + k]
            corners[t] = (i, r, c)
            t += 1
    return out, np.repeat(y, per_image), corners


def zca(x_train: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, matrix)`` of ZCA whitening from the training features (float64)."""
    X = x_train.reshape(x_train.shape[0], -1).astype(np.float64)
    mean = X.mean(axis=0)
    Xc = X - mean
    cov = Xc.T @ Xc / X.shape[0]
    s, U = np.linalg.eigh(cov)
    s = np.clip(s, 0, None)
    return mean, (U * (1.0 / np.sqrt(s + eps))) @ U.T


def apply_whitening(x: np.ndarray, mean: np.ndarray, matrix: np.ndarray,
                    batch: int = 8192) -> np.ndarray:
    shape = x.shape
    X = x.reshape(shape[0], -1)
    out = np.empty(X.shape, np.float32)
    for lo in range(0, X.shape[0], batch):
        out[lo:lo + batch] = (X[lo:lo + batch].astype(np.float64) - mean) @ matrix
    return out.reshape(shape)


def write_whitening(path: Path, mean: np.ndarray, matrix: np.ndarray, eps: float,
                    feature_shape) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("mean", data=mean)
        f.create_dataset("matrix", data=matrix)
        f.attrs["schema"] = WHITENING_SCHEMA
        f.attrs["schema_version"] = WHITENING_VERSION
        f.attrs["method"] = "zca"
        f.attrs["eps"] = float(eps)
        f.attrs["feature_shape"] = np.asarray(feature_shape, np.int64)
    os.replace(tmp, path)


def read_whitening(path: str | os.PathLike) -> dict:
    """``{"mean", "matrix", "eps", "feature_shape"}`` of a ``whitening.h5``."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != WHITENING_SCHEMA \
                    or int(f.attrs.get("schema_version", -1)) != WHITENING_VERSION:
                raise DataError(f"{path}: not a {WHITENING_SCHEMA} v{WHITENING_VERSION} file; "
                                "re-create it with `python -m data_tools shard images ... "
                                "--whiten zca`")
            return {"mean": f["mean"][...], "matrix": f["matrix"][...],
                    "eps": float(f.attrs["eps"]),
                    "feature_shape": tuple(int(v) for v in f.attrs["feature_shape"])}
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e}); re-create the shards") \
            from None


def build_images(src, out, *, shards: int = 4, test_shards: int = 1, seed: int = 0,
                 test_fraction: float = 0.1, color: str = "auto", size: str | None = None,
                 patch: int = 0, patches_per_image: int = 0, whiten: str = "none",
                 whiten_eps: float = 0.1, limit: int = 0, class_names=None, command: str = "",
                 compression=("gzip", 1, False), log=lambda s: None) -> dict:
    """Read, optionally patch and whiten, and write the shards, manifest and images.json."""
    src, out = Path(src), Path(out)
    if shards < 1 or test_shards < 1:
        raise ValueError(f"--shards and --test-shards must be >= 1, got {shards}, {test_shards}")
    if patch < 0 or patches_per_image < 0 or (patch > 0) != (patches_per_image > 0):
        raise ValueError(f"--patch {patch} --patches-per-image {patches_per_image}: give both, "
                         "each >= 1 (or neither)")
    if whiten not in ("none", "zca"):
        raise ValueError(f"--whiten {whiten!r}: expected zca or none")
    if not whiten_eps > 0:
        raise ValueError(f"--whiten-eps {whiten_eps}: must be > 0 (e.g. 0.1)")
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction {test_fraction}: must be in (0, 1)")
    if limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0 (0 = all)")
    if color not in ("auto", "gray", "rgb"):
        raise ValueError(f"--color {color!r}: expected auto, gray or rgb")
    rsize = parse_size(size)
    rng = np.random.default_rng(seed)
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if src.is_dir() and _is_idx(src):
        kind = "idx"
        for split in ("train", "test"):
            x, y, _ = read_idx_split(src, split)
            if limit:
                x, y = x[:limit], y[:limit]
            if x.ndim not in (3, 4):
                raise DataError(f"{src}: idx images of shape {x.shape[1:]}; expected (H, W) "
                                "or (H, W, C)")
            scale = np.float32(255) if x.dtype == np.uint8 else np.float32(1)
            data[split] = (x.astype(np.float32) / scale, y.astype(np.int32))
        names = class_names
        num_classes = max(int(data[s][1].max()) for s in data) + 1
        if names is not None and len(names) > num_classes:
            num_classes = len(names)  # classes absent from this data keep their names
        source = f"idx {src.resolve()}"
    else:
        kind = "folder"
        layout = list_folder(src)
        classes = sorted({c for files in layout.values() for _, c in files})
        if color == "auto":
            modes = {_image_mode(p) for files in layout.values() for p, _ in files}
            color = "gray" if modes <= set(GREY_MODES) else "rgb"
        if "all" in layout:
            files = layout["all"]
            order = rng.permutation(len(files))
            n_test = max(1, int(round(test_fraction * len(files))))
            if n_test >= len(files):
                raise DataError(f"{src}: {len(files)} images cannot make both a train and a "
                                "test split; add images or lower --test-fraction")
            split_files = {"test": [files[i] for i in sorted(order[:n_test])],
                           "train": [files[i] for i in sorted(order[n_test:])]}
        else:
            split_files = {s: layout[s] for s in ("train", "test")}
        for split in ("train", "test"):
            fl = split_files[split][:limit] if limit else split_files[split]
            data[split] = read_folder(fl, classes, color, rsize)
            log(f"read {len(fl)} {split} images of {data[split][0].shape[1:]}")
        a, b = data["train"][0].shape[1:], data["test"][0].shape[1:]
        if a != b:
            raise DataError(f"{split_files['test'][0][0]}: test images of size {b[1]}x{b[0]}, "
                            f"training images {a[1]}x{a[0]}; pass --size HxW to resize all "
                            "images")
        names = class_names or classes
        num_classes = len(classes)
        source = f"folder {src.resolve()} ({color})"
    if names is not None and len(names) != num_classes:
        raise ValueError(f"--class-names gives {len(names)} names but {src} has {num_classes} "
                         "classes: give one name per class")
    H, W = data["train"][0].shape[1:3]
    info: dict = {"schema": IMAGES_SCHEMA, "schema_version": IMAGES_VERSION, "source": source,
                  "kind": kind, "image_shape": list(data["train"][0].shape[1:]),
                  "patch": None, "whitening": None, "command": command}
    norm = "pixels / 255 in [0, 1]"
    if patch:
        if patch > min(H, W):
            raise ValueError(f"--patch {patch}: larger than the {H}x{W} images; use "
                             f"--patch <= {min(H, W)}")
        for split in ("train", "test"):
            x, y = data[split]
            px, py, _ = extract_patches(x, y, patch, patches_per_image, rng)
            data[split] = (px, py)
        info["patch"] = {"size": patch, "per_image": patches_per_image, "seed": seed}
        norm += f"; {patches_per_image} random {patch}x{patch} patches per image"
    if whiten == "zca":
        xtr = data["train"][0]
        d = int(np.prod(xtr.shape[1:]))
        if d > MAX_WHITEN_FEATURES:
            raise ValueError(f"--whiten zca: {d} features per example is more than "
                             f"{MAX_WHITEN_FEATURES} (a {d}x{d} matrix); use --patch or --size")
        mean, matrix = zca(xtr, whiten_eps)
        for split in ("train", "test"):
            x, y = data[split]
            data[split] = (apply_whitening(x, mean, matrix), y)
        out.mkdir(parents=True, exist_ok=True)
        write_whitening(out / "whitening.h5", mean, matrix, whiten_eps, xtr.shape[1:])
        info["whitening"] = {"method": "zca", "eps": whiten_eps, "file": "whitening.h5"}
        norm += f"; ZCA whitened (eps {whiten_eps}, whitening.h5)"
    common = {"num_classes": num_classes, "normalization": norm, "class_names": names,
              "command": command, "compression": compression, "log": log}
    for split, k, sd in (("train", shards, seed), ("test", test_shards, None)):
        x, y = data[split]
        write_split(out, split, x, y, num_shards=k, seed=sd, source=source, **common)
        info[f"num_{split}"] = len(y)
    build_manifest(out)
    tmp = out / "images.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "images.json")
    return info


def cmd_shard_images(a: argparse.Namespace) -> int:
    _log = a.log
    t0 = time.perf_counter()
    names = a.class_names_fn(a.class_names, Path(a.src)) if a.class_names else None
    info = build_images(a.src, a.out, shards=a.shards, test_shards=a.test_shards, seed=a.seed,
                        test_fraction=a.test_fraction, color=a.color, size=a.size,
                        patch=a.patch, patches_per_image=a.patches_per_image, whiten=a.whiten,
                        whiten_eps=a.whiten_eps, limit=a.limit, class_names=names,
                        command=command_line(a.argv),
                        compression=parse_compression(a.compression), log=_log)
    _log(f"{info['num_train']} train, {info['num_test']} test examples of "
         f"{info['image_shape'] if not info['patch'] else [info['patch']['size']] * 2}; wrote "
         f"{Path(a.out) / 'manifest.json'} in {time.perf_counter() - t0:.2f} s")
    return 0


def add_parser(fmt, log, class_names_fn) -> None:
    """Register ``shard images`` on the ``shard`` subcommand's subparsers; ``log`` prints a
    progress line, ``class_names_fn(spec, src)`` resolves ``--class-names``."""
    im = fmt.add_parser("images", help="idx files or PNG/JPEG class folders -> image shards, "
                        "with optional random patches and ZCA whitening (data_tools/images.py)")
    im.add_argument("--src", required=True,
                    help="idx directory, SRC/CLASS/*.png|jpg, or SRC/{train,test}/CLASS/...")
    im.add_argument("--out", required=True, help="output directory")
    im.add_argument("--shards", type=int, default=4, help="number of train shards (default 4)")
    im.add_argument("--test-shards", type=int, default=1, help="number of test shards (default 1)")
    im.add_argument("--seed", type=int, default=0,
                    help="seed of the train/test split, the patches and the shuffle (default 0)")
    im.add_argument("--test-fraction", type=float, default=0.1,
                    help="folder without train/test subfolders: fraction held out (default 0.1)")
    im.add_argument("--color", default="auto", choices=("auto", "gray", "rgb"),
                    help="read folder images as grey or RGB (default auto: grey if all are)")
    im.add_argument("--size", default=None,
                    help="resize folder images to HxW (e.g. 32x32; default: none, one size)")
    im.add_argument("--patch", type=int, default=0,
                    help="random K x K patches instead of images (default: 0 = whole images)")
    im.add_argument("--patches-per-image", type=int, default=0,
                    help="patches per image (default: 0; give it with --patch)")
    im.add_argument("--whiten", default="none", choices=("none", "zca"),
                    help="ZCA whitening with the training split's statistics (default none)")
    im.add_argument("--whiten-eps", type=float, default=0.1,
                    help="added to the covariance's eigenvalues (default 0.1)")
    im.add_argument("--limit", type=int, default=0,
                    help="first N images of each split (default 0 = all)")
    im.add_argument("--class-names", default=None,
                    help="comma list or a preset (fashion-mnist, mnist, synth); default: the "
                    "folder names, or none for idx")
    im.add_argument("--compression", default="gzip-1",
                    help="gzip-N, lzf or none, optionally +shuffle (default gzip-1)")
    im.set_defaults(func=cmd_shard_images, log=log, class_names_fn=class_names_fn)
