"""The wrong Python: one-line errors that name the project's environment.

``make`` installs dbmpi's dependencies into ``.venv``; a user who then types ``python -m dbmpi``
with the system Python used to get an ImportError traceback (or "install an MPI" from
``launch`` while an mpiexec sat in ``.venv/bin``). This module says which interpreter to use
instead. It imports the standard library only: it runs before numpy, h5py or mpi4py are.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

# Packages of this project: an ImportError naming one of them is a bug in dbmpi (or kernels
# not built, which has its own message), never the wrong interpreter, so it is re-raised.
OWN = frozenset({"dbmpi", "data_tools", "cython_kernels", "tests", "benchmarks"})


def project_venvs() -> list[Path]:
    """The ``.venv`` folders ``make`` creates that this Python is not running from: in the
    working directory and in the checkout this package was loaded from."""
    here = Path(sys.prefix).resolve()
    found: list[Path] = []
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        venv = root / ".venv"
        if ((venv / "bin" / "python").exists() and venv.resolve() != here
                and all(venv.resolve() != f.resolve() for f in found)):
            found.append(venv)
    return found


def shown(path: Path) -> str:
    """``path`` as the user can type it from here: relative below the working directory."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def use_venv_hint(venv: Path, module_cmd: str) -> str:
    v = shown(venv)
    return (f"activate the project's environment (source {v}/bin/activate) or run "
            f"{v}/bin/python -m {module_cmd} ...")


def fail(message: str) -> NoReturn:
    """Print one line and exit with status 2, the status of every input error in dbmpi."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def _absent(package: str) -> bool:
    """Whether ``package`` itself cannot be found (a missing ``matplotlib`` surfaces as a
    missing ``matplotlib.pyplot`` when a submodule is imported first)."""
    import importlib.util

    try:
        return importlib.util.find_spec(package) is None
    except (ValueError, ImportError):  # sys.modules[package] is None, or a broken parent
        return True


def dependency_error(prog: str, module: str, exc: ImportError,
                     package: str | None = None) -> str | None:
    """The one-line message for an ImportError of a third-party package (``package``: the
    one being imported, when known); None when ``exc`` comes from this project's own modules
    (a bug: its traceback should show)."""
    name = (exc.name or package or "").partition(".")[0]
    if not name or name in OWN:
        return None
    if isinstance(exc, ModuleNotFoundError) and (exc.name == name or _absent(name)):
        what = f"lacks {name}"
    else:  # installed but broken (e.g. built against another numpy)
        what = f"cannot import {name} ({str(exc).splitlines()[0] if str(exc) else exc.name})"
    venvs = project_venvs()
    fix = (use_venv_hint(venvs[0], module) if venvs else
           "install the project's dependencies into it (pip install -e . in the checkout) "
           "or run `make setup` there, which creates .venv")
    return f"{prog}: error: this Python ({sys.executable}) {what}: {fix}"


def exit_if_dependency(prog: str, module: str, exc: ImportError,
                       package: str | None = None) -> NoReturn:
    """Exit 2 with one line if ``exc`` is a missing dependency; otherwise re-raise it."""
    message = dependency_error(prog, module, exc, package)
    if message is None:
        raise exc
    fail(message)


def require(prog: str, module: str, packages: tuple[str, ...]) -> None:
    """Exit 2 with one line naming the fix unless this Python can import ``packages``."""
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            exit_if_dependency(prog, module, exc, name)


def check_blas_choice(prog: str) -> None:
    """Exit 2 with one line if ``DBMPI_BLAS`` (which BLAS the kernels call) has a bad value:
    said once here, not as an ImportError on every rank."""
    # the rule of cython_kernels._blasinfo.choice_error, which cannot be imported here without
    # loading every kernel (the package's __init__)
    value = os.environ.get("DBMPI_BLAS", "auto").strip().lower() or "auto"
    if value in ("auto", "numpy", "scipy"):
        return
    fail(f"{prog}: error: DBMPI_BLAS={os.environ['DBMPI_BLAS']!r} is not one of auto, numpy, "
         "scipy (which BLAS the kernels call): unset it or pick one")
