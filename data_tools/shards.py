"""Write dbmpi shard files (schema v1, see ``dbmpi.data.schema``) and the manifest.

Train examples are spread over shards by a seeded permutation (each shard gets a class mix,
and rows inside a shard are in that random order, so any block of a shard is a mixed sample).
Other splits keep their source order: shard 0 holds the first rows, and concatenating the
shards gives the source back.

Multi-task sharding: every task computes the same assignment from ``(n, num_shards, seed)``
and writes only the shards with ``index % n_tasks == task``. With one task the manifest is
written at the end of ``python -m data_tools shard``; with several, run
``python -m data_tools manifest --out DIR`` once after all tasks have finished (it checks that
every shard file exists and is complete, then writes the manifest).

Compression. Measured on Fashion-MNIST (60,000 train images as float32, 4 shards, 2,048-row
chunks) with ``python -m data_tools shard idx ... --compression X`` and one epoch through
``ShardReader`` (batch 128, shuffle_buffer 8192), as CPU time because the machine was shared:

==================  ==========  ==================  ======================
--compression       train MB    shard command CPU   read, examples/CPU-s
==================  ==========  ==================  ======================
none                206         1.3 s               620,000
lzf                 59          1.6 s               125,000
lzf+shuffle         102         2.0 s               87,000
gzip-1 (default)    43          2.2 s               125,000
gzip-1+shuffle      83          3.5 s               71,000
gzip-4              40          2.9 s               122,000
==================  ==========  ==================  ======================

gzip-1 reads as fast as lzf with files 26% smaller, and gzip is in every HDF5 build (lzf is
h5py's own filter, which h5dump and non-h5py readers lack). gzip-4 saves 7% more for 30% more
write time. The byte-shuffle filter hurts here: the features take only 256 values k/255, so
unshuffled each 4-byte value is a repeated string that gzip codes compactly, while shuffled
each of its 4 byte planes carries the full entropy of k. 125,000 examples/s on one core is 20-50
times what a replica trains on; ``none`` is there for when CPU is scarce and disk is not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from dbmpi.data.schema import (
    CHECKSUM_ALGORITHM,
    DEFAULT_COMPRESSION,
    FEATURE_DTYPES,
    FEATURES,
    GROUPS,
    LABEL_DTYPES,
    LABELS,
    MANIFEST_NAME,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    DataError,
    check_same_origin,
    check_shard,
    checksum_arrays,
    chunk_rows,
    fail,
    parse_shard_name,
    shard_name,
)
from dbmpi.progress import LiveLine, live_wanted, work_line

Compression = tuple[str | None, int | None, bool]


def parse_compression(spec: str) -> Compression:
    """``"gzip-1"`` (the default), ``"gzip-N"``, ``"lzf"`` or ``"none"``; a ``+shuffle``
    suffix adds the HDF5 byte-shuffle filter (it made Fashion-MNIST files larger)."""
    s, shuffle = spec, False
    if s.endswith("+shuffle"):
        s, shuffle = s[: -len("+shuffle")], True
    if s == "none":
        return (None, None, shuffle)
    if s == "lzf":
        return ("lzf", None, shuffle)
    if s == "gzip" or s.startswith("gzip-"):
        if s.startswith("gzip-") and s[5:].isdigit():
            level = int(s[5:])
        else:
            level = 1 if s == "gzip" else -1
        if not 1 <= level <= 9:
            raise ValueError(f"--compression {spec}: gzip level must be 1..9")
        return ("gzip", level, shuffle)
    raise ValueError(f"--compression {spec}: expected gzip-N, lzf or none (optionally +shuffle)")


def assign_rows(n: int, num_shards: int, seed: int | None) -> list[np.ndarray]:
    """Row indices of each shard: a seeded permutation split evenly, or, with ``seed=None``,
    contiguous ranges in source order. Every task computes the same result."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if n < num_shards:
        raise DataError(f"{n} examples cannot fill {num_shards} shards; use --shards <= {n}")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return np.array_split(order, num_shards)


