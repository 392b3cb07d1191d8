"""What every runner shares, so the single-process runner (pipelines.local) and the rank
processes of the cluster (pipelines.cluster) train, check, record and resume alike.

    prepare_run        before anything starts or is written: hooks, data (and its size
                       against the batch), the model, the run's identity, the --resume
                       checkpoint found and checked against that identity
    RunIdentity        what a checkpoint records of the run that wrote it and a resume
                       must match (pipeline, shapes, optimizer and its state, data,
                       resume_hash); check_resume names the first thing that differs
    build_model_for, rank_batches, step_seed
                       the model a config names, a rank's micro-batches, dropout seeds
    evaluate_run, eval_due, checkpoint_due, SkipLimit, early_stopping_for, progress_for
                       what is measured and shown when, and when a run has diverged
    checkpoint_manifest, retain, read_checkpoint, install_checkpoint, export_weights
                       a checkpoint's manifest, retention, installing one, the weights
    run_summary        summary.json's keys every runner writes

Two errors end a run before or while it trains: RunRefused (exit 2: the run cannot start
as asked; raised before the run dir exists) and TrainingFailed (exit 3).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Config, config_hash, loss_spec, resume_fields, resume_hash
from .data import (
    RECORD_ONLY,
    EpochLog,
    batch_for,
    load_dataset,
    locate,
    locate_in,
    position,
    read_epochs,
    with_default_cache,
)
from .metrics import EarlyStopping, evaluate
from .store import checkpoint as ckpt_mod
from .store.rundir import Progress

__all__ = [
    "DROPOUT_STREAM",
    "MAX_CONSECUTIVE_SKIPS",
    "ResumePoint",
    "RunIdentity",
    "RunInputs",
    "RunRefused",
    "RunStopped",
    "STOP_SIGNALS",
    "SkipLimit",
    "TrainingFailed",
    "build_model_for",
    "check_resume",
    "checkpoint_due",
    "checkpoint_manifest",
    "early_stopping_for",
    "eval_due",
    "eval_text",
    "evaluate_run",
    "export_checkpoint_latest",
    "export_weights",
    "find_resume",
    "followed_epochs",
    "install_checkpoint",
    "load_hooks",
    "prepare_run",
    "progress_for",
    "rank_batches",
    "read_checkpoint",
    "retain",
    "run_summary",
    "step_seed",
]

# The purpose number of the dropout RNG stream: SeedSequence([seed, DROPOUT_STREAM, ...]).
DROPOUT_STREAM = 0xD80
# Skipping a non-finite step is recovery; skipping this many in a row is a diverged run.
MAX_CONSECUTIVE_SKIPS = 20


class TrainingFailed(RuntimeError):
    """The run could not complete (exit code 3); the message says why in one line."""


class RunStopped(Exception):
    """A signal stopped the run (exit code 4, "stopped, resumable"); the message says,
    in one line, at which step and checkpoint, and how to continue."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""The signals that ask a run for a planned stop (a terminal's Ctrl-C, systemd, Slurm,
Kubernetes): the run ends after a step with a checkpoint; a second one stops at once."""


class RunRefused(ValueError):
    """The run cannot start as asked (exit code 2): a --resume that names nothing to
    resume or a checkpoint of another run, a batch larger than the data. Raised before
    the run dir is created; the message says what is wrong and what is accepted."""


# ---------------------------------------------------------------------------------------
# Model, data, seeds
# ---------------------------------------------------------------------------------------


def build_model_for(cfg: Config, meta: dict):
    """The configured model, with the sizes the data dictates filled in when not given."""
    from pipelines.model import build_model

    opts = dict(cfg.model.options)
    name = cfg.model.name
    if name.startswith("file:"):
        return _build_file_model(cfg, meta)
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


def _build_file_model(cfg: Config, meta: dict):
    """A model from the user's file: offered the data's sizes and the seed; scored as
    its data's kind (config.data_kind)."""
    from pipelines.model import ModelFileError, build_file_model

    from .config import data_kind

    offered = {"seed": cfg.train.seed}
    for key, size in (
        ("in_dim", "n_features"),
        ("n_classes", "n_classes"),
        ("vocab", "vocab_size"),
        ("seq_len", "seq_len"),
    ):
        if size in meta:
            offered[key] = meta[size]
    try:
        model = build_file_model(cfg.model.name, dict(cfg.model.options), offered)
    except ModelFileError as err:
        raise TrainingFailed(str(err)) from None
    model.kind = data_kind(cfg.data)
    return model


