"""Model parallelism, the run: one replica's model over the P ranks of its replica communicator.

:class:`PartitionedModel` carries out a :class:`~dbmpi.model.partition.PartitionPlan` on
partition ``comm.rank``. It has the single-rank :class:`~dbmpi.model.Model`'s interface
(``params``, ``grads``, ``forward``, ``forward_backward``, ``evaluate``) over its own
parameters only, and ``param_range``, the global range it fetches and pushes.

Image layers move no data but the halos. The input of an image layer (or of the dense layer
after the last one) lives in one ``(B, span)`` slab buffer per partition covering the columns
it reads and the columns the previous layer writes: the previous layer writes its rows
straight into it (the kernels take batch-strided views), the halos are received straight into
it and sent straight out of it (an MPI vector datatype per block), and the layer reads it in
place; backward mirrors this with a gradient slab. Dense layers gather into contiguous
matrices as before.

Messages and their deadlines are :mod:`dbmpi.model.exchange`'s.
"""

from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

import cython_kernels as ck

from .base import FlatVectors, Layer, bind_all
from .exchange import Block, Exchange, PartitionError
from .model import Model, evaluate_in_batches, flat_batch
from .partition import PartitionPlan, Range, Transfer, meet


class PartitionedModel(FlatVectors):
    """Partition ``comm.Get_rank()`` of a model cut as ``plan`` says. Collective over ``comm``
    (the replica communicator, P ranks) at construction.

    Parameters and gradients are this partition's flat float32 vectors (``params``,
    ``grads``); ``param_range`` is where they sit in the replica's global vector.
    """

    def __init__(self, plan: PartitionPlan, comm: MPI.Comm, loss: str = "softmax",
                 timeout_s: float | None = None, label: str = ""):
        if comm.Get_size() != plan.P:
            raise ValueError(f"the plan has {plan.P} partitions but the communicator has "
                             f"{comm.Get_size()} ranks")
        if loss not in ("softmax", "hinge"):
            raise ValueError(f"loss must be 'softmax' or 'hinge', got {loss!r}")
        prints = comm.allgather(plan.fingerprint)
        if len(set(prints)) != 1:
            raise PartitionError(f"the partitions were given different model plans "
                                 f"(fingerprints {prints}): every rank must read the same config")
        self.plan = plan
        self.loss = loss
        self.comm = comm.Dup()
        self.p = p = self.comm.Get_rank()
        self.P = plan.P
        self.parts = [row[p] for row in plan.parts]
        # each kind builds its slice (LCN computes only the rows the partition owns)
        self.layers: list[Layer] = [part.spec.impl.make_part(part) for part in self.parts]
        self.num_params = plan.param_sizes[p]
        self.param_range = plan.param_range(p)
        self.params = np.zeros(self.num_params, dtype=np.float32)
        self.grads = np.zeros(self.num_params, dtype=np.float32)
        for layer, part in zip(self.layers, self.parts):
            assert layer.num_params == part.num_params, (layer, part)
        bind_all(self.layers, self.params, self.grads)
        names = [part.spec.name for part in self.parts]
        # poll a few milliseconds before sleeping when every rank of the job has a core (a
        # halo is then seen within microseconds); oversubscribed, give the core up sooner
        alone = MPI.COMM_WORLD.Get_size() <= len(os.sched_getaffinity(0))
        self.exchange = Exchange(self.comm, names, timeout_s, spin_s=5e-3 if alone else 2e-4,
                                 label=label or f"partition {p} of {self.P}")
        self._bufs: dict[tuple, np.ndarray] = {}
        # Slabs: the input of layer i >= 1 after an image layer lives in one (B, span) buffer
        # covering the columns it reads and those the previous layer writes; that layer
        # writes its rows into it, halos are received into it, and layer i reads it in place.
        n = len(self.layers)
        image = [layer.takes_views for layer in self.layers]
        self._slab_fwd = [i > 0 and image[i - 1] for i in range(n)]
        self._slab_bwd = [self._slab_fwd[i] and image[i] for i in range(n)]
        self._slabs: dict[tuple[int, int], _Slab] = {}
        self._types: dict[tuple[int, int, int], MPI.Datatype] = {}

    # -- set-up helpers -----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.plan.num_classes

    def set_model_params(self, model_vec: np.ndarray) -> None:
        """Take this partition's parameters from a single-rank Model's vector."""
        self.plan.partition_from_model(self.p, model_vec, self.params)

    def init_params(self, seed: int) -> np.ndarray:
        """The single-rank Model's initial parameters, this partition's share."""
        full = Model.from_spec(self.plan.input_shape, self.plan.layer_tables,
                               self.plan.num_classes, self.loss)
        self.set_model_params(full.init_params(seed))
        return self.params

    def free(self) -> None:
        for t in self._types.values():
            t.Free()
        self._types.clear()
        self.comm.Free()

    def stats(self) -> dict:
        ex = self.exchange
        return {"bytes_sent": ex.bytes_sent, "messages_sent": ex.messages_sent,
                "bytes_received": ex.bytes_received, "wait_s": ex.wait_s,
                "wait_cpu_s": ex.wait_cpu_s}

    def reset_stats(self) -> None:
        ex = self.exchange
        ex.bytes_sent = ex.messages_sent = ex.bytes_received = 0
        ex.wait_s = ex.wait_cpu_s = 0.0

    # -- buffers -----------------------------------------------------------------------------
    def _buf(self, key, shape) -> np.ndarray:
        b = self._bufs.get((key, shape))
        if b is None:
            b = self._bufs[(key, shape)] = np.empty(shape, np.float32)
        return b

    def _send_view(self, src: np.ndarray, cols: Range, base: int, key) -> np.ndarray:
        """Columns ``cols`` (global) of ``src`` whose first column is ``base``, contiguous."""
        v = src[:, cols[0] - base:cols[1] - base]
        if v.flags.c_contiguous:
            return v
        out = self._buf(key, v.shape)
        np.copyto(out, v)
        return out

    # -- the two exchanges -------------------------------------------------------------------
    def _gather(self, layer: int, own: np.ndarray, own_in: Range, need: Range) -> np.ndarray:
        """Forward: the input columns ``need`` of ``layer`` from my own columns and the peers'."""
        plan, p, B = self.plan, self.p, own.shape[0]
        recv_ts = plan.recvs(p, layer)
        sends = [(t.dst, self._send_view(own, t.cols, own_in[0], ("fs", layer, t.dst)))
                 for t in plan.sends(p, layer)]
        recvs = [(t.src, self._buf(("fr", layer, t.src), (B, t.width))) for t in recv_ts]
        pending = self.exchange.start(layer, False, sends, recvs)
        if need == own_in and own.flags.c_contiguous:
            X = own
        else:
            X = self._buf(("x", layer), (B, need[1] - need[0]))
            m = meet(need, own_in)
            if m is not None:
                X[:, m[0] - need[0]:m[1] - need[0]] = own[:, m[0] - own_in[0]:m[1] - own_in[0]]
        self.exchange.wait(pending)
        for t, (_, buf) in zip(recv_ts, recvs):
            X[:, t.cols[0] - need[0]:t.cols[1] - need[0]] = buf
        return X

    def _scatter_add(self, layer: int, dX: np.ndarray, own_in: Range, need: Range) -> np.ndarray:
        """Backward: the gradient of my own input columns from my dX and the peers' parts."""
        plan, p, B = self.plan, self.p, dX.shape[0]
        # I received t.cols from t.src forward: send their gradient back; and the reverse.
        back_sends: list[Transfer] = plan.sends(p, layer, backward=True)
        back_recvs: list[Transfer] = plan.recvs(p, layer, backward=True)
        sends = [(t.src, self._send_view(dX, t.cols, need[0], ("bs", layer, t.src)))
                 for t in back_sends]
        recvs = [(t.dst, self._buf(("br", layer, t.dst), (B, t.width))) for t in back_recvs]
        pending = self.exchange.start(layer, True, sends, recvs)
        if need == own_in:
            D = dX
        else:
            D = self._buf(("d", layer), (B, own_in[1] - own_in[0]))
            m = meet(need, own_in) or (own_in[0], own_in[0])
            a, b = m[0] - own_in[0], m[1] - own_in[0]
            D[:, a:b] = dX[:, m[0] - need[0]:m[1] - need[0]]
            D[:, :a] = 0  # rows I own that my own computation did not read
            D[:, b:] = 0
        self.exchange.wait(pending)
        for t, (_, buf) in zip(back_recvs, recvs):
            D[:, t.cols[0] - own_in[0]:t.cols[1] - own_in[0]] += buf
        return D

    # -- slabs (image layers: no copies) -----------------------------------------------------
    def _vector(self, B: int, width: int, row: int) -> MPI.Datatype:
        t = self._types.get((B, width, row))
        if t is None:
            t = self._types[(B, width, row)] = MPI.FLOAT.Create_vector(B, width, row).Commit()
        return t

    def _slab(self, i: int, B: int) -> _Slab:
        sl = self._slabs.get((i, B))
        if sl is None:
            sl = self._slabs[(i, B)] = _Slab(self, i, B)
        return sl

    # -- forward and backward ----------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The logits of the whole batch, the same on every partition (an internal buffer)."""
        own = flat_batch(x)
        B = own.shape[0]
        if own.shape[1] != self.parts[0].own_in[1]:
            raise ValueError(f"expected {self.parts[0].own_in[1]} features per example, got "
                             f"{own.shape[1]}")
        n = len(self.layers)
        ex = self.exchange
        for i, (layer, part) in enumerate(zip(self.layers, self.parts)):
            out = self._slab(i + 1, B).out if i + 1 < n and self._slab_fwd[i + 1] else None
            if self._slab_fwd[i]:
                sl = self._slab(i, B)
                ex.wait(ex.start(i, False, sl.sends, sl.recvs))
                X = sl.x
            elif i == 0 and layer.takes_views:
                X = own[:, part.need[0]:part.need[1]]  # a row slab of the input batch, a view
            else:
                X = self._gather(i, own, part.own_in, part.need)
            own = layer.forward(X, out=out)
        last = self.parts[-1]
        logits = self._gather(n, own, last.out_cols, (0, self.plan.num_classes))
        ex.end_pass(range(n + 1), backward=False)
        return logits

    def forward_backward(self, x: np.ndarray, labels: np.ndarray,
                         accumulate: bool = False) -> tuple[float, int]:
        """Mean loss and number of correct predictions (the same on every partition); writes
        d(mean loss)/d(my params) to ``self.grads`` (adds it there with ``accumulate``)."""
        if accumulate and not self.can_accumulate:
            raise ValueError("this model's layers cannot accumulate gradients in place")
        logits = self.forward(x)
        B = logits.shape[0]
        n_correct = int(np.count_nonzero(logits.argmax(axis=1) == labels))
        d = self._buf("dlogits", logits.shape)
        if self.loss == "softmax":
            loss = ck.softmax_xent(logits, labels, d)
        else:
            loss = ck.multiclass_hinge(logits, labels, d)
        a, b = self.parts[-1].out_cols
        dy = self._buf("dy_out", (B, b - a))
        np.copyto(dy, d[:, a:b])
        ex = self.exchange
        for i in range(len(self.layers) - 1, -1, -1):
            part, layer = self.parts[i], self.layers[i]
            if i > 0 and self._slab_bwd[i]:
                sl = self._slab(i, B)
                layer.backward(dy, need_dx=True, accumulate=accumulate, dx_out=sl.dx)
                for lo, hi in sl.unread:  # rows I own that my own layer did not read
                    sl.g[:, lo:hi] = 0
                ex.wait(ex.start(i, True, sl.back_sends, sl.back_recvs))
                for (_, buf), dst in zip(sl.back_recvs, sl.back_add):
                    dst += buf
                dy = sl.dy
            else:
                dX = layer.backward(dy, need_dx=i > 0, accumulate=accumulate)
                if i > 0:
                    dy = self._scatter_add(i, dX, part.own_in, part.need)
        ex.end_pass(range(1, len(self.layers)), backward=True)
        return float(loss), n_correct

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch: int = 1024
                 ) -> tuple[float, float]:
        """(mean loss, accuracy) over a data set, in batches (collective over the partitions)."""
        return evaluate_in_batches(self, x, labels, batch)


