"""Sandblaster's scheduler by plain method calls (no MPI), against hand-computed schedules.

Each test plays one evaluation request by request and checks every reply: which portion goes
to which replica, the decision on its pending set, backup copies, and the accounting that
END_EVAL relies on. Portions are 10 examples; replicas are indices 0..R-1.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from dbmpi.train.sandblaster.scheduler import MAX_COPIES, PortionScheduler, Reply
from dbmpi.train.sandblaster.wire import (
    REQUEST_HEAD,
    Decision,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    request_buffer,
)

KEEP, GRANT, REJECT, STOP = Decision.KEEP, Decision.GRANT, Decision.REJECT, Decision.STOP


def ask(s: PortionScheduler, r: int, finished: int = -1, pending=(), eval_id=None,
        loss: float | None = None) -> list[Reply]:
    """Replica r's request (of the current evaluation unless told); its loss is 1 and its
    correct count 1 per pending portion unless given."""
    pending = list(pending)
    eval_id = s.eval_id if eval_id is None else eval_id
    loss = float(len(pending)) if loss is None else loss
    return s.request(r, eval_id, finished, loss, len(pending), pending)


def test_portions_in_order_then_grants_then_the_end_of_the_evaluation():
    s = PortionScheduler(replicas=2, portion_size=10, push_every=2, backups=True)
    assert s.start_eval(batch=7, n_examples=35) == []  # nobody asked yet
    assert s.bounds == [(0, 10), (10, 20), (20, 30), (30, 35)]
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [Reply(1, KEEP, 1)]
    # one pending portion, fresh ones left: keep accumulating, next fresh portion
    assert ask(s, 0, 0, [0]) == [Reply(0, KEEP, 2)]
    # push_every pending: granted, and the last fresh portion
    assert ask(s, 0, 2, [0, 2], loss=3.0) == [Reply(0, GRANT, 3)]
    assert s.examples_granted == 20 and not s.complete
    # nothing fresh: every request is decided; replica 0 gets a backup copy of the
    # straggler's portion 1
    assert ask(s, 0, 3, [3], loss=0.5) == [Reply(0, GRANT, 1)]
    assert s.stats.backups == 1
    # the copy wins: the evaluation is complete, nothing more is handed out
    assert ask(s, 0, 1, [1], loss=2.0) == [Reply(0, GRANT, -1)]
    assert s.complete and s.examples_granted == 35 and s.push_target == 35
    # the straggler's original is a duplicate: discarded
    assert ask(s, 1, 1, [1], loss=2.0) == [Reply(1, REJECT, -1)]
    st = s.stats
    assert (st.eval_id, st.batch, st.examples, st.portions) == (0, 7, 35, 4)
    assert st.loss_sum == 3.0 + 0.5 + 2.0  # each portion's loss once
    assert st.n_correct == 2 + 1 + 1
    assert st.granted_by_replica == [4, 0] and st.computed_by_replica == [4, 1]
    assert (st.computed, st.duplicates, st.requeued, st.stale) == (5, 1, 0, 0)
    # free replicas wait (no reply) for the next evaluation, which serves them in order
    assert ask(s, 0) == [] and ask(s, 1) == []
    assert s.start_eval(batch=8, n_examples=35) == [Reply(0, KEEP, 0), Reply(1, KEEP, 1)]
    assert s.eval_id == 1 and s.stats.batch == 8 and s.push_target == 35


def test_backups_fewest_holders_then_oldest_never_more_than_max_copies():
    assert MAX_COPIES == 2
    s = PortionScheduler(replicas=5, portion_size=10, push_every=2, backups=True)
    s.start_eval(0, 20)
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [Reply(1, KEEP, 1)]
    assert ask(s, 2) == [Reply(2, KEEP, 0)]  # both held once: the older one
    assert ask(s, 3) == [Reply(3, KEEP, 1)]  # portion 0 has MAX_COPIES holders
    assert ask(s, 4) == []  # every portion has MAX_COPIES holders: wait
    assert s.stats.backups == 2 and list(s.waiting) == [4]
    # the backup of 0 finishes first and is granted; a finished portion is never handed
    # again, and portion 1 still has two holders: no work for replica 2
    assert ask(s, 2, 0, [0]) == [Reply(2, GRANT, -1)]
    # the original of 0 arrives late: discarded, not requeued (it was granted)
    assert ask(s, 0, 0, [0]) == [Reply(0, REJECT, -1)]
    st = s.stats
    assert (st.duplicates, st.requeued, st.backups) == (1, 0, 2)
    assert ask(s, 1, 1, [1]) == [Reply(1, GRANT, -1)]
    assert s.complete and st.granted_by_replica == [0, 1, 1, 0, 0]


def test_a_rejected_set_requeues_the_portions_nobody_else_holds():
    s = PortionScheduler(replicas=2, portion_size=10, push_every=3, backups=True)
    s.start_eval(0, 40)
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [Reply(1, KEEP, 1)]
    assert ask(s, 0, 0, [0]) == [Reply(0, KEEP, 2)]
    assert ask(s, 0, 2, [0, 2]) == [Reply(0, KEEP, 3)]  # fresh queue now empty
    assert ask(s, 1, 1, [1]) == [Reply(1, GRANT, 0)]  # backup of the oldest
    assert ask(s, 1, 0, [0]) == [Reply(1, GRANT, 2)]  # then of the next oldest
    # replica 0's set holds the granted portion 0: all of it is rejected; portion 2 is
    # still held by replica 1, portion 3 by nobody: it goes back to the queue, first out
    assert ask(s, 0, 3, [0, 2, 3]) == [Reply(0, REJECT, 3)]
    st = s.stats
    assert (st.duplicates, st.requeued, st.backups) == (1, 1, 2)
    assert ask(s, 1, 2, [2]) == [Reply(1, GRANT, 3)]  # backup of the requeued portion
    assert ask(s, 0, 3, [3]) == [Reply(0, GRANT, -1)]
    assert s.complete and s.examples_granted == 40
    assert ask(s, 1, 3, [3]) == [Reply(1, REJECT, -1)]
    assert st.granted_by_replica == [1, 3] and st.duplicates == 2


def test_a_late_copy_from_the_previous_evaluation_is_stale():
    s = PortionScheduler(replicas=2, portion_size=10, push_every=1, backups=True)
    s.start_eval(0, 20)
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [Reply(1, KEEP, 1)]
    assert ask(s, 0, 0, [0]) == [Reply(0, GRANT, 1)]  # backup of the straggler's portion
    assert ask(s, 0, 1, [1]) == [Reply(0, GRANT, -1)]
    assert s.complete and ask(s, 0) == []
    assert s.start_eval(1, 20) == [Reply(0, KEEP, 0)]
    # the straggler's result for evaluation 0 arrives: W has moved since, discard it, and
    # hand it the next portion of evaluation 1 in the same reply
    assert ask(s, 1, 1, [1], eval_id=0) == [Reply(1, REJECT, 1)]
    st = s.stats
    assert (st.eval_id, st.stale, st.duplicates, st.computed, st.loss_sum) == (1, 1, 1, 0, 0)


def test_stale_and_duplicate_sets_without_backups_and_the_batch_waits():
    s = PortionScheduler(replicas=2, portion_size=10, push_every=1, backups=False)
    s.start_eval(0, 20)
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [Reply(1, KEEP, 1)]
    assert ask(s, 1, 1, [1]) == [Reply(1, GRANT, -1)]
    assert ask(s, 1) == []  # the batch waits for replica 0, nobody computes a copy
    assert not s.complete and s.stats.backups == 0
    assert ask(s, 0, 0, [0]) == [Reply(0, GRANT, -1)]
    assert s.complete and s.push_target == 20
    # the next evaluation serves replica 1 first (it waited), then replica 0 asks
    assert s.start_eval(1, 20) == [Reply(1, KEEP, 0)]
    assert ask(s, 0) == [Reply(0, KEEP, 1)]


def test_push_target_counts_every_granted_example_of_the_run():
    """END_EVAL waits until each shard's count reaches push_target: the examples granted
    over all evaluations so far (a short last portion counts its own size)."""
    s = PortionScheduler(replicas=1, portion_size=10, push_every=4, backups=True)
    targets = []
    for e, n in enumerate([25, 25, 7]):
        replies = s.start_eval(e, n) if e else (s.start_eval(e, n) + ask(s, 0))
        pending = []
        while not s.complete:
            (rep,) = replies
            assert rep.replica == 0 and rep.decision in (KEEP, GRANT)
            if rep.decision is GRANT:
                pending = []
            pending.append(rep.portion)
            replies = ask(s, 0, rep.portion, pending)
        assert replies == [Reply(0, GRANT, -1)]
        assert ask(s, 0) == []  # waits for the next evaluation
        targets.append(s.push_target)
    assert targets == [25, 50, 57]


def test_shutdown_stops_waiting_replicas_now_and_busy_ones_when_they_ask():
    s = PortionScheduler(replicas=3, portion_size=10, push_every=2, backups=False)
    s.start_eval(0, 10)
    assert ask(s, 0) == [Reply(0, KEEP, 0)]
    assert ask(s, 1) == [] and ask(s, 2) == []
    assert ask(s, 0, 0, [0]) == [Reply(0, GRANT, -1)]
    assert s.complete
    assert s.shutdown() == [Reply(1, STOP), Reply(2, STOP)]
    assert not s.all_stopped
    assert ask(s, 0) == [Reply(0, STOP)]  # replica 0 was pushing; it asks again
    assert s.all_stopped


def test_wire_round_trips():
    buf = request_buffer(push_every=3)
    assert len(buf) == REQUEST_HEAD + 3
    req = encode_request(buf, 4, 7, 2.5, 3, [5, 7])
    assert len(req) == REQUEST_HEAD + 2
    assert decode_request(buf) == (4, 7, 2.5, 3.0, [5, 7])
    rep = encode_reply(buf[:6], GRANT, 4, 9, 7, (70, 75))
    assert decode_reply(rep) == (GRANT, 4, 9, 7, 70, 75)
    assert decode_reply(encode_reply(rep, STOP, 4, 9, -1, None)) == (STOP, 4, 9, -1, -1, -1)


@pytest.mark.parametrize("backups", [True, False])
@pytest.mark.parametrize("first", range(3))
def test_each_portion_is_granted_once_whatever_the_order(backups, first):
    """Three replicas finishing in turn (``first`` rotates the order): the evaluation ends,
    each portion granted exactly once, and without backups no copy is made."""
    s = PortionScheduler(replicas=3, portion_size=10, push_every=2, backups=backups)
    s.start_eval(0, 95)
    holding = {r: None for r in range(3)}
    pending = {r: [] for r in range(3)}
    granted = []

    def deliver(replies):
        queue = list(replies)
        while queue:
            rep = queue.pop(0)
            r = rep.replica
            if rep.decision is GRANT:
                granted.extend(pending[r])
            if rep.decision is not KEEP:
                pending[r] = []
            if rep.portion >= 0:
                holding[r] = rep.portion
            else:
                queue += ask(s, r)  # nothing to compute: ask again (answered once there is)

    for r in range(3):
        deliver(ask(s, r))
    turn = first
    while not s.complete:
        busy = [r for r in range(3) if holding[r] is not None]
        assert busy, "deadlock"
        r = busy[turn % len(busy)]
        turn += 1
        p, holding[r] = holding[r], None
        pending[r].append(p)
        deliver(ask(s, r, p, pending[r]))
    assert sorted(granted) == list(range(10)) and s.stats.loss_sum == 10.0
    assert s.examples_granted == 95
    if backups:
        assert s.stats.backups > 0  # the free replicas copied the last portions
    else:
        assert s.stats.backups == s.stats.duplicates == 0


def test_the_scheduler_imports_without_mpi():
    code = ("import sys; import dbmpi.train.sandblaster.scheduler; "
            "sys.exit('mpi4py.MPI' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60, check=True)
