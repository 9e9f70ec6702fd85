"""The dbmpi command line: ``dbmpi COMMAND`` (the console script ``make`` installs into
.venv) or ``python -m dbmpi COMMAND``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import envcheck
from .errors import DbmpiError

# What `python -m dbmpi` needs from its interpreter; checked first, so that the system Python
# gets one line naming .venv instead of an ImportError traceback.
DEPENDENCIES = ("numpy", "h5py", "mpi4py")

DESCRIPTION = """\
dbmpi: DistBelief on MPI. Trains networks over MPI ranks (Downpour SGD against a sharded
parameter server, Sandblaster L-BFGS, model parallelism), then evaluates and draws the runs.
Make shard data sets with dbmpi-data (python -m data_tools) first."""

EPILOG = """\
examples:
  dbmpi launch jobs/configs/demo.toml --set downpour.steps=500
  dbmpi eval runs/demo-20260101-120000
  dbmpi plot runs/a runs/b --target 0.85 --out compare.png
"""

RUN_DIR = "run directory (runs/NAME-TIMESTAMP, printed at the end of training)"
DATA = "data set directory (default: the run's data.path)"
SET = ("override a config value; VALUE is TOML: --set downpour.steps=500, strings "
       "quoted: --set 'run.name=\"mine\"' (repeatable; default: none)")


def version() -> str:
    """The installed distribution's version; the package's own when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dbmpi")
    except PackageNotFoundError:  # run from a checkout that pip never installed
        import dbmpi

        return dbmpi.__version__


