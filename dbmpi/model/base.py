"""The two contracts of a layer kind, stated as types.

* :class:`Layer`: a layer object as a model runs it (single-rank or one partition's slice):
  views into the flat parameter and gradient vectors, forward and backward passes, and the
  capabilities the model and the partitioned model ask about instead of probing.
* :class:`LayerKind`: what everything *before* a layer object exists needs of a kind (one
  instance per kind, in :data:`dbmpi.model.registry.LAYER_KINDS`): the config keys a layer
  table may have, the shapes (:class:`LayerSpec`), the parameter count of a slice, how the
  partition planner may cut the layer and what input (halo) a slice reads, and how to build a
  layer object of a slice.

A new layer kind is a :class:`Layer` subclass, a :class:`LayerKind` subclass and one
``register`` call (:mod:`dbmpi.model.registry`); config validation, ``resolve``, the planner,
the builders of :class:`~dbmpi.model.Model` and of the partitioned model consult the registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from .partition import LayerPart

Range = tuple[int, int]


class Layer(ABC):
    """A layer over ``(B, n_in)`` inputs giving ``(B, n_out)`` outputs (per-example shape
    ``out_shape``, flattened row-major). It owns no parameter memory: :meth:`bind` hands it
    views of ``num_params`` elements of the model's flat vectors."""

    num_params: int
    n_in: int
    n_out: int
    out_shape: tuple[int, ...]
    # What the model asks instead of probing with getattr:
    input_dtype: ClassVar[Any] = np.float32  # an embedding takes int64 word ids
    can_accumulate: ClassVar[bool] = False  # backward(accumulate=True) adds to the gradient
    takes_views: ClassVar[bool] = False  # forward(out=) / backward(dx_out=) write into column
    # blocks of wider matrices (the partitioned model's halo slabs)
    dropout = None  # a Dropout (dbmpi.model.layers) when the layer drops units while training

    @abstractmethod
    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        """Keep views of ``params`` and ``grads`` (each at least ``num_params`` long)."""

    @abstractmethod
    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        """Write initial parameters into ``params[:num_params]``."""

    @abstractmethod
    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        """The output (a buffer of the layer's, or ``out``); ``train``: a training step (drop
        units, keep what backward needs)."""

    @abstractmethod
    def backward(self, dy: np.ndarray, need_dx: bool = True, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        """From dL/d(output) of the last forward pass (``dy`` may be overwritten): write (or,
        with ``accumulate``, add) the parameters' gradient; return dL/dx when ``need_dx``."""

    def float64(self) -> Layer | None:
        """The same layer computing in float64 (Sandblaster's float64 replicas), or None if
        the kind has no float64 kernels."""
        return None

    def _check_io(self, out, dx_out=None, accumulate: bool = False) -> None:
        if (out is not None or dx_out is not None) and not self.takes_views:
            raise ValueError(f"{type(self).__name__} cannot write into a given buffer")
        if accumulate and not self.can_accumulate and self.num_params:
            raise ValueError(f"{type(self).__name__} cannot accumulate gradients in place")


def bind_all(layers: list[Layer], params: np.ndarray, grads: np.ndarray) -> list[int]:
    """Give each layer its consecutive slice of the flat ``params`` and ``grads``; return
    where each slice starts (one layout for every model, whole or partitioned)."""
    offsets, off = [], 0
    for layer in layers:
        layer.bind(params[off:off + layer.num_params], grads[off:off + layer.num_params])
        offsets.append(off)
        off += layer.num_params
    return offsets


class FlatVectors:
    """A model whose layers hold views of two flat float32 vectors, ``params`` and ``grads``
    (the whole :class:`~dbmpi.model.Model` and one partition of a replica): Downpour's worker
    points the backward pass straight at a push slot through :meth:`set_grads`."""

    layers: list[Layer]
    params: np.ndarray
    grads: np.ndarray
    num_params: int

    def set_grads(self, grads: np.ndarray) -> None:
        """Have the next backward passes write the gradient into ``grads`` (flat float32 of
        ``num_params``), e.g. straight into a parameter-server push slot: no copy."""
        if grads.shape != (self.num_params,) or grads.dtype != np.float32:
            raise ValueError(f"grads must be float32 of shape ({self.num_params},)")
        self.grads = grads
        bind_all(self.layers, self.params, grads)

    @property
    def can_accumulate(self) -> bool:
        """Whether forward_backward(accumulate=True) is supported: every layer with
        parameters can add its gradient in place."""
        return all(layer.can_accumulate or layer.num_params == 0 for layer in self.layers)


class NoParams(Layer):
    """A layer without parameters."""

    num_params = 0

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        pass

    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        pass


@dataclass(frozen=True)
class LayerSpec:
    """One layer with its shapes. ``index`` is its place in ``model.layers`` (-1: the output
    layer that the model adds); ``impl`` is its kind's entry of the registry."""

    kind: str
    index: int
    in_shape: tuple[int, ...]  # (N,) for flat layers, (H, W, C) for spatial layers
    out_shape: tuple[int, ...]
    opts: dict = field(default_factory=dict, compare=True, hash=False)
    impl: LayerKind | None = field(default=None, compare=False, hash=False, repr=False)

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
        return self.impl.spatial

    @property
    def out_units(self) -> int:
        """What a partition split cuts: output rows (spatial) or output units (flat)."""
        return self.out_shape[0]

    @property
    def unit_size(self) -> int:
        """Flattened features per output unit (a row of H x W x C: W * C)."""
        return math.prod(self.out_shape[1:])

    @property
    def in_row_size(self) -> int:
        return math.prod(self.in_shape[1:]) if self.spatial else 1

    def rows_needed(self, a: int, b: int) -> Range:
        """Input rows (spatial) or features ``[lo, hi)`` read to compute output units
        ``[a, b)``."""
        return self.impl.rows_needed(self, a, b)

    def num_params(self, units: int | None = None) -> int:
        """Parameters of the layer, or of ``units`` of its output rows/units."""
        return self.impl.num_params(self, self.out_units if units is None else units)


@dataclass(frozen=True)
class Cut:
    """One partition's share of a layer as the planner sees it: output units ``[a, b)`` (of
    what ``unit`` counts), the input rows ``[lo, hi)`` it reads, its output feature columns and
    its parameter count."""

    units: Range
    rows: Range
    out_cols: Range
    num_params: int
    unit: str


class LayerKind(ABC):
    """A kind of layer (``type = name`` in a ``[model] layers`` table), one instance each.

    Config keys: ``required`` and ``optional`` are positive integers; ``activation`` is the
    default activation when the table may set one (None: it may not); ``dropout``: whether the
    table may set a dropout probability. Kind-specific rules go in :meth:`config_errors`.
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    activation: ClassVar[str | None] = None
    dropout: ClassVar[bool] = False
    spatial: ClassVar[bool] = False  # takes (H, W, C) images; the planner cuts output rows
    partitionable: ClassVar[bool] = True  # may be cut over topology.partitions > 1
    computes_slab: ClassVar[bool] = False  # a slice computes its whole input slab, then crops

    def allowed_keys(self) -> set[str]:
        return {"type", *self.required, *self.optional,
                *(("activation",) if self.activation else ()),
                *(("dropout",) if self.dropout else ())}

    def config_errors(self, table: dict, index: int, partitions: int
                      ) -> Iterator[tuple[str, str]]:
        """``(field, message)`` for each kind-specific mistake of ``table`` (``field`` as in
        ``model.layers[0].size``), after the generic key, type and range checks passed."""
        return iter(())

    @abstractmethod
    def resolve(self, table: dict, in_shape: tuple[int, ...], index: int,
                num_classes: int) -> LayerSpec:
        """The spec of ``table`` given the previous layer's output shape (``(H, W, C)`` for a
        spatial kind); raise ConfigError naming ``model.layers[index]`` if it does not fit."""

    def rows_needed(self, spec: LayerSpec, a: int, b: int) -> Range:
        """Input rows read by output units ``[a, b)``: the whole input unless overridden."""
        return 0, spec.in_shape[0] if self.spatial else spec.n_in

    def num_params(self, spec: LayerSpec, units: int) -> int:
        """Parameters of ``units`` output units of the layer."""
        return 0

    def cut(self, spec: LayerSpec, bounds_of, split: str) -> list[Cut]:
        """The layer's cut into ``len(bounds) - 1`` partitions; ``bounds_of(n)`` gives the
        partition bounds of ``n`` units. By default whole output units (rows when spatial),
        each reading :meth:`rows_needed`."""
        bounds = bounds_of(spec.out_units)
        unit = "rows" if self.spatial else "units"
        out = []
        for a, b in pairwise(bounds):
            out.append(Cut((a, b), spec.rows_needed(a, b),
                           (a * spec.unit_size, b * spec.unit_size), self.num_params(spec, b - a),
                           unit))
        return out

    def param_pieces(self, spec: LayerSpec, part: LayerPart, offset: int) -> Iterator[tuple]:
        """Where a slice's parameters sit in the single-rank model's vector (the layer starts
        at ``offset``), in the slice's order: ``("range", start, count)`` or ``("matrix", off,
        n_in, n_out, a, b)`` (columns ``[a, b)`` of an ``(n_in, n_out)`` block). By default
        the whole layer in one piece, which is right only for an uncut layer."""
        n = part.num_params
        if n == 0:
            return
        if n != spec.num_params():
            raise NotImplementedError(f"{spec.name}: {self.name} layers do not say how their "
                                      f"parameters split over partitions")
        yield "range", offset, n

    @abstractmethod
    def make(self, spec: LayerSpec, units: Range | None = None) -> Layer:
        """The single-rank layer of ``spec``, or of its output units ``units``."""

    def make_part(self, part: LayerPart) -> Layer:
        """Partition ``part``'s layer object."""
        return self.make(part.spec, part.units)
