"""Parameters and checkpoints on disk: HDF5 with explicit, versioned schemas (never pickle).

``params.h5`` (schema ``dbmpi.params`` v1)
    dataset ``params`` (float32, flat); attributes ``schema``, ``schema_version``,
    ``num_params``, ``model`` (the model config as JSON), ``step``.

``iterates.h5`` (schema ``dbmpi.iterates`` v1), written with ``record_iterates`` and scored
afterwards by ``python -m dbmpi eval RUN_DIR --iterates``
    dataset ``iterates`` (one row per recorded parameter vector); Downpour adds ``step`` (the
    replicas' summed steps) and ``wall_s`` (seconds since the start when the row was fetched);
    Sandblaster's rows are timed by the ``lbfgs`` records of ``metrics.jsonl`` instead.

A checkpoint (schema ``dbmpi.checkpoint`` v2) is a directory
``RUN_DIR/checkpoints/ckpt-KKKKKKKK`` holding

``shard-SSSS.h5``
    written by shard S: datasets ``params`` (float32, its block) and ``state`` (float32,
    ``(len(state_names), block)``: the optimizer's per-parameter state, no rows for SGD);
    attributes ``start``/``stop`` (global range), ``applied`` (pushes applied so far),
    ``state_names`` (JSON list, e.g. ``["m", "v", "t"]`` for Adam), ``checksum`` (CRC-32 of
    params then state bytes). v1 (one state row, stored flat) is still read.
``checkpoint.h5``
    written by the coordinator last: attributes ``schema``, ``schema_version``, ``sequence``
    (K), ``steps`` (sum of all workers' steps), ``num_params``, ``num_shards``, ``final``
    (the run had finished), ``model`` and ``config`` (JSON), ``checksum`` (v2: CRC-32 of the
    ``workers`` bytes and of the other attributes as JSON); dataset ``workers`` (int64, one
    row per worker: step, epoch, position of its data reader).

A resume trusts a checkpoint only when every file's checksum matches and its numbers make
sense (no negative step, epoch or position; ``steps`` is what its workers' steps add up to).
The runner moves a checkpoint that fails aside (``ckpt-KKKKKKKK.corrupt``, never deleted),
resumes from the newest good one, and numbers new checkpoints past every directory present;
when none is good it refuses (:func:`resume_point`).

Atomicity: everything is written into ``ckpt-KKKKKKKK.tmp/`` (each file fsynced), then the
directory is renamed. A reader only considers directories without the ``.tmp`` suffix and
still verifies every checksum, so a kill at any moment leaves the newest *complete* checkpoint
as the one a restart uses; a good checkpoint is never overwritten (each has its own name).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import DbmpiError
from .faults import write_fault
from .log import get_logger

log = get_logger("checkpoint")

PARAMS_SCHEMA = "dbmpi.params"
PARAMS_VERSION = 1
CKPT_SCHEMA = "dbmpi.checkpoint"
CKPT_VERSION = 2
CKPT_READS = (1, 2)  # versions this code can resume from
_META = ("sequence", "steps", "num_params", "num_shards", "final", "model", "config")


class NoValidCheckpoint(ValueError):
    """A run directory holds checkpoints and none of them can be trusted."""
ITERATES_SCHEMA = "dbmpi.iterates"
ITERATES_VERSION = 1


class DiskWriteError(DbmpiError):
    """A run's output could not be written (full disk, quota, read-only, permissions): the
    user frees space or moves the run, nothing in the code is wrong. Exit status 74
    (sysexits' EX_IOERR), apart from input errors (2) and crashes (1)."""

    exit_code = 74


_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def writing(path, tmp=None):
    """Turn an OSError while writing ``path`` into one :class:`DiskWriteError` line naming
    the path, the cause and the fix (a full disk used to print a traceback per shard); the
    half-written ``tmp`` it was going through is removed, giving its space back."""
    try:
        write_fault(path)
        yield
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise DiskWriteError(disk_message(path, exc)) from None


def disk_message(path, exc: OSError) -> str:
    code = exc.errno
    if code is None:  # h5py puts the C library's errno in its text only
        text = str(exc)
        code = next((c for c in (*_SPACE, errno.EROFS, errno.EACCES)
                     if f"errno = {c}," in text), None)
    name = errno.errorcode.get(code, "") if code is not None else ""
    cause = (os.strerror(code) if code is not None else str(exc).splitlines()[0][:200])
    fix = ("free space on that file system (or raise the quota)" if code in _SPACE
           else "make it writable" if code in (errno.EROFS, errno.EACCES, errno.EPERM)
           else "check that file system")
    return (f"cannot write {path}: {cause}{f' [{name}]' if name else ''}: {fix} and run the "
            f"same command again to resume from the last checkpoint, or choose another "
            f"run.dir with --set run.dir=PATH")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_params(path: str | Path, params: np.ndarray, model: dict, step: int = 0) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=np.asarray(params, dtype=np.float32))
            f.attrs["schema"] = PARAMS_SCHEMA
            f.attrs["schema_version"] = PARAMS_VERSION
            f.attrs["num_params"] = int(params.size)
            f.attrs["model"] = json.dumps(model)
            f.attrs["step"] = int(step)
        os.replace(tmp, path)


