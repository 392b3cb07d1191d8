"""Comparing ranks' gradient agreement: do the ranks see the same problem?

Research question. In data-parallel training every rank computes a gradient on its own
micro-batch, and the reduction averages them. How much do they agree? Agreement near 1
means per-rank batches already carry the signal (a larger global batch buys little);
agreement near 0 means the average is mostly noise cancelling out. And a rank that
disagrees with all the others, step after step, points at a fault — a data shard that
is corrupt or mislabelled, a stale or straggling rank, a bad node.

Method. Every EVERY steps, on the ranks' own gradients before reduction:
  - cosine similarity of every pair of ranks' whole gradients (the built-in
    `rank_cosine`), its mean over pairs;
  - each rank's mean similarity to the others; the least agreeing rank and its gap
    to the rest (a persistent large gap is the fault signal);
  - per layer, the fraction of coordinates on which every rank's gradient has the same
    sign (random signs would give 2^(1-ranks)), which shows *where* ranks disagree.

Metrics (under rank_agreement/):
    cosine            ranks × ranks matrix
    mean_cosine       mean over pairs
    rank_mean/<r>     rank r's mean cosine to the others
    outlier_rank      the rank with the lowest rank_mean
    outlier_gap       mean of the others' rank_mean minus the outlier's
    sign_agreement/<name>

Run it:  zerotrain simulate --ranks 4 --hook scripts/hooks/rank_agreement.py
"""

import numpy as np

from pipelines.hooks import analyzer
from pipelines.hooks.builtins import rank_cosine

EVERY = 5


@analyzer(every=EVERY)
def rank_agreement(ctx):
    ranks = sorted(ctx.rank_grads)
    if len(ranks) < 2:
        return None
    cosine, mean = rank_cosine(ctx.rank_grads)
    k = len(ranks)
    off = np.where(np.eye(k, dtype=bool), np.nan, cosine)
    rank_mean = np.nanmean(off, axis=1)
    outlier = int(np.nanargmin(rank_mean)) if np.isfinite(rank_mean).any() else 0
    others = np.delete(rank_mean, outlier)
    signs = {}
    for name in ctx.names:
        s = np.stack([np.sign(ctx.rank_grads[r][name]).ravel() for r in ranks])
        signs[name] = float(np.mean(np.all(s == s[0], axis=0)))
    return {
        "cosine": cosine,
        "mean_cosine": mean,
        "rank_mean": {str(r): float(m) for r, m in zip(ranks, rank_mean, strict=True)},
        "outlier_rank": ranks[outlier],
        "outlier_gap": float(np.nanmean(others) - rank_mean[outlier]),
        "sign_agreement": signs,
    }
