"""A layer kind registered from a test alone (``tests/scale_kind.py``) runs partitioned over
MPI ranks like the built-in kinds: logits, loss and every gradient equal the single-rank
Model's (relative error 1e-5, float32), and the bytes sent match the plan (the scale layer
itself sends nothing: a slice reads only the features its partition owns)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared kind

from scale_kind import CLASSES, LAYERS, SHAPE, ScaleKind

from dbmpi.model import Model
from dbmpi.model.parallel import PartitionedModel
from dbmpi.model.partition import PartitionPlan
from dbmpi.model.registry import register, unregister

comm = MPI.COMM_WORLD
size, rank = comm.Get_size(), comm.Get_rank()
TOL = 1e-5


@pytest.fixture
def scale_kind():
    kind = register(ScaleKind())
    yield kind
    unregister("scale")


def _rel(a, b) -> float:
    scale = float(np.abs(b).max())
    return float(np.abs(np.asarray(a, np.float64) - b).max()) / (scale if scale else 1.0)


@pytest.mark.parametrize("P", range(1, size + 1))
def test_registered_kind_runs_partitioned(scale_kind, P):
    n_groups = size // P
    sub = comm.Split(rank // P if rank < n_groups * P else MPI.UNDEFINED, rank)
    errs = {}
    if sub != MPI.COMM_NULL:
        rng = np.random.default_rng(3)
        model = Model.from_spec(SHAPE, LAYERS, CLASSES)
        model.init_params(4)
        model.params += rng.normal(0, 0.1, model.num_params).astype(np.float32)
        plan = PartitionPlan(SHAPE, LAYERS, CLASSES, P)
        pm = PartitionedModel(plan, sub)
        pm.set_model_params(model.params)
        x = rng.normal(size=(6, *SHAPE)).astype(np.float32)
        y = rng.integers(0, CLASSES, 6)
        errs["logits"] = _rel(pm.forward(x), model.forward(x).copy())
        pm.reset_stats()
        loss, _ = pm.forward_backward(x, y)
        errs["bytes_ok"] = pm.stats()["bytes_sent"] == plan.bytes_per_step(6)[pm.p]
        want, _ = model.forward_backward(x, y)
        errs["loss"] = abs(loss - want) / abs(want)
        grads = plan.to_model(np.concatenate(sub.allgather(pm.grads)))
        errs["grads"] = _rel(grads, model.grads)
        errs["scale_sends"] = len(plan.transfers[1])
        pm.free()
        sub.Free()
    for r, e in enumerate(comm.allgather(errs)):
        if not e:
            continue
        assert e["bytes_ok"], f"rank {r}: bytes sent differ from the plan"
        assert e["scale_sends"] == 0, f"rank {r}: the scale layer has halo transfers"
        for key in ("logits", "loss", "grads"):
            assert e[key] <= TOL, f"rank {r}: {key} relative error {e[key]:.2e} > {TOL}"
