"""Training throughput, zerotrain against PyTorch, for the reference MLP and the default LM.

    python scripts/bench_train.py            # 3 alternating rounds, about 4-5 minutes
    python scripts/bench_train.py --quick    # 1 short round: a smoke run, about a minute
    python scripts/bench_train.py --ranks 1  # zerotrain at N = 1 only (torch rows all run)

What runs (each run a fresh process tree, so cold start is measured too):

    model     the reference MLP (mlp_classifier: 784-1024-1024-10, ReLU, batch 128 per
              rank, synthetic digits) with the config's AdamW and with plain SGD; the
              default transformer (char_lm: 2 layers, d_model 128, seq 64, batch 32 per
              rank -- its config's batch at N = 1) with the config's AdamW + clipping
    zerotrain `zerotrain run PIPELINE --ranks N` for N = 1, 2; train.batch_size is the
              GLOBAL batch, so it is set to per-rank batch x N
    torch     the same model, batch and optimizer (scripts/_bench_torch_train.py): one
              process with 1 thread and with 2 threads, and DDP over gloo with N = 2
              (torchrun, one thread per rank)

How it is measured. The machine has 2 cores shared with other work, so every figure
moves: all runs take turns for `--rounds` rounds (forward order, then reversed, ...) and
each figure is the median over rounds. A run's samples/s is its throughput after
`--warmup` steps, the same way for every system: samples over the wall clock of those
steps. For torch that is the sum of its per-step times (its loop does nothing between
steps); for zerotrain's cluster the time between step completions (record "t"), so work
between steps (snapshots) counts too; for zerotrain at N = 1 the sum of its per-step
times. The per-step medians are kept as samples_per_s_step_median, and the DDP ratio is
printed on them too, "(per-step medians)". (Before 2026-12-02 torch's figure was its
per-step median against zerotrain's wall clock: a median against a mean.)

zerotrain multiplies with the matrix library cykernels.gemm picks (MKL when the [mkl]
extra is installed, as the [bench] extra does; numpy's OpenBLAS otherwise; force one with
ZEROTRAIN_BLAS=mkl|numpy): each round line and the JSON ("blas") say which ran. torch
uses its own MKL. On 2026-12-02 char_lm at N = 2 was 0.97x DDP with numpy's OpenBLAS and
1.10-1.15x with MKL.

Cold start is wall time from spawning the command to the first completed step: for
zerotrain, the first line appearing in metrics.jsonl (polled every 5 ms; the first
record's "t" when it has one); for torch, rank 0's clock after its first step.

Framework overhead is the share of step time outside compute (forward, backward,
optimizer kernels) and wire transfer (time inside collectives): summary.json's
"timing" {"step_s", "compute_s", "comm_s", "other_s"} (per-step means over the run,
warm-up included); without other_s it is step - compute - comm - apply (the optimizer,
reported apart as apply_s), so data fetch and actor messaging count as overhead. A run
whose summary has no timing shows "n/a" -- never an estimate.

Targets (issue 4): at N = 2 at least PyTorch DDP's samples/s with the same optimizer;
framework overhead under 10% of step time; cold start under 2 s (torchrun: about 5 s).

Prints the tables, then one JSON line with every number. A failed run stops the
benchmark with a one-line error (naming the run's log, which is kept) and exit code 1.
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_HELPER = ROOT / "scripts" / "_bench_torch_train.py"
sys.path.insert(0, str(ROOT))  # run from a checkout

RUN_TIMEOUT_S = 300.0
POLL_S = 0.005

# model key -> pipeline, batch per rank, extra optimizers besides the config's own
MODELS = {
    "mlp": {"pipeline": "mlp_classifier", "batch": 128, "also": ("sgd",)},
    "char_lm": {"pipeline": "char_lm", "batch": 32, "also": ()},
}
# Plain SGD for the MLP (the issue quotes PyTorch's SGD figure): same in both systems.
SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.01, "optimizer.weight_decay": 0.0}
# Keep a benchmark run to training: no periodic eval or checkpoint, a one-batch final eval.
QUIET = {"eval.every": 0, "eval.max_batches": 1, "checkpoint.every": 0}

TARGET_OVERHEAD = 0.10
TARGET_COLD_START_S = 2.0


class BenchError(RuntimeError):
    """A run failed; str() is one line."""


@dataclass(frozen=True)
class Case:
    model: str  # a MODELS key
    optimizer: str  # the config's name ("adamw") or "sgd"
    system: str  # "zerotrain" | "torch" | "torch-ddp"
    ranks: int
    threads: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.optimizer}/{self.system}/n{self.ranks}/t{self.threads}"

    @property
    def global_batch(self) -> int:
        return MODELS[self.model]["batch"] * self.ranks


# ---- the runs ----------------------------------------------------------------------------


def overrides_for(case: Case) -> dict:
    over = {"train.batch_size": case.global_batch, **QUIET}
    if case.optimizer == "sgd":
        over.update(SGD)
    return over


def zerotrain_cmd() -> list[str]:
    """The installed console script when there is one, else the same entry point."""
    exe = shutil.which("zerotrain")
    return [exe] if exe else [sys.executable, "-m", "pipelines.cli"]


def spawn(cmd, env, log: Path, poll: Path | None = None):
    """Run `cmd` to the end; (t_launch, t_first_line or None). Killed after RUN_TIMEOUT_S.

    `poll`: a file whose first bytes mark the first completed step (time.time() then).
    """
    seen = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                if poll.stat().st_size > 0:
                    seen["t"] = time.time()
                    return
            except FileNotFoundError:
                pass
            time.sleep(POLL_S)

    with open(log, "wb") as out:
        t_launch = time.time()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        watcher = threading.Thread(target=watch, daemon=True) if poll else None
        if watcher:
            watcher.start()
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's session, nothing else
            proc.wait()
            rc = f"timeout after {RUN_TIMEOUT_S:.0f} s"
        finally:
            stop.set()
            if watcher:
                watcher.join()
    if rc != 0:
        raise BenchError(f"exited {rc}: {last_line(log)} (log {log})")
    return t_launch, seen.get("t")


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    # a Python traceback's last line is the error; skip torch's warnings noise
    return lines[-1] if lines else "(no output)"


def run_zerotrain(case: Case, steps: int, warmup: int, work: Path, tag: str) -> dict:
    run_dir = work / f"{tag}-{case.key.replace('/', '_')}"
    cmd = [
        *zerotrain_cmd(),
        "run",
        MODELS[case.model]["pipeline"],
        "--ranks",
        str(case.ranks),
        "--steps",
        str(steps),
        "--run-dir",
        str(run_dir),
    ]
    for key, value in overrides_for(case).items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    t_launch, t_first = spawn(
        cmd, dict(os.environ), run_dir.with_suffix(".log"), poll=run_dir / "metrics.jsonl"
    )
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    if len(records) <= warmup:
        raise BenchError(f"{case.key}: {len(records)} steps logged, need more than {warmup}")
    timed = records[warmup:]
    step_sps = statistics.median(r["samples_per_s"] for r in timed)
    # without completion times: the steps' own times, summed (a mean, as torch's figure)
    seconds = sum(case.global_batch / r["samples_per_s"] for r in timed)
    sps = case.global_batch * len(timed) / seconds
    stamped = [r["t"] for r in records[warmup - 1 :] if r.get("t") is not None]
    if len(stamped) == len(records) - warmup + 1 and stamped[-1] > stamped[0]:
        # wall clock between step completions: counts what happens between steps too
        # (snapshots, logging), which the per-step figure leaves out
        sps = case.global_batch * (len(stamped) - 1) / (stamped[-1] - stamped[0])
    if records[0].get("t") is not None:
        t_first = min(t_first or records[0]["t"], records[0]["t"])
    timing = summary.get("timing") or {}
    return {
        "samples_per_s": sps,
        "samples_per_s_step_median": step_sps,
        "step_ms": 1e3 * case.global_batch / step_sps,
        "overhead": overhead_share(timing),
        "cold_start_s": None if t_first is None else t_first - t_launch,
        "first_step_s": timing.get("first_step_s", summary.get("first_step_s")),
        "timing": timing or None,
        "final_loss": summary.get("final_loss"),
        "n_params": summary.get("n_params"),
        "blas": summary.get("blas"),
    }


def overhead_share(timing: dict) -> float | None:
    """other / step from summary.json's timing; None when it is not reported."""
    step = timing.get("step_s")
    if not step:
        return None
    other = timing.get("other_s")
    if other is None:
        if timing.get("compute_s") is None or timing.get("comm_s") is None:
            return None
        # the optimizer is compute; the cluster reports it apart as apply_s
        other = step - timing["compute_s"] - timing["comm_s"] - timing.get("apply_s", 0.0)
    return other / step