def append_iterate(path: str | Path, x: np.ndarray, **scalars: float) -> None:
    """Append parameter vector ``x`` (and one value per named scalar) to ``iterates.h5``.

    Chunked one row at a time and reopened per call, so a run killed between calls leaves
    every earlier row readable."""
    with h5py.File(path, "a") as f:
        if "iterates" not in f:
            f.attrs["schema"] = ITERATES_SCHEMA
            f.attrs["schema_version"] = ITERATES_VERSION
            f.create_dataset("iterates", shape=(0, x.size), maxshape=(None, x.size),
                             dtype=x.dtype, chunks=(1, x.size))
            for name in scalars:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.float64,
                                 chunks=(1024,))
        for name, value in (("iterates", x), *scalars.items()):
            d = f[name]
            d.resize(d.shape[0] + 1, axis=0)
            d[-1] = value


def require_schema(f: h5py.File, path, schema: str, version: int, what: str,
                   fix: str = "") -> None:
    """One DbmpiError line naming ``path`` unless file ``f`` has ``schema`` at ``version``."""
    tail = f": {fix}" if fix else ""
    if f.attrs.get("schema") != schema:
        raise DbmpiError(f"{path}: not a {what} (attribute 'schema' is "
                         f"{f.attrs.get('schema')!r}, expected {schema!r}){tail}")
    got = int(f.attrs.get("schema_version", -1))
    if got != version:
        raise DbmpiError(f"{path}: schema_version {got} is not supported (this dbmpi reads "
                         f"{version}){tail}")


def load_params(path: str | Path) -> tuple[np.ndarray, dict]:
    """Return (params, model config dict); errors name the file and the fix."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            require_schema(f, path, PARAMS_SCHEMA, PARAMS_VERSION, "dbmpi parameter file")
            params = f["params"][...]
            model = json.loads(f.attrs["model"])
    except OSError as exc:
        raise DbmpiError(f"{path}: cannot read parameters ({exc}); re-run training") from None
    return params, model


# -- checkpoints ---------------------------------------------------------------------------

def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def pending_dir(run_dir: str | Path, sequence: int) -> Path:
    """Where checkpoint ``sequence`` is written before it is committed."""
    return checkpoint_root(run_dir) / f"ckpt-{sequence:08d}.tmp"


def _meta_crc(meta: dict, workers: np.ndarray) -> int:
    """CRC-32 of checkpoint.h5's content: the workers' rows and the other attributes."""
    text = json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in meta.items()},
                      sort_keys=True)
    return zlib.crc32(text.encode(), _crc(workers))


def _crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), crc)
    return crc


def write_shard(run_dir: str | Path, sequence: int, shard: int, start: int, stop: int,
                params: np.ndarray, state: np.ndarray, applied: int,
                state_names: tuple[str, ...] = ()) -> None:
    """Shard: write its block of checkpoint ``sequence`` (into the pending directory);
    ``state`` is the optimizer's, ``(len(state_names), stop - start)``."""
    d = pending_dir(run_dir, sequence)
    path = d / f"shard-{shard:04d}.h5"
    with writing(path):
        d.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("params", data=params)
            f.create_dataset("state", data=state)
            f.attrs["start"], f.attrs["stop"] = int(start), int(stop)
            f.attrs["applied"] = int(applied)
            f.attrs["state_names"] = json.dumps(list(state_names))
            f.attrs["checksum"] = _crc(params, state)
        _fsync(path)


