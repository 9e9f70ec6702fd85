"""Run configuration: frozen dataclasses loaded from TOML.

A config file has one table per dataclass below (``[topology]``, ``[model]``, ``[data]``,
``[optimizer]``, ``[downpour]``, ``[sandblaster]``, ``[run]``) plus the top-level ``algorithm``
(``downpour`` or ``sandblaster``). Any field can be
overridden on the command line with ``--set section.key=value`` (the value is parsed as TOML,
so ``--set downpour.steps=500`` is an int and ``--set run.name=x`` a string). Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .model.registry import LAYER_KINDS
from .optim.rules import OPTIMIZERS

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


@dataclass(frozen=True)
class TopologyConfig:
    """How COMM_WORLD is split: 1 coordinator + ``shards`` + ``replicas`` x ``partitions``."""

    shards: int = 2
    replicas: int = 2
    partitions: int = 1
    # how partitions cut locally connected layers: by output "locations" (even work, cuts
    # inside rows) or by whole output "rows"; see dbmpi.model.partition
    split: str = "locations"

    @property
    def world_size(self) -> int:
        return 1 + self.shards + self.replicas * self.partitions


@dataclass(frozen=True)
class ModelConfig:
    """Layers as a list of tables, e.g. ``{type = "dense", units = 256, activation = "relu"}``.

    The input size and the number of classes come from the data set; the output layer
    (``num_classes`` units, linear) and the loss are added after ``layers``. ``loss``:
    ``softmax``, ``hinge`` (multiclass), ``autoencoder`` (image layers, unsupervised) or
    ``ranking`` (Collobert & Weston's window scorer over an embedding: one output unit).
    A dense or embedding layer may carry ``dropout`` (probability, while training).
    """

    layers: tuple[dict, ...] = ({"type": "dense", "units": 256, "activation": "relu"},)
    loss: str = "softmax"
    # loss = "autoencoder" (dbmpi.model.autoencoder): weight of the pooled outputs' L1 penalty
    sparsity: float = 0.1


@dataclass(frozen=True)
class DataConfig:
    """Where the HDF5 shards are (the directory holding ``manifest.json``) and how to read them."""

    # no default: a job without [data] path used to train a demo set silently (issue 19);
    # "" means "not given": a config is valid without it (tests, `--set data.path=...`), and
    # the runner refuses to train from it (runner._check_data)
    path: str = ""
    batch_size: int = 64
    shuffle_buffer: int = 8192
    eval_split: str = "test"
    eval_limit: int = 0  # 0: the whole split


@dataclass(frozen=True)
class OptimizerConfig:
    """The update rule the shards apply (:data:`dbmpi.optim.rules.OPTIMIZERS`): ``adagrad``
    (the paper's), plain ``sgd``, ``momentum`` (heavy ball) or ``adam``; each reads the keys it
    needs."""

    name: str = "adagrad"
    learning_rate: float = 0.05
    eps: float = 1e-8  # adagrad, adam
    initial_accumulator: float = 0.0  # adagrad
    momentum: float = 0.9  # momentum
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam


@dataclass(frozen=True)
class DownpourConfig:
    """Downpour SGD: cadence of fetches and pushes, stopping rules, warm start, evaluation.

    Training stops at the first of: ``steps`` per replica, ``epochs`` per replica, or the
    coordinator seeing test accuracy >= ``target_accuracy`` (0 disables it).
    """

    n_fetch: int = 1
    n_push: int = 1
    steps: int = 1000
    epochs: float = 0.0
    warm_start_steps: int = 0
    target_accuracy: float = 0.0
    eval_every_s: float = 5.0
    # Instead of evaluating every eval_every_s, the coordinator only fetches the parameters
    # and appends them to RUN_DIR/iterates.h5, scored after the run by `python -m dbmpi eval
    # RUN_DIR --iterates`: a learning curve whose evaluation takes no CPU from the replicas.
    record_iterates: bool = False
    read_own_pushes: bool = False
    log_every: int = 50
    # Test and benchmark knobs: replica `straggler_replica` sleeps so that each of its steps
    # takes `straggler_factor` times as long (-1: none).
    straggler_replica: int = -1
    straggler_factor: float = 1.0
    # With an embedding layer: fetch and push only the embedding rows a step touches
    # (dbmpi.ps.sparse); false: the whole vector, as for any model.
    sparse: bool = False
    # "continue": under `dbmpi launch`, a replica whose rank dies is counted lost and the
    # others go on (docs/faults.md); "stop": any rank's death ends the job, to be resumed.
    replica_loss: str = "continue"
    # Bounded staleness (dbmpi.train.downpour.bound): every push is applied with at most
    # max_staleness other replicas' pushes since its fetch (-1: off; 0: serial SGD over the
    # replicas' minibatches in turn)
    max_staleness: int = -1
    # Staleness-aware steps (Zhang et al. 2016): the shards divide a push's learning rate by
    # its staleness (the other replicas' pushes applied since its fetch, when > 1)
    staleness_aware: bool = False
    # after a process of the job died: how long a rank's heartbeat may stand still before
    # it is counted lost (longer than the longest step of a replica)
    lost_after_s: float = 5.0


@dataclass(frozen=True)
class CheckpointConfig:
    """Shards write their blocks and optimizer state every ``every_s`` seconds and/or every
    ``every_steps`` steps (summed over replicas; 0 disables either), keeping the newest ``keep``.

    ``deadline_s``: how long the coordinator waits for any other rank during a checkpoint and
    after SIGTERM before it names the ranks it could not reach and ends the job (exit 75)
    without committing, so a frozen rank (a hung node) cannot outlast SLURM's KillWait."""

    every_s: float = 60.0
    every_steps: int = 0
    keep: int = 3
    deadline_s: float = 20.0


@dataclass(frozen=True)
class SandblasterConfig:
    """Sandblaster L-BFGS (``algorithm = "sandblaster"``), see :mod:`dbmpi.train.sandblaster`.

    The objective is the mean loss over a batch plus ``l2 / 2 * ||params||^2``. A batch is the
    first ``train_limit`` training examples (0: all of them) when ``batch_size`` is 0, else
    ``batch_size`` of them, a new batch every iteration. ``straggler_*`` and ``slowdown`` are
    for tests and benchmarks only: replica ``straggler_replica`` runs ``straggler_factor`` times
    slower than the others; every replica runs ``slowdown`` times slower than it can (sleeping),
    which emulates one dedicated core per replica when ranks outnumber the cores.
    """

    iterations: int = 100
    history: int = 10
    portion_size: int = 256
    batch_size: int = 0
    train_limit: int = 0
    backups: bool = True
    push_every: int = 4
    line_search: str = "wolfe"
    c1: float = 1e-4
    c2: float = 0.9
    max_evals: int = 20
    l2: float = 0.0
    gtol: float = 1e-6
    dtype: str = "float64"
    record_iterates: bool = False
    straggler_replica: int = -1
    straggler_factor: float = 5.0
    slowdown: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    """Where results go and how the run is seeded."""

    name: str = "run"
    dir: str = ""  # empty: runs/<name>-<YYYYmmdd-HHMMSS>
    seed: int = 0
    # Downpour: record which pushes each shard applied in which order and what each fetch
    # saw (RUN_DIR/order/, dbmpi.order), so that `python -m dbmpi replay RUN_DIR` re-runs the
    # job to the same parameters bit for bit
    record_order: bool = False
    # draw RUN_DIR/learning_curve.png at the end (matplotlib: about 1.5 s of rank 0's exit)
    learning_curve: bool = True


@dataclass(frozen=True)
class Config:
    algorithm: str = "downpour"
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {
    "topology": TopologyConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "downpour": DownpourConfig,
    "checkpoint": CheckpointConfig,
    "sandblaster": SandblasterConfig,
    "run": RunConfig,
}


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{where}[{i}] must be a table like "
                                  f"{{type = \"dense\", units = 128}}, got {item!r}")
        return tuple(dict(v) for v in value)
    if isinstance(typ, types.UnionType):
        raise AssertionError("unions are not used in config fields")
    raise AssertionError(f"unhandled config type {typ!r} for {where}")


def _build_section(name: str, table: dict, source: str) -> Any:
    cls = _SECTION_CLASSES[name]
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key '{name}.{key}' (valid keys of [{name}]: "
                              f"{', '.join(valid)})")
        kwargs[key] = _coerce(f"{source}: {name}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build and validate a :class:`Config` from a nested dict (as parsed from TOML)."""
    sections = {}
    algorithm = "downpour"
    for key, value in raw.items():
        if key == "algorithm":
            algorithm = _coerce(f"{source}: algorithm", value, str)
        elif key in _SECTION_CLASSES:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            sections[key] = _build_section(key, value, source)
        else:
            raise ConfigError(f"{source}: unknown section or key '{key}' (valid: algorithm, "
                              f"{', '.join(_SECTION_CLASSES)})")
    cfg = Config(algorithm=algorithm, **sections)
    validate(cfg, source)
    return cfg


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``section.key=value`` strings to a raw config dict (values parsed as TOML)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected section.key=value, "
                              f"e.g. --set downpour.steps=500")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: take it as a string
        if len(parts) == 1 and parts[0] == "algorithm":
            out["algorithm"] = value
            continue
        if len(parts) != 2 or parts[0] not in _SECTION_CLASSES:
            raise ConfigError(f"{source} {item!r}: the key must be section.key with section one "
                              f"of {', '.join(_SECTION_CLASSES)}")
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config file, apply ``--set`` overrides and validate."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (see jobs/configs/ for examples)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    empty = not raw
    raw = apply_overrides(raw, overrides or [])
    if empty:  # an empty file used to train the built-in defaults, silently
        raise ConfigError(f"{path}: empty config file: a job needs at least [data] path = "
                          f"\"DIR\" (the directory holding manifest.json) and its model; see "
                          f"jobs/configs/ for examples")
    return from_dict(raw, str(path))


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where} {message}")


