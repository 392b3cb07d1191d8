"""Synthetic steps for hook tests: a small layout, flat buffers, contexts built from them."""

import numpy as np
import pytest

from pipelines.hooks import HookContext

LAYOUT = [("embed.weight", 0, (5, 4)), ("fc.weight", 20, (3, 4)), ("fc.bias", 32, (3,))]
SIZE = 35


def make_step(step=0, ranks=4, batch_size=8, seed=0, loss=1.0, lr=1e-3, scale=1.0):
    """(ctx, buffers): a context of views into fresh flat buffers, and the buffers."""
    rng = np.random.default_rng([seed, step])
    true_grad = np.linspace(-1.0, 1.0, SIZE)  # rank gradients are noisy estimates of it
    rank_grads = [
        (scale * (true_grad + rng.normal(size=SIZE))).astype(np.float32) for _ in range(ranks)
    ]
    grads = np.mean(rank_grads, axis=0).astype(np.float32)
    params = rng.normal(size=SIZE).astype(np.float32)
    update = (-lr * grads).astype(np.float32)
    ctx = HookContext.from_flat(
        step,
        LAYOUT,
        grads,
        loss=loss,
        lr=lr,
        rank_grads=rank_grads,
        params=params,
        update=update,
        batch_size=batch_size,
    )
    return ctx, {"grads": grads, "rank_grads": rank_grads, "params": params, "update": update}


@pytest.fixture
def step_ctx():
    return make_step


def _every_step_average(samples, beta):
    """(g2, trace_sigma, window) at the last sample: the plain per-step EMA, bias-corrected,
    of the series in which each (step, g2, trace) sample holds for the steps since the
    previous one -- what a sample after a gap must fold in as."""
    value = dict.fromkeys(("g2", "trace", "weight"), 0.0)
    last = 0
    for step, g2, trace in samples:
        for _ in range(step - last):
            for key, x in (("g2", g2), ("trace", trace), ("weight", 1.0)):
                value[key] = beta * value[key] + (1 - beta) * x
        last = step
    w = value["weight"]
    return value["g2"] / w, value["trace"] / w, w / (1 - beta)


@pytest.fixture
def every_step_average():
    return _every_step_average
