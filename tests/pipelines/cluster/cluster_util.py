"""Shared helpers for the tests that run real clusters (rank processes over ZeroMQ)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.pipelines.cli_util import zerotrain

# a small MLP on little data: every run is a second or two of real processes
SMALL = [
    "--steps", "16",
    "--set", "data.n_train=512",
    "--set", "data.n_eval=128",
    "--set", "model.hidden=[32,32]",
    "--set", "train.batch_size=64",
    "--set", "checkpoint.every=5",
    "--set", "eval.every=0",
    "--set", "cluster.snapshot_every=4",
]  # fmt: skip


def run(run_dir: Path, *args: str, command: str = "run", expect: int = 0) -> dict:
    """`zerotrain COMMAND mlp_classifier SMALL ARGS --run-dir RUN_DIR`; its summary."""
    return run_logged(run_dir, *args, command=command, expect=expect)[0]


def run_logged(
    run_dir: Path, *args: str, command: str = "run", expect: int = 0
) -> tuple[dict, str]:
    """As `run`, and what the command printed on stderr (its progress lines)."""
    proc = zerotrain(command, "mlp_classifier", *SMALL, *args, "--run-dir", str(run_dir))
    assert proc.returncode == expect, proc.stderr[-3000:]
    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if expect == 0 else {"stderr": proc.stderr}
    return summary, proc.stderr


def weights(run_dir: Path) -> np.ndarray:
    from pipelines.store.checkpoint import read_safetensors_file

    tensors, _ = read_safetensors_file(Path(run_dir) / "weights.safetensors")
    return np.concatenate([tensors[k].ravel() for k in sorted(tensors)])
