"""/metrics is rendered once per daemon snapshot (pipelines.daemon.http.MetricsText): a
scrape of an unchanged snapshot reuses its text, and zerotrain_rank_up is still judged at
each scrape, here from a real process stopped and continued between two scrapes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from pipelines.daemon.http import MetricsText
from pipelines.daemon.supervisor import MARKER_VAR


def _snapshot(state_dir, pid: int, step: int, finished: int) -> dict:
    running = {
        "id": 1,
        "state": "running",
        "step": step,
        "loss": 0.5,
        "batch_size": 64,
        "run_dir": str(state_dir / "run"),
        "ranks_live": [{"rank": 0, "pid": pid, "step": step, "t": time.time()}],
        "step_hist": [0] * 13,
        "step_sum": 0.0,
    }
    done = [{"id": 2 + i, "state": "done", "step": 10, "restarts": 0} for i in range(finished)]
    counts = {"running": 1, "done": 10 * finished}  # also those no longer listed
    return {"jobs": [running, *done], "daemon": {"state_dir": str(state_dir), "jobs": counts}}


def _series(text: bytes) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_a_snapshot_is_rendered_once_and_rank_up_is_judged_at_each_scrape(tmp_path):
    env = {**os.environ, MARKER_VAR: f"{tmp_path.resolve()}:1"}  # job 1's marker
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        daemon = SimpleNamespace(snapshot=_snapshot(tmp_path, rank.pid, 7, finished=50))
        metrics = MetricsText(daemon)
        up = ("zerotrain_rank_up", (("job", "1"), ("rank", "0")))
        first = _series(metrics.render())
        assert first[("zerotrain_step", (("job", "1"),))] == 7 and first[up] == 1.0
        assert first[("zerotrain_jobs", (("state", "done"),))] == 500
        rank.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10  # until /proc shows it stopped
            while metrics.render().count(b'zerotrain_rank_up{job="1",rank="0"} 0.0') != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            rank.send_signal(signal.SIGCONT)
        assert metrics.renders == 1  # the same snapshot: its text reused at every scrape
        daemon.snapshot = _snapshot(tmp_path, rank.pid, 8, finished=50)
        second = _series(metrics.render())
        assert metrics.renders == 2 and second[("zerotrain_step", (("job", "1"),))] == 8
        assert second[up] == 1.0
    finally:
        rank.kill()
        rank.wait()
