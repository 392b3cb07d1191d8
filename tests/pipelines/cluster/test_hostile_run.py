"""A live 2-rank run under fuzz (issue 21): it exits 0, no rank restarts, same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ARGS = ["mlp_classifier", "--ranks", "2", "--mode", "zero2", "--steps", "150",
        "--seed", "11"]  # fmt: skip


def start(run_dir: Path, verb: str = "run", *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", verb, *ARGS, "--run-dir", str(run_dir), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_thousands_of_hostile_messages_on_every_endpoint_change_nothing(tmp_path):
    clean = start(tmp_path / "clean")
    assert clean.wait(timeout=300) == 0
    # both ranks hold at step 75 until the attacker has sent 2,000 messages over 100
    # connections, so the attack's size does not depend on how fast this machine trains
    gate = tmp_path / "attack-done"
    hold = ";".join(f"wait:rank={r},step=75,until={gate}" for r in (0, 1))
    run = start(tmp_path / "fuzzed", "simulate", "--chaos", hold)
    attacker = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_fuzz.py"), "--attack",
         str(tmp_path / "fuzzed"), "--seconds", "100", "--rate", "800",
         "--open-gate", str(gate), "2000", "100"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()[-2000:]
    done = json.loads(attacker.stdout.splitlines()[-1])
    assert done["gate_opened"], done
    assert done["messages"] >= 2000 and done["connections"] >= 100, done
    assert all(n > 0 for n in done["per_endpoint"].values()), done
    summaries = [
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("clean", "fuzzed")
    ]
    assert summaries[1]["restarts"] == 0
    assert summaries[1]["params_sha256"] == summaries[0]["params_sha256"]
    assert done["stopped"] == "run ended"  # not the --seconds bound
    # summary.json shows the knocking, and that it forced nothing; the clean run saw none
    knocked, clean = (s["admission"] for s in reversed(summaries))
    assert sum(n["refused"] for n in knocked["nodes"].values()) > 0, knocked
    assert sum(knocked["ring_refused_per_rank"]) > 0, knocked
    assert knocked["regroups_per_rank"] == [0, 0], knocked
    assert all(c == 0 for n in clean["nodes"].values() for c in n.values()), clean
    assert clean["ring_refused_per_rank"] == clean["regroups_per_rank"] == [0, 0], clean
