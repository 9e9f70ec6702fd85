"""Shared benchmark helpers: one worker process per thread count, timing, tables, JSON.

Thread counts must be fixed before numpy (or torch) loads its BLAS, so a benchmark re-runs
itself as a worker subprocess with ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/
``MKL_NUM_THREADS`` set; the worker prints one JSON object on its last stdout line. This module
imports nothing heavy at the top for that reason.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# A folder holding the raw data sets the benchmarks read, one subfolder each: fashion-mnist/,
# mnist/, fsdd/, kjv/, ptb/ (README.md, "Data"). Used where a benchmark's --src is not given.
DATA_VAR = "DBMPI_DATA"
START_DIR = Path.cwd()  # relative --src and $DBMPI_DATA mean relative to where one started


def data_source(src: str | None, name: str, what: str, flag: str = "--src") -> str:
    """The raw data set a benchmark reads: ``src`` if given, else ``$DBMPI_DATA/name``.

    With neither (or a ``$DBMPI_DATA`` without ``name/``) prints one line saying what to pass
    and exits with status 2, as a bad command line does.
    """
    if src:
        return str(START_DIR / Path(src).expanduser())
    prog = Path(sys.argv[0]).name
    base = os.environ.get(DATA_VAR)
    base = base and Path(base).expanduser()
    if not base:
        fail = f"no {what}: pass {flag} DIR, or set {DATA_VAR} to a folder holding {name}/"
    elif not (START_DIR / base / name).is_dir():
        fail = f"{DATA_VAR}={base} has no {name}/ ({what}): pass {flag} DIR or fix {DATA_VAR}"
    else:
        return str(START_DIR / base / name)
    print(f"{prog}: error: {fail}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(script: str, threads: int, args: list[str], timeout: float = 900) -> dict:
    """Run ``python script --worker --threads N args`` with the thread variables set."""
    cmd = [sys.executable, script, "--worker", "--threads", str(threads), *args]
    p = subprocess.run(cmd, env=thread_env(threads), capture_output=True, text=True,
                       timeout=timeout, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check_threads(threads: int) -> None:
    """Fail loudly if a worker was started without its thread variables."""
    for var in THREAD_VARS:
        if os.environ.get(var) != str(threads):
            raise RuntimeError(f"{var} is {os.environ.get(var)!r}, expected {threads}: "
                               "start workers through run_worker()")


def time_calls(fn, repeats: int, number: int = 1, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), ``repeats`` samples of ``number`` calls each."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(fns: dict, repeats: int, number: int = 1, warmup: int = 1,
                cpu_out: dict | None = None, pause: float = 0.0,
                threads: int = 1) -> dict[str, list]:
    """Time several callables side by side (A B A B ...), so drift hits all of them alike.

    Returns wall-clock seconds per call. If ``cpu_out`` is a dict it receives CPU seconds per
    call too: the calling thread's with ``threads`` = 1, the whole process's (every BLAS,
    OpenMP or helper thread, spinning included) with more. That figure ignores time lost to
    other processes on a shared machine (not cache or memory-bandwidth contention).
    ``pause`` seconds of sleep (untimed) before each sample let the thread pool of the previous
    side (OpenBLAS, OpenMP) stop spinning, so that neither side pays for the other's.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    clock = time.thread_time if threads == 1 else time.process_time
    for _ in range(repeats):
        for name, fn in fns.items():
            if pause:
                time.sleep(pause)
            c0 = clock()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - t0) / number)
            cpu[name].append((clock() - c0) / number)
    if cpu_out is not None:
        cpu_out.update(cpu)
    return samples


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _blas_identity(blas: dict) -> dict:
    """What identifies a BLAS build: its name, version and configuration. The wheel's build
    directories are left out: they name the packager's machine, which results kept in docs/
    must not (tests/test_hygiene.py)."""
    return {k: v for k, v in blas.items() if "directory" not in k}


def machine_info() -> dict:
    """Cores, CPU, Python and the BLAS libraries numpy and scipy use (threadpoolctl if any)."""
    import numpy as np
    import scipy

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1_5_15min": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    for key, module in (("numpy_blas", np), ("scipy_blas (used by cython_kernels)", scipy)):
        try:
            blas = module.show_config(mode="dicts")["Build Dependencies"]["blas"]
            info[key] = _blas_identity(blas)
        except Exception as e:  # noqa: BLE001 - informational only
            info[key] = f"unavailable: {e}"
    try:
        import threadpoolctl

        # Without the library's file path: it names this machine's install folder.
        info["threadpools"] = [{k: v for k, v in pool.items() if k != "filepath"}
                               for pool in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    return info


def print_table(headers: list[str], rows: list[list], title: str = "") -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path
