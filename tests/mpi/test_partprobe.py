"""The partition probe (dbmpi.plan.partprobe) at the job's size: the messages the cost model
counts per partition and step (dbmpi.plan.shape.messages) are the ones the exchange makes."""

from mpi4py import MPI

from dbmpi.plan.partprobe import probe

comm = MPI.COMM_WORLD
# a dense stack: every partition sends to and receives from every other at each boundary,
# so its messages (sends + receives) are twice its sends
SPEC = [[5, 7], [{"type": "dense", "units": 13, "activation": "relu"},
                 {"type": "dense", "units": 11, "activation": "tanh"}], 6, "softmax", 16]


def test_the_plans_messages_are_the_exchanges():
    out = comm.bcast(probe(comm, SPEC, 0.2), root=0)
    P = comm.Get_size()
    assert out["partitions"] == P and out["steps"] >= 10
    # 3 boundaries forward (two hidden layers' outputs, the logits), 2 backward, P - 1 peers
    assert out["messages"] == [2 * 5 * (P - 1)] * P
    assert [2 * s for s in out["sent"]] == out["messages"]
    assert out["layers_s"] > 0  # the layers' calls were timed
    # the exchange's CPU clock of its waits runs only inside them
    assert 0 <= out["wait_cpu_s"] <= out["wait_s"] * 1.01 + 1e-6
