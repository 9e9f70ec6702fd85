"""dbmpi.rundir.RunDir: one reader of finished runs for eval, neighbors, probe, neurons, plot.

The run directories here are written by hand with the project's own writers (config.to_toml,
checkpoint.save_params / append_iterate), so each reader is checked against what was written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbmpi import config as config_mod
from dbmpi.checkpoint import append_iterate, save_params
from dbmpi.errors import ConfigError, DbmpiError
from dbmpi.model import Model
from dbmpi.rundir import RunDir

LAYERS = [{"type": "dense", "units": 8, "activation": "relu"}]


def _run(tmp_path, data, name="run", size=None):
    """A finished run's directory: config, params of a 784-8-10 MLP, metrics, summary."""
    d = tmp_path / name
    d.mkdir()
    cfg = config_mod.from_dict({"topology": {"shards": 1, "replicas": 1},
                                "model": {"layers": LAYERS}, "data": {"path": str(data)},
                                "run": {"seed": 3}})
    (d / "config.toml").write_text(config_mod.to_toml(cfg))
    model = Model.from_spec((28, 28), LAYERS, 10)
    params = model.init_params(3).copy()
    if size is not None:
        params = np.zeros(size, np.float32)
    save_params(d / "params.h5", params, {"layers": LAYERS, "loss": "softmax"})
    recs = [{"kind": "train", "time": 0.5, "replica": 0, "step": 1, "loss": 2.0},
            {"kind": "eval", "time": 1.0, "wall_s": 1.0, "loss": 1.5, "accuracy": 0.4},
            {"kind": "lbfgs", "time": 2.0, "iteration": 0},
            {"kind": "lbfgs", "time": 3.5, "iteration": 1}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(json.dumps({"steps": 1, "final_test_accuracy": 0.4}))
    return d, cfg, params, recs


def _one_line_error(call, *needles):
    with pytest.raises(DbmpiError) as info:
        call()
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_open_names_what_is_missing_and_the_fix(tmp_path):
    _one_line_error(lambda: RunDir.open(tmp_path / "nope"), "nope: no such directory",
                    "config.toml", "python -m dbmpi train")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: RunDir.open(tmp_path / "empty"), "empty/config.toml: missing",
                    "not a run directory")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.toml").write_text("[model]\nnope = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'model.nope'"):
        _ = RunDir.open(tmp_path / "bad").config  # the property reads the file


def test_reads_back_what_the_run_wrote(tmp_path, small_data):
    d, cfg, params, recs = _run(tmp_path, small_data)
    rd = RunDir.open(d)
    assert rd.config == cfg and rd.config.run.seed == 3
    assert rd.data_path() == str(small_data) and rd.data_path("elsewhere") == "elsewhere"
    got, spec = rd.params()
    np.testing.assert_array_equal(got, params)
    assert spec == {"layers": LAYERS, "loss": "softmax"}
    ds = rd.dataset()
    model = rd.model(ds, spec, got.size)
    assert model.num_params == Model.from_spec((28, 28), LAYERS, 10).num_params == params.size
    assert rd.metrics() == recs
    assert rd.eval_records() == [recs[1]]
    assert rd.summary() == {"steps": 1, "final_test_accuracy": 0.4}
    # `eval --iterates` output replaces the run's own evaluations
    scored = [{"kind": "eval", "iteration": 0, "accuracy": 0.9, "wall_s": 2.0}]
    (d / "eval_iterates.jsonl").write_text(json.dumps(scored[0]) + "\n")
    assert rd.eval_records() == scored


def test_a_model_of_another_size_names_params_and_data(tmp_path, small_data):
    d, *_ = _run(tmp_path, small_data, size=123)
    rd = RunDir.open(d)
    _, spec = rd.params()
    _one_line_error(lambda: rd.model(rd.dataset(), spec, 123), "params.h5 holds 123 parameters",
                    "--data")


def test_missing_files_name_the_file(tmp_path, small_data):
    d, *_ = _run(tmp_path, small_data)
    for name in ("params.h5", "metrics.jsonl", "summary.json"):
        (d / name).unlink()
    rd = RunDir.open(d)
    _one_line_error(rd.params, "params.h5: missing", "did not finish")
    _one_line_error(rd.metrics, "metrics.jsonl: missing")
    _one_line_error(rd.summary, "summary.json: missing")
    _one_line_error(rd.iterates, "iterates.h5: missing", "record_iterates=true")
    _one_line_error(rd.vocab, "vocab.json: missing", "data_tools shard text")


def test_iterates_are_timed_by_their_own_rows_or_by_lbfgs_records(tmp_path, small_data):
    d, *_ = _run(tmp_path, small_data)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 5)).astype(np.float32)
    for k, x in enumerate(rows):  # Downpour: wall_s and step beside each row
        append_iterate(d / "iterates.h5", x, wall_s=1.5 * k, step=10 * k)
    got = list(RunDir(d).iterates())
    assert [(i.index, i.total, i.wall_s, i.step) for i in got] == [
        (0, 3, 0.0, 0), (1, 3, 1.5, 10), (2, 3, 3.0, 20)]
    np.testing.assert_array_equal(np.stack([i.params for i in got]), rows)
    # Sandblaster: row k is iteration k, timed by metrics.jsonl's lbfgs record k
    (d / "iterates.h5").unlink()
    for x in rows[:2]:
        append_iterate(d / "iterates.h5", x)
    assert [(i.index, i.wall_s, i.step) for i in RunDir(d).iterates()] == [(0, 2.0, 0),
                                                                          (1, 3.5, 1)]
    append_iterate(d / "iterates.h5", rows[2])  # no lbfgs record for iteration 2
    _one_line_error(lambda: list(RunDir(d).iterates()), "no lbfgs record for iteration 2")


def test_vocab_of_the_runs_data_set(tmp_path, small_data):
    d, *_ = _run(tmp_path, small_data)
    text = tmp_path / "text"
    text.mkdir()
    vocab = {"schema": "dbmpi.vocab", "schema_version": 1, "words": ["</s>", "<unk>", "a"]}
    (text / "vocab.json").write_text(json.dumps(vocab))
    assert RunDir.open(d).vocab(text) == vocab
