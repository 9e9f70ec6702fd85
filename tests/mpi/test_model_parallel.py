"""Model parallelism (dbmpi.model.parallel) at any number of ranks.

COMM_WORLD is cut into groups of P consecutive ranks (P = 1 .. size; ranks left over sit the
test out); each group runs one partitioned model and compares it with the single-rank Model on
the same parameters and batch. "Relative error" is max |partitioned - model| / max |model|
over a tensor (the logits, each layer's gradient), float32, bound 1e-5. Every check is made
on results gathered from all ranks, so every rank passes or fails together.
"""

import numpy as np
import pytest
from mpi4py import MPI

from dbmpi.model import Model
from dbmpi.model.parallel import PartitionedModel, PartitionError
from dbmpi.model.partition import PartitionPlan

comm = MPI.COMM_WORLD
size, rank = comm.Get_size(), comm.Get_rank()

DENSE = ((5, 7), [{"type": "dense", "units": 13, "activation": "relu"},
                  {"type": "dense", "units": 11, "activation": "sigmoid"},
                  {"type": "dense", "units": 9, "activation": "tanh"}], 6)
LOCAL = ((13, 10, 2), [{"type": "local", "filters": 3, "kernel": 3, "stride": 1,
                        "activation": "relu"},
                       {"type": "l2pool", "size": 2, "stride": 1},
                       {"type": "lcn", "size": 3},
                       {"type": "local", "filters": 4, "kernel": 3, "stride": 2},
                       {"type": "lcn", "size": 5},  # 4 rows: halos from several partitions
                       {"type": "dense", "units": 7, "activation": "relu"}], 5)
STACKS = {"dense": DENSE, "local": LOCAL}
UNEVEN = {1: (1,), 2: (1, 3), 3: (3, 1, 2), 4: (1, 2, 3, 4)}
TOL = 1e-5


def _group(P: int) -> MPI.Comm:
    """Consecutive groups of P ranks; COMM_NULL for the ranks left over."""
    n_groups = size // P
    color = rank // P if rank < n_groups * P else MPI.UNDEFINED
    return comm.Split(color, rank)


def _rel(a, b) -> float:
    scale = float(np.abs(b).max())
    return float(np.abs(np.asarray(a, np.float64) - b).max()) / (scale if scale else 1.0)


def _compare(stack: str, P: int, weights, batches: int = 2, split: str = "rows") -> dict:
    shape, layers, classes = STACKS[stack]
    sub = _group(P)
    if sub == MPI.COMM_NULL:
        return {}
    rng = np.random.default_rng(7)
    model = Model.from_spec(shape, layers, classes)
    model.init_params(11)
    model.params += rng.normal(0, 0.05, model.num_params).astype(np.float32)
    plan = PartitionPlan(shape, layers, classes, P, weights, split)
    pm = PartitionedModel(plan, sub)
    pm.set_model_params(model.params)
    errs = {"logits": 0.0, "loss": 0.0, "grads": 0.0}
    bytes_ok = True
    offs = plan.model_offsets()
    for step in range(batches):
        B = 6 + step  # a second, different batch size: new buffers, same plan
        x = rng.normal(size=(B, *shape)).astype(np.float32)
        y = rng.integers(0, classes, B)
        want_logits = model.forward(x).copy()
        errs["logits"] = max(errs["logits"], _rel(pm.forward(x), want_logits))
        pm.reset_stats()
        loss, correct = pm.forward_backward(x, y)
        bytes_ok &= pm.stats()["bytes_sent"] == plan.bytes_per_step(B)[pm.p]
        want_loss, want_correct = model.forward_backward(x, y)
        errs["loss"] = max(errs["loss"], abs(loss - want_loss) / abs(want_loss))
        assert correct == want_correct
        grads = plan.to_model(np.concatenate(sub.allgather(pm.grads)))
        for spec, off in zip(plan.specs, offs):
            n = spec.num_params()
            if n:
                errs["grads"] = max(errs["grads"], _rel(grads[off:off + n],
                                                        model.grads[off:off + n]))
    ev = pm.evaluate(x, y, batch=4)
    want_ev = model.evaluate(x, y, batch=4)
    errs["evaluate"] = abs(ev[0] - want_ev[0]) / want_ev[0] + abs(ev[1] - want_ev[1])
    errs["bytes_ok"] = bytes_ok
    pm.free()
    sub.Free()
    return errs


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("P", range(1, size + 1))
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_partitioned_equals_single_rank_model(stack, P, uneven):
    errs = comm.allgather(_compare(stack, P, UNEVEN[P] if uneven else None))
    for r, e in enumerate(errs):
        if not e:
            continue
        assert e["bytes_ok"], f"rank {r}: bytes sent differ from the plan"
        for key in ("logits", "loss", "grads", "evaluate"):
            assert e[key] <= TOL, f"rank {r}: {key} relative error {e[key]:.2e} > {TOL}"


