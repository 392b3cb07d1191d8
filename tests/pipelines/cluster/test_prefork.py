"""Rank templates (pipelines.cluster.prefork), in a fresh interpreter of their own (a
fork of the test process would copy pytest): a template handed a rank's start becomes
that rank -- its working directory, environment and output descriptor -- and one never
used leaves with the process that forked it. The daemon's tests check the bits of a
whole job started from templates (tests/pipelines/daemon/test_warm.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.pipelines.cli_util import REPO

FORKER = """
import json, os, sys, threading, time
from pipelines.cluster import prefork

held = threading.Event()
thread = threading.Thread(target=held.wait)
thread.start()
try:
    prefork.prefork(1)
    refused = None
except RuntimeError as err:
    refused = str(err)
held.set()
thread.join()
while len(os.listdir("/proc/self/task")) > 1:  # the OS thread ends just after join()
    time.sleep(0.01)

pids = prefork.prefork(2)
other = prefork.spawn_rank([sys.executable, "-m", "pipelines.cli"], {}, None, (), None, [])
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
env = {"ZEROTRAIN_PLAN": "plan.json", "PATH": os.environ["PATH"]}
argv = [sys.executable, "-m", prefork.RANK_MODULE]
rank = prefork.spawn_rank(argv, env, sys.argv[2], (), out, [])
deadline = time.monotonic() + 120
while rank.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"refused": refused, "pids": pids, "other": other is None, "rank": rank.pid,
                  "code": rank.returncode, "left": prefork.templates()}))
"""


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (gone, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _script(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter of this checkout; what it printed, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_template_becomes_the_rank_it_is_handed_and_an_unused_one_leaves(tmp_path):
    (tmp_path / "plan.json").write_text("not json")  # relative: read in the cwd handed over
    out = tmp_path / "rank.out"
    seen = _script(FORKER, str(out), str(tmp_path))
    assert seen["refused"] == "prefork() needs a single-threaded process (threads run here)"
    assert seen["other"]  # not a rank's argv: exec'd as usual
    # the first template became the rank: it read ./plan.json in tmp_path, said why it
    # cannot go on on the descriptor it was handed, and exited as rank.main does
    assert seen["rank"] == seen["pids"][0]
    assert seen["code"] == 2
    assert out.read_text() == (
        "zerotrain rank: cannot read the plan ($ZEROTRAIN_PLAN): "
        "Expecting value: line 1 column 1 (char 0)\n"
    )
    # the second, never used, left with the process that forked it
    assert seen["left"] == seen["pids"][1:]
    deadline = time.monotonic() + 30
    while not _gone(seen["pids"][1]):
        assert time.monotonic() < deadline, "an unused template outlived its forker"
        time.sleep(0.05)


SKIPS_THE_DEAD = """
import json, os, signal, sys, time
from pipelines.cluster import prefork

first, second = prefork.prefork(2)
os.kill(first, signal.SIGKILL)  # killed while it waits
while prefork.ForkedChild(first).poll() is None:
    time.sleep(0.01)
argv = [sys.executable, "-m", prefork.RANK_MODULE]
rank = prefork.spawn_rank(argv, {"ZEROTRAIN_PLAN": "/nonexistent"}, None, (), None, [])
while rank.poll() is None:
    time.sleep(0.05)
print(json.dumps({"pids": [first, second], "rank": rank.pid, "left": prefork.templates()}))
"""


def test_a_template_that_died_waiting_is_passed_over_for_the_next():
    seen = _script(SKIPS_THE_DEAD)
    assert (seen["rank"], seen["left"]) == (seen["pids"][1], [])
