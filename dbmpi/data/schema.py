"""The dbmpi shard format, schema version 1: the one definition shared by writer and reader.

A data set is a directory holding HDF5 shard files and a ``manifest.json``.

Shard files
    ``{split}-{index:05d}-of-{num_shards:05d}.h5`` (e.g. ``train-00001-of-00004.h5``), one per
    shard; splits are named freely (``train``, ``test``, ...). Each file holds two datasets:

    ``features``  shape ``(N, *feature_shape)``, dtype float32 (int32/int64 allowed for id
                  features such as text context windows)
    ``labels``    shape ``(N,)``, dtype int32 or int64, values in ``[0, num_classes)``
    ``groups``    optional, shape ``(N,)``, dtype int32 or int64: which group (e.g. which
                  recording) each example belongs to, for decisions over a group such as
                  ``python -m dbmpi eval`` makes on utterances. Shards without it are
                  unchanged, so this stays schema version 1 (a reader that ignores it still
                  reads every shard); ``Dataset.load(split, with_groups=True)`` returns it.

    Both are chunked along the first axis (``chunk_rows()``: 2,048 rows unless that exceeds
    8 MiB; the same for both) and compressed (gzip level 1 by default, see
    ``DEFAULT_COMPRESSION``). ``N >= 1``. Root attributes:

    ``schema="dbmpi.shard"``, ``schema_version=1``, ``split``, ``shard_index``, ``num_shards``,
    ``feature_shape`` (int array), ``feature_dtype`` (numpy name), ``num_classes``,
    ``num_examples`` (= N), ``checksum``, ``source`` (free text: where the data came from),
    and the provenance ``normalization``, ``class_names`` (JSON list or ``"null"``),
    ``shuffle_seed`` and ``command`` (the command line that wrote the file).

Checksum
    ``"sha256:" + hexdigest`` of the raw bytes of ``features`` in C order, little-endian,
    followed by the raw bytes of ``labels`` (little-endian, as stored), then those of
    ``groups`` if the shard has them. It covers content, not
    the HDF5 container, so it survives re-compression. ``checksum_arrays`` computes it.

manifest.json
    Written last, atomically, by ``python -m data_tools shard`` (single task) or
    ``python -m data_tools manifest`` (after a multi-task run). A manifest therefore never
    points at a partial shard. Keys: ``schema``, ``schema_version``, ``feature_shape`` (list),
    ``feature_dtype``, ``label_dtype``, ``num_classes``, ``class_names`` (list or null),
    ``normalization``, ``shuffle_seed``, ``checksum_algorithm``, ``source``, ``command``,
    ``created_at``, and ``splits``: ``{split: [{"file", "num_examples", "checksum"}, ...]}``
    in shard-index order.

Writes are atomic: a shard is written as ``name.h5.tmp`` and renamed with ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DbmpiError

SCHEMA_NAME = "dbmpi.shard"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURES = "features"
LABELS = "labels"
GROUPS = "groups"  # optional
CHECKSUM_ALGORITHM = "sha256"

FEATURE_DTYPES = ("float32", "int32", "int64")
LABEL_DTYPES = ("int32", "int64")

#: Compression of both datasets: (filter, level, byte-shuffle). gzip level 1 without the
#: shuffle filter: on Fashion-MNIST it reads as fast as lzf with 26% smaller files, and gzip is
#: in every HDF5 build (lzf is h5py-only). Measurements in data_tools/shards.py.
DEFAULT_COMPRESSION = ("gzip", 1, False)
#: Rows per chunk, unless a chunk of features would exceed MAX_CHUNK_BYTES.
CHUNK_ROWS = 2048
MAX_CHUNK_BYTES = 8 << 20

#: Root attributes every shard must carry.
REQUIRED_ATTRS = (
    "schema",
    "schema_version",
    "split",
    "shard_index",
    "num_shards",
    "feature_shape",
    "feature_dtype",
    "num_classes",
    "num_examples",
    "checksum",
    "source",
)

RESHARD_FIX = "re-create the shards with `python -m data_tools shard ...`"
#: Attributes that every shard of a split shares, as one command wrote them all: a shard copied
#: in from another data set passed every other check (issue 19). ``command`` is compared
#: without its ``--task N``, the one thing that differs between the tasks of one run.
PROVENANCE = ("source", "command", "shuffle_seed", "normalization", "class_names")
_TASK_RE = re.compile(r" --task[= ]\S+")
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.h5$")


class DataError(DbmpiError, ValueError):
    """Bad or inconsistent data on disk. The message is one line: file, field, and the fix."""


def fail(path: str | Path, what: str, fix: str = RESHARD_FIX) -> DataError:
    """Build the one-line DataError ``"{path}: {what}; {fix}"`` (return it, caller raises)."""
    msg = f"{path}: {what}"
    if fix:
        msg += f"; {fix}"
    return DataError(msg)


def shard_name(split: str, index: int, num_shards: int) -> str:
    """File name of shard ``index`` of ``num_shards`` in ``split``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.h5"


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Inverse of ``shard_name``: ``(split, index, num_shards)`` or None."""
    m = _SHARD_RE.match(name)
    if m is None:
        return None
    return m["split"], int(m["index"]), int(m["total"])


def chunk_rows(feature_shape: Iterable[int], itemsize: int, num_examples: int) -> int:
    """Rows per chunk: CHUNK_ROWS, fewer for big examples (chunk <= MAX_CHUNK_BYTES), <= N."""
    row_bytes = max(1, int(np.prod(tuple(feature_shape), dtype=np.int64)) * itemsize)
    rows = min(CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes)
    return max(1, min(rows, num_examples))


def _le_bytes(a: np.ndarray) -> memoryview:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B")


def checksum_arrays(features: Any, labels: Any, block_rows: int = 8192,
                    groups: Any = None) -> str:
    """``"sha256:<hex>"`` of features', labels' (and groups', if given) little-endian C-order
    bytes.

    The arrays may be numpy arrays or h5py datasets (read block by block).
    """
    h = hashlib.sha256()
    n = features.shape[0]
    for a in range(0, n, block_rows):
        h.update(_le_bytes(np.asarray(features[a : a + block_rows])))
    for a in range(0, labels.shape[0], block_rows * 64):
        h.update(_le_bytes(np.asarray(labels[a : a + block_rows * 64])))
    if groups is not None:
        for a in range(0, groups.shape[0], block_rows * 64):
            h.update(_le_bytes(np.asarray(groups[a : a + block_rows * 64])))
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def attr_str(v: Any) -> str:
    """h5py may hand back bytes or numpy strings for string attributes."""
    if isinstance(v, bytes):
        return v.decode()
    return str(v)


def validate_manifest(m: Any, path: Path) -> dict:
    """Check the manifest's structure; return it. Raises DataError naming the field."""
    fix = f"re-create it with `python -m data_tools manifest --out {path.parent}`"
    if not isinstance(m, dict):
        raise fail(path, "manifest is not a JSON object", fix)
    if m.get("schema") != SCHEMA_NAME:
        raise fail(path, f"field 'schema' is {m.get('schema')!r}, expected {SCHEMA_NAME!r}", fix)
    ver = m.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise fail(
            path,
            f"field 'schema_version' is {ver!r}, this dbmpi reads version {SCHEMA_VERSION}",
            RESHARD_FIX + " from this dbmpi version",
        )
    shape = m.get("feature_shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise fail(path, f"field 'feature_shape' is {shape!r}, "
                   "expected a list of positive ints", fix)
    if m.get("feature_dtype") not in FEATURE_DTYPES:
        raise fail(path, f"field 'feature_dtype' is {m.get('feature_dtype')!r}, "
                   f"expected one of {FEATURE_DTYPES}", fix)
    nc = m.get("num_classes")
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise fail(path, f"field 'num_classes' is {nc!r}, expected a positive int", fix)
    names = m.get("class_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != nc
        or not all(isinstance(s, str) for s in names)
    ):
        raise fail(path, f"field 'class_names' must be null or a list of {nc} strings", fix)
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise fail(path, "field 'splits' is missing or empty", fix)
    for split, entries in splits.items():
        if not isinstance(entries, list) or not entries:
            raise fail(path, f"field 'splits.{split}' must be a non-empty list of shards", fix)
        for i, e in enumerate(entries):
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("file"), str)
                or not isinstance(e.get("num_examples"), int)
                or not isinstance(e.get("checksum"), str)
            ):
                raise fail(path, f"field 'splits.{split}[{i}]' needs 'file' (str), "
                           "'num_examples' (int) and 'checksum' (str)", fix)
            if Path(e["file"]).name != e["file"]:
                raise fail(path, f"field 'splits.{split}[{i}].file' must be a bare file name", fix)
    return m


