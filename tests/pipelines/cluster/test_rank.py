"""The rank process's own set-up (pipelines.cluster.rank): pinning to a CPU."""

import json
import os
import subprocess
import sys

import pytest

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