class _Slab:
    """The buffers and messages of the input of layer ``i`` (after an image layer) of one
    partition, for batch size ``B``: ``buf`` spans the columns layer ``i`` reads (``need``) and
    those layer ``i - 1`` writes (``own_in``); ``g`` is its gradient, the same shape."""

    def __init__(self, pm: PartitionedModel, i: int, B: int):
        part, plan, p = pm.parts[i], pm.plan, pm.p
        need, own = part.need, part.own_in
        lo, hi = min(need[0], own[0]), max(need[1], own[1])
        span = hi - lo
        self.buf = np.empty((B, span), np.float32)
        self.g = np.empty((B, span), np.float32)
        self.out = self.buf[:, own[0] - lo:own[1] - lo]  # layer i - 1 writes its rows here
        self.x = self.buf[:, need[0] - lo:need[1] - lo]  # layer i reads its slab here
        self.dx = self.g[:, need[0] - lo:need[1] - lo]
        self.dy = self.g[:, own[0] - lo:own[1] - lo]

        def block(base, cols):
            return Block(base, cols[0] - lo, cols[1] - cols[0],
                         pm._vector(B, cols[1] - cols[0], span))

        self.sends = [(t.dst, block(self.buf, t.cols)) for t in plan.sends(p, i)]
        self.recvs = [(t.src, block(self.buf, t.cols)) for t in plan.recvs(p, i)]
        # backward: the gradient of the halos I read goes back to their owners; the gradient
        # of my rows that others read comes in and is added
        self.back_sends = [(t.src, block(self.g, t.cols))
                           for t in plan.sends(p, i, backward=True)]
        back_recvs = plan.recvs(p, i, backward=True)
        self.back_recvs = [(t.dst, np.empty((B, t.width), np.float32)) for t in back_recvs]
        self.back_add = [self.g[:, t.cols[0] - lo:t.cols[1] - lo] for t in back_recvs]
        self.unread = [(a - lo, b - lo) for a, b in ((own[0], min(own[1], need[0])),
                                                     (max(own[0], need[1]), own[1])) if a < b]

