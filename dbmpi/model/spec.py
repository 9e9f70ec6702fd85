"""Config layer tables resolved into shapes: what each layer takes in and gives out.

``resolve`` turns ``[model] layers`` (plus the output layer it adds) into
:class:`~dbmpi.model.base.LayerSpec` records with per-example input and output shapes, so that
the single-rank model (:class:`~dbmpi.model.Model`) and the partition planner
(:mod:`dbmpi.model.partition`) agree on every layer. Each kind's shapes, parameter counts and
the input rows a slice reads come from its entry of :mod:`dbmpi.model.registry`. Images are
channels-last ``(H, W, C)``; a data set with ``(H, W)`` features is read as one channel. Flat
(non-spatial) layers flatten; a spatial layer cannot follow a flat one (the config check says
so).
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .base import Layer, LayerSpec, Range
from .registry import DENSE, LAYER_KINDS

__all__ = ["LayerSpec", "make_layer", "resolve"]


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
    seen_flat = False
    for i, table in enumerate(layers):
        kind = table.get("type", "dense")
        where = f"model.layers[{i}]"
        impl = LAYER_KINDS.get(kind)
        if impl is None:
            raise ConfigError(f"{where}.type: unknown layer type {kind!r} (one of "
                              f"{', '.join(LAYER_KINDS)})")
        if impl.spatial:
            if seen_flat:
                raise ConfigError(f"{where}: a {kind!r} layer cannot follow a dense layer (dense "
                                  f"layers flatten the image): put spatial layers first")
            shape = _image_shape(shape, where)
        spec = impl.resolve(table, shape, i, num_classes)
        out.append(spec)
        shape = spec.out_shape
        seen_flat = seen_flat or not impl.spatial
    out.append(LayerSpec("dense", -1, (math.prod(shape),), (int(num_classes),),
                         {"activation": "linear"}, DENSE))
    return out


def make_layer(spec: LayerSpec, units: Range | None = None) -> Layer:
    """The single-rank layer for ``spec``, or for output rows/units ``units = (a, b)`` of it.

    A slice of a spatial layer reads the input slab ``rows_needed(a, b)`` (its in-shape is that
    slab) and computes output rows ``[a, b)``; LCN computes its whole slab and the caller keeps
    the rows it owns. A slice of a dense layer computes output units ``[a, b)`` from the whole
    input.
    """
    return spec.impl.make(spec, units)
