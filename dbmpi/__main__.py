"""The dbmpi command line: ``python -m dbmpi {train,launch,eval,plot} ...``."""

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
    p.add_argument("--resume", action="store_true",
                   help="continue the newest runs/NAME-* that holds a checkpoint (a run.dir "
                        "that holds one is always resumed)")

    p = sub.add_parser("launch", help="run `train` under mpiexec with the right rank count "
                                      "and oversubscription settings")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the command only")

    p = sub.add_parser("eval", help="frame and utterance accuracy of a finished run "
                                    "(writes RUN_DIR/eval.json)")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--data", default=None, help="data set directory (default: the run's data.path)")
    p.add_argument("--frames", default="all", choices=("all", "speech"),
                   help="frames that vote in utterance decisions (default all)")
    p.add_argument("--iterates", action="store_true",
                   help="score every iterate of a Sandblaster run (iterates.h5) into "
                        "eval_iterates.jsonl, for `plot`")

    p = sub.add_parser("plot", help="one run: draw its learning curve again; several runs (or "
                                    "--out): test accuracy against wall time, one line per run")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None,
                   help="PNG to write (several runs; default time_to_accuracy.png)")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "loss"),
                   help="which eval record to draw (default accuracy)")
    p.add_argument("--target", type=float, default=None,
                   help="draw this level and print when each run first reached it")
    p.add_argument("--title", default=None)

    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":
            from .runner import train

            return train(args.config, args.set, resume=args.resume)
        if args.cmd == "launch":
            from .launch import main as launch_main

            return launch_main(args.config, args.set, args.dry_run)
        if args.cmd == "eval":
            from .evaluate import evaluate_iterates, evaluate_run, summary_line

            if args.iterates:
                print(evaluate_iterates(args.run_dir, args.split, args.data, args.frames))
            result = evaluate_run(args.run_dir, args.split, args.data, args.frames)
            print(summary_line(result))
            print(f"wrote {args.run_dir}/eval.json")
            return 0
        if args.cmd == "plot":
            from pathlib import Path

            from .report import plot_learning_curve, plot_time_to_accuracy

            if len(args.run_dirs) == 1 and args.out is None and args.target is None:
                print(plot_learning_curve(Path(args.run_dirs[0])))
                return 0
            out, table = plot_time_to_accuracy(
                [Path(d) for d in args.run_dirs], Path(args.out or "time_to_accuracy.png"),
                metric=args.metric, target=args.target, title=args.title)
            for row in table:
                print(row)
            print(out)
            return 0
    except DbmpiError as exc:
        print(f"dbmpi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
