"""Sparse embedding traffic: replicas fetch and push only the embedding rows they touch.

A language model's first layer is a ``V x d`` embedding table (:mod:`dbmpi.model.embedding`),
the first ``V d`` elements of the flat parameter vector. A step reads only the rows of the
words in its minibatch and its gradient is zero on every other row, so with
``downpour.sparse = true`` the parameter server moves those rows only; the rest of the model
(hidden and softmax layers) travels densely as before. Bytes per step then grow with the rows
touched, not with ``V``.

What changes against the dense protocol of :mod:`dbmpi.ps` (counters, slots, SEQ/DONE, the
order of syncs are the same):

* **Layout** (:func:`row_layout`): shard edges that fall inside the table are moved to a row
  boundary, so every row lives whole on one shard.
* **Fetch** (:meth:`SparseClient.fetch_rows`): the dense rest of the vector as before, plus,
  from each shard, the rows of the minibatch it holds: one ``Get`` with an indexed datatype
  per shard (:meth:`dbmpi.ps.rma.Window.get_rows`), or row copies from the shard's memory on
  the same node. Rows never fetched keep their last fetched values (they are not used).
* **Push** (:meth:`SparseClient.push_rows`): the slot (the worker's ``grads`` window, as
  before) carries the dense rest's gradient at its usual place, and at its start, packed, the
  gradients of the k touched rows (``k <= V``, so they fit in the table's room); a second
  worker-side window ``rows`` (int64, NSLOTS x (1 + max rows)) carries ``[k, row ids...]``
  for each slot, sorted. Both are written with local stores, then ``Win.Sync``, then the
  SEQ increment: a shard that sees SEQ move sees both.
* **Apply** (:class:`SparseShardService`): the shard reads ``k`` and the ids, picks the ids in
  its row range (a contiguous run, the ids being sorted), pulls only those rows' gradients
  (contiguous in the slot) and applies ``adagrad_rows`` (or SGD) to those rows of its block
  and accumulator; the dense rest goes through the dense path. A non-finite row gradient is
  refused before anything is written, like a dense push.

Each push is still applied exactly once and a slot is still reused only after DONE caught up,
so everything :mod:`dbmpi.ps` says about visibility and staleness holds.
"""

from __future__ import annotations

import numpy as np

import cython_kernels as ck

from ..errors import ConfigError, TrainingError
from ..optim.rules import Adagrad, _first_nonfinite
from .layout import ParamLayout
from .rma import Window
from .server import NSLOTS, ParameterServer, PSClient, ShardService


def embedding_of(model):
    """The model's embedding layer (its first layer), or None."""
    from ..model.embedding import Embedding

    layers = getattr(model, "layers", None)
    return layers[0] if layers and isinstance(layers[0], Embedding) else None


def enabled(cfg, model) -> bool:
    """Whether this run moves embedding rows sparsely (``downpour.sparse`` and a table)."""
    return bool(cfg.downpour.sparse) and embedding_of(model) is not None


def row_layout(total: int, num_shards: int, rows: int, dim: int) -> ParamLayout:
    """:meth:`ParamLayout.even`, with every edge inside the first ``rows * dim`` elements
    moved to the nearest row boundary (whole rows per shard)."""
    even = ParamLayout.even(total, num_shards)
    table = rows * dim
    bounds = [b if b >= table else int(round(b / dim)) * dim for b in even.bounds]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"topology.shards: {num_shards} shards leave one without parameters "
                          f"once the {rows} x {dim} embedding is cut at row boundaries: use "
                          f"fewer shards")
    return ParamLayout(total, tuple(bounds))


def max_rows(cfg, model) -> int:
    """Most rows one push can carry: every id of ``n_push`` minibatches, at most V."""
    emb = embedding_of(model)
    return min(emb.vocab, cfg.downpour.n_push * cfg.data.batch_size * emb.context)


class SparseParameterServer(ParameterServer):
    """The dense windows plus ``rows`` (the row ids of each push slot, on each worker).
    Collective over ``topo.comm``."""

    def __init__(self, topo, layout, worker_ranges, rows: int, dim: int, rows_max: int):
        super().__init__(topo, layout, worker_ranges)
        self.rows_n, self.dim, self.rows_max = int(rows), int(dim), int(rows_max)
        self.table = self.rows_n * self.dim
        self.row_slot = 1 + self.rows_max
        from ..topology import Role

        n = NSLOTS * self.row_slot if topo.role is Role.REPLICA else 0
        self.rows = Window(topo.comm, n, np.int64, "rows")

    def free(self) -> None:
        super().free()
        self.rows.free()


