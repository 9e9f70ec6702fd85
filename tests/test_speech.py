"""Speech features, frame labels, and ``python -m data_tools shard speech`` on WAV files that
the test writes itself; the optional ``groups`` dataset of the shard format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io.wavfile

from data_tools.__main__ import main as data_tools_main
from data_tools.shards import build_manifest, write_split
from data_tools.speech import (
    FbankSettings,
    context_windows,
    frame_labels,
    frames,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    parse_index_ranges,
    read_wav,
    speech_span,
    word_list,
)
from dbmpi.data import DataError, open_dataset
from dbmpi.data.schema import checksum_arrays

SR = 8000
#: Each synthetic "word" is a tone (two partials) with a pitch glide, so its three states differ.
WORD_HZ = {"zero": 300.0, "one": 900.0, "two": 2000.0}


def synth_utterance(word: str, speaker: int, index: int, sr: int = SR) -> np.ndarray:
    """Silence (faint noise), a ~0.3 s gliding tone for ``word``, silence; int16."""
    rng = np.random.default_rng([speaker, index, len(word)])
    lead, tail = int(sr * rng.uniform(0.1, 0.2)), int(sr * rng.uniform(0.1, 0.2))
    n = int(sr * rng.uniform(0.25, 0.35))
    t = np.arange(n) / sr
    f0 = WORD_HZ[word] * (1 + 0.03 * speaker)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.5 * t / t[-1])) / sr
    tone = (np.sin(phase) + 0.3 * np.sin(2 * phase)) * np.hanning(n) ** 0.25
    x = np.concatenate([np.zeros(lead), 0.5 * tone, np.zeros(tail)])
    x += 1e-4 * rng.standard_normal(x.size)
    return np.round(x * 32767).astype(np.int16)


def write_corpus(root: Path, speakers: int = 2, indices: int = 6, sr: int = SR) -> Path:
    """``{word}_{speaker}_{index}.wav`` for every word, speaker and index; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    for word in WORD_HZ:
        for s in range(speakers):
            for i in range(indices):
                scipy.io.wavfile.write(root / f"{word}_spk{s}_{i}.wav", sr,
                                       synth_utterance(word, s, i, sr))
    return root


