"""The noise_scale hook against brute force: is the B_simple it reports the true one?

For each pipeline (mlp_regressor, char_lm) this trains with the built-in noise_scale
analyzer at every=1, exact=True (so it sees every step), a checkpoint after every step,
then recomputes the noise scale of every step by brute force and compares the two,
smoothed the same way, at a series of checkpoints:

- the hook: each step's unbiased |G|^2 and tr(Sigma) from the ranks' gradients at two
  batch sizes (McCandlish et al. 2018, Appendix A), averaged over training steps with
  decay beta (pipelines.hooks.builtins.NoiseScale); b_simple = the ratio of the averages.
- brute force: the parameters the step's gradient was taken at (checkpoint t-1, read
  with its manifest's layout table only: scripts/checkpoint_params.py; the initial
  model for step 1), loaded into the PyTorch twin of the model; PyTorch per-example
  gradients over the training examples (all 20,000 for mlp_regressor; for char_lm a
  fresh draw of 512 windows each step, tr(Sigma) from the per-example gradients of 64 of
  them and the mean gradient from all) give tr(Sigma) (the per-example covariance's
  trace, unbiased) and |G|^2 = |mean|^2 - tr(Sigma) / M (unbiased). Those per-step
  values go through the same average (same beta, the same steps), and their ratio is
  the brute-force B_simple.

Before comparing averages it checks that both sides measure the same gradients: the
hook's raw squared norms of a few steps must equal those of the twin's gradients on the
step's rank batches (`batch_norms`). Each table row then shows the relative difference
and `noise`, the spread of that difference which the per-step estimation errors imply
(`noise_sd`): the per-step estimate of |G|^2 from one step's batches is mostly noise
when B_simple is near the global batch, and the average over the window is what
reduces it. The global batch is larger than the pipelines' defaults for that reason.
`noise` is split into the part of |G|^2's errors (it shrinks with the global batch)
and that of tr Sigma's (it shrinks only with more ranks: tr Sigma comes from the
spread of the ranks' gradients), and each beta's line gives the chance that an
unbiased hook passes every checkpoint at that noise (`chance_within`): near 0, a miss
is what the estimator's variance makes of this run, not a bias.

Prints a table per pipeline and beta and one final JSON line (worst_rel_diff and
`pass` per beta over both pipelines; per pipeline and beta its rows, `pass` and
`chance_of_pass`). Acceptance (issue 22): within 10 % at every checkpoint past the
warm-up. Needs torch (the `bench` extra).

    python scripts/bench_noise_scale.py                      # both pipelines
    python scripts/bench_noise_scale.py --pipelines mlp_regressor --steps 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # checkpoint_params, the outside reader

import checkpoint_params  # noqa: E402

# per pipeline: ranks, global batch, steps, report every, training examples for the
# brute force (0: all; else a fresh draw per step), how many of them give tr Sigma by
# per-example gradients (default: all) and examples per call of the gradient computation
DEFAULTS = {
    "mlp_regressor": {"ranks": 4, "batch": 10000, "steps": 600, "report": 50, "examples": 0,
                      "chunk": 2000},
    "char_lm": {"ranks": 4, "batch": 256, "steps": 300, "report": 25, "examples": 512,
                "per_example": 64, "chunk": 64},
}  # fmt: skip


# ---- training --------------------------------------------------------------------------


def hook_name(beta: float) -> str:
    return f"noise_scale_{beta:g}".replace(".", "_")


def train(pipeline: str, steps: int, ranks: int, batch: int, betas: list, run_dir: Path) -> None:
    """`zerotrain run` with one noise_scale hook per beta, every=1 exact=True, global
    batch `batch`, and a checkpoint after every step."""
    hooks = ", ".join(
        f'{{hook = "builtin:noise_scale", name = "{hook_name(b)}", exact = true, '
        f"options = {{beta = {b}}}}}"
        for b in betas
    )
    sets = [
        f"hooks.specs=[{hooks}]",
        "checkpoint.every=1",
        f"checkpoint.keep_last={steps + 1}",
        "eval.every=0",
        f"train.batch_size={batch}",
        # a loaded machine must not make a rank or the analyzer look dead: a restarted
        # analyzer starts its averages afresh (see `hook_records`)
        "cluster.heartbeat_timeout=30",
    ]
    cmd = [sys.executable, "-m", "pipelines.cli", "run", pipeline, "--ranks", str(ranks)]
    cmd += ["--mode", "zero2", "--steps", str(steps), "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training {pipeline} failed:\n{done.stderr[-3000:]}")


def hook_records(run_dir: Path, name: str) -> dict[int, dict]:
    """step -> the metrics of hook `name`, from hooks.jsonl: one uninterrupted series.

    Exits if a step appears twice, a record says "restarted_at" or its `gap` is not
    the distance to the previous record: the hook's averages were started afresh (a
    restarted analyzer forgets them), so no one brute-force average matches them. Steps
    the hook did not see are allowed; `compare` averages the brute force over the
    hook's steps only, so both sides still average the same steps."""
    out, last = {}, 0
    for line in (run_dir / "hooks.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["hook"] != name or "metrics" not in r:
            continue
        step, m = r["step"], r["metrics"]
        if step in out or m["gap"] != step - last or "restarted_at" in r:
            raise SystemExit(
                f"{run_dir}: hook {name} restarted its averages at step {step} (gap "
                f"{m['gap']} after step {last}): rerun on a less loaded machine"
            )
        out[step], last = m, step
    return out


# ---- brute force -----------------------------------------------------------------------


def twin_and_loss(pipeline: str, cfg, meta):
    """The PyTorch twin of the pipeline's model, its per-example loss(out, y) -> (B,)
    (the model's loss is their mean), and the function that sums per-example gradients."""
    import torch
    import torch.nn.functional as F

    from pipelines.model import torch_twin

    opts = dict(cfg.model.options)
    if pipeline == "mlp_regressor":
        sizes = [int(meta["n_features"]), *opts["hidden"], 1]
        module = torch_twin.TorchMLP(sizes, getattr(F, opts.get("activation", "relu")))

        def mse(out, y):
            return ((out - y) ** 2).mean(dim=1)

        return module, mse, _sums_mlp

    # vmap has no batching rule for the fused attention kernel: the same math, unfused
    def attention(q, k, v, is_causal=False):
        t = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    torch_twin.F.scaled_dot_product_attention = attention
    module = torch_twin.TorchCharTransformer(vocab=int(meta["vocab_size"]), **opts)

    def cross_entropy(out, y):
        flat = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        return flat.reshape(y.shape).mean(dim=1)

    return module, cross_entropy, _sums_vmap


def _sums_vmap(module, loss, params, x, y, chunk):
    """(sum of per-example gradients by name, sum of their squared norms), from
    materialised per-example gradients: torch.func.vmap(grad(one example's loss))."""
    import torch
    from torch.func import functional_call, grad, vmap

    def one(p, xi, yi):
        return loss(functional_call(module, p, (xi[None],)), yi[None])[0]

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    total = {k: torch.zeros(v.numel(), dtype=torch.float64) for k, v in params.items()}
    sq_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            g = per_example(params, x[i : i + chunk], y[i : i + chunk])
            for k, v in g.items():
                flat = v.reshape(v.shape[0], -1).double()
                total[k] += flat.sum(0)
                sq_sum += float((flat**2).sum())
    return total, sq_sum


def _sums_mlp(module, loss, params, x, y, chunk):
    """The same sums for an MLP without materialising per-example gradients: example
    i's gradient of Linear(W, b) is (delta_i a_i^T, delta_i) for the layer's input a_i and
    output gradient delta_i, so its squared norm is |delta_i|^2 (|a_i|^2 + 1) (Goodfellow
    2015, "Efficient per-example gradient computations"). Exact; checked against
    `_sums_vmap` on the first step."""
    import torch
    from torch.func import functional_call

    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    inputs, sq = {}, [0.0]

    def keep_input(layer, args, out):
        inputs[layer] = args[0].detach().double()
        out.register_hook(lambda g, layer=layer: _add(layer, g))

    def _add(layer, g):
        a, d = inputs[layer], g.detach().double()
        sq[0] += float(((d**2).sum(1) * ((a**2).sum(1) + 1.0)).sum())

    handles = [m.register_forward_hook(keep_input) for m in linears]
    total = {k: torch.zeros(v.numel(), dtype=torch.float64) for k, v in params.items()}
    try:
        for i in range(0, len(x), chunk):
            p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            xi, yi = x[i : i + chunk], y[i : i + chunk]
            out = functional_call(module, p, (xi,))
            # the sum of per-example losses: each example's output gradient is its own
            loss(out, yi).sum().backward()
            for k, v in p.items():
                total[k] += v.grad.reshape(-1).double()
    finally:
        for h in handles:
            h.remove()
    return total, sq[0]


def _grad_sum(module, loss, params, x, y, chunk):
    """The sum of the per-example gradients by name (float64), from batched backward
    passes of the summed loss: no per-example gradients, so much cheaper than `_sums_vmap`."""
    from torch.func import functional_call

    total = {k: 0.0 for k in params}
    for i in range(0, len(x), chunk):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss(functional_call(module, p, (x[i : i + chunk],)), y[i : i + chunk]).sum().backward()
        for k, v in p.items():
            total[k] = total[k] + v.grad.reshape(-1).double()
    return total


def exact_values(
    sums, module, loss, state: dict, x, y, chunk: int, per_example: int = 0
) -> tuple[float, float]:
    """(|G|^2, tr Sigma) over the M examples (x, y) at parameters `state`, unbiased: tr
    Sigma the sample covariance's trace of the per-example gradients, |G|^2 = |mean|^2 -
    tr Sigma / M. With 0 < per_example < M, tr Sigma comes from the per-example
    gradients of the first `per_example` examples and the mean from all M (the variance
    of |mean|^2 shrinks with M; tr Sigma is precise from far fewer examples)."""
    import torch

    params = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    m = len(x)
    pe = per_example if 0 < per_example < m else m
    total, sq_sum = sums(module, loss, params, x[:pe], y[:pe], chunk)
    pe_mean_sq = sum(float((t / pe) @ (t / pe)) for t in total.values())
    trace = (sq_sum / pe - pe_mean_sq) * pe / (pe - 1)
    if pe < m:
        rest = _grad_sum(module, loss, params, x[pe:], y[pe:], chunk)
        total = {k: total[k] + rest[k] for k in total}
    mean_sq = sum(float((t / m) @ (t / m)) for t in total.values())
    return mean_sq - trace / m, trace


def _setup(pipeline: str, run_dir: Path):
    """(cfg, training set, twin module, per-example loss, sums function) of a run."""
    from pipelines.config import from_resolved
    from pipelines.data import load_dataset

    resolved = json.loads((run_dir / "config.json").read_text())
    cfg = from_resolved(resolved["config"])
    train = load_dataset(cfg.data, "train")
    return (cfg, train, *twin_and_loss(pipeline, cfg, train.meta))


def params_before(cfg, train, run_dir: Path, step: int) -> dict:
    """name -> the parameters step `step` (1-based) took its gradient at: checkpoint
    step - 1, read with its manifest's layout table only (the initial model for step 1)."""
    if step == 1:
        from pipelines.core import build_model_for

        return build_model_for(cfg, train.meta).state_dict()
    return checkpoint_params.read_params(run_dir / "checkpoints" / f"step-{step - 1:08d}")


def brute_force(
    pipeline: str, run_dir: Path, steps: int, examples: int, chunk: int, per_example: int = 0
) -> dict:
    """step -> (|G|^2, tr Sigma) of the gradient at the parameters step `step` began with,
    over every training example (examples=0) or over `examples` drawn afresh for each step
    (seeded by the step), so that the sampling errors of successive steps are independent
    and average out in the smoothed series as the hook's do -- one fixed draw would carry
    the same error into every step. `per_example`: see `exact_values`."""
    import torch

    cfg, train, module, loss, sums = _setup(pipeline, run_dir)
    if not examples:
        every = train.take(np.arange(len(train)))
        x, y = torch.from_numpy(every["x"]), torch.from_numpy(every["y"])
    out = {}
    for step in range(1, steps + 1):
        state = params_before(cfg, train, run_dir, step)
        if examples:
            rng = np.random.default_rng([12345, step])
            drawn = train.take(np.sort(rng.choice(len(train), examples, replace=False)))
            x, y = torch.from_numpy(drawn["x"]), torch.from_numpy(drawn["y"])
        if step == 1 and sums is not _sums_vmap:  # the closed form against vmap
            check = [exact_values(f, module, loss, state, x[:64], y[:64], 64)
                     for f in (sums, _sums_vmap)]  # fmt: skip
            if not np.allclose(check[0], check[1], rtol=1e-6):
                raise SystemExit(f"per-example sums disagree: {check}")
        out[step] = exact_values(sums, module, loss, state, x, y, chunk, per_example)
    return out


def batch_norms(pipeline: str, run_dir: Path, step: int) -> tuple[float, float]:
    """(|G_small|^2 averaged over ranks, |G_big|^2) of step `step` recomputed outside
    zerotrain: the PyTorch twin at `params_before`, on each rank's batch of that step
    (pipelines.core.rank_batches), the gradient of the batch's mean loss. The hook's
    small_sq_step / big_sq_step must be these numbers: same step, same parameters, same
    examples, same loss scaling."""
    import torch
    from torch.func import functional_call

    from pipelines.core import rank_batches

    cfg, train, module, loss, _ = _setup(pipeline, run_dir)
    state = params_before(cfg, train, run_dir, step)
    ranks = cfg.cluster.ranks
    grads = []
    for rank in range(ranks):
        micro = rank_batches(train, cfg, step - 1, rank, ranks)
        total = None
        for batch in micro:
            p = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in state.items()}
            out = functional_call(module, p, (torch.from_numpy(batch["x"]),))
            loss(out, torch.from_numpy(batch["y"])).mean().backward()
            flat = torch.cat([p[k].grad.reshape(-1).double() for k in state])
            total = flat if total is None else total + flat
        grads.append(total / len(micro))
    small = sum(float(g @ g) for g in grads) / ranks
    big = sum(grads) / ranks
    return small, float(big @ big)


