"""Model parallelism, the plan: which part of every layer each of P partitions owns, and what
must cross between partitions. Pure arithmetic, no MPI (:mod:`dbmpi.model.parallel` runs it).

Every activation is a ``(B, features)`` matrix, the per-example image flattened row-major
(channels last). Each layer's output is cut into P contiguous feature ranges, one per partition:

* a dense layer by output units (partition p computes units ``[a, b)`` from the whole input);
* a spatial layer (local, l2pool, lcn) by output rows: rows ``[a, b)`` of an ``(H, W, C)``
  output are the features ``[a*W*C, b*W*C)``, so row blocks are feature ranges too;
* with ``split="locations"``, a locally connected layer by output *locations* instead:
  locations ``[a, b)`` (row-major, ``(i, j)`` is ``i*OW + j``) are the features
  ``[a*F, b*F)``, so the cut may fall inside a row. Every location costs the same (one GEMM with
  its own weights), so the partitions' work is even to one location where rows would leave it
  uneven by a whole row (19 rows over 2 partitions: 10 and 9, 5% of the layer).

How a kind is cut, what a slice reads and where a slice's parameters sit in the single-rank
vector are its registry entry's (:class:`~dbmpi.model.base.LayerKind` ``cut``,
``rows_needed``, ``param_pieces``; :mod:`dbmpi.model.registry`): the planner names no kind.
A kind with ``partitionable = False`` (the embedding) is refused over more than one partition.

To compute its part, partition p *needs* an input range (the whole input for dense; for a
spatial layer the rows its output rows read, :meth:`LayerSpec.rows_needed`). It owns part of
that range already (the previous layer's output it computed); the rest comes from the
partitions that own it. Forward, the owners send those activations (all-gather for dense,
halo rows for spatial layers); backward, p sends the gradient of what it received back to its
owner, who adds it (reduce-scatter for dense, halo gradients for spatial layers). The input
batch is read by every partition, so the first layer receives nothing; the logits are
all-gathered so that every partition computes the same loss.

Parameters: partition p holds only its layers' slices (a dense layer's weight columns and
biases of its units, a local layer's weights and biases of its output rows), in one flat
vector, layer after layer. The replica's *global* vector is the partitions' vectors one after
another (partition-major), so partition p owns the contiguous global range
:meth:`PartitionPlan.param_range` and fetches and pushes only that;
:meth:`PartitionPlan.to_model` / :meth:`PartitionPlan.from_model` convert between the global
vector and the single-rank :class:`~dbmpi.model.Model`'s vector.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .base import LayerSpec, Range
from .spec import resolve


def split(n: int, parts: int, weights=None) -> tuple[int, ...]:
    """``parts + 1`` bounds cutting ``n`` items into contiguous pieces proportional to
    ``weights`` (even by default), each at least one item."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    if n < parts:
        raise ValueError(f"cannot cut {n} items into {parts} non-empty parts")
    w = np.ones(parts) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (parts,) or not (w > 0).all():
        raise ValueError(f"weights must be {parts} positive numbers, got {weights!r}")
    bounds = np.rint(np.concatenate([[0], np.cumsum(w)]) / w.sum() * n).astype(np.int64)
    # every piece non-empty: push bounds apart from the left, then back from the right
    for i in range(1, parts + 1):
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    bounds[parts] = n
    for i in range(parts - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    return tuple(int(b) for b in bounds)


_split = split  # the planner's argument `split` shadows the function


def meet(a: Range, b: Range) -> Range | None:
    """The overlap of two column ranges, or None."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


@dataclass(frozen=True)
class Transfer:
    """Forward, ``src`` sends input features ``cols`` of ``layer`` to ``dst``; backward, ``dst``
    sends their gradient back to ``src``. ``layer == len(layers)`` is the logits all-gather."""

    layer: int
    src: int
    dst: int
    cols: Range

    @property
    def width(self) -> int:
        return self.cols[1] - self.cols[0]


@dataclass(frozen=True)
class LayerPart:
    """Layer ``spec`` on one partition."""

    spec: LayerSpec
    units: Range  # output rows (spatial) or units (dense) this partition computes
    out_cols: Range  # the same as output feature columns
    need: Range  # input feature columns it reads
    own_in: Range  # input feature columns it holds (the whole input for layer 0)
    computed: Range  # output columns its arithmetic spans (LCN: its whole input slab)
    num_params: int
    unit: str = "rows"  # what ``units`` counts: "rows", "units" (dense) or "locations"

    @property
    def crop(self) -> Range | None:
        """Columns of the computed output that are kept, or None when all are."""
        if self.computed == self.out_cols:
            return None
        return (self.out_cols[0] - self.computed[0], self.out_cols[1] - self.computed[0])


class PartitionPlan:
    """How a model (config layer tables + output layer) is cut over ``partitions`` ranks.

    ``weights`` (optional, one positive number per partition) makes the splits uneven: layer
    outputs are cut in proportion to them (even by default; a count that P does not divide is
    uneven anyway). ``split``: ``"locations"`` (default) cuts locally connected layers by
    output locations (even work; see the module doc); ``"rows"`` cuts every spatial layer by
    whole output rows.
    """

    SPLITS = ("rows", "locations")

    def __init__(self, input_shape, layers, num_classes: int, partitions: int,
                 weights=None, split: str = "locations"):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.split = split
        self.input_shape = tuple(int(s) for s in input_shape)
        self.layer_tables = [dict(t) for t in layers]
        self.num_classes = int(num_classes)
        self.P = P = int(partitions)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.specs: list[LayerSpec] = resolve(self.input_shape, layers, num_classes)
        self.parts: list[list[LayerPart]] = []
        n_in = self.specs[0].n_in
        own_in = [(0, n_in)] * P  # every partition reads the whole input batch
        for spec in self.specs:
            impl = spec.impl
            if P > 1 and not impl.partitionable:
                raise ConfigError(f"{spec.name} cannot be split over topology.partitions = {P}: "
                                  f"use topology.partitions = 1")
            try:
                cuts = impl.cut(spec, lambda n: _split(n, P, self.weights), split)
            except ValueError:
                what = "output rows" if spec.spatial else "output units"
                raise ConfigError(
                    f"{spec.name} has {spec.out_units} {what}, too few to split over "
                    f"topology.partitions = {P} (each partition needs at least one): use fewer "
                    f"partitions or a larger layer") from None
            rs = spec.in_row_size
            row = []
            for p, c in enumerate(cuts):
                need = (c.rows[0] * rs, c.rows[1] * rs)
                computed = need if impl.computes_slab else c.out_cols
                row.append(LayerPart(spec, c.units, c.out_cols, need, own_in[p], computed,
                                     c.num_params, c.unit))
            self.parts.append(row)
            own_in = [part.out_cols for part in row]
        self.param_sizes = tuple(sum(row[p].num_params for row in self.parts) for p in range(P))
        self.offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.param_sizes)]))
        self.num_params = self.offsets[-1]
        self.transfers = self._transfers()

    # -- what crosses partitions -----------------------------------------------------------
    def _transfers(self) -> list[list[Transfer]]:
        """Per layer (plus the logits gather at index ``num_layers``): the forward transfers."""
        out = []
        for i, row in enumerate(self.parts):
            ts = []
            if i > 0:  # layer 0 reads the replicated input batch
                for p in range(self.P):
                    for q in range(self.P):
                        cols = meet(row[p].need, row[q].own_in) if q != p else None
                        if cols is not None:
                            ts.append(Transfer(i, q, p, cols))
            out.append(ts)
        last = self.parts[-1]
        out.append([Transfer(len(self.parts), q, p, last[q].out_cols)
                    for p in range(self.P) for q in range(self.P) if q != p])
        return out

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    def sends(self, p: int, layer: int, backward: bool = False) -> list[Transfer]:
        """Transfers partition ``p`` sends for ``layer`` (forward, or backward)."""
        return [t for t in self.transfers[layer] if (t.dst if backward else t.src) == p]

    def recvs(self, p: int, layer: int, backward: bool = False) -> list[Transfer]:
        return [t for t in self.transfers[layer] if (t.src if backward else t.dst) == p]

    def bytes_per_step(self, batch: int, itemsize: int = 4) -> list[int]:
        """Bytes each partition sends per training step (forward + backward)."""
        out = [0] * self.P
        for layer, ts in enumerate(self.transfers):
            for t in ts:
                n = t.width * batch * itemsize
                out[t.src] += n  # forward
                if layer < len(self.parts):  # no backward through the logits gather
                    out[t.dst] += n
        return out

    def forward_bytes(self, batch: int, itemsize: int = 4) -> list[int]:
        """Bytes each partition sends in a forward pass alone (evaluation)."""
        out = [0] * self.P
        for ts in self.transfers:
            for t in ts:
                out[t.src] += t.width * batch * itemsize
        return out

    # -- parameters ------------------------------------------------------------------------
    def param_range(self, p: int) -> Range:
        """Partition ``p``'s range of the global (partition-major) parameter vector."""
        return self.offsets[p], self.offsets[p + 1]

    @property
    def ranges(self) -> list[Range]:
        return [self.param_range(p) for p in range(self.P)]

    def model_offsets(self) -> list[int]:
        """Offset of each layer in the single-rank Model's flat vector."""
        return [int(x) for x in np.concatenate([[0], np.cumsum(
            [s.num_params() for s in self.specs])])][:-1]

    def _pieces(self, p: int):
        """(partition offset, model piece) of partition p's parameters, layer by layer, the
        pieces as each kind's ``param_pieces`` describes them."""
        local = 0
        for row, off in zip(self.parts, self.model_offsets()):
            part = row[p]
            for piece in part.spec.impl.param_pieces(part.spec, part, off):
                yield local, piece
                local += piece[2] if piece[0] == "range" else piece[2] * (piece[5] - piece[4])

    @staticmethod
    def _model_view(model_vec: np.ndarray, piece):
        if piece[0] == "range":
            _, start, count = piece
            return model_vec[start:start + count]
        _, off, n_in, n_out, a, b = piece
        return model_vec[off:off + n_in * n_out].reshape(n_in, n_out)[:, a:b]

    def partition_from_model(self, p: int, model_vec: np.ndarray,
                             out: np.ndarray | None = None) -> np.ndarray:
        """Partition ``p``'s flat vector taken from the single-rank Model's vector."""
        if out is None:
            out = np.empty(self.param_sizes[p], dtype=model_vec.dtype)
        for local, piece in self._pieces(p):
            v = self._model_view(model_vec, piece)
            out[local:local + v.size] = v.reshape(-1)
        return out

    def from_model(self, model_vec: np.ndarray) -> np.ndarray:
        """The global (partition-major) vector of the single-rank Model's vector."""
        if model_vec.shape != (self.num_params,):
            raise ValueError(f"expected a vector of {self.num_params} parameters, got shape "
                             f"{model_vec.shape}")
        out = np.empty(self.num_params, dtype=model_vec.dtype)
        for p in range(self.P):
            lo, hi = self.param_range(p)
            self.partition_from_model(p, model_vec, out[lo:hi])
        return out

    def to_model(self, global_vec: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The single-rank Model's vector of the global (partition-major) vector."""
        if global_vec.shape != (self.num_params,):
            raise ValueError(f"expected a vector of {self.num_params} parameters, got shape "
                             f"{global_vec.shape}")
        if out is None:
            out = np.empty(self.num_params, dtype=global_vec.dtype)
        for p in range(self.P):
            base = self.offsets[p]
            for local, piece in self._pieces(p):
                v = self._model_view(out, piece)
                v[...] = global_vec[base + local:base + local + v.size].reshape(v.shape)
        return out

    # -- identity ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A short hash of everything the plan depends on (partitions compare it at start)."""
        ident = [self.input_shape, self.layer_tables, self.num_classes, self.P, self.weights]
        if self.split != "rows":
            ident.append(self.split)
        text = json.dumps(ident, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A table of every layer's split and the bytes per example crossing partitions."""
        lines = [f"{self.P} partitions, parameters {list(self.param_sizes)}"]
        for i, row in enumerate(self.parts):
            spec = row[0].spec
            unit = row[0].unit
            cuts = ", ".join(f"[{part.units[0]}, {part.units[1]})" for part in row)
            halo = sum(t.width for t in self.transfers[i]) * 4
            lines.append(f"  {spec.name}: {spec.in_shape} -> {spec.out_shape}, {unit} {cuts}; "
                         f"{halo} bytes/example in")
        logits = sum(t.width for t in self.transfers[-1]) * 4
        lines.append(f"  logits all-gather: {logits} bytes/example")
        return "\n".join(lines)
