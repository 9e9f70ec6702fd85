"""The model-parallel plan (pure, no MPI): splits, halos, transfers, bytes, parameter maps.
And one partition on COMM_SELF equals the single-rank model."""

import numpy as np
import pytest

from dbmpi.errors import ConfigError
from dbmpi.model import Model
from dbmpi.model.partition import PartitionPlan, split

DENSE = [{"type": "dense", "units": 7, "activation": "relu"},
         {"type": "dense", "units": 5, "activation": "tanh"}]
IMAGE = [{"type": "local", "filters": 3, "kernel": 3, "stride": 1, "activation": "relu"},
         {"type": "l2pool", "size": 2, "stride": 1},
         {"type": "lcn", "size": 3},
         {"type": "local", "filters": 4, "kernel": 2, "stride": 2},
         {"type": "dense", "units": 6}]


@pytest.mark.parametrize("n,parts,weights,want", [
    (10, 1, None, (0, 10)),
    (10, 2, None, (0, 5, 10)),
    (7, 3, None, (0, 2, 5, 7)),
    (10, 3, (1, 2, 2), (0, 2, 6, 10)),
    (4, 4, (10, 1, 1, 1), (0, 1, 2, 3, 4)),  # every part non-empty
])
def test_split(n, parts, weights, want):
    assert split(n, parts, weights) == want


def test_split_errors():
    with pytest.raises(ValueError, match="non-empty"):
        split(3, 4)
    with pytest.raises(ValueError, match="positive"):
        split(8, 2, (1, 0))


def test_dense_plan_splits_units_and_all_gathers():
    plan = PartitionPlan((3, 4), DENSE, 3, 3)
    units = [[part.units for part in row] for row in plan.parts]
    assert units == [[(0, 2), (2, 5), (5, 7)], [(0, 2), (2, 3), (3, 5)], [(0, 1), (1, 2), (2, 3)]]
    # layer 0 reads the replicated input: nothing moves
    assert plan.transfers[0] == []
    # layer 1: each partition needs all 7 inputs and gets the others' blocks (all-gather)
    t1 = plan.transfers[1]
    assert len(t1) == 6 and {(t.src, t.dst) for t in t1} == {(q, p) for p in range(3)
                                                             for q in range(3) if p != q}
    assert all(t.cols == plan.parts[0][t.src].out_cols for t in t1)
    # bytes per step: forward all-gathers (layers 1, 2 and the logits) + backward reduce-scatters
    B = 8
    # widths: layer 0 out (2, 3, 2), layer 1 out (2, 1, 2), logits (1, 1, 1)
    fwd = [4 * B * 2 * w for w in (2 + 2 + 1, 3 + 1 + 1, 2 + 2 + 1)]  # own blocks x 2 peers
    bwd = [4 * B * x for x in (5 + 3, 4 + 4, 5 + 3)]  # what it received, sent back
    got = plan.bytes_per_step(B)
    assert got == [f + b for f, b in zip(fwd, bwd)]
    assert plan.forward_bytes(B) == fwd


def test_spatial_plan_halos():
    plan = PartitionPlan((11, 9, 2), IMAGE, 5, 2, split="rows")
    local0, pool, lcn = plan.parts[:3]
    # local k3 s1: 9 output rows -> [0, 4) [4, 9); reads input rows [0, 6) and [4, 11)
    assert [p.units for p in local0] == [(0, 4), (4, 9)]
    assert [p.need for p in local0] == [(0, 6 * 18), (4 * 18, 11 * 18)]
    # l2pool 2 s1 on 9 rows -> 8 rows [0, 4) [4, 8); reads rows [0, 5) and [4, 9): one halo row
    row = 7 * 3
    assert [p.need for p in pool] == [(0, 5 * row), (4 * row, 9 * row)]
    assert [t.cols for t in plan.transfers[1]] == [(4 * row, 5 * row)]  # p0 gets row 4 from p1
    assert (plan.transfers[1][0].src, plan.transfers[1][0].dst) == (1, 0)
    # lcn 3x3 (r = 1): 2r = 2 halo rows each side; computes its slab, keeps its rows
    row = 6 * 3
    assert [p.need for p in lcn] == [(0, 6 * row), (2 * row, 8 * row)]
    assert lcn[1].crop == (2 * row, 6 * row) and lcn[0].crop == (0, 4 * row)
    assert {(t.src, t.dst, t.cols) for t in plan.transfers[2]} == {
        (1, 0, (4 * row, 6 * row)), (0, 1, (2 * row, 4 * row))}
    # local k2 s2 on 8 rows -> 4 rows [0, 2) [2, 4) reads [0, 4) [4, 8): aligned, no halo
    assert plan.transfers[3] == []
    # the dense layer all-gathers the image rows
    assert len(plan.transfers[4]) == 2


