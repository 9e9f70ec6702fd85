"""L-BFGS over vectors it never sees: the two-loop recursion and two line searches, no MPI.

The driver names vectors by small integer *handles* and asks a :class:`VectorSpace` to
combine them (copy, scale, axpy, linear combination) and to return dot products. Only the
dot products, scalars, come back to the driver. The same code therefore runs on local numpy
arrays (:class:`NumpySpace`, used by tests and by single-process runs) and on Sandblaster's
parameter-server shards (:class:`dbmpi.ps.vector.ShardVectors`), where every operation is
executed by each shard on its own slice of every vector.

The function is reached through an :class:`Objective`: it evaluates the point held in vector
``W`` and writes the gradient there into vector ``GW``. How (one process, or portions spread
over replicas) is its business.

Handles: ``W`` (point being evaluated), ``GW`` (its gradient), ``X`` (iterate), ``G`` (gradient
at ``X``), ``D`` (search direction), then ``m + 1`` slots for the ``s`` vectors and ``m + 1``
for the ``y`` vectors of the history (one slot more than the history size, so a new pair is
always written into a free slot and a rejected pair leaves the history untouched).

The algorithm, exactly (a reference implementation elsewhere must follow these choices to
reproduce the iterates):

* iteration 0, or an empty history: ``d = -g`` and the first trial step is
  ``min(1, 1 / ||g||_2)``; otherwise ``d = -H g`` by the two-loop recursion with
  ``H0 = gamma I``, ``gamma = s.y / y.y`` of the newest pair, first trial step 1;
* if ``g.d >= 0`` (not a descent direction), the history is cleared and ``d = -g``;
* line search: ``wolfe`` (default) finds a step satisfying the *strong* Wolfe conditions
  (Nocedal and Wright, Algorithms 3.5 and 3.6: bracketing by doubling the step, then zoom
  with the minimiser of the cubic interpolating both ends, replaced by bisection when it falls
  outside the middle 80% of the bracket); ``armijo`` backtracks from the first trial step
  until ``f(x + t d) <= f(x) + c1 t g.d``, each new step the minimiser of the quadratic through
  ``f(x)``, ``g.d`` and ``f(x + t d)``, clipped to ``[0.1 t, 0.5 t]``;
* the pair ``s = t d``, ``y = g_new - g`` is kept if ``s.y > 1e-10 * y.y``, dropping the
  oldest pair beyond ``m``;
* a line search that exhausts ``max_evals`` evaluations returns the best point it found that
  satisfies sufficient decrease (re-evaluated if it was not the last point evaluated), or no
  step at all, which ends the run (``stalled``);
* the run stops early when ``||g||_2 <= gtol``.

For mini-batches, :meth:`Objective.begin_iteration` tells the driver that the function changed
(a new batch): ``f`` and ``g`` at ``X`` are then evaluated again before the direction is
computed; the curvature pair of an iteration is always measured on one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

W, GW, X, G, D = 0, 1, 2, 3, 4
_FIXED = 5
CURVATURE_EPS = 1e-10  # keep a pair only if s.y > CURVATURE_EPS * y.y
LINE_SEARCHES = ("wolfe", "armijo")


def num_vectors(history: int) -> int:
    """How many vectors the driver uses for history size ``history``."""
    return _FIXED + 2 * (history + 1)


def s_slot(i: int) -> int:
    return _FIXED + i


def y_slot(i: int, history: int) -> int:
    return _FIXED + history + 1 + i


class VectorSpace(Protocol):
    """Operations on vectors named by handles. Only :meth:`dots` returns anything."""

    def copy(self, dst: int, src: int) -> None: ...

    def scale(self, x: int, alpha: float) -> None: ...

    def axpy(self, y: int, alpha: float, x: int) -> None:
        """``y += alpha * x``."""

    def lincomb(self, dst: int, alpha: float, x: int, beta: float, y: int) -> None:
        """``dst = alpha * x + beta * y`` (``dst`` may be ``x`` or ``y``)."""

    def dots(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """The dot products of the given pairs, after every operation queued before."""


class Objective(Protocol):
    def evaluate(self, dots: Sequence[tuple[int, int]]) -> tuple[float, np.ndarray]:
        """Evaluate f at vector ``W``, write its gradient into ``GW``, then return f and the
        requested dot products (which may involve ``GW``)."""

    def begin_iteration(self, iteration: int) -> bool:
        """Called before each iteration; True if the function changed (a new batch)."""


class NumpySpace:
    """Vectors as local numpy arrays: a :class:`VectorSpace` for one process.

    Also what each Sandblaster shard runs on its slices (``vectors`` may be views of RMA
    window memory).
    """

    def __init__(self, vectors: Sequence[np.ndarray]):
        self.v = list(vectors)

    @classmethod
    def zeros(cls, count: int, n: int, dtype=np.float64) -> NumpySpace:
        return cls([np.zeros(n, dtype=dtype) for _ in range(count)])

    def copy(self, dst: int, src: int) -> None:
        self.v[dst][:] = self.v[src]

    def scale(self, x: int, alpha: float) -> None:
        self.v[x] *= alpha

    def axpy(self, y: int, alpha: float, x: int) -> None:
        self.v[y] += alpha * self.v[x]

    def lincomb(self, dst: int, alpha: float, x: int, beta: float, y: int) -> None:
        self.v[dst][:] = alpha * self.v[x] + beta * self.v[y]

    def mul(self, dst: int, x: int, y: int) -> None:
        """Coefficient-wise ``dst = x * y`` (not needed by L-BFGS; for objectives)."""
        np.multiply(self.v[x], self.v[y], out=self.v[dst])

    def dot(self, a: int, b: int) -> float:
        return float(np.dot(self.v[a], self.v[b]))

    def dots(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.array([self.dot(a, b) for a, b in pairs], dtype=np.float64)


# -- line searches ---------------------------------------------------------------------------
@dataclass
class LineSearchResult:
    step: float  # 0.0: no acceptable step was found
    f: float
    slope: float  # g(x + step d) . d
    evals: int
    last: bool  # the accepted point is the last one evaluated (GW holds its gradient)
    ok: bool  # the line search's conditions hold at the accepted point


Phi = Callable[[float], tuple[float, float]]


def _bad(f: float, slope: float) -> bool:
    return not (math.isfinite(f) and math.isfinite(slope))


def cubic_minimizer(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimiser of the cubic through (a, fa) and (b, fb) with slopes da, db (NaN if none)."""
    if a == b:
        return math.nan
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if not disc >= 0.0:
        return math.nan
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = db - da + 2.0 * d2
    if denom == 0.0:
        return math.nan
    return b - (b - a) * (db + d2 - d1) / denom


