"""A run directory of ``python -m dbmpi train``, read back after (or while) the job runs.

``eval``, ``neighbors``, ``probe``, ``neurons`` and ``plot`` all start from one: they open it
here so that each missing or wrong file gives the same one-line error, naming the file and
the fix. What a run directory holds (written by :mod:`dbmpi.runner` and the coordinator):

``config.toml``      the config the run used (``--set`` overrides applied)
``params.h5``        the final parameters and the model spec (written at the end)
``metrics.jsonl``    every rank's records, merged at the end (``metrics/rank-*.jsonl`` live)
``summary.json``     final numbers (steps, test accuracy, ranks)
``iterates.h5``      recorded parameter vectors (``*.record_iterates = true``)

A text data set's ``vocab.json`` lives beside its shards; :func:`read_vocab` reads it (here,
not in ``data_tools``, because ``neighbors`` needs it at run time).

>>> rd = RunDir.open("runs/demo-20260101-120000")
>>> params, spec = rd.params()                        # from params.h5
>>> ds = rd.dataset()                                 # config.toml's data.path (or --data)
>>> model = rd.model(ds, spec, params.size)           # the sizes must agree
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import config as config_mod
from .data.schema import DataError
from .errors import DbmpiError

# The fix shared by every "not a run directory" error.
RUN_FIX = "pass the directory `python -m dbmpi train` printed on its last line"
PARAMS_FIX = "the run did not finish (the coordinator writes it at the end): run it again"

EOS, UNK = "</s>", "<unk>"
VOCAB_SCHEMA, VOCAB_VERSION, VOCAB_FILE = "dbmpi.vocab", 1, "vocab.json"


class Iterate(NamedTuple):
    """Row ``index`` of ``total`` in iterates.h5: the parameters and when they were taken."""

    index: int
    total: int
    params: np.ndarray
    wall_s: float
    step: int


class RunDir:
    """The files of one run directory; each reader raises a one-line DbmpiError naming the
    missing or wrong file and what to do. Construction checks nothing (``plot`` reads runs
    without a config); :meth:`open` checks that the directory is a run's."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """A run directory that exists and holds config.toml."""
        rd = cls(path)
        if not rd.path.is_dir():
            raise DbmpiError(f"{rd.path}: no such directory (a run directory holds config.toml, "
                             f"params.h5, metrics.jsonl): {RUN_FIX}")
        rd.require("config.toml", f"not a run directory: {RUN_FIX}")
        return rd

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def require(self, name: str, fix: str) -> Path:
        """``path/name``, or DbmpiError ``"PATH: missing; FIX"``."""
        p = self.path / name
        if not p.is_file():
            raise DbmpiError(f"{p}: missing; {fix}")
        return p

    @cached_property
    def config(self) -> config_mod.Config:
        """config.toml, parsed and validated like any config (ConfigError names the field)."""
        return config_mod.load(self.require("config.toml", f"not a run directory: {RUN_FIX}"))

    def data_path(self, override: str | os.PathLike | None = None) -> str:
        """``--data`` when given, else the run's ``data.path``."""
        return str(override) if override else self.config.data.path

    def dataset(self, override: str | os.PathLike | None = None):
        """The run's data set (``--data`` overrides ``data.path``), checked by open_dataset."""
        from .data import open_dataset  # h5py: only for commands that read data

        return open_dataset(self.data_path(override))

    def params(self) -> tuple[np.ndarray, dict]:
        """``(final parameters, model spec dict)`` from params.h5."""
        from .checkpoint import load_params

        return load_params(self.require("params.h5", PARAMS_FIX))

    def model(self, ds, spec: dict, size: int, loss: str | None = None, **opts):
        """The model ``spec`` (from params.h5) describes, on data set ``ds``; DbmpiError when
        it does not have ``size`` parameters (params.h5 came from another data set)."""
        from .model import Model

        model = Model.from_spec(ds.feature_shape, spec["layers"], ds.num_classes,
                                loss or spec.get("loss", "softmax"), **opts)
        if model.num_params != size:
            raise DbmpiError(f"{self.file('params.h5')} holds {size} parameters but its model "
                             f"on {ds.path} has {model.num_params}: pass the data set the run "
                             "was trained on with --data")
        return model

    def metrics(self) -> list[dict]:
        """Every record of metrics.jsonl (merged when the run ended)."""
        p = self.require("metrics.jsonl", f"the run did not finish (its ranks' records are in "
                         f"{self.path / 'metrics'}/); {RUN_FIX}")
        return _read_jsonl(p)

    def eval_records(self) -> list[dict]:
        """The test-set evaluations to draw: ``eval_iterates.jsonl`` when ``eval --iterates``
        wrote one (recorded parameters scored afterwards), else metrics.jsonl's ``eval``."""
        scored = self.file("eval_iterates.jsonl")
        if scored.is_file():
            return _read_jsonl(scored)
        return [r for r in self.metrics() if r["kind"] == "eval"]

    def summary(self) -> dict:
        p = self.require("summary.json", PARAMS_FIX)
        try:
            return json.loads(p.read_text())
        except ValueError as e:
            raise DbmpiError(f"{p}: not valid JSON ({e}); {PARAMS_FIX}") from None

    def vocab(self, override: str | os.PathLike | None = None) -> dict:
        """The vocabulary of the run's (text) data set."""
        return read_vocab(self.data_path(override))

    def iterates(self) -> Iterator[Iterate]:
        """Each row of iterates.h5 with its time: Downpour records ``wall_s`` and ``step``
        beside each row; Sandblaster's row k is L-BFGS iteration k, timed by the ``lbfgs``
        record of that iteration in metrics.jsonl. A missing file fails here, at the call."""
        path = self.require("iterates.h5", "run with --set sandblaster.record_iterates=true "
                            "(or downpour.record_iterates=true)")
        return self._iterates(path)

    def _iterates(self, path: Path) -> Iterator[Iterate]:
        import h5py

        with h5py.File(path, "r") as f:
            rows = f["iterates"]
            if "wall_s" in f:  # Downpour
                when = dict(enumerate(f["wall_s"][:].tolist()))
                steps = dict(enumerate(int(v) for v in f["step"][:]))
            else:  # Sandblaster
                when = {r["iteration"]: r["time"] for r in self.metrics()
                        if r["kind"] == "lbfgs"}
                steps = {k: k for k in when}
            n = rows.shape[0]
            for k in range(n):
                if k not in when:
                    raise DbmpiError(f"{self.file('metrics.jsonl')} has no lbfgs record for "
                                     f"iteration {k} of {path}: the run was cut short; run "
                                     "it again")
                yield Iterate(k, n, rows[k].astype(np.float32), when[k], steps[k])