def test_thin_partitions_take_halos_from_several_peers():
    plan = PartitionPlan((12, 3, 1), [{"type": "lcn", "size": 5}, {"type": "lcn", "size": 5}],
                         4, 4, weights=(1, 1, 1, 1))
    # second lcn, partition 1 owns rows [3, 6) and needs [0, 10): rows from 0, 2 and 3
    srcs = sorted(t.src for t in plan.recvs(1, 1))
    assert srcs == [0, 2, 3]


def test_too_few_units_is_a_config_error():
    with pytest.raises(ConfigError, match=r"output layer has 3 output units.*partitions = 4"):
        PartitionPlan((3, 4), DENSE, 3, 4)
    with pytest.raises(ConfigError, match=r"model.layers\[0\] \(lcn\) has 3 output rows"):
        PartitionPlan((3, 9), [{"type": "lcn", "size": 3}], 8, 4)


@pytest.mark.parametrize("layers,shape", [(DENSE, (3, 4)), (IMAGE, (11, 9, 2))])
@pytest.mark.parametrize("P,weights", [(1, None), (2, None), (3, (1, 2, 1)), (4, None)])
def test_parameter_maps_round_trip(layers, shape, P, weights):
    plan = PartitionPlan(shape, layers, 4, P, weights)
    model = Model.from_spec(shape, layers, 4)
    assert plan.num_params == model.num_params
    assert sum(plan.param_sizes) == plan.num_params
    vec = np.arange(model.num_params, dtype=np.float32)
    g = plan.from_model(vec)
    assert sorted(g.tolist()) == vec.tolist()  # a permutation
    np.testing.assert_array_equal(plan.to_model(g), vec)
    for p in range(P):
        lo, hi = plan.param_range(p)
        np.testing.assert_array_equal(plan.partition_from_model(p, vec), g[lo:hi])
    # the first dense layer's partition 0 block is its weight columns then its biases
    if layers is DENSE:
        a, b = plan.parts[0][0].units
        W = vec[:12 * 7].reshape(12, 7)
        np.testing.assert_array_equal(g[:12 * (b - a)], W[:, a:b].ravel())


def test_fingerprint_changes_with_the_plan():
    a = PartitionPlan((3, 4), DENSE, 3, 2).fingerprint
    assert a == PartitionPlan((3, 4), DENSE, 3, 2).fingerprint
    assert a != PartitionPlan((3, 4), DENSE, 3, 2, weights=(1, 2)).fingerprint
    assert a != PartitionPlan((3, 4), DENSE, 3, 3).fingerprint
    # a checkpoint of one split is not resumed with the other (parameter layouts differ)
    assert (PartitionPlan((11, 9, 2), IMAGE, 5, 2, split="rows").fingerprint
            != PartitionPlan((11, 9, 2), IMAGE, 5, 2, split="locations").fingerprint)
    assert "units [0, 4), [4, 7)" in PartitionPlan((3, 4), DENSE, 3, 2).describe()