def validate(cfg: Config, source: str = "config") -> None:
    """Range checks that the type checks cannot express."""
    s = f"{source}:"
    _require(cfg.algorithm in ("downpour", "sandblaster"), f"{s} algorithm",
             f"must be 'downpour' or 'sandblaster', got {cfg.algorithm!r}")
    t = cfg.topology
    _require(t.shards >= 1, f"{s} topology.shards", f"must be >= 1, got {t.shards}")
    _require(t.replicas >= 1, f"{s} topology.replicas", f"must be >= 1, got {t.replicas}")
    _require(t.partitions >= 1, f"{s} topology.partitions", f"must be >= 1, got {t.partitions}")
    _require(t.split in ("locations", "rows"), f"{s} topology.split",
             f"must be 'locations' or 'rows', got {t.split!r}")
    _require(t.partitions == 1 or cfg.algorithm == "downpour", f"{s} topology.partitions",
             f"must be 1 for {cfg.algorithm!r} (model parallelism runs with downpour), "
             f"got {t.partitions}")
    m = cfg.model
    _require(m.loss in ("softmax", "hinge", "autoencoder", "ranking"), f"{s} model.loss",
             f"must be 'softmax', 'hinge', 'autoencoder' or 'ranking', got {m.loss!r}")
    _require(m.loss != "ranking" or (m.layers and m.layers[0].get("type") == "embedding"),
             f"{s} model.loss", "is 'ranking' (Collobert & Weston): the model must start with "
             "an embedding layer over word windows (python -m data_tools shard text)")
    _require(m.loss != "ranking" or cfg.algorithm == "downpour", f"{s} model.loss",
             "is 'ranking': it samples corrupt words every step, so train it with "
             "algorithm = 'downpour' (batch L-BFGS needs a deterministic objective)")
    if m.loss == "autoencoder":
        _validate_autoencoder(cfg, s)
    for i, layer in enumerate(m.layers):
        _validate_layer(m.layers, i, t.partitions, cfg.algorithm, s)
    d = cfg.data
    _require(d.batch_size >= 1, f"{s} data.batch_size", f"must be >= 1, got {d.batch_size}")
    _require(d.shuffle_buffer >= 1, f"{s} data.shuffle_buffer",
             f"must be >= 1, got {d.shuffle_buffer}")
    _require(d.eval_limit >= 0, f"{s} data.eval_limit",
             f"must be >= 0 (0 = all), got {d.eval_limit}")
    o = cfg.optimizer
    _require(o.name in OPTIMIZERS, f"{s} optimizer.name",
             f"must be one of {', '.join(map(repr, OPTIMIZERS))}, got {o.name!r}")
    _require(o.learning_rate > 0, f"{s} optimizer.learning_rate",
             f"must be > 0, got {o.learning_rate} (try 0.05 for adagrad, 0.01 for sgd)")
    _require(o.eps > 0, f"{s} optimizer.eps", f"must be > 0, got {o.eps}")
    _require(o.initial_accumulator >= 0, f"{s} optimizer.initial_accumulator",
             f"must be >= 0, got {o.initial_accumulator}")
    for key in ("momentum", "beta1", "beta2"):
        value = getattr(o, key)
        _require(0 <= value < 1, f"{s} optimizer.{key}", f"must be in [0, 1), got {value}")
    p = cfg.downpour
    _require(p.n_fetch >= 1, f"{s} downpour.n_fetch", f"must be >= 1, got {p.n_fetch}")
    _require(p.n_push >= 1, f"{s} downpour.n_push", f"must be >= 1, got {p.n_push}")
    _require(p.steps >= 0, f"{s} downpour.steps", f"must be >= 0, got {p.steps}")
    _require(p.epochs >= 0, f"{s} downpour.epochs", f"must be >= 0, got {p.epochs}")
    _require(p.steps > 0 or p.epochs > 0 or p.target_accuracy > 0, f"{s} downpour.steps",
             "and downpour.epochs and downpour.target_accuracy are all 0: set at least one "
             "stopping rule")
    _require(p.warm_start_steps >= 0, f"{s} downpour.warm_start_steps",
             f"must be >= 0, got {p.warm_start_steps}")
    _require(0 <= p.target_accuracy <= 1, f"{s} downpour.target_accuracy",
             f"must be in [0, 1], got {p.target_accuracy}")
    _require(p.eval_every_s > 0, f"{s} downpour.eval_every_s", f"must be > 0, got {p.eval_every_s}")
    _require(not (p.record_iterates and p.target_accuracy), f"{s} downpour.target_accuracy",
             "must be 0 with downpour.record_iterates = true (the recorded parameters are "
             "evaluated after the run): stop by steps or epochs")
    _require(p.log_every >= 1, f"{s} downpour.log_every", f"must be >= 1, got {p.log_every}")
    _require(p.straggler_factor >= 1, f"{s} downpour.straggler_factor",
             f"must be >= 1, got {p.straggler_factor}")
    _require(p.replica_loss in ("continue", "stop"), f"{s} downpour.replica_loss",
             f"must be \"continue\" or \"stop\", got {p.replica_loss!r}")
    _require(p.lost_after_s > 0, f"{s} downpour.lost_after_s",
             f"must be > 0 seconds, got {p.lost_after_s}")
    _require(not (p.staleness_aware and p.sparse), f"{s} downpour.staleness_aware",
             "needs dense traffic (downpour.sparse = false): sparse pushes carry no fetch "
             "point yet")
    _require(p.max_staleness >= -1, f"{s} downpour.max_staleness",
             f"must be >= 0 pushes, or -1 for no bound, got {p.max_staleness}")
    _require(p.max_staleness < 0 or (cfg.topology.partitions == 1 and p.n_fetch == 1
                                      and p.n_push == 1 and not p.sparse
                                      and not p.warm_start_steps),
             f"{s} downpour.max_staleness",
             "needs topology.partitions = 1, n_fetch = n_push = 1, dense traffic and no "
             "warm start (the bound is kept per push, from the first); set max_staleness = -1 "
             "or change those")
    _require(-1 <= p.straggler_replica < t.replicas, f"{s} downpour.straggler_replica",
             f"must be -1 (none) or a replica index below {t.replicas}, got {p.straggler_replica}")
    c = cfg.checkpoint
    _require(c.every_s >= 0, f"{s} checkpoint.every_s", f"must be >= 0 (0 = off), got {c.every_s}")
    _require(c.every_steps >= 0, f"{s} checkpoint.every_steps",
             f"must be >= 0 (0 = off), got {c.every_steps}")
    _require(c.keep >= 1, f"{s} checkpoint.keep", f"must be >= 1, got {c.keep}")
    _require(c.deadline_s > 0, f"{s} checkpoint.deadline_s",
             f"must be > 0 seconds (keep it below the scheduler's KillWait, 30 s on SLURM by "
             f"default), got {c.deadline_s}")
    _validate_sandblaster(cfg, s)
    _require(cfg.run.seed >= 0, f"{s} run.seed", f"must be >= 0, got {cfg.run.seed}")
    _require(not cfg.run.record_order or (cfg.algorithm == "downpour"
                                          and cfg.topology.partitions == 1
                                          and not cfg.downpour.sparse),
             f"{s} run.record_order",
             "needs algorithm = \"downpour\", topology.partitions = 1 and dense traffic "
             "(downpour.sparse = false); set record_order = false or change those")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _validate_layer(layers, i: int, partitions: int, algorithm: str, s: str) -> None:
    """``model.layers[i]`` against its kind's entry of the layer registry: its keys, their
    types and ranges, then the kind's own rules (:meth:`LayerKind.config_errors`)."""
    layer = layers[i]
    where = f"{s} model.layers[{i}]"
    kind = layer.get("type", "dense")
    types = tuple(LAYER_KINDS)
    _require(kind in types, f"{where}.type", f"must be one of {types}, got {kind!r}")
    impl = LAYER_KINDS[kind]
    allowed = impl.allowed_keys()
    extra = set(layer) - allowed
    _require(not extra, where, f"has unknown keys {sorted(extra)} (allowed for {kind!r}: "
             f"{sorted(allowed)})")
    for key in (*impl.required, *(k for k in impl.optional if k in layer)):
        v = layer.get(key)
        _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{where}.{key}", f"must be a positive integer, got {v!r}")
    drop = layer.get("dropout", 0.0)
    _require(isinstance(drop, (int, float)) and not isinstance(drop, bool)
             and 0 <= drop < 1, f"{where}.dropout", f"must be in [0, 1), got {drop!r}")
    _require(not drop or (partitions == 1 and algorithm == "downpour"),
             f"{where}.dropout", "needs algorithm = 'downpour' with topology.partitions = 1 "
             "(batch L-BFGS needs a deterministic objective; partitions do not drop yet): "
             "set it to 0")
    act = layer.get("activation", impl.activation or "relu")
    _require(act in ACTIVATIONS, f"{where}.activation",
             f"must be one of {ACTIVATIONS}, got {act!r}")
    for fld, message in impl.config_errors(layer, i, partitions):
        _require(False, f"{s} {fld}", message)
    _require(impl.partitionable or partitions == 1, f"{s} topology.partitions",
             f"must be 1 with {_a(kind)} layer (not partitioned), got {partitions}")
    # flat layers (dense, embedding) flatten the image: no spatial layer after one
    _require(not impl.spatial or all(LAYER_KINDS[x.get("type", "dense")].spatial
                                     for x in layers[:i]),
             where, f"is a {kind!r} layer after a dense layer: dense layers flatten the "
             f"image, so put the image layers first")


