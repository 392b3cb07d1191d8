"""A live 2-rank run under fuzz (issue 21): it exits 0, no rank restarts, same bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ARGS = ["run", "mlp_classifier", "--ranks", "2", "--mode", "zero2", "--steps", "150",
        "--seed", "11"]  # fmt: skip


def start(run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", *ARGS, "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_thousands_of_hostile_messages_on_every_endpoint_change_nothing(tmp_path):
    clean = start(tmp_path / "clean")
    assert clean.wait(timeout=300) == 0
    run = start(tmp_path / "fuzzed")
    attacker = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_fuzz.py"), "--attack",
         str(tmp_path / "fuzzed"), "--seconds", "60", "--rate", "400"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err.decode()[-2000:]
    done = json.loads(attacker.stdout.splitlines()[-1])
    assert done["messages"] >= 2000 and done["connections"] >= 100, done
    assert all(n > 0 for n in done["per_endpoint"].values()), done
    summaries = [
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("clean", "fuzzed")
    ]
    assert summaries[1]["restarts"] == 0
    assert summaries[1]["params_sha256"] == summaries[0]["params_sha256"]
