"""Recovery from a killed rank, zerotrain against torchrun (issue 5, "Performance").

    python scripts/bench_recovery.py            # about 8-10 minutes on 2 shared cores
    python scripts/bench_recovery.py --quick    # a smoke run: 2 kills each, 4 chaos runs
    python scripts/bench_recovery.py --no-torch # zerotrain only

Part 1 -- SIGKILL one rank of 4 on the default pipeline (char_lm: 2 layers, d_model 128,
seq 64, global batch 32) and time the fault -> the next completed step.

    zerotrain `zerotrain simulate --ranks 4 --steps 30 --chaos
              kill:rank=R,step=20,at=compute`: rank R sends itself SIGKILL 2 ms into the
              compute of step 21 (the in-memory snapshot of step 20 is the restore
              point, cluster.snapshot_every = 10). The figure is recovery.json's
              recovery_s (the coordinator's clock: the kill -> the first step completed
              by the regrouped ranks). The run's params_sha256 is also compared with
              the fault-free run of the same config.
    torchrun  `python -m torch.distributed.run --standalone --nproc-per-node 4
              --max-restarts 3 scripts/_torch_elastic_worker.py ...`: the same model,
              batch and AdamW + clipping, DDP over gloo, one thread per worker, the
              usual elastic recipe (rank 0 checkpoints every 10 steps, every worker
              of a restarted group loads it). Once rank 0 has logged step 20 the
              benchmark sends SIGKILL to worker R; the figure is the kill (our clock,
              just before os.kill) -> the first step logged by the restarted group.
              torchrun restarts the whole group: new processes, torch imported again,
              gloo rendezvous, DDP rebuilt. A run counts as recovered when such a step
              is logged within --torch-timeout seconds (default 30); the others are
              listed with the reason (the last error line torchrun printed).
              Two variants, each run --torch-runs times (default 4):
                torchrun   the worker calls init_process_group("gloo") as torch's docs do.
                           Here most restarted groups never train again: gloo's
                           connectFullMesh gets "Connection refused" (apparently the new
                           workers read peer addresses that an earlier group left in
                           the agent's store: the same dead port shows up in two
                           restarts, and the prefix below cures it), or a restart hangs.
                torchrun+  the worker inits gloo under a per-restart prefix of the same
                           store (--store-prefix-per-restart), which avoids the stale
                           addresses; the restart path is otherwise the same.
              The ratio is torchrun's median over every restart that recovered (either
              variant) over zerotrain's median.

R cycles over 1, 2, 3, 0 in both systems; the runs alternate between the systems. Each
figure is the median over the repetitions (min and max shown too).

Part 2 -- M chaos runs of zerotrain (default 20; char_lm, 4 ranks, a SHORT config:
--steps 30, eval off, a disk checkpoint every 10 steps so kills during a checkpoint
write are possible): single SIGKILLs at varied ranks, steps and phases of the step
(start, compute, reduce, gather, checkpoint) and, every fifth run, `random-kill:every=10`
with its own seed (two kills per run). A run passes when its params_sha256 equals the
fault-free run of the same config and every injected fault is in recovery.json as
recovered. Their recovery_s figures are summarised as well.

Part 3 -- planned stops (issue 17): S runs of zerotrain (default 10; char_lm, 4 ranks, the
part 2 config, --steps 100000) each get one signal at a random moment 0-3 s after their
first step -- SIGTERM to the zerotrain process, SIGINT to its process group (a terminal's
Ctrl-C) or SIGUSR1 to one rank, chosen at random (seeded) -- and the figure is the signal
(our clock, just before os.kill) -> the process's exit. A stop counts when the exit code is
4 and the checkpoint its last line names verifies. (torchrun's answer to SIGTERM is to
pass it on and SIGKILL the workers 30 s later, with nothing saved.)

Targets (issue 5): recovery under 1 s; 20 of 20 chaos runs with identical params_sha256.
Issue 17: a stop -> checkpointed exit under 2 s (median and max).
(Issue 5 measured torchrun at about 3.2-3.5 s, and 2-3 of 5 restarts recovering at all.)

The machine's 2 cores are shared, so every time moves; nothing is estimated: a figure
that could not be measured is shown as n/a with the reason. Prints tables, then one JSON
line with every number. A zerotrain run that fails (non-zero exit, a timeout, no
summary) stops the benchmark with a one-line error naming its log, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_WORKER = ROOT / "scripts" / "_torch_elastic_worker.py"
sys.path.insert(0, str(ROOT))  # run from a checkout

RANKS = 4
KILL_STEP = 20  # last completed step when the kill lands (a snapshot step in both systems)
STEPS = 30  # run length of part 1
SNAPSHOT_EVERY = 10  # zerotrain's cluster.snapshot_every default; torch's checkpoint period
# Part 1: the default pipeline, kept to training (no periodic eval; a one-batch final one)
PART1_SETS = {"eval.every": 0, "eval.max_batches": 1}
# Part 2: also a disk checkpoint every 10 steps (kills during its write)
PART2_SETS = {**PART1_SETS, "checkpoint.every": 10}
PHASES = ("start", "compute", "reduce", "gather", "checkpoint")
RUN_TIMEOUT_S = 180.0  # a zerotrain run taking longer is a hang
POLL_S = 0.005
TARGET_RECOVERY_S = 1.0
TARGET_STOP_S = 2.0
STOP_WAYS = ("SIGTERM to the zerotrain process", "SIGINT to its process group", "SIGUSR1 to a rank")


class BenchError(RuntimeError):
    """A zerotrain run failed; str() is one line."""


def zerotrain_cmd() -> list[str]:
    exe = shutil.which("zerotrain")
    return [exe] if exe else [sys.executable, "-m", "pipelines.cli"]


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def shell_line(cmd: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


# ---- zerotrain ---------------------------------------------------------------------------


def zt_run(run_dir: Path, steps: int, sets: dict, chaos: str | None) -> dict:
    """One `zerotrain run` (chaos None) or `simulate`; its summary + recovery + command."""
    cmd = [*zerotrain_cmd(), "simulate" if chaos else "run", "char_lm", "--ranks", str(RANKS)]
    cmd += ["--steps", str(steps), "--run-dir", str(run_dir)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if chaos:
        cmd += ["--chaos", chaos]
    log = run_dir.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session
            proc.wait()
            rc = f"no exit after {RUN_TIMEOUT_S:.0f} s (hung?)"
    where = f"(log {log}; command: {shell_line(cmd)})"
    if rc != 0:
        raise BenchError(f"zerotrain exited {rc}: {last_line(log)} {where}")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise BenchError(f"zerotrain wrote no readable summary.json ({err}) {where}") from None
    recovery = None
    if chaos:
        try:
            recovery = json.loads((run_dir / "recovery.json").read_text())
        except (OSError, ValueError) as err:
            raise BenchError(f"no readable recovery.json ({err}) {where}") from None
    return {"summary": summary, "recovery": recovery, "cmd": shell_line(cmd), "log": str(log)}


def zt_kill_once(work: Path, i: int, rank: int, ref_sha: str) -> dict:
    chaos = f"kill:rank={rank},step={KILL_STEP},at=compute"
    r = zt_run(work / f"p1-zt-{i}", STEPS, PART1_SETS, chaos)
    faults = r["recovery"]["faults"]
    kills = [f for f in faults if f["kind"] == "kill"]
    rec = kills[0]["recovery_s"] if len(kills) == 1 else None
    return {
        "rank": rank,
        "chaos": chaos,
        "recovery_s": rec,
        "detection_s": kills[0]["detection_s"] if kills else None,
        "steps_replayed": kills[0]["steps_replayed"] if kills else None,
        "restored_from": kills[0]["restored_from"] if kills else None,
        "faults": len(faults),
        "identical": r["summary"].get("params_sha256") == ref_sha,
        "cmd": r["cmd"],
    }


def zt_stop_once(work: Path, i: int, rng) -> dict:
    """One run stopped by a signal at a random moment; the signal -> exit time."""
    from pipelines.store import checkpoint as ckpt_mod

    run_dir = work / f"p3-zt-{i}"
    cmd = [*zerotrain_cmd(), "run", "char_lm", "--ranks", str(RANKS), "--steps", "100000"]
    cmd += ["--run-dir", str(run_dir)]
    for key, value in PART2_SETS.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    log = run_dir.with_suffix(".log")
    where = f"(log {log}; command: {shell_line(cmd)})"
    delay, way = rng.uniform(0.0, 3.0), STOP_WAYS[rng.randrange(len(STOP_WAYS))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (metrics.exists() and metrics.stat().st_size):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"zerotrain trained no step: {last_line(log)} {where}")
                time.sleep(POLL_S)
            time.sleep(delay)
            target, sig = proc.pid, signal.SIGTERM
            if way.startswith("SIGINT"):
                target, sig = -proc.pid, signal.SIGINT
            elif way.startswith("SIGUSR1"):
                target, sig = _rank_pids(proc.pid)[rng.randrange(RANKS)], signal.SIGUSR1
            t0 = time.perf_counter()
            os.kill(target, sig)
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
            stop_s = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's session
                proc.wait()
    line = last_line(log)
    named = line.split("; checkpoint ")[1].split(";")[0] if "; checkpoint " in line else None
    try:
        verified = named is not None and bool(ckpt_mod.verify_checkpoint(Path(named)))
    except ckpt_mod.CheckpointError:
        verified = False
    return {
        "way": way,
        "delay_s": round(delay, 3),
        "stop_s": stop_s,
        "exit": rc,
        "checkpointed": rc == 4 and verified,
        "line": line,
        "cmd": shell_line(cmd),
    }


def _rank_pids(pgid: int) -> list[int]:
    """The rank processes of the run whose process group is `pgid`, by rank order of pid."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pipelines.cluster.rank" in cmdline:
            pids.append(int(pid))
    return sorted(pids)


