"""Every argument of both command lines has help text that gives its default; `--help` lists
every command; `--version` prints the project's version; the console scripts that pyproject
installs (`dbmpi`, `dbmpi-data`) are these command lines."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

import data_tools.__main__ as data_cli
import dbmpi.__main__ as dbmpi_cli

CLIS = {"dbmpi": dbmpi_cli.build_parser, "data_tools": data_cli.build_parser}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def _forms(value) -> set[str]:
    """How a help text may write a default: 30.0 as "30.0" or "30"."""
    return {str(value), f"{value:g}"} if isinstance(value, float) else {str(value)}


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Arguments without help, and optional ones whose help does not give their default."""
    bad = []
    for a in parser._actions:
        name = a.option_strings[-1] if a.option_strings else a.dest
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not a.help or a.help == argparse.SUPPRESS:
            bad.append(f"{name}: no help")
            continue
        if (not a.option_strings or a.required or a.nargs == 0
                or isinstance(a, argparse._SubParsersAction)):
            continue  # positional, required or a flag: there is no default to state
        text = a.help.lower()
        if "default" not in text:
            bad.append(f"{name}: help does not say its default")
        elif (a.default not in (None, [], "") and "%(default)" not in a.help
              and not any(re.search(rf"(?<![\w.]){re.escape(form.lower())}(?!\w|\.\d)", text)
                          for form in _forms(a.default))):
            bad.append(f"{name}: default {a.default!r} not in its help")
    return bad


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_argument_has_help_with_its_default(cli):
    problems = []
    for path, parser in walk(CLIS[cli]()):
        problems += [f"{cli} {' '.join(path)} {p}" for p in undocumented(parser)]
    assert not problems, "\n".join(problems)


def test_the_walker_finds_what_is_missing():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd").add_parser("x", help="x")
    sub.add_argument("run_dir")
    sub.add_argument("--count", type=int, default=8, help="how many")
    sub.add_argument("--seed", type=int, default=0, help="seed (default: 1)")
    sub.add_argument("--ok", type=int, default=3, help="fine (default: 3)")
    sub.add_argument("--flag", action="store_true", help="a switch")
    sub.add_argument("--limit", type=int, default=0, help="first N (default: 10)")
    sub.add_argument("--rate", type=float, default=30.0, help="rate (default 30)")
    found = [bad for _path, q in walk(p) for bad in undocumented(q)]
    assert found == ["cmd: no help", "run_dir: no help", "--count: help does not say its default",
                     "--seed: default 0 not in its help", "--limit: default 0 not in its help"]


def _help(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("module", sorted(CLIS))
def test_help_lists_every_command_in_plain_text(module):
    proc = _help(module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "``" not in proc.stdout  # RST markup does not belong in a terminal
    commands = [name for path, _p in walk(CLIS[module]()) if len(path) == 1
                for name in path]
    assert len(commands) >= 4
    listed = {ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("    ")
              and ln.split()}
    assert set(commands) <= listed, (commands, proc.stdout)
    for path, parser in walk(CLIS[module]()):
        assert "``" not in parser.format_help(), path


@pytest.mark.parametrize("module", sorted(CLIS))
def test_version(module):
    proc = _help(module, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "-m", module, VERSION]


def test_package_version_matches_pyproject():
    import dbmpi

    assert dbmpi.__version__ == VERSION


@pytest.mark.parametrize("script, prog", [("dbmpi", "dbmpi"), ("dbmpi-data", "dbmpi-data")])
def test_console_scripts_are_the_command_lines(script, prog, monkeypatch, capsys):
    """What pip installs as bin/SCRIPT: pyproject's entry point, called as a wrapper does."""
    target = PYPROJECT["project"]["scripts"][script]
    module, func = target.split(":")
    monkeypatch.setattr(sys, "argv", [f"venv/bin/{script}", "--version"])
    with pytest.raises(SystemExit) as e:
        sys.exit(getattr(importlib.import_module(module), func)())
    assert e.value.code == 0
    assert capsys.readouterr().out.split() == [prog, VERSION]
