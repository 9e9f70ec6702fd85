"""The layer registry: one :class:`~dbmpi.model.base.LayerKind` per ``type`` of a ``[model]
layers`` table. Config validation (:mod:`dbmpi.config`), shapes (:mod:`dbmpi.model.spec`), the
partition planner (:mod:`dbmpi.model.partition`) and the builders (:class:`~dbmpi.model.Model`,
:mod:`dbmpi.model.parallel`) look kinds up here, so a new kind is a layer class, a kind class
and a :func:`register` call.

Spatial kinds and the input rows they read (``rows_needed``), for output rows ``[a, b)``:

========  ===================================  ======================================
kind      output rows                          input rows read
========  ===================================  ======================================
local     ``(H - kernel) // stride + 1``       ``[a*stride, (b-1)*stride + kernel)``
l2pool    ``(H - size) // stride + 1``         ``[a*stride, (b-1)*stride + size)``
lcn       ``H`` (same padding)                 ``[a - 2r, b + 2r)`` clipped, ``r = size // 2``
========  ===================================  ======================================

LCN reads ``2r`` rows each side because its output at a row depends on the local mean at
rows up to ``r`` away, each of which depends on inputs ``r`` further.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise

from ..errors import ConfigError
from .base import Cut, Layer, LayerKind, LayerSpec, Range
from .embedding import Embedding
from .image import LCN, L2Pool, Local
from .layers import Dense

# Registration order is the order config errors list the kinds in.
LAYER_KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind`` under ``kind.name`` (a name may be registered once)."""
    if kind.name in LAYER_KINDS:
        raise ValueError(f"layer kind {kind.name!r} is registered already")
    LAYER_KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register their own kinds clean up with this)."""
    del LAYER_KINDS[name]


def layer_kind(table_or_name) -> LayerKind:
    """The kind of a layer table (``type`` defaults to dense) or of a kind name."""
    name = table_or_name if isinstance(table_or_name, str) else table_or_name.get("type", "dense")
    return LAYER_KINDS[name]


class DenseKind(LayerKind):
    """``y = act(x @ W + b)``: split by output units, each reading the whole input."""

    name = "dense"
    required = ("units",)
    activation = "relu"
    dropout = True

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        units = int(table["units"])
        return LayerSpec("dense", index, (math.prod(in_shape),), (units,),
                         {"activation": table.get("activation", self.activation),
                          "dropout": float(table.get("dropout", 0.0))}, self)

    def num_params(self, spec, units) -> int:
        return spec.n_in * units + units

    def param_pieces(self, spec, part, offset) -> Iterator[tuple]:
        """A column block of ``W (n_in, n_out)`` (a strided view), then the biases."""
        a, b = part.units
        yield "matrix", offset, spec.n_in, spec.n_out, a, b
        yield "range", offset + spec.n_in * spec.n_out + a, b - a

    def make(self, spec, units=None) -> Layer:
        a, b = (0, spec.out_units) if units is None else units
        return Dense(spec.n_in, b - a, spec.opts["activation"], spec.opts.get("dropout", 0.0))


class EmbeddingKind(LayerKind):
    """Word ids ``(context,)`` -> their concatenated embeddings; the first layer only."""

    name = "embedding"
    required = ("dim",)
    optional = ("vocab",)
    dropout = True
    partitionable = False  # the table is addressed by word: rows go sparse, not to partitions

    def config_errors(self, table, index, partitions):
        if index != 0:
            yield (f"model.layers[{index}]",
                   "is an embedding layer: it must be the first layer (it takes the word ids)")

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        if index != 0 or len(in_shape) != 1:
            raise ConfigError(f"model.layers[{index}]: an embedding layer must come first and "
                              f"take word ids (context,), got features of shape {in_shape}: put "
                              f"it first and shard text with `python -m data_tools shard text`")
        opts = {"vocab": int(table.get("vocab", num_classes)), "dim": int(table["dim"]),
                "dropout": float(table.get("dropout", 0.0))}
        return LayerSpec("embedding", index, in_shape, (in_shape[0] * opts["dim"],), opts, self)

    def num_params(self, spec, units) -> int:
        return spec.opts["vocab"] * spec.opts["dim"]

    def make(self, spec, units=None) -> Layer:
        return Embedding(spec.opts["vocab"], spec.opts["dim"], spec.in_shape[0],
                         spec.opts.get("dropout", 0.0))


class _Window(LayerKind):
    """A spatial kind over ``k x k`` windows moved by ``stride`` (no padding)."""

    spatial = True
    window_key = "kernel"
    default_stride_is_window = False

    def window(self, spec) -> tuple[int, int]:
        return spec.opts[self.window_key], spec.opts["stride"]

    def rows_needed(self, spec, a, b) -> Range:
        k, s = self.window(spec)
        return a * s, (b - 1) * s + k

    def _grid(self, table, in_shape, index) -> tuple[int, int, int, int]:
        """(k, stride, OH, OW); the window must fit in the image."""
        H, W, _ = in_shape
        k = int(table[self.window_key])
        s = int(table.get("stride", k if self.default_stride_is_window else 1))
        if k > H or k > W:
            key = self.window_key
            raise ConfigError(f"model.layers[{index}].{key}: {k} is larger than its input image "
                              f"{H} x {W}: use a smaller {key} or fewer downsampling layers")
        return k, s, (H - k) // s + 1, (W - k) // s + 1


def _slab(spec: LayerSpec, units: Range | None) -> tuple[tuple[int, ...], Range]:
    """(in-shape, output rows) of the whole layer or of output rows ``units``: a slice reads
    the input slab ``rows_needed(a, b)``; the whole layer its whole input (rows past the last
    window included)."""
    a, b = (0, spec.out_units) if units is None else units
    lo, hi = (0, spec.in_shape[0]) if units is None else spec.rows_needed(a, b)
    return (hi - lo, *spec.in_shape[1:]), (a, b)


def _check_rows(spec: LayerSpec, layer, rows: Range):
    if layer.out_shape[0] != rows[1] - rows[0]:  # pragma: no cover - planner bug
        raise AssertionError(f"{spec.name}: slab {layer.in_shape} gives {layer.out_shape[0]} "
                             f"rows, expected {rows[1] - rows[0]}")
    return layer


class LocalKind(_Window):
    """Locally connected: cut by output rows, or by output locations (``split="locations"``)."""

    name = "local"
    required = ("filters", "kernel")
    optional = ("stride",)
    activation = "linear"

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        k, s, OH, OW = self._grid(table, in_shape, index)
        F = int(table["filters"])
        opts = {"filters": F, "kernel": k, "stride": s,
                "activation": table.get("activation", self.activation)}
        return LayerSpec("local", index, in_shape, (OH, OW, F), opts, self)

    def _per_location(self, spec) -> int:
        return spec.out_shape[2] * (spec.opts["kernel"] ** 2 * spec.in_shape[2] + 1)

    def num_params(self, spec, units) -> int:
        return units * spec.out_shape[1] * self._per_location(spec)

    def cut(self, spec, bounds_of, split) -> list[Cut]:
        """By locations (row-major ``(i, j)`` is ``i * OW + j``): every location costs the
        same, so the work is even to one location; the rows read span the cut's rows."""
        if split != "locations":
            return super().cut(spec, bounds_of, split)
        OH, OW, F = spec.out_shape
        k, s = self.window(spec)
        bounds = bounds_of(OH * OW)
        return [Cut((a, b), ((a // OW) * s, ((b - 1) // OW) * s + k), (a * F, b * F),
                    (b - a) * self._per_location(spec), "locations")
                for a, b in pairwise(bounds)]

    def param_pieces(self, spec, part, offset) -> Iterator[tuple]:
        """Weights ``(OH*OW, F, k, k, C)`` then biases ``(OH*OW, F)``, by location."""
        OH, OW, F = spec.out_shape
        a, b = part.units
        if part.unit == "rows":  # in locations
            a, b = a * OW, b * OW
        loc_w = F * spec.opts["kernel"] ** 2 * spec.in_shape[2]
        yield "range", offset + a * loc_w, (b - a) * loc_w
        yield "range", offset + OH * OW * loc_w + a * F, (b - a) * F

    def make(self, spec, units=None) -> Layer:
        slab, rows = _slab(spec, units)
        o = spec.opts
        return _check_rows(spec, Local(slab, o["filters"], o["kernel"], o["stride"],
                                       o["activation"]), rows)

    def make_part(self, part) -> Layer:
        if part.unit != "locations":
            return self.make(part.spec, part.units)
        spec, (a, b), o = part.spec, part.units, part.spec.opts
        rows = (part.need[1] - part.need[0]) // spec.in_row_size
        return Local((rows, *spec.in_shape[1:]), o["filters"], o["kernel"], o["stride"],
                     o["activation"], locations=(a % spec.out_shape[1], b - a))


class L2PoolKind(_Window):
    name = "l2pool"
    required = ("size",)
    optional = ("stride",)
    window_key = "size"
    default_stride_is_window = True

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        k, s, OH, OW = self._grid(table, in_shape, index)
        return LayerSpec("l2pool", index, in_shape, (OH, OW, in_shape[2]),
                         {"size": k, "stride": s}, self)

    def make(self, spec, units=None) -> Layer:
        slab, rows = _slab(spec, units)
        return _check_rows(spec, L2Pool(slab, spec.opts["size"], spec.opts["stride"]), rows)


class LCNKind(LayerKind):
    """Local contrast normalisation: same padding, so a slice reads ``2r`` halo rows each side
    and computes its whole slab (the edges of a cut slab are wrong and cropped)."""

    name = "lcn"
    required = ("size",)
    spatial = True
    computes_slab = True

    def config_errors(self, table, index, partitions):
        if table["size"] % 2 != 1:
            yield (f"model.layers[{index}].size",
                   f"must be odd for an lcn layer, got {table.get('size')}")

    def resolve(self, table, in_shape, index, num_classes) -> LayerSpec:
        size = int(table["size"])
        if size % 2 == 0 or size < 1:
            raise ConfigError(f"model.layers[{index}].size: LCN needs an odd box size, got {size}")
        return LayerSpec("lcn", index, in_shape, tuple(in_shape), {"size": size}, self)

    def rows_needed(self, spec, a, b) -> Range:
        r = spec.opts["size"] // 2
        return max(0, a - 2 * r), min(spec.in_shape[0], b + 2 * r)

    def make(self, spec, units=None) -> Layer:
        return LCN(_slab(spec, units)[0], spec.opts["size"])

    def make_part(self, part) -> Layer:
        """Computes only the rows the partition owns of its slab."""
        layer = self.make(part.spec, part.units)
        if part.crop is None:
            return layer
        rs = part.spec.in_row_size
        return LCN(layer.in_shape, part.spec.opts["size"],
                   rows=(part.crop[0] // rs, part.crop[1] // rs))


for _kind in (DenseKind(), LocalKind(), L2PoolKind(), LCNKind(), EmbeddingKind()):
    register(_kind)
DENSE = LAYER_KINDS["dense"]
