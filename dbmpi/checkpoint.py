"""Parameters on disk: HDF5 with an explicit, versioned schema (never pickle).

Schema ``dbmpi.params`` v1: dataset ``params`` (float32, flat), root attributes ``schema``,
``schema_version``, ``num_params``, ``model`` (the model config as JSON) and ``step``.
Files are written to ``NAME.tmp`` and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .errors import DbmpiError

PARAMS_SCHEMA = "dbmpi.params"
PARAMS_VERSION = 1


def save_params(path: str | Path, params: np.ndarray, model: dict, step: int = 0) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("params", data=np.asarray(params, dtype=np.float32))
        f.attrs["schema"] = PARAMS_SCHEMA
        f.attrs["schema_version"] = PARAMS_VERSION
        f.attrs["num_params"] = int(params.size)
        f.attrs["model"] = json.dumps(model)
        f.attrs["step"] = int(step)
    os.replace(tmp, path)


def load_params(path: str | Path) -> tuple[np.ndarray, dict]:
    """Return (params, model config dict); errors name the file and the fix."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != PARAMS_SCHEMA:
                raise DbmpiError(f"{path}: not a dbmpi parameter file (attribute 'schema' is "
                                 f"{f.attrs.get('schema')!r}, expected {PARAMS_SCHEMA!r})")
            version = int(f.attrs.get("schema_version", -1))
            if version != PARAMS_VERSION:
                raise DbmpiError(f"{path}: schema_version {version} is not supported "
                                 f"(this dbmpi reads {PARAMS_VERSION})")
            params = f["params"][...]
            model = json.loads(f.attrs["model"])
    except OSError as exc:
        raise DbmpiError(f"{path}: cannot read parameters ({exc}); re-run training") from None
    return params, model
