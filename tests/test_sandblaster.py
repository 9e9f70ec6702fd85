"""Whole Sandblaster L-BFGS jobs under mpiexec against a serial numpy L-BFGS written here.

The reference below is independent of dbmpi.optim.lbfgs: its own MLP, its own two-loop
recursion and line searches, following the algorithm as documented there (same history size,
same line search and constants). The job must reproduce its iterates to 1e-6 (relative) over
30 iterations for every S, R in 1..3, with and without a straggler and backup tasks.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
from conftest import error_lines, run_job

from dbmpi.checkpoint import load_params
from dbmpi.data import open_dataset
from dbmpi.model import Model
from dbmpi.ps import ParamLayout

HIDDEN = 8
N_TRAIN = 400
PORTION = 40
ITERS = 30
HISTORY = 5
L2 = 1e-3
SEED = 3
C1, C2 = 1e-4, 0.9


# -- the serial reference --------------------------------------------------------------------
def _mlp_loss_grad(p, x, y):
    """Mean softmax cross-entropy of a 784-HIDDEN tanh-10 MLP + L2, and its gradient."""
    n_in = x.shape[1]
    k = [n_in * HIDDEN, HIDDEN, HIDDEN * 10, 10]
    o = np.cumsum([0] + k)
    W1, b1 = p[o[0]:o[1]].reshape(n_in, HIDDEN), p[o[1]:o[2]]
    W2, b2 = p[o[2]:o[3]].reshape(HIDDEN, 10), p[o[3]:o[4]]
    h = np.tanh(x @ W1 + b1)
    z = h @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    n = len(y)
    loss = np.mean(lse - z[np.arange(n), y])
    dz = np.exp(z - lse[:, None])
    dz[np.arange(n), y] -= 1.0
    dz /= n
    gW2, gb2 = h.T @ dz, dz.sum(0)
    dh = (dz @ W2.T) * (1.0 - h * h)
    gW1, gb1 = x.T @ dh, dh.sum(0)
    g = np.concatenate([gW1.ravel(), gb1, gW2.ravel(), gb2])
    return loss + 0.5 * L2 * (p @ p), g + L2 * p


def _cubic(a, fa, ga, b, fb, gb):
    # minimiser of the cubic Hermite interpolant on [a, b] (Nocedal & Wright eq. 3.59)
    if a == b:
        return math.nan
    t1 = ga + gb - 3.0 * (fa - fb) / (a - b)
    r = t1 * t1 - ga * gb
    if r < 0:
        return math.nan
    t2 = math.sqrt(r) * (1.0 if b > a else -1.0)
    den = gb - ga + 2.0 * t2
    return math.nan if den == 0 else b - (b - a) * (gb + t2 - t1) / den


def _wolfe(phi, f0, g0, t, max_evals):
    """Strong Wolfe: returns (t, evaluated last?)."""
    n = 0
    ta, fa, ga = 0.0, f0, g0  # previous trial (the low end when bracketing starts)

    def zoom(lo, flo, glo, hi, fhi, ghi, n, last):
        while n < max_evals:
            c = _cubic(lo, flo, glo, hi, fhi, ghi)
            left, right = sorted((lo, hi))
            margin = 0.1 * (right - left)
            if not (np.isfinite(c) and left + margin <= c <= right - margin):
                c = (lo + hi) / 2
            fc, gc = phi(c)
            n += 1
            last = c
            if fc > f0 + C1 * c * g0 or fc >= flo:
                hi, fhi, ghi = c, fc, gc
                continue
            if abs(gc) <= -C2 * g0:
                return c, True
            if gc * (hi - lo) >= 0:
                hi, fhi, ghi = lo, flo, glo
            lo, flo, glo = c, fc, gc
        return lo, lo == last

    while n < max_evals:
        ft, gt = phi(t)
        n += 1
        if ft > f0 + C1 * t * g0 or (n > 1 and ft >= fa):
            return zoom(ta, fa, ga, t, ft, gt, n, t)
        if abs(gt) <= -C2 * g0:
            return t, True
        if gt >= 0:
            return zoom(t, ft, gt, ta, fa, ga, n, t)
        ta, fa, ga = t, ft, gt
        t *= 2.0
    return ta, True


def _armijo(phi, f0, g0, t, max_evals):
    for _ in range(max_evals):
        ft, _ = phi(t)
        if ft <= f0 + C1 * t * g0:
            return t, True
        q = -g0 * t * t / (2.0 * (ft - f0 - g0 * t))
        t = min(max(q, 0.1 * t), 0.5 * t)
    return 0.0, False


def reference_lbfgs(fg, x0, line_search, iters=ITERS, m=HISTORY, max_evals=20):
    """Iterates x_0 .. x_iters and losses of serial L-BFGS."""
    x = x0.copy()
    f, g = fg(x)
    pairs = []  # (s, y), oldest first
    xs, fs = [x.copy()], [f]
    for _ in range(iters):
        q = g.copy()
        coef = []
        for s, y in pairs[::-1]:
            a = (s @ q) / (s @ y)
            coef.append(a)
            q -= a * y
        if pairs:
            s, y = pairs[-1]
            q *= (s @ y) / (y @ y)
        for (s, y), a in zip(pairs, coef[::-1]):
            q += (a - (y @ q) / (s @ y)) * s
        d = -q
        if pairs and g @ d >= 0:
            pairs, d = [], -g
        t0 = 1.0 if pairs else min(1.0, 1.0 / np.linalg.norm(g))
        seen = {}

        def phi(t, x=x, d=d, seen=seen):
            ft, gt = fg(x + t * d)
            seen[t] = (ft, gt)
            return ft, gt @ d

        search = _wolfe if line_search == "wolfe" else _armijo
        t, _ = search(phi, f, g @ d, t0, max_evals)
        assert t > 0, "the reference line search failed"
        f_new, g_new = seen[t]
        s, y = t * d, g_new - g
        if s @ y > 1e-10 * (y @ y):
            pairs = (pairs + [(s, y)])[-m:]
        x, f, g = x + s, f_new, g_new
        xs.append(x.copy())
        fs.append(f)
    return np.array(xs), np.array(fs)


@pytest.fixture(scope="module")
def reference(small_data):
    ds = open_dataset(small_data)
    x, y = ds.load("train", limit=N_TRAIN)
    x = x.reshape(len(x), -1).astype(np.float64)
    model = Model.from_spec((28, 28), [{"type": "dense", "units": HIDDEN,
                                        "activation": "tanh"}], 10)
    x0 = model.init_params(SEED).astype(np.float64)
    out = {}

    def get(line_search):
        if line_search not in out:
            out[line_search] = reference_lbfgs(lambda p: _mlp_loss_grad(p, x, y), x0,
                                               line_search)
        return out[line_search]

    return get


# -- jobs ------------------------------------------------------------------------------------
def _config(tmp_path, data, shards, replicas, **sb):
    opts = {"iterations": ITERS, "history": HISTORY, "portion_size": PORTION,
            "train_limit": N_TRAIN, "push_every": 2, "l2": L2, "gtol": 0.0,
            "record_iterates": True, **sb}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())
    text = f"""algorithm = "sandblaster"