def _validate_autoencoder(cfg: Config, s: str) -> None:
    """``loss = "autoencoder"``: image layers only, linear local layers (RICA's encoder)."""
    m = cfg.model
    _require(m.sparsity >= 0, f"{s} model.sparsity", f"must be >= 0, got {m.sparsity}")
    kinds = [layer.get("type", "dense") for layer in m.layers]
    _require("local" in kinds, f"{s} model.layers", "needs at least one 'local' layer for "
             "loss = 'autoencoder' (its weights are the encoder and, transposed, the decoder)")
    image_kinds = ", ".join(k for k, impl in LAYER_KINDS.items() if impl.spatial)
    for i, layer in enumerate(m.layers):
        kind = layer.get("type", "dense")
        _require(kind not in LAYER_KINDS or LAYER_KINDS[kind].spatial, f"{s} model.layers[{i}]",
                 f"is {_a(kind)} layer: an autoencoder takes image layers only ({image_kinds}); "
                 f"a classifier goes on top with `python -m dbmpi probe RUN_DIR`")
        _require(kind != "local" or layer.get("activation", "linear") == "linear",
                 f"{s} model.layers[{i}].activation", "must be 'linear' for loss = "
                 "'autoencoder' (the encoder of reconstruction ICA is linear)")
    _require(cfg.algorithm == "downpour", f"{s} algorithm",
             f"must be 'downpour' for loss = 'autoencoder', got {cfg.algorithm!r}")
    _require(cfg.topology.partitions == 1, f"{s} topology.partitions",
             f"must be 1 for loss = 'autoencoder' (not partitioned yet), got "
             f"{cfg.topology.partitions}")
    _require(cfg.downpour.target_accuracy == 0, f"{s} downpour.target_accuracy",
             "must be 0 for loss = 'autoencoder' (it has no accuracy): stop by steps or epochs")