def strong_wolfe(phi: Phi, f0: float, g0: float, t0: float, c1: float = 1e-4,
                 c2: float = 0.9, max_evals: int = 20) -> LineSearchResult:
    """A step satisfying ``f(t) <= f0 + c1 t g0`` and ``|f'(t)| <= -c2 g0`` (``g0 < 0``).

    ``phi(t)`` returns ``(f(x + t d), g(x + t d) . d)``. Nocedal and Wright, Algorithms 3.5
    (bracketing, doubling the step) and 3.6 (zoom, safeguarded cubic interpolation).
    """
    evals = 0
    t_prev, f_prev, d_prev = 0.0, f0, g0
    t = t0
    while evals < max_evals:
        f, d = phi(t)
        evals += 1
        if _bad(f, d) or f > f0 + c1 * t * g0 or (evals > 1 and f >= f_prev):
            return _zoom(phi, f0, g0, c1, c2, t_prev, f_prev, d_prev, t, f, d, evals,
                         max_evals, t)
        if abs(d) <= -c2 * g0:
            return LineSearchResult(t, f, d, evals, True, True)
        if d >= 0:
            return _zoom(phi, f0, g0, c1, c2, t, f, d, t_prev, f_prev, d_prev, evals,
                         max_evals, t)
        t_prev, f_prev, d_prev = t, f, d
        t = 2.0 * t
    # out of evaluations while the step kept growing: the last point has sufficient decrease
    return LineSearchResult(t_prev, f_prev, d_prev, evals, True, False)


