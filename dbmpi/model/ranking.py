"""Collobert & Weston's ranking objective for a language model (ICML 2008; JMLR 2011, 4.6).

The network scores a *window*: the context words followed by a candidate word, looked up in
the shared embedding table, then the hidden layers, then one linear output unit. Training
ranks the true next word above a corrupt one drawn uniformly from the rest of the vocabulary:

    loss = mean_b max(0, 1 - f(context_b, y_b) + f(context_b, w_b))

There is no softmax over the vocabulary: a step costs two window passes per example whatever
|V|, and it touches only the embedding rows of its context, target and corrupt words (what a
sparse fetch brings: :meth:`RankingLM.rows_read`). Unnormalised scores give no perplexity:
:meth:`RankingLM.evaluate` reports the hinge loss and the ranking accuracy (the fraction of
examples whose true word outscores its corrupt word) for a fixed draw of corrupt words, so
evaluations of one data set compare across runs; the word embeddings are the product
(``python -m dbmpi neighbors``).
"""

from __future__ import annotations

import numpy as np

from .model import Model
from .spec import make_layer, resolve

EVAL_SEED = 20080705  # the corrupt words of every evaluation (ICML 2008's first day)


class RankingLM(Model, objective="ranking"):
    """Window scorer over ``context + 1`` word ids with one output unit; trained by ranking."""

    def __init__(self, layers: list, vocab: int):
        self.loss = "ranking"
        self.vocab = int(vocab)
        if self.vocab < 2:
            raise ValueError(f"the ranking objective needs a vocabulary of >= 2 words, got "
                             f"{self.vocab}")
        self._bind_layers(layers)
        self._dlogits: dict[int, np.ndarray] = {}
        self.rng = np.random.default_rng(0)
        self._prepared: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_spec(cls, input_shape, layers, vocab: int) -> RankingLM:
        """``input_shape`` is the data's ``(context,)``; the first layer must be an embedding
        (its vocabulary defaults to ``vocab``, the data set's number of classes)."""
        if not layers or layers[0].get("type") != "embedding":
            raise ValueError("the ranking objective needs an embedding layer first")
        first = {"vocab": int(vocab), **layers[0]}
        (context,) = input_shape
        specs = resolve((int(context) + 1,), [first, *layers[1:]], 1)
        return cls([make_layer(s) for s in specs], vocab)

    @property
    def num_classes(self) -> int:  # the output unit is a score, not a class
        return self.vocab

    def seed_training(self, seed) -> None:
        super().seed_training(seed)
        self.rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), len(self.layers)])

    @staticmethod
    def corrupt(y: np.ndarray, vocab: int, rng: np.random.Generator) -> np.ndarray:
        """One word per example, uniform over the vocabulary without the true word."""
        w = rng.integers(0, vocab - 1, len(y))
        return w + (w >= y)

    def rows_read(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Draws the corrupt words of the coming step on this batch (kept for it) and returns
        every embedding row the step reads: context, target and corrupt words."""
        w = self.corrupt(labels, self.vocab, self.rng)
        self._prepared = (labels, w)
        return np.unique(np.concatenate([np.ravel(x), labels, w])).astype(np.int64)

    @staticmethod
    def _windows(x: np.ndarray, words: np.ndarray) -> np.ndarray:
        """The windows [context_b, words_b]."""
        return np.column_stack([np.asarray(x, np.int64).reshape(len(words), -1), words])

    def scores(self, x: np.ndarray, words: np.ndarray) -> np.ndarray:
        """f(context_b, words_b) for every example (float64)."""
        return self.forward(self._windows(x, words))[:, 0].astype(np.float64)

    def forward_backward(self, x: np.ndarray, labels: np.ndarray,
                         accumulate: bool = False) -> tuple[float, int]:
        """Mean hinge loss and the number of examples ranked right; writes (or adds) the
        gradient into ``self.grads``."""
        y = np.asarray(labels, np.int64)
        p = self._prepared
        self._prepared = None
        w = p[1] if p is not None and p[0] is labels else self.corrupt(y, self.vocab, self.rng)
        B = len(y)
        # one pass over the 2B windows: [context, true word] then [context, corrupt word]
        both = np.concatenate([self._windows(x, y), self._windows(x, w)])
        s = self.forward(both, train=True)[:, 0]
        margin = 1.0 - s[:B].astype(np.float64) + s[B:]
        active = margin > 0
        d = self._dlogits.get(2 * B)
        if d is None:
            d = self._dlogits[2 * B] = np.empty((2 * B, 1), np.float32)
        right = int(np.count_nonzero(s[:B] > s[B:]))
        d[:B, 0] = active * (-1.0 / B)
        d[B:, 0] = active * (1.0 / B)
        self._backward(d, accumulate)
        return float(np.maximum(margin, 0).mean()), right

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch: int = 2048
                 ) -> tuple[float, float]:
        """(mean hinge loss, ranking accuracy) against corrupt words drawn with a fixed seed."""
        y = np.asarray(labels, np.int64)
        w = self.corrupt(y, self.vocab, np.random.default_rng(EVAL_SEED))
        loss = right = 0.0
        for lo in range(0, len(y), batch):
            sl = slice(lo, lo + batch)
            pos, neg = self.scores(x[sl], y[sl]), self.scores(x[sl], w[sl])
            loss += float(np.maximum(1.0 - pos + neg, 0).sum())
            right += int(np.count_nonzero(pos > neg))
        n = max(len(y), 1)
        return loss / n, right / n
