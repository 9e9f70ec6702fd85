"""Language model pieces without MPI: the text data tool, the Kneser-Ney n-gram model, the
embedding layer and the neural LM's gradients."""

import json
import math

import numpy as np
import pytest

import cython_kernels.reference as ref
from data_tools.__main__ import main as data_main
from data_tools.text import build_vocab, encode, tokenize, windows
from dbmpi.config import from_dict
from dbmpi.data import open_dataset
from dbmpi.errors import ConfigError
from dbmpi.model import Model
from dbmpi.model.embedding import Embedding
from dbmpi.ngram import KneserNey, best_interpolation, modified_discounts, perplexity
from dbmpi.rundir import read_vocab

CORPUS = {
    "train": "In the beginning God created the heaven and the earth.\n"
             "And the earth was without form, and void.\n\n"
             "And God said, Let there be light: and there was light.\n"
             "And God saw the light, that it was good.\n",
    "valid": "And God called the light Day.\n",
    "test": "And the evening and the morning were the first day.\n",
}


def write_corpus(d, names="{}.txt", corpus=CORPUS):
    d.mkdir(parents=True, exist_ok=True)
    for split, text in corpus.items():
        (d / names.format(split)).write_text(text)
    return d


# -- tokens, vocabulary, windows -------------------------------------------------------------
def test_tokenize_words_and_space():
    assert tokenize("And God said, Let there be light: <unk> LORD's") == [
        "and", "god", "said", ",", "let", "there", "be", "light", ":", "<unk>", "lord's"]
    assert tokenize(" the <unk> 's N  ", "space") == ["the", "<unk>", "'s", "N"]


def test_vocab_ranks_by_count_then_alphabet_and_counts_unk():
    sents = [["b", "a", "c"], ["a", "b", "d", "<unk>"], ["a"]]
    words, counts = build_vocab(sents, 4)
    assert words == ["</s>", "<unk>", "a", "b"]  # a:3, b:2; c, d (1 each) and <unk> -> <unk>
    assert counts == [3, 3, 3, 2]


def test_windows_pad_each_sentence_with_eos():
    ids = encode([["a", "b"], ["c"]], {"</s>": 0, "<unk>": 1, "a": 2, "b": 3})
    x, y = windows(ids, 2)
    np.testing.assert_array_equal(y, [2, 3, 0, 1, 0])
    np.testing.assert_array_equal(x, [[0, 0], [0, 2], [2, 3], [0, 0], [0, 1]])
    assert x.dtype == np.int32


@pytest.mark.parametrize("names", ["{}.txt", "ptb.{}.txt"])
def test_shard_text_cli(tmp_path, names):
    src = write_corpus(tmp_path / "src", names)
    out = tmp_path / "out"
    assert data_main(["shard", "text", "--src", str(src), "--out", str(out), "--vocab", "12",
                      "--context", "3", "--shards", "2"]) == 0
    ds = open_dataset(out)
    assert ds.feature_shape == (3,) and ds.num_classes == 12
    assert set(ds.splits) == {"train", "valid", "test"}
    v = read_vocab(out)
    assert v["context"] == 3 and len(v["words"]) == 12
    assert v["tokenizer"] == ("space" if names.startswith("ptb") else "words")
    # the test split, in order, is the test text's tokens then </s>, each with its context
    x, y = ds.load("test")
    toks = tokenize(CORPUS["test"], v["tokenizer"]) + ["</s>"]
    index = {w: i for i, w in enumerate(v["words"])}
    np.testing.assert_array_equal(y, [index.get(t, 1) for t in toks])
    np.testing.assert_array_equal(x[0], [0, 0, 0])
    np.testing.assert_array_equal(x[3], y[:3])
    # every train token is an example (4 sentences: words + </s>)
    n_train = sum(len(tokenize(s, v["tokenizer"])) + 1
                  for s in CORPUS["train"].splitlines() if s.strip())
    assert ds.num_examples("train") == n_train


@pytest.mark.parametrize("args,needle", [
    (["--vocab", "2"], "--vocab must be >= 3"),
    (["--vocab", "10", "--context", "0"], "--context must be >= 1"),
])
def test_shard_text_bad_args(tmp_path, capsys, args, needle):
    src = write_corpus(tmp_path / "src")
    assert data_main(["shard", "text", "--src", str(src), "--out", str(tmp_path / "o"),
                      *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_shard_text_missing_and_empty_files(tmp_path, capsys):
    src = write_corpus(tmp_path / "src")
    (src / "valid.txt").unlink()
    assert data_main(["shard", "text", "--src", str(src), "--out", str(tmp_path / "o"),
                      "--vocab", "10"]) == 2
    err = capsys.readouterr().err
    assert "valid.txt: missing" in err
    write_corpus(src, corpus={**CORPUS, "valid": "", "train": "\n \n"})
    assert data_main(["shard", "text", "--src", str(src), "--out", str(tmp_path / "o"),
                      "--vocab", "10"]) == 2
    err = capsys.readouterr().err
    assert "train.txt: holds no tokens (empty corpus)" in err


def test_read_vocab_errors(tmp_path):
    from dbmpi.data import DataError

    with pytest.raises(DataError, match="vocab.json: missing"):
        read_vocab(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"schema": "dbmpi.vocab",
                                                     "schema_version": 9, "words": []}))
    with pytest.raises(DataError, match="schema version 9"):
        read_vocab(tmp_path)


