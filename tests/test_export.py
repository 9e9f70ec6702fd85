"""``python -m dbmpi export``: the exported model gives dbmpi's own predictions.

Nothing is trained: each run directory is written by hand with the project's own writers
(config.to_toml, checkpoint.save_params) around random parameters, as tests/test_rundir.py
does. The ONNX model runs in onnxruntime on the test split and is checked against
``Model.forward`` (its logits, and their softmax computed here in float64); the npz arrays are
loaded into a fresh model and checked against the same.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort  # the `test` extra installs it (and onnx)
import pytest
from scale_kind import ScaleKind

from data_tools.__main__ import main as data_main
from data_tools.synth import CLASS_NAMES
from dbmpi import config as config_mod
from dbmpi.__main__ import main
from dbmpi.checkpoint import save_params
from dbmpi.data import open_dataset
from dbmpi.export import model_from_npz
from dbmpi.model import Model
from dbmpi.model.registry import register, unregister

MLP = [{"type": "dense", "units": 32, "activation": "relu", "dropout": 0.2},
       {"type": "dense", "units": 16, "activation": "tanh"},
       {"type": "dense", "units": 12, "activation": "sigmoid"}]
# 28x28x1 -> lcn -> 12x12x4 -> 5x5x4 (window 3, stride 2) -> 4x4x3 -> lcn -> 16 -> 10
IMAGE = [{"type": "lcn", "size": 5},
         {"type": "local", "filters": 4, "kernel": 5, "stride": 2, "activation": "relu"},
         {"type": "l2pool", "size": 3, "stride": 2},
         {"type": "local", "filters": 3, "kernel": 2, "activation": "tanh"},
         {"type": "lcn", "size": 3},
         {"type": "dense", "units": 16, "activation": "relu"}]
TEXT = [{"type": "embedding", "dim": 5, "dropout": 0.1},
        {"type": "dense", "units": 8, "activation": "tanh"}]
CORPUS = {"train": "In the beginning God created the heaven and the earth.\n"
                   "And the earth was without form, and void.\n",
          "valid": "And God called the light Day.\n",
          "test": "And God said, Let there be light: and there was light.\n"
                  "And God saw the light, that it was good.\n"}


def write_run(d, data, layers, loss="softmax", seed=0):
    """A finished run's directory (config.toml, params.h5) around random parameters; returns
    the dbmpi model holding them."""
    d.mkdir()
    cfg = config_mod.from_dict({"topology": {"shards": 1, "replicas": 1},
                                "model": {"layers": layers, "loss": loss},
                                "data": {"path": str(data)}})
    (d / "config.toml").write_text(config_mod.to_toml(cfg))
    ds = open_dataset(data)
    model = Model.from_spec(ds.feature_shape, layers, ds.num_classes, loss)
    # random biases too (init leaves them at 0), at a scale that keeps units off saturation
    model.params[:] = np.random.default_rng(seed).normal(0, 0.15, model.num_params)
    save_params(d / "params.h5", model.params, {"layers": layers, "loss": loss})
    return model


def reference(model, x):
    """dbmpi's logits and their softmax in float64."""
    logits = model.forward(x).astype(np.float64)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, z / z.sum(axis=1, keepdims=True)