def torch_args(case: Case, cfg, steps: int, out: Path) -> list[str]:
    opt = cfg.optimizer
    model = cfg.model.options
    args = [
        "--model",
        case.model,
        "--batch",
        str(MODELS[case.model]["batch"]),
        "--steps",
        str(steps),
        "--threads",
        str(case.threads),
        "--out",
        str(out),
        "--optimizer",
        opt.name,
        "--lr",
        repr(opt.lr),
        "--eps",
        repr(opt.eps),
        "--betas",
        *map(repr, opt.betas),
        "--weight-decay",
        repr(opt.weight_decay),
        "--momentum",
        repr(opt.momentum),
        "--clip-norm",
        repr(cfg.train.clip_norm),
    ]
    if opt.nesterov:
        args.append("--nesterov")
    if case.model == "mlp":
        args += ["--hidden", *map(str, model.get("hidden", [1024, 1024]))]
    else:
        from pipelines.data import VOCAB

        for key in ("d_model", "n_head", "n_layer", "seq_len"):
            if key in model:
                args += [f"--{key.replace('_', '-')}", str(model[key])]
        args += ["--vocab", str(len(VOCAB))]
    return args


def run_torch(case: Case, cfg, steps: int, warmup: int, work: Path, tag: str) -> dict:
    name = f"{tag}-{case.key.replace('/', '_')}"
    out = work / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(case.threads))
    if case.system == "torch-ddp":
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(case.ranks),
        ]
    else:
        launcher = [sys.executable]
    t_launch, _ = spawn(
        [*launcher, str(TORCH_HELPER), *torch_args(case, cfg, steps, out)],
        env,
        work / f"{name}.log",
    )
    result = json.loads(out.read_text())
    steps_s = result["step_s"][warmup:]
    # throughput over the wall clock of its steps (torch's loop does nothing between
    # steps), as zerotrain's figure; the per-step median is kept beside it
    return {
        "samples_per_s": case.global_batch * len(steps_s) / sum(steps_s),
        "samples_per_s_step_median": case.global_batch / statistics.median(steps_s),
        "step_ms": 1e3 * sum(steps_s) / len(steps_s),
        "overhead": None,
        "cold_start_s": result["first_step_unix"] - t_launch,
        "final_loss": result["final_loss"],
        "n_params": result.get("n_params"),
    }


