"""The wrong interpreter: `python -m dbmpi` / `python -m data_tools` with a Python that lacks
the dependencies, and `dbmpi launch` with a Python that has no mpiexec while the project's
.venv has one, each end with one line that names the fix and exit status 2.

Each case runs in a subprocess on a copy of the dbmpi and data_tools packages in a temporary
"project" folder, with or without a .venv in it, so that whether this checkout has a .venv
does not change the expected message. The interpreter is this one's base Python: with -S it
has no site-packages (the system Python's state on a fresh machine), and with a PYTHONPATH it
gets exactly the packages a case allows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

from dbmpi import envcheck

BASE_PYTHON = os.path.realpath(sys.executable)  # a venv's python links to its base
SITE = sysconfig.get_paths()["purelib"]


def make_project(tmp_path: Path, venv: bool, mpiexec: bool = False) -> Path:
    proj = tmp_path / "proj"
    for pkg in ("dbmpi", "data_tools"):
        shutil.copytree(ROOT / pkg, proj / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    if venv:  # what `make` leaves: .venv/bin/python (and mpiexec with the mpich wheel)
        (proj / ".venv" / "bin").mkdir(parents=True)
        (proj / ".venv" / "bin" / "python").write_text("")
        if mpiexec:
            (proj / ".venv" / "bin" / "mpiexec").write_text("")
    return proj


def run(cmd: list[str], cwd: Path, pythonpath: str | None = None, path: str | None = None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    if path is not None:
        env["PATH"] = path
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    return lines[0]


def hint(module: str) -> str:
    return (f"activate the project's environment (source .venv/bin/activate) or run "
            f".venv/bin/python -m {module} ...")


@pytest.mark.parametrize("module, args", [("dbmpi", ["--help"]),
                                          ("dbmpi", ["eval", "runs/x"]),
                                          ("data_tools", ["check", "data/x"]),
                                          ("data_tools", ["--help"])])
def test_python_without_dependencies_names_the_venv(tmp_path, module, args):
    proj = make_project(tmp_path, venv=True)
    line = one_line(run([BASE_PYTHON, "-S", "-m", module, *args], proj))
    assert line == (f"{module}: error: this Python ({BASE_PYTHON}) lacks numpy: "
                    f"{hint(module)}")


def test_the_missing_package_is_named(tmp_path):
    """numpy importable, h5py not: the line names h5py (the issue's case)."""
    proj = make_project(tmp_path, venv=True)
    only = tmp_path / "only-numpy"
    only.mkdir()
    import numpy

    np_dir = Path(numpy.__file__).parent
    for d in (np_dir, np_dir.with_name("numpy.libs")):
        if d.exists():
            (only / d.name).symlink_to(d)
    line = one_line(run([BASE_PYTHON, "-S", "-m", "dbmpi", "--help"], proj,
                        pythonpath=str(only)))
    assert line == f"dbmpi: error: this Python ({BASE_PYTHON}) lacks h5py: {hint('dbmpi')}"


def test_without_a_venv_it_says_how_to_make_one(tmp_path):
    proj = make_project(tmp_path, venv=False)
    line = one_line(run([BASE_PYTHON, "-S", "-m", "data_tools", "--help"], proj))
    assert line.startswith(f"data_tools: error: this Python ({BASE_PYTHON}) lacks numpy: ")
    assert "pip install -e ." in line and "make setup" in line


@pytest.mark.skipif(not Path("/usr/bin/python3").exists()
                    or run(["/usr/bin/python3", "-c", "import h5py"], ROOT).returncode == 0,
                    reason="needs a system Python without h5py")
def test_the_system_python(tmp_path):
    """The issue's report as typed: the distribution's Python, no venv active."""
    proj = make_project(tmp_path, venv=True)
    line = one_line(run(["/usr/bin/python3", "-m", "data_tools", "check", "x"], proj))
    assert line.startswith("data_tools: error: this Python (/usr/bin/python3) lacks ")
    assert line.endswith(hint("data_tools"))


def test_dbmpi_own_import_errors_are_not_hidden():
    """Only third-party packages count as the wrong Python; a broken dbmpi import is a bug."""
    assert envcheck.dependency_error("dbmpi", "dbmpi",
                                     ImportError("cannot import name 'x'",
                                                 name="dbmpi.model")) is None
    kernels = ModuleNotFoundError("no", name="cython_kernels._dense")
    assert envcheck.dependency_error("dbmpi", "dbmpi", kernels) is None
    msg = envcheck.dependency_error("dbmpi", "dbmpi", ModuleNotFoundError("no", name="h5py"))
    assert msg.startswith(f"dbmpi: error: this Python ({sys.executable}) lacks h5py: ")
    with pytest.raises(ImportError):
        try:
            raise ImportError("boom", name="dbmpi.runner")
        except ImportError as exc:
            envcheck.exit_if_dependency("dbmpi", "dbmpi", exc)


def test_a_command_dependency_is_one_line(tmp_path, monkeypatch, capsys):
    """`plot` imports matplotlib only when it runs: missing, it is the same one line."""
    from dbmpi.__main__ import main

    for name in [m for m in sys.modules if m == "dbmpi.report" or m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ModuleNotFoundError
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and " lacks matplotlib: " in err[0], err


# ---------------------------------------------------------------- launch: which mpiexec

def _launch_without_mpiexec(tmp_path: Path, proj: Path):
    """`dbmpi launch` with a Python that has the packages but no mpiexec beside it or on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.symlink_to(BASE_PYTHON)  # sys.executable stays bin/python3: nothing beside it
    shutil.copy(ROOT / "jobs" / "configs" / "demo.toml", proj / "demo.toml")
    proc = run([str(python), "-m", "dbmpi", "launch", "demo.toml", "--dry-run"], proj,
               pythonpath=os.pathsep.join([str(proj), str(ROOT), SITE]), path=str(bin_dir))
    return python, one_line(proc)


def test_launch_names_the_venv_mpiexec(tmp_path):
    proj = make_project(tmp_path, venv=True, mpiexec=True)
    python, line = _launch_without_mpiexec(tmp_path, proj)
    assert line == (f"dbmpi: error: no mpiexec beside this Python ({python}) or on PATH, but "
                    f"the project's environment has one: {hint('dbmpi launch')}")


def test_launch_without_any_mpiexec_says_install_one(tmp_path):
    proj = make_project(tmp_path, venv=False)
    _python, line = _launch_without_mpiexec(tmp_path, proj)
    assert line == ("dbmpi: error: no mpiexec found: install an MPI (e.g. `pip install "
                    "'dbmpi[mpich]'`) or load your site's MPI module")
