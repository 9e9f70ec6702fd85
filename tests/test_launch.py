"""The launcher's environment and command line."""

import sys

from dbmpi import launch


def test_yield_settings_only_when_oversubscribed(monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    env = launch.launch_env(5, 2, env={})
    assert env["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    env = launch.launch_env(2, 1, env={})
    assert "MPIR_CVAR_ENABLE_HEAVY_YIELD" not in env
    assert env["OPENBLAS_NUM_THREADS"] == "1"  # one core left to the coordinator/shards
    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    assert launch.launch_env(7, 3, env={})["OPENBLAS_NUM_THREADS"] == "5"
    assert launch.launch_env(3, 3, env={})["OPENBLAS_NUM_THREADS"] == "5"
    env = launch.launch_env(5, 2, env={"OPENBLAS_NUM_THREADS": "4",
                                       "MPIR_CVAR_POLLS_BEFORE_YIELD": "9"})
    assert env["OPENBLAS_NUM_THREADS"] == "4" and env["MPIR_CVAR_POLLS_BEFORE_YIELD"] == "9"


def test_command_has_rank_count_and_overrides():
    cmd = launch.command("c.toml", ["a.b=1"], 7, "mpiexec")
    assert cmd[:3] == ["mpiexec", "-n", "7"]
    assert cmd[3:8] == [sys.executable, "-m", "mpi4py", "-m", "dbmpi"]
    assert cmd[-4:] == ["train", "c.toml", "--set", "a.b=1"]
