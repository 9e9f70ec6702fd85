"""Bounded staleness: ``downpour.max_staleness = s`` (issue 23).

Downpour's pushes are applied in whatever order they arrive; a replica far ahead of a slow
one computes on parameters that miss many of the slow one's pushes, and the reverse. With a
bound, every push is applied with a *staleness* (the pushes of other replicas applied between
the fetch its gradient was computed on and the push itself: what ``push`` records hold) of at
most s:

- pushes have one global order, (push number q, worker w); a worker posts push (q, w) only
  after every earlier one of a live worker was posted on each of its shards, and each shard
  applies the pushes pending in one poll in that order (:meth:`dbmpi.ps.ShardService.poll`),
  so pushes are applied in the global order;
- a worker fetches for push (q, w) only once at most s of the other workers' pushes before
  it in that order are still to be applied, on every shard.

s = 0 with ``n_fetch = n_push = 1`` is serial SGD over the replicas' minibatches taken in turn
(synchronous, in order); s = R - 1 lets R replicas overlap one step; a straggler makes the
others wait for it (the throughput cost, ``benchmarks/straggler.py``). Retired workers
(finished, or lost: ``RETIRED`` in the shards' counters) are waited for no more.
"""

from __future__ import annotations

import time

import numpy as np

from ...ps.server import APPLIED, RETIRED, Backoff, seq_index


class StalenessBound:
    """One worker's side: waits before a fetch and before a post; counts the time waited."""

    def __init__(self, client, worker: int, peers: list[int], max_staleness: int):
        self.client, self.me, self.peers, self.s = client, worker, peers, max_staleness
        self.wait_s = 0.0

    def _before(self, q: int, v: int) -> int:
        """How many of worker ``v``'s pushes come before my push ``q`` in the global order."""
        return q - 1 + (v < self.me)

    def _fetch_ok(self, q: int, ctrl: np.ndarray) -> bool:
        earlier = 0
        for v in self.peers:
            n = self._before(q, v)
            earlier += min(n, int(ctrl[seq_index(v)])) if ctrl[seq_index(v) + RETIRED] else n
        others_applied = int(ctrl[APPLIED]) - int(ctrl[seq_index(self.me) + 1])
        return others_applied >= earlier - self.s

    def _post_ok(self, q: int, ctrl: np.ndarray) -> bool:
        return all(ctrl[seq_index(v) + RETIRED] or ctrl[seq_index(v)] >= self._before(q, v)
                   for v in self.peers)

    def _wait(self, ok, q: int, go_on) -> None:
        """Until ``ok(q, counters)`` holds on every shard of my range, or ``go_on()`` (which
        serves checkpoints and sends heartbeats) returns False."""
        t0, backoff = time.perf_counter(), Backoff(cap=0.002)
        while not all(ok(q, ctrl) for ctrl in self.client.shard_counters()):
            if not go_on():
                break
            backoff.wait()
        self.wait_s += time.perf_counter() - t0

    def before_fetch(self, q: int, go_on) -> None:
        self._wait(self._fetch_ok, q, go_on)

    def before_post(self, q: int, go_on) -> None:
        self._wait(self._post_ok, q, go_on)
