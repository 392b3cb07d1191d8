"""Pipeline configuration: the schema, TOML loading, `--set` overrides and the config hash.

A pipeline is one TOML file with these sections (every key optional unless noted; the
defaults are the dataclass defaults below, so `Config()` is a valid, tiny configuration):

    description = "one line shown by `zerotrain pipelines`"
    [model]      name (required) + the model builder's keyword arguments
    [data]       name (corpus | digits | friedman | digit_triplets | table | text |
                 triplets) + that dataset's options (table, text and triplets read the
                 user's files: pipelines.data)
    [loss]       name (a pipelines.model.losses registry entry, "" = the model's default)
                 + the loss's keyword arguments
    [optimizer]  name (sgd | adam | adamw), lr, betas, eps, weight_decay, momentum, ...
    [schedule]   name (constant | warmup_cosine | step | linear), warmup_steps, ...
    [cluster]    ranks, mode (ddp | zero1 | zero2), transport (ipc | tcp)
    [checkpoint] every, keep_last, keep_best, best_metric, best_mode, dir
    [hooks]      specs [...] (pipelines.hooks specs: "PATH.py[:NAME]", "builtin[:NAME]",
                 or tables {hook = ..., every = ..., ...}), timeout_s
    [eval]       every, split, metrics, batch_size, max_batches,
                 [eval.early_stopping] metric, patience, mode, min_delta
    [train]      steps, batch_size, grad_accum, seed, clip_norm, log_every

`train.batch_size` is the GLOBAL batch: the samples behind one optimizer step, summed over
ranks and accumulation micro-steps. Each rank computes batch_size / (ranks * grad_accum)
samples per micro-step. Keeping the global batch fixed is what lets `--ranks 1` and
`--ranks 4` reach the same parameters (tests/pipelines/test_step.py).

Every mistake is a `ConfigError` whose message is ONE line naming the dotted key, what is
accepted and what was received, e.g.

    >>> load_config("char_lm", ["train.batch_size=0"])
    ConfigError: train.batch_size: expected an integer >= 1, got 0

Data before behaviour: each section is a frozen dataclass checked in `__post_init__`;
`_build_section` turns a TOML table into one (unknown keys and types), the dataclass
checks values, and `resolve` checks what spans sections (divisibility, model kwargs).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_PIPELINE",
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "LIVE_KEYS",
    "LiveConfig",
    "builtin_pipelines",
    "check_live_override",
    "check_overrides",
    "config_hash",
    "load_config",
    "loss_spec",
    "parse_override",
    "resume_fields",
    "resume_hash",
    "from_resolved",
    # the sections of a Config
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "HooksConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
]

DEFAULT_PIPELINE = "char_lm"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration mistake; `str(err)` is one line fit to print as it is."""