def check_same_models(runs: dict[str, list[dict]]) -> None:
    """BenchError unless every run of a model trained the same number of parameters."""
    seen: dict[str, dict[int, str]] = {}
    for key, rs in runs.items():
        for r in rs:
            if r.get("n_params") is not None:
                seen.setdefault(key.split("/")[0], {}).setdefault(r["n_params"], key)
    for model, counts in seen.items():
        if len(counts) > 1:
            shown = ", ".join(f"{k} has {n:,}" for n, k in counts.items())
            raise BenchError(f"{model}: the runs train different models: {shown} parameters")


# ---- the plan and the summary -----------------------------------------------------------


def plan(args, have_torch: bool) -> list[Case]:
    cases = []
    for model in args.models:
        for opt in ("config", *MODELS[model]["also"]):
            name = args.configs[model].optimizer.name if opt == "config" else opt
            for n in args.ranks:
                cases.append(Case(model, name, "zerotrain", n, 1))
            if have_torch:
                cases += [Case(model, name, "torch", 1, t) for t in (1, 2)]
                cases.append(Case(model, name, "torch-ddp", 2, 1))
    return cases


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(runs: list[dict]) -> dict:
    sps = [r["samples_per_s"] for r in runs]
    out = {
        "samples_per_s": statistics.median(sps),
        "samples_per_s_min": min(sps),
        "samples_per_s_max": max(sps),
        "samples_per_s_rounds": sps,
    }
    for key in (
        "samples_per_s_step_median",
        "step_ms",
        "overhead",
        "cold_start_s",
        "first_step_s",
        "final_loss",
    ):
        out[key] = median_or_none(r.get(key) for r in runs)
    out["n_params"] = runs[0].get("n_params")
    if runs[0].get("blas"):  # zerotrain's matrix library (cykernels.gemm)
        out["blas"] = runs[0]["blas"]
    timings = [r["timing"] for r in runs if r.get("timing")]
    if timings:
        out["timing"] = {
            k: median_or_none(t.get(k) for t in timings)
            for k in ("step_s", "compute_s", "apply_s", "comm_s", "data_s", "other_s")
        }
    return out