def _zoom(phi, f0, g0, c1, c2, lo, f_lo, d_lo, hi, f_hi, d_hi, evals, max_evals, last_t):
    while evals < max_evals:
        t = cubic_minimizer(lo, f_lo, d_lo, hi, f_hi, d_hi)
        a, b = min(lo, hi), max(lo, hi)
        margin = 0.1 * (b - a)
        if not (math.isfinite(t) and a + margin <= t <= b - margin):
            t = 0.5 * (lo + hi)
        f, d = phi(t)
        evals += 1
        last_t = t
        if _bad(f, d) or f > f0 + c1 * t * g0 or f >= f_lo:
            hi, f_hi, d_hi = t, f, d
        else:
            if abs(d) <= -c2 * g0:
                return LineSearchResult(t, f, d, evals, True, True)
            if d * (hi - lo) >= 0:
                hi, f_hi, d_hi = lo, f_lo, d_lo
            lo, f_lo, d_lo = t, f, d
    if lo == 0.0:
        return LineSearchResult(0.0, f0, g0, evals, False, False)
    return LineSearchResult(lo, f_lo, d_lo, evals, lo == last_t, False)


def backtracking_armijo(phi: Phi, f0: float, g0: float, t0: float, c1: float = 1e-4,
                        max_evals: int = 20) -> LineSearchResult:
    """The first step from ``t0`` down with ``f(t) <= f0 + c1 t g0``; each retry is the
    minimiser of the quadratic through ``f0``, ``g0`` and ``f(t)``, clipped to
    ``[0.1 t, 0.5 t]``."""
    t = t0
    evals = 0
    while evals < max_evals:
        f, d = phi(t)
        evals += 1
        if not _bad(f, d) and f <= f0 + c1 * t * g0:
            return LineSearchResult(t, f, d, evals, True, True)
        tq = -g0 * t * t / (2.0 * (f - f0 - g0 * t)) if not _bad(f, d) else math.nan
        t = min(max(tq, 0.1 * t), 0.5 * t) if math.isfinite(tq) else 0.5 * t
    return LineSearchResult(0.0, f0, g0, evals, False, False)


# -- the driver ------------------------------------------------------------------------------
@dataclass
class IterationRecord:
    iteration: int  # 1-based: the iterate produced
    loss: float
    grad_norm: float
    step: float
    evals: int  # function evaluations this iteration (line search and re-evaluations)
    history: int  # pairs held after the iteration
    pair_skipped: bool
    line_search_ok: bool
    stalled: bool  # no acceptable step: the run ends


