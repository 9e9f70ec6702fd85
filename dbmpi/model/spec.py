"""Config layer tables resolved into shapes: what each layer takes in and gives out.

``resolve`` turns ``[model] layers`` (plus the output layer it adds) into :class:`LayerSpec`
records with per-example input and output shapes, so that the single-rank model
(:class:`~dbmpi.model.Model`) and the partition planner (:mod:`dbmpi.model.partition`) agree on
every layer. Images are channels-last ``(H, W, C)``; a data set with ``(H, W)`` features is read
as one channel. Dense layers flatten; a spatial layer cannot follow a dense one (the config
check says so).

Spatial layers and the input rows they read (``rows_needed``), for output rows ``[a, b)``:

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
from dataclasses import dataclass, field

from ..errors import ConfigError

SPATIAL = ("local", "l2pool", "lcn")


@dataclass(frozen=True)
class LayerSpec:
    """One layer with its shapes. ``index`` is its place in ``model.layers`` (-1: the output
    layer that the model adds)."""

    kind: str
    index: int
    in_shape: tuple[int, ...]  # (N,) for dense, (H, W, C) for spatial layers
    out_shape: tuple[int, ...]
    opts: dict = field(default_factory=dict, compare=True, hash=False)

    @property
    def name(self) -> str:
        return "output layer" if self.index < 0 else f"model.layers[{self.index}] ({self.kind})"

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def spatial(self) -> bool:
        return self.kind in SPATIAL

    @property
    def out_units(self) -> int:
        """What a partition split cuts: output rows (spatial) or output units (dense)."""
        return self.out_shape[0]

    @property
    def unit_size(self) -> int:
        """Flattened features per output unit (a row of H x W x C: W * C)."""
        return math.prod(self.out_shape[1:])

    @property
    def in_row_size(self) -> int:
        return math.prod(self.in_shape[1:]) if self.spatial else 1

    def rows_needed(self, a: int, b: int) -> tuple[int, int]:
        """Input rows ``[lo, hi)`` read to compute output rows (or units) ``[a, b)``."""
        if not self.spatial:
            return 0, self.n_in
        o = self.opts
        if self.kind == "local":
            return a * o["stride"], (b - 1) * o["stride"] + o["kernel"]
        if self.kind == "l2pool":
            return a * o["stride"], (b - 1) * o["stride"] + o["size"]
        r = o["size"] // 2
        return max(0, a - 2 * r), min(self.in_shape[0], b + 2 * r)

    def num_params(self, units: int | None = None) -> int:
        """Parameters of the layer, or of ``units`` of its output rows/units."""
        u = self.out_units if units is None else units
        if self.kind == "dense":
            return self.n_in * u + u
        if self.kind == "embedding":
            return self.opts["vocab"] * self.opts["dim"]
        if self.kind == "local":
            OW, F = self.out_shape[1], self.out_shape[2]
            k, C = self.opts["kernel"], self.in_shape[2]
            return u * OW * F * (k * k * C + 1)
        return 0


def _image_shape(shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    if len(shape) == 3:
        return tuple(shape)  # type: ignore[return-value]
    raise ConfigError(f"{where}: a spatial layer needs images (H, W) or (H, W, C) as input, but "
                      f"it gets features of shape {tuple(shape)}: put spatial layers first")


def resolve(input_shape, layers, num_classes: int) -> list[LayerSpec]:
    """Shapes of every layer of ``layers`` (config tables) and of the added output layer.

    Raises :class:`ConfigError` naming ``model.layers[i]`` when a layer does not fit its input
    (a kernel larger than the image, an even LCN size, ...).
    """
    shape = tuple(int(s) for s in input_shape)
    out: list[LayerSpec] = []
    seen_dense = False
    for i, spec in enumerate(layers):
        kind = spec.get("type", "dense")
        where = f"model.layers[{i}]"
        if kind == "embedding":  # word ids (context,) -> concatenated embeddings
            if i != 0 or len(shape) != 1:
                raise ConfigError(f"{where}: an embedding layer must come first and take word "
                                  f"ids (context,), got features of shape {shape}: put it first "
                                  f"and shard text with `python -m data_tools shard text`")
            opts = {"vocab": int(spec.get("vocab", num_classes)), "dim": int(spec["dim"]),
                    "dropout": float(spec.get("dropout", 0.0))}
            out.append(LayerSpec("embedding", i, shape, (shape[0] * opts["dim"],), opts))
            shape = (shape[0] * opts["dim"],)
            seen_dense = True
            continue
        if kind == "dense":
            n_in = math.prod(shape)
            units = int(spec["units"])
            out.append(LayerSpec("dense", i, (n_in,), (units,),
                                 {"activation": spec.get("activation", "relu"),
                                  "dropout": float(spec.get("dropout", 0.0))}))
            shape = (units,)
            seen_dense = True
            continue
        if kind not in SPATIAL:
            raise ConfigError(f"{where}.type: unknown layer type {kind!r} (one of dense, "
                              f"{', '.join(SPATIAL)})")
        if seen_dense:
            raise ConfigError(f"{where}: a {kind!r} layer cannot follow a dense layer (dense "
                              f"layers flatten the image): put spatial layers first")
        H, W, C = _image_shape(shape, where)
        if kind in ("local", "l2pool"):
            k = int(spec["kernel"] if kind == "local" else spec["size"])
            s = int(spec.get("stride", 1 if kind == "local" else k))
            if k > H or k > W:
                key = "kernel" if kind == "local" else "size"
                raise ConfigError(f"{where}.{key}: {k} is larger than its input image {H} x {W}"
                                  f": use a smaller {key} or fewer downsampling layers")
            OH, OW = (H - k) // s + 1, (W - k) // s + 1
            if kind == "local":
                F = int(spec["filters"])
                opts = {"filters": F, "kernel": k, "stride": s,
                        "activation": spec.get("activation", "linear")}
                shape_out = (OH, OW, F)
            else:
                opts = {"size": k, "stride": s}
                shape_out = (OH, OW, C)
        else:  # lcn
            size = int(spec["size"])
            if size % 2 == 0 or size < 1:
                raise ConfigError(f"{where}.size: LCN needs an odd box size, got {size}")
            opts = {"size": size}
            shape_out = (H, W, C)
        out.append(LayerSpec(kind, i, (H, W, C), shape_out, opts))
        shape = shape_out
    out.append(LayerSpec("dense", -1, (math.prod(shape),), (int(num_classes),),
                         {"activation": "linear"}))
    return out


def make_layer(spec: LayerSpec, units: tuple[int, int] | None = None):
    """The single-rank layer for ``spec``, or for output rows/units ``units = (a, b)`` of it.

    A slice of a spatial layer reads the input slab ``rows_needed(a, b)`` (its in-shape is that
    slab) and computes output rows ``[a, b)``; LCN computes its whole slab and the caller keeps
    the rows it owns. A slice of a dense layer computes output units ``[a, b)`` from the whole
    input.
    """
    from .image import LCN, L2Pool, Local
    from .layers import Dense

    a, b = (0, spec.out_units) if units is None else units
    if spec.kind == "embedding":
        from .embedding import Embedding

        return Embedding(spec.opts["vocab"], spec.opts["dim"], spec.in_shape[0],
                         spec.opts.get("dropout", 0.0))
    if spec.kind == "dense":
        return Dense(spec.n_in, b - a, spec.opts["activation"], spec.opts.get("dropout", 0.0))
    # the whole layer reads its whole input (rows past the last window included)
    lo, hi = (0, spec.in_shape[0]) if units is None else spec.rows_needed(a, b)
    slab = (hi - lo, *spec.in_shape[1:])
    o = spec.opts
    if spec.kind == "local":
        layer = Local(slab, o["filters"], o["kernel"], o["stride"], o["activation"])
    elif spec.kind == "l2pool":
        layer = L2Pool(slab, o["size"], o["stride"])
    else:
        layer = LCN(slab, o["size"])
    if spec.kind != "lcn" and layer.out_shape[0] != b - a:  # pragma: no cover - planner bug
        raise AssertionError(f"{spec.name}: slab {slab} gives {layer.out_shape[0]} rows, "
                             f"expected {b - a}")
    return layer