def default_prog() -> str:
    return "dbmpi" if Path(sys.argv[0]).name == "dbmpi" else "python -m dbmpi"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or default_prog(), description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND",
                                help="`%(prog)s COMMAND --help` lists its arguments")

    p = sub.add_parser("train", help="train (run under mpiexec with the config's rank count; "
                                     "`launch` does that for you)")
    p.add_argument("config", help="TOML config file (see jobs/configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET)
    p.add_argument("--resume", action="store_true",
                   help="continue the newest runs/NAME-* that holds a checkpoint (a run.dir "
                        "that holds one is always resumed)")

    p = sub.add_parser("launch", help="run `train` under mpiexec with the right rank count "
                                      "and oversubscription settings")
    p.add_argument("config", help="TOML config file (see jobs/configs/); the rank count is "
                                  "1 + shards + replicas x partitions from its [topology]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET)
    p.add_argument("--dry-run", action="store_true",
                   help="print the command (and the rank -> host table) only")
    p.add_argument("--hosts", default=None, metavar="HOST:SLOTS,...",
                   help="place ranks on these hosts (see docs/placement.md); default: inside "
                        "a SLURM job the allocation's nodes, else wherever mpiexec puts them")
    p.add_argument("--hostfile", default=None, metavar="FILE",
                   help="hosts from a file, one `host:SLOTS` (or `host slots=N`) a line "
                        "(default: none)")
    p.add_argument("--ps-hosts", default=None, metavar="HOST,...",
                   help="hosts for the coordinator and the shards (default: the first host)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="let hosts take more ranks than slots instead of refusing")
    p.add_argument("--rankfile", default=None, metavar="FILE",
                   help="also write an Open MPI rankfile of the plan there (default: none)")
    p.add_argument("--verbose", action="store_true",
                   help="also show mpiexec's own lines (BAD TERMINATION, Abort(N) ...) on "
                        "stderr; they always go to RUN_DIR/launch.log")

    p = sub.add_parser("eval", help="test accuracy of a finished run, in the task's units "
                                    "(images, frames and utterances, next words; writes "
                                    "RUN_DIR/eval.json)")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR)
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--data", default=None, help=DATA)
    p.add_argument("--frames", default="all", choices=("all", "speech"),
                   help="frames that vote in utterance decisions (default: all)")
    p.add_argument("--iterates", action="store_true",
                   help="score every parameter vector a run recorded (iterates.h5: "
                        "sandblaster.record_iterates or downpour.record_iterates) into "
                        "eval_iterates.jsonl, for `plot`")

    p = sub.add_parser("plot", help="one run: draw its learning curve again; several runs (or "
                                    "--out): test accuracy against wall time, one line per run")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one or more run directories (runs/NAME-TIMESTAMP)")
    p.add_argument("--out", default=None,
                   help="PNG to write (several runs; default: time_to_accuracy.png)")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "loss"),
                   help="which eval record to draw (default: accuracy)")
    p.add_argument("--target", type=float, default=None,
                   help="draw this level and print when each run first reached it "
                        "(default: none)")
    p.add_argument("--title", default=None,
                   help="title of the comparison plot (default: none)")

    p = sub.add_parser("probe", help="autoencoder run: linear probe on learned vs random "
                                     "features, then fine-tuning (writes RUN_DIR/probe.json)")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR)
    p.add_argument("--data", default=None, help=DATA)
    p.add_argument("--train-limit", type=int, default=0,
                   help="first N training examples (default: 0 = all)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="first N test examples (default: 0 = all)")
    p.add_argument("--l2", type=float, default=1e-4,
                   help="L2 penalty of the probe (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=3,
                   help="epochs of fine-tuning the whole network (default: 3; 0 = none)")
    p.add_argument("--finetune-lr", type=float, default=0.01,
                   help="Adagrad rate of the fine-tuning (default: 0.01)")
    p.add_argument("--scratch", action="store_true",
                   help="also train the same network from its random weights, supervised only")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the classifier's initial output layer and of the fine-tuning's "
                        "minibatch order (default: 0; the random features use run.seed)")

    p = sub.add_parser("neurons", help="autoencoder run: top-activating test images and "
                                       "optimal stimuli of chosen neurons, as PNG grids")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR)
    p.add_argument("--data", default=None, help=DATA)
    p.add_argument("--unit", type=int, action="append", default=[],
                   help="output feature index (repeatable; default: the centre unit of each "
                        "of the first --count channels)")
    p.add_argument("--count", type=int, default=8,
                   help="channels to show when no --unit is given (default: 8)")
    p.add_argument("--top", type=int, default=8,
                   help="top-activating test images per neuron (default: 8)")
    p.add_argument("--steps", type=int, default=200, help="gradient-ascent steps (default: 200)")
    p.add_argument("--step", type=float, default=0.05,
                   help="step length as a fraction of the norm bound (default: 0.05)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="first N test images, for the top activations (default: 0 = all)")
    p.add_argument("--docs", default=None,
                   help="also copy the PNGs into this folder (default: none)")
    p.add_argument("--name", default=None,
                   help="file stem suffix in --docs (neurons_NAME.png; default: none, neurons.png)")

    p = sub.add_parser("neighbors", help="nearest words of a language model run, by cosine "
                                         "similarity of their embedding rows")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR)
    p.add_argument("--word", action="append", required=True,
                   help="word to look up (repeatable; at least one)")
    p.add_argument("-k", type=int, default=10, help="neighbours per word (default: 10)")
    p.add_argument("--data", default=None, help=DATA)

    p = sub.add_parser("export", help="write a run's trained model for use outside dbmpi: "
                                      "ONNX or plain arrays with a JSON spec (npz)")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="the run directory (holds config.toml and params.h5)")
    p.add_argument("--format", required=True, choices=("onnx", "npz"),
                   help="onnx (opset 17, for onnxruntime and other runtimes) or npz (numpy "
                        "arrays layerI.NAME plus the JSON spec 'spec'); see dbmpi/export.py")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="file to write (default: RUN_DIR/model.onnx or RUN_DIR/model.npz)")
    p.add_argument("--data", default=None,
                   help="data set directory whose manifest gives the input shape and classes "
                        "(default: the run's data.path)")
    p = sub.add_parser("replay", help="re-run a recorded Downpour run (run.record_order = true) "
                                      "in one process, to the same parameters bit for bit")
    p.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR)
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="stop each shard after its last push of a step <= STEP and write "
                        "those parameters (default: replay the whole run and compare)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="parameters file to write (default: RUN_DIR/replay_params.h5, or "
                        "replay_params_until_STEP.h5)")
    p = sub.add_parser("plan", help="predict a config's samples/s from a cost model and rank "
                                    "shards, replicas and partitions (docs/planner.md)")
    from .plan import add_arguments

    add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    envcheck.require("dbmpi", "dbmpi", DEPENDENCIES)
    envcheck.check_blas_choice("dbmpi")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":
            from .runner import train

            return train(args.config, args.set, resume=args.resume)
        if args.cmd == "launch":
            from .launch import main as launch_main

            return launch_main(args.config, args.set, args.dry_run, args.hosts,
                               args.hostfile, args.ps_hosts, args.oversubscribe,
                               args.rankfile, args.verbose)
        if args.cmd == "eval":
            from .evaluate import evaluate_iterates, evaluate_run, summary_line

            if args.iterates:
                print(evaluate_iterates(args.run_dir, args.split, args.data, args.frames))
            result = evaluate_run(args.run_dir, args.split, args.data, args.frames)
            print(summary_line(result))
            print(f"wrote {args.run_dir}/eval.json")
            return 0
        if args.cmd == "probe":
            from .probe import probe_run

            for name, v in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit),
                            ("--finetune-epochs", args.finetune_epochs)):
                if v < 0:
                    raise DbmpiError(f"{name} must be >= 0, got {v}")
            if args.l2 < 0 or args.finetune_lr <= 0:
                raise DbmpiError("--l2 must be >= 0 and --finetune-lr > 0")
            probe_run(args.run_dir, args.data, args.train_limit, args.test_limit, args.l2,
                      args.finetune_epochs, args.finetune_lr, args.scratch, args.seed)
            print(f"wrote {args.run_dir}/probe.json")
            return 0
        if args.cmd == "neurons":
            from .neurons import neurons

            if args.count < 1 or args.top < 1 or args.steps < 1 or args.step <= 0:
                raise DbmpiError("--count, --top and --steps must be >= 1 and --step > 0")
            out = neurons(args.run_dir, args.data, args.unit, args.count, args.top, args.steps,
                          args.step, args.test_limit, args.docs, args.name)
            for path in out["pictures"]:
                print(f"wrote {path}")
            return 0
        if args.cmd == "neighbors":
            from .lm import format_neighbors, neighbors

            print(format_neighbors(neighbors(args.run_dir, args.word, args.k, args.data)))
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
        if args.cmd == "replay":
            from .replay import replay

            if args.until is not None and args.until < 0:
                raise DbmpiError(f"--until must be a step >= 0, got {args.until}")
            print(replay(args.run_dir, args.until, args.out))
            return 0
        if args.cmd == "plan":
            from .plan.cli import run as plan_run

            return plan_run(args)
        if args.cmd == "export":
            from .export import export_run

            print(f"wrote {export_run(args.run_dir, args.format, args.out, args.data)}")
            return 0
    except DbmpiError as exc:
        print(f"dbmpi: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ImportError as exc:  # a dependency imported by one command only (matplotlib...)
        envcheck.exit_if_dependency("dbmpi", "dbmpi", exc)
    return 2


if __name__ == "__main__":
    sys.exit(main())
