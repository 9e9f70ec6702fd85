"""Neural language model against an interpolated Kneser-Ney 5-gram on a real corpus, and
sparse against dense embedding traffic.

    python benchmarks/lm.py --src DIR                            # King James Bible
    python benchmarks/lm.py --src ~/ptb --name ptb               # ptb.{train,valid,test}.txt
    python benchmarks/lm.py --skip traffic                       # perplexities only
    python benchmarks/lm.py --skip perplexity                    # bytes and time per step only

1. Perplexity. Shards the corpus (``data_tools shard text``, vocabulary ``--vocab``, context
   ``--context``), trains the config's neural LM with Downpour (``python -m dbmpi launch``,
   run directory ``runs/lm-bench-NAME``), builds the modified Kneser-Ney model of order
   ``--kn-order`` (5; at most context + 1, on the last words of each context;
   :mod:`dbmpi.ngram`) from the same training examples, and scores both on the
   same valid and test examples (same vocabulary, same tokens, the same ``</s>`` per
   sentence). The interpolation ``lam p_nn + (1 - lam) p_kn`` has ``lam`` tuned on valid and is
   reported on test. Nearest neighbours of a few frequent words come from the same run. The
   run records its parameters every ``--record-every-s``; the network scored is the record,
   or the average of the last K records, with the best perplexity on the whole valid split
   (early stopping and tail averaging, chosen without test data).
2. Ranking. The same layers trained with Collobert & Weston's objective (``--rank-set``
   overrides on top): its ranking accuracy on test against Kneser-Ney's and the softmax
   network's on the same pairs (true next word against one random word), and its neighbours.
3. Traffic. The same job twice for ``--traffic-steps`` steps per replica, with
   ``downpour.sparse`` true and false: parameter bytes fetched and gradient bytes pushed per
   step and replica (from the ``train`` records), ms per step, and the fractions of a step
   spent fetching and pushing. Run it on a quiet machine.

The corpus comes from --src, or $DBMPI_DATA/kjv without it (README.md, "Data").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from _common import RESULTS, ROOT, data_source, machine_info, print_table, write_json
from _jobs import launch, run_job

WORDS = ["god", "king", "said", "land", "son", "gold", "david", "seven", "heart", "went"]


def shard(src: str, out: Path, vocab: int, context: int) -> dict:
    from data_tools.shards import command_line
    from data_tools.text import build_text, read_vocab

    if (out / "manifest.json").is_file() and (out / "vocab.json").is_file():
        v = read_vocab(out)
        if len(v["words"]) <= vocab and v["context"] == context:
            print(f"using the shards in {out}", flush=True)
            return {"reused": True}
    t0 = time.perf_counter()
    info = build_text(src, out, vocab=vocab, context=context, shards=4,
                      command=command_line(["shard", "text", "--src", src, "--out", str(out),
                                            "--vocab", str(vocab), "--context", str(context)]))
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"sharded {src} -> {out}: {info}", flush=True)
    return info


def train(cfg_path: str, overrides: list[str], run_dir: Path, timeout: float) -> dict:
    """``python -m dbmpi launch`` into ``run_dir`` (emptied first); returns its summary.json
    with ``train_wall_s``, the whole job's wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"training {cfg_path} {' '.join(overrides)} into {run_dir}", flush=True)
    job = launch(cfg_path, overrides, run_dir, timeout=timeout)
    for line in job["stderr"].splitlines():
        if "step" in line and "rank 0" in line:
            print(line, flush=True)
    return {**job["summary"], "train_wall_s": job["wall_s"]}


