"""Neural language model runs after training: token probabilities and word neighbours.

``python -m dbmpi neighbors RUN_DIR --word WORD [-k 10]`` prints the ``k`` words whose
embedding rows (the first layer of the run's model, ``params.h5``) have the largest cosine
similarity with WORD's, using the vocabulary (``vocab.json``) of the run's data set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DbmpiError
from .rundir import RunDir


def load_lm(run_dir: str | Path, data: str | None = None):
    """(model with the run's final parameters, data set, vocabulary dict) of an LM run."""
    from .ps.sparse import embedding_of

    rd = RunDir.open(run_dir)
    params, spec = rd.params()
    ds = rd.dataset(data)
    vocab = rd.vocab(data)
    model = rd.model(ds, spec, params.size)
    if embedding_of(model) is None:
        raise DbmpiError(f"{rd.path}: its model has no embedding layer (not a language model "
                         f"run): train one with jobs/configs/lm_kjv.toml")
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