def check_onnx(path, model, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
    feed = x.astype(np.int64) if x.dtype.kind == "i" else x.astype(np.float32)
    logits, probs = sess.run(None, {"input": feed})
    want_logits, want_probs = reference(model, x)
    assert probs.dtype == np.float32 and probs.shape == want_probs.shape
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(probs.argmax(axis=1), want_probs.argmax(axis=1))
    return sess


def export(capsys, d, fmt, *extra):
    out = d / f"exported.{fmt}"
    assert main(["export", str(d), "--format", fmt, "--out", str(out), *extra]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    return out


@pytest.mark.parametrize("layers,loss", [(MLP, "softmax"), (MLP, "hinge"), (IMAGE, "softmax")],
                         ids=["mlp", "mlp-hinge", "image"])
def test_onnx_matches_dbmpi_on_the_test_split(tmp_path, small_data, capsys, layers, loss):
    model = write_run(tmp_path / "run", small_data, layers, loss)
    x, _ = open_dataset(small_data).load("test")
    out = export(capsys, tmp_path / "run", "onnx")
    sess = check_onnx(out, model, x)
    assert sess.get_inputs()[0].shape[1:] == [28, 28]
    m = onnx.load(str(out))
    assert m.opset_import[0].version == 17
    spec = json.loads({p.key: p.value for p in m.metadata_props}["dbmpi_spec"])
    assert spec["class_names"] == CLASS_NAMES and spec["loss"] == loss


def text_data(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for split, text in CORPUS.items():
        (src / f"{split}.txt").write_text(text)
    out = tmp_path / "text"
    assert data_main(["shard", "text", "--src", str(src), "--out", str(out), "--vocab", "15",
                      "--context", "3", "--shards", "1"]) == 0
    return out


def test_embedding_model_takes_word_ids(tmp_path, capsys):
    data = text_data(tmp_path)
    model = write_run(tmp_path / "run", data, TEXT)
    x, _ = open_dataset(data).load("test")
    assert x.dtype.kind == "i" and x.shape[1] == 3
    out = export(capsys, tmp_path / "run", "onnx")
    sess = check_onnx(out, model, x)
    assert sess.get_inputs()[0].type == "tensor(int64)"
    words = json.loads((data / "vocab.json").read_text())["words"]
    assert main(["export", str(tmp_path / "run"), "--format", "npz"]) == 0  # default --out
    out = tmp_path / "run" / "model.npz"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    _, spec = model_from_npz(out)
    assert spec["class_names"] == words and spec["input"] == {"shape": [3], "dtype": "int64"}


@pytest.mark.parametrize("layers", [MLP, IMAGE], ids=["mlp", "image"])
def test_npz_round_trip(tmp_path, small_data, capsys, layers):
    model = write_run(tmp_path / "run", small_data, layers, seed=1)
    x, _ = open_dataset(small_data).load("test")
    out = export(capsys, tmp_path / "run", "npz")
    with np.load(out, allow_pickle=False) as z:
        spec = json.loads(str(z["spec"]))
        arrays = {k: z[k] for k in z.files if k != "spec"}
    # the arrays are the flat vector's pieces, in order, with the documented names
    names = [f"layer{i}.{n}" for i, e in enumerate(spec["layers"]) for n in e["params"]]
    assert list(arrays) == names
    np.testing.assert_array_equal(np.concatenate([arrays[n].ravel() for n in names]),
                                  model.params)
    if layers is MLP:
        assert arrays["layer0.W"].shape == (784, 32) and arrays["layer3.b"].shape == (10,)
        np.testing.assert_array_equal(arrays["layer1.W"], model.layers[1].W)
    else:
        assert arrays["layer1.W"].shape == (12, 12, 4, 5, 5, 1)
        assert [e["kind"] for e in spec["layers"]] == ["lcn", "local", "l2pool", "local", "lcn",
                                                       "dense", "dense"]
    assert spec["input"] == {"shape": [28, 28], "dtype": "float32"}
    assert spec["layers"][-1]["output_layer"] and spec["num_classes"] == 10
    fresh, _ = model_from_npz(out)
    assert fresh is not model
    np.testing.assert_array_equal(fresh.forward(x), model.forward(x))


@pytest.fixture
def scale_kind():
    register(ScaleKind())
    yield
    unregister("scale")


def test_a_layer_without_onnx_export_is_one_line_naming_it(tmp_path, small_data, capsys,
                                                          scale_kind):
    layers = [{"type": "dense", "units": 6}, {"type": "scale"}]
    model = write_run(tmp_path / "run", small_data, layers)
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dbmpi: error: model.layers[1] (scale): layer kind 'scale' has no "
                          "ONNX export") and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "m.onnx.tmp").exists()
    # npz takes any kind: its slice of the flat vector
    fresh, _ = model_from_npz(export(capsys, tmp_path / "run", "npz"))
    x, _ = open_dataset(small_data).load("test", limit=50)
    np.testing.assert_array_equal(fresh.forward(x), model.forward(x))


def test_without_onnx_installed_it_says_what_to_install(tmp_path, small_data, capsys,
                                                         monkeypatch):
    write_run(tmp_path / "run", small_data, MLP)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    assert main(["export", str(tmp_path / "run"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dbmpi: error: --format onnx needs the onnx package: install it with "
                   "`pip install 'dbmpi[export]'` (onnx and onnxruntime)")


def test_bad_run_dir_and_out(tmp_path, small_data, capsys):
    def error(*args):
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("dbmpi: error: "), err
        return err

    assert "nope: no such directory" in error(tmp_path / "nope", "--format", "onnx")
    (tmp_path / "empty").mkdir()
    assert "config.toml: missing; not a run directory" in error(tmp_path / "empty", "--format",
                                                               "npz")
    write_run(tmp_path / "run", small_data, MLP)
    (tmp_path / "run" / "params.h5").unlink()
    assert "params.h5: missing; the run did not finish" in error(tmp_path / "run", "--format",
                                                                "onnx")
    assert "does not exist: create it first" in error(tmp_path / "run", "--format", "onnx",
                                                      "--out", tmp_path / "no" / "m.onnx")
    write_run(tmp_path / "ae", small_data, [{"type": "local", "filters": 2, "kernel": 3}],
              loss="autoencoder")
    assert "export takes classifiers" in error(tmp_path / "ae", "--format", "npz")
