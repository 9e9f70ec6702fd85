"""The sparse autoencoder on real images: unsupervised Downpour training, then a classifier.

1. shards Fashion-MNIST with ``python -m data_tools shard images`` (once; ``--data``),
2. trains the autoencoder of ``--config`` unsupervised with Downpour (``dbmpi launch``),
3. ``python -m dbmpi probe``: linear probe on the encoder's features with the random initial
   weights and with the learned weights (same architecture, same data, same probe), then
   fine-tuning of the whole network from the learned weights, and (``--scratch``, on by
   default) the same network trained on the labels alone from the random weights for the
   same epochs,
4. ``python -m dbmpi neurons`` (``--neurons``): the neuron pictures, copied to docs/.

Prints the table and writes ``benchmarks/results/autoencoder.json``.

    python benchmarks/autoencoder.py --src DIR                       # about 10 minutes here
    python benchmarks/autoencoder.py --set downpour.epochs=1 --train-limit 10000 --epochs 1

DIR holds Fashion-MNIST's idx files (github.com/zalandoresearch/fashion-mnist, data/fashion/);
without --src, $DBMPI_DATA/fashion-mnist is used. Neither is needed once --data holds shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, data_source, machine_info, print_table, write_json
from _jobs import launch

CONFIG = "jobs/configs/autoencoder_fmnist.toml"


def ensure_data(src: str | None, out: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    src = data_source(src, "fashion-mnist", "Fashion-MNIST idx files to shard into " + str(out))
    subprocess.run([sys.executable, "-m", "data_tools", "shard", "images", "--src", src,
                    "--out", str(out), "--shards", "4", "--class-names", "fashion-mnist"],
                   cwd=ROOT, check=True)


def train(config: str, overrides: list[str], run_dir: Path) -> dict:
    job = launch(config, overrides, run_dir, timeout=3600)
    evals = [r for r in job["records"] if r["kind"] == "eval"]
    return {"summary": job["summary"], "job_wall_s": job["wall_s"],
            "first_eval": evals[0], "last_eval": evals[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--src", default=None,
                    help="Fashion-MNIST idx files (default $DBMPI_DATA/fashion-mnist; "
                    "needed only while --data holds no shards)")
    ap.add_argument("--data", default="data/fmnist-images", help="shard directory")
    ap.add_argument("--run-dir", default="runs/autoencoder-bench")
    ap.add_argument("--skip-train", action="store_true", help="probe an existing --run-dir")
    ap.add_argument("--train-limit", type=int, default=0, help="probe/fine-tune on N images")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning Adagrad rate")
    ap.add_argument("--l2", type=float, default=1e-4, help="probe L2 penalty")
    ap.add_argument("--no-scratch", action="store_true")
    ap.add_argument("--neurons", action="store_true", help="draw the neurons into docs/")
    ap.add_argument("--name", default="fmnist", help="docs/neurons_NAME.png")
    a = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    load0 = os.getloadavg()
    data = Path(a.data)
    ensure_data(a.src, data)
    run_dir = Path(a.run_dir)
    overrides = [f"data.path={json.dumps(str(data))}", *a.set]
    job = None
    if not a.skip_train:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        job = train(a.config, overrides, run_dir)
        print(f"trained: {job['summary']['steps']} steps in {job['summary']['wall_s']:.1f} s; "
              f"test reconstruction {job['first_eval'].get('reconstruction'):.4f} -> "
              f"{job['last_eval'].get('reconstruction'):.4f}", flush=True)
    from dbmpi.probe import probe_run

    probe = probe_run(run_dir, str(data), a.train_limit, 0, a.l2, a.epochs, a.lr,
                      scratch=not a.no_scratch)
    rows = [["linear probe, random weights (the run's initial parameters)",
             probe["probe"]["random"]["test_accuracy"]],
            ["linear probe, learned weights (unsupervised Downpour)",
             probe["probe"]["learned"]["test_accuracy"]]]
    if "finetune" in probe:
        rows.append([f"fine-tuned from learned weights ({a.epochs} epochs)",
                     probe["finetune"]["test_accuracy"]])
    if "scratch" in probe:
        rows.append([f"same network trained from random weights ({a.epochs} epochs, labels only)",
                     probe["scratch"]["test_accuracy"]])
    text = print_table(["classifier", "test accuracy"], [[r[0], f"{r[1]:.4f}"] for r in rows],
                       title=f"Fashion-MNIST, {probe['train_examples']} training / "
                             f"{probe['test_examples']} test images, "
                             f"{probe['probe']['learned']['features']} features")
    pics = None
    if a.neurons:
        from dbmpi.neurons import neurons

        pics = neurons(run_dir, str(data), docs="docs", name=a.name)
    write_json("autoencoder", {"config": a.config, "overrides": overrides, "train": job,
                               "probe": probe, "neurons": pics, "table": text,
                               "loadavg_start": load0, "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