def _fail(key: str, accepted: str, received: Any) -> typing.NoReturn:
    raise ConfigError(f"{key}: expected {accepted}, got {_show(received)}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, "one of " + ", ".join(choices), value)


def _check_range(key: str, value: float, lo=None, hi=None, lo_open=False, hi_open=False):
    """Require lo <(=) value <(=) hi; the message states the accepted interval."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, "a finite number", value)
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    if not ok:
        kind = "an integer" if isinstance(value, int) else "a number"
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        _fail(key, f"{kind} " + " and ".join(parts), value)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------
# Each dataclass names its dotted prefix in `_section`. Sections that carry free keyword
# arguments for a builder (model, data, loss) keep them in `options`; their keys are
# checked against the builder in `resolve`.

MODEL_NAMES = ("char_transformer", "mlp_classifier", "mlp_regressor", "triplet_embedder")
DATASET_NAMES = ("corpus", "digits", "friedman", "digit_triplets", "table", "text", "triplets")
# Datasets read from the user's files (their options name paths; see pipelines.data).
FILE_DATASETS = ("table", "text", "triplets")
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
SCHEDULE_NAMES = ("constant", "warmup_cosine", "step", "linear")
MODES = ("ddp", "zero1", "zero2")
TRANSPORTS = ("ipc", "tcp")
WIRE_DTYPES = ("fp32", "bf16")
METRIC_NAMES = (
    "loss",
    "accuracy",
    "precision",
    "recall",
    "macro_f1",
    "perplexity",
    "mse",
    "mae",
    "r2",
)
# Which eval metrics make sense for which model; `eval.metrics` is checked against it.
MODEL_METRICS = {
    "char_transformer": ("loss", "perplexity", "accuracy"),
    "mlp_classifier": ("loss", "accuracy", "precision", "recall", "macro_f1"),
    "mlp_regressor": ("loss", "mse", "mae", "r2"),
    "triplet_embedder": ("loss", "accuracy"),
}
# Which datasets feed which model (the batch keys must match).
MODEL_DATASETS = {
    "char_transformer": ("corpus", "text"),
    "mlp_classifier": ("digits", "table"),
    "mlp_regressor": ("friedman", "table"),
    "triplet_embedder": ("digit_triplets", "triplets"),
}


@dataclass(frozen=True)
class ModelConfig:
    _section: ClassVar[str] = "model"
    _free_options: ClassVar[bool] = True
    name: str = "mlp_classifier"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.name, str) and self.name.startswith("file:"):
            path, _, obj = self.name[5:].rpartition(":")
            if not path.endswith(".py") or not obj.isidentifier():
                _fail("model.name", '"file:PATH.py:NAME" for a model from a file', self.name)
            return
        _check_choice("model.name", self.name, MODEL_NAMES)


# How a labelled table is read: shared by data.name = "table" and "triplets".
_TABLE_READING: dict = {
    "path": (str, ""),
    "eval_path": (str, ""),
    "eval_fraction": (float, 0.2),
    "split": (str, "tail"),
    "features": (list[str], []),
    "target": (str, ""),
    "standardize": (bool, False),
}

# Per-dataset options: name -> {key: (type, default)}; checked like the fixed sections.
DATASET_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "corpus": {"seq_len": (int, 64), "eval_fraction": (float, 0.05)},
    "digits": {"n_train": (int, 20000), "n_eval": (int, 2000), "noise": (float, 0.1)},
    "friedman": {
        "n_train": (int, 20000),
        "n_eval": (int, 2000),
        "noise": (float, 1.0),
        "n_features": (int, 10),
    },
    "digit_triplets": {"n_train": (int, 20000), "n_eval": (int, 2000), "noise": (float, 0.1)},
    # path: CSV/TSV (header row), .npy, .npz or .safetensors; features: column or array
    # names ([] = every column but the target); target: a column or array name ("" = the
    # last column, or array "y"); task: "" = the model's (classification for
    # mlp_classifier, regression for mlp_regressor); eval from eval_path, else the
    # eval_fraction tail (split = "tail") or a data.seed-drawn share (split = "random").
    "table": {**_TABLE_READING, "task": (str, ""), "follow": (bool, False)},
    # a labelled table read as "table" reads it for classification; n_train / n_eval
    # triplets drawn from the train / eval rows with data.seed (pipelines.data._triplets).
    "triplets": {**_TABLE_READING, "n_train": (int, 20000), "n_eval": (int, 2000)},
    # path: a file, a directory or a glob of UTF-8 text; tokenizer: bytes (256 ids) or
    # chars (the training files' characters); eval from eval_path, else the tail.
    # follow (table and text): path is a directory read anew at each epoch boundary, each
    # epoch's files recorded in the run dir (pipelines.data._follow); needs eval_path.
    "text": {
        "path": (str, ""),
        "eval_path": (str, ""),
        "eval_fraction": (float, 0.05),
        "tokenizer": (str, "bytes"),
        "seq_len": (int, 64),
        "follow": (bool, False),
    },
}
TABLE_TASKS = ("classification", "regression")
TOKENIZERS = ("bytes", "chars")


@dataclass(frozen=True)
class DataConfig:
    """`seed` fixes the generated data (not the shuffling, which follows `train.seed`);
    `cache_dir` ("" = keep in memory) materialises arrays as .npy and memory-maps them."""

    _section: ClassVar[str] = "data"
    _free_options: ClassVar[bool] = True
    name: str = "digits"
    seed: int = 0
    cache_dir: str = ""
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        _check_choice("data.name", self.name, DATASET_NAMES)
        _check_range("data.seed", self.seed, lo=0)
        known = DATASET_OPTIONS[self.name]
        full = {}
        for key, value in self.options.items():
            if key not in known:
                _unknown_key(
                    f"data.{key}",
                    key,
                    list(known) + ["name", "seed", "cache_dir"],
                    f" for dataset {self.name!r}",
                )
            if key == "features" and isinstance(value, str):
                value = [value]  # one column or array name
            full[key] = _coerce(f"data.{key}", value, known[key][0])
        for key, (_, default) in known.items():
            full.setdefault(key, default)
        for key in ("n_train", "n_eval", "seq_len", "n_features"):
            if key in full:
                _check_range(f"data.{key}", full[key], lo=1)
        if "n_features" in full:
            _check_range("data.n_features", full["n_features"], lo=5)
        if "noise" in full:
            _check_range("data.noise", full["noise"], lo=0.0)
        if "eval_fraction" in full:
            _check_range("data.eval_fraction", full["eval_fraction"], lo=0.0, hi=0.5, lo_open=True)
        if self.name in FILE_DATASETS:
            if not full["path"]:
                _fail("data.path", f"a file, directory or glob for dataset {self.name!r}", "")
        if self.name in ("table", "triplets"):
            _check_choice("data.split", full["split"], ("tail", "random"))
        if self.name == "table":
            if full["task"]:
                _check_choice("data.task", full["task"], TABLE_TASKS)
        if self.name == "text":
            _check_choice("data.tokenizer", full["tokenizer"], TOKENIZERS)
        object.__setattr__(self, "options", full)


@dataclass(frozen=True)
class LossConfig:
    """`name = ""` uses the model's default loss; other keys go to the loss function."""

    _section: ClassVar[str] = "loss"
    _free_options: ClassVar[bool] = True
    name: str = ""
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """torch.optim defaults; `adamw` is Adam with decoupled weight decay."""

    _section: ClassVar[str] = "optimizer"
    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        _check_choice("optimizer.name", self.name, OPTIMIZER_NAMES)
        _check_range("optimizer.lr", self.lr, lo=0.0, lo_open=True)
        if len(self.betas) != 2:
            _fail("optimizer.betas", "a list of two numbers [beta1, beta2]", self.betas)
        for i, b in enumerate(self.betas):
            _check_range(f"optimizer.betas[{i}]", b, lo=0.0, hi=1.0, hi_open=True)
        _check_range("optimizer.eps", self.eps, lo=0.0, lo_open=True)
        _check_range("optimizer.weight_decay", self.weight_decay, lo=0.0)
        _check_range("optimizer.momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        _check_range("optimizer.dampening", self.dampening, lo=0.0, hi=1.0)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            _fail(
                "optimizer.nesterov", "false unless momentum > 0 and dampening = 0", self.nesterov
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """LR multiplier as a function of the step (pipelines.optim.lr_at).

    warmup_steps apply to every schedule; `min_lr_ratio` is the floor of warmup_cosine and
    linear as a fraction of optimizer.lr; `step` multiplies by gamma every step_size steps;
    total_steps = 0 means train.steps.
    """

    _section: ClassVar[str] = "schedule"
    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    step_size: int = 1000
    gamma: float = 0.1

    def __post_init__(self):
        _check_choice("schedule.name", self.name, SCHEDULE_NAMES)
        _check_range("schedule.warmup_steps", self.warmup_steps, lo=0)
        _check_range("schedule.total_steps", self.total_steps, lo=0)
        _check_range("schedule.min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
        _check_range("schedule.step_size", self.step_size, lo=1)
        _check_range("schedule.gamma", self.gamma, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True)
class ClusterConfig:
    _section: ClassVar[str] = "cluster"
    ranks: int = 1
    mode: str = "ddp"
    transport: str = "ipc"
    # in-memory snapshot (own shard + a replica of the left neighbour's) every K steps:
    # a restarted rank replays at most K steps
    snapshot_every: int = 10
    # OTP restart intensity of the cluster supervisor over rank processes
    max_restarts: int = 3
    max_seconds: float = 5.0
    # the whole run's budget of unplanned rank crashes (chaos faults do not count); the
    # same error at the same step twice ends the run at once
    max_total_restarts: int = 100
    # a planned stop (SIGINT, SIGTERM, SIGUSR1, SIGUSR2) ends with a checkpoint within
    # this many seconds, or at once without one (under the common 30 s kill delay)
    grace_seconds: float = 25.0
    # a rank silent this long (a hung or stopped process) is killed and restarted
    heartbeat_timeout: float = 2.0
    # a collective making no progress this long fails (a peer's death is seen sooner)
    collective_timeout: float = 30.0
    # several nodes: ranks of another node down (its agent lost) and not back this long
    # (the node restarted with the same node rank) end the run, exit 3
    rejoin_timeout: float = 120.0
    # ddp / zero1: all-reduce the gradient in buckets of about this many MiB, starting
    # on each while backward still runs (0: one reduction after backward). The bucket
    # boundaries change the summation order, so they are part of what fixes the bits.
    bucket_mb: float = 0.0
    # pin each rank process to a CPU of its own (rank r -> the r-th CPU this process
    # may use) when the run has exactly one rank per such CPU: no migrations, warm
    # caches (+15% samples/s on the MLP at N = 2 here). Never changes the numbers.
    pin_ranks: bool = True
    # how gradients travel between ranks: "fp32", or "bf16" (rounded to nearest even,
    # half the bytes; sums still add in float32; deterministic, but other numbers than
    # fp32's: README "Slow links")
    wire_dtype: str = "fp32"
    # a multi-node run's CURVE keys (`zerotrain keys init DIR`; `--keys DIR` wins): every
    # tcp:// socket between hosts is then authenticated and encrypted. Where the keys
    # lie is no part of the config hash (each host may keep its copy elsewhere).
    keys: str = ""

    def __post_init__(self):
        _check_range("cluster.ranks", self.ranks, lo=1, hi=256)
        _check_choice("cluster.mode", self.mode, MODES)
        _check_choice("cluster.transport", self.transport, TRANSPORTS)
        _check_choice("cluster.wire_dtype", self.wire_dtype, WIRE_DTYPES)
        _check_range("cluster.snapshot_every", self.snapshot_every, lo=1)
        _check_range("cluster.max_restarts", self.max_restarts, lo=0)
        _check_range("cluster.max_seconds", self.max_seconds, lo=0.0, lo_open=True)
        _check_range("cluster.max_total_restarts", self.max_total_restarts, lo=0)
        _check_range("cluster.grace_seconds", self.grace_seconds, lo=0.0, lo_open=True)
        _check_range("cluster.heartbeat_timeout", self.heartbeat_timeout, lo=0.2)
        _check_range("cluster.collective_timeout", self.collective_timeout, lo=0.5)
        _check_range("cluster.rejoin_timeout", self.rejoin_timeout, lo=0.5)
        _check_range("cluster.bucket_mb", self.bucket_mb, lo=0.0, hi=1024.0)
        if self.bucket_mb and self.mode == "zero2":
            _fail(
                "cluster.bucket_mb",
                "0 with mode zero2 (it reduce-scatters contiguous shards)",
                self.bucket_mb,
            )


@dataclass(frozen=True)
class CheckpointConfig:
    """every = 0 disables periodic checkpoints (the final one is still written);
    keep_best = 0 keeps none for their metric; dir is relative to the run dir."""

    _section: ClassVar[str] = "checkpoint"
    every: int = 0
    keep_last: int = 2
    keep_best: int = 0
    best_metric: str = "loss"
    best_mode: str = "min"
    dir: str = "checkpoints"

    def __post_init__(self):
        _check_range("checkpoint.every", self.every, lo=0)
        _check_range("checkpoint.keep_last", self.keep_last, lo=1)
        _check_range("checkpoint.keep_best", self.keep_best, lo=0)
        _check_choice("checkpoint.best_metric", self.best_metric, METRIC_NAMES)
        _check_choice("checkpoint.best_mode", self.best_mode, ("min", "max"))
        if not self.dir:
            _fail("checkpoint.dir", "a non-empty path", self.dir)


@dataclass(frozen=True)
class HooksConfig:
    """Gradient hooks (pipelines.hooks): `specs` are loaded with `--hook`s added;
    analyzers get `timeout_s` seconds per call before they count as hung."""

    _section: ClassVar[str] = "hooks"
    specs: list = field(default_factory=list)
    timeout_s: float = 10.0

    def __post_init__(self):
        _check_range("hooks.timeout_s", self.timeout_s, lo=0.0, lo_open=True)
        try:
            from pipelines.hooks import HookError, normalise_spec
        except ImportError:
            normalise_spec = None
        for i, spec in enumerate(self.specs):
            if not isinstance(spec, str | dict):
                _fail(
                    f"hooks.specs[{i}]",
                    '"PATH.py[:NAME]", "builtin[:NAME]" or a table with hook = ...',
                    spec,
                )
            if normalise_spec is not None:
                try:
                    normalise_spec(spec)
                except HookError as err:
                    raise ConfigError(f"hooks.specs[{i}]: {err}") from None


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """patience = 0 disables it; patience evaluations without an improvement of more
    than min_delta stop the run."""

    _section: ClassVar[str] = "eval.early_stopping"
    metric: str = "loss"
    patience: int = 0
    mode: str = "min"
    min_delta: float = 0.0

    def __post_init__(self):
        _check_choice("eval.early_stopping.metric", self.metric, METRIC_NAMES)
        _check_range("eval.early_stopping.patience", self.patience, lo=0)
        _check_choice("eval.early_stopping.mode", self.mode, ("min", "max"))
        _check_range("eval.early_stopping.min_delta", self.min_delta, lo=0.0)


@dataclass(frozen=True)
class EvalConfig:
    """every = 0 evaluates only at the end; max_batches = 0 evaluates the whole split."""

    _section: ClassVar[str] = "eval"
    every: int = 0
    split: str = "eval"
    metrics: list[str] = field(default_factory=lambda: ["loss"])
    batch_size: int = 256
    max_batches: int = 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self):
        _check_range("eval.every", self.every, lo=0)
        _check_choice("eval.split", self.split, ("eval", "train"))
        for i, m in enumerate(self.metrics):
            _check_choice(f"eval.metrics[{i}]", m, METRIC_NAMES)
        _check_range("eval.batch_size", self.batch_size, lo=1)
        _check_range("eval.max_batches", self.max_batches, lo=0)


@dataclass(frozen=True)
class TrainConfig:
    """batch_size is the global batch of one optimizer step (see the module doc);
    clip_norm = 0 disables clipping; log_every = 0 picks about 20 progress lines (every
    100 steps for a continuous run). steps = 0 trains until stopped (a signal, the
    daemon's stop): a continuous run, checkpointing every checkpoint.every steps and
    exporting weights/latest.safetensors with each checkpoint."""

    _section: ClassVar[str] = "train"
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    clip_norm: float = 0.0
    log_every: int = 0

    def __post_init__(self):
        _check_range("train.steps", self.steps, lo=0)
        _check_range("train.batch_size", self.batch_size, lo=1)
        _check_range("train.grad_accum", self.grad_accum, lo=1)
        _check_range("train.seed", self.seed, lo=0, hi=2**63 - 1)
        _check_range("train.clip_norm", self.clip_norm, lo=0.0)
        _check_range("train.log_every", self.log_every, lo=0)

    def more(self, done: int) -> bool:
        """Whether a step follows ``done`` steps: always for a continuous run (steps 0)."""
        return self.steps == 0 or done < self.steps


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "cluster": ClusterConfig,
    "checkpoint": CheckpointConfig,
    "hooks": HooksConfig,
    "eval": EvalConfig,
    "train": TrainConfig,
}


@dataclass(frozen=True)
class Config:
    """A resolved pipeline configuration. Build it with `load_config`."""

    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def micro_batch(self) -> int:
        """Samples one rank computes per micro-step."""
        return self.train.batch_size // (self.cluster.ranks * self.train.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps or self.train.steps

    def to_dict(self) -> dict:
        """Plain data (JSON-able); `load_config(from_dict(...))` gives the same Config."""
        return dataclasses.asdict(self)

    def replace(self, **sections) -> Config:
        """A copy with some sections replaced, re-checked by `resolve`."""
        return resolve(dataclasses.replace(self, **sections))


# ---------------------------------------------------------------------------------------
# Building sections from TOML tables
# ---------------------------------------------------------------------------------------


def _unknown_key(dotted: str, key: str, accepted, where: str = "") -> typing.NoReturn:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{dotted}: unknown key{where}{hint}; accepted: {', '.join(sorted(accepted))}"
    )


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ')}s"
    return {
        int: "an integer",
        float: "a number",
        bool: "a boolean (true/false)",
        str: "a string",
        dict: "a table",
    }.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            _fail(key, _type_name(tp), value)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, "an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, "a boolean (true/false)", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(key, "a string", value)
        return value
    raise AssertionError(f"schema type {tp!r} of {key} is not handled")


