"""``python -m dbmpi export RUN_DIR --format {onnx,npz}``: a trained model, out of dbmpi.

The model is the one ``params.h5`` records, on the input shape and classes of the run's data
set (``config.toml``'s ``data.path``, or ``--data``: its ``manifest.json`` gives them).

``--format npz`` (read with ``numpy.load(FILE)``, no pickle)
    One float32 array per layer parameter, named ``layer{i}.{name}`` with ``i`` the index in
    the model (the output layer is the last index): dense ``W (n_in, n_out)``, ``b (n_out,)``
    (``y = act(x @ W + b)``); embedding ``E (vocab, dim)``; local ``W (OH, OW, F, k, k, C)``,
    ``b (OH, OW, F)``; a kind this module does not know gives its slice of the flat vector as
    ``params``. ``spec`` (a 0-d string array) holds the JSON spec: ``schema``
    (``dbmpi.export``), ``schema_version``, ``input`` (``shape``, ``dtype``), ``num_classes``,
    ``class_names`` (the manifest's, else a text data set's vocabulary, else null), ``loss``,
    ``model`` (the config's layer tables as params.h5 has them) and ``layers``: per layer its
    ``name``, ``kind``, ``in_shape``, ``out_shape``, options (``activation``, ``kernel``...)
    and ``params`` (array name -> shape). Images are channels-last, flattened row-major.
    :func:`model_from_npz` builds the dbmpi model back.

``--format onnx`` (opset 17, IR version 8)
    Input ``input``: ``(N, *feature_shape)`` float32 (int64 word ids for an embedding
    model); outputs ``logits`` ``(N, classes)`` and ``probabilities`` (their softmax; for a
    hinge-loss run a squashing of its scores, same argmax). Between layers every tensor is
    ``(N, features)`` as in dbmpi. Per kind: dense ``Gemm`` + ``Relu``/``Sigmoid``/``Tanh``;
    embedding ``Gather`` of table rows then ``Flatten``; local (untied weights, no ONNX
    operator) exactly as an unfolding ``Gather`` of each location's window and one batched
    ``MatMul`` over locations, ``Add`` of the biases; l2pool ``Mul`` (x*x), depthwise ``Conv``
    with a ones kernel (window sums), ``Add`` eps, ``Sqrt``; lcn ``ReduceSum`` over channels,
    a same-padded ones ``Conv`` (box sums) divided by the in-image counts, twice (mean, then
    variance), ``Sqrt``, ``Div``. Dropout is for training only and is not in the graph. Any
    other kind is refused with a one-line error naming the layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cython_kernels import L2POOL_EPS, LCN_EPS  # the graph uses the kernels' own constants

from .errors import DbmpiError
from .rundir import RunDir

FORMATS = ("onnx", "npz")
SCHEMA, SCHEMA_VERSION = "dbmpi.export", 1
OPSET, IR_VERSION = 17, 8  # IR 8 is what opset 17 came with: older runtimes load it too
# The arrays of each kind, as attributes of its layer object (views of the flat vector).
PARAM_NAMES = {"dense": ("W", "b"), "embedding": ("E",), "local": ("W", "b")}
INSTALL_FIX = "install it with `pip install 'dbmpi[export]'` (onnx and onnxruntime)"


def load_classifier(run_dir, data=None):
    """``(model with the run's parameters, its layer specs, JSON spec)`` of a run directory."""
    from .data.schema import DataError
    from .model.spec import resolve

    rd = RunDir.open(run_dir)
    params, mspec = rd.params()
    loss = mspec.get("loss", "softmax")
    if loss not in ("softmax", "hinge"):
        raise DbmpiError(f"{rd.file('params.h5')}: a loss = {loss!r} run; export takes "
                         f"classifiers (loss 'softmax' or 'hinge')")
    ds = rd.dataset(data)
    model = rd.model(ds, mspec, params.size)
    model.params[:] = params
    specs = resolve(ds.feature_shape, mspec["layers"], ds.num_classes)
    names = ds.class_names
    if names is None and model.layers[0].input_dtype == np.int64:
        try:  # a text data set: the classes are its words
            names = rd.vocab(data)["words"]
        except DataError:
            names = None
    spec = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "input": {"shape": list(ds.feature_shape),
                  "dtype": np.dtype(model.layers[0].input_dtype).name},
        "num_classes": ds.num_classes, "class_names": names, "loss": loss,
        "model": {"layers": mspec["layers"], "loss": loss},
        "layers": [_layer_entry(model, i, s) for i, s in enumerate(specs)],
    }
    return model, specs, spec


