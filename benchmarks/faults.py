"""Faults as an outside tester meets them: does the job end by itself, and does the same
command resume it to the accuracy of an uninterrupted run?

A small synthetic job (1 coordinator + 2 shards + 1 replica with ``read_own_pushes``, which is
deterministic: a correct resume ends with exactly the uninterrupted run's accuracy) is run
once uninterrupted, then hit by a seeded schedule of SIGKILLs of random ranks at random
moments after its first checkpoint, each followed by re-running the same command; then once
each by SIGTERM to every rank, a corrupt newest checkpoint (a flipped byte) and a frozen
shard (SIGSTOP) followed by SIGTERM. Per case: tried, ended by itself within 30 s, resumed by
the same command, finished (the full step count), final accuracy equal to the reference.

    python benchmarks/faults.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine_info, print_table, write_json

from dbmpi import checkpoint as ckpt_mod
from dbmpi.faults import rank_pids
from dbmpi.launch import command, find_mpiexec, launch_env

NRANKS = 4  # coordinator, shards 1-2, replica 3
ROLES = {0: "coordinator", 1: "shard 0", 2: "shard 1", 3: "replica 0"}
END_S = 30.0  # SLURM's default KillWait: a job must end by itself within it
DEADLINE_S = 5.0  # checkpoint.deadline_s of the job


def make_data(root: Path) -> Path:
    py = sys.executable
    subprocess.run([py, "-m", "data_tools", "synth", "--out", str(root / "idx"), "--train",
                    "4000", "--test", "1000", "--seed", "3"], check=True, cwd=ROOT,
                   capture_output=True)
    subprocess.run([py, "-m", "data_tools", "shard", "idx", "--src", str(root / "idx"),
                    "--out", str(root / "shards"), "--shards", "2"], check=True, cwd=ROOT,
                   capture_output=True)
    return root / "shards"


def write_config(path: Path, data: Path, run: Path, steps: int) -> Path:
    path.write_text(f"""[topology]