def rank_batches(dataset, cfg: Config, step: int, rank: int, world: int) -> list[dict]:
    """Rank `rank`'s micro-batches of 0-based global step `step`."""
    epoch, pos, part = locate(dataset, step, cfg.train.batch_size)
    return [
        batch_for(
            part,
            cfg.train.seed,
            epoch,
            pos,
            rank,
            world,
            cfg.train.batch_size,
            micro=k,
            accum=cfg.train.grad_accum,
        )
        for k in range(cfg.train.grad_accum)
    ]


def step_seed(seed: int, step: int, rank: int) -> int:
    """The dropout seed of a rank's step (micro-batch k adds k)."""
    return int(np.random.SeedSequence([seed, DROPOUT_STREAM, step, rank]).generate_state(1)[0])


def load_hooks(specs: list) -> list:
    """pipelines.hooks Hooks for `specs`; ValueError (one line) when one cannot load."""
    if not specs:
        return []
    from pipelines.hooks import HookError
    from pipelines.hooks import load_hooks as _load

    try:
        return _load(list(specs))
    except HookError as err:
        raise ValueError(str(err).splitlines()[0]) from None


# ---------------------------------------------------------------------------------------
# Before the run: inputs, identity, the resume check
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records of the run that wrote it, and what a resume must match.

    World size and mode are not part of it (a checkpoint reshards), nor are the steps,
    evaluation, checkpointing and logging settings (resume_fields leaves them out).
    """

    pipeline: str
    n_params: int
    shapes: dict  # parameter name -> shape (list), trainable and frozen, in layout order
    optimizer: str
    optimizer_state: list  # the names of the optimizer's state vectors
    dataset: dict  # name, training samples, meta (vocabulary, classes, features)
    resume_config: dict  # config.resume_fields
    config_hash: str
    resume_hash: str
    # (name, offset, shape, trainable) in layout order: the manifests' layout table
    # (store.checkpoint.layout_table); not compared on resume (shapes are)
    layout: tuple = ()

    @classmethod
    def of(cls, cfg: Config, model, train) -> RunIdentity:
        from .optim import ShardOptimizer

        return cls(
            pipeline=cfg.name,
            n_params=int(model.params.size),
            shapes={slot.name: list(slot.shape) for slot in model.layout},
            optimizer=cfg.optimizer.name,
            optimizer_state=sorted(ShardOptimizer(cfg.optimizer, 0).state),
            dataset={
                "name": train.name,
                "train_samples": len(train),
                # the files and what was fitted on them are the data check's to compare
                # (pipelines.use.check_data, --allow-data-change)
                "meta": {k: v for k, v in train.meta.items() if k not in RECORD_ONLY},
            },
            resume_config=resume_fields(cfg),
            config_hash=config_hash(cfg),
            resume_hash=resume_hash(cfg),
            layout=tuple((s.name, s.offset, tuple(s.shape), s.trainable) for s in model.layout),
        )

    @property
    def train_samples(self) -> int:
        return int(self.dataset["train_samples"])

    def manifest_fields(self) -> dict:
        """The manifest keys this identity fills (check_resume reads them back)."""
        return {
            "pipeline": self.pipeline,
            "n": self.n_params,
            "model_shapes": self.shapes,
            "optimizer": self.optimizer,
            "optimizer_state": self.optimizer_state,
            "dataset": self.dataset,
            "resume_config": self.resume_config,
            "config_hash": self.config_hash,
            "resume_hash": self.resume_hash,
        }


@dataclass(frozen=True)
class ResumePoint:
    root: Path  # the directory holding the step-* checkpoints
    path: Path  # the newest valid checkpoint in it
    manifest: dict
    skipped: list = field(default_factory=list)  # (newer checkpoint, why it is not valid)


@dataclass
class RunInputs:
    """What prepare_run checked and built: every runner starts from this."""

    hooks: list
    data_cfg: object
    train: object
    evalset: object
    model: object
    identity: RunIdentity
    resume: ResumePoint | None


def prepare_run(cfg: Config, *, resume=None, hooks=()) -> RunInputs:
    """Load the hooks and the data, build the model and find the --resume checkpoint, and
    check each against the others -- before any rank starts or the run dir is written.

    RunRefused (exit 2) when the run cannot start as asked; TrainingFailed (exit 3) when
    the hooks, data or model cannot load."""
    try:
        loaded = load_hooks(list(cfg.hooks.specs) + list(hooks))
    except ValueError as err:
        raise TrainingFailed(f"hooks: {err}") from None
    data_cfg = with_default_cache(cfg.data)
    point = find_resume(Path(resume)) if resume is not None else None
    # data.follow: a resume replays the epochs' files its checkpoint recorded
    recorded = point.manifest.get("data", {}).get("epoch_files", []) if point else []
    epochs = EpochLog(records=recorded)
    try:
        train = load_dataset(data_cfg, "train", epochs=epochs)
        evalset = load_dataset(data_cfg, cfg.eval.split, epochs=epochs)
    except (OSError, ValueError) as err:
        raise TrainingFailed(f"data: {err}") from None
    if cfg.train.batch_size > len(train):
        raise RunRefused(
            f"train.batch_size {cfg.train.batch_size} exceeds the {len(train)} training "
            f"samples (accepted: 1 to {len(train)})"
        )
    model = build_model_for(cfg, train.meta)
    identity = RunIdentity.of(cfg, model, train)
    if point is not None:
        check_resume(identity, point)
    return RunInputs(loaded, data_cfg, train, evalset, model, identity, point)


def find_resume(where: Path) -> ResumePoint:
    """The newest valid checkpoint in `where` (a checkpoint root) or in its checkpoints/
    (a run dir). RunRefused, naming each checkpoint passed over and why, when none is."""
    if not where.is_dir():
        raise RunRefused(
            f"--resume: no such directory {str(where)!r} (accepted: a run dir or a checkpoint root)"
        )
    skipped = []
    for root in (where, where / "checkpoints"):
        found = ckpt_mod.latest_valid(root)
        skipped += found.skipped
        if found.path is not None:
            return ResumePoint(root, found.path, found.manifest, skipped)
    if not skipped:
        raise RunRefused(
            f"--resume: no checkpoint under {where} (accepted: a run dir or a checkpoint "
            "root holding step-* checkpoints)"
        )
    reasons = "; ".join(f"{path.name}: {why}" for path, why in skipped)
    raise RunRefused(f"--resume: no valid checkpoint under {where} ({reasons})")


def check_resume(identity: RunIdentity, point: ResumePoint) -> None:
    """RunRefused, in one line naming what differs, unless the checkpoint at `point` was
    written by a run that this one may continue (any world size and mode)."""
    why = _difference(identity, point.manifest)
    if why:
        raise RunRefused(
            f"--resume: {point.path} is not a checkpoint of this run: {why} (accepted: one "
            "that differs in world size, mode, train.steps, eval, checkpoint or logging "
            "settings only)"
        )


def _difference(identity: RunIdentity, manifest: dict) -> str | None:
    """The first thing in which `manifest` (of a checkpoint) and this run differ. Keys a
    checkpoint does not record are not compared; n and resume_hash every one records."""
    here = identity.manifest_fields()
    for key, what in (("pipeline", "pipeline"), ("n", "parameter count")):
        there = manifest.get(key)
        if there is not None and there != here[key]:
            return f"{what} {there!r} in the checkpoint, {here[key]!r} here"
    shapes = manifest.get("model_shapes")
    if shapes is not None and shapes != identity.shapes:
        for name in dict.fromkeys([*identity.shapes, *shapes]):
            a, b = shapes.get(name), identity.shapes.get(name)
            if a != b:
                return f"parameter {name!r} has shape {a} in the checkpoint, {b} here"
    for key, what in (
        ("optimizer", "optimizer"),
        ("optimizer_state", "optimizer state"),
        ("dataset", "data"),
    ):
        there = manifest.get(key)
        if there is not None and there != here[key]:
            entry = _first_difference(there, here[key])
            if entry is not None:  # a dataset's meta is too long to show whole
                k, a, b = entry
                return f"{what} {k} {_short(a)} in the checkpoint, {_short(b)} here"
            return f"{what} {_short(there)} in the checkpoint, {_short(here[key])} here"
    if manifest.get("resume_hash") == identity.resume_hash:
        return None
    recorded = manifest.get("resume_config")
    if recorded is None:
        return "resume_hash differs (the checkpoint does not record its config)"
    mine, theirs = _flatten(identity.resume_config), _flatten(recorded)
    keys = [k for k in dict.fromkeys([*theirs, *mine]) if theirs.get(k) != mine.get(k)]
    parts = [
        f"{k} {_short(theirs.get(k))} in the checkpoint, {_short(mine.get(k))} here"
        + _HINTS.get(k, "").format(theirs.get(k))
        for k in keys[:3]
    ]
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    return "; ".join(parts) + more if parts else "resume_hash differs"


# How to keep a checkpoint's value where the config derives it.
_HINTS = {
    "schedule.total_steps": " (train.steps unless set; --set schedule.total_steps={} "
    "keeps the checkpoint's schedule)",
}


def _first_difference(there, here) -> tuple | None:
    """(dotted key, checkpoint's value, this run's) of the first entry in which two dicts
    differ; None unless both are dicts with such an entry."""
    if not (isinstance(there, dict) and isinstance(here, dict)):
        return None
    theirs, mine = _flatten(there), _flatten(here)
    for k in dict.fromkeys([*theirs, *mine]):
        if theirs.get(k) != mine.get(k):
            return k, theirs.get(k), mine.get(k)
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------
# During the run: what is measured when, divergence
# ---------------------------------------------------------------------------------------


def eval_due(cfg: Config, step: int) -> bool:
    """Whether the run evaluates after `step` steps (every eval.every, and at the end)."""
    return bool(cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Whether a periodic checkpoint is written after `step` steps (the final one is
    written by the run's end, once)."""
    every = cfg.checkpoint.every
    return bool(every and step % every == 0 and step != cfg.train.steps)