def select_on_valid(model, ds, run_dir: Path) -> dict | None:
    """Early stopping and iterate averaging, done afterwards. The run recorded its parameters
    every ``eval_every_s`` (``downpour.record_iterates``); the candidates are each record and
    each average of the last K records (Polyak-Ruppert averaging of the tail, which smooths
    the asynchronous replicas' noise); each is scored on the whole valid split and the best is
    loaded into ``model``. Test data plays no part in the choice."""
    import h5py

    from dbmpi.lm import token_probs
    from dbmpi.ngram import perplexity

    path = run_dir / "iterates.h5"
    if not path.is_file():
        return None
    x, y = ds.load("valid")

    def valid_ppl(params: np.ndarray) -> float:
        model.params[:] = params
        return round(perplexity(token_probs(model, x, y)), 3)

    curve, tails = [], []
    best, best_params = None, None

    def consider(candidate: dict, params: np.ndarray) -> None:
        nonlocal best, best_params
        candidate["valid_ppl"] = valid_ppl(params)
        if best is None or candidate["valid_ppl"] < best["valid_ppl"]:
            best, best_params = candidate, params.astype(np.float32)

    with h5py.File(path, "r") as f:
        rows, wall, step = f["iterates"], f["wall_s"][:], f["step"][:]
        n = rows.shape[0]
        total = np.zeros(rows.shape[1], np.float64)
        for k in range(1, n + 1):  # newest first: record n - k, and the average of the last k
            row = rows[n - k]
            curve.append({"row": n - k, "step": int(step[n - k]),
                          "wall_s": round(float(wall[n - k]), 1)})
            consider(curve[-1], row)
            print(f"recorded parameters {n - k}: step {curve[-1]['step']}, valid perplexity "
                  f"{curve[-1]['valid_ppl']}", flush=True)
            if k == n:  # the first record (the random start) is never averaged in
                break
            total += row
            if k > 1:
                tails.append({"last": k, "from_step": int(step[n - k])})
                consider(tails[-1], total / k)
                print(f"average of the last {k} records (from step {int(step[n - k])}): "
                      f"valid perplexity {tails[-1]['valid_ppl']}", flush=True)
    curve.reverse()
    model.params[:] = best_params
    return {"chosen": best, "curve": curve, "tail_averages": tails}


def ranking_accuracy(score_true: np.ndarray, score_corrupt: np.ndarray) -> float:
    return float(np.mean(score_true > score_corrupt))


def perplexities(run_dir: Path, words: list[str], k: int, kn_order: int) -> dict:
    from dbmpi.lm import load_lm, nearest, token_probs
    from dbmpi.model.ranking import EVAL_SEED, RankingLM
    from dbmpi.ngram import KneserNey, best_interpolation, perplexity

    model, ds, vocab = load_lm(run_dir)
    selected = select_on_valid(model, ds, run_dir)
    V = ds.num_classes
    x_tr, y_tr = ds.load("train")
    order = min(kn_order, x_tr.shape[1] + 1)
    tail = slice(x_tr.shape[1] - (order - 1), None)  # the n-gram's context: the last words
    t0 = time.perf_counter()
    kn = KneserNey(x_tr[:, tail], y_tr, V)
    kn_build = time.perf_counter() - t0
    nn_context = x_tr.shape[1]
    del x_tr, y_tr
    p = {}
    for split in ("valid", "test"):
        x, y = ds.load(split)
        t0 = time.perf_counter()
        p[split] = {"nn": token_probs(model, x, y), "kn": kn.probs(x[:, tail], y),
                    "tokens": len(y)}
        print(f"{split}: {len(y)} tokens scored in {time.perf_counter() - t0:.1f} s", flush=True)
    # the ranking task of Collobert & Weston on test: the true word against one corrupt word,
    # the same draw RankingLM.evaluate uses, so the three models face the same pairs
    x, y = ds.load("test")
    w = RankingLM.corrupt(y, V, np.random.default_rng(EVAL_SEED))
    rank = {"kn": ranking_accuracy(p["test"]["kn"], kn.probs(x[:, tail], w)),
            "nn": ranking_accuracy(p["test"]["nn"], token_probs(model, x, w))}
    lam, _ = best_interpolation(p["valid"]["nn"], p["valid"]["kn"])
    res = {"vocab": V, "order": order, "nn_context": nn_context, "ranking_accuracy": rank,
           "selected_on_valid": selected,
           "kn_build_s": round(kn_build, 1),
           "kn_discounts": {str(o): [round(d, 4) for d in kn.discounts[o]]
                            for o in kn.discounts},
           "lambda_nn": round(lam, 3)}
    for split in ("valid", "test"):
        q = p[split]
        res[split] = {"tokens": q["tokens"], "kn": perplexity(q["kn"]), "nn": perplexity(q["nn"]),
                      "mix": perplexity(lam * q["nn"] + (1 - lam) * q["kn"])}
    index = {w: i for i, w in enumerate(vocab["words"])}
    E = model.layers[0].E
    res["neighbors"] = {w: [[vocab["words"][i], round(s, 3)] for i, s in nearest(E, index[w], k)]
                        for w in words if w in index}
    res["unk_rate_test"] = float(np.mean(ds.load("test")[1] == 1))
    return res