# -- Kneser-Ney --------------------------------------------------------------------------------
def test_modified_discounts_hand_computed():
    # n1 = 3, n2 = 2, n3 = 1, n4 = 2 (counts above 4 do not enter): Y = 3/7,
    # D1 = 1 - 2Y*2/3 = 3/7, D2 = 2 - 3Y/2 = 19/14, D3 = 3 - 4Y*2 = -3/7 -> clipped to 0
    d = modified_discounts([1, 1, 1, 2, 2, 3, 4, 4, 5, 9, 9])
    assert d == pytest.approx((3 / 7, 19 / 14, 0.0))
    # n1 = 4, n2 = 2, n3 = 2, n4 = 1: Y = 1/2, D1 = 1/2, D2 = 1/2, D3 = 2
    assert modified_discounts([1, 1, 1, 1, 2, 2, 3, 3, 4, 7, 8]) == pytest.approx((0.5, 0.5, 2.0))


def _tiny_bigram():
    # ids: 0 </s>, 1 <unk>, 2 a, 3 b, 4 c; sentences "a b", "a c", "b"
    ids = [np.array(s + [0]) for s in ([2, 3], [2, 4], [3])]
    x, y = windows(ids, 1)
    return KneserNey(x, y, vocab=5, discounts=(0.5, 0.5, 0.5))


def test_kneser_ney_hand_computed_bigram():
    kn = _tiny_bigram()
    # unigram continuation counts: a 1, b 2 (after a and </s>), </s> 2, c 1; total 6, gamma 2
    p1 = {w: (max(c - 0.5, 0) + 2.0 / 5) / 6 for w, c in {0: 2, 1: 0, 2: 1, 3: 2, 4: 1}.items()}
    assert p1[2] == pytest.approx(0.15) and p1[3] == pytest.approx(1.9 / 6)
    # context a: (a b) 1, (a c) 1: total 2, gamma numerator 0.5 * 2
    assert kn.prob([2], 3) == pytest.approx((0.5 + 1.0 * p1[3]) / 2)
    assert kn.prob([2], 2) == pytest.approx(1.0 * p1[2] / 2)
    # context </s> (sentence start): (</s> a) 2, (</s> b) 1: raw counts, gamma 0.5 + 0.5
    assert kn.prob([0], 2) == pytest.approx((2 - 0.5 + 1.0 * 0.15) / 3)
    # unseen context -> the unigram distribution
    assert kn.prob([1], 3) == pytest.approx(p1[3])
    assert kn.prob([1], 1) == pytest.approx(2.0 / 5 / 6)


def test_kneser_ney_distributions_sum_to_one():
    rng = np.random.default_rng(0)
    V = 30
    sents = [rng.integers(1, V, rng.integers(1, 12)) for _ in range(300)]
    sents = [np.concatenate([np.where(rng.random(len(s)) < 0.5, s % 7 + 1, s), [0]])
             for s in sents]  # skewed, so that counts of 1, 2, 3, 4+ all occur
    x, y = windows(sents, 4)
    kn = KneserNey(x, y, vocab=V)
    for k in range(1, 6):
        d = kn.discounts[k]
        assert 0 < d[0] <= 1 and 0 <= d[1] <= 2 and 0 <= d[2] <= 3
    contexts = [x[5], x[17], x[0], [0, 0, 0, 0], [3, 3, 3, 3], [29, 28, 27, 26],
                [0, 0, 4, 5]]
    for c in contexts:
        p = kn.distribution(c)
        assert p.min() > 0
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(kn.probs(x[:50], y[:50]),
                               [kn.prob(c, w) for c, w in zip(x[:50], y[:50])])


def test_perplexity_and_interpolation():
    assert perplexity(np.full(10, 0.25)) == pytest.approx(4.0)
    pa = np.array([0.5, 0.01, 0.4, 0.02])
    pb = np.array([0.01, 0.5, 0.02, 0.4])
    lam, ppl = best_interpolation(pa, pb)
    assert lam == pytest.approx(0.5, abs=1e-3)
    assert ppl < min(perplexity(pa), perplexity(pb))
    assert ppl == pytest.approx(perplexity(0.5 * pa + 0.5 * pb))


