"""``python -m dbmpi plot``: one run's learning curve, and several runs' accuracy against wall
time in one figure (the paper's Figure 4)."""

from __future__ import annotations

import json
from pathlib import Path

from dbmpi.__main__ import main as dbmpi_main
from dbmpi.report import run_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, algorithm: str, replicas: int, optimizer: str,
             accs: list[float]) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.toml").write_text(
        f'algorithm = "{algorithm}"\n[topology]\nshards = 1\nreplicas = {replicas}\n'
        f'[optimizer]\nname = "{optimizer}"\n[run]\nname = "{name}"\n')
    recs = [{"kind": "eval", "time": 5.0 * i, "step": 100 * i, "loss": 2.0 - a,
             "accuracy": a, "wall_s": 5.0 * i + 1} for i, a in enumerate(accs)]
    recs += [{"kind": "train", "time": 5.0 * i, "replica": 0, "step": 100 * i,
              "loss": 1.0 / (i + 1), "accuracy": 0.5, "epoch": 0.1 * i, "samples_per_s": 1000.0}
             for i in range(1, 4)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_run_labels_in_the_papers_style(tmp_path):
    assert run_label(fake_run(tmp_path, "a", "downpour", 1, "sgd", [0.1])) == "SGD [1]"
    assert run_label(fake_run(tmp_path, "b", "downpour", 2, "sgd", [0.1])) == "Downpour SGD [2]"
    assert run_label(fake_run(tmp_path, "c", "downpour", 2, "adagrad", [0.1])) == \
        "Downpour SGD w/ Adagrad [2]"
    assert run_label(fake_run(tmp_path, "d", "sandblaster", 2, "adagrad", [0.1])) == \
        "Sandblaster L-BFGS [2]"
    assert run_label(tmp_path / "missing") == "missing"


def test_plot_several_runs_in_one_figure(tmp_path, capsys):
    a = fake_run(tmp_path, "sgd", "downpour", 1, "sgd", [0.1, 0.4, 0.6, 0.7])
    b = fake_run(tmp_path, "dp", "downpour", 2, "adagrad", [0.1, 0.6, 0.75, 0.8])
    out = tmp_path / "fig" / "tta.png"
    assert dbmpi_main(["plot", str(a), str(b), "--out", str(out), "--target", "0.7"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    assert "SGD [1]: accuracy best 0.7000" in text and "reached 0.7 at 16.0 s" in text
    assert "Downpour SGD w/ Adagrad [2]" in text and "reached 0.7 at 11.0 s" in text
    assert dbmpi_main(["plot", str(a), str(b), "--out", str(out), "--metric", "loss"]) == 0
    # a directory that is not a finished run: one line naming it
    assert dbmpi_main(["plot", str(a), str(tmp_path / "nope"), "--out", str(out)]) != 0
    assert "nope" in capsys.readouterr().err


def test_plot_one_run_redraws_its_learning_curve(tmp_path, capsys):
    a = fake_run(tmp_path, "one", "downpour", 1, "sgd", [0.1, 0.5])
    assert dbmpi_main(["plot", str(a)]) == 0
    assert (a / "learning_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip().endswith("learning_curve.png")