shards = 2
replicas = 1
[model]
layers = [{{type = "dense", units = 32, activation = "relu"}}]
[data]
path = {json.dumps(str(data))}
batch_size = 32
[optimizer]
name = "adagrad"
learning_rate = 0.05
[downpour]
steps = {steps}
read_own_pushes = true
eval_every_s = 60.0
[checkpoint]
every_s = 0
every_steps = {max(steps // 8, 1)}
deadline_s = {DEADLINE_S}
[run]
dir = {json.dumps(str(run))}
seed = 1
""")
    return path


def committed(run: Path) -> list[Path]:
    return sorted(ckpt_mod.checkpoint_root(run).glob("ckpt-????????"))


class Job:
    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            command(str(cfg), [], NRANKS, find_mpiexec()), cwd=ROOT,
            env=launch_env(NRANKS, 1), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.err, start_new_session=True)

    def wait_until(self, pred, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if pred():
                return True
            if self.proc.poll() is not None:
                return bool(pred())
            time.sleep(0.05)
        return False

    def ended_within(self, limit: float) -> tuple[bool, float]:
        t = time.monotonic()
        try:
            self.proc.wait(limit)
            return True, time.monotonic() - t
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return False, time.monotonic() - t

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode("utf-8", "replace")


def rerun(cfg: Path, run: Path) -> dict:
    """The same command again: resumed? finished? its accuracy."""
    proc = subprocess.run(command(str(cfg), [], NRANKS, find_mpiexec()), cwd=ROOT,
                          env=launch_env(NRANKS, 1), capture_output=True, text=True,
                          timeout=600)
    summary = {}
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
    return {"rc": proc.returncode, "summary": summary, "stderr": proc.stderr[-2000:]}


def trial(root: Path, data: Path, steps: int, case: str, rng: random.Random,
          ref_acc: float) -> dict:
    run = root / "run"
    cfg = write_config(root / "job.toml", data, run, steps)
    job = Job(cfg)
    rec: dict = {"case": case}
    want = 2 if case == "corrupt newest checkpoint" else 1
    if not job.wait_until(lambda: len(committed(run)) >= want, 300):
        job.ended_within(0)
        return {**rec, "error": "no checkpoint came", "stderr": job.stderr()[-2000:]}
    stopped = None
    try:
        pids = rank_pids(cfg)
        if case == "SIGKILL":
            time.sleep(rng.uniform(0.0, 2.0))
            victim = rng.randrange(NRANKS)
            rec["victim"] = ROLES[victim]
            if victim in pids and job.proc.poll() is None:
                os.kill(pids[victim], signal.SIGKILL)
        elif case == "SIGTERM":
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
        elif case == "corrupt newest checkpoint":
            os.kill(pids[0], signal.SIGKILL)
        elif case == "frozen shard, then SIGTERM":
            stopped = pids[2]
            os.kill(stopped, signal.SIGSTOP)
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
        ended, seconds = job.ended_within(END_S)
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    rec.update(ended=ended, end_s=round(seconds, 2), rc=job.proc.returncode,
               last_line=next((ln for ln in reversed(job.stderr().splitlines())
                               if ln.startswith("dbmpi:")), ""))
    before = ckpt_mod.find_latest(run)
    if case == "corrupt newest checkpoint":
        newest = committed(run)[-1]
        shard = newest / "shard-0000.h5"
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        shard.write_bytes(bytes(blob))
        before = ckpt_mod.find_latest(run)  # what a correct resume falls back to
    again = rerun(cfg, run)
    s = again["summary"]
    resumed_from = s.get("resumed_from")
    if before is None:
        rec["resumed"] = again["rc"] == 0
    elif before.final:
        rec["resumed"] = again["rc"] == 0 and "finished run" in again["stderr"]
    else:
        rec["resumed"] = resumed_from == {"sequence": before.sequence, "steps": before.steps}
    rec.update(rerun_rc=again["rc"], finished=s.get("steps") == steps,
               accuracy=s.get("final_test_accuracy"),
               equal=s.get("final_test_accuracy") == ref_acc)
    if again["rc"] != 0:
        rec["rerun_stderr"] = again["stderr"]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILL trials (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600, help="steps of the job (default 600)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp)
        ref_root = tmp / "ref"
        ref_root.mkdir()
        cfg = write_config(ref_root / "job.toml", data, ref_root / "run", args.steps)
        ref = rerun(cfg, ref_root / "run")
        if ref["rc"] != 0:
            sys.exit(f"the uninterrupted run failed:\n{ref['stderr']}")
        ref_acc = ref["summary"]["final_test_accuracy"]
        cases = ["SIGKILL"] * args.kills + ["SIGTERM", "corrupt newest checkpoint",
                                            "frozen shard, then SIGTERM"]
        trials = []
        for i, case in enumerate(cases):
            root = tmp / f"t{i}"
            root.mkdir()
            rec = trial(root, data, args.steps, case, rng, ref_acc)
            print(json.dumps({k: v for k, v in rec.items() if "stderr" not in k}), flush=True)
            trials.append(rec)
    rows = []
    for case in dict.fromkeys(cases):
        got = [r for r in trials if r["case"] == case]
        label = f"{case} of a random rank" if case == "SIGKILL" else case
        rows.append([label, len(got), sum(bool(r.get("ended")) for r in got),
                     sum(bool(r.get("resumed")) for r in got),
                     sum(bool(r.get("finished")) for r in got),
                     sum(bool(r.get("equal")) for r in got),
                     " ".join(sorted({str(r.get("rc")) for r in got}))])
    print_table(["case", "tried", f"ended by itself < {END_S:g} s", "resumed by same command",
                 "finished", f"accuracy = uninterrupted ({ref_acc:.4f})", "exit status"], rows,
                title=f"faults on a {NRANKS}-rank job of {args.steps} steps (seed {args.seed})")
    write_json("faults", {"machine": machine_info(), "seed": args.seed, "steps": args.steps,
                          "reference_accuracy": ref_acc, "trials": trials,
                          "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