# -- embedding layer and the neural LM ---------------------------------------------------------
def test_embedding_forward_backward_against_numpy():
    rng = np.random.default_rng(1)
    V, d, ctx, B = 11, 5, 3, 7
    layer = Embedding(V, d, ctx)
    params = rng.standard_normal(V * d).astype(np.float32)
    grads = np.full(V * d, 9.0, np.float32)
    layer.bind(params, grads)
    x = rng.integers(0, V, (B, ctx)).astype(np.int32)
    x[0] = [4, 4, 4]  # duplicates
    y = layer.forward(x)
    E = params.reshape(V, d)
    np.testing.assert_array_equal(y, E[x].reshape(B, ctx * d))
    dy = rng.standard_normal((B, ctx * d)).astype(np.float32)
    layer.backward(dy.copy())
    want = np.zeros((V, d), np.float32)
    ref.embedding_scatter_add(dy.reshape(-1, d), x.ravel().astype(np.int64), want)
    np.testing.assert_allclose(grads.reshape(V, d), want, rtol=1e-6)
    layer.backward(dy.copy(), accumulate=True)
    np.testing.assert_allclose(grads.reshape(V, d), 2 * want, rtol=1e-6)
    # sparse: nothing written densely, rows = the touched ones with the same sums
    layer.sparse = True
    grads[:] = 7.0
    layer.forward(x)
    layer.backward(dy.copy())
    layer.forward(x[:3])
    layer.backward(dy[:3].copy(), accumulate=True)
    rows, g = layer.take_rows()
    assert (grads == 7.0).all()
    both = np.concatenate([x.ravel(), x[:3].ravel()]).astype(np.int64)
    np.testing.assert_array_equal(rows, np.unique(both))
    want = np.zeros((V, d), np.float32)
    ref.embedding_scatter_add(np.concatenate([dy, dy[:3]]).reshape(-1, d), both, want)
    np.testing.assert_allclose(g, want[rows], rtol=1e-5)
    assert layer.take_rows()[0].size == 0


def _lm(V=13, ctx=3, d=4, hidden=6, seed=0):
    model = Model.from_spec((ctx,), [{"type": "embedding", "dim": d},
                                     {"type": "dense", "units": hidden, "activation": "tanh"}],
                            V)
    model.init_params(seed)
    return model


def test_neural_lm_gradient_finite_differences():
    V, ctx = 13, 3
    model = _lm(V, ctx)
    assert model.num_params == V * 4 + (ctx * 4 * 6 + 6) + (6 * V + V)
    rng = np.random.default_rng(2)
    x = rng.integers(0, V, (9, ctx)).astype(np.int32)
    y = rng.integers(0, V, 9)
    model.params[:] = model.params.astype(np.float64).astype(np.float32)
    base = model.params.copy()
    model.forward_backward(x, y)
    g = model.grads.copy()
    E_used = np.unique(x) * 4  # first element of each used embedding row
    idx = list(E_used[:4] + 1) + [V * 4 + 3, model.num_params - 2, 1 * 4 + 2]
    p64 = base.astype(np.float64)
    for i in idx:
        def loss_at(v):
            model.params[:] = p64
            model.params[i] = v
            logits = model.forward(x).astype(np.float64)
            m = logits.max(1, keepdims=True)
            lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
            return float(np.mean(lse - logits[np.arange(len(y)), y]))
        h = 1e-2
        fd = (loss_at(p64[i] + h) - loss_at(p64[i] - h)) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=2e-2, abs=2e-4), i
    unused = sorted(set(range(V)) - set(np.unique(x).tolist()))
    assert all((g[r * 4:(r + 1) * 4] == 0).all() for r in unused)


def test_neural_lm_evaluate_gives_perplexity():
    V = 13
    model = _lm(V)
    x = np.random.default_rng(3).integers(0, V, (20, 3)).astype(np.int32)
    y = np.arange(20) % V
    loss, _ = model.evaluate(x, y)
    logits = model.forward(x).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert math.exp(loss) == pytest.approx(perplexity(p[np.arange(20), y]), rel=1e-5)


def test_embedding_config_errors():
    base = {"model": {"layers": [{"type": "dense", "units": 8},
                                 {"type": "embedding", "dim": 4}]}}
    with pytest.raises(ConfigError, match=r"layers\[1\] is an embedding layer: it must be the "
                                          "first"):
        from_dict(base)
    with pytest.raises(ConfigError, match=r"layers\[0\]\.dim must be a positive integer"):
        from_dict({"model": {"layers": [{"type": "embedding", "dim": 0}]}})
    with pytest.raises(ConfigError, match="topology.partitions must be 1 with an embedding"):
        from_dict({"topology": {"partitions": 2},
                   "model": {"layers": [{"type": "embedding", "dim": 4}]}})
    cfg = from_dict({"model": {"layers": [{"type": "embedding", "dim": 4, "vocab": 50}]},
                     "downpour": {"sparse": True}})
    assert cfg.downpour.sparse
    with pytest.raises(ConfigError, match="must come first and take word ids"):
        Model.from_spec((28, 28), [{"type": "embedding", "dim": 4}], 10)
