"""What gradient hooks cost a training run: every built-in analyzer at every step vs none.

    python scripts/bench_hooks.py                    # char_lm, --ranks 2, 3 rounds (~2 min)
    python scripts/bench_hooks.py --ranks 2,1        # also the single-process runner
    python scripts/bench_hooks.py --quick            # 1 short round: a smoke run

What runs: the default pipeline (char_lm: the config's model, batch and optimizer) for
`--steps` steps with `eval.every=0` (and no periodic checkpoint, a one-batch final eval),
once without hooks and once with `--hook builtin` (all seven built-in analyzers, every
step), for each N of `--ranks`. At N >= 2 the analyzers run in the analyzer process
(SCHED_IDLE, one BLAS thread). A rank copies a sample (its own gradient, its shard of
the reduced gradient, parameters and update) and sends it there only when every rank
has credit -- the analyzer has answered their previous sample -- else the step is
declined ("outbox" drops: nothing copied); at N = 1
the local runner calls the analyzers inline, on the critical path.

How it is measured. The machine has 2 cores shared with other work, so figures move:
the two variants alternate (A B, then B A, ...) for `--rounds` rounds and each figure
is the median over rounds. A run's throughput is steady-state samples/s over the wall
clock between step completions, skipping `--warmup` steps: a thread here notes when
each line of metrics.jsonl appears (polled every 2 ms, line-buffered by the
coordinator), so the work done between steps -- building and casting the hook sample,
the analyzer process competing for the cores -- counts. The run's own per-step median
(metrics.jsonl samples_per_s, which times the step only) is kept in the JSON too.

With hooks, the analyzer's stats say how much it really analyzed (when it falls behind,
the ranks decline samples, by design): steps_analyzed, the analyzer's drops and the
outboxes' declines ("outbox") are printed beside the throughput, so a small drop bought
by skipping every sample shows as such.

Target (issue 6): throughput drops less than 5% with every built-in analyzer at every
step. Prints a table per N, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "char_lm"
QUIET = ["eval.every=0", "eval.max_batches=1", "checkpoint.every=0"]
TARGET_DROP = 0.05
RUN_TIMEOUT_S = 600.0
POLL_S = 0.002


class BenchError(Exception):
    pass


def watch_lines(path: Path, stop: threading.Event, times: list) -> None:
    """Append time.time() to `times` for each new line of `path` until `stop`."""
    seen = 0
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                n = f.read().count(b"\n")
        except FileNotFoundError:
            n = 0
        if n > seen:
            now = time.time()
            times.extend([now] * (n - seen))  # a burst is stamped at when it was seen
            seen = n
        time.sleep(POLL_S)


def run_once(args, ranks: int, hooks: bool, work: Path, tag: str) -> dict:
    run_dir = work / tag
    cmd = [sys.executable, "-m", "pipelines.cli", "run", PIPELINE, "--ranks", str(ranks)]
    cmd += ["--steps", str(args.steps), "--run-dir", str(run_dir)]
    for item in QUIET + list(args.set or []):
        cmd += ["--set", item]
    if hooks and args.every == 1:
        cmd += ["--hook", args.hook]
    elif hooks:
        cmd += ["--set", f'hooks.specs=[{{hook = "{args.hook}", every = {args.every}}}]']
    times: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=watch_lines, args=(run_dir / "metrics.jsonl", stop, times), daemon=True
    )
    log = work / f"{tag}.log"
    with open(log, "wb") as out:
        watcher.start()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session only
            proc.wait()
            rc = f"timeout after {RUN_TIMEOUT_S:.0f} s"
        finally:
            stop.set()
            watcher.join()
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"{tag} exited {rc}: {tail[0]} (log {log})")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "samples_per_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    batch = _global_batch(run_dir)
    w = args.warmup
    if len(steps) <= w + 1 or len(times) < len(steps):
        raise BenchError(f"{tag}: {len(steps)} steps logged ({len(times)} seen), need > {w + 1}")
    t0, t1 = times[w - 1], times[len(steps) - 1]  # completions of step w and of the last
    wall_sps = batch * (len(steps) - w) / (t1 - t0) if t1 > t0 else float("nan")
    analyzer = summary.get("hooks", {}).get("analyzer") or {}
    local = summary.get("hooks", {}) if ranks == 1 else {}
    return {
        "samples_per_s": wall_sps,
        "samples_per_s_step_median": statistics.median(r["samples_per_s"] for r in steps[w:]),
        "steps": len(steps),
        "params_sha256": summary.get("params_sha256"),
        "steps_analyzed": analyzer.get("steps_analyzed"),
        "dropped": analyzer.get("dropped"),
        "hook_errors": analyzer.get("hook_errors"),
        "outbox_dropped": sum(r.get("dropped", 0) for r in summary["hooks"].get("ranks", [])),
        "local_hook_seconds": (
            sum(h["seconds"] for h in local.get("hooks", {}).values()) if local else None
        ),
    }


def _global_batch(run_dir: Path) -> int:
    config = json.loads((run_dir / "config.json").read_text())
    config = config.get("config", config)
    return int(config["train"]["batch_size"])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2", help="comma-separated N (default 2)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out at the start")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="sampling period of the hooks")
    parser.add_argument(
        "--hook", default="builtin", help="the hook spec measured (default: every builtin)"
    )
    parser.add_argument("--set", action="append", help="extra --set KEY=VALUE for every run")
    parser.add_argument("--quick", action="store_true", help="1 round of 50 steps")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 50, 10
    ranks_list = [int(r) for r in args.ranks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_hooks-"))
    results: dict = {}
    try:
        for n in ranks_list:
            runs = {"none": [], "builtin": []}
            for rnd in range(args.rounds):
                order = ["none", "builtin"] if rnd % 2 == 0 else ["builtin", "none"]
                for variant in order:
                    tag = f"n{n}-{variant}-r{rnd}"
                    print(f"  running {tag} ...", file=sys.stderr, flush=True)
                    runs[variant].append(run_once(args, n, variant == "builtin", work, tag))
            results[n] = runs
    except BenchError as err:
        print(f"bench_hooks: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run dirs kept in {work}", file=sys.stderr)

    out = {
        "pipeline": PIPELINE,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "every": args.every,
        "target_drop": TARGET_DROP,
        "results": {},
    }
    print(
        f"\n{PIPELINE}, {args.steps} steps (first {args.warmup} skipped), every built-in "
        f"analyzer every {args.every} step(s) vs none; {args.rounds} alternating round(s), "
        "medians"
    )
    for n, runs in results.items():
        base = median(r["samples_per_s"] for r in runs["none"])
        hooked = median(r["samples_per_s"] for r in runs["builtin"])
        drop = 1.0 - hooked / base if base else None
        base_step = median(r["samples_per_s_step_median"] for r in runs["none"])
        hooked_step = median(r["samples_per_s_step_median"] for r in runs["builtin"])
        same = {r["params_sha256"] for r in runs["none"] + runs["builtin"]}
        print(f"\n--ranks {n}")
        head = f"{'variant':<8} {'samples/s (rounds)':<32} {'median':>8} {'step-only':>10}"
        print(f"  {head}  analyzed")
        for variant, label in (("none", "none"), ("builtin", "builtin")):
            rs = runs[variant]
            per = " ".join(f"{r['samples_per_s']:.1f}" for r in rs)
            med = median(r["samples_per_s"] for r in rs)
            step = median(r["samples_per_s_step_median"] for r in rs)
            if variant == "builtin" and n > 1:
                extra = ", ".join(
                    f"{r['steps_analyzed']}/{r['steps']} (dropped {r['dropped']}, "
                    f"outbox {r['outbox_dropped']})"
                    for r in rs
                )
            elif variant == "builtin":
                spent = (f"{r['local_hook_seconds']:.2f} s in hooks" for r in rs)
                extra = "inline, " + ", ".join(spent)
            else:
                extra = ""
            print(f"  {label:<8} {per:<32} {med:>8.1f} {step:>10.1f}  {extra}")
        verdict = "ok" if drop is not None and drop < TARGET_DROP else "OVER TARGET"
        print(
            f"  drop: {100 * drop:.1f}% (target < {100 * TARGET_DROP:.0f}%: {verdict}); "
            f"step-only drop {100 * (1 - hooked_step / base_step):.1f}%; "
            f"params_sha256 {'identical' if len(same) == 1 else 'DIFFER'} across runs"
        )
        out["results"][str(n)] = {
            "samples_per_s_none": base,
            "samples_per_s_builtin": hooked,
            "drop": drop,
            "step_only_drop": 1 - hooked_step / base_step,
            "meets_target": bool(drop is not None and drop < TARGET_DROP),
            "params_identical": len(same) == 1,
            "runs": runs,
        }
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