def _build_section(cls, table: Any):
    prefix = cls._section
    if not isinstance(table, dict):
        _fail(prefix, "a table", table)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    kwargs, options = {}, {}
    for key, value in table.items():
        if key in fields:
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                kwargs[key] = _build_section(tp, value)
            elif tp is list:  # untyped list: the section checks its items
                if not isinstance(value, list):
                    _fail(f"{prefix}.{key}", "a list", value)
                kwargs[key] = value
            else:
                kwargs[key] = _coerce(f"{prefix}.{key}", value, tp)
        elif getattr(cls, "_free_options", False):
            _check_toml_value(f"{prefix}.{key}", value)
            options[key] = value
        else:
            _unknown_key(f"{prefix}.{key}", key, list(fields))
    if getattr(cls, "_free_options", False):
        kwargs["options"] = options
    return cls(**kwargs)


def _check_toml_value(key: str, value: Any) -> None:
    """Builder kwargs are scalars or lists of them (no tables, no dates)."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_toml_value(f"{key}[{i}]", v)
    elif not isinstance(value, bool | int | float | str):
        _fail(key, "a number, string, boolean or list of them", value)


def from_dict(raw: dict, *, name: str = "custom") -> Config:
    """Build and resolve a Config from a parsed TOML document (a dict)."""
    if not isinstance(raw, dict):
        _fail("<config>", "a table", raw)
    sections = {}
    description = ""
    for key, value in raw.items():
        if key == "description":
            description = _coerce("description", value, str)
        elif key in SECTIONS:
            sections[key] = _build_section(SECTIONS[key], value)
        else:
            _unknown_key(key, key, list(SECTIONS) + ["description"], " (top level)")
    return resolve(Config(name=name, description=description, **sections))


# ---------------------------------------------------------------------------------------
# Cross-section checks
# ---------------------------------------------------------------------------------------


def from_resolved(d: dict) -> Config:
    """The Config whose `to_dict()` is `d` (how a rank process gets the run's config)."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    name = d.pop("name", "custom")
    for section in d.values():
        if isinstance(section, dict) and isinstance(section.get("options"), dict):
            section.update(section.pop("options"))
    return from_dict(d, name=name)


# The task a table is read for, by model (a table's labels are mapped for classification).
MODEL_TASKS = {"mlp_classifier": "classification", "mlp_regressor": "regression"}
# A model from a file is scored as its data says: the built-in model of that kind.
_KIND_MODEL = {
    "corpus": "char_transformer",
    "text": "char_transformer",
    "digits": "mlp_classifier",
    "friedman": "mlp_regressor",
    "digit_triplets": "triplet_embedder",
    "triplets": "triplet_embedder",
}


def data_kind(data: DataConfig) -> str:
    """The metric family the data implies: classifier, language, regression, triplet."""
    if data.name == "table":
        return "classifier" if data.options["task"] == "classification" else "regression"
    return {
        "char_transformer": "language",
        "mlp_classifier": "classifier",
        "mlp_regressor": "regression",
        "triplet_embedder": "triplet",
    }[_KIND_MODEL[data.name]]


def _metrics_model(cfg: Config) -> str:
    """The registered model whose metrics apply (a file model: its data's kind's)."""
    if not cfg.model.name.startswith("file:"):
        return cfg.model.name
    if cfg.data.name == "table":
        return MODEL_TASKS_BY_TASK[cfg.data.options["task"]]
    return _KIND_MODEL[cfg.data.name]


MODEL_TASKS_BY_TASK = {"classification": "mlp_classifier", "regression": "mlp_regressor"}


def resolve(cfg: Config) -> Config:
    """Check what spans sections; return `cfg` in canonical form (a table's task filled
    in from the model)."""
    model = cfg.model.name
    if cfg.data.name == "table" and model in MODEL_TASKS:
        task = MODEL_TASKS[model]
        if cfg.data.options["task"] not in ("", task):
            _fail("data.task", f'{task!r} (or "") for model {model!r}', cfg.data.options["task"])
        if not cfg.data.options["task"]:
            options = dict(cfg.data.options, task=task)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, options=options))
    if model.startswith("file:"):
        if cfg.data.name == "table" and not cfg.data.options["task"]:
            _fail("data.task", "classification or regression for a model from a file", "")
        model = _metrics_model(cfg)
    if not cfg.model.name.startswith("file:") and cfg.data.name not in MODEL_DATASETS[model]:
        _fail(
            "data.name",
            f"a dataset for model {model!r}: " + ", ".join(MODEL_DATASETS[model]),
            cfg.data.name,
        )
    for i, m in enumerate(cfg.eval.metrics):
        if m not in MODEL_METRICS[model]:
            _fail(
                f"eval.metrics[{i}]",
                f"a metric of model {model!r}: " + ", ".join(MODEL_METRICS[model]),
                m,
            )
    for key, metric in (
        ("eval.early_stopping.metric", cfg.eval.early_stopping.metric),
        ("checkpoint.best_metric", cfg.checkpoint.best_metric),
    ):
        if metric not in MODEL_METRICS[model]:
            _fail(key, f"a metric of model {model!r}: " + ", ".join(MODEL_METRICS[model]), metric)
    per = cfg.cluster.ranks * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        _fail(
            "train.batch_size",
            f"a multiple of cluster.ranks * train.grad_accum = {per} (it is the global "
            "batch, split evenly over ranks and micro-steps)",
            cfg.train.batch_size,
        )
    decays = cfg.schedule.name in ("warmup_cosine", "linear")
    if cfg.train.steps == 0 and decays and not cfg.schedule.total_steps:
        _fail(
            "schedule.total_steps",
            f"> 0 with train.steps = 0 (a continuous run) and schedule {cfg.schedule.name!r}: "
            "the horizon of its decay (or schedule.name = constant or step)",
            0,
        )
    if cfg.train.steps == 0 and not cfg.checkpoint.every:
        _fail(
            "checkpoint.every",
            "> 0 with train.steps = 0 (a continuous run keeps its work only in checkpoints)",
            0,
        )
    if cfg.schedule.total_steps and cfg.schedule.warmup_steps > cfg.schedule.total_steps:
        _fail(
            "schedule.warmup_steps",
            f"at most schedule.total_steps = {cfg.schedule.total_steps}",
            cfg.schedule.warmup_steps,
        )
    if not cfg.model.name.startswith("file:"):  # a file's builder is checked when built
        _check_builder_kwargs("model", cfg.model.options, _model_builder(model), model)
    if cfg.loss.name:
        _check_loss(cfg.loss)
    return cfg