class LBFGS:
    """L-BFGS on a :class:`VectorSpace`; the initial point must already be in vector ``X``."""

    def __init__(self, space: VectorSpace, objective: Objective, history: int = 10,
                 line_search: str = "wolfe", c1: float = 1e-4, c2: float = 0.9,
                 max_evals: int = 20, gtol: float = 0.0):
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"line_search must be one of {LINE_SEARCHES}, got {line_search!r}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.space, self.objective = space, objective
        self.m = history
        self.line_search = line_search
        self.c1, self.c2, self.max_evals, self.gtol = c1, c2, max_evals, gtol
        self.order: list[int] = []  # history slots, oldest first
        self.rho: dict[int, float] = {}
        self.gamma = 1.0
        self.k = 0
        self.f = math.nan
        self.grad_norm = math.nan
        self._evals = 0
        self._gg = math.nan

    # -- evaluation --------------------------------------------------------------------------
    def _evaluate_at_x(self) -> None:
        self.space.copy(W, X)
        f, (gg,) = self.objective.evaluate([(GW, GW)])
        self._evals += 1
        self.space.copy(G, GW)
        self.f, self.grad_norm = f, math.sqrt(gg)

    def _phi(self, t: float) -> tuple[float, float]:
        self.space.lincomb(W, 1.0, X, t, D)
        f, (slope, gg) = self.objective.evaluate([(GW, D), (GW, GW)])
        self._evals += 1
        self._gg = gg
        return f, slope

    def start(self) -> float:
        """Evaluate the initial point; return f there."""
        self.objective.begin_iteration(0)
        self._evals = 0
        self._evaluate_at_x()
        return self.f

    # -- direction ---------------------------------------------------------------------------
    def _two_loop(self) -> None:
        """``D = -H G`` with the current history (``D = -G`` when it is empty)."""
        sp, m = self.space, self.m
        sp.copy(D, G)
        alphas = {}
        for i in reversed(self.order):
            (sq,) = sp.dots([(s_slot(i), D)])
            a = self.rho[i] * sq
            alphas[i] = a
            sp.axpy(D, -a, y_slot(i, m))
        if self.order:
            sp.scale(D, self.gamma)
        for i in self.order:
            (yr,) = sp.dots([(y_slot(i, m), D)])
            b = self.rho[i] * yr
            sp.axpy(D, alphas[i] - b, s_slot(i))
        sp.scale(D, -1.0)

    def _free_slot(self) -> int:
        used = set(self.order)
        return next(i for i in range(self.m + 1) if i not in used)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> IterationRecord:
        sp, m = self.space, self.m
        self.k += 1
        self._evals = 0
        if self.objective.begin_iteration(self.k - 1) and self.k > 1:
            self._evaluate_at_x()
        self._two_loop()
        (gd,) = sp.dots([(G, D)])
        if self.order and not gd < 0:
            self.order.clear()
            self.rho.clear()
            self._two_loop()
            (gd,) = sp.dots([(G, D)])
        t0 = 1.0 if self.order else min(1.0, 1.0 / self.grad_norm)
        if self.line_search == "wolfe":
            res = strong_wolfe(self._phi, self.f, gd, t0, self.c1, self.c2, self.max_evals)
        else:
            res = backtracking_armijo(self._phi, self.f, gd, t0, self.c1, self.max_evals)
        if res.step == 0.0:
            return IterationRecord(self.k, self.f, self.grad_norm, 0.0, self._evals,
                                   len(self.order), True, False, True)
        if not res.last:
            self._phi(res.step)
        slot = self._free_slot()
        si, yi = s_slot(slot), y_slot(slot, m)
        sp.lincomb(si, res.step, D, 0.0, D)
        sp.lincomb(yi, 1.0, GW, -1.0, G)
        sp.copy(X, W)
        sp.copy(G, GW)
        sy, yy = sp.dots([(si, yi), (yi, yi)])
        skipped = not sy > CURVATURE_EPS * yy
        if not skipped:
            self.order.append(slot)
            self.rho[slot] = 1.0 / sy
            self.gamma = sy / yy
            if len(self.order) > m:
                del self.rho[self.order.pop(0)]
        self.f, self.grad_norm = res.f, math.sqrt(self._gg)
        return IterationRecord(self.k, self.f, self.grad_norm, res.step, self._evals,
                               len(self.order), skipped, res.ok, False)

    def run(self, iterations: int, callback: Callable[[IterationRecord], None] | None = None
            ) -> list[IterationRecord]:
        """``start()`` then up to ``iterations`` steps (fewer if converged or stalled)."""
        self.start()
        out = []
        for _ in range(iterations):
            if self.grad_norm <= self.gtol:
                break
            rec = self.step()
            out.append(rec)
            if callback is not None:
                callback(rec)
            if rec.stalled:
                break
        return out
