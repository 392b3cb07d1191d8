"""What every runner shares: the model a config names, a rank's micro-batches of a step,
the per-step dropout seed, the hook specs loaded, the skip limit, and TrainingFailed.

The single-process runner (pipelines.local) and the rank processes of the cluster
(pipelines.cluster) both build on these, so the two train the same numbers.
"""

from __future__ import annotations

import numpy as np

from .config import Config
from .data import batch_for, position

__all__ = [
    "DROPOUT_STREAM",
    "MAX_CONSECUTIVE_SKIPS",
    "TrainingFailed",
    "build_model_for",
    "load_hooks",
    "rank_batches",
    "step_seed",
]

# The purpose number of the dropout RNG stream: SeedSequence([seed, DROPOUT_STREAM, ...]).
DROPOUT_STREAM = 0xD80
# Skipping a non-finite step is recovery; skipping this many in a row is a diverged run.
MAX_CONSECUTIVE_SKIPS = 20


class TrainingFailed(RuntimeError):
    """The run could not complete (exit code 3); the message says why in one line."""


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
    return [
        batch_for(
            dataset,
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