def evaluate_run(cfg: Config, model, evalset) -> dict:
    """The eval metrics, plus those checkpoint retention and early stopping rank by."""
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
        loss_fn=loss_spec(cfg.loss),
    )


def progress_for(cfg: Config, out) -> Progress:
    """The progress display: a plain line every train.log_every steps (default: 20 lines a
    run) or a bar on a terminal; `out` None is stderr."""
    every_log = cfg.train.log_every or (max(cfg.train.steps // 20, 1) if cfg.train.steps else 100)
    return Progress(cfg.train.steps, every_log, out, prefix="zerotrain: ")


def eval_text(metrics: dict) -> str:
    """The progress line's eval suffix."""
    return " | eval " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def early_stopping_for(cfg: Config) -> EarlyStopping:
    es = cfg.eval.early_stopping
    return EarlyStopping(es.metric, es.patience, es.mode, es.min_delta)


class SkipLimit:
    """Counts consecutive steps skipped for a non-finite gradient; `update` returns the
    failure reason once MAX_CONSECUTIVE_SKIPS in a row have been (None until then)."""

    def __init__(self) -> None:
        self.consecutive = 0

    def update(self, skipped: bool, step: int) -> str | None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive < MAX_CONSECUTIVE_SKIPS:
            return None
        return (
            f"{self.consecutive} consecutive steps skipped for non-finite gradients "
            f"(last at step {step})"
        )


# ---------------------------------------------------------------------------------------
# Checkpoints and weights
# ---------------------------------------------------------------------------------------


def checkpoint_manifest(
    cfg: Config,
    identity: RunIdentity,
    step: int,
    *,
    world: int,
    counters: dict,
    early_state: dict,
    metrics: dict,
    data_epochs: list | None = None,
    bounds: list | None = None,
) -> dict:
    """The manifest of the checkpoint of `step` (store.checkpoint adds format and shards).

    `data_epochs`: a followed directory's epoch records (data.read_epochs), which the
    data position then carries for a resume to replay. `bounds`: the shards' [lo, hi)
    by rank, for the layout table (store.checkpoint.layout_table)."""
    if data_epochs is None:
        epoch, pos = position(step, identity.train_samples, cfg.train.batch_size)
        followed = {}
    else:
        epoch, pos = locate_in(data_epochs, step, cfg.train.batch_size)
        followed = {"epoch_files": data_epochs}
    layout = {"layout": ckpt_mod.layout_table(identity.layout, bounds)} if bounds else {}
    return {
        **identity.manifest_fields(),
        "step": step,
        "world": world,
        "mode": cfg.cluster.mode,
        "data": {
            "seed": cfg.train.seed,
            "epoch": epoch,
            "step_in_epoch": pos,
            "global_step": step,
            **followed,
        },
        "rng": {"seed": cfg.train.seed, "dropout_stream": DROPOUT_STREAM},
        "counters": counters,
        "early_stopping": early_state,
        "metrics": metrics,
        **layout,
    }


def followed_epochs(cfg: Config, run_dir: Path) -> list | None:
    """The run's epoch records when its data is a followed directory, else None."""
    return read_epochs(run_dir) if cfg.data.options.get("follow") else None


def retain(cfg: Config, root: Path) -> None:
    """Delete the checkpoints under `root` the config's retention does not keep."""
    c = cfg.checkpoint
    ckpt_mod.apply_retention(root, c.keep_last, c.keep_best, c.best_metric, c.best_mode)


def read_checkpoint(path, n: int) -> tuple[dict, dict]:
    """(manifest, full-length vectors) of the checkpoint at `path`, of any world size and
    mode, for a model of `n` parameters (CheckpointError otherwise). Touches no model:
    a rank reads in a worker thread and installs on its own."""
    manifest, full = ckpt_mod.load_full(path, verify=False)
    if manifest["n"] != n:
        raise ckpt_mod.CheckpointError(
            f"checkpoint {path} has {manifest['n']} parameters, the model {n}"
        )
    return manifest, full


def install_checkpoint(rank_step, manifest: dict, full: dict) -> None:
    """Put what read_checkpoint read into a RankStep: its slice of params and optimizer
    state (resharding), and the optimizer's counters."""
    full = dict(full)
    params = full.pop("params")
    rank_step.load_full(params, full, manifest.get("counters", {}))


def export_weights(run_dir: Path, cfg: Config, model, step: int, sha: str) -> None:
    """weights.safetensors in the run dir: full weights by PyTorch name
    (safetensors.torch.load_file -> module.load_state_dict)."""
    ckpt_mod.export_weights(
        Path(run_dir) / "weights.safetensors",
        model,
        {"pipeline": cfg.name, "step": str(step), "params_sha256": sha},
    )


def export_latest(run_dir: Path, cfg: Config, model, step: int) -> Path:
    """weights/latest.safetensors: a continuous run's weights at its newest checkpoint,
    by PyTorch name, replaced whole (temp file + rename): a reader gets one step's."""
    path = Path(run_dir) / "weights" / "latest.safetensors"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".latest.safetensors.{os.getpid()}")
    ckpt_mod.export_weights(tmp, model, {"pipeline": cfg.name, "step": str(step)})
    os.replace(tmp, path)
    return path


class _CheckpointWeights:
    """A model's weights with the trainable ones taken from a full params vector (a
    checkpoint's): what ckpt_mod.export_weights reads of a model."""

    def __init__(self, model, params: np.ndarray):
        self.layout, self.params = model.layout, params
        self._frozen = model.frozen

    def state_dict(self) -> dict:
        out = {}
        for name, offset, shape, trainable in self.layout:
            size = int(np.prod(shape, dtype=np.int64))
            buf = self.params if trainable else self._frozen
            out[name] = buf[offset : offset + size].reshape(shape)
        return out


def export_checkpoint_latest(run_dir: Path, cfg: Config, model, ckpt: Path) -> Path:
    """weights/latest.safetensors from the complete checkpoint `ckpt` of a continuous
    run: its params, by PyTorch name (frozen parameters, which no checkpoint holds and
    training never changes, from `model`), replaced whole (temp file + rename)."""
    manifest, full = read_checkpoint(ckpt, int(model.params.size))
    path = Path(run_dir) / "weights" / "latest.safetensors"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".latest.safetensors.{os.getpid()}")
    weights = _CheckpointWeights(model, full["params"])
    ckpt_mod.export_weights(tmp, weights, {"pipeline": cfg.name, "step": str(manifest["step"])})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# After the run