def ratio(a: dict | None, b: dict | None, key: str = "samples_per_s") -> float | None:
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return a[key] / b[key]


def fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for i, line in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))


def report(cases: list[Case], results: dict[str, dict], args) -> dict:
    rows = []
    for c in cases:
        r = results[c.key]
        rows.append(
            [
                c.model,
                c.optimizer,
                c.system,
                str(c.ranks),
                str(c.threads),
                str(c.global_batch),
                fmt(r["samples_per_s"], ",.0f"),
                f"{r['samples_per_s_min']:,.0f}-{r['samples_per_s_max']:,.0f}",
                fmt(r["step_ms"], ".2f"),
                fmt(
                    None if r["overhead"] is None else 100 * r["overhead"],
                    ".1f",
                    "n/a" if c.system == "zerotrain" else "-",
                ),
                fmt(r["cold_start_s"], ".2f"),
            ]
        )
    print_table(
        f"samples/s, median of {args.rounds} alternating round(s) "
        f"(shared 2-core machine: noisy; 'range' is min-max over rounds)",
        [
            "model",
            "opt",
            "system",
            "N",
            "thr",
            "batch",
            "samples/s",
            "range",
            "step ms",
            "overhead %",
            "cold s",
        ],
        rows,
    )

    def get(model, opt, system, n, t=1):
        return results.get(Case(model, opt, system, n, t).key)

    ratios, targets, ratio_rows = {}, {}, []
    pairs = sorted({(c.model, c.optimizer) for c in cases}, key=lambda p: (p[0] != "mlp", p))
    for model, opt in pairs:
        ours1, ours2 = get(model, opt, "zerotrain", 1), get(model, opt, "zerotrain", 2)
        ddp = get(model, opt, "torch-ddp", 2)
        r = {
            "ours_n2_over_torch_ddp_n2": ratio(ours2, ddp),
            "ours_n2_over_torch_ddp_n2_step_medians": ratio(
                ours2, ddp, "samples_per_s_step_median"
            ),
            "ours_n1_over_torch_1thread": ratio(ours1, get(model, opt, "torch", 1, 1)),
            "ours_n1_over_torch_2threads": ratio(ours1, get(model, opt, "torch", 1, 2)),
            "ours_n2_over_ours_n1": ratio(ours2, ours1),
        }
        ratios[f"{model}/{opt}"] = r
        ratio_rows.append([model, opt, *(fmt(v, ".2f") for v in r.values())])
        v = r["ours_n2_over_torch_ddp_n2"]
        targets[f"{model}/{opt}: N=2 >= torch DDP"] = None if v is None else v >= 1.0
        if ours2 is not None:
            o = ours2["overhead"]
            targets[f"{model}/{opt}: N=2 overhead < 10%"] = (
                None if o is None else o < TARGET_OVERHEAD
            )
    print_table(
        "ratios of samples/s (> 1: zerotrain faster)",
        [
            "model",
            "opt",
            "ours N2 / DDP N2",
            "(per-step medians)",
            "ours N1 / torch 1t",
            "ours N1 / torch 2t",
            "ours N2 / ours N1",
        ],
        ratio_rows,
    )

    cold, cold_rows = {}, []
    models = list(dict.fromkeys(c.model for c in cases))
    for label, system, n in (
        ("zerotrain run --ranks 1", "zerotrain", 1),
        ("zerotrain run --ranks 2", "zerotrain", 2),
        ("python + torch, 1 process", "torch", 1),
        ("torchrun, DDP 2 ranks", "torch-ddp", 2),
    ):
        per_model = {}
        for m in models:
            values = [
                results[c.key]["cold_start_s"]
                for c in cases
                if (c.model, c.system, c.ranks, c.threads) == (m, system, n, 1)
            ]
            if values:
                per_model[m] = median_or_none(values)
        if per_model:
            cold[label] = per_model
            cold_rows.append([label, *(fmt(per_model.get(m), ".2f", "-") for m in models)])
            if system == "zerotrain":
                for m, v in per_model.items():
                    targets[f"{m}: cold start < 2 s, {label}"] = (
                        None if v is None else v < TARGET_COLD_START_S
                    )
    print_table(
        "cold start: command to first completed step, s (median over runs)",
        ["command", *models],
        cold_rows,
    )
    steps = [(c, results[c.key]["timing"]) for c in cases if results[c.key].get("timing")]
    if steps:
        print_table(
            "zerotrain step time breakdown, ms (summary.json timing, per-step means)",
            ["case", "step", "compute", "apply", "comm", "data", "other", "overhead %"],
            [
                [
                    c.key,
                    *(
                        fmt(None if t.get(k) is None else 1e3 * t[k], ".2f")
                        for k in ("step_s", "compute_s", "apply_s", "comm_s", "data_s", "other_s")
                    ),
                    fmt(
                        None
                        if results[c.key]["overhead"] is None
                        else 100 * results[c.key]["overhead"],
                        ".1f",
                    ),
                ]
                for c, t in steps
            ],
        )
    print_table(
        "targets (issue 4)",
        ["target", "met"],
        [[k, {True: "yes", False: "NO", None: "n/a"}[v]] for k, v in targets.items()],
    )
    return {"ratios": ratios, "cold_start_s": cold, "targets": targets}


