"""The MPICH yield variables have one source, dbmpi.launch.MPICH_YIELD: the tests' job
environment, ``python -m dbmpi.launch --print-env`` (the Makefile) and jobs/site.sh (every job
script) all take them from it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import JOB_ENV, ROOT

from dbmpi.launch import MPICH_YIELD


def _clean_env() -> dict:
    """Our environment without the variables under test (nor an enclosing make's flags)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MPIR_CVAR_", "MAKE"))}


def test_the_list_is_mpichs_yield_settings():
    # the settings README "Oversubscription" measured; launch_env sets them when oversubscribed
    assert MPICH_YIELD == {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1",
                           "MPIR_CVAR_POLLS_BEFORE_YIELD": "1",
                           "MPIR_CVAR_CH4_PROGRESS_THROTTLE": "true",
                           "MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT": "1"}
    assert {k: JOB_ENV[k] for k in MPICH_YIELD} == MPICH_YIELD


def test_print_env_is_what_the_makefile_reads():
    out = subprocess.run([sys.executable, "-m", "dbmpi.launch", "--print-env"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert dict(line.split("=", 1) for line in out.splitlines()) == MPICH_YIELD
    bad = subprocess.run([sys.executable, "-m", "dbmpi.launch", "--nope"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "usage: python -m dbmpi.launch --print-env" in bad.stderr


def test_site_sh_exports_them_and_a_preset_value_wins(tmp_path):
    env = {**_clean_env(), "DBMPI_VENV": str(tmp_path / "no-venv"),  # keep this Python
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "MPIR_CVAR_POLLS_BEFORE_YIELD": "7"}
    out = subprocess.run(["bash", "-c", "source jobs/site.sh && env"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("MPIR_CVAR_"))
    assert got == {**MPICH_YIELD, "MPIR_CVAR_POLLS_BEFORE_YIELD": "7"}


def test_make_passes_them_to_the_test_stages():
    """`make -n test-mpi` shows the mpiexec lines with the variables from --print-env."""
    r = subprocess.run(["make", "-n", "--no-print-directory", "test-mpi",
                        f"PY={sys.executable}"], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "mpiexec" in ln and "pytest" in ln]
    assert len(lines) == 2
    for ln in lines:
        assert all(f"{k}={v}" in ln for k, v in MPICH_YIELD.items()), ln
