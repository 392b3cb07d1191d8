"""The rank process's own set-up (pipelines.cluster.rank): pinning to a CPU, and what
a rank imports (a restarted rank's start is on the path of a recovery)."""

import json
import os
import subprocess
import sys

import pytest

from tests.pipelines.cli_util import BLAS_THREAD_VARS, REPO

PROBE = """
import json, os, sys
from pipelines.cluster.rank import pin_to_cpu
got = pin_to_cpu(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps([got, sorted(os.sched_getaffinity(0))]))
"""


def probe(rank, world):
    """pin_to_cpu(rank, world) in a fresh process (it changes the process's mask)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(rank), str(world)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    got, cpus = json.loads(out)
    return got, cpus


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux CPU affinity")
def test_a_rank_is_pinned_only_when_the_run_has_one_rank_per_cpu():
    allowed = sorted(os.sched_getaffinity(0))
    n = len(allowed)
    assert probe(n - 1, n) == (allowed[-1], [allowed[-1]])
    assert probe(0, n + 1) == (None, allowed)  # ranks would share a CPU
    if n > 1:
        assert probe(0, n - 1) == (None, allowed)  # other runs would pile onto CPU 0


# Loaded first on PYTHONPATH by every process of the run: a rank process rewrites the
# list of the modules it has imported every 50 ms, from a thread of its own (its exit may
# be a signal from its supervisor, which runs no exit handlers).
_LIST_MODULES = """
import os, sys, threading, time
_node = os.environ.get("ZEROTRAIN_NODE", "")
def _write():
    path = os.path.join(os.environ["MODULES_DIR"], _node)
    while True:
        with open(path + ".tmp", "w") as f:
            f.write(" ".join(sorted(list(sys.modules))))
        os.replace(path + ".tmp", path)
        time.sleep(0.05)
if _node.startswith("rank"):
    threading.Thread(target=_write, daemon=True).start()
"""


def test_a_rank_of_a_one_host_run_imports_no_multi_node_launch_code_and_no_other_dataset():
    """Every module a rank imports is compiled again at each start when no .pyc can be
    written (PYTHONDONTWRITEBYTECODE), and a restarted rank's start is most of a recovery:
    a run on one host without keys has no use for pipelines.launch or cluster.nodes, a
    char_lm run none for the table, digits or triplets readers."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hook, mods_dir = os.path.join(tmp, "hook"), os.path.join(tmp, "modules")
        os.mkdir(hook)
        os.mkdir(mods_dir)
        with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
            f.write(_LIST_MODULES)
        env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [hook, str(REPO), env.get("PYTHONPATH")]))
        env["MODULES_DIR"] = mods_dir
        run = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "run", "char_lm", "--ranks", "2",
             "--steps", "2", "--run-dir", os.path.join(tmp, "run"),
             "--set", "eval.every=0", "--set", "eval.max_batches=1"],
            capture_output=True, text=True, timeout=180, env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        for node in ("rank0", "rank1"):
            with open(os.path.join(mods_dir, node)) as f:
                mods = set(f.read().split())
            assert "pipelines.cluster.roles" in mods  # it is the rank's list
            unused = {"pipelines.cluster.nodes"} | {
                f"pipelines.data.{m}" for m in ("_table", "_digits", "_triplets")
            }
            assert sorted(unused & mods) == [], node
            assert sorted(m for m in mods if m.startswith("pipelines.launch")) == [], node