# ---------------------------------------------------------------------------------------


def run_summary(
    cfg: Config,
    identity: RunIdentity,
    *,
    steps: int,
    trained_steps: int,
    wall_s: float,
    final_loss: float,
    eval_metrics: dict,
    restarts: int,
    skipped_steps: int,
    stopped_early: bool,
    params_sha256: str,
    n_params: int,
    memory: list,
    blas: str,
    hooks: dict,
    run_dir: Path,
) -> dict:
    """summary.json's keys that every runner writes (a runner may add its own)."""
    from .optim import KERNEL_BACKEND

    done_samples = trained_steps * cfg.train.batch_size
    return {
        "status": "ok",
        "pipeline": cfg.name,
        "final_loss": final_loss,
        "eval": {k: eval_metrics[k] for k in cfg.eval.metrics if k in eval_metrics},
        "steps": steps,
        "ranks": cfg.cluster.ranks,
        "mode": cfg.cluster.mode,
        "seed": cfg.train.seed,
        "wall_s": wall_s,
        "samples_per_s": done_samples / wall_s if wall_s > 0 else 0.0,
        "restarts": restarts,
        "skipped_steps": skipped_steps,
        "stopped_early": stopped_early,
        "params_sha256": params_sha256,
        "n_params": n_params,
        "memory": {"per_rank": memory},
        "config_hash": identity.config_hash,
        "kernels": KERNEL_BACKEND,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
        "blas": blas,
        "hooks": hooks,
        "run_dir": str(run_dir),
    }
