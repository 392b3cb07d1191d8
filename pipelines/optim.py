"""The optimizer over one flat shard, and LR schedules as pure functions of the step.

A `ShardOptimizer` owns the optimizer state (SGD momentum, or Adam m, v and the AMSGrad
max) for ONE contiguous slice of the flat parameter vector — the whole vector in ddp,
this rank's shard in zero1/zero2 — and applies one step of the cykernels optimizer to the
matching slices of parameters and summed gradient:

    opt = ShardOptimizer(cfg.optimizer, size=hi - lo)
    result = opt.update(params[lo:hi], grad_shard, lr=lr_at(cfg.schedule, base_lr, s, T),
                        total_sq_norm=reduced, clip_norm=cfg.train.clip_norm)

`total_sq_norm` is the squared norm of the WHOLE gradient (the sum of every shard's
`sq_norm`, reduced by the caller), so clipping is global-norm clipping whatever the
sharding. A non-finite norm means some rank saw a NaN or Inf: every rank gets the same
reduced number, so every rank skips the step together (`result.applied` is False, the
`skipped` counter grows, parameters and state are untouched, the Adam step count does not
advance — GradScaler's rule).

Kernels come from cykernels.optim / cykernels.gradutil; until a compiled module is
present the numpy twin stands in (`KERNEL_BACKEND` says which ran).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KERNEL_BACKEND", "ShardOptimizer", "StepResult", "lr_at", "gradutil"]


def _load(name: str):
    try:
        return importlib.import_module(f"cykernels.{name}"), "cython"
    except ImportError:
        return importlib.import_module(f"cykernels.{name}_ref"), "numpy"


_optim, _optim_backend = _load("optim")
gradutil, _gradutil_backend = _load("gradutil")
KERNEL_BACKEND = {"optim": _optim_backend, "gradutil": _gradutil_backend}


# ---------------------------------------------------------------------------------------
# LR schedules
# ---------------------------------------------------------------------------------------


def lr_at(schedule, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate for 0-based optimizer step `step`.

    Linear warmup over `schedule.warmup_steps` (lr * (step + 1) / warmup) for every
    schedule; afterwards, with p = (step - warmup) / (total - warmup) clamped to [0, 1]
    and floor = base_lr * min_lr_ratio:
        constant        base_lr
        warmup_cosine   floor + (base_lr - floor) * (1 + cos(pi p)) / 2
        linear          base_lr - (base_lr - floor) * p
        step            base_lr * gamma ** ((step - warmup) // step_size)
    Pure: the same arguments give the same float, so a resumed run continues exactly.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    floor = base_lr * schedule.min_lr_ratio
    span = max(total_steps - warmup, 1)
    p = min(max((step - warmup) / span, 0.0), 1.0)
    name = schedule.name
    if name == "constant":
        return base_lr
    if name == "warmup_cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "linear":
        return base_lr - (base_lr - floor) * p
    if name == "step":
        return base_lr * schedule.gamma ** ((step - warmup) // schedule.step_size)
    raise ValueError(
        f"schedule.name: expected constant, warmup_cosine, linear or step, got {name!r}"
    )


# ---------------------------------------------------------------------------------------
# The shard optimizer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False: non-finite gradient norm, nothing changed
    grad_norm: float  # global L2 norm before clipping (nan/inf when skipped)
    clip_coef: float  # the factor the gradient was scaled by (1.0 = not clipped)


# state key -> (which optimizers own it). Names are torch's state names.
_STATE_KEYS = {
    "sgd": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


class ShardOptimizer:
    """SGD / Adam / AdamW state and update for one flat float32 slice of `size` elements.

    Not an actor: it is state plus a function, owned by whoever owns the shard (the
    Optimizer role actor in a rank, or the local runner).
    """

    def __init__(self, opt_cfg, size: int):
        self.cfg = opt_cfg
        self.size = int(size)
        self.steps_applied = 0  # torch's state["step"]: 1-based at the next update
        self.skipped = 0
        keys = list(_STATE_KEYS[opt_cfg.name])
        if opt_cfg.name == "sgd" and opt_cfg.momentum == 0:
            keys = []
        if opt_cfg.name in ("adam", "adamw") and opt_cfg.amsgrad:
            keys.append("max_exp_avg_sq")
        self.state = {k: np.zeros(self.size, dtype=np.float32) for k in keys}

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state this shard holds (what ZeRO divides by world)."""
        return sum(a.nbytes for a in self.state.values())

    def update(
        self,
        param: np.ndarray,
        grad: np.ndarray,
        *,
        lr: float,
        total_sq_norm: float,
        clip_norm: float = 0.0,
    ) -> StepResult:
        """Clip `grad` in place by the global norm, then step `param` in place.

        `param` and `grad` are this shard's float32 slices (len == size); `grad` is the
        summed-and-averaged gradient of the global batch for this shard.
        """
        assert param.shape == (self.size,), f"param: expected ({self.size},), got {param.shape}"
        assert grad.shape == (self.size,), f"grad: expected ({self.size},), got {grad.shape}"
        norm = math.sqrt(total_sq_norm) if total_sq_norm >= 0 else float("nan")
        if not math.isfinite(norm):
            self.skipped += 1
            return StepResult(False, norm, 1.0)
        coef = 1.0
        if clip_norm > 0:
            gradutil.clip_by_global_norm(grad, clip_norm, norm)
            coef = min(1.0, clip_norm / (norm + 1e-6))
        self.steps_applied += 1
        c = self.cfg
        if c.name == "sgd":
            _optim.sgd_step(
                param,
                grad,
                self.state.get("momentum_buffer"),
                lr,
                c.momentum,
                c.dampening,
                c.nesterov,
                c.weight_decay,
                self.steps_applied == 1,
            )
        else:
            _optim.adam_step(
                param,
                grad,
                self.state["exp_avg"],
                self.state["exp_avg_sq"],
                self.state.get("max_exp_avg_sq"),
                self.steps_applied,
                lr,
                c.betas[0],
                c.betas[1],
                c.eps,
                c.weight_decay,
                c.name == "adamw",
                c.amsgrad,
            )
        return StepResult(True, norm, coef)

    # -- checkpoint support ------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.state)

    def counters(self) -> dict[str, int]:
        return {"steps_applied": self.steps_applied, "skipped": self.skipped}

    def load(self, state: dict[str, np.ndarray], counters: dict[str, int]) -> None:
        """Replace the state (arrays are copied in; missing keys stay zero)."""
        for key, buf in self.state.items():
            if key in state:
                src = np.asarray(state[key], dtype=np.float32).reshape(-1)
                assert src.shape == buf.shape, f"{key}: expected {buf.shape}, got {src.shape}"
                buf[...] = src
            else:
                buf.fill(0.0)
        self.steps_applied = int(counters.get("steps_applied", 0))
        self.skipped = int(counters.get("skipped", 0))
