"""The daemon's costs, measured against `zerotrain run` (issue 18, "Acceptance").

    python scripts/bench_daemon.py            # a few minutes on 2 shared cores
    python scripts/bench_daemon.py --quick    # fewer repetitions

Every job is mlp_classifier, 2 ranks, seed 3, on a daemon of its own (a state dir in a
temp dir, --cpus 4 so two 2-rank jobs run side by side).

  start      submit -> the job's first step (metrics.jsonl's first "t"), from the
             client's clock before the request (the CLI's own start-up is not in it:
             the request goes through pipelines.daemon.client), on an idle daemon whose
             warm job runner is ready (pipelines.daemon.warm); and `zerotrain run`
             cold: process start -> first step. Median of --runs.
  overhead   samples/s of a 300-step job (summary.json) under the daemon over the same
             `zerotrain run`, alternating, median of --runs pairs each. Each measurement
             starts once the daemon's runner is ready (it warms while the daemon is
             idle, and would otherwise take CPU from the cold run), and waits for the
             job's end polling the daemon four times a second (a client polling at 50 Hz
             took CPU from the job's ranks). The cold run gets a session of its own, as
             the daemon gives each job: with Linux's autogroup scheduling a session is
             one scheduling group, and on a machine shared with other sessions a plain
             `zerotrain run` measured 0.67-0.83x of itself in a new session against in
             the caller's (load average 22-27, 2 cores) -- that is placement, not the
             daemon's cost. For the same reason it starts as the daemon starts a job's
             top process (pipelines.daemon.supervisor.launcher_argv), at the jobs' nice
             value (`serve --job-nice`, default 10).
  scrape     the same job's samples/s while a thread GETs /metrics at 10 Hz, over
             without (alternating pairs); and, while two jobs train, the daemon's CPU
             per /metrics request (its CPU time over 100 requests in a row), times 10
             per second, as a share of the CPUs their ranks train on (min(ranks, CPUs
             here)): what a 10 Hz scraper takes from training.
  status     the control call JobStatus (all jobs) while two jobs train, and the
             `zerotrain status` command line (a new Python process each time, bytecode
             cached as in an installed package, whatever PYTHONDONTWRITEBYTECODE says), beside
             its floor: `python -c pass` timed the same way, interleaved,
             --status-samples of each -- wall time (p99, median) and CPU time (median,
             the children's rusage: less moved by the machine's load). The two jobs
             train until cancelled (train.steps = 0), and each must have advanced
             during the sampling (else the figure is void: the script fails); the
             steps they made and the load average during it are printed. Before them,
             the daemon's own CPU use over 5 s of the two jobs training.
  stop       `stop` at a random moment 0.5-3 s after a job's first step -> the job is
             `stopped` (its processes gone), median and max of --stops.

Prints a table -- each figure, its target, pass or fail, and its ratio to the reference
measured in the same run -- and one final JSON line: every figure, the load average
before and after, and "targets": per target its value, bound, value / bound and pass.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.daemon import protocol  # noqa: E402
from pipelines.daemon.client import call  # noqa: E402
from pipelines.daemon.supervisor import JOB_NICE, launcher_argv  # noqa: E402

JOB = ["mlp_classifier", "--ranks", "2", "--seed", "3"]


def _submit_args(steps: int) -> argparse.Namespace:
    """The job, `steps` steps; 0: until stopped (its LR decaying over 2000 steps, no
    eval: the config's early stopping would end it)."""
    return argparse.Namespace(
        config="mlp_classifier",
        ranks=2,
        mode=None,
        steps=steps,
        seed=3,
        model=None,
        overrides=[] if steps else ["schedule.total_steps=2000", "eval.every=0"],
        hooks=[],
        name=None,
        priority=0,
    )


def _first_step_t(run_dir: Path, timeout=120.0) -> float:
    m = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = m.read_text().split("\n", 1)[0]
            if line:
                return json.loads(line)["t"]
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    raise TimeoutError(f"no step in {m}")


def _wait_state(state: Path, job: str, states: set, timeout=300.0, every=0.02) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = call(state, protocol.JobStatus(job))
        if s["state"] in states:
            return s
        time.sleep(every)
    raise TimeoutError(f"job {job} not in {states}")


def _step(state: Path, job: str) -> int:
    """Job ``job``'s step now; RuntimeError unless it is running."""
    s = call(state, protocol.JobStatus(job))
    if s["state"] != "running":
        raise RuntimeError(f"job {job} is {s['state']}, not running")
    return int(s["step"] or 0)


def _wait_warm(state: Path, timeout=120.0) -> None:
    """Until the daemon's warm job runner is ready (it warms while no job runs)."""
    deadline = time.monotonic() + timeout
    while not call(state, protocol.DaemonInfo())["warm"]["ready"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the daemon's warm runner is not ready")
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    def __init__(self, root: Path):
        self.state = root / "state"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "serve",
                "--state-dir",
                str(self.state),
                "--cpus",
                "4",
                "--http",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.info = call(self.state, protocol.DaemonInfo())
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def submit(self, steps: int) -> tuple[str, Path, float]:
        from pipelines.daemon.client import submit_request

        request = submit_request(_submit_args(steps))
        t0 = time.time()
        reply = call(self.state, request)
        return str(reply["id"]), Path(reply["run_dir"]), t0

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _run_cold(root: Path, steps: int) -> tuple[float, dict]:
    run_dir = root / f"run-{time.monotonic_ns()}"
    t0 = time.time()
    subprocess.run(
        [
            *launcher_argv(JOB_NICE),  # at the daemon's jobs' priority: see "overhead"
            "-m",
            "pipelines.cli",
            "run",
            *JOB,
            "--steps",
            str(steps),
            "--run-dir",
            str(run_dir),
        ],
        check=True,
        capture_output=True,
        start_new_session=True,  # as the daemon starts a job: see "overhead" above
    )
    first = json.loads((run_dir / "metrics.jsonl").read_text().split("\n", 1)[0])["t"]
    return first - t0, json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stops", type=int, default=10)
    ap.add_argument(
        "--status-samples",
        type=int,
        default=100,
        help="`zerotrain status` runs (and as many `python -c pass`) for its p99 (default 100)",
    )
    opts = ap.parse_args()
    runs, stops = (2, 3) if opts.quick else (opts.runs, opts.stops)
    rng = random.Random(18)
    root = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    d = Daemon(root)
    http = d.info["http"]
    out: dict = {"load_before": os.getloadavg()[0]}
    try:
        # start latency, and samples/s with and without the daemon
        start, cold, ratio = [], [], []
        for _ in range(runs):
            _wait_warm(d.state)
            job, run_dir, t0 = d.submit(300)
            start.append(_first_step_t(run_dir) - t0)
            done = _wait_state(d.state, job, {"done"}, every=0.25)
            _wait_warm(d.state)
            c, summary = _run_cold(root, 300)
            cold.append(c)
            ratio.append(done["summary"]["samples_per_s"] / summary["samples_per_s"])
        out["start_runs_s"] = start
        out["cold_runs_s"] = cold
        out["samples_ratio_runs"] = ratio
        out["start_s"] = statistics.median(start)
        out["cold_run_start_s"] = statistics.median(cold)
        out["daemon_samples_ratio"] = statistics.median(ratio)
        # /metrics at 10 Hz
        scraped = []
        for _ in range(runs):
            stop = threading.Event()

            def scrape(stop):
                while not stop.is_set():
                    urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read()
                    stop.wait(0.1)

            pair = []
            for with_scrape in (False, True):
                t = threading.Thread(target=scrape, args=(stop,)) if with_scrape else None
                _wait_warm(d.state)
                if t:
                    t.start()
                job, _, _ = d.submit(300)
                done = _wait_state(d.state, job, {"done"}, every=0.25)
                if t:
                    stop.set()
                    t.join()
                pair.append(done["summary"]["samples_per_s"])
            scraped.append(pair[1] / pair[0])
        out["scrape_10hz_samples_ratio"] = statistics.median(scraped)
        # status while two jobs train
        jobs = [d.submit(0)[0] for _ in range(2)]  # train.steps = 0: until cancelled
        for j in jobs:
            _wait_state(d.state, j, {"running"})
        # the daemon's own CPU while they train and nobody asks it anything
        cpu0, t0 = _cpu_seconds(d.proc.pid), time.monotonic()
        time.sleep(5.0)
        out["daemon_cpu_pct_2_jobs"] = (
            100 * (_cpu_seconds(d.proc.pid) - cpu0) / (time.monotonic() - t0)
        )
        # the daemon's CPU per /metrics request, two jobs training
        cpu0 = _cpu_seconds(d.proc.pid)
        for _ in range(100):
            urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read()
        per_scrape = (_cpu_seconds(d.proc.pid) - cpu0) / 100
        out["scrape_daemon_cpu_ms"] = per_scrape * 1e3
        out["scrape_10hz_cpu_share"] = 10 * per_scrape / min(4, len(os.sched_getaffinity(0)))
        calls, clis, floor, cli_cpu, floor_cpu = [], [], [], [], []
        for _ in range(200):
            t = time.perf_counter()
            call(d.state, protocol.JobStatus(""))
            calls.append(time.perf_counter() - t)
        # the command a user types: the environment's `zerotrain` script
        script = Path(sys.executable).with_name("zerotrain")
        cli = [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]
        status = [*cli, "status", "--state-dir", str(d.state)]
        # as installed: with bytecode caching (an environment that sets
        # PYTHONDONTWRITEBYTECODE compiles every module changed since its last .pyc at
        # every start), its .pyc files written by one run first
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run(status, check=True, capture_output=True, env=env)
        steps0 = [_step(d.state, j) for j in jobs]
        out["load_status"] = [os.getloadavg()[0]]
        for _ in range(opts.status_samples):
            for argv, into, cpu in (
                (status, clis, cli_cpu),
                ([sys.executable, "-c", "pass"], floor, floor_cpu),
            ):
                c, t = _children_cpu(), time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True, env=env)
                into.append(time.perf_counter() - t)
                cpu.append(_children_cpu() - c)
        out["load_status"].append(os.getloadavg()[0])
        trained = [_step(d.state, j) - s for j, s in zip(jobs, steps0, strict=True)]
        out["status_jobs_steps"] = trained
        if min(trained) <= 0:
            raise RuntimeError(f"a job did not train while `status` was sampled: {trained}")
        for j in jobs:
            call(d.state, protocol.Control("cancel", j))
            _wait_state(d.state, j, {"cancelled"})

        def p99(xs):
            return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]

        out["status_call_p99_ms"] = p99(calls) * 1e3
        out["status_call_median_ms"] = statistics.median(calls) * 1e3
        out["status_cli_p99_ms"] = p99(clis) * 1e3
        out["status_cli_median_ms"] = statistics.median(clis) * 1e3
        out["python_pass_p99_ms"] = p99(floor) * 1e3
        out["python_pass_median_ms"] = statistics.median(floor) * 1e3
        out["status_cli_cpu_ms"] = statistics.median(cli_cpu) * 1e3
        out["python_pass_cpu_ms"] = statistics.median(floor_cpu) * 1e3
        # stop at random moments
        stop_s = []
        for _ in range(stops):
            job, run_dir, _ = d.submit(2000)
            _first_step_t(run_dir)
            time.sleep(rng.uniform(0.5, 3.0))
            t = time.monotonic()
            call(d.state, protocol.Control("stop", job))
            _wait_state(d.state, job, {"stopped"})
            stop_s.append(time.monotonic() - t)
            call(d.state, protocol.Control("cancel", job))
        out["stop_median_s"] = statistics.median(stop_s)
        out["stop_max_s"] = max(stop_s)
    finally:
        d.close()
        shutil.rmtree(root, ignore_errors=True)
        out["load_after"] = os.getloadavg()[0]
    out["start_over_cold"] = out["start_s"] / out["cold_run_start_s"]
    out["status_cli_over_python_pass"] = out["status_cli_p99_ms"] / out["python_pass_p99_ms"]
    out["status_cli_cpu_over_python_pass"] = out["status_cli_cpu_ms"] / out["python_pass_cpu_ms"]
    # (figure, key, bound: ("<" or ">", number) or None, reference key or None)
    rows = [
        ("submit -> first step (s)", "start_s", ("<", 0.5), "cold_run_start_s"),
        ("zerotrain run cold -> first step (s)", "cold_run_start_s", None, None),
        ("samples/s, daemon / zerotrain run", "daemon_samples_ratio", (">", 0.98), None),
        ("samples/s, /metrics at 10 Hz / none", "scrape_10hz_samples_ratio", (">", 0.99), None),
        ("daemon CPU per /metrics request (ms)", "scrape_daemon_cpu_ms", None, None),
        ("/metrics at 10 Hz, share of ranks' CPUs", "scrape_10hz_cpu_share", ("<", 0.01), None),
        ("status call, 2 jobs training, p99 (ms)", "status_call_p99_ms", ("<", 100), None),
        (
            "zerotrain status CLI, p99 (ms)",
            "status_cli_p99_ms",
            ("<", 100),
            "python_pass_p99_ms",
        ),
        ("python -c pass, p99 (ms)", "python_pass_p99_ms", None, None),
        ("zerotrain status CLI, CPU (ms)", "status_cli_cpu_ms", None, "python_pass_cpu_ms"),
        ("python -c pass, CPU (ms)", "python_pass_cpu_ms", None, None),
        ("daemon CPU, 2 jobs training (% of a CPU)", "daemon_cpu_pct_2_jobs", None, None),
        ("stop -> stopped, median (s)", "stop_median_s", None, None),
        ("stop -> stopped, max (s)", "stop_max_s", None, None),
    ]
    targets = {}
    print(f"{'figure':<42} {'value':>10}  {'target':<8} {'':<4} {'/ reference':>11}")
    for name, key, bound, ref in rows:
        value, verdict, shown = out[key], "", ""
        if bound is not None:
            op, limit = bound
            ok = value < limit if op == "<" else value > limit
            verdict, shown = ("pass" if ok else "FAIL"), f"{op} {limit:g}"
            targets[key] = {
                "value": _rounded(value),
                "target": shown,
                "over_target": _rounded(value / limit),
                "pass": ok,
            }
        ratio = f"{value / out[ref]:10.2f}x" if ref else ""
        print(f"{name:<42} {value:10.3f}  {shown:<8} {verdict:<4} {ratio:>11}")
    print(f"load average {out['load_before']:.2f} before, {out['load_after']:.2f} after")
    print(
        "status sampled while the two jobs trained {} and {} steps; load average {:.2f} "
        "then {:.2f}".format(*out["status_jobs_steps"], *out["load_status"])
    )
    passed = sum(t["pass"] for t in targets.values())
    print(f"targets: {passed} of {len(targets)} pass")
    print(json.dumps({**{k: _rounded(v) for k, v in out.items()}, "targets": targets}))


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _rounded(value):
    return [round(v, 4) for v in value] if isinstance(value, list) else round(value, 4)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
