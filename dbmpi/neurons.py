"""``python -m dbmpi neurons RUN_DIR``: what the autoencoder's neurons respond to.

For chosen neurons of the encoder's output (default: the unit at the centre of the output map
for each of the first ``count`` channels), two pictures, as Le et al. showed their face and cat
neurons:

* **top-activating inputs**: the ``top`` test images with the largest activation;
* **optimal stimulus**: the input that maximises the activation under a norm constraint,
  ``max_x a(x)`` subject to ``||x||_2 <= r`` (``r``: the median norm of the test images), found
  by projected gradient ascent: from a tiny random input, ``x <- x + step * r * g / ||g||``
  with ``g = da/dx`` (the encoder's backward pass), then ``x <- x * min(1, r / ||x||)``.

``RUN_DIR/neurons.png`` shows one row per neuron: its optimal stimulus (framed), then its top
inputs; ``RUN_DIR/neurons_optimal.png`` the optimal stimuli alone. ``RUN_DIR/neurons.json``
lists the neurons, the activation reached and the best test image's activation. With ``--docs
DIR`` the two PNGs are also copied there (as ``neurons_NAME*.png``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .errors import DbmpiError
from .probe import load_autoencoder_run
from .report import write_json


def optimal_stimulus(model, unit: int, radius: float, steps: int = 200, step: float = 0.05,
                     seed: int = 0, input_size: int | None = None
                     ) -> tuple[np.ndarray, list[float]]:
    """Projected gradient ascent on the input of ``model`` (an encoder with
    ``activation_and_input_grad``) for output feature ``unit`` inside the L2 ball of
    ``radius``. Returns the stimulus and the activation before each step and after the last."""
    n = input_size or model.layers[0].n_in
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, n)).astype(np.float32)
    x *= 1e-3 * radius / np.linalg.norm(x)
    history = []
    for _ in range(steps):
        a, g = model.activation_and_input_grad(x, unit)
        history.append(float(a[0]))
        gn = float(np.linalg.norm(g))
        if gn == 0 or not np.isfinite(gn):
            break
        x += np.float32(step * radius / gn) * g
        norm = float(np.linalg.norm(x))
        if norm > radius:
            x *= np.float32(radius / norm)
    a, _ = model.activation_and_input_grad(x, unit)
    history.append(float(a[0]))
    return x[0].copy(), history


def default_units(model, count: int) -> list[int]:
    """The centre unit of each of the first ``count`` channels of the output map."""
    shape = model.layers[-1].out_shape
    OH, OW, F = shape if len(shape) == 3 else (1, 1, shape[-1])
    i, j = OH // 2, OW // 2
    return [(i * OW + j) * F + f for f in range(min(count, F))]


def _tile(img: np.ndarray, shape) -> np.ndarray:
    """An input vector as an (H, W) or (H, W, 3) picture scaled to [0, 1]."""
    a = img.reshape(shape).astype(np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] != 3:
        a = a.mean(axis=2)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def save_grid(rows: list[list[np.ndarray]], shape, path: Path, pad: int = 2,
              frame_first: bool = False, scale: int = 2) -> Path:
    """Write rows of input vectors as one PNG grid (each picture scaled to its own range)."""
    from PIL import Image

    tiles = [[_tile(t, shape) for t in r] for r in rows]
    h, w = tiles[0][0].shape[:2]
    ncol = max(len(r) for r in tiles)
    H = len(tiles) * (h + pad) + pad
    W = ncol * (w + pad) + pad + (pad if frame_first else 0)
    canvas = np.ones((H, W, 3))
    for r, row in enumerate(tiles):
        for c, t in enumerate(row):
            y0 = pad + r * (h + pad)
            x0 = pad + c * (w + pad) + (pad if frame_first and c > 0 else 0)
            canvas[y0:y0 + h, x0:x0 + w] = t[..., None] if t.ndim == 2 else t
            if frame_first and c == 0:
                canvas[y0 - 1:y0 + h + 1, [x0 - 1, x0 + w]] = (0.85, 0.1, 0.1)
                canvas[[y0 - 1, y0 + h], x0 - 1:x0 + w + 1] = (0.85, 0.1, 0.1)
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    im.save(tmp)
    tmp.replace(path)
    return path


def neurons(run_dir, data: str | None = None, units: list[int] | None = None, count: int = 8,
            top: int = 8, steps: int = 200, step: float = 0.05, test_limit: int = 0,
            docs: str | None = None, name: str | None = None, log=print) -> dict:
    run_dir = Path(run_dir)
    _cfg, model, learned, _init, ds = load_autoencoder_run(run_dir, data)
    model.params[:] = learned
    x, _y = ds.load("test", limit=test_limit or None)
    shape = ds.feature_shape
    units = list(units) if units else default_units(model, count)
    for u in units:
        if not 0 <= u < model.num_features:
            raise DbmpiError(f"--unit {u}: the encoder has {model.num_features} output features "
                             f"(0 .. {model.num_features - 1})")
    feats = model.encode(x)
    flat = x.reshape(len(x), -1)
    radius = float(np.median(np.linalg.norm(flat, axis=1)))
    rows, optimal, records = [], [], []
    for u in units:
        order = np.argsort(-feats[:, u])[:top]
        stim, hist = optimal_stimulus(model, u, radius, steps, step, seed=u)
        optimal.append(stim)
        rows.append([stim] + [flat[i] for i in order])
        records.append({"unit": int(u), "activation_start": hist[0], "activation": hist[-1],
                        "best_test_activation": float(feats[order[0], u]),
                        "top_test_images": [int(i) for i in order]})
        log(f"neuron {u}: optimal stimulus activation {hist[-1]:.4f} (best test image "
            f"{feats[order[0], u]:.4f})")
    p_all = save_grid(rows, shape, run_dir / "neurons.png", frame_first=True)
    p_opt = save_grid([optimal], shape, run_dir / "neurons_optimal.png", scale=3)
    out = {"run_dir": str(run_dir), "radius": radius, "steps": steps, "step": step,
           "neurons": records, "pictures": [str(p_all), str(p_opt)]}
    if docs:
        d = Path(docs)
        d.mkdir(parents=True, exist_ok=True)
        stem = f"neurons_{name}" if name else "neurons"
        for src, suffix in ((p_all, ""), (p_opt, "_optimal")):
            dst = d / f"{stem}{suffix}.png"
            shutil.copyfile(src, dst)
            out["pictures"].append(str(dst))
    write_json(run_dir / "neurons.json", out, indent=1)
    return out
