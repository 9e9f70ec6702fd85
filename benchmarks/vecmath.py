"""The elementwise passes of the kernels built for each x86 instruction set, with and without
``-fno-trapping-math``.

``cython_kernels/_vecmath.h`` is built into every kernel as AVX-512, AVX2 and baseline clones
and the CPU picks one at load time, so a run of ``benchmarks/kernels.py`` only ever shows the
one this machine picks. This compiles ``_vecmath_driver.c`` against the header once per
instruction set (``-march=x86-64-v4``/``-v3``/``x86-64``, the clones turned off) and per flag
set: setup.py's, and the same without ``-fno-trapping-math`` (the reference: how the kernels
were built before 12-04). It runs the builds interleaved for ``--rounds`` rounds and prints the
median microseconds of each pass over a 128 x 2560 float32 block, the speed-up, and whether
both builds wrote the same bits (they must: the flag only lets gcc evaluate operations whose
exception flags nobody reads). An instruction set this CPU lacks is left out.

    python benchmarks/vecmath.py               # 5 rounds: results/vecmath.json
    python benchmarks/vecmath.py --rounds 1    # smoke run

Needs a C compiler (``$CC``, else ``cc``): the one that builds the kernels.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def setup_cflags() -> list[str]:
    """setup.py's release CFLAGS, read from its source (importing setup.py runs the build)."""
    tree = ast.parse((C.ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CFLAGS"
                                                for t in node.targets):
            value = node.value
            return ast.literal_eval(value.orelse if isinstance(value, ast.IfExp) else value)
    raise SystemExit("vecmath.py: error: setup.py has no CFLAGS assignment to read")


FLAGS = setup_cflags()
REFERENCE = [f for f in FLAGS if f != "-fno-trapping-math"]
# (name, -march, the /proc/cpuinfo flags a CPU needs to run it)
ISAS = [("AVX-512", "x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
        ("AVX2", "x86-64-v3", {"avx2", "fma", "bmi2"}),
        ("SSE2", "x86-64", set())]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(cc: str, march: str, flags: list[str], out: Path) -> Path:
    here = Path(__file__).resolve().parent
    cmd = [cc, *flags, f"-march={march}", "-DDBMPI_NO_CLONES",
           f"-I{C.ROOT / 'cython_kernels'}", str(here / "_vecmath_driver.c"), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"vecmath.py: error: {' '.join(cmd)} failed:\n{p.stderr.strip()}")
    return out


def run(exe: Path) -> dict:
    """One run of a build: {pass: {"us": median microseconds, "hash": of the bytes written}}."""
    p = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = ap.parse_args()
    cc = compiler()
    if not cc:
        raise SystemExit("vecmath.py: error: no C compiler: install gcc or set CC")
    if os.uname().machine != "x86_64":
        raise SystemExit(f"vecmath.py: error: the instruction sets compared are x86-64's; "
                         f"this machine is {os.uname().machine}")
    have = cpu_flags()
    isas = [(name, march) for name, march, need in ISAS if need <= have]
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, march in isas:
            for label, flags in (("ours", FLAGS), ("reference", REFERENCE)):
                builds[(name, label)] = build(cc, march, flags, Path(tmp) / f"{march}-{label}")
        runs = {key: [] for key in builds}
        loads = []
        for i in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for key, exe in builds.items():
                runs[key].append(run(exe))
            print(f"round {i + 1} done (load {loads[-1]:.2f})", flush=True)
    rows, results = [], []
    for name, _ in isas:
        ours, ref = runs[(name, "ours")], runs[(name, "reference")]
        for kernel in ours[0]:
            us = C.median([r[kernel]["us"] for r in ours])
            us_ref = C.median([r[kernel]["us"] for r in ref])
            same = all(o[kernel]["hash"] == r[kernel]["hash"] for o, r in zip(ours, ref))
            results.append({"isa": name, "kernel": kernel, "us": us, "reference_us": us_ref,
                            "speedup": us_ref / us, "same_bits": same})
            rows.append([name, kernel, us, us_ref, us_ref / us, "yes" if same else "NO"])
    table = C.print_table(
        ["ISA", "pass (128x2560 float32)", "us", "us without -fno-trapping-math", "speed-up",
         "same bits"], rows,
        f"elementwise passes of _vecmath.h by instruction set; medians of {args.rounds} "
        f"rounds, load {min(loads):.2f}-{max(loads):.2f}; {cc} {' '.join(FLAGS)}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    C.write_json("vecmath", {"machine": {"cpu": C._cpu_model(), "compiler": version.split("\n")[0],
                                         "loadavg_at_end": os.getloadavg()},
                             "flags": FLAGS, "reference_flags": REFERENCE, "loads": loads,
                             "results": results, "runs": {f"{k[0]}/{k[1]}": v
                                                          for k, v in runs.items()},
                             "tables": [table]})
    if not all(r["same_bits"] for r in results):
        raise SystemExit("vecmath.py: error: a pass wrote different bits with and without "
                         "-fno-trapping-math (see the table)")


if __name__ == "__main__":
    main()
