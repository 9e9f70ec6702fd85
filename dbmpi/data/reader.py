"""Open a sharded data set and stream batches from a replica's shards.

``open_dataset(path)`` checks the manifest and every shard's attributes, dtypes and shapes up
front and returns a ``Dataset``. ``Dataset.reader(...)`` gives replica ``r`` of ``R`` the
shards ``i`` with ``i % R == r`` and returns a ``ShardReader``, which yields full batches
forever, epoch after epoch.

The stream of a ``ShardReader`` is a pure function of ``(seed, num_replicas, replica,
shuffle_buffer)`` and the shard files, so ``state()`` is a few ints and ``restore(state)``
resumes it exactly. Each epoch the replica's shards are cut into chunk-aligned blocks (one
HDF5 chunk each, so every chunk is decompressed once per epoch); the blocks are put in a
seeded random order and grouped into windows of at least ``shuffle_buffer`` examples; each
window is read into memory and its examples are yielded in a seeded random permutation. Every
example of the replica is yielded exactly once per epoch. With ``shuffle_buffer=0`` the order
is the file order. Rows are checked as they are read (labels in range, features finite).
Memory: one window, at most ``shuffle_buffer + chunk_rows - 1`` examples (32 MB for
Fashion-MNIST with the default 8192).

Files are opened read-only, lazily, one handle per shard, with HDF5 file locking off: shards
are immutable once renamed into place, and locking fails on some parallel file systems.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from .schema import (
    FEATURES,
    GROUPS,
    LABELS,
    RESHARD_FIX,
    DataError,
    check_same_origin,
    check_shard,
    checksum_arrays,
    fail,
    read_manifest,
)

__all__ = ["Dataset", "ShardReader", "open_dataset"]


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError as e:
        raise fail(path, "shard file listed in manifest.json is missing") from e
    except OSError as e:
        raise fail(path, f"not a readable HDF5 file, truncated or corrupt ({e})") from e


class _Shard:
    """One shard file: its size, chunking, and a lazily opened read-only handle."""

    def __init__(self, path: Path, num_examples: int, chunk: int, num_classes: int):
        self.path = path
        self.n = num_examples
        self.chunk = chunk
        self.num_classes = num_classes
        self._f: h5py.File | None = None

    def read(self, start: int, stop: int, x: np.ndarray, y: np.ndarray) -> None:
        """Read rows [start, stop) into ``x[:k]``, ``y[:k]`` and check them."""
        k = stop - start
        if self._f is None:
            self._f = _open_h5(self.path)
        try:
            self._f[FEATURES].read_direct(x, np.s_[start:stop], np.s_[0:k])
            self._f[LABELS].read_direct(y, np.s_[start:stop], np.s_[0:k])
        except (OSError, KeyError) as e:
            raise fail(self.path,
                       f"cannot read rows {start}:{stop} ({e}); the file is corrupt") from e
        check_rows(self.path, start, x[:k], y[:k], self.num_classes)

    def read_groups(self, k: int) -> np.ndarray:
        """The first ``k`` entries of the optional ``groups`` dataset."""
        if self._f is None:
            self._f = _open_h5(self.path)
        if GROUPS not in self._f:
            raise fail(self.path, "has no 'groups' dataset (which example belongs to which "
                       "recording)", "re-create the shards with a tool that writes groups, "
                       "e.g. `python -m data_tools shard speech`")
        return self._f[GROUPS][:k]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def check_rows(path: Path, start: int, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Raise DataError naming ``path`` and the first bad row (labels out of range, NaN/Inf)."""
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise fail(path, f"row {start + i} of dataset 'labels' is {int(y[i])}, outside "
                   f"[0, {num_classes})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        i = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise fail(path, f"row {start + i} of dataset 'features' contains NaN or Inf")


class Dataset:
    """A validated data set directory. Holds no open files; readers open their own.

    Attributes
    ----------
    path : Path
        The directory holding manifest.json.
    feature_shape : tuple of int
        Per-example shape of ``features``.
    feature_dtype : numpy.dtype
        float32, or int32/int64 for id features.
    num_classes : int
    class_names : list of str or None
    splits : dict
        split name -> list of shard file paths, in shard-index order.
    manifest : dict
        The parsed manifest.json.
    """

    def __init__(self, path: Path, manifest: dict, counts: dict, chunks: dict):
        self.path = path
        self.manifest = manifest
        self.feature_shape: tuple[int, ...] = tuple(manifest["feature_shape"])
        self.feature_dtype = np.dtype(manifest["feature_dtype"])
        self.num_classes: int = manifest["num_classes"]
        self.class_names: list[str] | None = manifest.get("class_names")
        self.splits: dict[str, list[Path]] = {
            s: [path / e["file"] for e in entries] for s, entries in manifest["splits"].items()
        }
        self._counts: dict[str, list[int]] = counts
        self._chunks: dict[str, list[int]] = chunks

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_examples(s)}" for s in self.splits)
        return (f"Dataset({str(self.path)!r}, {sizes}, feature_shape={self.feature_shape}, "
                f"num_classes={self.num_classes})")

    def _split(self, split: str) -> list[Path]:
        if split not in self.splits:
            raise fail(self.path / "manifest.json",
                       f"no split {split!r} (has {sorted(self.splits)})",
                       "pick one of those or re-create the shards with that split")
        return self.splits[split]

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split``."""
        self._split(split)
        return sum(self._counts[split])

    def _shards(self, split: str) -> list[_Shard]:
        return [
            _Shard(p, n, c, self.num_classes)
            for p, n, c in zip(self._split(split), self._counts[split], self._chunks[split])
        ]

    def load(self, split: str = "test", limit: int | None = None, with_groups: bool = False
             ) -> tuple[np.ndarray, ...]:
        """Load ``split`` (its first ``limit`` examples) into memory, in shard order.

        Returns features of the stored dtype (float32 for images) and int64 labels; with
        ``with_groups`` also the int64 ``groups`` (DataError if a shard has none).
        """
        shards = self._shards(split)
        total = sum(s.n for s in shards)
        n = total if limit is None else max(0, min(int(limit), total))
        x = np.empty((n, *self.feature_shape), dtype=self.feature_dtype)
        y = np.empty(n, dtype=np.int64)
        o = 0
        try:
            for s in shards:
                if o >= n:
                    break
                for a in range(0, s.n, s.chunk):
                    b = min(a + s.chunk, s.n, a + n - o)
                    if b <= a:
                        break
                    s.read(a, b, x[o:], y[o:])
                    o += b - a
            if with_groups:
                g = np.empty(n, dtype=np.int64)
                o = 0
                for s in shards:
                    k = min(s.n, n - o)
                    if k <= 0:
                        break
                    g[o : o + k] = s.read_groups(k)
                    o += k
        finally:
            for s in shards:
                s.close()
        return (x, y, g) if with_groups else (x, y)

    def reader(
        self,
        split: str = "train",
        replica: int = 0,
        num_replicas: int = 1,
        batch_size: int = 128,
        shuffle_buffer: int = 8192,
        seed: int = 0,
    ) -> ShardReader:
        """A ``ShardReader`` over the shards ``i % num_replicas == replica`` of ``split``."""
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica must be in [0, {num_replicas}), got {replica}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0 or seed < 0:
            raise ValueError("shuffle_buffer and seed must be >= 0")
        shards = self._shards(split)
        if len(shards) < num_replicas:
            raise fail(
                self.path / "manifest.json",
                f"split {split!r} has {len(shards)} shards but there are {num_replicas} replicas "
                "and each needs at least one",
                f"re-shard with `python -m data_tools shard ... --shards N`, N >= {num_replicas} "
                "(a multiple of the replica count balances them)",
            )
        mine = shards[replica::num_replicas]
        return ShardReader(mine, self.feature_shape, self.feature_dtype, batch_size=batch_size,
                           shuffle_buffer=shuffle_buffer, seed=seed, replica=replica,
                           num_replicas=num_replicas)


def open_dataset(path: str | os.PathLike, verify: bool = False) -> Dataset:
    """Open the data set in directory ``path`` (the one holding manifest.json).

    Checks the manifest and, for every shard, that the file opens and its attributes,
    dataset names, dtypes, shapes, counts and checksum attribute agree with the manifest.
    With ``verify=True`` it also recomputes every checksum from the data (reads everything).

    Raises
    ------
    DataError
        One line naming the file, the field and the fix.
    """
    path = Path(path)
    m = read_manifest(path)
    shape = tuple(m["feature_shape"])
    counts: dict[str, list[int]] = {}
    chunks: dict[str, list[int]] = {}
    for split, entries in m["splits"].items():
        counts[split], chunks[split] = [], []
        for i, e in enumerate(entries):
            p = path / e["file"]
            if not p.is_file():
                raise fail(p, "shard file listed in manifest.json is missing",
                           "copy it back or " + RESHARD_FIX)
            with _open_h5(p) as f:
                info = check_shard(
                    f, p, split=split, shard_index=i, num_shards=len(entries),
                    feature_shape=shape, feature_dtype=m["feature_dtype"],
                    num_classes=m["num_classes"], num_examples=e["num_examples"],
                    checksum=e["checksum"],
                )
                if i == 0:
                    first, first_path = info, p
                else:
                    check_same_origin(info, p, first, first_path)
                ch = f[FEATURES].chunks
                chunks[split].append(ch[0] if ch else min(2048, e["num_examples"]))
                if verify:
                    try:
                        got = checksum_arrays(f[FEATURES], f[LABELS], groups=f.get(GROUPS))
                    except OSError as err:
                        raise fail(p, f"cannot read the data ({err}); the file is corrupt") from err
                    if got != e["checksum"]:
                        raise fail(p, f"checksum of the data is {got} but manifest.json says "
                                   f"{e['checksum']}: the file is corrupt")
            counts[split].append(e["num_examples"])
    return Dataset(path, m, counts, chunks)


class ShardReader:
    """Full batches from one replica's shards, shuffled through a buffer, cycling epochs.

    Use as a context manager or call ``close()``. ``next_batch()`` returns ``(x, y)``: ``x``
    C-contiguous of shape ``(batch_size, *feature_shape)`` (float32 for float32 shards; id
    features keep their int dtype), ``y`` int64 of shape ``(batch_size,)``. A batch may span
    an epoch boundary.
    """

    def __init__(
        self,
        shards: list[_Shard],
        feature_shape: tuple[int, ...],
        feature_dtype: np.dtype,
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        replica: int = 0,
        num_replicas: int = 1,
    ):
        self.shards = shards
        self.paths = [s.path for s in shards]
        self.feature_shape = tuple(feature_shape)
        self.dtype = np.dtype(feature_dtype)
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.replica = replica
        self.num_replicas = num_replicas
        self.num_examples = sum(s.n for s in shards)
        # blocks: (shard, start, stop), chunk-aligned so each chunk is decompressed once
        self._blocks = np.array(
            [(k, a, min(a + s.chunk, s.n))
             for k, s in enumerate(shards) for a in range(0, s.n, s.chunk)],
            dtype=np.int64,
        )
        self.epoch = 0
        self.position = 0  # examples of this epoch already yielded
        self._plan_epoch = -1
        self._win = -1
        self._cur = 0
        self._cap = 0
        self._x = np.empty((0, *self.feature_shape), dtype=self.dtype)
        self._y = np.empty(0, dtype=np.int64)

    # -- epoch plan: block order and windows, a pure function of (seed, ..., epoch) ----------
    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.num_replicas, self.replica, *extra])

    def _plan(self) -> None:
        if self._plan_epoch == self.epoch:
            return
        nb = len(self._blocks)
        order = self._rng(self.epoch).permutation(nb) if self.shuffle_buffer > 0 else np.arange(nb)
        sizes = self._blocks[order, 2] - self._blocks[order, 1]
        target = max(1, self.shuffle_buffer)
        windows, starts, acc, cur = [], [], 0, []
        pos = 0
        for b, sz in zip(order.tolist(), sizes.tolist()):
            cur.append(b)
            acc += sz
            if acc >= target:
                windows.append(cur)
                starts.append(pos)
                pos += acc
                cur, acc = [], 0
        if cur:
            windows.append(cur)
            starts.append(pos)
        self._windows, self._starts = windows, starts
        self._plan_epoch = self.epoch
        self._win = -1

    def _load(self, w: int) -> None:
        blocks = self._blocks[self._windows[w]]
        rows = int((blocks[:, 2] - blocks[:, 1]).sum())
        if rows > self._cap:
            self._cap = rows
            self._x = np.empty((rows, *self.feature_shape), dtype=self.dtype)
            self._y = np.empty(rows, dtype=np.int64)
        o = 0
        for k, a, b in blocks.tolist():
            self.shards[k].read(a, b, self._x[o:], self._y[o:])
            o += b - a
        self._rows = rows
        self._perm = self._rng(self.epoch, w).permutation(rows) if self.shuffle_buffer > 0 else None
        self._win = w

    def _seek(self) -> None:
        """Make the loaded window the one holding ``position`` and set the cursor in it."""
        self._plan()
        w = bisect.bisect_right(self._starts, self.position) - 1
        if w != self._win:
            self._load(w)
        self._cur = self.position - self._starts[w]

    # -- public -------------------------------------------------------------------------------
    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the next full batch ``(x, y)``."""
        B = self.batch_size
        x = np.empty((B, *self.feature_shape), dtype=self.dtype)
        y = np.empty(B, dtype=np.int64)
        o = 0
        while o < B:
            self._seek()
            k = min(B - o, self._rows - self._cur)
            if self._perm is None:
                x[o : o + k] = self._x[self._cur : self._cur + k]
                y[o : o + k] = self._y[self._cur : self._cur + k]
            else:
                idx = self._perm[self._cur : self._cur + k]
                np.take(self._x, idx, axis=0, out=x[o : o + k])
                np.take(self._y, idx, out=y[o : o + k])
            o += k
            self.position += k
            if self.position == self.num_examples:
                self.epoch += 1
                self.position = 0
        return x, y

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    @property
    def epochs_done(self) -> float:
        """Completed epochs as a float (epoch + fraction of the current one)."""
        return self.epoch + self.position / self.num_examples

    def state(self) -> dict[str, int]:
        """The stream position as a small dict of ints, for a checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "replica": self.replica,
            "num_replicas": self.num_replicas,
            "shuffle_buffer": self.shuffle_buffer,
            "num_examples": self.num_examples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume the stream saved by ``state()``. The data settings must be the same."""
        for key in ("seed", "replica", "num_replicas", "shuffle_buffer", "num_examples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"reader state: {key}={state[key]} was saved but this reader has "
                    f"{key}={getattr(self, key)}; resume with the same data set and data settings"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise DataError(f"reader state: epoch={epoch}, position={position} out of range "
                            f"for {self.num_examples} examples")
        self.epoch, self.position = epoch, position
        self._seek()

    def close(self) -> None:
        """Close every open shard file (the reader can be used again; files reopen lazily)."""
        for s in self.shards:
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.paths)
        return (f"ShardReader(replica {self.replica}/{self.num_replicas}, [{names}], "
                f"batch_size={self.batch_size}, epoch={self.epoch}, position={self.position})")