def _layer_entry(model, i: int, spec) -> dict:
    opts = {k: v for k, v in spec.opts.items() if k != "dropout"}
    return {"name": f"layer{i}", "kind": spec.kind, "output_layer": spec.index < 0,
            "in_shape": list(spec.in_shape), "out_shape": list(spec.out_shape), **opts,
            "params": {n: list(a.shape) for n, a in _arrays(model, i, spec.kind).items()}}


def _arrays(model, i: int, kind: str) -> dict[str, np.ndarray]:
    """Layer ``i``'s parameters by name: views into the model's flat vector (a kind this
    module does not know: its whole slice, as ``params``)."""
    layer = model.layers[i]
    if not layer.num_params:
        return {}
    if kind in PARAM_NAMES:
        return {n: getattr(layer, n) for n in PARAM_NAMES[kind]}
    off = model.offsets[i]
    return {"params": model.params[off:off + layer.num_params]}


# -- npz -----------------------------------------------------------------------------------

def write_npz(model, spec: dict, out: Path) -> None:
    arrays = {}
    for i, entry in enumerate(spec["layers"]):
        for name, a in _arrays(model, i, entry["kind"]).items():
            arrays[f"layer{i}.{name}"] = np.array(a, np.float32)
    with _atomic(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, spec=np.array(json.dumps(spec)), **arrays)


def model_from_npz(path: str | os.PathLike):
    """``(dbmpi Model, spec)`` from an npz that :func:`write_npz` wrote."""
    from .model import Model

    path = Path(path)
    fix = "export it again with `python -m dbmpi export RUN_DIR --format npz`"
    try:
        with np.load(path, allow_pickle=False) as z:
            spec = json.loads(str(z["spec"]))
            arrays = {k: z[k] for k in z.files if k != "spec"}
    except (OSError, ValueError, KeyError) as e:
        raise DbmpiError(f"{path}: not a dbmpi export ({e}); {fix}") from None
    if spec.get("schema") != SCHEMA or spec.get("schema_version") != SCHEMA_VERSION:
        raise DbmpiError(f"{path}: spec is not {SCHEMA} v{SCHEMA_VERSION}; {fix}")
    m = spec["model"]
    model = Model.from_spec(spec["input"]["shape"], m["layers"], spec["num_classes"], m["loss"])
    for i, entry in enumerate(spec["layers"]):
        for name, view in _arrays(model, i, entry["kind"]).items():
            key = f"layer{i}.{name}"
            if key not in arrays or arrays[key].shape != view.shape:
                raise DbmpiError(f"{path}: array {key!r} is missing or not of shape "
                                 f"{view.shape}; {fix}")
            view[...] = arrays[key]
    return model, spec


# -- ONNX ----------------------------------------------------------------------------------

class _Graph:
    """Nodes and initializers of one ONNX graph, with fresh tensor names."""

    def __init__(self, helper, numpy_helper):
        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits = [], []
        self._n = 0

    def const(self, name: str, value) -> str:
        self.inits.append(self.nh.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, out: str | None = None,
           **attrs) -> str:
        self._n += 1
        out = out or f"{prefix}/{op_type}_{self._n}"
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=f"{prefix}/{self._n}",
                                           **attrs))
        return out