def _read_jsonl(path: Path) -> list[dict]:
    """A torn line (a full disk, a kill) is skipped with one warning; a file with no record
    at all that parses is not JSON lines."""
    from .metrics import read_jsonl

    records = read_jsonl(path)
    if not records and path.read_text(errors="replace").strip():
        raise DbmpiError(f"{path}: not JSON lines (no line parses); {PARAMS_FIX}")
    return records


def read_vocab(directory: str | os.PathLike) -> dict:
    """The ``vocab.json`` of a text data set, checked; DataError naming the file otherwise."""
    path = Path(directory) / VOCAB_FILE
    fix = "re-create it with `python -m data_tools shard text ...`"
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a text data set?): {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}): {fix}") from None
    if not isinstance(v, dict) or v.get("schema") != VOCAB_SCHEMA:
        raise DataError(f"{path}: not a {VOCAB_SCHEMA} file: {fix}")
    if v.get("schema_version") != VOCAB_VERSION:
        raise DataError(f"{path}: schema version {v.get('schema_version')!r}, this dbmpi reads "
                        f"{VOCAB_VERSION}: {fix}")
    if not isinstance(v.get("words"), list) or len(v["words"]) < 3:
        raise DataError(f"{path}: field 'words' must list the vocabulary: {fix}")
    return v
