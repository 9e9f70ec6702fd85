"""Neural language model runs after training: token probabilities and word neighbours.

``python -m dbmpi neighbors RUN_DIR --word WORD [-k 10]`` prints the ``k`` words whose
embedding rows (the first layer of the run's model, ``params.h5``) have the largest cosine
similarity with WORD's, using the vocabulary (``vocab.json``) of the run's data set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import DbmpiError


def load_lm(run_dir: str | Path, data: str | None = None):
    """(model with the run's final parameters, data set, vocabulary dict) of an LM run."""
    from data_tools.text import read_vocab

    from .checkpoint import load_params
    from .data import DataError, open_dataset
    from .evaluate import _run_config
    from .model import Model
    from .ps.sparse import embedding_of

    run_dir = Path(run_dir)
    if not (run_dir / "params.h5").is_file():
        raise DbmpiError(f"{run_dir / 'params.h5'}: not found: pass the directory of a finished "
                         f"run (the last line `python -m dbmpi train` prints)")
    data_path = data or _run_config(run_dir).get("data", {}).get("path")
    if not data_path:
        raise DbmpiError(f"{run_dir}/config.toml has no data.path: pass --data DIR")
    params, model_cfg = load_params(run_dir / "params.h5")
    try:
        ds = open_dataset(data_path)
        vocab = read_vocab(data_path)
    except DataError as e:
        raise DbmpiError(str(e)) from None
    model = Model.from_spec(ds.feature_shape, model_cfg["layers"], ds.num_classes,
                            model_cfg.get("loss", "softmax"))
    if embedding_of(model) is None:
        raise DbmpiError(f"{run_dir}: its model has no embedding layer (not a language model "
                         f"run): train one with jobs/configs/lm_kjv.toml")
    if model.num_params != params.size:
        raise DbmpiError(f"{run_dir / 'params.h5'} holds {params.size} parameters but its "
                         f"model on {data_path} has {model.num_params}: pass the data set the "
                         "run was trained on with --data")
    model.params[:] = params
    return model, ds, vocab


def token_probs(model, x: np.ndarray, y: np.ndarray, batch: int = 2048) -> np.ndarray:
    """p(y[i] | x[i]) under the model's softmax, float64 (N,)."""
    out = np.empty(len(y), np.float64)
    for lo in range(0, len(y), batch):
        z = model.forward(x[lo:lo + batch]).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        out[lo:lo + batch] = np.exp(logp[np.arange(len(z)), y[lo:lo + batch]])
    return out


def nearest(E: np.ndarray, row: int, k: int) -> list[tuple[int, float]]:
    """The ``k`` rows of ``E`` other than ``row`` with the largest cosine similarity to it."""
    En = E.astype(np.float64)
    En /= np.maximum(np.linalg.norm(En, axis=1, keepdims=True), 1e-12)
    sims = En @ En[row]
    sims[row] = -np.inf
    order = np.argsort(-sims, kind="stable")[:k]
    return [(int(i), float(sims[i])) for i in order]


def neighbors(run_dir: str | Path, words: list[str], k: int = 10,
              data: str | None = None) -> dict[str, list[tuple[str, float]]]:
    """Nearest neighbours of each word, by cosine similarity of embedding rows."""
    if k < 1:
        raise DbmpiError(f"-k must be >= 1, got {k}")
    model, _ds, vocab = load_lm(run_dir, data)
    emb = model.layers[0]
    index = {w: i for i, w in enumerate(vocab["words"])}
    out = {}
    for word in words:
        key = word if word in index else word.lower()
        if key not in index:
            raise DbmpiError(f"--word {word!r}: not in the run's vocabulary ({len(index)} words, "
                             f"see vocab.json of its data set): pick a more frequent word")
        out[word] = [(vocab["words"][i], s) for i, s in nearest(emb.E, index[key], k)]
    return out


def format_neighbors(result: dict[str, list[tuple[str, float]]]) -> str:
    return "\n".join(f"{w}: " + ", ".join(f"{n} ({s:.2f})" for n, s in nn)
                     for w, nn in result.items())


def neighbors_json(result) -> str:
    return json.dumps({w: [[n, round(s, 4)] for n, s in nn] for w, nn in result.items()})
