"""``python -m dbmpi probe RUN_DIR``: a classifier on top of an unsupervised autoencoder run.

1. **Linear probe.** The encoder (the run's image layers) maps the training and test images to
   features twice: with the learned parameters (``RUN_DIR/params.h5``) and with the parameters
   the run started from (the same architecture's random initialisation, ``run.seed``). For each,
   a multinomial logistic regression (softmax, L2 penalty ``l2``) is fitted to the standardised
   training features by L-BFGS (scipy) and scored on the test split.
2. **Fine-tuning.** The whole network (encoder + a softmax output layer initialised from the
   learned probe, its standardisation folded in) is trained on the labels in one process with
   Adagrad for ``finetune_epochs`` epochs; with ``scratch`` the same classifier is also trained
   from the random initialisation for the same epochs (supervised only: no unsupervised
   learning), so the fine-tuned number can be told apart from what the labels alone give.

Writes ``RUN_DIR/probe.json`` with every number, the data sizes and the time each part took.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import DbmpiError
from .report import write_json
from .rundir import RunDir


def load_autoencoder_run(run_dir: str | Path, data: str | None = None):
    """``(config, autoencoder, learned params, initial params, dataset)`` of a run."""
    rd = RunDir.open(run_dir)
    cfg = rd.config
    params, spec = rd.params()
    if spec.get("loss") != "autoencoder":
        raise DbmpiError(f"{rd.path}: a run with model.loss = {spec.get('loss')!r}; probe "
                         "and neurons take runs of loss = 'autoencoder'")
    ds = rd.dataset(data)
    model = rd.model(ds, spec, params.size, "autoencoder", sparsity=spec.get("sparsity", 0.1))
    init = model.init_params(cfg.run.seed).copy()
    model.params[:] = params
    return cfg, model, params.astype(np.float32), init, ds


def softmax_regression(f_train: np.ndarray, y_train: np.ndarray, num_classes: int,
                       l2: float = 1e-4, maxiter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(D, K)`` and bias ``(K,)`` minimising mean cross-entropy + l2/2 ||W||^2 on
    (already standardised) features, by scipy's L-BFGS-B in float64."""
    from scipy.optimize import minimize

    X = np.asarray(f_train, np.float64)
    n, d = X.shape
    K = int(num_classes)
    Y = np.zeros((n, K))
    Y[np.arange(n), y_train] = 1

    def fg(w):
        W, b = w[:d * K].reshape(d, K), w[d * K:]
        z = X @ W + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        s = p.sum(axis=1, keepdims=True)
        loss = -np.sum((z - np.log(s)) * Y) / n + 0.5 * l2 * np.sum(W * W)
        p /= s
        p -= Y
        p /= n
        gW = X.T @ p + l2 * W
        return loss, np.concatenate([gW.ravel(), p.sum(axis=0)])

    res = minimize(fg, np.zeros(d * K + K), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter})
    return res.x[:d * K].reshape(d, K), res.x[d * K:]


