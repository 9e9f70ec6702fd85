"""``python -m dbmpi eval RUN_DIR``: test accuracy of a finished run (per image, frame or word,
in the words of its data set), and utterance accuracy for speech.

Loads ``RUN_DIR/params.h5`` (the model it records) and the data set named in
``RUN_DIR/config.toml`` (``data.path``, or ``--data``), classifies every example of the split,
and writes ``RUN_DIR/eval.json``.

Utterance decisions. When the split's shards carry ``groups`` (which recording each frame
belongs to, written by ``python -m data_tools shard speech``), frames are pooled per group:
classes named ``WORD/STATE`` belong to ``WORD``, classes named ``sil`` to no word (any other
class is a word by itself). The score of word ``w`` for utterance ``u`` is the sum over the
utterance's frames of ``log sum_{c in w} p(c | frame)``, the frame log-posterior of the word,
and the decision is the word with the largest score: the frames vote with their
log-probabilities, as a recogniser adds acoustic log-likelihoods along a word. With
``--frames speech`` only the frames the model itself does not put in silence vote (all of
them if it puts every frame there). The true word of an utterance is the word of its
non-silence frame labels.

``--iterates``: Sandblaster's coordinator evaluates the test set once, at the end. For a
time-to-accuracy curve, run it with ``sandblaster.record_iterates = true`` (every iterate is
appended to ``iterates.h5``) and ``python -m dbmpi eval RUN_DIR --iterates`` scores each one,
timed at the end of its L-BFGS iteration, into ``eval_iterates.jsonl``. Downpour does the same
with ``downpour.record_iterates = true``: its coordinator then records the parameters every
``eval_every_s`` instead of evaluating them, and each row is timed by when it was fetched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import DbmpiError
from .log import get_logger
from .report import write_json
from .rundir import RunDir

log = get_logger("eval")

SILENCE_NAMES = ("sil",)
EVAL_FRAMES = ("all", "speech")


def word_classes(class_names: list[str] | None, num_classes: int
                 ) -> tuple[list[str], list[list[int]], list[int]]:
    """``(words, member classes of each word, silence classes)`` from the class names."""
    names = class_names or [str(c) for c in range(num_classes)]
    words: list[str] = []
    members: list[list[int]] = []
    silence: list[int] = []
    for c, name in enumerate(names):
        if name in SILENCE_NAMES:
            silence.append(c)
            continue
        word = name.rsplit("/", 1)[0] if "/" in name else name
        if word not in words:
            words.append(word)
            members.append([])
        members[words.index(word)].append(c)
    return words, members, silence


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def word_log_posteriors(log_probs: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """``(N, W)``: ``log sum_{c in word} p(c)`` per frame (log-sum-exp over the columns)."""
    out = np.empty((log_probs.shape[0], len(members)))
    for w, cols in enumerate(members):
        sub = log_probs[:, cols]
        m = sub.max(axis=1)
        out[:, w] = m + np.log(np.exp(sub - m[:, None]).sum(axis=1))
    return out


def utterance_scores(log_probs: np.ndarray, groups: np.ndarray, members: list[list[int]],
                     silence: list[int] = (), frames: str = "all"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(group ids (U,), scores (U, W))``: summed word log-posteriors per group."""
    if frames not in EVAL_FRAMES:
        raise ValueError(f"frames must be one of {EVAL_FRAMES}, got {frames!r}")
    wl = word_log_posteriors(log_probs, members)
    ids, inv = np.unique(groups, return_inverse=True)
    use = np.ones(len(groups), bool)
    if frames == "speech" and len(silence):
        use = ~np.isin(log_probs.argmax(axis=1), silence)
        # a group where every frame looks like silence votes with all its frames
        has = np.bincount(inv, weights=use, minlength=len(ids)) > 0
        use |= ~has[inv]
    scores = np.zeros((len(ids), len(members)))
    np.add.at(scores, inv[use], wl[use])
    return ids, scores


def utterance_truth(labels: np.ndarray, groups: np.ndarray, members: list[list[int]]
                    ) -> np.ndarray:
    """The word index of each group (in ``np.unique(groups)`` order): the most frequent word
    among its non-silence frame labels (-1 for a group with none)."""
    word_of = np.full(max(max(c for cols in members for c in cols), int(labels.max())) + 1, -1)
    for w, cols in enumerate(members):
        word_of[cols] = w
    ids, inv = np.unique(groups, return_inverse=True)
    lw = word_of[labels]
    ok = lw >= 0
    counts = np.zeros((len(ids), len(members)), np.int64)
    np.add.at(counts, (inv[ok], lw[ok]), 1)
    truth = counts.argmax(axis=1)
    truth[counts.sum(axis=1) == 0] = -1
    return truth


def load_run(rd: RunDir, split: str, data: str | None = None):
    """The run's classifier (from params.h5) and the split: ``(model, params, ds, x, y,
    groups or None)``."""
    params, spec = rd.params()
    if spec.get("loss") == "autoencoder":
        raise DbmpiError(f"{rd.path}: an autoencoder run (no classifier to score): use "
                         f"`python -m dbmpi probe {rd.path}` or `python -m dbmpi neurons`")
    if spec.get("loss") == "ranking":
        raise DbmpiError(f"{rd.path}: a ranking-objective run (scores, not class "
                         f"probabilities): its ranking accuracy is in summary.json; use "
                         f"`python -m dbmpi neighbors {rd.path} --word WORD`")
    ds = rd.dataset(data)
    model = rd.model(ds, spec, params.size)
    g = None
    if all(has_groups(p) for p in ds.splits.get(split, [])):
        x, y, g = ds.load(split, with_groups=True)
    else:
        x, y = ds.load(split)
    return model, params, ds, x, y, g