def _model_builder(name: str):
    """The class `build_model(name, **options)` instantiates, when the model core imports."""
    try:
        from pipelines.model import MODELS
    except ImportError:  # no model core: the kwarg check is left to build time
        return None
    cls = MODELS.get(name)
    return cls.__init__ if cls is not None else None


def _check_builder_kwargs(section: str, options: dict, builder, what: str) -> None:
    if builder is None or not options:
        return
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"
    ]
    for key in options:
        if key not in accepted:
            _unknown_key(f"{section}.{key}", key, accepted + ["name"], f" for {what!r}")


def loss_spec(loss: LossConfig):
    """The pipelines.model loss spec of a [loss] section (None = the model's default)."""
    if not loss.name:
        return None
    if not loss.options:
        return loss.name
    return {loss.name: {"weight": 1.0, **loss.options}}


def _check_loss(loss: LossConfig) -> None:
    try:
        from pipelines.model import loss_names, resolve_loss
    except ImportError:
        return
    names = loss_names()
    if loss.name not in names:
        _fail("loss.name", "a registered loss: " + ", ".join(sorted(names)), loss.name)
    try:
        resolve_loss(loss_spec(loss), "numpy")
    except (TypeError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"loss: {msg}") from None


# ---------------------------------------------------------------------------------------
# Loading, overrides, hashing
# ---------------------------------------------------------------------------------------


