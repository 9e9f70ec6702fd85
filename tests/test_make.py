"""The Makefile's test target: both stages run, each is reported, either failing fails it.

The Makefile runs in a scratch directory with a stand-in Python and mpiexec (shell scripts
that exit with the status each stage is told to), so no real test or compiler runs here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from conftest import ROOT

FAKE_PY = """#!/bin/bash
case "$*" in
  "-m dbmpi.launch --print-env") echo MPIR_CVAR_ENABLE_HEAVY_YIELD=1 ;;
  "-m tests.netbed check") echo "no namespaces in this stand-in"; exit 1 ;;
  *"-m pytest"*tests/mpi*) echo "ran mpi stage"; exit "$MPI_RC" ;;
  *"-m pytest"*) echo "ran serial stage: $*"; exit "$SERIAL_RC" ;;
esac
"""
FAKE_MPIEXEC = '#!/bin/bash\nshift 2\nexec "$@"\n'  # mpiexec -n N CMD... -> CMD...


@pytest.fixture
def project(tmp_path):
    """The Makefile with up-to-date stamps (setup and build have nothing to do)."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "setup.py"):
        (tmp_path / name).write_text("")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PY), ("mpiexec", FAKE_MPIEXEC)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    later = time.time() + 5  # the stamps are newer than what they depend on
    for stamp in (venv / ".dbmpi-deps", tmp_path / ".kernels-built"):
        stamp.touch()
        os.utime(stamp, (later, later))
    return tmp_path


def _make(project, target: str, serial_rc: int, mpi_rc: int) -> subprocess.CompletedProcess:
    # the stand-in cannot make namespaces: the multi-host stage must say so and pass, as on
    # any machine without root (CI's DBMPI_REQUIRE_NETNS=1 would turn that into a failure)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MAKE") and k != "DBMPI_REQUIRE_NETNS"}
    env.update(VIRTUAL_ENV=str(project / "venv"), SERIAL_RC=str(serial_rc), MPI_RC=str(mpi_rc))
    return subprocess.run(["make", "--no-print-directory", target], cwd=project, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("serial_rc, mpi_rc", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_make_test_runs_both_stages_and_fails_if_either_failed(project, serial_rc, mpi_rc):
    r = _make(project, "test", serial_rc, mpi_rc)
    assert "ran serial stage" in r.stdout and r.stdout.count("ran mpi stage") >= 1, r.stdout
    word = {0: "passed", 1: "FAILED"}
    assert (f"make test: serial stage {word[serial_rc]}, MPI stage {word[mpi_rc]}"
            in r.stdout), r.stdout + r.stderr
    assert "test-multihost: not run: no namespaces in this stand-in" in r.stdout, r.stdout
    assert "multi-host stage passed" in r.stdout, r.stdout
    assert (r.returncode == 0) == (serial_rc == 0 and mpi_rc == 0)


def test_make_check_leaves_the_job_tests_out(project):
    r = _make(project, "check", 0, 0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '-m pytest -m not job tests' in r.stdout and "mpi stage" not in r.stdout