[topology]
shards = {shards}
replicas = {replicas}
[model]
layers = [{{type = "dense", units = {HIDDEN}, activation = "tanh"}}]
[data]
path = "{data}"
[sandblaster]
{lines}
[run]
dir = "{tmp_path / 'run'}"
seed = {SEED}
"""
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def _run(tmp_path, small_data, shards, replicas, **sb):
    cfg = _config(tmp_path, small_data, shards, replicas, **sb)
    proc = run_job(1 + shards + replicas, ["train", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    iterates = None
    if (run / "iterates.h5").exists():
        with h5py.File(run / "iterates.h5", "r") as f:
            iterates = f["iterates"][...]
    return run, recs, iterates


def _assert_matches(iterates, recs, ref):
    xs, fs = ref
    assert iterates.shape == xs.shape, (iterates.shape, xs.shape)
    err = np.linalg.norm(iterates - xs, axis=1) / np.linalg.norm(xs, axis=1)
    assert err.max() < 1e-6, f"iterate error per iteration: {err}"
    losses = np.array([r["loss"] for r in recs if r["kind"] == "lbfgs"])
    np.testing.assert_allclose(losses, fs, rtol=1e-6)
    assert fs[-1] < 0.7 * fs[0]  # the problem is not trivial: training moved the loss


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.job
def test_iterates_equal_serial_numpy_lbfgs(tmp_path, small_data, reference, shards, replicas):
    run, recs, iterates = _run(tmp_path, small_data, shards, replicas)
    _assert_matches(iterates, recs, reference("wolfe"))
    model = Model.from_spec((28, 28), [{"type": "dense", "units": HIDDEN}], 10)
    assert all(0 < e < 28 * 28 * HIDDEN for e in
               ParamLayout.even(model.num_params, shards).bounds[1:-1])
    params, _ = load_params(run / "params.h5")  # float32 copy of the last iterate
    np.testing.assert_allclose(params, iterates[-1], rtol=1e-5, atol=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "sandblaster" and summary["steps"] == ITERS
    assert 0 <= summary["final_test_accuracy"] <= 1
    batches = [r for r in recs if r["kind"] == "batch"]
    assert all(r["portions"] == N_TRAIN // PORTION for r in batches)
    assert all(sum(r["granted_by_replica"]) == r["portions"] for r in batches)


@pytest.mark.job
def test_armijo_line_search_matches(tmp_path, small_data, reference):
    _, recs, iterates = _run(tmp_path, small_data, 2, 2, line_search="armijo")
    _assert_matches(iterates, recs, reference("armijo"))


@pytest.mark.parametrize("backups", [True, False])
@pytest.mark.job
def test_straggler_and_backups_keep_every_portion_exactly_once(tmp_path, small_data,
                                                                reference, backups):
    """Replica 0 runs 20x slower: with backups its portions are recomputed elsewhere and the
    late copies discarded; either way every portion counts once and the iterates still equal
    the serial ones."""
    _, recs, iterates = _run(tmp_path, small_data, 2, 3, straggler_replica=0,
                             straggler_factor=20.0, push_every=3, backups=backups)
    _assert_matches(iterates, recs, reference("wolfe"))
    batches = [r for r in recs if r["kind"] == "batch"]
    backed = sum(r["backups"] for r in batches)
    discarded = sum(r["duplicates"] for r in batches)
    if backups:
        assert backed > 0 and discarded > 0
    else:
        assert backed == 0 and discarded == 0
    # load balancing: the straggler did the fewest portions that counted
    granted = np.sum([r["granted_by_replica"] for r in batches], axis=0)
    assert granted[0] < granted[1] and granted[0] < granted[2]


# -- pieces, serially ------------------------------------------------------------------------
def test_float64_model_matches_float32_model():
    from dbmpi.train.sandblaster import Dense64, Model64

    spec = [{"type": "dense", "units": 7, "activation": "tanh"},
            {"type": "dense", "units": 5, "activation": "relu"}]
    m32 = Model.from_spec((6,), spec, 4)
    m64 = Model64([Dense64(d.n_in, d.n_out, d.activation) for d in m32.layers])
    np.testing.assert_array_equal(m64.init_params(1), m32.init_params(1))
    assert m64.params.dtype == m64.grads.dtype == np.float64
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 6)).astype(np.float32), rng.integers(0, 4, 9)
    l32, c32 = m32.forward_backward(x, y)
    l64, c64 = m64.forward_backward(x, y)
    assert l64 == pytest.approx(l32, rel=1e-5) and c64 == c32
    np.testing.assert_allclose(m64.grads, m32.grads, rtol=1e-4, atol=1e-6)
    # float64 gradient against central differences
    p0 = m64.params.copy()
    g = m64.grads.copy()
    for i in rng.choice(m64.num_params, 10, replace=False):
        m64.params[:] = p0
        m64.params[i] += 1e-6
        up, _ = m64.forward_backward(x, y)
        m64.params[i] -= 2e-6
        down, _ = m64.forward_backward(x, y)
        assert (up - down) / 2e-6 == pytest.approx(g[i], rel=1e-5, abs=1e-9)


def test_batches_cover_each_epoch_once():
    from dbmpi.train.sandblaster import BatchPlan, portion_bounds

    plan = BatchPlan(103, 25, seed=4)  # 4 batches an epoch, 3 examples left out
    for epoch in range(2):
        rows = np.concatenate([plan.rows(epoch * 4 + j, lo, hi) for j in range(4)
                               for lo, hi in portion_bounds(25, 10)])
        assert len(rows) == 100 and len(set(rows.tolist())) == 100
    assert not np.array_equal(plan.rows(0, 0, 25), plan.rows(4, 0, 25))  # reshuffled
    assert BatchPlan(50, 0, 0).rows(7, 10, 20) == slice(10, 20)
    assert portion_bounds(25, 10) == [(0, 10), (10, 20), (20, 25)]


class _FakeComm:
    def __init__(self, on_send):
        self.on_send = on_send

    def Send(self, buf, dest, tag):
        self.on_send(dest, buf[0].copy())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("replicas,push_every", [(1, 1), (2, 2), (3, 3), (4, 2)])
@pytest.mark.parametrize("backups", [True, False])
def test_scheduler_counts_every_portion_once(seed, replicas, push_every, backups):
    """Random interleavings of replies and finished portions, replica 0 a straggler: every
    evaluation completes, and the pushes granted cover each portion exactly once."""
    from types import SimpleNamespace

    from dbmpi.train.sandblaster import REQUEST_HEAD, Decision, Dispatcher

    rng = np.random.default_rng(seed)
    R, n, size = replicas, 95, 10
    outbox = {r: [] for r in range(R)}
    topo = SimpleNamespace(cfg=SimpleNamespace(replicas=R), worker_rank=lambda r: 100 + r)
    sched = Dispatcher(_FakeComm(lambda dest, rep: outbox[dest - 100].append(rep)), topo,
                      size, push_every, backups)
    st = [{"busy": None, "pending": [], "eval": -1} for _ in range(R)]
    pushed = {}  # eval -> pushes per portion

    def request(r, finished):
        s = st[r]
        req = [s["eval"], finished, 1.0 * len(s["pending"]), 0, len(s["pending"])] + s["pending"]
        sched.handle(100 + r, np.array(req, np.float64))

    def deliver(r):
        decision, eval_id, _, portion, _, _ = outbox[r].pop(0)
        s = st[r]
        if decision == Decision.GRANT:
            counts = pushed.setdefault(s["eval"], np.zeros(10, int))
            counts[s["pending"]] += 1
        if decision != Decision.KEEP:
            s["pending"] = []
        if portion < 0:
            request(r, -1)
        else:
            s["busy"] = (int(eval_id), int(portion))

    def finish(r):
        s = st[r]
        eval_id, portion = s["busy"]
        s["busy"] = None
        if s["pending"] and s["eval"] != eval_id:
            s["pending"] = []
        s["eval"] = eval_id
        s["pending"].append(portion)
        request(r, portion)

    evals = 8
    for e in range(evals):
        sched.start_eval(0, n)
        if e == 0:
            for r in range(R):
                request(r, -1)
        steps = 0
        while not sched.complete:
            steps += 1
            assert steps < 10_000, "no progress: deadlock"
            ready = [r for r in range(R) if outbox[r]]
            busy = [r for r in range(R) if st[r]["busy"] is not None]
            assert ready or busy, "deadlock: nobody can move"
            if ready and (not busy or rng.random() < 0.5):
                deliver(int(rng.choice(ready)))
                continue
            w = np.array([0.05 if r == 0 and R > 1 else 1.0 for r in busy])
            finish(busy[int(rng.choice(len(busy), p=w / w.sum()))])
        stats = sched.stats
        assert stats.loss_sum == pytest.approx(10.0)  # each portion's loss once
        assert sum(stats.granted_by_replica) == 10
        if not backups:
            assert stats.backups == 0
        # deliver the replies still in flight: pushes they grant belong to this evaluation
        for r in range(R):
            while outbox[r] and outbox[r][0][0] == Decision.GRANT:
                deliver(r)
        np.testing.assert_array_equal(pushed[e], np.ones(10, int))
    assert REQUEST_HEAD == 5


@pytest.mark.parametrize("rank,label", [(0, "coordinator"), (1, "shard 0"), (3, "replica 0")])
@pytest.mark.job
def test_exception_on_one_rank_ends_the_job(tmp_path, small_data, rank, label):
    cfg = _config(tmp_path, small_data, 2, 2, iterations=1_000_000, record_iterates=False)
    proc = run_job(5, ["train", str(cfg)], env={"DBMPI_FAULT": f"{rank}:1.0"})
    assert proc.returncode != 0
    assert f"error on rank {rank} ({label}): InjectedFault" in proc.stderr


@pytest.mark.parametrize("override,field", [
    ("sandblaster.c2=0.00001", "sandblaster.c2"),
    ("sandblaster.line_search='exact'", "sandblaster.line_search"),
    ("sandblaster.straggler_replica=2", "sandblaster.straggler_replica"),
    ("sandblaster.portion_sise=10", "sandblaster.portion_sise"),
])
@pytest.mark.job
def test_bad_sandblaster_config_is_one_line_error(tmp_path, small_data, override, field):
    cfg = _config(tmp_path, small_data, 1, 2)
    proc = run_job(4, ["train", str(cfg), "--set", override])
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and field in lines[0], proc.stderr


@pytest.mark.job
def test_float32_replicas_and_mini_batches_train(tmp_path, small_data, reference):
    """The float32 path (the kernels' fast arithmetic; shards still in float64) follows the
    float64 reference closely at first; mini-batches (a new batch every iteration) train."""
    _, recs, _ = _run(tmp_path, small_data, 2, 2, dtype="float32", iterations=5,
                      record_iterates=False)
    losses = np.array([r["loss"] for r in recs if r["kind"] == "lbfgs"])
    np.testing.assert_allclose(losses, reference("wolfe")[1][:6], rtol=1e-4)
    (tmp_path / "mini").mkdir()
    _, recs, _ = _run(tmp_path / "mini", small_data, 1, 2, batch_size=400, train_limit=0,
                      iterations=12, record_iterates=False)
    lb = [r for r in recs if r["kind"] == "lbfgs"]
    assert [r["batch"] for r in lb] == [0, *range(12)]  # iteration k runs on batch k - 1
    assert all(r["line_search_evals"] >= 2 for r in lb[2:])  # a new batch is evaluated first
    assert all(b["examples"] == 400 for b in recs if b["kind"] == "batch")
    assert lb[-1]["loss"] < 0.8 * lb[0]["loss"]
