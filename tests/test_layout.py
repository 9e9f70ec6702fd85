"""Parameter layout over shards: pure arithmetic checked against a brute-force owner map."""

import numpy as np
import pytest

from dbmpi.ps import ParamLayout


@pytest.mark.parametrize("total,shards", [(1, 1), (10, 3), (1237, 4), (7, 7), (100, 1)])
def test_blocks_cover_everything_once_and_evenly(total, shards):
    lay = ParamLayout.even(total, shards)
    sizes = [lay.block_size(s) for s in range(shards)]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    assert lay.bounds[0] == 0 and lay.bounds[-1] == total


@pytest.mark.parametrize("total,shards", [(1237, 3), (50, 4), (9, 2)])
def test_segments_match_owner_map(total, shards):
    lay = ParamLayout.even(total, shards)
    owner = np.concatenate([np.full(lay.block_size(s), s) for s in range(shards)])
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, total + 1, 2))
        got = np.full(total, -1)
        for seg in lay.segments(a, b):
            lo, hi = lay.block(seg.shard)
            assert seg.offset == seg.start - lo and seg.stop <= hi
            got[seg.start:seg.stop] = seg.shard
        np.testing.assert_array_equal(got[a:b], owner[a:b])
        assert (got[:a] == -1).all() and (got[b:] == -1).all()


def test_out_of_range():
    with pytest.raises(ValueError):
        ParamLayout.even(10, 2).segments(5, 11)


def test_the_planner_charges_the_shards_own_hot_spin():
    """The cost model's copy of the shard's post-push spin (it imports no MPI) is the shard's."""
    from dbmpi.plan.cost import SHARD_HOT_S
    from dbmpi.ps.server import HOT_S

    assert SHARD_HOT_S == HOT_S
