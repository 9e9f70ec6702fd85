"""What the machine's CPUs did over an interval, from Linux's ``/proc/stat`` (zeros elsewhere).

Two figures matter to a calibration or a measured run on a shared machine:

* ``busy_cores``: cores busy with anything (other tenants' load, when our own ranks are not
  running);
* ``steal_share``: of the time our CPUs were running something, the share the hypervisor ran
  another virtual machine instead (a VM's *steal* time). A rank that wanted T seconds of
  CPU got (1 - steal) T: on a busy cloud host this reached 0.13-0.31 during our jobs while
  it was 0.02 idle, so calibrated times are stored steal-free and a plan can be made for a
  given steal (``dbmpi.plan.cost.Job.steal``). Bare metal has none.
"""

from __future__ import annotations

import os
import time


def sample() -> tuple[int, int, int]:
    """(all, idle + iowait, steal) jiffies summed over the CPUs since boot; zeros when
    ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v[:8]), v[3] + v[4], v[7] if len(v) > 7 else 0
    except (OSError, ValueError, IndexError):
        return 0, 0, 0


def steal_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Stolen over non-idle time between two samples (0 when nothing ran or nothing is known)."""
    busy = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, min(0.95, (after[2] - before[2]) / busy)) if busy > 0 else 0.0


def busy_cores(seconds: float = 0.5) -> float:
    """Cores busy with anything over the next ``seconds``: other tenants' load when this
    process's own jobs are not running."""
    t0, i0, _ = sample()
    time.sleep(seconds)
    t1, i1, _ = sample()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(0.0, (1 - (i1 - i0) / max(t1 - t0, 1)) * cores) if t1 > t0 else 0.0