# ---- torchrun ----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for ln in text.splitlines(keepends=True):
        if ln.endswith("\n"):  # a line being written is read next time
            out.append(json.loads(ln))
    return out


def torch_worker_args(cfg) -> list[str]:
    from pipelines.data import VOCAB

    m, opt = cfg.model.options, cfg.optimizer
    if opt.name != "adamw":
        raise BenchError(f"the torch twin trains AdamW; char_lm's optimizer is {opt.name}")
    return [
        "--batch", str(cfg.train.batch_size // RANKS),
        "--lr", repr(opt.lr),
        "--betas", *map(repr, opt.betas),
        "--weight-decay", repr(opt.weight_decay),
        "--clip-norm", repr(cfg.train.clip_norm),
        "--vocab", str(len(VOCAB)),
        "--d-model", str(m["d_model"]),
        "--n-head", str(m["n_head"]),
        "--n-layer", str(m["n_layer"]),
        "--seq-len", str(m["seq_len"]),
    ]  # fmt: skip


def torch_failure_reason(log: Path) -> str:
    """The most telling error line torchrun and its workers printed."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for needle in ("RuntimeError", "Error:", "TimeoutError", "timed out", "error"):
        hits = [ln for ln in lines if needle in ln and "Connection closed by peer" not in ln]
        if hits:
            return hits[-1][:240]
    return lines[-1][:240] if lines else "(no output)"


def torch_kill_once(
    work: Path, i: int, rank: int, wargs: list[str], timeout: float, variant: str
) -> dict:
    """One torchrun run, worker `rank` SIGKILLed after step KILL_STEP; never raises.

    variant "default": the worker's init_process_group("gloo") as in torch's docs;
    "prefix": the worker inits gloo under a per-restart prefix of the agent's store."""
    tag = work / f"p1-torch-{variant}-{i}"
    if variant == "prefix":
        wargs = [*wargs, "--store-prefix-per-restart"]
    steps_log, pids_log = Path(f"{tag}.steps.jsonl"), Path(f"{tag}.steps.jsonl.pids")
    log = Path(f"{tag}.log")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(RANKS), "--max-restarts", "3", str(TORCH_WORKER),
        "--steps", str(STEPS), "--ckpt-every", str(SNAPSHOT_EVERY),
        "--step-log", str(steps_log), "--ckpt", f"{tag}.pt", *wargs,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = {"variant": variant, "rank": rank, "recovered": False, "recovery_s": None}
    res.update(reason="", cmd=shell_line(cmd))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            res.update(_torch_watch(proc, steps_log, pids_log, rank, timeout))
            if res["recovered"]:
                try:
                    proc.wait(timeout=timeout)  # the rest of the run: does it finish?
                except subprocess.TimeoutExpired:
                    pass
            elif not res["reason"]:
                res["reason"] = torch_failure_reason(log)
            else:  # timed out: what the restarts printed before hanging
                res["reason"] += f"; last error: {torch_failure_reason(log)}"
        finally:
            res["exit"] = _end_torchrun(proc, pids_log)
    if not res["recovered"] and not res["reason"]:
        res["reason"] = torch_failure_reason(log)
    res["log"] = str(log)
    return res


def _torch_watch(proc, steps_log: Path, pids_log: Path, rank: int, timeout: float) -> dict:
    deadline = time.time() + 300.0  # reaching the kill step at all
    while True:
        recs = read_jsonl(steps_log)
        if recs and recs[-1]["step"] >= KILL_STEP:
            break
        if proc.poll() is not None:
            return {"reason": f"torchrun exited {proc.returncode} before step {KILL_STEP}"}
        if time.time() > deadline:
            return {"reason": f"no step {KILL_STEP} within 300 s"}
        time.sleep(POLL_S)
    pid = next((p["pid"] for p in read_jsonl(pids_log) if p["rank"] == rank), None)
    if pid is None:
        return {"reason": f"worker {rank} never logged its pid"}
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)  # our own descendant (pid from its own log line)
    deadline = t_kill + timeout
    while time.time() < deadline:
        after = [r for r in read_jsonl(steps_log) if r["restart"] > 0]
        if after:
            return {
                "recovered": True,
                "recovery_s": after[0]["t"] - t_kill,
                "restart": after[0]["restart"],
                "resumed_from": after[0]["resumed_from"],
            }
        if proc.poll() is not None:
            return {"reason": ""}  # filled from the log
        time.sleep(POLL_S)
    return {"reason": f"no step within {timeout:.0f} s of the kill"}