@pytest.mark.parametrize("uneven", [False, True])
@pytest.mark.parametrize("P", range(1, size + 1))
def test_split_by_locations_equals_single_rank_model(P, uneven):
    """Locally connected layers cut by output locations (inside rows) instead of rows."""
    errs = comm.allgather(_compare("local", P, UNEVEN[P] if uneven else None,
                                   split="locations"))
    for r, e in enumerate(errs):
        if not e:
            continue
        assert e["bytes_ok"], f"rank {r}: bytes sent differ from the plan"
        for key in ("logits", "loss", "grads", "evaluate"):
            assert e[key] <= TOL, f"rank {r}: {key} relative error {e[key]:.2e} > {TOL}"


def test_location_split_cuts_inside_rows():
    """The plan's arithmetic (no MPI): even locations, partial rows, parameter maps."""
    shape, layers, classes = LOCAL
    for P in range(1, 5):
        plan = PartitionPlan(shape, layers, classes, P, split="locations")
        rows = PartitionPlan(shape, layers, classes, P, split="rows")
        assert plan.fingerprint != rows.fingerprint
        local0 = plan.parts[0]
        OH, OW, _ = local0[0].spec.out_shape
        counts = [p.units[1] - p.units[0] for p in local0]
        assert sum(counts) == OH * OW and max(counts) - min(counts) <= 1
        assert all(p.unit == "locations" for p in local0)
        assert all(p.unit == "rows" for p in plan.parts[1])  # l2pool stays by rows
        vec = np.arange(plan.num_params, dtype=np.float32)
        np.testing.assert_array_equal(plan.to_model(plan.from_model(vec)), vec)
        assert sorted(plan.from_model(vec).tolist()) == vec.tolist()
    plan = PartitionPlan(shape, layers, classes, 2, split="locations")
    assert "locations [0, 44), [44, 88)" in plan.describe()  # 11 x 8: row 5 is cut
    with pytest.raises(ValueError, match="split must be one of"):
        PartitionPlan(shape, layers, classes, 2, split="columns")


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_set_grads_and_accumulate_write_into_a_push_slot(stack):
    """Downpour points a partition's backward pass at its push slot, which still holds an old
    push (NaN here): every element must be overwritten, and with accumulate (n_push > 1) the
    second batch's gradient is added. Reference: the same partition's own gradients, batch by
    batch, summed in numpy."""
    shape, layers, classes = STACKS[stack]
    P = min(size, 2)
    sub = _group(P)
    errs = None
    if sub != MPI.COMM_NULL:
        rng = np.random.default_rng(5)
        pm = PartitionedModel(PartitionPlan(shape, layers, classes, P), sub)
        pm.init_params(3)
        batches = [(rng.normal(size=(5, *shape)).astype(np.float32),
                    rng.integers(0, classes, 5)) for _ in range(2)]
        want = []
        for x, y in batches:
            pm.forward_backward(x, y)
            want.append(pm.grads.copy())
        slot = np.full(pm.num_params, np.nan, np.float32)
        pm.set_grads(slot)
        pm.forward_backward(*batches[0])
        errs = [pm.grads is slot, _rel(slot, want[0])]
        if pm.can_accumulate:
            pm.forward_backward(*batches[1], accumulate=True)
            errs.append(_rel(slot, want[0].astype(np.float64) + want[1]))
        else:
            with pytest.raises(ValueError, match="cannot accumulate"):
                pm.forward_backward(*batches[1], accumulate=True)
        pm.free()
        sub.Free()
    for r, e in enumerate(comm.allgather(errs)):
        if e is not None:
            assert e[0], f"rank {r}: grads is not the slot"
            assert max(e[1:]) <= TOL, f"rank {r}: relative error {max(e[1:]):.2e}"
    if stack == "dense":
        assert errs is None or len(errs) == 3  # dense layers accumulate in place


