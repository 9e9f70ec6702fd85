"""Interpolated modified Kneser-Ney n-gram language model (Chen & Goodman 1998), pure Python.

The reference a neural language model is measured against. It is trained on, and scores,
exactly the examples a neural model sees: ``contexts`` (N, n - 1) of word ids and
``targets`` (N,), as written by ``python -m data_tools shard text`` (each token with the
``n - 1`` tokens before it in its sentence, the sentence start padded with ``pad``). So both
models use the same vocabulary and the same token stream.

For order k (1 <= k <= n), context h (the last k - 1 context words) and word w::

    p_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h .)  +  gamma_k(h) p_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3 N3+(h .)) / c_k(h .)
    p_0(w) = 1 / V

where h' drops the first word of h, c_k(h .) = sum over w of c_k(h w), and N1, N2, N3+ count
the words w with c_k(h w) = 1, 2, >= 3. If h was never seen at order k, p_k = p_{k-1}.
Counts: c_n are raw counts; for k < n, c_k(g) is the continuation count (the number of
distinct words seen before g), except for k-grams that start with the sentence-start padding,
which have no real left context and keep their raw counts (SRILM/KenLM do the same for ``<s>``).
Discounts per order from the count-of-counts n1..n4 of c_k: ``Y = n1 / (n1 + 2 n2)``,
``D1 = 1 - 2Y n2/n1``, ``D2 = 2 - 3Y n3/n2``, ``D3+ = 3 - 4Y n4/n3``, each clipped to
[0, i] (so every p_k sums to 1 over the vocabulary).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def modified_discounts(counts) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts of ``counts`` (Chen & Goodman's estimates),
    with fallbacks when a count-of-count is zero (tiny corpora)."""
    cc = Counter(int(c) for c in counts if c <= 4)  # n_i: n-grams seen exactly i times
    n1, n2, n3, n4 = (cc.get(i, 0) for i in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
    d1 = 1 - 2 * y * n2 / n1 if n1 else 0.5
    d2 = 2 - 3 * y * n3 / n2 if n2 else d1
    d3 = 3 - 4 * y * n4 / n3 if n3 else d2
    return (min(max(d1, 0.0), 1.0), min(max(d2, 0.0), 2.0), min(max(d3, 0.0), 3.0))


class KneserNey:
    """An order-``n`` model (n = context length + 1) over a vocabulary of ``vocab`` ids.

    ``discounts`` (optional) fixes (D1, D2, D3+) for every order instead of estimating them.
    """

    def __init__(self, contexts: np.ndarray, targets: np.ndarray, vocab: int, pad: int = 0,
                 discounts: tuple[float, float, float] | None = None):
        contexts = np.asarray(contexts)
        targets = np.asarray(targets)
        if contexts.ndim != 2 or targets.shape != (contexts.shape[0],) or not len(targets):
            raise ValueError("need contexts (N, n - 1) and targets (N,) with N >= 1")
        self.n = contexts.shape[1] + 1
        self.vocab = int(vocab)
        self.pad = int(pad)
        grams = np.concatenate([contexts, targets[:, None]], axis=1).astype(np.int64)
        if grams.min() < 0 or grams.max() >= vocab:
            raise ValueError(f"word ids must be in [0, {vocab})")
        n = self.n
        raw: Counter = Counter(map(tuple, grams.tolist()))
        self.counts: dict[int, dict] = {n: dict(raw)}
        for k in range(n - 1, 0, -1):
            higher = raw
            raw = Counter()
            cont: Counter = Counter()
            for g, c in higher.items():
                raw[g[1:]] += c
                cont[g[1:]] += 1
            if k >= 2:  # a k-gram opening with padding has no left context: raw count
                for g in cont:
                    if g[0] == self.pad:
                        cont[g] = raw[g]
            self.counts[k] = dict(cont)
        self.discounts: dict[int, tuple[float, float, float]] = {}
        self.stats: dict[int, dict] = {}
        for k in range(1, n + 1):
            self.discounts[k] = discounts or modified_discounts(self.counts[k].values())
            st: dict[tuple, list] = {}
            for g, c in self.counts[k].items():
                s = st.get(g[:-1])
                if s is None:
                    s = st[g[:-1]] = [0, 0, 0, 0]
                s[0] += c
                s[min(c, 3)] += 1
            d1, d2, d3 = self.discounts[k]
            # per context: (total, gamma numerator)
            self.stats[k] = {h: (s[0], d1 * s[1] + d2 * s[2] + d3 * s[3]) for h, s in st.items()}

    def prob(self, context, word: int) -> float:
        """p(word | context), context = the n - 1 preceding ids (padding included)."""
        ctx = tuple(int(c) for c in context)
        w = int(word)
        p = 1.0 / self.vocab
        for k in range(1, self.n + 1):
            h = ctx[len(ctx) - (k - 1):] if k > 1 else ()
            st = self.stats[k].get(h)
            if st is None:
                continue
            total, gamma_num = st
            c = self.counts[k].get(h + (w,), 0)
            d = self.discounts[k][min(c, 3) - 1] if c else 0.0
            p = (max(c - d, 0.0) + gamma_num * p) / total
        return p

    def probs(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """p(target | context) for every row, float64."""
        return np.array([self.prob(c, w) for c, w in zip(np.asarray(contexts).tolist(),
                                                          np.asarray(targets).tolist())])

    def distribution(self, context) -> np.ndarray:
        """p(w | context) for every word of the vocabulary."""
        return np.array([self.prob(context, w) for w in range(self.vocab)])


def perplexity(p: np.ndarray) -> float:
    """exp of the mean negative log probability."""
    return float(np.exp(-np.mean(np.log(np.asarray(p, dtype=np.float64)))))


def best_interpolation(p_a: np.ndarray, p_b: np.ndarray) -> tuple[float, float]:
    """(lam, perplexity) minimising the perplexity of ``lam p_a + (1 - lam) p_b`` over lam in
    [0, 1] (grid of 0.01, then refined to 0.001 around the best)."""
    def ppl(lam):
        return perplexity(lam * p_a + (1 - lam) * p_b)
    grid = np.linspace(0, 1, 101)
    best = min(grid, key=ppl)
    fine = np.clip(np.linspace(best - 0.01, best + 0.01, 21), 0, 1)
    lam = float(min(fine, key=ppl))
    return lam, ppl(lam)