def check_same_batch(pipeline: str, run_dir: Path, hook: dict, steps: int) -> dict:
    """The hook's raw squared norms of a few steps against `batch_norms`; exits if they
    differ by more than float32 rounding (rtol 1e-4), since then the two sides would not
    be measuring the same gradients and comparing their averages would mean nothing."""
    worst = 0.0
    for step in sorted({1, 2, steps // 2, steps}):
        small, big = batch_norms(pipeline, run_dir, step)
        got = (hook[step]["small_sq_step"], hook[step]["big_sq_step"])
        rel = max(abs(g - w) / w for g, w in zip(got, (small, big), strict=True))
        if rel > 1e-4:
            raise SystemExit(
                f"{pipeline} step {step}: the hook's (|G_small|^2, |G_big|^2) = {got}, the "
                f"twin's on the same batches = {(small, big)}: not the same gradients"
            )
        worst = max(worst, rel)
    print(f"{pipeline}: the hook's squared norms = the twin's on the same batches "
          f"(steps 1, 2, {steps // 2}, {steps}; worst rel. {worst:.1e})")  # fmt: skip
    return {"max_rel_diff": worst}


# ---- comparing -------------------------------------------------------------------------


def smoothed(series: dict[int, tuple[float, float]], beta: float) -> dict[int, float]:
    """step -> b_simple of the per-step (|G|^2, tr Sigma) averaged as the hook does."""
    g2 = trace = weight = 0.0
    last, out = 0, {}
    for step in sorted(series):
        keep = beta ** (step - last)
        a, b = series[step]
        g2, trace = keep * g2 + (1 - keep) * a, keep * trace + (1 - keep) * b
        weight = keep * weight + (1 - keep)
        last = step
        out[step] = trace / g2 if g2 > 0 else math.nan
    return out


def _residuals(hook: dict, exact: dict) -> dict[int, tuple[float, float]]:
    """step -> (hook - brute force) of the per-step (|G|^2, tr Sigma) estimates."""
    out = {}
    for step, (g2, trace) in exact.items():
        h = hook.get(step, {"g2_step": None})
        if h["g2_step"] is not None and h["trace_sigma_step"] is not None:
            out[step] = (h["g2_step"] - g2, h["trace_sigma_step"] - trace)
    return out


def noise_sd(residuals: dict, exact: dict, beta: float, upto: int, part: str = "both") -> float:
    """The standard deviation of the smoothed B_simple's relative error at step `upto`
    that the per-step estimation errors imply (delta method): the average's relative
    error is sum_i c_i (e_trace_i / T - e_g2_i / G) with c_i step i's weight in the
    average, T and G the brute-force averages; each residual squared stands for its
    step's variance. A difference of a few of these is noise, a larger one a bias.

    part "g2" keeps the e_g2 terms only, "trace" the e_trace terms only: which of the
    two estimates the spread comes from (|G|^2's error shrinks with the global batch,
    tr Sigma's only with more ranks: README, hooks section)."""
    if part not in ("both", "g2", "trace"):
        raise ValueError(f"part must be 'both', 'g2' or 'trace', got {part!r}")
    use_g2, use_trace = part != "trace", part != "g2"
    last, weights = 0, {}
    for step in sorted(s for s in exact if s <= upto):
        weights[step] = (1 - beta ** (step - last)) * beta ** (upto - step)
        last = step
    big_g = sum(c * exact[s][0] for s, c in weights.items())
    big_t = sum(c * exact[s][1] for s, c in weights.items())
    if big_g <= 0:
        return math.nan
    var = sum(
        (c * (use_trace * residuals[s][1] / big_t - use_g2 * residuals[s][0] / big_g)) ** 2
        for s, c in weights.items()
        if s in residuals
    )
    return math.sqrt(var)


def per_step_noise(residuals: dict, exact: dict) -> dict:
    """The per-step estimation error, hook - brute force, over the second half of the
    run: its standard deviation relative to the mean of the brute-force values."""
    steps = sorted(residuals)[len(residuals) // 2 :]
    out = {}
    for i, name in enumerate(("g2", "trace_sigma")):
        err = np.array([residuals[s][i] for s in steps])
        out[f"{name}_rel_sd"] = float(err.std() / np.mean([exact[s][i] for s in steps]))
        out[f"{name}_rel_mean"] = float(err.mean() / np.mean([exact[s][i] for s in steps]))
    return out


def compare(pipeline, hook: dict, exact: dict, beta: float, report: int) -> dict:
    """Hook vs brute force every `report` steps. The acceptance counts the checkpoints
    from one full window (1 / (1 - beta) steps) on; before that the average spans only
    the steps so far, and those rows are printed as warm-up. `noise` is `noise_sd`,
    `g2` and `tr` its parts from the errors of |G|^2 and of tr Sigma alone. `pass`: at
    least one checkpoint counted, and every counted one within 10 %."""
    seen = {s: v for s, v in exact.items() if s in hook}  # what the hook averaged
    brute = smoothed(seen, beta)
    residuals = _residuals(hook, seen)
    window = 1 / (1 - beta)
    rows = []
    print(f"\n{pipeline}: B_simple averaged over training steps, beta {beta} (window "
          f"{window:.0f} steps; the hook saw {len(seen)} of {len(exact)} steps)")  # fmt: skip
    print(f"{'step':>6} {'hook':>10} {'brute':>10} {'rel.diff':>9} {'noise':>7} {'(g2':>6} "
          f"{'tr)':>6} {'window':>7} {'hook b_step':>12} {'brute b_step':>13}")  # fmt: skip
    for step in sorted(exact):
        if step % report:
            continue
        if step not in hook:
            print(f"{step:6d} (not seen by the hook)")
            continue
        h = {k: math.nan if v is None else v for k, v in hook[step].items()}
        raw = exact[step][1] / exact[step][0] if exact[step][0] > 0 else math.nan
        rel = (h["b_simple"] - brute[step]) / brute[step]
        sd, sd_g2, sd_tr = (noise_sd(residuals, seen, beta, step, part)
                            for part in ("both", "g2", "trace"))  # fmt: skip
        warm_up = step < window
        rows.append(
            {"step": step, "hook": h["b_simple"], "brute_force": brute[step], "rel_diff": rel,
             "noise_sd": sd, "noise_sd_g2": sd_g2, "noise_sd_trace": sd_tr,
             "window_steps": h["window_steps"],
             "hook_b_simple_step": h["b_simple_step"], "brute_b_simple_step": raw,
             "warm_up": warm_up}
        )  # fmt: skip
        mark = "  (warm-up)" if warm_up else "  > 10 %" if not abs(rel) <= 0.10 else ""
        print(f"{step:6d} {h['b_simple']:10.2f} {brute[step]:10.2f} {rel:+9.1%} {sd:7.1%} "
              f"{sd_g2:6.1%} {sd_tr:6.1%} {h['window_steps']:7.1f} {h['b_simple_step']:12.2f} "
              f"{raw:13.2f}{mark}")  # fmt: skip
    counted = [abs(r["rel_diff"]) for r in rows if not r["warm_up"]]
    # nan (a b_simple the hook could not form) is a failure, never a pass
    worst = max(counted, key=lambda d: math.inf if math.isnan(d) else d) if counted else None
    passed = worst is not None and worst <= 0.10
    chance = chance_within([r["noise_sd"] for r in rows if not r["warm_up"]], 0.10)
    print(f"worst relative difference after the warm-up: "
          f"{'none counted' if worst is None else f'{worst:.1%}'} over {len(counted)} "
          f"checkpoints (acceptance: 10 %): {'pass' if passed else 'FAIL'}; an unbiased "
          f"hook passes with probability {chance:.2f} at this noise")  # fmt: skip
    return {"beta": beta, "steps_seen": len(seen), "checkpoints": rows,
            "counted": len(counted), "max_abs_rel_diff": worst,
            "within_10pct": passed, "pass": passed, "chance_of_pass": chance}  # fmt: skip


def chance_within(sds: list, bound: float) -> float:
    """The probability that an unbiased hook's relative differences, normal with the
    standard deviations `sds` (the `noise` column), all lie within +-bound: the product
    of each checkpoint's P(|N(0, sd)| <= bound). Exact for independent checkpoints
    (those a few windows apart); for correlated ones a lower bound (Sidak's inequality),
    so a small value says the acceptance fails by noise alone, not by a bias."""
    out = 1.0
    for sd in sds:
        if math.isnan(sd):
            return math.nan
        out *= math.erf(bound / (sd * math.sqrt(2))) if sd > 0 else 1.0
    return out


def _strict(obj):
    """nan -> None, so that the JSON line is strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strict(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--steps", type=int, help="override each pipeline's step count")
    parser.add_argument("--ranks", type=int, help="override each pipeline's rank count")
    parser.add_argument("--batch", type=int, help="override each pipeline's global batch")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.95, 0.99, 0.995])
    parser.add_argument(
        "--lm-examples", type=int, default=DEFAULTS["char_lm"]["examples"],
        help="char_lm windows drawn per step for the brute force",
    )  # fmt: skip
    parser.add_argument("--keep", help="keep the run directories under this folder")
    parser.add_argument(
        "--reuse", action="store_true", help="compare the runs already in --keep again"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-noise-"))
    for pipeline in args.pipelines:
        d = DEFAULTS[pipeline]
        steps, ranks = args.steps or d["steps"], args.ranks or d["ranks"]
        batch = args.batch or d["batch"]
        examples = args.lm_examples if pipeline == "char_lm" else d["examples"]
        run_dir = root / pipeline
        t0 = time.perf_counter()
        if not args.reuse:
            train(pipeline, steps, ranks, batch, args.betas, run_dir)
        t1 = time.perf_counter()
        same_batch = check_same_batch(
            pipeline, run_dir, hook_records(run_dir, hook_name(args.betas[0])), steps
        )
        if not args.reuse:
            exact = brute_force(
                pipeline, run_dir, steps, examples, d["chunk"], d.get("per_example", 0)
            )
            (run_dir / "brute_force.json").write_text(json.dumps(exact))
        saved = json.loads((run_dir / "brute_force.json").read_text())
        exact = {int(k): tuple(v) for k, v in saved.items()}
        t2 = time.perf_counter()
        hooks = {b: hook_records(run_dir, hook_name(b)) for b in args.betas}
        noise = per_step_noise(_residuals(hooks[args.betas[0]], exact), exact)
        g2, tr = ((noise[f"{k}_rel_sd"], noise[f"{k}_rel_mean"]) for k in ("g2", "trace_sigma"))
        print(f"\n{pipeline}: per-step error of the hook's estimates (hook - brute force, "
              f"second half of the run, relative to the mean): |G|^2 sd {g2[0]:.2f} mean "
              f"{g2[1]:+.3f}, tr Sigma sd {tr[0]:.2f} mean {tr[1]:+.3f}")  # fmt: skip
        by_beta = {str(b): compare(pipeline, hooks[b], exact, b, d["report"]) for b in args.betas}
        results[pipeline] = {
            "steps": steps, "ranks": ranks, "global_batch": batch,
            "brute_force_examples": examples or "all",
            "brute_force_per_example": d.get("per_example") or examples or "all",
            "same_batch_check": same_batch,
            "per_step_error": noise, "train_s": round(t1 - t0, 1),
            "brute_force_s": round(t2 - t1, 1), "by_beta": by_beta,
        }  # fmt: skip
    worst = {}
    for b in map(str, args.betas):
        counted = [r["by_beta"][b]["max_abs_rel_diff"] for r in results.values()]
        worst[b] = None if None in counted else max(counted)
    ok = {b: w is not None and w <= 0.10 for b, w in worst.items()}
    # per beta: every pipeline counted a checkpoint, and every counted one is within 10 %
    passed = {b: all(r["by_beta"][b]["pass"] for r in results.values()) for b in worst}
    print(json.dumps(_strict({"bench": "noise_scale", "worst_rel_diff": worst, "within_10pct": ok,
                              "pass": passed, "pipelines": results})))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
