"""Estimating the critical batch size from the gradient noise scale.

Research question. Is this run's global batch too small (wasting steps on noise) or too
big (wasting examples on redundant gradients)? McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", show that the critical batch size — where doubling the
batch stops halving the steps — is well predicted by the simple noise scale

    B_simple = tr(Σ) / |G|²

(Σ the per-example gradient covariance, G the true gradient), and that a run at batch B
needs S = S_min (1 + B_simple / B) steps and E = E_min (1 + B / B_simple) examples.

Method. Each rank's own gradient is a batch-B_small estimate and the reduced one a
batch-B_big estimate (B_big = ranks × B_small); the unbiased estimators of |G|² and
tr(Σ) from those two (the paper's Appendix A) are averaged over training steps (an EMA
that decays per step, also across steps not sampled), then divided — exactly
the built-in `noise_scale` analyzer, reused here through `NoiseScale`. Needs >= 2 ranks.
B_simple typically grows as the loss falls: read the trend, not one step.

Metrics (under critical_batch/):
    b_simple          the smoothed noise scale ≈ critical batch size
    global_batch      B_big, the batch this run uses
    step_overhead     S / S_min = 1 + B_simple / B   (> 2: the batch is "too small")
    example_overhead  E / E_min = 1 + B / B_simple   (> 2: the batch is "too large")
    batch_ratio       B / B_simple                   (≈ 1 balances steps and examples)

Run it:  zerotrain simulate --ranks 4 --hook scripts/hooks/critical_batch.py
"""

import math

from pipelines.hooks import analyzer
from pipelines.hooks.builtins import NoiseScale

EVERY = 1  # every step: the EMA needs many samples; each costs two passes over gradients
BETA = 0.95

_noise = NoiseScale(beta=BETA)


@analyzer(every=EVERY)
def critical_batch(ctx):
    if len(ctx.rank_grads) < 2 or ctx.batch_size is None:
        return None  # one rank gives only one batch size: no estimate
    estimate = _noise.update(ctx.rank_grads, ctx.grads, ctx.batch_size, ctx.step)
    b_simple, batch = estimate["b_simple"], ctx.global_batch_size
    if not b_simple > 0:
        return {"b_simple": math.nan, "global_batch": batch}
    return {
        "b_simple": b_simple,
        "global_batch": batch,
        "step_overhead": 1 + b_simple / batch,
        "example_overhead": 1 + batch / b_simple,
        "batch_ratio": batch / b_simple,
    }