def builtin_pipelines() -> dict[str, str]:
    """name -> one-line description of every pipelines/configs/*.toml, sorted by name."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        with open(path, "rb") as f:
            out[path.stem] = tomllib.load(f).get("description", "")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "a.b=VALUE" -> (["a", "b"], value); VALUE is a TOML value, or a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set: expected KEY=VALUE (e.g. optimizer.lr=3e-4), got {text!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {key}: expected a dotted key like train.steps, got {key!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as mode=zero2
    return parts, value


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {'.'.join(parts)}: {dotted} is a value, not a table")
        node = child
    node[parts[-1]] = value


def _locate(source: str | Path | None) -> tuple[Path, str]:
    if source is None:
        source = DEFAULT_PIPELINE
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        return path, path.stem
    builtin = CONFIG_DIR / f"{source}.toml"
    if builtin.is_file():
        return builtin, str(source)
    names = ", ".join(builtin_pipelines())
    raise ConfigError(
        f"config: expected a .toml path or a built-in pipeline ({names}), got {str(source)!r}"
    )


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a pipeline by path or built-in name (None = the default) and apply `--set`s.

    Raises ConfigError (one line) for anything wrong: a missing file, bad TOML, an unknown
    key, a wrong type or an impossible value.
    """
    path, name = _locate(source)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    parsed = [parse_override(text) for text in overrides]
    _keep_data_options_of(raw, parsed)
    for parts, value in parsed:
        _apply_override(raw, parts, value)
    return from_dict(raw, name=name)