def ranking_run(cfg_path: str, overrides: list[str], run_dir: Path, timeout: float,
                words: list[str], k: int) -> dict:
    """The same network trained with Collobert & Weston's ranking objective
    (``model.loss = "ranking"``): its test ranking accuracy and word neighbours."""
    from dbmpi.lm import load_lm, nearest

    summary = train(cfg_path, [*overrides, 'model.loss="ranking"'], run_dir, timeout)
    model, ds, vocab = load_lm(run_dir)
    x, y = ds.load("test")
    hinge, acc = model.evaluate(x, y)
    index = {w: i for i, w in enumerate(vocab["words"])}
    E = model.layers[0].E
    return {"train": summary, "test_hinge": hinge, "test_ranking_accuracy": acc,
            "num_params": model.num_params,
            "neighbors": {w: [[vocab["words"][i], round(s, 3)] for i, s in nearest(E, index[w], k)]
                          for w in words if w in index}}


WIDE = ('model.layers=[{type = "embedding", dim = 256}, '
        '{type = "dense", units = 32, activation = "tanh"}]')


def traffic(cfg_path: str, overrides: list[str], steps: int, repeats: int) -> list[dict]:
    """Sparse and dense runs of the config's model and of a wide-embedding one (the table
    most of the parameters), interleaved ``repeats`` times; medians over the train records of
    all repeats."""
    samples: dict[tuple, list] = {}
    for _ in range(repeats):
        for model, extra in (("config", []), ("wide embedding", [WIDE])):
            for sparse in (True, False):
                ov = [*overrides, *extra, f"downpour.sparse={'true' if sparse else 'false'}",
                      f"downpour.steps={steps}", "downpour.epochs=0",
                      "downpour.warm_start_steps=0", "downpour.eval_every_s=1000",
                      "downpour.log_every=25", "checkpoint.every_s=0"]
                summary, records = run_job(cfg_path, ov)
                tr = [r for r in records if r["kind"] == "train" and r["step"] > 2 * 25]
                for r in tr:
                    r["num_params"] = summary["num_params"]
                samples.setdefault((model, sparse), []).extend(tr)
    from dbmpi import config as config_mod

    batch = config_mod.load(cfg_path, overrides).data.batch_size
    rows = []
    for (model, sparse), tr in samples.items():
        med = {key: statistics.median(r[key] for r in tr)
               for key in ("samples_per_s", "fetch_bytes", "push_bytes", "fetch_fraction",
                           "push_fraction")}
        rows.append({"model": model, "sparse": sparse,
                     "ms_per_step": 1000 * batch / med["samples_per_s"], **med,
                     "rows_per_push": statistics.median(r.get("rows", 0) for r in tr),
                     "num_params": tr[0]["num_params"], "records": len(tr)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None,
                    help="train/valid/test.txt or ptb.{train,valid,test}.txt "
                    "(default $DBMPI_DATA/kjv: the King James Bible)")
    ap.add_argument("--name", default=None, help="results name (default: the --src folder's)")
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--context", type=int, default=4,
                    help="context words of the neural LM (default 4)")
    ap.add_argument("--kn-order", type=int, default=5,
                    help="order of the Kneser-Ney model (default 5; at most context + 1): it "
                    "scores the same tokens from the last order - 1 context words")
    ap.add_argument("--config", default="jobs/configs/lm_kjv.toml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for the training runs (repeatable)")
    ap.add_argument("--skip", action="append", default=[],
                    choices=("perplexity", "ranking", "traffic"))
    ap.add_argument("--rank-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra overrides for the ranking-objective run (repeatable)")
    ap.add_argument("--record-every-s", type=float, default=60.0,
                    help="the perplexity run records its parameters this often; the record "
                    "or average of the last K records with the best valid perplexity is "
                    "the one scored on test; 0: score the final parameters")
    ap.add_argument("--reuse-run", action="store_true",
                    help="score runs/lm-bench-NAME as it is (do not train again)")
    ap.add_argument("--traffic-steps", type=int, default=300)
    ap.add_argument("--traffic-repeats", type=int, default=2)
    ap.add_argument("--words", default=",".join(WORDS))
    ap.add_argument("-k", type=int, default=8, help="neighbours per word")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    a.src = data_source(a.src, "kjv", "text corpus")
    name = a.name or Path(a.src).resolve().name
    data = ROOT / "data" / f"lm-{name}-v{a.vocab}-c{a.context}"
    load0 = os.getloadavg()
    out = {"src": a.src, "name": name, "config": a.config, "overrides": a.set,
           "machine": machine_info()}
    out["shard"] = shard(a.src, data, a.vocab, a.context)
    overrides = [f"data.path={json.dumps(str(data))}", *a.set]
    if "perplexity" not in a.skip:
        run_dir = ROOT / "runs" / f"lm-bench-{name}"
        if a.reuse_run and (run_dir / "params.h5").is_file():  # the run, scored again
            out["train"] = json.loads((run_dir / "summary.json").read_text())
        else:
            record = ([] if a.record_every_s <= 0 else
                      ["downpour.record_iterates=true",
                       f"downpour.eval_every_s={a.record_every_s}"])
            out["train"] = train(a.config, [*record, *overrides], run_dir, a.timeout)
        out["run_dir"] = str(run_dir)
        res = out["perplexity"] = perplexities(run_dir, a.words.split(","), a.k, a.kn_order)
        print_table(["model", "valid perplexity", "test perplexity"], [
            [f"Kneser-Ney {res['order']}-gram (interpolated, modified)", res["valid"]["kn"],
             res["test"]["kn"]],
            [f"neural LM (ours, Downpour, {res['nn_context']} context words)",
             res["valid"]["nn"], res["test"]["nn"]],
            [f"interpolation, lambda_nn = {res['lambda_nn']} (tuned on valid)",
             res["valid"]["mix"], res["test"]["mix"]],
        ], title=f"{name}: vocabulary {res['vocab']}, {res['test']['tokens']} test tokens")
        for w, nn in res["neighbors"].items():
            print(f"{w}: " + ", ".join(n for n, _ in nn))
        if res["selected_on_valid"]:
            c = res["selected_on_valid"]["chosen"]
            what = (f"the average of the last {c['last']} (from step {c['from_step']})"
                    if "last" in c else f"the one at step {c['step']} ({c['wall_s']} s)")
            print(f"selected on valid: of {len(res['selected_on_valid']['curve'])} recorded "
                  f"parameter vectors and their tail averages, {what} has the best valid "
                  f"perplexity ({c['valid_ppl']}): scored above")
    if "ranking" not in a.skip:
        rank_dir = ROOT / "runs" / f"lm-bench-{name}-ranking"
        rk = out["ranking"] = ranking_run(a.config, [*overrides, *a.rank_set], rank_dir,
                                          a.timeout, a.words.split(","), a.k)
        acc = (out.get("perplexity") or {}).get("ranking_accuracy", {})
        from dbmpi import config as config_mod

        batch = config_mod.load(a.config, overrides).data.batch_size
        rate = {"ranking": rk["train"]["steps"] * batch / rk["train"]["wall_s"]}
        if "train" in out:
            rate["softmax"] = out["train"]["steps"] * batch / out["train"]["wall_s"]
        print_table(["model", "test ranking accuracy", "training samples/s"], [
            ["Kneser-Ney (p(true) > p(corrupt))", acc.get("kn", "-"), "-"],
            ["neural LM, softmax (p(true) > p(corrupt))", acc.get("nn", "-"),
             rate.get("softmax", "-")],
            ["neural LM, Collobert & Weston ranking (f(true) > f(corrupt))",
             rk["test_ranking_accuracy"], rate["ranking"]],
        ], title=f"{name}: the true next word against one random word (the same test pairs)")
        for w, nn in rk["neighbors"].items():
            print(f"{w}: " + ", ".join(n for n, _ in nn))
    if "traffic" not in a.skip:
        rows = out["traffic"] = traffic(a.config, overrides, a.traffic_steps,
                                        a.traffic_repeats)
        print_table(["model (parameters)", "traffic", "fetch KB/step", "push KB/step",
                     "rows/push", "ms/step", "fetch fraction", "push fraction"],
                    [[f"{r['model']} ({r['num_params']})",
                      "sparse rows" if r["sparse"] else "dense", r["fetch_bytes"] / 1024,
                      r["push_bytes"] / 1024, r["rows_per_push"] if r["sparse"] else "-",
                      r["ms_per_step"], r["fetch_fraction"], r["push_fraction"]] for r in rows],
                    title=f"{name}: bytes and time per step and replica (medians)")
    out["loadavg_before"] = load0
    out["loadavg_after"] = os.getloadavg()
    prev = RESULTS / f"lm_{name}.json"
    if prev.is_file():  # keep the part a --skip left out from the last run
        old = json.loads(prev.read_text())
        for part in a.skip:
            for key in (part, "train", "run_dir") if part == "perplexity" else (part,):
                if key not in old:
                    continue
                out[key] = old[key]
                out[f"{key}_from_earlier_run"] = {"loadavg": old.get("loadavg_after"),
                                                  "overrides": old.get("overrides")}
    write_json(f"lm_{name}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
