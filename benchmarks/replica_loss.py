"""A replica dies mid-run: going on without it (issue 22) against ending the job and resuming
it from the last checkpoint (what every rank's death did before, and what
``downpour.replica_loss = "stop"`` still does), side by side in one run.

Three cases on make demo's synthetic data and model, 3 replicas x ``--steps`` steps, 2 shards:
``whole`` (no kill), ``continue`` (SIGKILL of replica 2's rank once replica 0 has made
``--kill-at`` of its steps; the others go on) and ``stop + resume`` (the same kill with
``replica_loss = "stop"``; then the same command again, which resumes). Per case: wall time to
a finished run, final test accuracy, and for ``continue`` the job's samples/s before and after
the loss (from the replicas' train records), the time from the kill to hydra's death notice
and from the notice to the census that counted the replica lost.

    python benchmarks/replica_loss.py --steps 1500 --kill-at 500
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, print_table, write_json

from dbmpi.faults import rank_pids

VICTIM = 5  # 0 coordinator, 1-2 shards, 3-5 replicas 0-2
CKPT_STEPS = 600  # checkpoint.every_steps (summed over replicas): what a resume loses


def make_data(root: Path) -> Path:
    py = sys.executable
    subprocess.run([py, "-m", "data_tools", "synth", "--out", str(root / "idx")], check=True,
                   cwd=ROOT, capture_output=True)
    subprocess.run([py, "-m", "data_tools", "shard", "idx", "--src", str(root / "idx"),
                    "--out", str(root / "shards"), "--shards", "4"], check=True, cwd=ROOT,
                   capture_output=True)
    return root / "shards"


def write_config(path: Path, data: Path, run: Path, steps: int, loss: str) -> Path:
    path.write_text(f"""algorithm = "downpour"
[topology]
shards = 2
replicas = 3
[model]
layers = [{{type = "dense", units = 256, activation = "relu"}},
          {{type = "dense", units = 128, activation = "relu"}}]
[data]
path = {json.dumps(str(data))}
batch_size = 64
[optimizer]
name = "adagrad"
learning_rate = 0.02
[downpour]
steps = {steps}
warm_start_steps = 100
eval_every_s = 60.0
log_every = 25
replica_loss = "{loss}"
lost_after_s = 2.0
[checkpoint]
every_s = 0
every_steps = {CKPT_STEPS}
[run]
dir = {json.dumps(str(run))}
seed = 0
""")
    return path


def launch(cfg: Path, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen([sys.executable, "-m", "dbmpi", "launch", str(cfg)], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)


def replica0_step(run: Path) -> int:
    step = 0
    for f in (run / "metrics").glob("rank-*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train" and rec.get("replica") == 0:
                step = max(step, rec["step"])
    return step


def run_case(root: Path, data: Path, steps: int, case: str, kill_at: int) -> dict:
    run = root / case.replace(" ", "")
    cfg = write_config(root / f"{run.name}.toml", data, run, steps,
                       "stop" if case.startswith("stop") else "continue")
    log = tempfile.TemporaryFile()
    t = time.time()
    proc = launch(cfg, log)
    killed = None
    if case != "whole":
        while proc.poll() is None and replica0_step(run) < kill_at:
            time.sleep(0.05)
        pid = rank_pids(cfg).get(VICTIM)
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
    rc = proc.wait(timeout=900)
    first_rc = rc
    if case.startswith("stop"):  # the job ended: run the same command again
        proc = launch(cfg, log)
        rc = proc.wait(timeout=900)
    wall = time.time() - t
    out = {"case": case, "rc_first": first_rc, "rc": rc, "wall_s": round(wall, 2)}
    if (run / "summary.json").exists():
        s = json.loads((run / "summary.json").read_text())
        out.update(final_test_accuracy=s["final_test_accuracy"], steps=s["steps"])
        if s.get("replicas_lost"):
            loss = s["replicas_lost"][0]
            out.update(kill_to_notice_s=round(loss["notice_unix"] - killed, 3),
                       notice_to_census_s=loss["detection_s"], lost_at_step=loss["step"])
            out.update(rates(run, killed - t, loss["detected_s"]))
    return out


def rates(run: Path, kill_s: float, census_s: float) -> dict:
    """The job's samples/s (the sum over replicas of each one's mean over its train records)
    before the kill, and after the census."""
    train = []
    for f in (run / "metrics").glob("rank-*.jsonl"):
        train += [r for r in map(json.loads, f.read_text().splitlines())
                  if r.get("kind") == "train"]
    start, end = min(r["time"] for r in train), max(r["time"] for r in train)

    def rate(lo: float, hi: float) -> float:
        per_replica: dict[int, list[float]] = {}
        for r in train:
            if lo <= r["time"] < hi:
                per_replica.setdefault(r["replica"], []).append(r["samples_per_s"])
        return round(sum(sum(v) / len(v) for v in per_replica.values()), 1)

    # past the warm start (replica 0 alone) and the first records
    return {"samples_per_s_before": rate(start + 1.0, kill_s - 0.2),
            "samples_per_s_after": rate(census_s + 0.5, end)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="steps per replica")
    ap.add_argument("--kill-at", type=int, default=500, help="replica 0's step at the kill")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root)
        rows = [run_case(root, data, args.steps, case, args.kill_at)
                for case in ("whole", "continue", "stop + resume")]
    whole = rows[0]["wall_s"]
    table = [[r["case"], r["rc"], r["wall_s"], round(r["wall_s"] / whole, 2),
              r.get("final_test_accuracy"), r.get("samples_per_s_before", "-"),
              r.get("samples_per_s_after", "-"), r.get("kill_to_notice_s", "-"),
              r.get("notice_to_census_s", "-")] for r in rows]
    print_table(["case", "exit", "wall s", "/ whole", "test acc", "samples/s before",
                 "samples/s after", "kill->notice s", "notice->census s"], table,
                title=f"replica 2 of 3 SIGKILLed at replica 0's step {args.kill_at} of "
                      f"{args.steps} (load {load:.1f} -> {os.getloadavg()[0]:.1f})")
    write_json("replica_loss", {"machine": machine_info(), "args": vars(args),
                                "load_before": load, "load_after": os.getloadavg()[0],
                                "rows": rows})


if __name__ == "__main__":
    main()
