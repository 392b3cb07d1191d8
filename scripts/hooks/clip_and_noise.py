"""A gradient transform: per-layer clipping plus Gaussian noise, reproducibly.

Research question. Does clipping each layer's gradient separately (rather than the
global norm) and adding calibrated Gaussian noise — the two ingredients of DP-SGD,
applied here per rank to the rank's micro-batch gradient — change what the model
learns, and at what cost in loss? Run it against a baseline with the same seed.

This is a *transform*: it runs inside every rank, on the rank's own gradient, before the
reduction, and it changes training. Its randomness comes only from `ctx.rng`, a
Generator derived from (run seed, step, rank, hook name), so two runs with the same
config produce the same parameters bit for bit, and a rank restarted mid-run replays the
same noise.

Knobs: CLIP (max L2 norm per layer), NOISE (std of the noise, relative to CLIP).
Metrics (under clip_and_noise/rank<r>/): clipped (layers clipped this step).

Run it:  zerotrain run --hook scripts/hooks/clip_and_noise.py
"""

import numpy as np

from pipelines.hooks import transform

CLIP = 1.0
NOISE = 0.01


@transform
def clip_and_noise(ctx):
    clipped = 0
    for g in ctx.grads.values():  # views into the rank's flat gradient: edit in place
        norm = float(np.linalg.norm(g))
        if norm > CLIP:
            g *= CLIP / norm
            clipped += 1
        g += ctx.rng.normal(0.0, NOISE * CLIP, size=g.shape).astype(g.dtype)
    return {"clipped": clipped}