def standardise(f_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = f_train.mean(axis=0, dtype=np.float64)
    std = f_train.std(axis=0, dtype=np.float64)
    return mean, np.where(std > 1e-6, std, 1.0)


def linear_probe(model, params: np.ndarray, x_train, y_train, x_test, y_test, num_classes: int,
                 l2: float) -> dict:
    """Fit the probe on the encoder's features under ``params``; test accuracy and the fit."""
    t0 = time.perf_counter()
    model.params[:] = params
    f_tr, f_te = model.encode(x_train), model.encode(x_test)
    t_feat = time.perf_counter() - t0
    mean, std = standardise(f_tr)
    W, b = softmax_regression((f_tr - mean) / std, y_train, num_classes, l2)
    acc_tr = float(np.mean((((f_tr - mean) / std) @ W + b).argmax(1) == y_train))
    acc_te = float(np.mean((((f_te - mean) / std) @ W + b).argmax(1) == y_test))
    return {"train_accuracy": acc_tr, "test_accuracy": acc_te, "features": int(f_tr.shape[1]),
            "feature_s": round(t_feat, 2), "fit_s": round(time.perf_counter() - t0 - t_feat, 2),
            "W": W, "b": b, "mean": mean, "std": std}


def classifier_from(ae, layers, input_shape, num_classes: int, enc_params: np.ndarray,
                    W: np.ndarray | None = None, b: np.ndarray | None = None,
                    mean: np.ndarray | None = None, std: np.ndarray | None = None, seed: int = 0):
    """The supervised network: the encoder's layers + a softmax layer. The output layer gets
    the probe's weights with the standardisation folded in (``W / std``, ``b - (mean / std) W``)
    or, without a probe, its random initialisation."""
    from .model import Model

    net = Model.from_spec(input_shape, layers, num_classes, "softmax")
    net.init_params(seed)
    n = ae.num_params
    net.params[:n] = enc_params
    if W is not None:
        Wf = W / std[:, None]
        bf = b - (mean / std) @ W
        out = net.layers[-1]
        out.W[...] = Wf.astype(np.float32)
        out.b[...] = bf.astype(np.float32)
    return net


def train_supervised(net, x_train, y_train, x_test, y_test, epochs: int, lr: float,
                     batch: int = 64, seed: int = 0) -> list[dict]:
    """Adagrad on the labels in one process; test accuracy after every epoch."""
    rng = np.random.default_rng(seed)
    accum = np.zeros_like(net.params)
    hist = []
    n = len(y_train)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        tot = 0.0
        for lo in range(0, n - batch + 1, batch):
            idx = np.sort(order[lo:lo + batch])
            loss, _ = net.forward_backward(x_train[idx], y_train[idx])
            if not np.isfinite(loss):
                raise DbmpiError(f"fine-tuning diverged (loss {loss}) in epoch {epoch}: lower "
                                 "--finetune-lr")
            g = net.grads
            accum += g * g
            net.params -= lr * g / (np.sqrt(accum) + 1e-8)
            tot += loss
        _, acc = net.evaluate(x_test, y_test)
        hist.append({"epoch": epoch + 1, "train_loss": tot / max(n // batch, 1),
                     "test_accuracy": float(acc), "seconds": round(time.perf_counter() - t0, 2)})
    return hist


def probe_run(run_dir, data: str | None = None, train_limit: int = 0, test_limit: int = 0,
              l2: float = 1e-4, finetune_epochs: int = 3, finetune_lr: float = 0.01,
              scratch: bool = False, seed: int = 0, write: bool = True, log=print) -> dict:
    t_all = time.perf_counter()
    run_dir = Path(run_dir)
    cfg, ae, learned, init, ds = load_autoencoder_run(run_dir, data)
    x_tr, y_tr = ds.load("train", limit=train_limit or None)
    x_te, y_te = ds.load("test", limit=test_limit or None)
    K = ds.num_classes
    out: dict = {"run_dir": str(run_dir), "data": str(ds.path), "train_examples": len(y_tr),
                 "test_examples": len(y_te), "num_params": ae.num_params,
                 "layers": list(cfg.model.layers), "l2": l2}
    probes = {}
    for name, params in (("random", init), ("learned", learned)):
        r = linear_probe(ae, params, x_tr, y_tr, x_te, y_te, K, l2)
        probes[name] = r
        log(f"linear probe on {name} weights: test accuracy {r['test_accuracy']:.4f} "
            f"(train {r['train_accuracy']:.4f}, {r['features']} features)")
    out["probe"] = {k: {f: v for f, v in r.items() if f not in ("W", "b", "mean", "std")}
                    for k, r in probes.items()}
    layers, shape = list(cfg.model.layers), ds.feature_shape
    if finetune_epochs:
        p = probes["learned"]
        net = classifier_from(ae, layers, shape, K, learned, p["W"], p["b"], p["mean"],
                              p["std"], seed)
        _, acc0 = net.evaluate(x_te, y_te)
        hist = train_supervised(net, x_tr, y_tr, x_te, y_te, finetune_epochs, finetune_lr,
                                seed=seed)
        out["finetune"] = {"epochs": finetune_epochs, "lr": finetune_lr,
                           "start_test_accuracy": float(acc0), "history": hist,
                           "test_accuracy": hist[-1]["test_accuracy"]}
        log(f"fine-tuned ({finetune_epochs} epochs): test accuracy {hist[-1]['test_accuracy']:.4f}"
            f" (from {acc0:.4f})")
        if scratch:
            net = classifier_from(ae, layers, shape, K, init, seed=seed)
            hist = train_supervised(net, x_tr, y_tr, x_te, y_te, finetune_epochs, finetune_lr,
                                    seed=seed)
            out["scratch"] = {"epochs": finetune_epochs, "lr": finetune_lr, "history": hist,
                              "test_accuracy": hist[-1]["test_accuracy"]}
            log(f"supervised from random weights ({finetune_epochs} epochs): test accuracy "
                f"{hist[-1]['test_accuracy']:.4f}")
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    if write:
        write_json(run_dir / "probe.json", out, indent=1)
    return out