def commit(run_dir: str | Path, sequence: int, *, steps: int, num_params: int, num_shards: int,
           workers: np.ndarray, final: bool, model: dict, config: dict, keep: int) -> Path:
    """Coordinator: write ``checkpoint.h5``, rename the directory into place, prune old ones."""
    d = pending_dir(run_dir, sequence)
    path = d / "checkpoint.h5"
    with writing(path):  # on failure the .tmp directory stays pending: never committed
        _write_meta(path, sequence, steps, num_params, num_shards, workers, final, model,
                    config)
    final_dir = d.with_name(d.name[:-len(".tmp")])
    with writing(final_dir):
        os.replace(d, final_dir)
        _fsync(final_dir.parent)
    prune(run_dir, keep)
    return final_dir


def _write_meta(path: Path, sequence, steps, num_params, num_shards, workers, final, model,
                config) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = CKPT_SCHEMA
        f.attrs["schema_version"] = CKPT_VERSION
        f.attrs["sequence"] = int(sequence)
        f.attrs["steps"] = int(steps)
        f.attrs["num_params"] = int(num_params)
        f.attrs["num_shards"] = int(num_shards)
        f.attrs["final"] = bool(final)
        f.attrs["model"] = json.dumps(model)
        f.attrs["config"] = json.dumps(config)
        workers = np.ascontiguousarray(workers, dtype=np.int64)
        f.create_dataset("workers", data=workers)
        f.attrs["checksum"] = _meta_crc({k: f.attrs[k] for k in _META}, workers)
    _fsync(path)


