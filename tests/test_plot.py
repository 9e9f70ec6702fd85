"""``python -m dbmpi plot``: one run's learning curve, and several runs' accuracy against wall
time in one figure (the paper's Figure 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbmpi.__main__ import main as dbmpi_main
from dbmpi.report import fitted_limits, learning_curve_figure, plot_learning_curve, run_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, algorithm: str, replicas: int, optimizer: str,
             accs: list[float], recon: bool = False) -> Path:
    """A run directory with ``eval`` records (loss = 2 - accuracy, at wall_s 1, 6, 11, ...)
    and three ``train`` records per replica: replica r at step 100 i has loss (r + 1) / (i + 1)
    and (r + 1) * 1000 samples/s, written at time 5 i + r / 10."""
    d = root / name
    d.mkdir()
    (d / "config.toml").write_text(
        f'algorithm = "{algorithm}"\n[topology]\nshards = 1\nreplicas = {replicas}\n'
        f'[optimizer]\nname = "{optimizer}"\n[run]\nname = "{name}"\n')
    recs = [{"kind": "eval", "time": 5.0 * i, "step": 100 * i, "loss": 2.0 - a,
             "accuracy": a, "wall_s": 5.0 * i + 1} for i, a in enumerate(accs)]
    if recon:  # an autoencoder's eval records carry its objective's terms
        for r in recs:
            r.update(reconstruction=r["loss"] / 10, sparsity=0.01)
    recs += [{"kind": "train", "time": 5.0 * i + rep / 10, "replica": rep, "step": 100 * i,
              "loss": (rep + 1) / (i + 1), "accuracy": 0.5, "epoch": 0.1 * i,
              "samples_per_s": 1000.0 * (rep + 1)}
             for i in range(1, 4) for rep in range(replicas)]
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


def panels(fig):
    """The learning curve's three panels: (metric, losses, throughput)."""
    assert len(fig.axes) == 3
    return fig.axes


def test_learning_curve_panels(tmp_path):
    import matplotlib.pyplot as plt

    accs = [0.1, 0.85, 0.88, 0.9]
    d = fake_run(tmp_path, "two", "downpour", 2, "adagrad", accs)
    fig, table = learning_curve_figure([d])
    try:
        ax_m, ax_l, ax_t = panels(fig)
        # accuracy on a fitted axis, not 0-1: lowest after the first evaluation 0.85, best
        # 0.9, padding max(0.08 * 0.05, 0.005) = 0.005 below and half of it above
        assert ax_m.get_ylim() == pytest.approx((0.845, 0.9025))
        assert [list(ln.get_ydata()) for ln in ax_m.lines] == [accs]
        # test and training loss together
        lines = {ln.get_label(): ln for ln in ax_l.lines}
        assert set(lines) == {"test loss", "training loss (mean of 2 replicas)"}
        assert list(lines["test loss"].get_xdata()) == [1.0, 6.0, 11.0, 16.0]
        assert list(lines["test loss"].get_ydata()) == pytest.approx([2 - a for a in accs])
        train = lines["training loss (mean of 2 replicas)"]
        # replica 0: 1/(i+1), replica 1: 2/(i+1), mean 1.5/(i+1) at time 5 i + 0.05
        assert list(train.get_ydata()) == pytest.approx([1.5 / 2, 1.5 / 3, 1.5 / 4])
        assert list(train.get_xdata()) == pytest.approx([5.05, 10.05, 15.05])
        # each replica's throughput
        assert sorted(ln.get_label() for ln in ax_t.lines) == ["replica 0", "replica 1"]
        assert sorted(ln.get_ydata()[0] for ln in ax_t.lines) == [1000.0, 2000.0]
        # one clock for all three panels
        for ax in (ax_l, ax_t):
            assert ax_m.get_shared_x_axes().joined(ax_m, ax)
        assert ax_t.get_xlabel() == "wall time (s)"
        assert table == ["Downpour SGD w/ Adagrad [2]: accuracy best 0.9000, last 0.9000 at "
                         "16.0 s"]
    finally:
        plt.close(fig)
    out = plot_learning_curve(d)
    assert out == d / "learning_curve.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_fitted_limits_hand_values():
    # lowest after the first value 0.5, best 0.7: pad 0.08 * 0.2 = 0.016
    assert fitted_limits([[0.1, 0.5, 0.7]]) == pytest.approx((0.484, 0.708))
    # a target below what is shown stays in view; never below 0
    assert fitted_limits([[0.1, 0.5, 0.7]], target=0.3)[0] == pytest.approx(0.3 - 0.032)
    assert fitted_limits([[0.0, 0.001]])[0] == 0.0


def test_overlay_has_one_line_per_run_in_every_panel(tmp_path):
    import matplotlib.pyplot as plt

    a = fake_run(tmp_path, "a", "downpour", 1, "sgd", [0.1, 0.5, 0.6])
    b = fake_run(tmp_path, "b", "downpour", 2, "adagrad", [0.1, 0.7, 0.8])
    fig, _ = learning_curve_figure([a, b], target=0.55)
    try:
        ax_m, ax_l, ax_t = panels(fig)
        runs = [ln for ln in ax_m.lines if ln.get_label() in ("SGD [1]",
                                                             "Downpour SGD w/ Adagrad [2]")]
        assert len(runs) == 2
        assert sorted(ln.get_label() for ln in ax_l.lines) == [
            "Downpour SGD w/ Adagrad [2]: test",
            "Downpour SGD w/ Adagrad [2]: training (mean of 2 replicas)",
            "SGD [1]: test", "SGD [1]: training"]
        # per run the mean per-replica throughput: 1000 for a, (1000 + 2000) / 2 for b
        assert sorted(ln.get_label() for ln in ax_t.lines) == ["Downpour SGD w/ Adagrad [2]",
                                                              "SGD [1]"]
        assert sorted(ln.get_ydata()[0] for ln in ax_t.lines) == [1000.0, 1500.0]
        lo, hi = ax_m.get_ylim()
        assert lo < 0.5 and 0.8 < hi < 0.85  # both runs and the target in view
    finally:
        plt.close(fig)


def test_autoencoder_curve_keeps_the_reconstruction(tmp_path):
    import matplotlib.pyplot as plt

    d = fake_run(tmp_path, "ae", "downpour", 1, "adagrad", [0.1, 0.5, 0.6], recon=True)
    fig, table = learning_curve_figure([d])
    try:
        ax_m = panels(fig)[0]
        assert ax_m.get_ylabel() == "test reconstruction" and ax_m.get_yscale() == "log"
        assert list(ax_m.lines[0].get_ydata()) == pytest.approx([0.19, 0.15, 0.14])
        assert table[0].startswith("SGD w/ Adagrad [1]: reconstruction best 0.1400")
    finally:
        plt.close(fig)


def test_training_loss_mean_lines_up_steps_not_records():
    from dbmpi.report import _replica_mean

    # a warm start: replica 0 alone for steps 100 and 200, then both
    def rec(rep, step, t, loss):
        return {"replica": rep, "step": step, "time": t, "loss": loss}

    series = {0: [rec(0, 100, 1.0, 2.0), rec(0, 200, 2.0, 1.0), rec(0, 300, 3.0, 0.8)],
              1: [rec(1, 300, 3.5, 0.6)]}
    t, y = _replica_mean(series, "loss")
    assert t == pytest.approx([1.0, 2.0, 3.25]) and y == pytest.approx([2.0, 1.0, 0.7])
