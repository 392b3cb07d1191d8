"""The single-process runner: one rank, in this process, start to finish.

`run_local(cfg, run_dir)` is what `zerotrain run --ranks 1` does: it drives `RankStep`
with the world-1 collective, logs metrics, evaluates, early-stops, checkpoints (and
resumes), and writes summary.json. It is also the reference the multi-rank cluster must
agree with (same params_sha256 for the same config and seed).

Everything it shares with the multi-rank runner -- the checks before the run, the
model and data, seeds, eval, the skip limit, manifests, retention, resume install,
weight export, the summary's keys -- lives in pipelines.core; this module is the loop.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import trio

from cykernels import gemm

from . import core
from .config import Config
from .core import (
    ResumePoint,
    RunInputs,
    RunStopped,
    TrainingFailed,
    prepare_run,
    rank_batches,
    step_seed,
)
from .data import data_record, record_epochs
from .step import LocalCollective, RankStep
from .store import checkpoint as ckpt_mod
from .store.rundir import RunDir, last_good_checkpoint, params_sha256, stop_line

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
    checkpoint. Raises RunRefused (exit 2) before the run dir is created when the run
    cannot start as asked, TrainingFailed (exit 3) when it cannot go on.
    """
    if cfg.cluster.ranks != 1:
        raise TrainingFailed(f"run_local runs one rank, the config asks for {cfg.cluster.ranks}")
    t_start = time.perf_counter()
    inputs = prepare_run(cfg, resume=resume, hooks=hooks)
    rundir = RunDir(run_dir, resume=resume, checkpoint_dir=cfg.checkpoint.dir)
    rundir.write_config(cfg, inputs.identity.config_hash, inputs.identity.resume_hash)
    rundir.write_data(data_record(inputs.train))
    record_epochs(inputs.train, rundir.path)
    if inputs.resume is not None:  # steps after the checkpoint are trained again
        rundir.forget_steps_after(int(inputs.resume.manifest["step"]))
    run = _LocalRun(cfg, inputs, rundir, out)
    try:
        if inputs.resume is not None:
            run.resume(inputs.resume)
        trio.run(run.train)
        if run.stop_signal is not None and cfg.train.more(run.step):
            raise RunStopped(run.stop())
        run.finish()
    finally:
        run.hooks.close()
        rundir.close()
    return run.summarize(time.perf_counter() - t_start)