def read_manifest(directory: str | Path) -> dict:
    """Load and validate ``directory/manifest.json``."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        what = "no such directory" if not directory.is_dir() else "manifest.json not found"
        raise fail(path, what, "create the data set with `python -m data_tools shard ...` "
                   "(or `python -m data_tools manifest --out DIR` after a multi-task run)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail(path, f"invalid JSON ({e})",
                   f"re-create it with `python -m data_tools manifest --out {directory}`") from e
    return validate_manifest(m, path)


def check_shard(
    f: Any,
    path: str | Path,
    *,
    split: str | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    feature_shape: tuple[int, ...] | None = None,
    feature_dtype: str | None = None,
    num_classes: int | None = None,
    num_examples: int | None = None,
    checksum: str | None = None,
    expected_from: str = "the manifest",
) -> dict:
    """Check an open shard (h5py.File) against schema v1 and the expected values given.

    Cheap: reads attributes, dtypes and shapes only. Returns the root attributes as a dict of
    plain Python values. Raises DataError naming ``path`` and the field.
    """
    attrs = dict(f.attrs)
    if "schema" not in attrs or attr_str(attrs["schema"]) != SCHEMA_NAME:
        raise fail(path, f"attribute 'schema' is {attrs.get('schema')!r}, expected {SCHEMA_NAME!r} "
                   "(not a dbmpi shard)")
    ver = attrs.get("schema_version")
    if ver is None or int(ver) != SCHEMA_VERSION:
        raise fail(path, f"attribute 'schema_version' is {ver!r}, this dbmpi reads version "
                   f"{SCHEMA_VERSION}")
    for key in REQUIRED_ATTRS:
        if key not in attrs:
            raise fail(path, f"attribute {key!r} is missing")
    out = {
        "split": attr_str(attrs["split"]),
        "shard_index": int(attrs["shard_index"]),
        "num_shards": int(attrs["num_shards"]),
        "feature_shape": tuple(int(d) for d in np.atleast_1d(attrs["feature_shape"]))
        if np.size(attrs["feature_shape"]) else (),
        "feature_dtype": attr_str(attrs["feature_dtype"]),
        "num_classes": int(attrs["num_classes"]),
        "num_examples": int(attrs["num_examples"]),
        "checksum": attr_str(attrs["checksum"]),
        "source": attr_str(attrs["source"]),
    }
    for key in ("normalization", "class_names", "command"):
        out[key] = attr_str(attrs[key]) if key in attrs else None
    out["shuffle_seed"] = int(attrs["shuffle_seed"]) if "shuffle_seed" in attrs else None

    for key, want in (("split", split), ("shard_index", shard_index), ("num_shards", num_shards)):
        if want is not None and out[key] != want:
            raise fail(path, f"attribute {key!r} is {out[key]!r} but the file name says {want!r}")
    for name in (FEATURES, LABELS):
        if name not in f or not hasattr(f[name], "dtype"):
            raise fail(path, f"dataset {name!r} not found (file has {sorted(f.keys())})")
    x, y = f[FEATURES], f[LABELS]
    if y.dtype.kind not in "iu" or y.dtype.name not in LABEL_DTYPES:
        raise fail(path, f"dataset 'labels' has dtype {y.dtype}, expected an integer type "
                   f"({' or '.join(LABEL_DTYPES)})")
    if x.dtype.name not in FEATURE_DTYPES:
        raise fail(path, f"dataset 'features' has dtype {x.dtype}, expected one of "
                   f"{', '.join(FEATURE_DTYPES)}")
    if y.ndim != 1:
        raise fail(path, f"dataset 'labels' has shape {y.shape}, expected (N,)")
    if x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise fail(path, f"dataset 'features' has shape {x.shape} but 'labels' has {y.shape}; "
                   "the first dimensions must agree")
    if GROUPS in f:
        g = f[GROUPS]
        if not hasattr(g, "dtype") or g.dtype.name not in LABEL_DTYPES or g.shape != y.shape:
            raise fail(path, f"dataset 'groups' must be int32/int64 of shape {y.shape}, got "
                       f"{getattr(g, 'dtype', None)} {getattr(g, 'shape', None)}")
    n = int(y.shape[0])
    if n == 0:
        raise fail(path, "empty shard (0 examples)", RESHARD_FIX + " with fewer --shards")
    if out["num_examples"] != n:
        raise fail(path, f"attribute 'num_examples' is {out['num_examples']} but the datasets "
                   f"hold {n} rows")
    if tuple(x.shape[1:]) != out["feature_shape"]:
        raise fail(path, f"dataset 'features' has per-example shape {tuple(x.shape[1:])} but "
                   f"attribute 'feature_shape' says {out['feature_shape']}")
    if x.dtype.name != out["feature_dtype"]:
        raise fail(path, f"dataset 'features' has dtype {x.dtype} but attribute 'feature_dtype' "
                   f"says {out['feature_dtype']}")
    if out["num_classes"] < 1:
        raise fail(path, f"attribute 'num_classes' is {out['num_classes']}, expected >= 1")
    if feature_shape is not None and tuple(feature_shape) != out["feature_shape"]:
        raise fail(path, f"dataset 'features' has per-example shape {out['feature_shape']} but "
                   f"{expected_from} says {tuple(feature_shape)} (shards must agree)")
    if feature_dtype is not None and feature_dtype != out["feature_dtype"]:
        raise fail(path, f"dataset 'features' has dtype {out['feature_dtype']} but "
                   f"{expected_from} says {feature_dtype} (shards must agree)")
    if num_classes is not None and num_classes != out["num_classes"]:
        raise fail(path, f"attribute 'num_classes' is {out['num_classes']} but {expected_from} "
                   f"says {num_classes}")
    if num_examples is not None and num_examples != n:
        raise fail(path, f"holds {n} examples but {expected_from} says {num_examples}")
    if checksum is not None and checksum != out["checksum"]:
        raise fail(path, f"attribute 'checksum' is {out['checksum']} but {expected_from} says "
                   f"{checksum} (the file was replaced after the manifest was written)")
    return out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "...'"


def check_same_origin(info: dict, path: Path, ref: dict, ref_path: Path) -> None:
    """Raise DataError if shard ``path`` (attributes ``info``, from ``check_shard``) was not
    written by the same command as ``ref_path`` of the same split: naming both and the key."""
    for key in PROVENANCE:
        a, b = info.get(key), ref.get(key)
        if key == "command" and a and b:
            a, b = _TASK_RE.sub("", a), _TASK_RE.sub("", b)
        if a != b:
            raise fail(path, f"attribute {key!r} is {_short(info.get(key))} but {ref_path.name} "
                       f"of the same split has {_short(ref.get(key))} (a shard of another data "
                       f"set?)", f"remove it, or {RESHARD_FIX}")
