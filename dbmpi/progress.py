"""How a run's progress is said: steps per replica and in all, and the live progress line.

``downpour.steps`` counts each replica's steps, and the coordinator's board sums them over
replicas; a user who asked for 5000 steps with 2 replicas must read both numbers, never a bare
10000. On a terminal the coordinator keeps one line up to date in place (``\\r``); anywhere else
(a batch log, a pipe, a test) it writes nothing but the ordinary log lines, so logs stay clean.

Under mpiexec rank 0's stderr is a pipe to the launcher even when the user sits at a terminal,
so ``dbmpi launch`` says what it saw in ``DBMPI_PROGRESS`` (``tty`` or ``plain``); the variable
also lets a user force either (``off`` = ``plain``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

PROGRESS_ENV = "DBMPI_PROGRESS"


def steps_phrase(total: int, replicas: int, per_replica: list[int] | None = None) -> str:
    """``5000 steps per replica (10000 in all)``; one replica: ``5000 steps (1 replica)``.

    ``per_replica`` (each replica's own count, when known) says a spread when the replicas
    stopped at different steps (a target accuracy, SIGTERM): ``4990-5000 steps per replica``.
    Without it the count per replica is ``total / replicas`` (``~`` when not whole).
    """
    if replicas <= 1:
        return f"{total} steps (1 replica)"
    if per_replica:
        lo, hi = min(per_replica), max(per_replica)
        each = str(lo) if lo == hi else f"{lo}-{hi}"
    else:
        each = str(total // replicas) if total % replicas == 0 else f"~{total / replicas:.0f}"
    return f"{each} steps per replica ({total} in all)"


def steps_per_replica(total: int, replicas: int, per_replica: list[int] | None = None):
    """summary.json's ``steps_per_replica``: an int when every replica ran as many steps,
    else their mean (a float)."""
    if per_replica and len(set(per_replica)) == 1:
        return int(per_replica[0])
    mean = total / max(replicas, 1)
    return int(mean) if mean.is_integer() else round(mean, 1)


def format_duration(seconds: float) -> str:
    """``2:05``, ``1:02:03`` (hours only when there are any)."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(steps: int, total: int, start_steps: int, elapsed_s: float) -> float | None:
    """Seconds left at the mean rate since ``start_steps`` (the count when this session
    started: a resumed run's earlier steps took no time here). None when there is no
    end in steps or no rate yet."""
    done = steps - start_steps
    if not total or done <= 0 or elapsed_s <= 0:
        return None
    return max(0, total - steps) * elapsed_s / done


def steps_done(steps: int, replicas: int, steps_each: int) -> str:
    """``1200/5000 steps per replica (2400/10000 in all, 24%)``: ``steps`` is the sum over
    replicas, ``steps_each`` the configured count per replica (0: no end in steps, then
    :func:`steps_phrase`)."""
    total = steps_each * replicas
    if not total:
        return steps_phrase(steps, replicas)
    pct = f"{100 * min(steps, total) / total:.0f}%"
    if replicas <= 1:
        return f"{steps}/{steps_each} steps ({pct}, 1 replica)"
    return f"{steps // replicas}/{steps_each} steps per replica ({steps}/{total} in all, {pct})"


def progress_line(steps: int, replicas: int, steps_each: int, samples_per_s: float | None,
                  accuracy: float | None, elapsed_s: float, eta_s: float | None) -> str:
    """One line: ``1200/5000 steps per replica (2400/10000 in all, 24%) | 3520 samples/s |
    test accuracy 0.8712 | 0:41, ETA 2:10`` (samples/s of all replicas together)."""
    parts = [steps_done(steps, replicas, steps_each)]
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.0f} samples/s")
    if accuracy is not None:
        parts.append(f"test accuracy {accuracy:.4f}")
    clock = format_duration(elapsed_s)
    if eta_s is not None:
        clock += f", ETA {format_duration(eta_s)}"
    parts.append(clock)
    return " | ".join(parts)


def work_line(what: str, done: int, total: int, unit: str, elapsed_s: float,
              parts: str = "") -> str:
    """The live line of an offline job: ``train: 3/8 shards, 22500/60000 examples, 1200
    examples/s, ETA 0:31`` (``parts`` is the ``3/8 shards`` piece, if any)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    head = f"{what}: {parts + ', ' if parts else ''}{done}/{total} {unit}"
    tail = f"ETA {format_duration(eta)}" if eta is not None else "ETA ?"
    return f"{head}, {rate:.0f} {unit}/s, {tail}"


def live_wanted(stream: TextIO | None = None, env: dict | None = None) -> bool:
    """Whether to draw the in-place line: ``DBMPI_PROGRESS`` when set, else whether
    ``stream`` (stderr) is a terminal."""
    value = (os.environ if env is None else env).get(PROGRESS_ENV, "").lower()
    if value in ("tty", "on", "1"):
        return True
    if value in ("plain", "off", "0"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LiveLine:
    """The in-place progress line on ``stream``; does nothing when not ``enabled``.

    ``clear()`` before a log line, so the log line does not land after the progress text;
    the next ``show()`` draws it again below.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None, every_s: float = 1.0):
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self._last = 0.0
        self._shown = False

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last >= self.every_s

    def show(self, line: str) -> None:
        if not self.enabled:
            return
        self._last = time.monotonic()
        self.stream.write("\r" + line + "\x1b[K")  # \x1b[K: erase what a longer line left
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
