"""Text corpora -> language-model shards: tokens, a vocabulary, fixed-length context windows.

``python -m data_tools shard text --src DIR --out DIR --vocab N [--context 4]``

The source directory holds three plain-text files, one sentence (or verse) per line: either
``train.txt``, ``valid.txt``, ``test.txt`` (e.g. the King James Bible) or the Penn Treebank's
``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt``.

Tokens (``--tokenize``):
  ``words`` (default for plain files): lower-cased; a token is a run of letters/digits (with
  inner apostrophes: ``lord's``) or one punctuation character; ``<unk>`` is kept whole.
  ``space`` (default for ``ptb.*`` files, which are tokenised already): split on whitespace.

Vocabulary: ``</s>`` (end of sentence, id 0), ``<unk>`` (id 1), then the ``N - 2`` most
frequent training tokens (ties broken alphabetically), so ``N`` counts both symbols. Any other
token becomes ``<unk>``.

Examples: every token of a sentence and its closing ``</s>`` is one example whose label is
that token's id and whose features are the ids of the ``context`` tokens before it, padded at
the start of the sentence with ``</s>`` (sentences are independent, as in an n-gram model with
sentence-start padding). A model's per-example loss over a split is therefore its per-token
cross-entropy on exactly the token stream an n-gram model of order ``context + 1`` scores.

Output: ``train`` / ``valid`` / ``test`` shards (features int32 (N, context), labels int32,
``num_classes = N`` words) plus ``vocab.json`` (schema ``dbmpi.vocab`` v1: the words, their
training counts, the tokenizer, the context length).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from dbmpi.data.schema import DataError

# The vocabulary's schema and its reader live in the runtime package (`python -m dbmpi
# neighbors` reads vocab.json); read_vocab is re-exported here for data-side callers.
from dbmpi.rundir import EOS, UNK, VOCAB_FILE, VOCAB_SCHEMA, VOCAB_VERSION, read_vocab

__all__ = ["EOS", "UNK", "VOCAB_FILE", "build_text", "build_vocab", "encode", "read_vocab",
           "tokenize", "windows", "write_vocab"]
SPLITS = ("train", "valid", "test")
_WORDS = re.compile(r"<unk>|[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(line: str, mode: str = "words") -> list[str]:
    """The tokens of one line (see the module doc)."""
    if mode == "space":
        return line.split()
    if mode == "words":
        return _WORDS.findall(line.lower())
    raise ValueError(f"--tokenize must be 'words' or 'space', got {mode!r}")


def find_files(src: str | os.PathLike) -> dict[str, Path]:
    """``{split: path}`` for the three text files of ``src`` (plain names or ``ptb.*``)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: no such directory: pass --src DIR holding train.txt, valid.txt, "
                        f"test.txt (or ptb.train.txt, ptb.valid.txt, ptb.test.txt)")
    for pattern in ("{}.txt", "ptb.{}.txt"):
        paths = {s: src / pattern.format(s) for s in SPLITS}
        if all(p.is_file() for p in paths.values()):
            return paths
    missing = [str(src / f"{s}.txt") for s in SPLITS if not (src / f"{s}.txt").is_file()]
    raise DataError(f"{missing[0]}: missing: --src must hold train.txt, valid.txt and test.txt "
                    f"(or ptb.train.txt, ptb.valid.txt and ptb.test.txt), one sentence a line")


def default_tokenizer(paths: dict[str, Path]) -> str:
    return "space" if paths["train"].name.startswith("ptb.") else "words"


