"""Measure what the cost model needs on this machine, in seconds, and cache it.

The cache is one JSON file per machine, ``calibration-HOSTNAME.json`` under
``$XDG_CACHE_HOME/dbmpi/`` (default ``~/.cache/dbmpi/``):

* ``machine``: sgemm GFLOP/s of one core, copy and Adagrad-apply bytes/s of one core, the
  compute rate per core with every core busy against one alone (``co_run``), the worker's
  per-step cost outside the layers, the shared-memory link (MPI, 2 ranks), the wait per
  synchronisation of lockstep partitions beside polling ranks (``oversub_sync``), the time of
  one control operation on such a rank (``ctrl_ops``) and the share of a core an idle
  shard's polling takes (``shard_poll_cores``);
* ``links``: other measured links by name (e.g. between namespace hosts of tests/netbed.py,
  written by benchmarks/plan.py), each latency, bandwidth and CPU per byte;
* ``layers``: per model and batch (keyed by a digest of the layer tables, input shape,
  classes and batch), forward + backward seconds of each layer on one core.

Compute is timed in a subprocess with one BLAS thread, as the training ranks run, and stored
steal-free: a virtual machine's steal time while it ran (:mod:`dbmpi.plan.procstat`) is taken
out, so that a calibration made while the hypervisor was busy describes the machine, not
that minute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DbmpiError
from .cost import Link, Machine
from .procstat import sample, steal_share

# 2: oversub_sync by busy ranks per core; shard_poll_cores; 3: ctrl_ops, steal-free;
# 4: oversub_sync beyond time-sharing, exchange_msg_s per model
VERSION = 4
# the coordinator's share of a core during training (records, no live evaluation), measured
# in docs/performance.md ("Waiting ranks on an oversubscribed node": 0.03-0.04)
COORDINATOR_CORES = 0.04


class CalibrationError(DbmpiError):
    """No usable calibration: the message names the file and the command that makes one."""

    exit_code = 3


def cache_path(env: dict | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dbmpi" / f"calibration-{socket.gethostname()}.json"


def signature(input_shape, layers, classes: int, loss: str, batch: int) -> str:
    key = json.dumps([list(input_shape), layers, classes, loss, batch], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no calibration for this machine: run `dbmpi plan "
                               f"CONFIG --calibrate` first (or pass --calibration FILE)") from None
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{path}: unreadable calibration ({e}): delete it and run "
                               f"`dbmpi plan CONFIG --calibrate`") from None
    if data.get("version") != VERSION or "machine" not in data:
        raise CalibrationError(f"{path}: calibration of another version: run `dbmpi plan "
                               f"CONFIG --calibrate` to measure again")
    return data


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def machine_of(data: dict) -> Machine:
    m = dict(data["machine"])
    m["shm"] = Link.of(m["shm"])
    for key in ("oversub_sync", "ctrl_ops"):
        m[key] = tuple(tuple(p) for p in m.get(key, ()))
    return Machine(**m)


def machine_for(data: dict, sig: str) -> Machine:
    """The machine as a model's replicas see it: its ``co_run`` measured with that model's own
    step where the calibration has it (sgemm's otherwise), and its partitions' CPU per message
    (:mod:`dbmpi.plan.partprobe`)."""
    m = machine_of(data)
    entry = data.get("layers", {}).get(sig, {})
    mine = {k: float(entry[k]) for k in ("co_run", "exchange_msg_s") if k in entry}
    return dataclasses.replace(m, **mine)


def layer_times(data: dict, sig: str, path: Path) -> dict:
    entry = data.get("layers", {}).get(sig)
    if entry is None:
        raise CalibrationError(f"{path}: no layer times for this config's model and batch: run "
                               f"`dbmpi plan CONFIG --calibrate` (seconds)")
    return entry


# ------------------------------------------------------------------ measurements (1 thread)

def _best(fn, repeats: int = 5) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def measure_layers(input_shape, layers, classes: int, loss: str, batch: int,
                   repeats: int = 7) -> list[float]:
    """Forward + backward seconds of each layer of the model (output layer and loss last)."""
    import numpy as np

    import cython_kernels as ck

    from ..model import Model
    from ..model.model import flat_batch

    model = Model.from_spec(input_shape, layers, classes, loss)
    model.init_params(0)
    rng = np.random.default_rng(0)
    x = flat_batch(rng.standard_normal((batch, *input_shape)).astype(np.float32))
    y = rng.integers(0, classes, batch)
    d = np.empty((batch, classes), np.float32)
    samples = []
    for _ in range(repeats + 1):
        t = []
        h = x
        for layer in model.layers:
            t0 = time.perf_counter()
            h = layer.forward(h, train=True)
            t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ck.softmax_xent(h, y, d) if loss == "softmax" else ck.multiclass_hinge(h, y, d)
        t[-1] += time.perf_counter() - t0
        g = d
        for i in range(len(model.layers) - 1, -1, -1):
            t0 = time.perf_counter()
            g = model.layers[i].backward(g, need_dx=i > 0)
            t[i] += time.perf_counter() - t0
        samples.append(t)
    return [statistics.median(s[i] for s in samples[1:]) for i in range(len(samples[0]))]


def step_rate(input_shape, layers, classes: int, loss: str, batch: int,
              seconds: float) -> float:
    """Steps/s of a replica's own work on one core over ``seconds``: the fetch (a copy of the
    whole parameter vector) and the model's forward + backward."""
    import numpy as np

    from ..model import Model
    from ..model.model import flat_batch

    model = Model.from_spec(input_shape, layers, classes, loss)
    fetched = model.init_params(0).copy()
    rng = np.random.default_rng(0)
    x = flat_batch(rng.standard_normal((batch, *input_shape)).astype(np.float32))
    y = rng.integers(0, classes, batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(model.params, fetched)
        model.forward_backward(x, y)
        n += 1
    return n / (time.perf_counter() - t0)


def measure_reader(path: str, batch: int, shuffle_buffer: int) -> float:
    """Mean seconds of the data reader's ``next_batch`` (refills of the shuffle buffer from
    HDF5 included: the mean, not the median, is what a step pays)."""
    from ..data import open_dataset

    reader = open_dataset(path).reader("train", batch_size=batch, shuffle_buffer=shuffle_buffer)
    reader.next_batch()
    n = min(400, max(64, 3 * shuffle_buffer // batch))
    t0 = time.perf_counter()
    for _ in range(n):
        reader.next_batch()
    return (time.perf_counter() - t0) / n


def measure_gang(cores: int, timeout: float = 120, repeats: int = 3
                 ) -> tuple[list[list[float]], list[list[float]], float]:
    """[busy ranks per core, the gap per synchronisation beyond time-sharing the cores] of
    lockstep gangs of ``cores`` and ``2 * cores`` ranks, each with 2 more ranks polling as
    idle shards do: what model partitions lose when ranks outnumber cores; [busy ranks per
    core, seconds of one control operation on a polling rank] (what a worker pays per shard
    for the protocol's counters); and the share of a core such a poller takes.

    Each gang runs ``repeats`` times and the least of each figure is kept: another process
    waking during a 2 s probe only lengthens it (one calibration read 1.9 and 3.1 ms where
    the machine's usual is 0.27-0.75 ms, while the jobs around it ran as usual)."""
    from ..launch import find_mpiexec, launch_env

    out, ops, polls = [], [], []
    for g in (cores, 2 * cores):
        n = g + 2
        cmd = [find_mpiexec(), "-n", str(n), sys.executable, "-m", "dbmpi.plan.linkprobe",
               "--gang", str(g)]
        runs = [_probe(cmd, launch_env(n, g, env=_worker_env()), "gang", timeout)
                for _ in range(repeats)]
        # beyond the members' time-sharing of the cores (the cost model's cores bound)
        out.append([g / cores, min(max(0.0, r["step_s"] - max(1, g / cores) * r["compute_s"])
                                   for r in runs)])
        ops.append([g / cores, min(r["ctrl_op_s"] for r in runs)])
        polls += [r["poll_cores"] for r in runs]
    return out, ops, statistics.median(polls)


def _sgemm_rate(seconds: float = 0.0) -> float:
    import numpy as np

    a = np.ones((1024, 1024), np.float32)
    t = _best(lambda: a @ a)
    if seconds:  # keep a core busy this long (the co-run measurement)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ a
            n += 1
        t = (time.perf_counter() - t0) / n
    return 2 * 1024**3 / t / 1e9


def measure_machine(batch: int = 128, features: int = 784) -> dict:
    import numpy as np

    import cython_kernels as ck

    n = 16 * 2**20  # 64 MB of float32: out of cache, like a shard's slice
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    copy = _best(lambda: np.copyto(dst, src))
    p, g, acc = np.zeros(n, np.float32), np.full(n, 1e-3, np.float32), np.ones(n, np.float32)
    apply = _best(lambda: ck.adagrad_dense(p, g, acc, 0.01, 1e-8, True), 3)
    buf = np.ones((16384, features), np.float32)
    idx = np.random.default_rng(0).integers(0, 16384, batch)
    gather = _best(lambda: buf[idx], 50)
    return {"gflops": _sgemm_rate(), "copy_bw": 2 * 4 * n / copy, "apply_bw": 4 * n / apply,
            "gather_s": gather}


def _worker_env() -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def _run_worker(args: list[str], timeout: float = 300) -> dict:
    p = subprocess.run([sys.executable, "-m", "dbmpi.plan.calibrate", *args], env=_worker_env(),
                       capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode:
        raise CalibrationError(f"the calibration worker failed ({p.returncode}): "
                               f"{(p.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _steal_free(args: list[str]) -> tuple[dict, float]:
    """The worker's result and the hypervisor's steal share while it ran
    (:mod:`dbmpi.plan.procstat`): times are stored steal-free, time x (1 - steal)."""
    before = sample()
    out = _run_worker(args)
    return out, steal_share(before, sample())


def co_run(cores: int, args: list[str] | None = None, key: str = "gflops") -> float:
    """Rate per process with ``cores`` worker processes at once / one alone: of sgemm, or of
    what the worker arguments ``args`` measure (their JSON field ``key``)."""
    if cores < 2:
        return 1.0
    args = args or ["--sgemm", "1.0"]
    ratios = []
    for _ in range(3):  # the machine may be shared: the median of three pairs
        alone = _run_worker(args)[key]
        procs = [subprocess.Popen([sys.executable, "-m", "dbmpi.plan.calibrate", *args],
                                  env=_worker_env(), stdout=subprocess.PIPE, text=True)
                 for _ in range(cores)]
        rates = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])[key]
                 for p in procs]
        ratios.append(statistics.mean(rates) / alone)
    return min(1.0, statistics.median(ratios))


def measure_link(wrap=None, env: dict | None = None, timeout: float = 120) -> dict:
    """Run the link probe on 2 ranks: ``wrap(cmd)`` gives the argv that starts them (default:
    this machine's ``mpiexec -n 2``, both ranks here)."""
    from ..launch import find_mpiexec, launch_env

    cmd = [sys.executable, "-m", "dbmpi.plan.linkprobe"]
    if wrap is None:
        cmd = [find_mpiexec(), "-n", "2", *cmd]
        env = launch_env(2, 2, env=dict(os.environ))
    else:
        cmd = wrap(cmd)
    return _probe(cmd, env, "link", timeout)


def measure_exchange(spec: str, cores: int, timeout: float = 120) -> float:
    """CPU seconds per message of the partitions' exchange of the model ``spec`` cut in 2 on
    2 ranks (:mod:`dbmpi.plan.partprobe`); 0 with one core or a model that cannot be cut in 2
    (the cost model then charges only the link)."""
    from ..launch import find_mpiexec, launch_env
    from ..model.partition import PartitionPlan

    if cores < 2:
        return 0.0
    shape, layers, classes, _, _ = json.loads(spec)
    try:
        PartitionPlan(tuple(shape), layers, classes, 2)
    except ValueError:  # ConfigError too: a layer too narrow to cut
        return 0.0
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "dbmpi.plan.partprobe", spec]
    return _probe(cmd, launch_env(2, 2, env=_worker_env()), "partition", timeout)["msg_s"]


def _probe(cmd: list[str], env: dict, what: str, timeout: float) -> dict:
    """Run an MPI probe; its last line of output (JSON), or one line naming it and why not."""
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if p.returncode:
        raise CalibrationError(f"the {what} probe failed ({p.returncode}): "
                               f"{(p.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def calibrate(path: Path, input_shape, layers, classes: int, loss: str, batch: int,
              machine_again: bool = False, data_path: str = "", shuffle_buffer: int = 8192) -> dict:
    """Measure the model's layers and the reader of ``data`` (and the machine, unless cached)
    into ``path``."""
    try:
        data = load(path)
    except CalibrationError:
        data = {"version": VERSION, "host": socket.gethostname(), "links": {}, "layers": {}}
    if machine_again or "machine" not in data:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        rates, steal = _steal_free(["--machine", str(batch), str(_features(input_shape))])
        shm = measure_link()
        sync, ops, poll = measure_gang(cores)
        data["machine"] = {
            "cores": cores, "gflops": rates["gflops"] / (1 - steal),
            "copy_bw": rates["copy_bw"] / (1 - steal), "apply_bw": rates["apply_bw"] / (1 - steal),
            "co_run": co_run(cores), "step_overhead_s": rates["gather_s"] * (1 - steal),
            "coordinator_cores": COORDINATOR_CORES, "shm": shm, "oversub_sync": sync,
            "ctrl_ops": ops, "shard_poll_cores": poll}
        data["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
        data["loadavg"] = os.getloadavg()
        data["steal"] = steal
    sig = signature(input_shape, layers, classes, loss, batch)
    spec = json.dumps([list(input_shape), layers, classes, loss, batch])
    times, steal = _steal_free(["--layers", spec])
    # this model's step on every core at once against one alone: the replicas' fetches and
    # layers share caches and memory as sgemm alone does not
    entry = {"batch": batch, "seconds": [t * (1 - steal) for t in times["seconds"]],
             "reader_s": 0.0, "steal": steal,
             "co_run": co_run(data["machine"]["cores"], ["--step", spec, "1.5"], "steps_per_s")}
    # CPU time: a guest's CPU clock leaves steal out already, so it is stored as measured
    entry["exchange_msg_s"] = measure_exchange(spec, data["machine"]["cores"])
    if data_path:  # without a data set the reader is left out (docs/planner.md)
        reader, steal = _steal_free(["--reader", data_path, str(batch), str(shuffle_buffer)])
        entry["reader_s"] = reader["seconds"] * (1 - steal)
    data.setdefault("layers", {})[sig] = entry
    save(path, data)
    return data


def _features(input_shape) -> int:
    n = 1
    for s in input_shape:
        n *= int(s)
    return n


def main(argv: list[str]) -> None:
    """The one-thread worker: ``--machine BATCH FEATURES``, ``--sgemm SECONDS``,
    ``--reader DIR BATCH BUFFER``, ``--layers JSON`` or ``--step JSON SECONDS``; prints one
    JSON line."""
    if argv[0] == "--machine":
        out = measure_machine(int(argv[1]), int(argv[2]))
    elif argv[0] == "--reader":
        out = {"seconds": measure_reader(argv[1], int(argv[2]), int(argv[3]))}
    elif argv[0] == "--sgemm":
        out = {"gflops": _sgemm_rate(float(argv[1]))}
    elif argv[0] == "--step":
        shape, layers, classes, loss, batch = json.loads(argv[1])
        out = {"steps_per_s": step_rate(shape, layers, classes, loss, batch, float(argv[2]))}
    else:
        shape, layers, classes, loss, batch = json.loads(argv[1])
        out = {"seconds": measure_layers(shape, layers, classes, loss, batch)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