@pytest.mark.parametrize("layers,shape", [(DENSE, (3, 4)), (IMAGE, (11, 9, 2))])
def test_one_partition_on_comm_self_equals_the_model(layers, shape):
    from mpi4py import MPI

    from dbmpi.model.parallel import PartitionedModel

    rng = np.random.default_rng(0)
    model = Model.from_spec(shape, layers, 3)
    model.init_params(1)
    x = rng.normal(size=(5, *shape)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    pm = PartitionedModel(PartitionPlan(shape, layers, 3, 1), MPI.COMM_SELF)
    pm.init_params(1)
    np.testing.assert_array_equal(pm.params, model.params)
    assert pm.forward_backward(x, y) == model.forward_backward(x, y)
    np.testing.assert_array_equal(pm.grads, model.grads)
    assert pm.stats()["bytes_sent"] == 0
    assert pm.evaluate(x, y) == model.evaluate(x, y)
    pm.free()


def test_downpour_helpers_convert_between_layouts():
    """dbmpi.train.partitioned: shard ranges, initial global vector, the coordinator's fetch."""
    from types import SimpleNamespace as NS

    from dbmpi.train import partitioned

    ds = NS(feature_shape=(3, 4), num_classes=4)

    def cfg(P):
        return NS(topology=NS(partitions=P, split="locations"),
                  model=NS(layers=DENSE, loss="softmax"), run=NS(seed=3))

    model = Model.from_spec((3, 4), DENSE, 4)
    init = model.init_params(3).copy()
    plan = PartitionPlan((3, 4), DENSE, 4, 2)
    assert partitioned.plan_for(cfg(1), ds) is None
    assert partitioned.param_ranges(cfg(1), model, ds) == [(0, model.num_params)]
    assert partitioned.param_ranges(cfg(2), model, ds) == plan.ranges
    np.testing.assert_array_equal(partitioned.initial_params(cfg(1), model, ds), init)
    g = partitioned.initial_params(cfg(2), model, ds)
    np.testing.assert_array_equal(g, plan.from_model(init))

    class Client:
        wait_s = 1.5

        def fetch(self, params, read_own_pushes=False):
            params[:] = g

    client = Client()
    assert partitioned.coordinator_client(client, cfg(1), ds) is client
    view = partitioned.coordinator_client(client, cfg(2), ds)
    out = np.zeros(model.num_params, np.float32)
    view.fetch(out)
    np.testing.assert_array_equal(out, init)
    assert view.wait_s == 1.5


@pytest.mark.parametrize("text,field", [
    ('[topology]\npartitions = 0\n', "topology.partitions"),
    ('algorithm = "sandblaster"\n[topology]\npartitions = 2\n', "topology.partitions"),
    ('[model]\nlayers = [{type = "local", filters = 4}]\n', "model.layers[0].kernel"),
    ('[model]\nlayers = [{type = "local", filters = 4, kernel = 3, size = 2}]\n',
     "model.layers[0]"),
    ('[model]\nlayers = [{type = "l2pool", size = 2, stride = 0}]\n', "model.layers[0].stride"),
    ('[model]\nlayers = [{type = "lcn", size = 4}]\n', "model.layers[0].size"),
    ('[model]\nlayers = [{type = "lcn", size = 3, activation = "relu"}]\n', "model.layers[0]"),
    ('[model]\nlayers = [{type = "dense", units = 8}, {type = "lcn", size = 3}]\n',
     "model.layers[1]"),
])
def test_config_checks_image_layers_and_partitions(tmp_path, text, field):
    from dbmpi import config

    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(p)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_config_accepts_an_image_model_over_partitions(tmp_path):
    from dbmpi import config

    p = tmp_path / "c.toml"
    p.write_text('[topology]\npartitions = 3\n[model]\nlayers = [{type = "local", filters = 4, '
                 'kernel = 5, stride = 2, activation = "relu"}, {type = "l2pool", size = 2}, '
                 '{type = "lcn", size = 3}, {type = "dense", units = 8}]\n')
    cfg = config.load(p)
    assert cfg.topology.world_size == 1 + 2 + 2 * 3
    assert config.load(p, []) == config.from_dict(
        __import__("tomllib").loads(config.to_toml(cfg)))