def write_shard(
    path: str | os.PathLike,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    split: str,
    shard_index: int,
    num_shards: int,
    num_classes: int,
    source: str,
    normalization: str = "",
    class_names: Sequence[str] | None = None,
    shuffle_seed: int | None = None,
    command: str = "",
    compression: Compression = DEFAULT_COMPRESSION,
    groups: np.ndarray | None = None,
) -> str:
    """Write one shard atomically (``path.tmp`` then ``os.replace``); return its checksum.

    ``groups`` (optional, int, shape (N,)) becomes the ``groups`` dataset."""
    path = Path(path)
    features = np.ascontiguousarray(features)
    labels = np.ascontiguousarray(labels)
    if features.dtype.name not in FEATURE_DTYPES:
        raise TypeError(f"features dtype {features.dtype} not in {FEATURE_DTYPES}")
    if labels.dtype.name not in LABEL_DTYPES:
        raise TypeError(f"labels dtype {labels.dtype} not in {LABEL_DTYPES}")
    n = labels.shape[0]
    if labels.ndim != 1 or features.shape[0] != n or n == 0:
        raise ValueError(f"{path}: need features (N, ...) and labels (N,), N >= 1; "
                         f"got {features.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside "
                        f"[0, {num_classes}); pass the right --num-classes")
    if features.dtype.kind == "f" and not np.isfinite(features).all():
        raise DataError(f"{path}: features contain NaN or Inf; clean the source data")
    if groups is not None:
        groups = np.ascontiguousarray(groups)
        if groups.dtype.name not in LABEL_DTYPES or groups.shape != labels.shape:
            raise ValueError(f"{path}: groups must be int32/int64 of shape {labels.shape}, "
                             f"got {groups.dtype} {groups.shape}")
    checksum = checksum_arrays(features, labels, groups=groups)
    rows = chunk_rows(features.shape[1:], features.dtype.itemsize, n)
    filt, level, shuffle = compression
    kw = {"compression": filt, "compression_opts": level} if filt else {}
    if shuffle:
        kw["shuffle"] = True
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset(FEATURES, data=features, chunks=(rows, *features.shape[1:]), **kw)
        f.create_dataset(LABELS, data=labels, chunks=(rows,), **kw)
        if groups is not None:
            f.create_dataset(GROUPS, data=groups, chunks=(rows,), **kw)
        a = f.attrs
        a["schema"] = SCHEMA_NAME
        a["schema_version"] = SCHEMA_VERSION
        a["split"] = split
        a["shard_index"] = shard_index
        a["num_shards"] = num_shards
        a["feature_shape"] = np.asarray(features.shape[1:], dtype=np.int64)
        a["feature_dtype"] = features.dtype.name
        a["num_classes"] = num_classes
        a["num_examples"] = n
        a["checksum"] = checksum
        a["source"] = source
        a["normalization"] = normalization
        a["class_names"] = json.dumps(list(class_names) if class_names is not None else None)
        a["shuffle_seed"] = -1 if shuffle_seed is None else shuffle_seed
        a["command"] = command
    os.replace(tmp, path)
    return checksum


def remove_stale(out: Path, split: str, num_shards: int) -> None:
    """Remove ``split`` shards of another ``-of-`` count and the manifest, so a crash during a
    re-shard can never leave a manifest (or a leftover set) pointing at mixed files."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for p in out.glob(f"{split}-*-of-*.h5"):
        parsed = parse_shard_name(p.name)
        if parsed and parsed[0] == split and parsed[2] != num_shards:
            p.unlink(missing_ok=True)


def write_split(
    out: str | os.PathLike,
    split: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_shards: int,
    seed: int | None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    task: int = 0,
    n_tasks: int = 1,
    log: Callable[[str], None] = lambda s: None,
    groups: np.ndarray | None = None,
    **attrs,
) -> list[Path]:
    """Write this task's shards of one split. ``transform`` maps a slice of the source
    features to the stored dtype (e.g. uint8 -> float32 / 255), shard by shard, so the whole
    split is never held in float32. Labels are stored as int32 unless they need int64."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out, split, num_shards)
    ldtype = np.int32 if labels.size == 0 or int(labels.max()) < 2**31 else np.int64
    written = []
    mine = [(i, rows) for i, rows in enumerate(assign_rows(labels.shape[0], num_shards, seed))
            if i % n_tasks == task]
    total = sum(len(rows) for _, rows in mine)
    live, t0, done = LiveLine(live_wanted()), time.monotonic(), 0  # a terminal only
    for k, (i, rows) in enumerate(mine, 1):
        x = features[rows]
        if transform is not None:
            x = transform(x)
        path = out / shard_name(split, i, num_shards)
        write_shard(path, x, labels[rows].astype(ldtype), split=split, shard_index=i,
                    num_shards=num_shards, shuffle_seed=seed,
                    groups=None if groups is None else groups[rows], **attrs)
        live.clear()
        log(f"wrote {path} ({len(rows)} examples)")
        written.append(path)
        done += len(rows)
        live.show(work_line(split, done, total, "examples", time.monotonic() - t0,
                            f"{k}/{len(mine)} shards"))
    live.clear()
    return written