class _LocalRun:
    """One local run's state, and its steps in the order run_local takes them."""

    def __init__(self, cfg: Config, inputs: RunInputs, rundir: RunDir, out):
        self.cfg, self.rundir, self.identity = cfg, rundir, inputs.identity
        self.train_set, self.evalset, self.model = inputs.train, inputs.evalset, inputs.model
        self.hooks = _Hooks(inputs.hooks, cfg, self.model, rundir)
        self.rank = RankStep(self.model, cfg, LocalCollective(), transforms=self.hooks.transforms)
        self.ckpt_root = rundir.checkpoints(cfg.checkpoint.dir)
        self.progress = core.progress_for(cfg, out)
        self.early = core.early_stopping_for(cfg)
        self.skips = core.SkipLimit()
        self.step = 0  # optimizer steps done
        self.last_loss = math.nan
        self.last_eval: dict = {}
        self.stopped_early = False
        self.stop_signal: str | None = None  # the signal that asked for a planned stop

    def resume(self, point: ResumePoint) -> None:
        """Install the checkpoint prepare_run found and checked."""
        for path, reason in point.skipped:
            self.progress.message(f"skipping checkpoint {path}: {reason}")
        manifest, full = core.read_checkpoint(point.path, self.rank.n)
        core.install_checkpoint(self.rank, manifest, full)
        self.step = int(manifest["step"])
        self.last_loss = float(manifest.get("metrics", {}).get("train_loss", math.nan))
        self.early.load(manifest.get("early_stopping", {}))
        self.progress.message(
            f"resumed from {point.path} (step {self.step}, world "
            f"{manifest['world']}, mode {manifest.get('mode')})"
        )

    async def train(self) -> None:
        """The steps; a signal (core.STOP_SIGNALS) ends them after the step under way,
        a second one -- or cluster.grace_seconds without that end -- at once."""
        with trio.open_signal_receiver(*core.STOP_SIGNALS) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals)
                    await self._steps()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:  # one task's error, raised as the step's
                if len(group.exceptions) != 1:
                    raise
                raise group.exceptions[0] from None

    async def _watch_signals(self, signals) -> None:
        async for signum in signals:
            self.stop_signal = signal.Signals(signum).name
            self.progress.message(
                f"{self.stop_signal}: stopping after this step, with a checkpoint "
                "(a second signal stops at once)"
            )
            break
        why = "no checkpointed stop within cluster.grace_seconds"
        with trio.move_on_after(self.cfg.cluster.grace_seconds):
            async for signum in signals:
                why = f"a second {signal.Signals(signum).name} to the zerotrain process"
                break
        raise RunStopped(
            f"stopped at once ({why}); last good checkpoint: "
            f"{last_good_checkpoint(self.ckpt_root)}; continue with --resume {self.rundir.path}"
        )

    def stop(self) -> str:
        """A planned stop's end: the checkpoint of the last step (unless it is on disk
        already); the one line that says so."""
        if self.step and not core.checkpoint_due(self.cfg, self.step):
            self.checkpoint()
        why = f"{self.stop_signal} to the zerotrain process"
        return stop_line(self.step, why, self.ckpt_root, self.rundir)

    async def _steps(self) -> None:
        cfg = self.cfg
        while cfg.train.more(self.step) and self.stop_signal is None:
            await trio.lowlevel.checkpoint()  # a step may not yield: let a signal in
            s = self.step
            t0 = time.perf_counter()
            batches = rank_batches(self.train_set, cfg, s, 0, 1)
            self.rank.keep_for_hooks = self.hooks.due(s + 1)
            stats = await self.rank.step(s, batches, seed=step_seed(cfg.train.seed, s, 0))
            dt = time.perf_counter() - t0
            self.step, self.last_loss = s + 1, stats.loss
            if self._after_step(stats, dt):
                break

    def _after_step(self, stats, dt: float) -> bool:
        """Log, evaluate, run hooks and checkpoint after a step; True to stop early."""
        cfg, step = self.cfg, self.step
        sps = cfg.train.batch_size / dt if dt > 0 else 0.0
        record = {
            "step": step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "samples_per_s": sps,
            "skipped": not stats.applied,
            "clip_coef": stats.clip_coef,
        }
        failure = self.skips.update(not stats.applied, step)
        if failure:
            self.rundir.log_step(record)
            raise TrainingFailed(failure)
        evaluated = core.eval_due(cfg, step)
        if evaluated:
            self.last_eval = record["eval"] = core.evaluate_run(cfg, self.model, self.evalset)
        self.rundir.log_step(record)
        extra = core.eval_text(self.last_eval) if evaluated else ""
        self.progress.update(step, stats.loss, stats.lr, sps, extra)
        self.hooks.after_step(step, self.rank, stats.loss, stats.lr)
        if core.checkpoint_due(cfg, step):
            self.checkpoint()
        if (
            evaluated
            and self.early.patience
            and self.early.update(self.last_eval[self.early.metric])
        ):
            self.stopped_early = True
            self.progress.message(
                f"early stop at step {step}: {self.early.metric} did not improve for "
                f"{self.early.patience} evaluations"
            )
            return True
        return False

    def checkpoint(self) -> None:
        rank = self.rank
        shards = [(rank.lo, rank.hi, {k: v.copy() for k, v in rank.shard_tensors().items()})]
        manifest = core.checkpoint_manifest(
            self.cfg,
            self.identity,
            self.step,
            world=1,
            counters=rank.opt.counters(),
            early_state=self.early.state(),
            metrics=dict(self.last_eval, train_loss=self.last_loss),
            data_epochs=core.followed_epochs(self.cfg, self.rundir.path),
            bounds=[(rank.lo, rank.hi)],
        )
        ckpt_mod.save_checkpoint(
            self.ckpt_root, self.step, shards, self.model.params.size, manifest
        )
        core.retain(self.cfg, self.ckpt_root)
        if self.cfg.train.steps == 0:
            core.export_latest(self.rundir.path, self.cfg, self.model, self.step)

    def finish(self) -> None:
        """The run's end: an evaluation if the last step had none, the final checkpoint."""
        if not self.last_eval:
            self.last_eval = core.evaluate_run(self.cfg, self.model, self.evalset)
        self.checkpoint()

    def summarize(self, wall: float) -> dict:
        """Write weights.safetensors and summary.json; return the summary."""
        sha = params_sha256(self.model)
        summary = core.run_summary(
            self.cfg,
            self.identity,
            steps=self.step,
            trained_steps=self.step,
            wall_s=wall,
            final_loss=self.last_loss,
            eval_metrics=self.last_eval,
            restarts=0,
            skipped_steps=self.rank.opt.skipped,
            stopped_early=self.stopped_early,
            params_sha256=sha,
            n_params=int(self.model.params.size),
            memory=[self.rank.memory()],
            blas=gemm.library(),
            hooks=self.hooks.stats(),
            run_dir=self.rundir.path,
        )
        core.export_weights(self.rundir.path, self.cfg, self.model, self.step, sha)
        self.rundir.write_summary(summary)
        self.progress.message(
            f"done: {self.step} steps in {wall:.1f}s, final loss "
            f"{self.last_loss:.4f}, eval {summary['eval']} -> {self.rundir.path}"
        )
        return summary
