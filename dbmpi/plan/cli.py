"""``dbmpi plan CONFIG``: predict the config's job, rank the alternatives, write the best."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import ConfigError, DbmpiError
from . import calibrate as cal
from .cost import Job, Link, Replica, downpour, sandblaster
from .search import Space, describe, rank
from .shape import partition_plan, replica

LINK_RE = re.compile(r"^(\d+(?:\.\d+)?)(gbit|mbit)$")
# what a rated Ethernet link delivers to MPI over TCP: 94% of the line rate (headers), and
# a one-way latency typical of a switched data-centre hop; both assumptions, stated in
# docs/planner.md, used only where no link was measured
WIRE_EFFICIENCY = 0.94
NAMED_LINK_LATENCY_S = 25e-6


class PlanError(DbmpiError):
    """A bad ``dbmpi plan`` argument: the message names the flag and the fix."""


def parse_link(value: str, data: dict) -> Link:
    """``10gbit``/``100mbit`` (rated, see WIRE_EFFICIENCY), ``MEASURED`` (the calibration's one
    measured link between hosts) or the name of a measured link."""
    links = data.get("links", {})
    # the TCP stack's CPU per byte: the probe's figure includes the waiting rank's polling,
    # so the fastest measured link (least waiting) gives the best estimate
    cpu = min((v.get("cpu_s_per_byte_with_polling", 0.0) for v in links.values()), default=0.0)
    m = LINK_RE.match(value.lower())
    if m:
        rate = float(m.group(1)) * (1e9 if m.group(2) == "gbit" else 1e6) / 8
        return Link(NAMED_LINK_LATENCY_S, rate * WIRE_EFFICIENCY, cpu)
    if value.upper() == "MEASURED":
        if len(links) != 1:
            have = ", ".join(links) or "none"
            raise PlanError(f"--link MEASURED: the calibration holds {len(links)} measured links "
                            f"({have}): name one with --link NAME, or give a rate (10gbit)")
        return Link.of(next(iter(links.values())), cpu)
    if value in links:
        return Link.of(links[value], cpu)
    raise PlanError(f"--link {value}: not a rate (10gbit, 1gbit, 100mbit), MEASURED or a "
                    f"measured link name: pass e.g. --link 10gbit")


def model_io(cfg, input_shape: str | None, classes: int | None) -> tuple[tuple, int]:
    """Input shape and classes: the flags, else the config's data set manifest."""
    if input_shape and classes:
        try:
            shape = tuple(int(s) for s in input_shape.lower().split("x"))
        except ValueError:
            raise PlanError(f"--input {input_shape}: give the feature shape as NxMx... "
                            f"(e.g. 28x28)") from None
        return shape, int(classes)
    from ..data.schema import read_manifest

    try:
        m = read_manifest(cfg.data.path)
    except DbmpiError as e:
        raise PlanError(f"no input shape: {e} (or pass --input 28x28 --classes 10)") from None
    return tuple(m["feature_shape"]), int(m["num_classes"])


def _replica_of(cfg, shape, classes, times: dict):
    def of(P: int) -> Replica | None:
        try:
            plan = partition_plan(shape, cfg.model.layers, classes, P)
        except ConfigError:
            return None
        return replica(plan, times["seconds"], cfg.data.batch_size, times["batch"],
                       times.get("reader_s", 0.0))
    return of


def run(args) -> int:
    from .. import config as config_mod

    if args.hosts < 1:
        raise PlanError(f"--hosts {args.hosts}: must be >= 1 (the hosts the job may use)")
    if args.cores_per_host is not None and args.cores_per_host < 1:
        raise PlanError(f"--cores-per-host {args.cores_per_host}: must be >= 1")
    if args.background < 0:
        raise PlanError(f"--background {args.background}: must be >= 0 (cores)")
    if args.top < 1:
        raise PlanError(f"--top {args.top}: must be >= 1")
    cfg = config_mod.load(args.config, args.set)
    shape, classes = model_io(cfg, args.input, args.classes)
    path = Path(args.calibration) if args.calibration else cal.cache_path()
    sig = cal.signature(shape, cfg.model.layers, classes, cfg.model.loss, cfg.data.batch_size)
    if args.calibrate:
        data_path = cfg.data.path if (Path(cfg.data.path) / "manifest.json").is_file() else ""
        cal.calibrate(path, shape, cfg.model.layers, classes, cfg.model.loss,
                      cfg.data.batch_size, machine_again=True, data_path=data_path,
                      shuffle_buffer=cfg.data.shuffle_buffer)
        print(f"wrote {path}")
    data = cal.load(path)
    times = cal.layer_times(data, sig, path)
    machine = cal.machine_for(data, sig)
    cores = args.cores_per_host or machine.cores
    link = parse_link(args.link or "10gbit", data)  # checked even when one host needs none
    base = Job(shards=1, replicas=1, hosts=args.hosts, cores_per_host=cores,
               link=link if args.hosts > 1 else None, background_cores=args.background)
    replica_of = _replica_of(cfg, shape, classes, times)

    def predict(rep, job):
        return downpour(rep, job, machine)

    t = cfg.topology
    own = dataclasses.replace(base, shards=t.shards, replicas=t.replicas,
                              partitions=t.partitions, n_fetch=cfg.downpour.n_fetch,
                              n_push=cfg.downpour.n_push)
    rep = replica_of(t.partitions)
    print(f"machine: {machine.cores} cores, sgemm {machine.gflops:.0f} GFLOP/s per core, "
          f"{args.hosts} host(s) x {cores} cores; calibration {path}")
    if rep is not None:
        p = predict(rep, own)
        print(f"this config: {describe(p)}")
        if cfg.algorithm == "sandblaster":
            sb = cfg.sandblaster
            examples = sb.batch_size or 60000
            it = sandblaster(rep, own, machine, examples,
                             max(1, examples // max(sb.portion_size, 1)), sb.history)
            print(f"sandblaster iteration over {examples} examples: {it['iteration_s']:.2f} s "
                  f"({it['samples_per_s']:,.0f} samples/s), bottleneck: {it['bottleneck']}")
    max_ranks = args.max_ranks or 3 * args.hosts * cores
    space = Space(args.hosts, cores, max_ranks)
    best = rank(space, base, replica_of, predict, args.top)
    print(f"best {len(best)} of S, R, P, n_fetch = n_push with at most {max_ranks} ranks:")
    for i, p in enumerate(best, 1):
        print(f"{i}. {describe(p)}")
    if args.write and best:
        write_config(cfg, best[0].job, Path(args.write))
        print(f"wrote {args.write}")
    if args.plot:
        from .figure3 import plot

        print(f"wrote {plot(Path(args.plot), machine, data)}")
    return 0


def write_config(cfg, job: Job, out: Path) -> None:
    """``cfg`` with the job's topology and n_fetch/n_push, as TOML the loader accepts."""
    from .. import config as config_mod

    new = dataclasses.replace(
        cfg, topology=dataclasses.replace(cfg.topology, shards=job.shards,
                                          replicas=job.replicas, partitions=job.partitions),
        downpour=dataclasses.replace(cfg.downpour, n_fetch=job.n_fetch, n_push=job.n_push))
    text = ("# written by `dbmpi plan`: the best predicted topology for this machine\n"
            + config_mod.to_toml(new))
    out.write_text(text)
    config_mod.load(out)  # refuse to leave a file the loader would not take