# ---- main --------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short round (smoke run)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--mlp-steps", type=int, help="steps per MLP run (default 80, quick 20)")
    p.add_argument("--lm-steps", type=int, help="steps per LM run (default 40, quick 10)")
    p.add_argument(
        "--warmup", type=int, help="steps left out of a run's median (default 8, quick 4)"
    )
    p.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[1, 2],
        choices=(1, 2),
        help="zerotrain's rank counts (torch's rows, DDP included, run regardless)",
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-torch", action="store_true", help="zerotrain rows only")
    p.add_argument("--keep", metavar="DIR", help="keep run dirs and logs under DIR")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (4 if q else 8)
    steps = {
        "mlp": args.mlp_steps or (20 if q else 80),
        "char_lm": args.lm_steps or (10 if q else 40),
    }

    from pipelines.config import ConfigError, load_config

    try:
        import torch  # noqa: F401  (only to know whether the reference can run)

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    have_torch = torch_version is not None and not args.no_torch

    args.configs = {m: load_config(MODELS[m]["pipeline"], []) for m in args.models}
    cases = plan(args, have_torch)
    configs = {}
    for c in cases:
        over = [f"{k}={json.dumps(v)}" for k, v in overrides_for(c).items()]
        try:
            configs[c.key] = load_config(MODELS[c.model]["pipeline"], over)
        except ConfigError as err:
            raise BenchError(f"{c.key}: config: {err}") from None
        if steps[c.model] <= args.warmup:
            raise BenchError(
                f"{c.model}: {steps[c.model]} steps, need more than --warmup {args.warmup}"
            )

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"bench_train: {len(cases)} cases x {args.rounds} round(s); steps {steps}, "
        f"warm-up {args.warmup}; load avg {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus",
        flush=True,
    )
    runs: dict[str, list[dict]] = {c.key: [] for c in cases}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        order = cases if rnd % 2 == 0 else cases[::-1]
        for c in order:
            tag = f"r{rnd}"
            try:
                if c.system == "zerotrain":
                    r = run_zerotrain(c, steps[c.model], args.warmup, work, tag)
                else:
                    r = run_torch(c, configs[c.key], steps[c.model], args.warmup, work, tag)
            except BenchError as err:
                raise BenchError(f"{c.key} (round {rnd}): {err}") from None
            runs[c.key].append(r)
            print(
                f"  round {rnd} {c.key:36s} {r['samples_per_s']:>9,.0f} samples/s  "
                f"cold {fmt(r['cold_start_s'], '.2f')} s"
                + (f"  blas {r['blas']}" if r.get("blas") else ""),
                flush=True,
            )
    check_same_models(runs)
    if not args.keep:  # kept after a failure: the error names a log in it
        shutil.rmtree(work, ignore_errors=True)
    results = {k: aggregate(v) for k, v in runs.items()}
    summary = report(cases, results, args)
    print(
        "\nNote: medians of alternating rounds on a 2-core machine shared with other work; "
        "overhead is from summary.json timing (n/a where a run does not report it)."
    )
    print(
        json.dumps(
            {
                "bench": "train",
                "rounds": args.rounds,
                "steps": steps,
                "warmup": args.warmup,
                "batch_per_rank": {m: MODELS[m]["batch"] for m in args.models},
                "torch": torch_version,
                "cpus": os.cpu_count(),
                "wall_s": time.perf_counter() - t0,
                "cases": results,
                **summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"bench_train: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_train: interrupted", file=sys.stderr)
        sys.exit(130)