@dataclass
class Checkpoint:
    path: Path
    sequence: int
    steps: int
    num_params: int
    final: bool
    workers: np.ndarray
    model: dict
    shard_files: list[tuple[int, int, Path]]  # (start, stop, file)
    config: dict = None  # the whole config the checkpoint was written under

    def load_block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Parameters and optimizer state (``(state rows, stop - start)``) of the global range
        ``[start, stop)``."""
        params = np.empty(stop - start, np.float32)
        state = None
        for lo, hi, path in self.shard_files:
            a, b = max(lo, start), min(hi, stop)
            if a >= b:
                continue
            with h5py.File(path, "r") as f:
                params[a - start:b - start] = f["params"][a - lo:b - lo]
                st = f["state"]
                rows = st.shape[0] if st.ndim == 2 else int(st.shape[0] > 0)  # v1: flat
                if state is None:
                    state = np.empty((rows, stop - start), np.float32)
                if rows:
                    state[:, a - start:b - start] = (st[:, a - lo:b - lo] if st.ndim == 2
                                                     else st[a - lo:b - lo])
        return params, (state if state is not None else np.zeros((0, stop - start), np.float32))


def open_checkpoint(d: str | Path, verify: bool = True) -> Checkpoint:
    """Open (and with ``verify``, checksum) one committed checkpoint directory; raises
    ValueError/OSError/KeyError on any problem."""
    d = Path(d)
    with h5py.File(d / "checkpoint.h5", "r") as f:
        version = int(f.attrs.get("schema_version", -1))
        if f.attrs.get("schema") != CKPT_SCHEMA or version not in CKPT_READS:
            raise ValueError("unknown schema")
        meta = {k: f.attrs[k] for k in _META}
        workers = f["workers"][...]
        if verify and version >= 2 and _meta_crc(meta, workers) != int(f.attrs["checksum"]):
            raise ValueError("checkpoint.h5: checksum mismatch")
        model = json.loads(f.attrs["model"])
        config = json.loads(f.attrs["config"])
    partitions = int(config.get("topology", {}).get("partitions", 1))
    if workers.ndim != 2 or (workers < 0).any() or int(meta["steps"]) < 0 \
            or int(workers[:, 0].sum()) // partitions != int(meta["steps"]):
        raise ValueError(f"checkpoint.h5: worker rows {workers.tolist()} do not add up to "
                         f"its {int(meta['steps'])} steps")
    files = []
    for path in sorted(d.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            if verify and _crc(f["params"][...], f["state"][...]) != int(f.attrs["checksum"]):
                raise ValueError(f"{path.name}: checksum mismatch")
            files.append((int(f.attrs["start"]), int(f.attrs["stop"]), path))
    files.sort()
    covered = 0
    for lo, hi, _ in files:
        if lo != covered:
            raise ValueError("shard files do not cover the parameter vector")
        covered = hi
    if covered != int(meta["num_params"]) or len(files) != int(meta["num_shards"]):
        raise ValueError("shard files do not cover the parameter vector")
    return Checkpoint(d, int(meta["sequence"]), int(meta["steps"]), int(meta["num_params"]),
                      bool(meta["final"]), workers, model, files, config)


def highest_sequence(run_dir: str | Path) -> int:
    """The highest checkpoint number any directory under the run's checkpoints has (committed,
    pending or moved aside), 0 if none: new checkpoints are numbered past it."""
    root = checkpoint_root(run_dir)
    nums = [int(d.name[5:13]) for d in root.glob("ckpt-*") if d.name[5:13].isdigit()] \
        if root.is_dir() else []
    return max(nums, default=0)


def resume_point(run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint a run resumes from: the newest that verifies. Each newer one that does
    not is moved aside to ``ckpt-KKKKKKKK.corrupt`` (kept for inspection) with one warning.
    None when there is no checkpoint at all; :class:`NoValidCheckpoint` (naming each failure)
    when there are checkpoints and none can be trusted."""
    root = checkpoint_root(run_dir)
    failed = []
    for d in sorted(root.glob("ckpt-????????"), reverse=True) if root.is_dir() else []:
        try:
            ck = open_checkpoint(d)
        except (OSError, ValueError, KeyError) as exc:
            failed.append(f"{d.name} ({exc})")
            aside = d.with_name(d.name + ".corrupt")
            n = 1
            while aside.exists():
                n += 1
                aside = d.with_name(f"{d.name}.corrupt-{n}")
            os.replace(d, aside)
            log.warning("checkpoint %s cannot be trusted (%s): moved aside to %s", d, exc,
                        aside.name)
            continue
        return ck
    if failed:
        raise NoValidCheckpoint(f"{root} holds no valid checkpoint ({'; '.join(failed)}; moved "
                                f"aside as *.corrupt): to start afresh use another run.dir or "
                                f"move {root} away")
    return None


def find_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None; broken ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    for d in sorted(root.glob("ckpt-????????"), reverse=True):
        try:
            return open_checkpoint(d)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping checkpoint %s: %s", d, exc)
    return None


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` committed checkpoints; remove older ones and stale .tmp dirs."""
    root = checkpoint_root(run_dir)
    done = sorted(root.glob("ckpt-????????"))
    for d in done[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    newest = int(done[-1].name[5:]) if done else -1
    for d in root.glob("ckpt-????????.tmp"):
        if int(d.name[5:13]) <= newest:
            shutil.rmtree(d, ignore_errors=True)