def _end_torchrun(proc, pids_log: Path):
    """torchrun's exit code, or how it was ended; no worker of ours is left running."""
    how = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the agent stops its workers
        try:
            proc.wait(timeout=15)
            how = f"terminated ({proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            how = "killed"
    for p in read_jsonl(pids_log):  # workers run in sessions of their own
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return how if how is not None else proc.returncode


# ---- part 2 ------------------------------------------------------------------------------


def chaos_specs(m: int, steps: int) -> list[tuple[str, int]]:
    """(SPEC, number of kills) for run i = 0..m-1: varied rank, step and phase."""
    specs = []
    for i in range(m):
        if i % 5 == 4:
            every = 10
            specs.append((f"random-kill:every={every},seed={i}", len(range(every, steps, every))))
            continue
        phase = PHASES[(i - i // 5) % len(PHASES)]
        if phase == "checkpoint":  # after the shard file of a disk-checkpoint step
            step = 10 if (i // 5) % 2 == 0 else 20
        else:
            step = 3 + (7 * i) % (steps - 5)
        specs.append((f"kill:rank={i % RANKS},step={step},at={phase}", 1))
    return specs


def chaos_once(work: Path, i: int, spec: str, kills: int, steps: int, ref_sha: str) -> dict:
    r = zt_run(work / f"p2-{i:02d}", steps, PART2_SETS, spec)
    faults = r["recovery"]["faults"]
    sha = r["summary"].get("params_sha256")
    unrecovered = [f for f in faults if f.get("recovery_s") is None]
    ok = sha == ref_sha and len(faults) == kills and not unrecovered
    why = []
    if sha != ref_sha:
        why.append(f"params_sha256 {str(sha)[:12]} != {ref_sha[:12]}")
    if len(faults) != kills:
        why.append(f"{len(faults)} faults recorded, {kills} injected")
    if unrecovered:
        why.append(f"{len(unrecovered)} fault(s) without recovery_s")
    return {
        "spec": spec,
        "identical": sha == ref_sha,
        "ok": ok,
        "why": "; ".join(why),
        "restarts": r["summary"].get("restarts"),
        "recovery_s": [f["recovery_s"] for f in faults],
        "replayed": [f["steps_replayed"] for f in faults],
        "restored_from": [f["restored_from"] for f in faults],
        "wall_s": r["summary"].get("wall_s"),
        "cmd": r["cmd"],
    }


# ---- summary -----------------------------------------------------------------------------


def stats(values) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_s(st: dict | None) -> str:
    if not st:
        return "n/a"
    return f"{st['median']:.3f} s (min {st['min']:.3f}, max {st['max']:.3f}, n={st['n']})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 kills per system, 4 chaos runs")
    p.add_argument("--reps", type=int, help="kills per system in part 1 (default 5)")
    p.add_argument("--torch-runs", type=int,
                   help="torchrun runs per variant (default 4; --quick 1)")  # fmt: skip
    p.add_argument("--chaos-runs", type=int, help="zerotrain chaos runs in part 2 (default 20)")
    p.add_argument("--chaos-steps", type=int, default=30, help="steps of a chaos run")
    p.add_argument(
        "--torch-timeout",
        type=float,
        default=30.0,
        help="seconds after the kill for torchrun's first step (default 30)",
    )
    p.add_argument("--stops", type=int, help="signalled runs in part 3 (default 10)")
    p.add_argument("--stop-only", action="store_true", help="part 3 only")
    p.add_argument("--no-torch", action="store_true", help="skip torchrun")
    p.add_argument("--keep", action="store_true", help="keep the run dirs and logs")
    args = p.parse_args(argv)  # fmt: skip
    reps = args.reps or (2 if args.quick else 5)
    torch_runs = args.torch_runs if args.torch_runs is not None else (1 if args.quick else 4)
    m = args.chaos_runs if args.chaos_runs is not None else (4 if args.quick else 20)
    stops = args.stops if args.stops is not None else (3 if args.quick else 10)
    if args.stop_only:
        reps, m, args.no_torch = 0, 0, True
    if args.chaos_steps < 25:
        p.error("--chaos-steps must be at least 25 (kills go up to step 22)")

    torch_why = None
    if args.no_torch:
        torch_why = "skipped (--no-torch)"
    else:
        try:
            import torch  # noqa: F401
            import torch.distributed.run  # noqa: F401
        except Exception as err:  # noqa: BLE001 -- any import failure means no torch here
            torch_why = f"torch is not usable here: {type(err).__name__}: {err}"
    if torch_why:
        torch_runs = 0

    from pipelines.config import load_config

    cfg = load_config("char_lm", [f"{k}={json.dumps(v)}" for k, v in PART1_SETS.items()])
    work = Path(tempfile.mkdtemp(prefix="bench_recovery-"))
    t0 = time.time()
    print(f"bench_recovery: work dir {work}; char_lm, {RANKS} ranks, global batch "
          f"{cfg.train.batch_size}; part 1: {reps} zerotrain kills, {torch_runs} + "
          f"{torch_runs} torchrun kills ({STEPS} steps, kill after step {KILL_STEP}); "
          f"part 2: {m} chaos runs of --steps {args.chaos_steps}", flush=True)  # fmt: skip
    try:
        result = run_all(args, work, cfg, reps, torch_runs, m, torch_why, stops)
    except BenchError as err:
        print(f"bench_recovery: error: {err}", file=sys.stderr)
        print(f"bench_recovery: run dirs and logs kept in {work}", file=sys.stderr)
        return 1
    result["total_s"] = round(time.time() - t0, 1)
    report(result)
    if args.keep:
        print(f"run dirs and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))
    return 0


def run_all(
    args, work: Path, cfg, reps: int, torch_runs: int, m: int, torch_why, stops: int
) -> dict:
    say = lambda text: print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731

    # part 1
    ref1 = None
    if reps or torch_runs:
        ref1 = zt_run(work / "p1-ref", STEPS, PART1_SETS, None)["summary"]["params_sha256"]
        say(f"part 1 fault-free reference: params_sha256 {ref1[:16]}")
    wargs = torch_worker_args(cfg) if torch_runs else []
    zt, tr = [], []
    for i in range(max(reps, torch_runs)):
        rank = [1, 2, 3, 0][i % 4]
        if i < reps:
            r = zt_kill_once(work, i, rank, ref1)
            zt.append(r)
            rec = "n/a" if r["recovery_s"] is None else f"{r['recovery_s']:.3f} s"
            say(f"zerotrain kill rank {rank}: recovery {rec}, detection "
                f"{r['detection_s'] if r['detection_s'] is None else round(r['detection_s'], 3)}"
                f" s, replayed {r['steps_replayed']} from {r['restored_from']}, "
                f"identical sha {r['identical']}")  # fmt: skip
        for variant in ("default", "prefix") if i < torch_runs else ():
            r = torch_kill_once(work, i, rank, wargs, args.torch_timeout, variant)
            tr.append(r)
            if r["recovered"]:
                say(f"torchrun ({variant}) kill worker {rank}: recovery "
                    f"{r['recovery_s']:.3f} s (restart {r['restart']}, resumed from step "
                    f"{r['resumed_from']}), exit {r['exit']}")  # fmt: skip
            else:
                say(f"torchrun ({variant}) kill worker {rank}: NOT recovered: {r['reason']} "
                    f"(exit {r['exit']}, log {r['log']})")  # fmt: skip

    # part 2
    steps2 = args.chaos_steps
    chaos = []
    if m:
        ref2 = zt_run(work / "p2-ref", steps2, PART2_SETS, None)["summary"]["params_sha256"]
        say(f"part 2 fault-free reference (--steps {steps2}): params_sha256 {ref2[:16]}")
    for i, (spec, kills) in enumerate(chaos_specs(m, steps2)):
        r = chaos_once(work, i, spec, kills, steps2, ref2)
        chaos.append(r)
        recs = ", ".join("n/a" if x is None else f"{x:.3f}" for x in r["recovery_s"])
        say(f"chaos {i + 1}/{m} {spec}: {'identical' if r['identical'] else 'DIFFERENT'}"
            f"{'' if r['ok'] else ' -- FAIL: ' + r['why']}; recovery [{recs}] s, replayed "
            f"{r['replayed']} from {r['restored_from']}")  # fmt: skip

    # part 3
    import random

    rng = random.Random(17)  # the moments and ways of the signals, the same every time
    stopped = []
    for i in range(stops):
        r = zt_stop_once(work, i, rng)
        stopped.append(r)
        how = "checkpointed" if r["checkpointed"] else f"NOT checkpointed: {r['line']}"
        say(f"stop {i + 1}/{stops} {r['way']} {r['delay_s']:.2f} s after step 1: exit "
            f"{r['exit']} in {r['stop_s']:.3f} s, {how}")  # fmt: skip
    stop_stats = stats(r["stop_s"] for r in stopped if r["checkpointed"])

    zt_stats = stats(r["recovery_s"] for r in zt)
    by_variant = {}
    for variant in ("default", "prefix"):
        runs = [r for r in tr if r["variant"] == variant]
        by_variant[variant] = {
            "recovery_s": stats(r["recovery_s"] for r in runs if r["recovered"]),
            "recovered": sum(r["recovered"] for r in runs),
            "runs": len(runs),
        }
    # the ratio over every torchrun restart that completed a step (both variants restart
    # the same way: whole group, new processes); None when none did
    tr_stats = stats(r["recovery_s"] for r in tr if r["recovered"])
    ratio = None
    if zt_stats and tr_stats:
        ratio = tr_stats["median"] / zt_stats["median"]
    all_chaos_rec = [x for r in chaos for x in r["recovery_s"]]
    return {
        "pipeline": "char_lm",
        "ranks": RANKS,
        "global_batch": cfg.train.batch_size,
        "part1": {
            "steps": STEPS,
            "kill_after_step": KILL_STEP,
            "snapshot_every": SNAPSHOT_EVERY,
            "zerotrain_recovery_s": zt_stats,
            "zerotrain_runs": [
                {
                    k: r[k]
                    for k in (
                        "rank",
                        "recovery_s",
                        "detection_s",
                        "steps_replayed",
                        "restored_from",
                        "identical",
                    )
                }
                for r in zt
            ],  # fmt: skip
            "zerotrain_identical": sum(r["identical"] for r in zt),
            "torchrun_recovery_s": tr_stats,
            "torchrun_recovered": sum(r["recovered"] for r in tr),
            "torchrun_by_variant": by_variant,
            "torchrun_runs": [
                {
                    k: r.get(k)
                    for k in ("variant", "rank", "recovered", "recovery_s", "reason", "exit")
                }
                for r in tr
            ],  # fmt: skip
            "torchrun_timeout_s": args.torch_timeout,
            "torchrun_unavailable": torch_why,
            "ratio_torchrun_over_zerotrain": ratio,
            "zerotrain_cmd_example": zt[0]["cmd"] if zt else None,
            "torchrun_cmd_example": tr[0]["cmd"] if tr else None,
        },
        "part2": {
            "steps": steps2,
            "sets": PART2_SETS,
            "runs": len(chaos),
            "identical": sum(r["identical"] for r in chaos),
            "passed": sum(r["ok"] for r in chaos),
            "faults": len(all_chaos_rec),
            "recovery_s": stats(all_chaos_rec),
            "failures": [
                {"spec": r["spec"], "why": r["why"], "cmd": r["cmd"]} for r in chaos if not r["ok"]
            ],  # fmt: skip
            "specs": [r["spec"] for r in chaos],
        },
        "part3": {
            "runs": len(stopped),
            "checkpointed": sum(r["checkpointed"] for r in stopped),
            "stop_s": stop_stats,
            "stops": [
                {k: r[k] for k in ("way", "delay_s", "stop_s", "exit", "checkpointed")}
                for r in stopped
            ],
            "cmd_example": stopped[0]["cmd"] if stopped else None,
        },
        "targets": {
            "stop_under_s": TARGET_STOP_S,
            "stop_met": bool(stop_stats)
            and stop_stats["max"] < TARGET_STOP_S
            and all(r["checkpointed"] for r in stopped),
            "recovery_under_s": TARGET_RECOVERY_S,
            "recovery_met": bool(zt_stats and zt_stats["median"] < TARGET_RECOVERY_S),
            "chaos_identical_of": [sum(r["identical"] for r in chaos), len(chaos)],
            "chaos_met": bool(chaos) and len(chaos) >= 20 and all(r["ok"] for r in chaos),
        },
    }


def report(res: dict) -> None:
    p1, p2, tg = res["part1"], res["part2"], res["targets"]
    print()
    print(f"Part 1: SIGKILL one rank of {res['ranks']} (char_lm, global batch "
          f"{res['global_batch']}, {p1['steps']} steps, kill after step "
          f"{p1['kill_after_step']}) -> next completed step")  # fmt: skip
    print(f"  {'system':<11} {'recovery (median, min, max)':<46} {'recovered':<12} notes")
    zt_n = len(p1["zerotrain_runs"])
    print(f"  {'zerotrain':<11} {fmt_s(p1['zerotrain_recovery_s']):<46} "
          f"{f'{zt_n} of {zt_n}':<12} params_sha256 identical in "
          f"{p1['zerotrain_identical']} of {zt_n}")  # fmt: skip
    if p1["torchrun_unavailable"]:
        print(f"  {'torchrun':<11} {'n/a':<46} {'n/a':<12} {p1['torchrun_unavailable']}")
    else:
        for variant, label in (("default", "torchrun"), ("prefix", "torchrun+")):
            v = p1["torchrun_by_variant"][variant]
            note = ("init_process_group('gloo'), torch's recipe" if variant == "default"
                    else "gloo under a per-restart store prefix")  # fmt: skip
            count = f"{v['recovered']} of {v['runs']}"
            print(f"  {label:<11} {fmt_s(v['recovery_s']):<46} {count:<12} {note}")
        print(
            f"  (torchrun recovered = a step logged by the restarted group within "
            f"{p1['torchrun_timeout_s']:.0f} s of the kill)"
        )
        for r in p1["torchrun_runs"]:
            if not r["recovered"]:
                print(
                    f"    {r['variant']}: not recovered (worker {r['rank']} killed): {r['reason']}"
                )
    ratio = p1["ratio_torchrun_over_zerotrain"]
    if ratio is not None:
        tr = p1["torchrun_recovery_s"]
        print(
            f"  ratio torchrun / zerotrain (medians; torchrun over all {tr['n']} restarts "
            f"that recovered, {tr['median']:.3f} s): {ratio:.1f}x"
        )
    else:
        print("  ratio: n/a (torchrun recovery not measured)")
    print()
    print(f"Part 2: {p2['runs']} zerotrain chaos runs (char_lm, {res['ranks']} ranks, SHORT "
          f"config: --steps {p2['steps']}, --set "
          f"{' '.join(f'{k}={v}' for k, v in p2['sets'].items())})")  # fmt: skip
    print(f"  identical params_sha256 with the fault-free run: {p2['identical']} of "
          f"{p2['runs']}; passed (identical + every fault recovered): {p2['passed']} of "
          f"{p2['runs']}")  # fmt: skip
    print(f"  recovery over all {p2['faults']} faults: {fmt_s(p2['recovery_s'])}")
    for f in p2["failures"]:
        print(f"  FAILED {f['spec']}: {f['why']}\n    reproduce: {f['cmd']}")
    print()
    p3 = res["part3"]
    print(f"Part 3: {p3['runs']} planned stops (char_lm, {res['ranks']} ranks; a signal at a "
          "random moment -> checkpointed exit, exit code 4)")  # fmt: skip
    print(f"  signal -> exit: {fmt_s(p3['stop_s'])}; checkpointed {p3['checkpointed']} of "
          f"{p3['runs']}")  # fmt: skip
    print()
    zmed = (p1["zerotrain_recovery_s"] or {}).get("median")
    print(f"Targets: recovery < {tg['recovery_under_s']:g} s: "
          f"{'met' if tg['recovery_met'] else 'NOT met'} "
          f"({'n/a' if zmed is None else f'{zmed:.3f} s'}); 20 of 20 identical: "
          f"{'met' if tg['chaos_met'] else 'NOT met'} "
          f"({tg['chaos_identical_of'][0]} of {tg['chaos_identical_of'][1]}); stop < "
          f"{tg['stop_under_s']:g} s: {'met' if tg['stop_met'] else 'NOT met'}")  # fmt: skip
    print(f"Total time {res['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
