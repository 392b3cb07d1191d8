"""The daemon under a long soak: jobs back to back with chaos, its RSS and open fds watched.

    python scripts/soak_daemon.py               # 30 minutes
    python scripts/soak_daemon.py --minutes 5

One `zerotrain serve` (a state dir in a temp dir, --cpus 2, --http on a free loopback
port) runs 2-rank mlp_classifier jobs (a 784-32-32-10 MLP on 512 samples, 2000 steps,
a checkpoint every 50, seeds cycling over --seeds) one after the other until the time is
up. Each job gets one chaos event at a random step 50-1000 (as its progress reports it),
in turn:

  none          nothing
  kill-rank     SIGKILL of one rank process: the run replaces it and replays
  stall-rank    SIGSTOP of one rank for heartbeat timeout + 1 s: the run kills and
                replaces it
  pause-resume  pause (every process gone), then resume from the checkpoint
  stop-resume   stop, then resume from the checkpoint

and must end `done` with the params_sha256 of `zerotrain run` of the same config and
seed (computed once per seed). Meanwhile a thread samples the daemon's RSS
(/proc/PID/status VmRSS) and open fds (/proc/PID/fd) every second, scrapes /metrics and
asks the daemon's status. RSS growth is measured from the end of the first job (imports
and first allocations done) to the end of the soak, and at each quarter of that time;
fds from the same point.

Prints one line per job, a summary table and a final JSON line. Exit 1 if any job's hash
differs or a job fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.daemon import protocol  # noqa: E402
from pipelines.daemon.client import call, submit_request  # noqa: E402

CHAOS = ("none", "kill-rank", "stall-rank", "pause-resume", "stop-resume")
OVERRIDES = [
    "model.hidden=[32,32]",
    "data.n_train=512",
    "data.n_eval=128",
    "train.batch_size=64",
    "eval.early_stopping.patience=0",
    "checkpoint.every=50",
]
STEPS = 2000
HEARTBEAT_TIMEOUT = 2.0  # cluster.heartbeat_timeout's default
ENDED = ("done", "failed", "cancelled")


def _args(seed: int) -> argparse.Namespace:
    return argparse.Namespace(
        config="mlp_classifier",
        ranks=2,
        mode=None,
        steps=STEPS,
        seed=seed,
        model=None,
        overrides=list(OVERRIDES),
        hooks=[],
        name=None,
        priority=0,
    )


def _reference(root: Path, seed: int) -> str:
    run_dir = root / f"ref-{seed}"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "mlp_classifier", "--ranks", "2"]
    cmd += ["--steps", str(STEPS), "--seed", str(seed), "--run-dir", str(run_dir)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((run_dir / "summary.json").read_text())["params_sha256"]


def _rss_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _quarters(samples: list[tuple[float, int, int]], t_first: float) -> list[float]:
    """RSS (MB) at the first sample past each quarter of the time after the first job:
    whether the growth levels off or goes on."""
    later = [(t, rss) for t, rss, _ in samples if t >= t_first]
    if not later:
        return []
    span = later[-1][0] - t_first
    marks = [t_first + span * q / 4 for q in (1, 2, 3, 4)]
    return [round(next(r for t, r in later if t >= mark) / 2**20, 2) for mark in marks]


def _wait(state: Path, job: str, pred, timeout=300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = call(state, protocol.JobStatus(job))
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job}: {s['state']} at step {s['step']}")
        time.sleep(0.05)


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    try:
        return json.loads((run_dir / "live" / f"rank-{rank}.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _chaos(state: Path, job: str, run_dir: Path, kind: str, rng: random.Random) -> str:
    """Apply ``kind`` to the running job; what was done (or why not)."""
    if kind == "none":
        return "none"
    if kind in ("kill-rank", "stall-rank"):
        rank = rng.randrange(2)
        pid = _rank_pid(run_dir, rank)
        if pid is None:
            return f"{kind}: no live pid"
        try:
            os.kill(pid, signal.SIGKILL if kind == "kill-rank" else signal.SIGSTOP)
        except ProcessLookupError:
            return f"{kind}: rank {rank} already gone"
        if kind == "stall-rank":
            time.sleep(HEARTBEAT_TIMEOUT + 1.0)
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # killed by the run meanwhile, as it should be
        return f"{kind} rank {rank}"
    verb = kind.split("-")[0]
    try:
        call(state, protocol.Control(verb, job))
    except Exception as err:  # the job ended first: a verb that no longer fits
        return f"{kind}: {err}"
    settled = {"pause": "paused", "stop": "stopped"}[verb]
    s = _wait(state, job, lambda s: s["state"] in (settled, "done", "failed"))
    if s["state"] != settled:
        return f"{kind}: job {s['state']} first"
    time.sleep(0.5)
    call(state, protocol.Control("resume", job))
    return f"{kind} at step {s['step']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seeds", type=int, default=3, help="distinct job seeds (references)")
    ap.add_argument("--rng", type=int, default=1, help="seed of the chaos choices")
    args = ap.parse_args()
    rng = random.Random(args.rng)
    root = Path(tempfile.mkdtemp(prefix="zerotrain-soak-"))
    state = root / "state"
    daemon = None
    try:
        print(f"references: zerotrain run for seeds 0..{args.seeds - 1}", flush=True)
        refs = {seed: _reference(root, seed) for seed in range(args.seeds)}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--state-dir", str(state)]
            + ["--cpus", "2", "--http", "127.0.0.1:0"],
            stdout=open(root / "serve.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                call(state, protocol.DaemonInfo())
                break
            except Exception:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise
                time.sleep(0.05)
        where = json.loads((state / "http.json").read_text())
        url = f"http://{where['host']}:{where['port']}/metrics"

        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()

        def sampler():
            while not stop.wait(1.0):
                try:
                    samples.append((time.monotonic(), *_rss_fds(daemon.pid)))
                    urllib.request.urlopen(url, timeout=10).read()
                    call(state, protocol.JobStatus(""))
                except Exception as err:  # reported, the soak goes on
                    print(f"sampler: {err}", flush=True)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        t_end = time.monotonic() + args.minutes * 60
        jobs, after_first = [], None
        n = 0
        while time.monotonic() < t_end:
            seed, kind = n % args.seeds, CHAOS[n % len(CHAOS)]
            n += 1
            reply = call(state, submit_request(_args(seed)))
            job, run_dir = str(reply["id"]), Path(reply["run_dir"])
            at = rng.randrange(50, 1000)
            _wait(state, job, lambda s, at=at: (s["step"] or 0) >= at or s["state"] in ENDED)
            did = _chaos(state, job, run_dir, kind, rng)
            s = _wait(state, job, lambda s: s["state"] in ENDED)
            ok = s["state"] == "done" and s["params_sha256"] == refs[seed]
            ranks_replaced = (s.get("summary") or {}).get("restarts")
            jobs.append(
                {
                    "job": int(job),
                    "seed": seed,
                    "chaos": did,
                    "state": s["state"],
                    "job_restarts": s["restarts"],
                    "ranks_replaced": ranks_replaced,
                    "hash_ok": ok,
                }
            )
            print(
                f"job {job:>4} seed {seed} {did:<34} {s['state']:<6} job restarts "
                f"{s['restarts']}, ranks replaced {ranks_replaced}, hash "
                f"{'ok' if ok else 'DIFFERS'}",
                flush=True,
            )
            if after_first is None:
                after_first, t_first = _rss_fds(daemon.pid), time.monotonic()
        stop.set()
        thread.join(5)
        last = _rss_fds(daemon.pid)
        rss0, fd0 = after_first
        fds = [f for _, _, f in samples]
        result = {
            "minutes": args.minutes,
            "jobs": len(jobs),
            "hash_ok": sum(j["hash_ok"] for j in jobs),
            "hash_differs": [j["job"] for j in jobs if not j["hash_ok"]],
            "rss_after_first_job_mb": round(rss0 / 2**20, 2),
            "rss_end_mb": round(last[0] / 2**20, 2),
            "rss_max_mb": round(max(r for _, r, _ in samples) / 2**20, 2) if samples else None,
            "rss_growth_pct": round(100.0 * (last[0] - rss0) / rss0, 2),
            "rss_by_quarter_mb": _quarters(samples, t_first),
            "fds_after_first_job": fd0,
            "fds_end": last[1],
            "fds_min": min(fds) if fds else None,
            "fds_max": max(fds) if fds else None,
            "samples": len(samples),
        }
        print()
        for key, value in result.items():
            print(f"  {key:<24} {value}")
        print(json.dumps(result))
        sys.exit(0 if not result["hash_differs"] else 1)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
