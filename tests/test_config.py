"""Config loading, overrides and validation: every mistake names its field."""

from pathlib import Path

import pytest

from dbmpi import config
from dbmpi.errors import ConfigError


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = _write(tmp_path, '[topology]\nshards = 3\n[downpour]\nsteps = 10\n')
    cfg = config.load(p, ["downpour.n_push=4", "run.name=abc", "optimizer.learning_rate=1"])
    assert cfg.topology.shards == 3 and cfg.topology.world_size == 1 + 3 + 2
    assert cfg.downpour.steps == 10 and cfg.downpour.n_push == 4
    assert cfg.run.name == "abc"
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)


def test_round_trip_through_toml(tmp_path):
    cfg = config.load(_write(tmp_path, '[model]\nlayers = [{type = "dense", units = 7, '
                                       'activation = "tanh"}]\n'))
    again = config.load(_write(tmp_path, config.to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text,field", [
    ("[topology]\nshards = 0\n", "topology.shards"),
    ("[topology]\nreplicas = -1\n", "topology.replicas"),
    ("[topology]\nshards = 1.5\n", "topology.shards"),
    ("[topology]\nsplit = \"columns\"\n", "topology.split"),
    ("[optimizer]\nlearning_rate = -0.1\n", "optimizer.learning_rate"),
    ("[optimizer]\nname = \"adamw\"\n", "optimizer.name"),
    ("[downpour]\nn_fetch = 0\n", "downpour.n_fetch"),
    ("[downpour]\ntarget_accuracy = 1.5\n", "downpour.target_accuracy"),
    ("[downpour]\ntarget_accuracy = 0.9\nrecord_iterates = true\n", "downpour.target_accuracy"),
    ("[downpour]\nsteps = 0\n", "downpour.steps"),
    ("[downpour]\nread_own_pushes = 1\n", "downpour.read_own_pushes"),
    ("[downpour]\nn_fech = 1\n", "downpour.n_fech"),
    ("[data]\nbatch_size = 0\n", "data.batch_size"),
    ("[model]\nlayers = [{type = \"conv\", units = 3}]\n", "model.layers[0].type"),
    ("[model]\nlayers = [{type = \"dense\", units = 0}]\n", "model.layers[0].units"),
    ("[model]\nlayers = [{type = \"dense\", units = 4, activation = \"gelu\"}]\n",
     "model.layers[0].activation"),
    ("[model]\nlayers = [{units = 4, dropout = 1.5}]\n", "model.layers[0].dropout"),
    ("[model]\nlayers = [{units = 4, dropout = 0.5}]\n[topology]\npartitions = 2\n",
     "model.layers[0].dropout"),
    ("[model]\nlayers = [{type = \"lcn\", size = 3, dropout = 0.5}]\n", "model.layers[0]"),
    ("[bogus]\nx = 1\n", "bogus"),
    ("algorithm = \"hogwild\"\n", "algorithm"),
])
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text))
    msg = str(info.value)
    assert field in msg and "\n" not in msg and str(tmp_path / "c.toml") in msg


def test_bad_override_syntax(tmp_path):
    p = _write(tmp_path, "")
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(p, ["downpour.steps"])
    with pytest.raises(ConfigError, match="section.key"):
        config.load(p, ["steps=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[topology\n"))


def test_every_shipped_config_is_valid():
    """Each jobs/configs/*.toml loads and validates (a typo there would fail a user's job)."""
    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    names = sorted(root.glob("*.toml"))
    assert len(names) >= 10
    for path in names:
        cfg = config.load(path)
        assert cfg.topology.world_size >= 2, path
    lm = config.load(root / "lm_kjv.toml")
    assert [layer.get("dropout") for layer in lm.model.layers] == [0.1, 0.4]
    assert config.load(root / "lm_kjv_ranking.toml").model.loss == "ranking"
