"""The single-process runner: one rank, in this process, start to finish.

`run_local(cfg, run_dir)` is what `zerotrain run --ranks 1` does: it builds the model and
data, drives `RankStep` with the world-1 collective, logs metrics, evaluates, early-stops,
checkpoints (and resumes), and writes summary.json. It is also the reference the
multi-rank cluster must agree with (same params_sha256 for the same config and seed).

What it shares with the multi-rank runner (model from config, a rank's micro-batches,
the per-step dropout seed, the skip limit) lives in pipelines.core.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from cykernels import gemm

from .config import Config, config_hash, loss_spec, resume_hash
from .core import (
    DROPOUT_STREAM,
    MAX_CONSECUTIVE_SKIPS,
    TrainingFailed,
    build_model_for,
    load_hooks,
    rank_batches,
    step_seed,
)
from .data import load_dataset, position, with_default_cache
from .metrics import EarlyStopping, evaluate
from .optim import KERNEL_BACKEND
from .step import LocalCollective, RankStep
from .store import checkpoint as ckpt_mod
from .store.rundir import Progress, RunDir, params_sha256

__all__ = ["run_local"]


class _Hooks:
    """Analyzers (run after the step, failures isolated by AnalyzerRunner) and transforms
    (run by RankStep on the gradient before the reduction) of a local run."""

    def __init__(self, hooks: list, cfg: Config, model, rundir: RunDir):
        from pipelines.hooks import (
            ANALYZER,
            AnalyzerRunner,
            HooksLog,
            TransformRunner,
        )

        self.analyzers = [h for h in hooks if h.kind == ANALYZER]
        self.log = HooksLog(rundir.path / "hooks.jsonl") if hooks else None
        self.runner = (
            AnalyzerRunner(
                self.analyzers, sinks=[self.log] if self.log else (), timeout_s=cfg.hooks.timeout_s
            )
            if self.analyzers
            else None
        )
        transforms = [h for h in hooks if h.kind != ANALYZER]
        self.transforms = (
            TransformRunner(
                transforms, layout=model.layout, seed=cfg.train.seed, rank=0, world_size=1
            )
            if transforms
            else None
        )
        self.model, self.micro = model, cfg.micro_batch * cfg.train.grad_accum

    def due(self, step: int) -> bool:
        return bool(self.runner and self.runner.due(step))

    def after_step(self, step: int, rank: RankStep, loss: float, lr: float) -> None:
        if rank.transform_records and self.log:
            self.log.write(rank.transform_records)
        if not self.due(step):
            return
        from pipelines.hooks import HookContext

        view = rank.hook_view
        update = self.model.params - view["params_before"]
        ctx = HookContext.from_flat(
            step,
            self.model.layout,
            view["grad"],
            loss=loss,
            lr=lr,
            rank_grads={0: view["rank_grad"]},
            params=view["params_before"],
            update=update,
            batch_size=self.micro,
            world_size=1,
        )
        self.runner.run(ctx)

    def stats(self) -> dict:
        return self.runner.stats() if self.runner else {}

    def close(self) -> None:
        if self.runner:
            self.runner.close()
        elif self.log:
            self.log.close()


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0  # optimizer steps done
    last_loss: float = math.nan
    last_eval: dict = field(default_factory=dict)
    best_eval: float | None = None
    stopped_early: bool = False


def run_local(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: str | Path | None = None,
    hooks: list[str] = (),
    out=None,
) -> dict:
    """Train `cfg` in this process (world size 1); return the summary (also written).

    `resume` is a checkpoint root (or run dir) to continue from its latest valid
    checkpoint. Raises TrainingFailed (exit 3) when the run cannot go on.
    """
    if cfg.cluster.ranks != 1:
        raise TrainingFailed(f"run_local runs one rank, the config asks for {cfg.cluster.ranks}")
    out = out if out is not None else sys.stderr
    t_start = time.perf_counter()
    rundir = RunDir(run_dir)
    chash, rhash = config_hash(cfg), resume_hash(cfg)
    rundir.write_config(cfg, chash, rhash)
    try:
        loaded_hooks = load_hooks(list(cfg.hooks.specs) + list(hooks))
    except ValueError as err:
        raise TrainingFailed(f"hooks: {err}") from None
    try:
        data_cfg = with_default_cache(cfg.data)
        train = load_dataset(data_cfg, "train")
        evalset = load_dataset(data_cfg, cfg.eval.split)
    except (OSError, ValueError) as err:
        raise TrainingFailed(f"data: {err}") from None
    if cfg.train.batch_size > len(train):
        raise TrainingFailed(
            f"train.batch_size {cfg.train.batch_size} exceeds the {len(train)} training samples"
        )
    model = build_model_for(cfg, train.meta)
    hooks_rt = _Hooks(loaded_hooks, cfg, model, rundir)
    rank = RankStep(model, cfg, LocalCollective(), transforms=hooks_rt.transforms)
    spec = loss_spec(cfg.loss)
    state = _State()
    ckpt_root = rundir.checkpoints(cfg.checkpoint.dir)
    every_log = cfg.train.log_every or max(cfg.train.steps // 20, 1)
    progress = Progress(cfg.train.steps, every_log, out, prefix="zerotrain: ")
    early = EarlyStopping(
        cfg.eval.early_stopping.metric,
        cfg.eval.early_stopping.patience,
        cfg.eval.early_stopping.mode,
        cfg.eval.early_stopping.min_delta,
    )

    if resume is not None:
        _resume(Path(resume), rank, state, early, rhash, progress)

    def do_eval() -> dict:
        metrics = list(
            dict.fromkeys(
                [*cfg.eval.metrics, cfg.checkpoint.best_metric, cfg.eval.early_stopping.metric]
            )
        )
        return evaluate(
            model,
            evalset,
            metrics=metrics,
            batch_size=cfg.eval.batch_size,
            max_batches=cfg.eval.max_batches,
            loss_fn=spec,
        )

    def do_checkpoint() -> None:
        shards = [(rank.lo, rank.hi, {k: v.copy() for k, v in rank.shard_tensors().items()})]
        epoch, pos = position(state.step, len(train), cfg.train.batch_size)
        metrics = dict(state.last_eval, train_loss=state.last_loss)
        manifest = {
            "mode": cfg.cluster.mode,
            "config_hash": chash,
            "resume_hash": rhash,
            "optimizer": cfg.optimizer.name,
            "data": {
                "seed": cfg.train.seed,
                "epoch": epoch,
                "step_in_epoch": pos,
                "global_step": state.step,
            },
            "rng": {"seed": cfg.train.seed, "dropout_stream": DROPOUT_STREAM},
            "counters": rank.opt.counters(),
            "early_stopping": early.state(),
            "metrics": metrics,
        }
        ckpt_mod.save_checkpoint(ckpt_root, state.step, shards, model.params.size, manifest)
        ckpt_mod.apply_retention(
            ckpt_root,
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_best,
            cfg.checkpoint.best_metric,
            cfg.checkpoint.best_mode,
        )

    async def loop() -> None:
        consecutive_skips = 0
        while state.step < cfg.train.steps:
            s = state.step
            t0 = time.perf_counter()
            batches = rank_batches(train, cfg, s, 0, 1)
            rank.keep_for_hooks = hooks_rt.due(s + 1)
            stats = await rank.step(s, batches, seed=step_seed(cfg.train.seed, s, 0))
            dt = time.perf_counter() - t0
            state.step = s + 1
            state.last_loss = stats.loss
            sps = cfg.train.batch_size / dt if dt > 0 else 0.0
            record = {
                "step": state.step,
                "loss": stats.loss,
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "samples_per_s": sps,
                "skipped": not stats.applied,
                "clip_coef": stats.clip_coef,
            }
            consecutive_skips = 0 if stats.applied else consecutive_skips + 1
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                rundir.log_step(record)
                raise TrainingFailed(
                    f"{consecutive_skips} consecutive steps skipped for "
                    f"non-finite gradients (last at step {state.step})"
                )
            evaluated = (
                cfg.eval.every and state.step % cfg.eval.every == 0
            ) or state.step == cfg.train.steps
            if evaluated:
                state.last_eval = do_eval()
                record["eval"] = state.last_eval
            rundir.log_step(record)
            extra = ""
            if evaluated:
                extra = " | eval " + " ".join(f"{k} {v:.4g}" for k, v in state.last_eval.items())
            progress.update(state.step, stats.loss, stats.lr, sps, extra)
            hooks_rt.after_step(state.step, rank, stats.loss, stats.lr)
            if (
                cfg.checkpoint.every
                and state.step % cfg.checkpoint.every == 0
                and state.step != cfg.train.steps
            ):
                do_checkpoint()
            if evaluated and early.patience:
                value = state.last_eval[early.metric]
                if early.update(value):
                    state.stopped_early = True
                    progress.message(
                        f"early stop at step {state.step}: "
                        f"{early.metric} did not improve for {early.patience} "
                        "evaluations"
                    )
                    break

    try:
        trio.run(loop)
        if not state.last_eval:
            state.last_eval = do_eval()
        do_checkpoint()
    finally:
        hooks_rt.close()
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
        "blas": gemm.library(),
        "hooks": hooks_rt.stats(),
        "run_dir": str(rundir.path),
    }
    # Full weights by PyTorch name: safetensors.torch.load_file -> module.load_state_dict
    ckpt_mod.export_weights(
        rundir.path / "weights.safetensors",
        model.state_dict(),
        {"pipeline": cfg.name, "step": str(state.step), "params_sha256": summary["params_sha256"]},
    )
    rundir.write_summary(summary)
    progress.message(
        f"done: {state.step} steps in {wall:.1f}s, final loss "
        f"{state.last_loss:.4f}, eval {summary['eval']} -> {rundir.path}"
    )
    return summary


def _resume(
    where: Path, rank: RankStep, state: _State, early: EarlyStopping, rhash: str, progress: Progress
) -> None:
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
        progress.message(
            "warning: the config differs from the checkpoint's in what shapes "
            "the numbers; continuing anyway"
        )
    if manifest["n"] != rank.n:
        raise TrainingFailed(
            f"--resume: checkpoint has {manifest['n']} parameters, the model {rank.n}"
        )
    params = full.pop("params")
    rank.load_full(params, full, manifest.get("counters", {}))
    state.step = int(manifest["step"])
    state.last_loss = float(manifest.get("metrics", {}).get("train_loss", math.nan))
    early.load(manifest.get("early_stopping", {}))
    progress.message(
        f"resumed from {found.path} (step {state.step}, world "
        f"{manifest['world']}, mode {manifest.get('mode')})"
    )