# -- mel scale and filterbank ------------------------------------------------------------------
def test_mel_scale_formula():
    assert hz_to_mel(0.0) == 0.0
    assert hz_to_mel(700.0) == pytest.approx(2595 * math.log10(2))  # 781.17
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.05)  # the scale's anchor
    f = np.array([0.0, 123.0, 1000.0, 4000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-9)


def test_mel_filterbank_one_filter_by_hand():
    # one filter from 0 Hz to 4 kHz: its centre is the mel midpoint, where (1 + f/700) is the
    # geometric mean of 1 and 1 + 4000/700: f = 700 (sqrt(47/7) - 1) = 1113.8 Hz.
    fb = mel_filterbank(1, n_fft=8, sample_rate=8000)
    c = 700 * (math.sqrt(47 / 7) - 1)
    assert c == pytest.approx(1113.84, abs=0.01)
    # bins at 0, 1000, 2000, 3000, 4000 Hz: rising edge f / c, falling edge (4000 - f) / (4000 - c)
    want = [0.0, 1000 / c, 2000 / (4000 - c), 1000 / (4000 - c), 0.0]
    np.testing.assert_allclose(fb[0], want, rtol=1e-12)


def test_mel_filterbank_40_filters_sum_to_one_between_centres():
    s = FbankSettings()
    assert (s.frame_len, s.hop, s.n_fft) == (200, 80, 256)
    fb = mel_filterbank(40, 256, 8000)
    assert fb.shape == (40, 129)
    assert (fb >= 0).all() and (fb <= 1).all()
    assert ((fb > 0).sum(axis=1) >= 2).all()  # no empty filter at the low end
    freqs = np.arange(129) * 8000 / 256
    edges = mel_to_hz(np.linspace(0, hz_to_mel(4000), 42))
    inside = (freqs >= edges[1]) & (freqs <= edges[-2])
    np.testing.assert_allclose(fb.sum(axis=0)[inside], 1.0, atol=1e-12)
    # filters are ordered: their peaks move up in frequency
    assert (np.diff(fb.argmax(axis=1)) >= 0).all()


# -- frames and features -----------------------------------------------------------------------
def test_frame_count_window_and_short_signal():
    s = FbankSettings()
    fr = frames(np.ones(1000), s)
    assert fr.shape == (1 + (1000 - 200) // 80, 200)
    # a constant signal: pre-emphasis leaves 0.03 after the first sample, and the mean removal
    # takes that away: frames are (near) zero apart from the first one
    assert np.abs(fr[1:]).max() < 1e-12
    assert frames(np.ones(50), s).shape == (1, 200)


def test_log_mel_tone_peaks_in_the_filter_around_it():
    s = FbankSettings()
    t = np.arange(4000) / 8000
    mel, energy = log_mel(np.sin(2 * np.pi * 1000 * t), s)
    assert mel.shape == (1 + (4000 - 200) // 80, 40) and energy.shape == (mel.shape[0],)
    fb = mel_filterbank(40, 256, 8000)
    best = fb[:, 1000 * 256 // 8000].argmax()  # the filter with the most weight at 1 kHz
    assert (mel.argmax(axis=1) == best).all()
    # power: a unit sine has mean square 1/2, the Hamming window's mean square is 0.397, and
    # pre-emphasis 1 - 0.97 z^-1 has power gain 1 + 0.97^2 - 2 * 0.97 cos(pi / 4) at 1 kHz
    gain = 1 + 0.97**2 - 2 * 0.97 * math.cos(math.pi / 4)
    assert energy.mean() == pytest.approx(10 * np.log10(200 * 0.5 * 0.3974 * gain), abs=0.1)


def test_speech_span_labels_and_context_windows():
    e = np.array([-80, -79, -20, -5, -10, -50, -30, -90], float)
    assert speech_span(e, 30.0) == (2, 6)  # -50 inside the span stays speech
    y = frame_labels(10, (2, 7), word=1, states=3)
    # word 1, 3 states: classes 4, 5, 6; 6 speech frames cut into thirds
    np.testing.assert_array_equal(y, [0, 0, 4, 4, 5, 5, 6, 6, 0, 0])
    np.testing.assert_array_equal(frame_labels(4, (0, 3), word=0, states=3), [1, 1, 2, 3])
    f = np.arange(12, dtype=float).reshape(4, 3)  # 4 frames of 3 features
    w = context_windows(f, 1)
    assert w.shape == (4, 9)
    np.testing.assert_array_equal(w[0], [0, 1, 2, 0, 1, 2, 3, 4, 5])  # edge frame repeated
    np.testing.assert_array_equal(w[2], [3, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(w[3], [6, 7, 8, 9, 10, 11, 9, 10, 11])


def test_parse_index_ranges():
    assert parse_index_ranges("0-4") == {0, 1, 2, 3, 4}
    assert parse_index_ranges("0-1,7, 9-10") == {0, 1, 7, 9, 10}
    with pytest.raises(ValueError):
        parse_index_ranges("a-b")


def test_read_wav_resamples_and_scales(tmp_path):
    x8 = synth_utterance("one", 0, 0, 8000)
    x16 = synth_utterance("one", 0, 0, 16000)
    scipy.io.wavfile.write(tmp_path / "a.wav", 16000, np.stack([x16, x16], axis=1))  # stereo
    y = read_wav(tmp_path / "a.wav", 8000)
    assert abs(y.size - x16.size // 2) <= 1 and np.abs(y).max() <= 1.0
    assert abs(y.size - x8.size) < 0.05 * x8.size
    (tmp_path / "bad.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(DataError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav", 8000)


# -- the shard tool, end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech")
    src = write_corpus(root / "wav")
    out = root / "shards"
    assert data_tools_main(["shard", "speech", "--src", str(src), "--out", str(out),
                            "--shards", "2", "--test-index", "0-1"]) == 0
    return out


def test_shard_speech_writes_the_common_format(speech_data):
    ds = open_dataset(speech_data, verify=True)  # checksums cover the groups too
    assert ds.feature_shape == (440,) and ds.feature_dtype == np.float32
    assert ds.num_classes == 1 + 3 * 3
    # words in sorted order (numeric order when all are numbers, as FSDD's digits)
    assert ds.class_names == ["sil", "one/0", "one/1", "one/2", "two/0", "two/1", "two/2",
                              "zero/0", "zero/1", "zero/2"]
    assert word_list(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert len(ds.splits["train"]) == 2 and len(ds.splits["test"]) == 1
    info = json.loads((speech_data / "speech.json").read_text())
    utts = info["splits"]["test"]
    assert len(utts) == 3 * 2 * 2 and len(info["splits"]["train"]) == 3 * 2 * 4
    assert sum(u["frames"] for u in utts) == ds.num_examples("test")
    assert "global mean/variance" in ds.manifest["normalization"]
    assert "shard speech" in ds.manifest["command"]


def test_shard_speech_labels_follow_words_and_silence(speech_data):
    ds = open_dataset(speech_data)
    x, y, g = ds.load("test", with_groups=True)
    info = json.loads((speech_data / "speech.json").read_text())
    words = info["labels"]["words"]
    assert words == ["one", "two", "zero"]
    o = 0
    for u in info["splits"]["test"]:
        n = u["frames"]
        gu, yu = g[o:o + n], y[o:o + n]
        assert (gu == u["group"]).all()  # test keeps recording order
        a, b = u["speech"]
        w = words.index(u["word"])
        # silence outside the speech span, the word's 3 states in order inside it
        assert (yu[:a] == 0).all() and (yu[b + 1:] == 0).all()
        np.testing.assert_array_equal(np.unique(yu[a:b + 1]), 1 + 3 * w + np.arange(3))
        assert (np.diff(yu[a:b + 1]) >= 0).all()
        # the synthetic tone starts 0.1-0.2 s in: 10-20 frames of silence, about
        assert 5 <= a <= 22
        o += n
    # train frames are shuffled over the shards but keep their groups
    xt, _yt, gt = ds.load("train", with_groups=True)
    assert len(np.unique(gt)) == 3 * 2 * 4
    # global normalisation: the centre frame of the train windows is standardised
    centre = xt[:, 5 * 40:6 * 40]
    np.testing.assert_allclose(centre.mean(axis=0), 0, atol=0.05)
    np.testing.assert_allclose(centre.std(axis=0), 1, atol=0.05)
    assert np.isfinite(x).all()


def test_shard_speech_norm_options_and_bad_input(tmp_path):
    src = write_corpus(tmp_path / "wav", speakers=2, indices=3)
    out = tmp_path / "spk"
    assert data_tools_main(["shard", "speech", "--src", str(src), "--out", str(out),
                            "--shards", "1", "--test-index", "0", "--norm", "speaker",
                            "--states", "2", "--context", "2"]) == 0
    ds = open_dataset(out)
    assert ds.feature_shape == (5 * 40,) and ds.num_classes == 1 + 3 * 2
    info = json.loads((out / "speech.json").read_text())
    assert sorted(info["norm_stats"]) == ["spk0", "spk1"]
    (src / "README.wav").write_bytes(b"")  # not WORD_SPEAKER_INDEX.wav
    assert data_tools_main(["shard", "speech", "--src", str(src), "--out",
                            str(tmp_path / "x")]) == 2
    assert data_tools_main(["shard", "speech", "--src", str(tmp_path / "none"), "--out",
                            str(tmp_path / "y")]) == 2


# -- optional groups in the shard format -------------------------------------------------------
def test_groups_are_optional_and_checksummed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = rng.integers(0, 3, 50).astype(np.int32)
    g = np.repeat(np.arange(10, dtype=np.int32), 5)
    common = {"num_classes": 3, "source": "test", "seed": None}
    write_split(tmp_path / "plain", "test", x, y, num_shards=2, **common)
    write_split(tmp_path / "plain", "train", x, y, num_shards=2, **{**common, "seed": 1})
    build_manifest(tmp_path / "plain", verify=True)
    write_split(tmp_path / "grp", "test", x, y, num_shards=2, groups=g, **common)
    write_split(tmp_path / "grp", "train", x, y, num_shards=2, groups=g, **{**common, "seed": 1})
    build_manifest(tmp_path / "grp", verify=True)

    plain = open_dataset(tmp_path / "plain", verify=True)
    _xp, yp = plain.load("test")  # shards without groups read as before
    np.testing.assert_array_equal(yp, y)
    with pytest.raises(DataError, match="groups"):
        plain.load("test", with_groups=True)
    grp = open_dataset(tmp_path / "grp", verify=True)
    _xg, _yg, gg = grp.load("test", with_groups=True)
    np.testing.assert_array_equal(gg, g)
    np.testing.assert_array_equal(grp.load("test", limit=7, with_groups=True)[2], g[:7])
    _, ytr, gtr = grp.load("train", with_groups=True)  # shuffled rows keep their group
    pairs = set(zip(gtr.tolist(), ytr.tolist()))
    assert pairs == set(zip(g.tolist(), y.tolist()))
    # the checksum covers groups, and without groups it is the v1 checksum
    assert checksum_arrays(x, y) != checksum_arrays(x, y, groups=g)
    with h5py.File(tmp_path / "plain" / "test-00000-of-00002.h5", "r") as f:
        assert f.attrs["checksum"] == checksum_arrays(x[:25], y[:25])
    # a changed group is caught by --verify
    p = tmp_path / "grp" / "test-00001-of-00002.h5"
    with h5py.File(p, "r+") as f:
        f["groups"][0] = 99
    with pytest.raises(DataError, match="checksum"):
        open_dataset(tmp_path / "grp", verify=True)
    # and a groups dataset of the wrong shape is named
    with h5py.File(p, "r+") as f:
        del f["groups"]
        f.create_dataset("groups", data=np.zeros(3, np.int32))
    with pytest.raises(DataError, match="groups"):
        open_dataset(tmp_path / "grp")