def _pair_model(timeout_s: float) -> tuple[MPI.Comm, PartitionedModel | None]:
    sub = _group(2)
    if sub == MPI.COMM_NULL:
        return sub, None
    shape, layers, classes = DENSE
    plan = PartitionPlan(shape, layers, classes, 2)
    pm = PartitionedModel(plan, sub, timeout_s=timeout_s)
    pm.init_params(0)
    return sub, pm


def _batch():
    rng = np.random.default_rng(1)
    shape, _, classes = DENSE
    return rng.normal(size=(4, *shape)).astype(np.float32), rng.integers(0, classes, 4)


@pytest.mark.skipif(size < 2, reason="needs 2 ranks")
def test_missing_message_is_an_error_not_a_hang():
    """Partition 1 'forgets' its sends: both partitions raise at the deadline, naming the
    peer and the layer."""
    sub, pm = _pair_model(timeout_s=1.0)
    outcome = None
    if pm is not None:
        if pm.p == 1:
            start = pm.exchange.start
            pm.exchange.start = lambda layer, bw, sends, recvs: start(layer, bw, [], recvs)
        x, y = _batch()
        try:
            pm.forward_backward(x, y)
            outcome = "no error"
        except PartitionError as exc:
            outcome = str(exc)
        sub.Barrier()
        pm.free()
        sub.Free()
    outcomes = comm.allgather(outcome)
    for r in range(2 * (size // 2)):
        msg = outcomes[r]
        assert "never came" in msg and "partition" in msg and "forward" in msg, (r, msg)
    assert "from partition 1" in outcomes[0]


@pytest.mark.skipif(size < 2, reason="needs 2 ranks")
def test_unexpected_message_is_caught_at_the_end_of_forward():
    """Partition 1 sends a message no plan expects; partition 0's end-of-forward check raises
    naming partition 1 instead of leaving it to be mismatched later."""
    sub, pm = _pair_model(timeout_s=30.0)
    outcome = None
    if pm is not None:
        tag = pm.exchange.tag(0, False)  # layer 0 reads the replicated input: no messages
        stray = np.zeros(3, np.float32)
        if pm.p == 1:
            pm.comm.Send(stray, dest=0, tag=tag)
        sub.Barrier()  # the stray message is on its way before partition 0 checks
        try:
            pm.forward(_batch()[0])
            outcome = "no error"
        except PartitionError as exc:
            outcome = str(exc)
        if pm.p == 0:
            pm.comm.Recv(stray, source=1, tag=tag)  # clean up
        sub.Barrier()
        pm.free()
        sub.Free()
    outcomes = comm.allgather(outcome)
    for r in range(2 * (size // 2)):
        if r % 2 == 0:
            assert "unexpected 12-byte message from partition 1" in outcomes[r], outcomes[r]
        else:
            assert outcomes[r] == "no error", outcomes[r]


def test_different_plans_are_refused_up_front():
    sub = _group(size)
    shape, layers, classes = DENSE
    weights = None if rank == 0 or size == 1 else [1.0] * (size - 1) + [2.0]
    outcome = "no error"
    try:
        PartitionedModel(PartitionPlan(shape, layers, classes, size, weights), sub).free()
    except PartitionError as exc:
        outcome = str(exc)
    sub.Free()
    outcomes = comm.allgather(outcome)
    if size == 1:
        assert outcomes == ["no error"]
    else:
        assert all("different model plans" in o for o in outcomes), outcomes