def _keep_data_options_of(raw: dict, parsed: list) -> None:
    """`--set data.name=X` over a file naming another dataset keeps only the file's [data]
    keys that X accepts: `mlp_classifier --set data.name=table` drops digits' n_train."""
    new = [v for parts, v in parsed if parts == ["data", "name"]]
    data = raw.get("data")
    if not new or not isinstance(data, dict) or data.get("name") == new[-1]:
        return
    accepted = set(DATASET_OPTIONS.get(new[-1], ())) | {"name", "seed", "cache_dir"}
    for key in [k for k in data if k not in accepted]:
        del data[key]


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def config_hash(cfg: Config) -> str:
    """sha256 hex of the canonical JSON of the whole resolved config, but for where a
    host keeps its keys (cluster.keys): the nodes of one run compare these hashes."""
    d = cfg.to_dict()
    del d["cluster"]["keys"]
    return hashlib.sha256(_canonical(d)).hexdigest()


# What may change between a checkpoint and a resume without changing the numbers' meaning
# (world size and mode reshard; more steps continue; logging and eval do not touch params).
# (hooks stay in: a transform changes the numbers.)
_RESUME_FREE = ("cluster", "checkpoint", "eval", "description", "name")


def resume_fields(cfg: Config) -> dict:
    """The parts of the config a checkpoint must agree on to be resumed exactly (plain
    data: a checkpoint records them, so a mismatch can be named key by key)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("steps", "log_every")}
    d["schedule"] = dict(d["schedule"], total_steps=cfg.total_steps)
    return d


def resume_hash(cfg: Config) -> str:
    """sha256 of resume_fields(cfg)."""
    return hashlib.sha256(_canonical(resume_fields(cfg))).hexdigest()


# ---------------------------------------------------------------------------------------
# Live overrides (`zerotrain set JOB KEY=VALUE`)
# ---------------------------------------------------------------------------------------
# The keys a running job may change. Each is a scalar the steps read afresh (the LR
# function, the clipping threshold, when to evaluate, checkpoint, prune and end); none
# changes a shape, the data order, the optimizer state's meaning or the world, so a run
# replays bit-identically from any snapshot or checkpoint once it replays the overrides.
LIVE_KEYS = (
    "optimizer.lr",
    "schedule.name",
    "schedule.warmup_steps",
    "schedule.total_steps",
    "schedule.min_lr_ratio",
    "schedule.step_size",
    "schedule.gamma",
    "train.clip_norm",
    "train.steps",
    "eval.every",
    "checkpoint.every",
    "checkpoint.keep_last",
)


def check_live_override(cfg: Config, key: str, text: str):
    """The value of `key` = `text` (a TOML value) if `key` may change live and `cfg` with
    it is valid; ConfigError (one line) naming the key and what is accepted otherwise."""
    if key not in LIVE_KEYS:
        raise ConfigError(
            f"{key}: cannot be changed while a job runs; the keys that can: {', '.join(LIVE_KEYS)}"
        )
    _, value = parse_override(f"{key}={text}")
    _with_overrides(cfg, [{"step": 0, "key": key, "value": value}])
    return value


def check_overrides(cfg: Config, overrides: list[dict], where: str) -> None:
    """ConfigError (one line, naming `where` and the record) unless every record names a
    live key and the config stays valid with the records up to each one applied."""
    applied = []
    for i, o in enumerate(overrides, 1):
        if o["key"] not in LIVE_KEYS:
            raise ConfigError(
                f"{where} record {i}: {o['key']} cannot be changed while a job runs; the keys "
                f"that can: {', '.join(LIVE_KEYS)}"
            )
        applied.append(o)
        try:
            _with_overrides(cfg, sorted(applied, key=lambda o: o["step"]))
        except ConfigError as err:
            raise ConfigError(f"{where} record {i}: {err}") from None


def _with_overrides(cfg: Config, overrides: list[dict]) -> Config:
    d = cfg.to_dict()
    for o in overrides:
        section, name = o["key"].split(".")
        d[section][name] = o["value"]
    return from_resolved(d)


class LiveConfig:
    """A run's config as the live overrides leave it after each step.

    `overrides` are records ``{"step": N, "key": K, "value": V}`` in the order they were
    decided (RUN/overrides.jsonl). :meth:`at` ``(s)`` is the config of everything a rank
    decides with ``s`` steps completed -- whether step s + 1 is trained, its LR and
    clipping, the evaluation and checkpoint after it: the base config with every
    override of step <= s applied, by step, then in decision order. Configs are cached
    by how many overrides apply."""

    def __init__(self, base: Config, overrides: list[dict] = ()):
        self.base = base
        self.overrides: list[dict] = []
        self._sorted: list[dict] = []
        self._cache: dict[int, Config] = {}
        self.set(list(overrides))

    def set(self, overrides: list[dict]) -> None:
        if overrides != self.overrides:
            self.overrides = list(overrides)
            self._sorted = sorted(self.overrides, key=lambda o: o["step"])  # stable
            self._cache = {}

    def at(self, step: int) -> Config:
        n = sum(1 for o in self._sorted if o["step"] <= step)
        if n not in self._cache:
            self._cache[n] = _with_overrides(self.base, self._sorted[:n]) if n else self.base
        return self._cache[n]