def _validate_sandblaster(cfg: Config, s: str) -> None:
    b = cfg.sandblaster
    for name in ("iterations", "history", "portion_size", "max_evals", "push_every"):
        value = getattr(b, name)
        _require(value >= 1, f"{s} sandblaster.{name}", f"must be >= 1, got {value}")
    for name in ("batch_size", "train_limit", "l2", "gtol"):
        value = getattr(b, name)
        _require(value >= 0, f"{s} sandblaster.{name}", f"must be >= 0, got {value}")
    _require(b.line_search in ("wolfe", "armijo"), f"{s} sandblaster.line_search",
             f"must be 'wolfe' (strong Wolfe) or 'armijo' (backtracking), got {b.line_search!r}")
    _require(0 < b.c1 < 1, f"{s} sandblaster.c1", f"must be in (0, 1), got {b.c1}")
    _require(b.line_search != "wolfe" or b.c1 < b.c2 < 1, f"{s} sandblaster.c2",
             f"must be in (c1, 1) = ({b.c1}, 1) for the Wolfe line search, got {b.c2}")
    _require(b.dtype in ("float64", "float32"), f"{s} sandblaster.dtype",
             f"must be 'float64' or 'float32', got {b.dtype!r}")
    _require(-1 <= b.straggler_replica < cfg.topology.replicas,
             f"{s} sandblaster.straggler_replica",
             f"must be -1 (none) or a replica in [0, {cfg.topology.replicas}), "
             f"got {b.straggler_replica}")
    _require(b.straggler_factor >= 1, f"{s} sandblaster.straggler_factor",
             f"must be >= 1, got {b.straggler_factor}")
    _require(b.slowdown >= 1, f"{s} sandblaster.slowdown", f"must be >= 1, got {b.slowdown}")


def to_toml(cfg: Config) -> str:
    """Write the resolved config back as TOML (saved in every run directory)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = [f"algorithm = {fmt(cfg.algorithm)}"]
    for name in _SECTION_CLASSES:
        lines.append(f"\n[{name}]")
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {fmt(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"
