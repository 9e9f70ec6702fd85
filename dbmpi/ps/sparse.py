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
  its row range (a contiguous run, the ids being sorted), takes only those rows' gradients
  (contiguous in the slot) and applies the optimizer's row step
  (:meth:`dbmpi.optim.rules.Optimizer.step_rows`) to those rows of its block and state; the
  dense rest goes through the dense path. A non-finite row gradient is refused before
  anything is written, like a dense push.

Each push is still applied exactly once and a slot is still reused only after DONE caught up,
so everything :mod:`dbmpi.ps` says about visibility and staleness holds.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, TrainingError
from ..optim.rules import first_nonfinite
from .client import PSClient
from .layout import ParamLayout
from .rma import Window, progress
from .server import NSLOTS, ParameterServer, ShardService


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
    """The dense windows plus ``rows`` (the row ids of each push slot, on each worker) and,
    for workers on other nodes, ``row_inbox`` (the ids of their pushes' rows on this shard,
    on each shard). Collective over ``topo.comm``."""

    def __init__(self, topo, layout, worker_ranges, rows: int, dim: int, rows_max: int):
        super().__init__(topo, layout, worker_ranges)
        self.rows_n, self.dim, self.rows_max = int(rows), int(dim), int(rows_max)
        self.table = self.rows_n * self.dim
        self.row_slot = 1 + self.rows_max
        from ..topology import Role

        n = NSLOTS * self.row_slot if topo.role is Role.REPLICA else 0
        self.rows = Window(topo.comm, n, np.int64, "rows")
        self.ids_at: dict[tuple[int, int], int] = {}  # (s, w) -> offset in s's row_inbox
        sizes = [0] * layout.num_shards
        for (s, w) in self.inbox_at:
            if layout.block(s)[0] < self.table:  # the shard holds rows of the table
                self.ids_at[s, w] = sizes[s]
                sizes[s] += NSLOTS * self.row_slot
        self.row_inbox = Window(topo.comm, sizes[topo.index] if topo.role is Role.SHARD
                                else 0, np.int64, "row_inbox")
        self.post_windows.append(self.row_inbox)
        self.push_windows += [self.rows, self.row_inbox]

    def free(self) -> None:
        super().free()
        self.rows.free()