def has_groups(path: Path) -> bool:
    import h5py

    from .data.schema import GROUPS

    with h5py.File(path, "r", locking=False) as f:
        return GROUPS in f


def score(model, params: np.ndarray, ds, x: np.ndarray, y: np.ndarray, g: np.ndarray | None,
          frames: str = "all", batch: int = 4096) -> dict:
    """Frame accuracy and loss of ``params`` on ``(x, y)``; with groups, utterance accuracy,
    the word confusion matrix and the wrong utterances (by group)."""
    model.params[:] = params
    log_probs = np.empty((len(y), ds.num_classes))
    for lo in range(0, len(y), batch):
        log_probs[lo:lo + batch] = log_softmax(model.forward(x[lo:lo + batch]))
    pred = log_probs.argmax(axis=1)
    out: dict = {
        "frames": len(y),
        "frame_accuracy": float(np.mean(pred == y)),
        "frame_loss": float(-log_probs[np.arange(len(y)), y].mean()),
    }
    if g is not None:
        words, members, silence = word_classes(ds.class_names, ds.num_classes)
        ids, scores = utterance_scores(log_probs, g, members, silence, frames)
        truth = utterance_truth(y, g, members)
        decided = scores.argmax(axis=1)
        known = truth >= 0
        confusion = np.zeros((len(words), len(words)), np.int64)
        np.add.at(confusion, (truth[known], decided[known]), 1)
        out.update({
            "utterance_frames": frames,
            "utterances": int(known.sum()),
            "utterance_accuracy": float(np.mean(decided[known] == truth[known])),
            "words": words,
            "confusion": confusion.tolist(),
            "utterance_errors": [{"group": int(ids[i]), "word": words[truth[i]],
                                  "decided": words[decided[i]]}
                                 for i in np.flatnonzero(known & (truth != decided))],
        })
    return out


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | None = None,
                 frames: str = "all", batch: int = 4096, write: bool = True) -> dict:
    """Evaluate ``RUN_DIR/params.h5`` on ``split``; return (and write to eval.json) a dict."""
    t0 = time.perf_counter()
    rd = RunDir.open(run_dir)
    model, params, ds, x, y, g = load_run(rd, split, data)
    data_path = rd.data_path(data)
    out = {"run_dir": str(rd.path), "data": data_path, "split": split,
           "unit": task_unit(data_path, ds.feature_shape),
           **score(model, params, ds, x, y, g, frames, batch)}
    files = utterance_files(Path(data_path), split)
    for e in out.get("utterance_errors", []):
        e["file"] = files.get(e["group"])
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    if write:
        write_json(rd.file("eval.json"), out, indent=1)
    return out


def evaluate_iterates(run_dir: str | Path, split: str = "test", data: str | None = None,
                      frames: str = "all") -> Path:
    """Test accuracy of every parameter vector a run recorded in ``iterates.h5``
    (``sandblaster.record_iterates``: each L-BFGS iterate, timed by the wall time of its
    ``lbfgs`` record; ``downpour.record_iterates``: the parameters every ``eval_every_s``,
    timed by when they were fetched): written as ``eval`` records to
    ``RUN_DIR/eval_iterates.jsonl``, which ``python -m dbmpi plot`` draws instead of the
    run's own evaluations."""
    rd = RunDir.open(run_dir)
    iterates = rd.iterates()  # a missing iterates.h5 fails here, before the data is loaded
    model, _, ds, x, y, g = load_run(rd, split, data)
    out = rd.file("eval_iterates.jsonl")
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as fh:
        for it in iterates:
            r = score(model, it.params, ds, x, y, g, frames)
            rec = {"kind": "eval", "iteration": it.index, "step": it.step,
                   "loss": r["frame_loss"], "accuracy": r["frame_accuracy"], "wall_s": it.wall_s}
            if "utterance_accuracy" in r:
                rec["utterance_accuracy"] = r["utterance_accuracy"]
            fh.write(json.dumps(rec) + "\n")
            n = it.total
            if (it.index + 1) % max(1, n // 10) == 0 or it.index + 1 == n:
                log.info("scored %d of %d recorded parameter vectors", it.index + 1, n)
    tmp.replace(out)
    return out


def utterance_files(data_path: Path, split: str) -> dict[int, str]:
    """Group -> file name from ``speech.json`` when the data set has one."""
    try:
        info = json.loads((data_path / "speech.json").read_text())
        return {int(u["group"]): u["file"] for u in info["splits"][split]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# What one scored example is, in the words of the task: the data set's own description file
# says (speech.json: filterbank frames; images.json: images; vocab.json: next words), else the
# feature shape (2-d and up: images, as IDX and synthetic sets are). eval.json keeps the
# ``frame_*`` keys for its readers and adds ``unit``.
UNITS = {"frame": "frames", "image": "images", "next-word": "words", "example": "examples"}


def task_unit(data_path: str | Path, feature_shape: tuple = ()) -> str:
    """``frame``, ``image``, ``next-word`` or ``example``: what the data set's examples are."""
    d = Path(data_path)
    for name, unit in (("speech.json", "frame"), ("images.json", "image"),
                       ("vocab.json", "next-word")):
        if (d / name).is_file():
            return unit
    return "image" if len(feature_shape) >= 2 else "example"


def summary_line(r: dict) -> str:
    unit = r.get("unit", "frame")
    s = (f"{r['split']}: {unit} accuracy {r['frame_accuracy']:.4f} ({r['frames']} "
         f"{UNITS.get(unit, 'examples')})")
    if "utterance_accuracy" in r:
        s += (f", utterance accuracy {r['utterance_accuracy']:.4f} ({r['utterances']} "
              f"utterances, {len(r['utterance_errors'])} wrong)")
    return s
