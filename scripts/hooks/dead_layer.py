"""Spotting a dead layer: which layers have stopped receiving gradient?

Research question. A layer can stop learning while the loss still falls: ReLU units
that never fire again after a large step, a norm gain driven to zero, a branch cut off
by a bug (a detached path, a mask that is all zeros). Its gradient is then (nearly) zero
every step, and the layers around it hide the loss of capacity. When does it happen,
and to which layer?

Method. Every EVERY steps, for each parameter: the fraction of exactly-zero gradient
entries, and the layer's mean |g| relative to the median layer's. A layer whose
relative mean |g| stays below RATIO for PATIENCE samples in a row is flagged dead.
Relative, because absolute gradient sizes drift by orders of magnitude during training;
in a row, because one quiet step is noise.

Metrics (hooks.jsonl, TensorBoard under dead_layer/):
    dead_layers              number of layers flagged now
    dead/<name>              1 for each flagged layer
    zero_fraction/<name>     fraction of exact zeros in the layer's gradient
    relative_flow/<name>     mean |g| / median over layers of mean |g|

Run it:  zerotrain run --hook scripts/hooks/dead_layer.py
Copy it and change RATIO / PATIENCE, or flag on zero_fraction instead (dead ReLUs show
up as rows of exact zeros in the next layer's weight gradient).

State (the streak counters) lives in this module: an analyzer process restart starts
the counting afresh.
"""

import numpy as np

from pipelines.hooks import analyzer
from pipelines.hooks.builtins import grad_flow

EVERY = 10
RATIO = 1e-3
PATIENCE = 3

_streak: dict[str, int] = {}


@analyzer(every=EVERY)
def dead_layer(ctx):
    flow = grad_flow(ctx.grads)  # {name: mean |g|}, layer order
    values = np.array(list(flow.values()))
    median = float(np.nanmedian(values)) if values.size else 0.0
    metrics = {"zero_fraction": {}, "relative_flow": {}, "dead": {}}
    for name, g in ctx.grads.items():
        relative = flow[name] / median if median > 0 else float("nan")
        metrics["zero_fraction"][name] = float(np.count_nonzero(g == 0) / max(g.size, 1))
        metrics["relative_flow"][name] = relative
        quiet = not relative >= RATIO  # nan (all layers silent) counts as quiet
        _streak[name] = _streak.get(name, 0) + 1 if quiet else 0
        if _streak[name] >= PATIENCE:
            metrics["dead"][name] = 1
    metrics["dead_layers"] = len(metrics["dead"])
    return metrics
