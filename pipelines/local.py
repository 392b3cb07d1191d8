"""The single-process runner: one rank, in this process, start to finish.

`run_local(cfg, run_dir)` is what `zerotrain run --ranks 1` does: it builds the model and
data, drives `RankStep` with the world-1 collective, logs metrics, evaluates, early-stops,
checkpoints (and resumes), and writes summary.json. It is also the reference the
multi-rank cluster must agree with (same params_sha256 for the same config and seed).

The pieces a rank process needs too (model from config, a rank's micro-batches, the
per-step dropout seed) are the public helpers at the top; phase 2 reuses them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from . import checkpoint as ckpt_mod
from .config import Config, config_hash, loss_spec, resume_hash
from .data import batch_for, load_dataset, position
from .metrics import EarlyStopping, evaluate
from .optim import KERNEL_BACKEND
from .rundir import Progress, RunDir, params_sha256
from .step import LocalCollective, RankStep

__all__ = [
    "TrainingFailed",
    "build_model_for",
    "load_hooks",
    "rank_batches",
    "run_local",
    "step_seed",
]

_DROPOUT = 0xD80
# Skipping a non-finite step is recovery; skipping this many in a row is a diverged run.
MAX_CONSECUTIVE_SKIPS = 20


class TrainingFailed(RuntimeError):
    """The run could not complete (exit code 3); the message says why in one line."""


# ---------------------------------------------------------------------------------------
# Building blocks shared with rank processes
# ---------------------------------------------------------------------------------------


def build_model_for(cfg: Config, meta: dict):
    """The configured model, with the sizes the data dictates filled in when not given."""
    from pipelines.model import build_model

    opts = dict(cfg.model.options)
    name = cfg.model.name
    if name == "char_transformer":
        opts.setdefault("vocab", meta["vocab_size"])
        opts.setdefault("seq_len", meta["seq_len"])
    elif name == "mlp_classifier":
        opts.setdefault("in_dim", meta["n_features"])
        opts.setdefault("n_classes", meta["n_classes"])
    else:
        opts.setdefault("in_dim", meta["n_features"])
    opts.setdefault("seed", cfg.train.seed)
    try:
        return build_model(name, **opts)
    except (TypeError, ValueError) as err:
        raise TrainingFailed(f"model: {str(err).splitlines()[0]}") from None


def rank_batches(dataset, cfg: Config, step: int, rank: int, world: int) -> list[dict]:
    """Rank `rank`'s micro-batches of 0-based global step `step`."""
    epoch, pos = position(step, len(dataset), cfg.train.batch_size)
    return [batch_for(dataset, cfg.train.seed, epoch, pos, rank, world, cfg.train.batch_size,
                      micro=k, accum=cfg.train.grad_accum)
            for k in range(cfg.train.grad_accum)]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The dropout seed of a rank's step (micro-batch k adds k)."""
    return int(np.random.SeedSequence([seed, _DROPOUT, step, rank]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------
# Hooks (phase 1: in-process analyzers; the HookAnalyzer actor takes them over later)
# ---------------------------------------------------------------------------------------


@dataclass
class _Hook:
    spec: str
    fn: object
    errors: int = 0


def load_hooks(specs: list[str]) -> list[_Hook]:
    """Load "PATH[:NAME]" hook functions (NAME defaults to `hook`).

    Raises ValueError (one line) for a missing file or function.
    """
    hooks = []
    for spec in specs:
        path, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "hook")
        path = path or spec
        if not Path(path).is_file():
            raise ValueError(f"--hook {spec}: no such file {path!r}")
        mod_name = f"zerotrain_hook_{len(hooks)}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        try:
            spec_obj.loader.exec_module(module)
        except Exception as err:  # a research script's import error is a usage error
            raise ValueError(f"--hook {spec}: loading failed: {type(err).__name__}: {err}"
                             ) from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"--hook {spec}: {path} defines no function {name!r}")
        hooks.append(_Hook(spec, fn))
    return hooks


def _run_hooks(hooks, rundir: RunDir, progress: Progress, ctx: dict) -> None:
    for h in hooks:
        try:
            out = h.fn(ctx)
        except Exception as err:  # a hook must never stop training
            h.errors += 1
            if h.errors <= 3:
                progress.message(f"hook {h.spec} raised {type(err).__name__}: {err}")
            continue
        if out:
            rundir.log_hook({"step": ctx["step"], "hook": h.spec, **out})


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0                 # optimizer steps done
    last_loss: float = math.nan
    last_eval: dict = field(default_factory=dict)
    best_eval: float | None = None
    stopped_early: bool = False


