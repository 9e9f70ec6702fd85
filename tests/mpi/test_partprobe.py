"""The partition probe (dbmpi.plan.partprobe) at the job's size: the messages the cost model
counts per partition and step (dbmpi.plan.shape.messages) are the ones the exchange makes,
and the probe's split of a partition's time adds up."""

from mpi4py import MPI

from dbmpi.plan.partprobe import probe

comm = MPI.COMM_WORLD
# a dense stack: every partition sends to and receives from every other at each boundary,
# so its messages (sends + receives) are twice its sends
SPEC = [[5, 7], [{"type": "dense", "units": 13, "activation": "relu"},
                 {"type": "dense", "units": 11, "activation": "tanh"}], 6, "softmax", 16]


def test_the_plans_messages_are_the_exchanges_and_the_times_add_up():
    out = comm.bcast(probe(comm, SPEC, 0.2), root=0)
    P = comm.Get_size()
    assert out["partitions"] == P and out["steps"] >= 10
    # 3 boundaries forward (two hidden layers' outputs, the logits), 2 backward, P - 1 peers
    assert out["messages"] == [2 * 5 * (P - 1)] * P
    assert [2 * s for s in out["sent"]] == out["messages"]
    assert out["layers_s"] > 0 and out["msg_s"] >= 0
    # the layers' CPU and the waits are disjoint parts of the step's wall time
    assert out["layers_s"] + out["wait_s"] <= out["step_s"] * (1 + 1e-9)