def _activation(g: _Graph, h: str, activation: str, prefix: str) -> str:
    ops = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    return g.op(ops[activation], [h], prefix) if activation in ops else h


def _to_nchw(g: _Graph, h: str, shape, prefix: str) -> str:
    """``(N, H*W*C)`` -> ``(N, C, H, W)`` (ONNX's image operators are channels-first)."""
    x = g.op("Reshape", [h, g.const(f"{prefix}.shape", np.array([-1, *shape], np.int64))], prefix)
    return g.op("Transpose", [x], prefix, perm=[0, 3, 1, 2])


def _from_nchw(g: _Graph, h: str, prefix: str) -> str:
    x = g.op("Transpose", [h], prefix, perm=[0, 2, 3, 1])
    return g.op("Flatten", [x], prefix, axis=1)


def _ones_kernel(g: _Graph, name: str, c: int, k: int) -> str:
    return g.const(name, np.ones((c, 1, k, k), np.float32))


def _dense(g, h, spec, layer, p):
    W, b = g.const(f"{p}.W", layer.W), g.const(f"{p}.b", layer.b)
    return _activation(g, g.op("Gemm", [h, W, b], p), spec.opts["activation"], p)


def _embedding(g, h, spec, layer, p):
    rows = g.op("Gather", [g.const(f"{p}.E", layer.E), h], p, axis=0)  # (N, context, dim)
    return g.op("Flatten", [rows], p, axis=1)


def _local(g, h, spec, layer, p):
    """Each location's window unfolded by a Gather of its ``k*k*C`` input features, then
    ``y[l] = patches[l] @ W[l]`` for all locations in one batched MatMul."""
    H, W_, C = spec.in_shape
    OH, OW, F = spec.out_shape
    k, s = spec.opts["kernel"], spec.opts["stride"]
    i, j, u, v, c = np.ix_(range(OH), range(OW), range(k), range(k), range(C))
    idx = (((i * s + u) * W_ + (j * s + v)) * C + c).reshape(OH * OW, k * k * C)
    patches = g.op("Gather", [h, g.const(f"{p}.window_index", idx.astype(np.int32))], p, axis=1)
    per_loc = g.op("Transpose", [patches], p, perm=[1, 0, 2])  # (L, N, k*k*C)
    Wt = layer.W.reshape(OH * OW, F, k * k * C).transpose(0, 2, 1)  # (L, k*k*C, F)
    y = g.op("MatMul", [per_loc, g.const(f"{p}.W", np.ascontiguousarray(Wt))], p)
    y = g.op("Transpose", [y], p, perm=[1, 0, 2])  # (N, L, F)
    y = g.op("Add", [y, g.const(f"{p}.b", layer.b.reshape(OH * OW, F))], p)
    return g.op("Flatten", [_activation(g, y, spec.opts["activation"], p)], p, axis=1)


def _l2pool(g, h, spec, layer, p):
    C, k, s = spec.in_shape[2], spec.opts["size"], spec.opts["stride"]
    x = _to_nchw(g, h, spec.in_shape, p)
    sums = g.op("Conv", [g.op("Mul", [x, x], p), _ones_kernel(g, f"{p}.window", C, k)], p,
                group=C, kernel_shape=[k, k], strides=[s, s])
    eps = g.const(f"{p}.eps", np.float32(L2POOL_EPS))
    return _from_nchw(g, g.op("Sqrt", [g.op("Add", [sums, eps], p)], p), p)


