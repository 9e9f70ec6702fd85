"""dbmpi-data (python -m data_tools): make shard data sets for dbmpi.

    python -m data_tools synth --out data/synth-idx [--train 20000 --test 4000 --seed 0]
    python -m data_tools shard idx --src data/synth-idx --out data/synth --shards 4
    python -m data_tools shard idx --src DIR --out DIR --shards 64 --task $SLURM_PROCID \\
        --n-tasks $SLURM_NTASKS          # then, once all tasks have finished:
    python -m data_tools manifest --out DIR
    python -m data_tools shard speech --src WAV_DIR --out DIR [--shards 4 --states 3 --norm global]
    python -m data_tools shard images --src DIR --out DIR [--patch K --patches-per-image N]
        [--whiten zca --whiten-eps 0.1]   # idx files or PNG/JPEG class folders
    python -m data_tools shard text --src DIR --out DIR --vocab 10000 [--context 4 --shards 4]
    python -m data_tools check DIR [--verify]
    python -m data_tools fetch --list                 # the public raw data sets
    python -m data_tools fetch mnist fashion-mnist --out DIR   # -> DIR/mnist/, verified
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

try:
    import numpy as np

    from dbmpi.data.reader import open_dataset
    from dbmpi.data.schema import DataError

    from .idx import read_idx_split
    from .shards import build_manifest, command_line, parse_compression, write_split
    from .synth import CLASS_NAMES as SYNTH_CLASSES
    from .synth import write_synth
except ImportError as exc:  # the system Python, not .venv: one line naming the fix
    from dbmpi.envcheck import exit_if_dependency

    exit_if_dependency("data_tools", "data_tools", exc)  # re-raises dbmpi's own errors

CLASS_NAME_PRESETS = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
    "synth": SYNTH_CLASSES,
}


def _log(msg: str) -> None:
    print(f"[data_tools] {msg}", file=sys.stderr, flush=True)


def _class_names(spec: str | None, src: Path) -> list[str] | None:
    if spec is None:
        f = src / "classes.txt"
        return [s for s in f.read_text().splitlines() if s.strip()] if f.is_file() else None
    if spec in CLASS_NAME_PRESETS:
        return list(CLASS_NAME_PRESETS[spec])
    return [s.strip() for s in spec.split(",")]


def cmd_shard_idx(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    src, out = Path(a.src), Path(a.out)
    if not 0 <= a.task < a.n_tasks:
        raise SystemExit(f"--task must be in [0, --n-tasks={a.n_tasks}), got {a.task}")
    data = {split: read_idx_split(src, split) for split in ("train", "test")}
    names = _class_names(a.class_names, src)
    top = max(int(data[s][1].max()) for s in data) + 1
    num_classes = a.num_classes or (len(names) if names else top)
    if names is not None and len(names) != num_classes:
        raise SystemExit(f"--class-names gives {len(names)} names "
                         f"but there are {num_classes} classes")
    if top > num_classes:
        raise SystemExit(f"labels go up to {top - 1} but --num-classes is {num_classes}")
    x0 = data["train"][0]
    if x0.dtype == np.uint8:
        norm = "uint8 / 255 -> float32 in [0, 1]"

        def transform(x):
            return x.astype(np.float32) / np.float32(255)  # correctly rounded x/255
    else:
        norm = f"{x0.dtype} cast to float32, no scaling"

        def transform(x):
            return x.astype(np.float32)

    common = {"num_classes": num_classes, "normalization": norm, "class_names": names,
                  "command": command_line(a.argv), "compression": parse_compression(a.compression),
                  "task": a.task, "n_tasks": a.n_tasks, "log": _log}
    for split, k, seed in (("train", a.shards, a.seed), ("test", a.test_shards, None)):
        x, y, paths = data[split]
        source = f"idx {src.resolve()} ({paths[0].name}, {paths[1].name})"
        write_split(out, split, x, y, num_shards=k, seed=seed, transform=transform,
                    source=source, **common)
    if a.n_tasks == 1:
        build_manifest(out)
        _log(f"wrote {out / 'manifest.json'}")
    else:
        _log(f"task {a.task}/{a.n_tasks} done; after all tasks finish run "
             f"`python -m data_tools manifest --out {out}`")
    _log(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_shard_speech(a: argparse.Namespace) -> int:
    from .speech import build_speech

    t0 = time.perf_counter()
    info = build_speech(a.src, a.out, shards=a.shards, test_shards=a.test_shards,
                        states=a.states, context=a.context, norm=a.norm,
                        silence_db=a.silence_db, test_index=a.test_index, seed=a.seed,
                        command=command_line(a.argv),
                        compression=parse_compression(a.compression), log=_log)
    counts = {s: len(v) for s, v in info["splits"].items()}
    _log(f"recordings per split {counts}, {len(info['labels']['class_names'])} classes; "
         f"wrote {Path(a.out) / 'manifest.json'} in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_shard_text(a: argparse.Namespace) -> int:
    from .text import build_text

    t0 = time.perf_counter()
    info = build_text(a.src, a.out, vocab=a.vocab, context=a.context, shards=a.shards,
                      tokenizer=a.tokenize, seed=a.seed, command=command_line(a.argv),
                      compression=parse_compression(a.compression), log=_log)
    _log(f"vocabulary {info['vocab']} ({info['tokenizer']} tokens, context {info['context']}); "
         f"{info['splits']}; wrote {Path(a.out) / 'manifest.json'} in "
         f"{time.perf_counter() - t0:.2f} s")
    return 0


def cmd_manifest(a: argparse.Namespace) -> int:
    m = build_manifest(a.out, verify=a.verify)
    counts = {s: sum(e["num_examples"] for e in v) for s, v in m["splits"].items()}
    _log(f"wrote {Path(a.out) / 'manifest.json'}: {counts}")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    paths = write_synth(a.out, a.train, a.test, a.seed, compress=a.gzip)
    _log(f"wrote {len(paths)} idx files to {a.out} in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ds = open_dataset(a.path, verify=a.verify)
    for split in ds.splits:
        _x, y = ds.load(split)  # reads and checks every row
        counts = np.bincount(y, minlength=ds.num_classes).tolist()
        _log(f"{split}: {len(y)} examples in {len(ds.splits[split])} shards, per class {counts}")
    print(json.dumps({
        "path": str(ds.path),
        "feature_shape": list(ds.feature_shape),
        "feature_dtype": ds.feature_dtype.name,
        "num_classes": ds.num_classes,
        "class_names": ds.class_names,
        "splits": {s: {"shards": len(p), "examples": ds.num_examples(s)}
                   for s, p in ds.splits.items()},
    }, indent=2))
    _log(f"ok ({'checksums verified, ' if a.verify else ''}{time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_fetch(a: argparse.Namespace) -> int:
    from .fetch import CATALOGUE, FetchError, fetch, listing

    if a.list:
        print(listing())
        return 0
    if not a.names:
        print("error: name the sets to fetch (or 'all'); --list shows them", file=sys.stderr)
        return 2
    out = a.out or os.environ.get("DBMPI_DATA")
    if not out:
        print("error: fetch needs --out DIR (or $DBMPI_DATA): the sets go to DIR/NAME/",
              file=sys.stderr)
        return 2
    for name in a.names if a.names != ["all"] else list(CATALOGUE):
        try:
            fetch(name, out, retries=a.retries, timeout=a.timeout, log=_log)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from dbmpi.__main__ import version

    if prog is None:
        prog = "dbmpi-data" if Path(sys.argv[0]).name == "dbmpi-data" else "python -m data_tools"
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND",
                           help="`%(prog)s COMMAND --help` lists its arguments")

    sh = sub.add_parser("shard", help="raw data -> HDF5 shards + manifest.json")
    fmt = sh.add_subparsers(dest="format", required=True, title="formats", metavar="FORMAT",
                            help="`%(prog)s FORMAT --help` lists its arguments")
    ix = fmt.add_parser("idx", help="MNIST-style idx files (train-/t10k-, optionally .gz)")
    ix.add_argument("--src", required=True, help="directory with the four idx files")
    ix.add_argument("--out", required=True, help="output directory")
    ix.add_argument("--shards", type=int, required=True,
                    help="number of train shards (>= replicas)")
    ix.add_argument("--test-shards", type=int, default=1, help="number of test shards (default 1)")
    ix.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (default 0)")
    ix.add_argument("--num-classes", type=int, default=None,
                    help="default: len(class names), else max label + 1")
    ix.add_argument("--class-names", default=None,
                    help="comma list or a preset (fashion-mnist, mnist, synth); "
                    "default: SRC/classes.txt if present")
    ix.add_argument("--compression", default="gzip-1",
                    help="gzip-N, lzf or none, optionally +shuffle (default gzip-1)")
    ix.add_argument("--task", type=int, default=0, help="this task's index (default 0)")
    ix.add_argument("--n-tasks", type=int, default=1,
                    help="tasks sharing the work; task i writes shards with index %% n == i. "
                    "With n > 1 run `manifest` afterwards (default 1)")
    ix.set_defaults(func=cmd_shard_idx)

    sp = fmt.add_parser("speech", help="WAV files WORD_SPEAKER_INDEX.wav -> 40 log mel x 11 "
                        "frames, frame labels (silence + word x state); see data_tools/speech.py")
    sp.add_argument("--src", required=True,
                    help="directory with the WAV files (searched recursively)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.add_argument("--shards", type=int, default=4, help="number of train shards (default 4)")
    sp.add_argument("--test-shards", type=int, default=1, help="number of test shards (default 1)")
    sp.add_argument("--test-index", default="0-4",
                    help="recording indices that form the test split (default 0-4, FSDD's split)")
    sp.add_argument("--states", type=int, default=3, help="states per word (default 3)")
    sp.add_argument("--context", type=int, default=5,
                    help="frames either side in a context window (default 5: 11 frames)")
    sp.add_argument("--norm", default="global", choices=("global", "speaker", "utterance"),
                    help="mean/variance normalisation: global over the training frames (default "
                    "global), per speaker, or per utterance (recording)")
    sp.add_argument("--silence-db", type=float, default=30.0,
                    help="frames this many dB below the loudest frame are quiet (default 30)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (default 0)")
    sp.add_argument("--compression", default="gzip-1",
                    help="gzip-N, lzf or none, optionally +shuffle (default gzip-1)")
    sp.set_defaults(func=cmd_shard_speech)

    from .images import add_parser as add_images_parser

    add_images_parser(fmt, _log, _class_names)

    tx = fmt.add_parser("text", help="text corpus (train/valid/test.txt or ptb.*.txt, one "
                        "sentence a line) -> vocabulary + context windows; see data_tools/text.py")
    tx.add_argument("--src", required=True, help="directory with the three text files")
    tx.add_argument("--out", required=True, help="output directory")
    tx.add_argument("--vocab", type=int, required=True,
                    help="vocabulary size, </s> and <unk> included (e.g. 10000)")
    tx.add_argument("--context", type=int, default=4,
                    help="tokens of context per example (default 4: a 5-gram model)")
    tx.add_argument("--shards", type=int, default=4, help="number of train shards (default 4)")
    tx.add_argument("--tokenize", default=None, choices=("words", "space"),
                    help="words: lower-case, punctuation split off (default for *.txt); "
                    "space: whitespace only (default for ptb.*.txt)")
    tx.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (default 0)")
    tx.add_argument("--compression", default="gzip-1",
                    help="gzip-N, lzf or none, optionally +shuffle (default gzip-1)")
    tx.set_defaults(func=cmd_shard_text)

    mf = sub.add_parser("manifest", help="check all shard files in --out and write manifest.json")
    mf.add_argument("--out", required=True,
                    help="the data set directory the shard tasks wrote into")
    mf.add_argument("--verify", action="store_true", help="recompute every checksum")
    mf.set_defaults(func=cmd_manifest)

    sy = sub.add_parser("synth", help="write the synthetic 10-class 28x28 data set as idx files")
    sy.add_argument("--out", required=True, help="output directory for the idx files")
    sy.add_argument("--train", type=int, default=20000,
                    help="training examples (default: 20000)")
    sy.add_argument("--test", type=int, default=4000, help="test examples (default: 4000)")
    sy.add_argument("--seed", type=int, default=0,
                    help="seed of the generator (default: 0)")
    sy.add_argument("--gzip", action="store_true", help="write .gz idx files")
    sy.set_defaults(func=cmd_synth)

    ck = sub.add_parser("check", help="open a data set, read every row, print a summary")
    ck.add_argument("path", help="data set directory (the one holding manifest.json)")
    ck.add_argument("--verify", action="store_true", help="also recompute every checksum")
    ck.set_defaults(func=cmd_check)

    fe = sub.add_parser("fetch", help="download public raw data sets into DIR/NAME/, "
                        "checksums verified, resumable (see data_tools/fetch.py)")
    fe.add_argument("names", nargs="*", metavar="NAME",
                    help="data sets to fetch (mnist, fashion-mnist, fsdd, ptb; 'all' for "
                    "every one; --list describes them)")
    fe.add_argument("--out", default=None,
                    help="folder that gets one subfolder per set (default $DBMPI_DATA)")
    fe.add_argument("--list", action="store_true",
                    help="print the catalogue (files, URLs, licences, checksums) and exit")
    fe.add_argument("--retries", type=int, default=2,
                    help="extra tries per file, each resuming the .part (default 2)")
    fe.add_argument("--timeout", type=float, default=30.0,
                    help="seconds without data before a try fails (default 30)")
    fe.set_defaults(func=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return a.func(a)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # a dependency one format imports (scipy, PIL...)
        from dbmpi.envcheck import exit_if_dependency

        exit_if_dependency("data_tools", "data_tools", e)  # or re-raises a bug's


if __name__ == "__main__":
    sys.exit(main())