def read_sentences(path: Path, mode: str) -> list[list[str]]:
    """Tokenised non-empty lines of ``path``; DataError if it holds no tokens."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); convert it with iconv") from e
    out = [t for t in (tokenize(line, mode) for line in text.splitlines()) if t]
    if not out:
        raise DataError(f"{path}: holds no tokens (empty corpus): give a text file with one "
                        f"sentence per line")
    return out


def build_vocab(sentences: Iterable[list[str]], size: int) -> tuple[list[str], list[int]]:
    """(words, training counts): ``</s>``, ``<unk>``, then the ``size - 2`` most frequent
    tokens (count descending, then alphabetical). Counts of ``</s>`` = sentences; of
    ``<unk>`` = tokens outside the vocabulary (plus literal ``<unk>`` tokens)."""
    if size < 3:
        raise ValueError(f"--vocab must be >= 3 (</s>, <unk> and at least one word), got {size}")
    counts: Counter[str] = Counter()
    n_sent = 0
    for s in sentences:
        counts.update(s)
        n_sent += 1
    literal_unk = counts.pop(UNK, 0)
    counts.pop(EOS, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = ranked[:size - 2]
    unk = literal_unk + sum(c for _, c in ranked[size - 2:])
    return [EOS, UNK, *(w for w, _ in kept)], [n_sent, unk, *(c for _, c in kept)]


def encode(sentences: Iterable[list[str]], index: dict[str, int]) -> list[np.ndarray]:
    """Each sentence as int32 ids followed by ``</s>`` (id 0); unknown tokens -> ``<unk>``."""
    unk = index[UNK]
    return [np.array([index.get(t, unk) for t in s] + [index[EOS]], dtype=np.int32)
            for s in sentences]


def windows(ids: list[np.ndarray], context: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, context), labels (N,)): each token with the ``context`` tokens before it
    in its sentence, the start padded with ``pad``."""
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    xs, ys = [], []
    for s in ids:
        padded = np.concatenate([np.full(context, pad, np.int32), s])
        xs.append(np.lib.stride_tricks.sliding_window_view(padded, context)[:len(s)])
        ys.append(s)
    return np.ascontiguousarray(np.concatenate(xs), dtype=np.int32), np.concatenate(ys)


def write_vocab(out: Path, words: list[str], counts: list[int], tokenizer: str, context: int,
                source: str) -> Path:
    path = out / VOCAB_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({
        "schema": VOCAB_SCHEMA, "schema_version": VOCAB_VERSION, "eos": EOS, "unk": UNK,
        "tokenizer": tokenizer, "context": context, "source": source,
        "words": words, "counts": counts}, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def build_text(src, out, *, vocab: int, context: int = 4, shards: int = 4,
               tokenizer: str | None = None, seed: int = 0, command: str = "",
               compression=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Shard a text corpus (see the module doc); return a summary."""
    from .shards import build_manifest, write_split

    if vocab < 3:
        raise ValueError(f"--vocab must be >= 3 (</s>, <unk> and at least one word), got {vocab}")
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    paths = find_files(src)
    mode = tokenizer or default_tokenizer(paths)
    sents = {s: read_sentences(p, mode) for s, p in paths.items()}
    words, counts = build_vocab(sents["train"], vocab)
    if len(words) < vocab:
        log(f"the training text has only {len(words) - 2} distinct tokens: vocabulary of "
            f"{len(words)} instead of {vocab}")
    index = {w: i for i, w in enumerate(words)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"compression": compression} if compression is not None else {}
    summary = {"vocab": len(words), "tokenizer": mode, "context": context, "splits": {}}
    for split in SPLITS:
        x, y = windows(encode(sents[split], index), context)
        source = f"text {paths[split].resolve()} ({mode} tokens, vocab {len(words)})"
        write_split(out, split, x, y, num_shards=shards if split == "train" else 1,
                    seed=seed if split == "train" else None, num_classes=len(words),
                    normalization=f"token ids, {context} context tokens, </s>-padded",
                    class_names=None, command=command, source=source, log=log, **extra)
        oov = float(np.mean(y == index[UNK]))
        summary["splits"][split] = {"sentences": len(sents[split]), "tokens": len(y),
                                    "unk_rate": round(oov, 5)}
    write_vocab(out, words, counts, mode, context, str(Path(src).resolve()))
    build_manifest(out)
    return summary