class SparseShardService(ShardService):
    """A shard that applies the table part of a push to the pushed rows only."""

    def __init__(self, ps: SparseParameterServer, optimizer, init_block, state=None, applied=0,
                 on_checkpoint=None):
        super().__init__(ps, optimizer, init_block, state, applied, on_checkpoint)
        lo, hi = ps.layout.block(self.shard)
        d = ps.dim
        self.n_table = max(0, min(hi, ps.table) - lo)  # my elements of the table
        self.r0, self.r1 = lo // d, (lo + self.n_table) // d  # my rows [r0, r1)
        self.E = self.params[:self.n_table].reshape(-1, d)
        self.E_state = self.state[:self.n_table].reshape(-1, d) if self.state.size else None
        self._ids = np.empty(ps.row_slot, np.int64)
        self._g = np.empty((ps.rows_max, d), np.float32) if self.n_table else None
        self.rows_applied = 0  # row updates applied (all pushes)

    def _pull_and_apply(self, w: int, slot: int, rank: int, size: int, off: int, a: int,
                        b: int) -> None:
        if a < self.n_table:
            self._apply_rows(w, slot, rank, size)
        a2 = max(a, self.n_table)
        if a2 < b:  # the dense rest of my block
            super()._pull_and_apply(w, slot, rank, size, off + (a2 - a), a2, b)

    def _read_ids(self, slot: int, rank: int) -> np.ndarray:
        """The sorted row ids of ``rank``'s push in ``slot``."""
        rows = self.ps.rows
        base = slot * self.ps.row_slot
        view = rows.shared(rank)
        if view is not None:
            rows.sync()
            k = int(view[base])
            return view[base + 1:base + 1 + k]
        rows.get(self._ids[:1], rank, base)
        rows.flush(rank)
        k = int(self._ids[0])
        rows.get(self._ids[1:1 + k], rank, base + 1)
        rows.flush(rank)
        return self._ids[1:1 + k]

    def _apply_rows(self, w: int, slot: int, rank: int, size: int) -> None:
        ps, d = self.ps, self.ps.dim
        ids = self._read_ids(slot, rank)
        i0, i1 = np.searchsorted(ids, (self.r0, self.r1))
        k = int(i1 - i0)
        if k == 0:
            return
        remote = slot * size + int(i0) * d  # packed row gradients at the slot's start
        view = ps.grads.shared(rank)
        if view is not None:
            ps.grads.sync()
            g = view[remote:remote + k * d].reshape(k, d)
        else:
            g = self._g[:k]
            ps.grads.get(g.reshape(-1), rank, remote)
            ps.grads.flush(rank)
        bad = _first_nonfinite(g.reshape(-1))
        if bad >= 0:
            raise TrainingError(
                f"shard {self.shard}: worker {w} pushed an embedding-row gradient holding NaN "
                f"or Inf (row {int(ids[i0 + bad // d])}); training diverged: lower "
                f"optimizer.learning_rate")
        local = ids[i0:i1] - self.r0
        opt = self.optimizer
        if isinstance(opt, Adagrad):
            ck.adagrad_rows(self.E, local, g, self.E_state, opt.lr, opt.eps)
        else:  # SGD
            self.E[local] -= np.float32(opt.lr) * g
        self.rows_applied += k


class SparseClient(PSClient):
    """A worker's client that can fetch only some rows of the table and push rows."""

    def __init__(self, ps: SparseParameterServer, start: int, stop: int, worker=None,
                 replica: int = 0):
        super().__init__(ps, start, stop, worker, replica)
        assert start == 0, "the table is at the start of the vector (no partitions)"

    def fetch_rows(self, params: np.ndarray, rows: np.ndarray,
                   read_own_pushes: bool = False) -> int:
        """Read the dense rest of my range and the table rows ``rows`` (sorted unique int64)
        into ``params``; return the bytes of parameters read."""
        if read_own_pushes:
            self.wait_acknowledged()
        ps = self.ps
        d, table = ps.dim, ps.table
        E = params[:table].reshape(-1, d)
        nbytes = 0
        remote_rows = []
        for seg in self.segments:
            target = ps.topo.shard_rank(seg.shard)
            self._note_fetch(seg.shard, target)
            view = ps.params.shared(target)
            if view is not None:
                ps.params.sync()
            t_hi = min(seg.stop, table)
            if seg.start < t_hi:  # rows of the table on this shard
                r0, r1 = seg.start // d, t_hi // d
                i0, i1 = np.searchsorted(rows, (r0, r1))
                mine = rows[i0:i1]
                if mine.size:
                    local = mine - r0
                    if view is not None:
                        E[mine] = view[seg.offset:seg.offset + (r1 - r0) * d].reshape(-1, d)[local]
                    else:
                        buf = np.empty((mine.size, d), np.float32)
                        ps.params.get_rows(buf, target, local, seg.offset)
                        remote_rows.append((mine, buf))
                    nbytes += mine.size * d * 4
            lo = max(seg.start, table)
            if lo < seg.stop:  # the dense rest
                n, soff = seg.stop - lo, seg.offset + (lo - seg.start)
                if view is not None:
                    np.copyto(params[lo:seg.stop], view[soff:soff + n])
                else:
                    ps.params.get(params[lo:seg.stop], target, soff)
                nbytes += n * 4
        self._complete_fetch()
        for mine, buf in remote_rows:
            E[mine] = buf
        return nbytes

    def push_rows(self, slot: np.ndarray, rows: np.ndarray, grad_rows: np.ndarray) -> int:
        """Post a push: ``slot`` (from :meth:`push_buffer`) holds the dense rest's gradient;
        ``rows`` (sorted unique) and ``grad_rows`` (k, d) are the table's. Returns the bytes of
        gradient and ids the shards will pull."""
        ps = self.ps
        k, d = rows.shape[0], ps.dim
        if k > ps.rows_max:
            raise ValueError(f"a push carries {k} rows, more than the {ps.rows_max} it has room for")
        slot[:k * d] = grad_rows.reshape(-1)
        base = ((self.pushes) % NSLOTS) * ps.row_slot
        ps.rows.local[base] = k
        ps.rows.local[base + 1:base + 1 + k] = rows
        ps.rows.sync()  # the ids are visible before SEQ moves (push() syncs the slot)
        self.push(slot)
        return (k * d + (self.stop - self.start - ps.table)) * 4 + (k + 1) * 8