class SparseShardService(ShardService):
    """A shard that applies the table part of a push to the pushed rows only."""

    def __init__(self, ps: SparseParameterServer, optimizer, init_block, state=None, applied=0,
                 on_checkpoint=None, staleness_aware: bool = False, record_order: bool = False):
        # (the config refuses staleness_aware and record_order with sparse traffic)
        super().__init__(ps, optimizer, init_block, state, applied, on_checkpoint,
                         staleness_aware, record_order)
        lo, hi = ps.layout.block(self.shard)
        d = ps.dim
        self.n_table = max(0, min(hi, ps.table) - lo)  # my elements of the table
        self.r0, self.r1 = lo // d, (lo + self.n_table) // d  # my rows [r0, r1)
        self.E = self.params[:self.n_table].reshape(-1, d)
        # views (a copy would silently drop the updates): (len(state_names), rows, d)
        self.E_state = self.state[:, :self.n_table].reshape(len(self.state), self.r1 - self.r0, d)
        assert self.E_state.size == 0 or np.shares_memory(self.E_state, self.state)
        self.rows_applied = 0  # row updates applied (all pushes)

    def _apply_push(self, w: int, slot: int) -> None:
        _, _, _, a, b = self.worker_slices[w]
        if a < self.n_table:
            self._apply_rows(w, slot)
        a2 = max(a, self.n_table)
        if a2 < b:  # the dense rest of my block
            self._apply(w, a2, self._slot(w, slot, a2, b))

    def _pushed_rows(self, w: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids of my rows in worker ``w``'s push in ``slot``, their gradients (k, d))."""
        ps, d = self.ps, self.ps.dim
        rank, size = self.worker_slices[w][:2]
        if ps.mapped[self.shard, w]:  # its memory: every row it pushed, packed at the start
            base = slot * ps.row_slot
            view = ps.rows.shared(rank)
            ids = view[base + 1:base + 1 + int(view[base])]
            i0, i1 = np.searchsorted(ids, (self.r0, self.r1))
            g = ps.grads.shared(rank)[slot * size + int(i0) * d:slot * size + int(i1) * d]
            return ids[i0:i1], g.reshape(-1, d)
        base = ps.ids_at[self.shard, w] + slot * ps.row_slot  # my inbox: my rows only
        k = int(ps.row_inbox.local[base])
        return ps.row_inbox.local[base + 1:base + 1 + k], self._slot(w, slot, 0, k * d)\
            .reshape(-1, d)

    def _apply_rows(self, w: int, slot: int) -> None:
        ids, g = self._pushed_rows(w, slot)
        k = ids.shape[0]
        if k == 0:
            return
        bad = first_nonfinite(g.reshape(-1))
        if bad >= 0:
            raise TrainingError(
                f"shard {self.shard}: worker {w} pushed an embedding-row gradient holding NaN "
                f"or Inf (row {int(ids[bad // self.ps.dim])}); training diverged: lower "
                f"optimizer.learning_rate")
        self.optimizer.step_rows(self.E, ids - self.r0, g, self.E_state)
        self.rows_applied += k
        progress()


class SparseClient(PSClient):
    """A worker's client that can fetch only some rows of the table and push rows."""

    def __init__(self, ps: SparseParameterServer, start: int, stop: int, worker=None,
                 replica: int = 0):
        super().__init__(ps, start, stop, worker, replica)
        assert start == 0, "the table is at the start of the vector (no partitions)"
        self._rows = np.zeros(0, np.int64)  # the rows of the push being posted
        self._sent_ids: list[np.ndarray] = []  # id lists of Puts not yet flushed

    def _post(self, seg, slot: np.ndarray, k: int) -> bool:
        """Into a shard on another node's inboxes: the gradients of its rows, packed at the
        start of its inbox slot, their ids in its ``row_inbox``, then the dense rest at its
        usual place (a shard reads only its own rows, so each gets only those)."""
        ps, d = self.ps, self.ps.dim
        if ps.mapped[seg.shard, self.worker]:
            return False
        target = ps.topo.shard_rank(seg.shard)
        at, n = ps.inbox_at[seg.shard, self.worker]
        t_hi = min(seg.stop, ps.table)
        if seg.start < t_hi:
            i0, i1 = (int(i) for i in np.searchsorted(self._rows, (seg.start // d, t_hi // d)))
            ids = np.concatenate(([i1 - i0], self._rows[i0:i1])).astype(np.int64)
            self._sent_ids.append(ids)  # alive until the flush
            ps.row_inbox.put(ids, target, ps.ids_at[seg.shard, self.worker] + k * ps.row_slot)
            if i1 > i0:
                ps.inbox.put(slot[i0 * d:i1 * d], target, at + k * n)
        lo = max(seg.start, ps.table)
        if lo < seg.stop:
            ps.inbox.put(slot[lo:seg.stop], target, at + k * n + (lo - seg.start))
        return True

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
            raise ValueError(f"a push carries {k} rows, more than the {ps.rows_max} it has "
                             "room for")
        slot[:k * d] = grad_rows.reshape(-1)
        base = ((self.pushes) % NSLOTS) * ps.row_slot
        ps.rows.local[base] = k
        ps.rows.local[base + 1:base + 1 + k] = rows
        ps.rows.sync()  # the ids are visible before SEQ moves (push() syncs the slot)
        self._rows = rows
        self.push(slot)
        self._sent_ids.clear()  # push() flushed the Puts that read them
        return (k * d + (self.stop - self.start - ps.table)) * 4 + (k + 1) * 8