def build_manifest(out: str | os.PathLike, verify: bool = False) -> dict:
    """Scan ``out`` for shard files, check every split is complete and consistent, and write
    ``manifest.json`` atomically. With ``verify`` the checksums are recomputed from the data."""
    out = Path(out)
    found: dict[str, dict[int, list[tuple[int, Path]]]] = {}
    for p in sorted(out.glob("*.h5")):
        parsed = parse_shard_name(p.name)
        if parsed is None:
            continue
        split, idx, total = parsed
        found.setdefault(split, {}).setdefault(total, []).append((idx, p))
    if not found:
        raise fail(out, "no shard files (*-NNNNN-of-NNNNN.h5) found",
                   "run `python -m data_tools shard ...` first")
    leftovers = sorted(out.glob("*.h5.tmp"))
    if leftovers:
        raise fail(leftovers[0], "unfinished shard write (a task crashed or is still running)",
                   "wait for all tasks, or re-run the task that writes it")
    splits: dict[str, list[dict]] = {}
    common: dict | None = None
    first: Path | None = None
    for split in sorted(found, key=lambda s: (s != "train", s)):
        if len(found[split]) > 1:
            raise fail(out, f"split {split!r} has shard sets of sizes {sorted(found[split])}",
                       "delete the stale set or re-run `python -m data_tools shard ...`")
        ((total, files),) = found[split].items()
        have = {i for i, _ in files}
        missing = sorted(set(range(total)) - have)
        if missing:
            raise fail(out / shard_name(split, missing[0], total), "missing shard file",
                       "wait for all --task runs to finish, or re-run the task that writes it")
        entries = []
        split_first: tuple[dict, Path] | None = None
        for idx, p in sorted(files):
            try:
                with h5py.File(p, "r") as f:
                    info = check_shard(
                        f, p, split=split, shard_index=idx, num_shards=total,
                        **({} if common is None else {k: common[k] for k in
                            ("feature_shape", "feature_dtype", "num_classes")}),
                        expected_from=f"{first.name if first else 'the first shard'}",
                    )
                    if verify:
                        got = checksum_arrays(f[FEATURES], f[LABELS], groups=f.get(GROUPS))
                        if got != info["checksum"]:
                            raise fail(p, f"checksum of the data is {got}, attribute says "
                                       f"{info['checksum']} (corrupt file)")
            except OSError as e:
                raise fail(p, f"not a readable HDF5 file ({e})") from e
            if split_first is None:
                split_first = info, p
            else:
                check_same_origin(info, p, *split_first)
            if common is None:
                common, first = info, p
            entries.append({"file": p.name, "num_examples": info["num_examples"],
                            "checksum": info["checksum"]})
        splits[split] = entries
    assert common is not None
    names = json.loads(common["class_names"]) if common["class_names"] else None
    seed = common["shuffle_seed"]
    manifest = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "feature_shape": list(common["feature_shape"]),
        "feature_dtype": common["feature_dtype"],
        "label_dtype": None,
        "num_classes": common["num_classes"],
        "class_names": names,
        "normalization": common["normalization"],
        "shuffle_seed": None if seed is None or seed < 0 else seed,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "source": common["source"],
        "command": common["command"],
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "splits": splits,
    }
    with h5py.File(out / splits[next(iter(splits))][0]["file"], "r") as f:
        manifest["label_dtype"] = f[LABELS].dtype.name
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python -m data_tools ARGS`` as typed (``argv`` defaults to ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m data_tools", *(shlex.quote(x) for x in args)])
