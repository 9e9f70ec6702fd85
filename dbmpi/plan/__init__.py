"""The planner: a cost model of Downpour and Sandblaster jobs, calibrated on this machine, and
a search over shards, replicas and partitions (``dbmpi plan``; docs/planner.md).

Modules: :mod:`.cost` (the pure model), :mod:`.shape` (what a replica computes and moves, from
the model's partition plan), :mod:`.calibrate` (measurements, cached per machine),
:mod:`.linkprobe` (the MPI link probe), :mod:`.search` (the ranking), :mod:`.cli` (the
command), :mod:`.figure3` (the paper's Figure 3, extrapolated).
"""

from __future__ import annotations


def add_arguments(p) -> None:
    """The ``dbmpi plan`` arguments (kept here so that ``dbmpi/__main__.py`` grows one line)."""
    p.add_argument("config", help="TOML config file (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, as for train (repeatable; default: none)")
    p.add_argument("--hosts", type=int, default=1,
                   help="hosts the job may use (default: 1, this machine)")
    p.add_argument("--cores-per-host", type=int, default=None,
                   help="cores of each host (default: this machine's, from the calibration)")
    p.add_argument("--link", default=None, metavar="RATE|MEASURED|NAME",
                   help="link between hosts: a rate (10gbit, 1gbit, 100mbit), MEASURED (the "
                        "calibration's measured link) or a measured link's name (default: "
                        "10gbit)")
    p.add_argument("--background", type=float, default=0.0, metavar="CORES",
                   help="cores other tenants keep busy on each host (default: 0)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine and the config's layers first (seconds; cached "
                        "in $XDG_CACHE_HOME/dbmpi/ or ~/.cache/dbmpi/)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration file to use (default: the cache's file for this host)")
    p.add_argument("--input", default=None, metavar="SHAPE",
                   help="input shape, e.g. 28x28, with --classes (default: the config's data "
                        "set manifest)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes, with --input (default: the manifest's)")
    p.add_argument("--max-ranks", type=int, default=None,
                   help="largest job to consider (default: 3 x hosts x cores)")
    p.add_argument("--top", type=int, default=5, help="candidates to print (default: 5)")
    p.add_argument("--write", default=None, metavar="FILE",
                   help="write the config with the best topology there (TOML; default: none)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw predicted speedup against machines per model for the "
                        "paper's speech and image models (Figure 3; default: none)")
