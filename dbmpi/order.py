"""The order of a recorded asynchronous run (``run.record_order = true``), for ``dbmpi replay``.

Downpour's result depends on timing: which pushes each shard applied in which order, and
which of them each fetch saw. A recorded run writes exactly that, a few integers per
operation, into ``RUN_DIR/order/`` (schema ``dbmpi.order`` v1), one HDF5 file per rank when
it ends (through a temporary name: a file there is whole):

``shard-SSSS.h5``
    dataset ``applies`` (int64, n x 3): each push shard S applied, in order: the worker, the
    push number (from 1, per worker) and the divisor of its learning rate (its staleness with
    ``downpour.staleness_aware``, else 1).
``worker-WWWW.h5``
    dataset ``fetches`` (int64, n x S): each fetch of worker W, in order: how many pushes
    each shard had applied when W copied its block (recorded fetches copy a block no push is
    changing, see :mod:`dbmpi.ps`); attributes ``steps`` (steps it trained), ``pushes``,
    ``blas_threads`` (its ``OPENBLAS_NUM_THREADS``, "" when unset) and ``blas_library`` (the
    BLAS its kernels called, "numpy" or "scipy": ``DBMPI_BLAS``; absent from files written
    before 12-04): a replay needs the same.

Every file has the attributes ``schema``, ``schema_version`` and ``index`` (S or W).
:mod:`dbmpi.replay` reads them back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .checkpoint import require_schema, writing
from .errors import DbmpiError

SCHEMA, VERSION = "dbmpi.order", 1
FIX = "record the run again with --set run.record_order=true"


def shard_file(run_dir: str | Path, shard: int) -> Path:
    return Path(run_dir) / "order" / f"shard-{shard:04d}.h5"


def worker_file(run_dir: str | Path, worker: int) -> Path:
    return Path(run_dir) / "order" / f"worker-{worker:04d}.h5"


def _write(path: Path, index: int, name: str, data: np.ndarray, **attrs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset(name, data=data)
            f.attrs.update(schema=SCHEMA, schema_version=VERSION, index=index, **attrs)
        os.replace(tmp, path)


def write_shard(run_dir: str | Path, shard: int, applies: list[tuple[int, int, int]]) -> None:
    _write(shard_file(run_dir, shard), shard, "applies",
           np.asarray(applies, dtype=np.int64).reshape(-1, 3))


def write_worker(run_dir: str | Path, worker: int, fetches: list[list[int]], shards: int,
                 steps: int, pushes: int) -> None:
    _write(worker_file(run_dir, worker), worker, "fetches",
           np.asarray(fetches, dtype=np.int64).reshape(-1, shards), steps=steps, pushes=pushes,
           blas_threads=blas_threads(), blas_library=blas_library())


def blas_threads() -> str:
    return os.environ.get("OPENBLAS_NUM_THREADS", "")


def blas_library() -> str:
    from cython_kernels._blasinfo import kernel_blas

    return kernel_blas()["library"]


@dataclass
class WorkerOrder:
    fetches: np.ndarray  # (n, S): pushes applied on each shard at each fetch
    steps: int
    pushes: int
    blas_threads: str
    blas_library: str  # "" in a file written before the attribute was


@dataclass
class Order:
    applies: list[np.ndarray]  # per shard, (n, 3): worker, push, learning-rate divisor
    workers: list[WorkerOrder]


def _read(path: Path, index: int, name: str, cols: int) -> tuple[np.ndarray, dict]:
    if not path.is_file():
        raise DbmpiError(f"{path}: missing (the run was not recorded, or that rank did not "
                         f"finish): {FIX}")
    try:
        with h5py.File(path, "r") as f:
            require_schema(f, path, SCHEMA, VERSION, "dbmpi order file", FIX)
            if name not in f or f[name].ndim != 2 or f[name].shape[1] != cols:
                raise DbmpiError(f"{path}: dataset '{name}' is missing or not n x {cols}: {FIX}")
            if int(f.attrs.get("index", -1)) != index:
                raise DbmpiError(f"{path}: holds index {f.attrs.get('index')}, expected "
                                 f"{index}: {FIX}")
            return f[name][...].astype(np.int64), dict(f.attrs)
    except OSError as exc:
        raise DbmpiError(f"{path}: cannot read it ({str(exc).splitlines()[0]}): {FIX}") from None


def read(run_dir: str | Path, shards: int, workers: int) -> Order:
    """Every rank's record of a run of ``shards`` shards and ``workers`` workers."""
    applies = [_read(shard_file(run_dir, s), s, "applies", 3)[0] for s in range(shards)]
    out = []
    for w in range(workers):
        fetches, attrs = _read(worker_file(run_dir, w), w, "fetches", shards)
        out.append(WorkerOrder(fetches, int(attrs.get("steps", -1)),
                               int(attrs.get("pushes", -1)), str(attrs.get("blas_threads", "")),
                               str(attrs.get("blas_library", ""))))
    return Order(applies, out)