def _named_grads(model, grads: np.ndarray) -> dict[str, np.ndarray]:
    return {s.name: grads[s.offset : s.offset + int(np.prod(s.shape))].reshape(s.shape)
            for s in model.layout if s.trainable}


def run_local(cfg: Config, run_dir: str | Path, *, resume: str | Path | None = None,
              hooks: list[str] = (), out=None) -> dict:
    """Train `cfg` in this process (world size 1); return the summary (also written).

    `resume` is a checkpoint root (or run dir) to continue from its latest valid
    checkpoint. Raises TrainingFailed (exit 3) when the run cannot go on.
    """
    if cfg.cluster.ranks != 1:
        raise TrainingFailed(f"run_local runs one rank, the config asks for "
                             f"{cfg.cluster.ranks}")
    out = out if out is not None else sys.stderr
    t_start = time.perf_counter()
    rundir = RunDir(run_dir)
    chash, rhash = config_hash(cfg), resume_hash(cfg)
    rundir.write_config(cfg, chash, rhash)
    loaded_hooks = load_hooks(list(cfg.hooks.scripts) + list(hooks))
    try:
        train = load_dataset(cfg.data, "train")
        evalset = load_dataset(cfg.data, cfg.eval.split)
    except (OSError, ValueError) as err:
        raise TrainingFailed(f"data: {err}") from None
    if cfg.train.batch_size > len(train):
        raise TrainingFailed(f"train.batch_size {cfg.train.batch_size} exceeds the "
                             f"{len(train)} training samples")
    model = build_model_for(cfg, train.meta)
    rank = RankStep(model, cfg, LocalCollective())
    spec = loss_spec(cfg.loss)
    state = _State()
    ckpt_root = rundir.checkpoints(cfg.checkpoint.dir)
    every_log = cfg.train.log_every or max(cfg.train.steps // 20, 1)
    progress = Progress(cfg.train.steps, every_log, out, prefix="zerotrain: ")
    early = EarlyStopping(cfg.eval.early_stopping.metric, cfg.eval.early_stopping.patience,
                          cfg.eval.early_stopping.mode, cfg.eval.early_stopping.min_delta)

    if resume is not None:
        _resume(Path(resume), rank, state, early, rhash, progress)

    def do_eval() -> dict:
        metrics = list(dict.fromkeys([*cfg.eval.metrics, cfg.checkpoint.best_metric,
                                      cfg.eval.early_stopping.metric]))
        return evaluate(model, evalset, metrics=metrics, batch_size=cfg.eval.batch_size,
                        max_batches=cfg.eval.max_batches, loss_fn=spec)

    def do_checkpoint() -> None:
        shards = [(rank.lo, rank.hi, {k: v.copy() for k, v in rank.shard_tensors().items()})]
        epoch, pos = position(state.step, len(train), cfg.train.batch_size)
        metrics = dict(state.last_eval, train_loss=state.last_loss)
        manifest = {
            "mode": cfg.cluster.mode, "config_hash": chash, "resume_hash": rhash,
            "optimizer": cfg.optimizer.name,
            "data": {"seed": cfg.train.seed, "epoch": epoch, "step_in_epoch": pos,
                     "global_step": state.step},
            "rng": {"seed": cfg.train.seed, "dropout_stream": _DROPOUT},
            "counters": rank.opt.counters(),
            "early_stopping": early.state(),
            "metrics": metrics,
        }
        ckpt_mod.save_checkpoint(ckpt_root, state.step, shards, model.params.size, manifest)
        ckpt_mod.apply_retention(ckpt_root, cfg.checkpoint.keep_last,
                                 cfg.checkpoint.keep_best, cfg.checkpoint.best_metric,
                                 cfg.checkpoint.best_mode)

    async def loop() -> None:
        consecutive_skips = 0
        while state.step < cfg.train.steps:
            s = state.step
            t0 = time.perf_counter()
            batches = rank_batches(train, cfg, s, 0, 1)
            stats = await rank.step(s, batches, seed=step_seed(cfg.train.seed, s, 0))
            dt = time.perf_counter() - t0
            state.step = s + 1
            state.last_loss = stats.loss
            sps = cfg.train.batch_size / dt if dt > 0 else 0.0
            record = {"step": state.step, "loss": stats.loss, "lr": stats.lr,
                      "grad_norm": stats.grad_norm, "samples_per_s": sps,
                      "skipped": not stats.applied, "clip_coef": stats.clip_coef}
            consecutive_skips = 0 if stats.applied else consecutive_skips + 1
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                rundir.log_step(record)
                raise TrainingFailed(f"{consecutive_skips} consecutive steps skipped for "
                                     f"non-finite gradients (last at step {state.step})")
            evaluated = (cfg.eval.every and state.step % cfg.eval.every == 0) or \
                state.step == cfg.train.steps
            if evaluated:
                state.last_eval = do_eval()
                record["eval"] = state.last_eval
            rundir.log_step(record)
            extra = ""
            if evaluated:
                extra = " | eval " + " ".join(f"{k} {v:.4g}" for k, v in
                                              state.last_eval.items())
            progress.update(state.step, stats.loss, stats.lr, sps, extra)
            if loaded_hooks and state.step % cfg.hooks.every == 0:
                _run_hooks(loaded_hooks, rundir, progress, {
                    "step": state.step, "loss": stats.loss, "lr": stats.lr,
                    "grad_norm": stats.grad_norm, "rank": 0, "world": 1,
                    "grads": _named_grads(model, model.grads),
                    "params": dict(model.named_parameters())})
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 \
                    and state.step != cfg.train.steps:
                do_checkpoint()
            if evaluated and early.patience:
                value = state.last_eval[early.metric]
                if early.update(value):
                    state.stopped_early = True
                    progress.message(f"early stop at step {state.step}: "
                                     f"{early.metric} did not improve for {early.patience} "
                                     "evaluations")
                    break

    try:
        trio.run(loop)
        if not state.last_eval:
            state.last_eval = do_eval()
        do_checkpoint()
    finally:
        rundir.close()
    wall = time.perf_counter() - t_start
    done_samples = state.step * cfg.train.batch_size
    summary = {
        "status": "ok",
        "pipeline": cfg.name,
        "final_loss": state.last_loss,
        "eval": {k: state.last_eval[k] for k in cfg.eval.metrics if k in state.last_eval},
        "steps": state.step,
        "ranks": 1,
        "mode": cfg.cluster.mode,
        "seed": cfg.train.seed,
        "wall_s": wall,
        "samples_per_s": done_samples / wall if wall > 0 else 0.0,
        "restarts": 0,
        "skipped_steps": rank.opt.skipped,
        "stopped_early": state.stopped_early,
        "params_sha256": params_sha256(model),
        "n_params": int(model.params.size),
        "memory": {"per_rank": [rank.memory()]},
        "config_hash": chash,
        "kernels": KERNEL_BACKEND,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "hooks": {h.spec: {"errors": h.errors} for h in loaded_hooks},
        "run_dir": str(rundir.path),
    }
    # Full weights by PyTorch name: safetensors.torch.load_file -> module.load_state_dict
    ckpt_mod.export_weights(rundir.path / "weights.safetensors", model.state_dict(),
                            {"pipeline": cfg.name, "step": str(state.step),
                             "params_sha256": summary["params_sha256"]})
    rundir.write_summary(summary)
    progress.message(f"done: {state.step} steps in {wall:.1f}s, final loss "
                     f"{state.last_loss:.4f}, eval {summary['eval']} -> {rundir.path}")
    return summary


def _resume(where: Path, rank: RankStep, state: _State, early: EarlyStopping, rhash: str,
            progress: Progress) -> None:
    """Load the latest valid checkpoint under `where` (a checkpoint root or a run dir)."""
    roots = [where, where / "checkpoints"]
    found = None
    for root in roots:
        lv = ckpt_mod.latest_valid(root)
        for path, reason in lv.skipped:
            progress.message(f"skipping checkpoint {path}: {reason}")
        if lv.path is not None:
            found = lv
            break
    if found is None:
        raise TrainingFailed(f"--resume: no valid checkpoint under {where}")
    manifest, full = ckpt_mod.load_full(found.path, verify=False)
    if manifest.get("resume_hash") != rhash:
        progress.message("warning: the config differs from the checkpoint's in what shapes "
                         "the numbers; continuing anyway")
    if manifest["n"] != rank.n:
        raise TrainingFailed(f"--resume: checkpoint has {manifest['n']} parameters, the "
                             f"model {rank.n}")
    params = full.pop("params")
    rank.load_full(params, full, manifest.get("counters", {}))
    state.step = int(manifest["step"])
    state.last_loss = float(manifest.get("metrics", {}).get("train_loss", math.nan))
    early.load(manifest.get("early_stopping", {}))
    progress.message(f"resumed from {found.path} (step {state.step}, world "
                     f"{manifest['world']}, mode {manifest.get('mode')})")