def _lcn(g, h, spec, layer, p):
    """mean = box(sum_c x) / n, v = x - mean, den = sqrt(eps + box(sum_c v^2) / n), y = v /
    den, with n the in-image pixels of each box times C (cython_kernels/reference.py)."""
    H, W_, C = spec.in_shape
    k = spec.opts["size"]
    r = k // 2
    ones = np.pad(np.ones((H, W_), np.float32), r)
    counts = sum(ones[u:u + H, v:v + W_] for u in range(k) for v in range(k)) * C
    n = g.const(f"{p}.counts", counts.reshape(1, 1, H, W_).astype(np.float32))
    kernel = _ones_kernel(g, f"{p}.box", 1, k)
    axes = g.const(f"{p}.channel_axis", np.array([1], np.int64))
    x = _to_nchw(g, h, spec.in_shape, p)

    def box_mean(t):  # (N, C, H, W) -> (N, 1, H, W)
        total = g.op("ReduceSum", [t, axes], p, keepdims=1)
        box = g.op("Conv", [total, kernel], p, kernel_shape=[k, k], pads=[r, r, r, r])
        return g.op("Div", [box, n], p)

    v = g.op("Sub", [x, box_mean(x)], p)
    var = g.op("Add", [box_mean(g.op("Mul", [v, v], p)), g.const(f"{p}.eps",
                                                                 np.float32(LCN_EPS))], p)
    return _from_nchw(g, g.op("Div", [v, g.op("Sqrt", [var], p)], p), p)


ONNX_LAYERS = {"dense": _dense, "embedding": _embedding, "local": _local, "l2pool": _l2pool,
               "lcn": _lcn}


def onnx_model(model, specs, spec: dict):
    """The ONNX ModelProto of ``model`` (checked by onnx.checker)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise DbmpiError(f"--format onnx needs the onnx package: {INSTALL_FIX}") from None
    for s in specs:
        if s.kind not in ONNX_LAYERS:
            raise DbmpiError(f"{s.name}: layer kind {s.kind!r} has no ONNX export (kinds that "
                             f"export: {', '.join(ONNX_LAYERS)}); use --format npz")
    g = _Graph(helper, numpy_helper)
    ids = model.layers[0].input_dtype == np.int64
    dtype = TensorProto.INT64 if ids else TensorProto.FLOAT
    inp = helper.make_tensor_value_info("input", dtype, ["N", *spec["input"]["shape"]])
    h = "input" if ids else g.op("Flatten", ["input"], "input", axis=1)
    for i, (s, layer) in enumerate(zip(specs, model.layers)):
        h = ONNX_LAYERS[s.kind](g, h, s, layer, f"layer{i}")
    logits = g.op("Identity", [h], "output", out="logits")
    g.op("Softmax", [logits], "output", out="probabilities", axis=-1)
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", spec["num_classes"]])
            for name in ("logits", "probabilities")]
    graph = helper.make_graph(g.nodes, "dbmpi", [inp], outs, g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="dbmpi", ir_version=IR_VERSION)
    meta = m.metadata_props.add()
    meta.key, meta.value = "dbmpi_spec", json.dumps(spec)
    onnx.checker.check_model(m)
    return m


# -- the command ---------------------------------------------------------------------------

class _atomic:
    """Write to ``out.tmp`` and rename it onto ``out`` when the block succeeds."""

    def __init__(self, out: Path):
        self.out, self.tmp = out, out.with_name(out.name + ".tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)


def export_run(run_dir, fmt: str, out=None, data=None) -> Path:
    """Write the run's model as ``fmt`` (``onnx`` or ``npz``) to ``out`` (default
    ``RUN_DIR/model.FMT``); returns the path written."""
    if fmt not in FORMATS:
        raise DbmpiError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    RunDir.open(run_dir)  # a bad RUN_DIR is named as such, before the --out it implies
    out = Path(out) if out else Path(run_dir) / f"model.{fmt}"
    if not out.parent.is_dir():
        raise DbmpiError(f"--out {out}: directory {out.parent} does not exist: create it first")
    model, specs, spec = load_classifier(run_dir, data)
    if fmt == "npz":
        write_npz(model, spec, out)
        return out
    m = onnx_model(model, specs, spec)
    with _atomic(out) as tmp:
        tmp.write_bytes(m.SerializeToString())
    return out

