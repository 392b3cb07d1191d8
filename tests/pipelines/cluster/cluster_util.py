"""Shared helpers for the tests that run real clusters (rank processes over ZeroMQ):
small runs of one host, and node agents -- one `zerotrain run` process per host -- for
the multi-node tests (test_nodes, test_nodes_secure, test_netns)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.pipelines.cli_util import BLAS_THREAD_VARS, REPO, zerotrain

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


# ---- node agents -----------------------------------------------------------------------

# what a launcher sets: an agent's identity must come from its flags and `env` alone
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "RANK", "GROUP_RANK")
LAUNCH_PREFIXES = ("ZEROTRAIN_", "SLURM", "PET_", "TORCHELASTIC_")


def free_port(host: str = "127.0.0.2") -> int:
    """A tcp port free on `host` a moment ago (a master port for a run)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_env(extra: dict) -> dict:
    """The test's environment without BLAS thread counts and launcher variables, this
    checkout first on PYTHONPATH, then `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in BLAS_THREAD_VARS and k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def agent(
    args, env: dict, cwd: Path, name: str, wrap: Callable[[list], list] | None = None
) -> subprocess.Popen:
    """`zerotrain ARGS` as a node agent in a session of its own (a failed test kills
    each agent's whole group), its stderr to CWD/NAME.err (kept as its `err_path`);
    `wrap` turns the command into another (test_netns: run it in a namespace)."""
    argv = [sys.executable, "-m", "pipelines.cli", *args]
    proc = subprocess.Popen(
        wrap(argv) if wrap else argv,
        env=launch_env(env),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=open(cwd / f"{name}.err", "w"),
        start_new_session=True,
    )
    proc.err_path = cwd / f"{name}.err"
    return proc


def finish(agents: dict, timeout: float = 300) -> dict:
    """Wait for every agent; {name: (exit code, its own stderr)}; kill what is left on
    failure."""
    results = {}
    try:
        deadline = time.monotonic() + timeout
        for name, proc in agents.items():
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
            results[name] = (code, proc.err_path.read_text())
    finally:
        kill_left(agents)
    return results


def kill_left(agents: dict) -> None:
    """SIGKILL the process group of every agent still running, and reap it."""
    for proc in agents.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def reference_sha(tmp_path_factory, *run_args: str) -> str:
    """params_sha256 of `zerotrain *run_args` on one host, in a fresh run dir: the bits a
    multi-node run of the same config must give."""
    run_dir = tmp_path_factory.mktemp("one_host") / "run"
    done = zerotrain(*run_args, "--run-dir", str(run_dir), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return params_sha256(run_dir)


def params_sha256(run_dir: Path) -> str:
    """The run's params_sha256 (its summary.json)."""
    return json.loads((Path(run_dir) / "summary.json").read_text())["params_sha256"]


def rank_pids(agent_pid: int) -> list[int]:
    """The rank processes an agent started (its children running pipelines.cluster.rank)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and b"pipelines.cluster.rank" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def steps_logged(run_dir: Path) -> int:
    """Lines in node 0's metrics.jsonl: the steps the run has logged."""
    try:
        return len((Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_for_steps(run_dir: Path, agents: dict, n: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while steps_logged(run_dir) < n:
        assert time.monotonic() < deadline, f"no {n} steps within {timeout:g} s"
        assert all(p.poll() is None for p in agents.values()), "an agent ended early"
        time.sleep(0.1)


def wait_for_line(path: Path, text: str, agents: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {path.name} within {timeout:g} s"
        assert all(p.poll() is None for p in agents.values()), "an agent ended early"
        time.sleep(0.1)
