"""conftest's job runner waits on a job's progress, not on a wall-clock budget: a job that
keeps writing runs past the stall window; one that stops writing fails after it."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import Job, JobStalled, run_job


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_job_that_keeps_writing_outlives_the_stall_window(tmp_path):
    # 8 lines 0.4 s apart: 3.2 s in all, four times the 0.8 s stall window
    code = "import time\nfor i in range(8):\n    print(i, flush=True); time.sleep(0.4)"
    with Job(_py(code), stall_s=0.8, cap_s=60) as job:
        proc = job.wait()
    assert proc.returncode == 0 and proc.stdout.split() == [str(i) for i in range(8)]


def test_a_job_that_grows_only_its_metrics_is_advancing(tmp_path):
    metrics = tmp_path / "run" / "metrics"
    metrics.mkdir(parents=True)
    code = (f"import time\nfor i in range(6):\n"
            f"    open({str(metrics / 'rank-00001.jsonl')!r}, 'a').write('{{}}\\n')\n"
            f"    time.sleep(0.4)")
    with Job(_py(code), run_dir=tmp_path / "run", stall_s=0.8, cap_s=60) as job:
        assert job.wait().returncode == 0


def test_a_silent_job_fails_after_the_stall_window_and_is_killed():
    t = time.monotonic()
    with Job(_py("import time; print('started', flush=True); time.sleep(600)"),
             stall_s=1.0, cap_s=60) as job:
        with pytest.raises(JobStalled, match="no progress for 1 s"):
            job.wait()
        assert job.returncode is not None  # killed, not left behind
    assert time.monotonic() - t < 30


def test_the_cap_ends_a_job_that_writes_forever():
    code = "import time\nwhile True:\n    print('x', flush=True); time.sleep(0.1)"
    with Job(_py(code), stall_s=5, cap_s=1.5) as job:
        with pytest.raises(JobStalled, match="after the 1.5 s cap"):
            job.wait()


def test_wait_for_fails_at_once_when_the_job_ends_first():
    with Job(_py("print('bye')"), stall_s=30, cap_s=60) as job:
        t = time.monotonic()
        with pytest.raises(AssertionError, match="the job ended .exit 0. before a checkpoint"):
            job.wait_for(lambda: False, "a checkpoint")
        assert time.monotonic() - t < 20


def test_an_unmarked_test_may_not_start_a_job(tmp_path):
    with pytest.raises(AssertionError, match="starts a job: mark it @pytest.mark.job"):
        run_job(2, ["train", str(tmp_path / "none.toml")])
