"""The dbmpi command line: ``python -m dbmpi {train,launch} ...``."""

from __future__ import annotations

import argparse
import sys

from .errors import DbmpiError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbmpi", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train (run under mpiexec with the config's rank count)")
    p.add_argument("config", help="TOML config file (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")

    p = sub.add_parser("launch", help="run `train` under mpiexec with the right rank count "
                                      "and oversubscription settings")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the command only")

    p = sub.add_parser("plot", help="draw a run's learning curve again")
    p.add_argument("run_dir")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":
            from .runner import train

            return train(args.config, args.set)
        if args.cmd == "launch":
            from .launch import main as launch_main

            return launch_main(args.config, args.set, args.dry_run)
        if args.cmd == "plot":
            from pathlib import Path

            from .report import plot_learning_curve

            print(plot_learning_curve(Path(args.run_dir)))
            return 0
    except DbmpiError as exc:
        print(f"dbmpi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
