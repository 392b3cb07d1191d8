"""The noise-scale estimator recovers a known B_simple from synthetic gradients.

Model (McCandlish et al. 2018, Appendix A): per-example gradients are G + e with
Cov(e) = Σ, so a mean over B examples is distributed around G with covariance Σ/B. Each
rank draws its own B_SMALL-example gradient G_i ~ N(G, Σ/B_SMALL) independently; the
reduced gradient is their mean, a B_BIG = RANKS * B_SMALL estimate. The true noise
scale is tr(Σ)/|G|² = TRACE / G2 = 64.
"""

import math

import numpy as np
import pytest

from pipelines.hooks import HookContext
from pipelines.hooks.builtins import NoiseScale, noise_scale_estimates, noise_scale_hook

DIM, RANKS, B_SMALL = 256, 8, 4
B_BIG = RANKS * B_SMALL
G2, TRACE = 1.0, 64.0
LAYOUT = [("w", 0, (16, 12)), ("b", 192, (64,))]


def problem(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=DIM)
    g *= math.sqrt(G2) / np.linalg.norm(g)
    var = rng.uniform(0.5, 1.5, size=DIM)  # an anisotropic, known diagonal Σ
    var *= TRACE / var.sum()
    return rng, g, var


def draw_ranks(rng, g, var, steps):
    """(steps, RANKS, DIM): each rank's B_SMALL-example mean gradient."""
    return g + rng.normal(size=(steps, RANKS, DIM)) * np.sqrt(var / B_SMALL)


def test_the_per_step_estimators_of_g2_and_trace_are_unbiased():
    rng, g, var = problem(1)
    ranks = draw_ranks(rng, g, var, steps=4000)
    small_sq = (ranks**2).sum(axis=2).mean(axis=1)
    big_sq = (ranks.mean(axis=1) ** 2).sum(axis=1)
    g2, trace = noise_scale_estimates(small_sq, big_sq, B_SMALL, B_BIG)
    # Tolerance: 4 standard errors of the mean of 4000 independent estimates (the
    # chance that an unbiased estimator misses is ~6e-5; the seed is fixed anyway).
    for estimate, truth in ((g2, G2), (trace, TRACE)):
        standard_error = estimate.std(ddof=1) / math.sqrt(estimate.size)
        assert abs(estimate.mean() - truth) < 4 * standard_error


def test_the_noise_scale_hook_recovers_b_simple_from_flat_buffers_within_ten_percent():
    rng, g, var = problem(2)
    hook = noise_scale_hook(beta=0.99)
    ranks = draw_ranks(rng, g, var, steps=2000).astype(np.float32)
    for step, rank_grads in enumerate(ranks):
        ctx = HookContext.from_flat(
            step,
            LAYOUT,
            rank_grads.mean(axis=0),
            rank_grads=list(rank_grads),
            batch_size=B_SMALL,
        )
        out = hook(ctx)
    # Tolerance: over 20 other seeds the final EMA (beta 0.99, ~200 effective samples)
    # had a relative standard deviation of 1.5% around the truth; 10% is six of those.
    assert out["b_simple"] == pytest.approx(TRACE / G2, rel=0.10)
    assert out["g2"] == pytest.approx(G2, rel=0.10)
    assert out["trace_sigma"] == pytest.approx(TRACE, rel=0.10)
    assert (out["b_small"], out["b_big"]) == (B_SMALL, B_BIG)


def test_a_non_finite_step_is_reported_as_nan_and_leaves_the_averages_alone():
    noise = NoiseScale(beta=0.9)
    good = {r: {"w": np.array([1.0 + r, 2.0])} for r in range(2)}
    first = noise.update(good, {"w": np.array([1.5, 2.0])}, b_small=2, step=1)
    bad = {r: {"w": np.array([np.nan, 2.0])} for r in range(2)}
    second = noise.update(bad, {"w": np.array([np.nan, 2.0])}, b_small=2, step=2)
    assert math.isnan(second["g2_step"]) and math.isnan(second["b_simple_step"])
    for key in ("b_simple", "g2", "trace_sigma", "window_steps"):  # (b_simple alone, a
        assert second[key] == first[key], key  # ratio, hid a decayed weight)
    # and the next good step continues as if the bad one had never been sampled
    clean = NoiseScale(beta=0.9)
    clean.update(good, {"w": np.array([1.5, 2.0])}, b_small=2, step=1)
    later = {r: {"w": np.array([0.5 + r, 1.0])} for r in range(2)}
    want = clean.update(later, {"w": np.array([1.0, 1.0])}, b_small=2, step=3)
    assert noise.update(later, {"w": np.array([1.0, 1.0])}, b_small=2, step=3) == want


def test_a_sample_after_a_gap_decays_the_averages_as_the_steps_in_between_would(
    every_step_average,
):
    rng, g, var = problem(3)
    noise = NoiseScale(beta=0.9)
    seen = []
    for step in (3, 4, 9, 10, 30, 31, 45):  # an analyzer that skips steps
        ranks = draw_ranks(rng, g, var, steps=1)[0]
        out = noise.update(dict(enumerate({"w": r} for r in ranks)), {"w": ranks.mean(0)},
                           b_small=B_SMALL, step=step)  # fmt: skip
        seen.append((step, out["g2_step"], out["trace_sigma_step"]))
        g2, trace, window = every_step_average(seen, 0.9)
        assert out["gap"] == step - (seen[-2][0] if len(seen) > 1 else 0)
        assert out["g2"] == pytest.approx(g2, rel=1e-12)
        assert out["trace_sigma"] == pytest.approx(trace, rel=1e-12)
        assert out["window_steps"] == pytest.approx(window, rel=1e-12)
        assert out["window_steps"] == pytest.approx((1 - 0.9**step) / (1 - 0.9), rel=1e-12)
        small = np.mean([(r**2).sum() for r in ranks])
        assert out["small_sq_step"] == pytest.approx(small, rel=1e-12)
        assert out["big_sq_step"] == pytest.approx((ranks.mean(0) ** 2).sum(), rel=1e-12)


def test_the_noise_scale_needs_the_per_rank_batch_size():
    ctx = HookContext(
        step=0, grads={"w": np.ones(2)}, rank_grads={0: {"w": np.ones(2)}, 1: {"w": np.ones(2)}}
    )
    with pytest.raises(ValueError, match="needs ctx.batch_size"):
        noise_scale_hook()(ctx)


def test_a_restarted_series_counts_from_its_start_not_from_step_zero(every_step_average):
    """A fresh NoiseScale told that its series starts at step 40 (its hook restarted)
    gives its first sample, at 41, the weight of one step (window_steps 1), and then
    the every-step average of its own samples counted from 40."""
    rng, g, var = problem(4)
    noise = NoiseScale(beta=0.9)
    seen = []
    for step in (41, 42, 45):
        ranks = draw_ranks(rng, g, var, steps=1)[0]
        out = noise.update(dict(enumerate({"w": r} for r in ranks)), {"w": ranks.mean(0)},
                           b_small=B_SMALL, step=step, start=40)  # fmt: skip
        seen.append((step - 40, out["g2_step"], out["trace_sigma_step"]))
        g2, trace, window = every_step_average(seen, 0.9)
        assert out["g2"] == pytest.approx(g2, rel=1e-12)
        assert out["trace_sigma"] == pytest.approx(trace, rel=1e-12)
        assert out["window_steps"] == pytest.approx(window, rel=1e-12)
    assert [s for s, _, _ in seen] == [1, 2, 5] and window < 5


def test_b_simple_is_nan_while_the_averaged_g2_is_not_positive():
    # two ranks' gradients cancel: the reduced gradient is 0, the |G|^2 estimate < 0
    noise = NoiseScale(beta=0.9)
    ranks = {0: {"w": np.array([1.0, 2.0])}, 1: {"w": np.array([-1.0, -2.0])}}
    out = noise.update(ranks, {"w": np.zeros(2)}, b_small=2, step=1)
    assert out["g2"] < 0 < out["trace_sigma"]
    assert math.isnan(out["b_simple"]) and math.isnan(noise.b_simple)


def test_a_sample_of_an_earlier_step_does_not_move_the_series_back():
    """The gap of a sample is counted from the latest step folded in, whatever came
    in between (a sample of an earlier step, e.g. a replay after a recovery)."""
    noise = NoiseScale(beta=0.9)
    ranks = {r: {"w": np.array([1.0 + r, 2.0])} for r in range(2)}
    mean = {"w": np.array([1.5, 2.0])}
    gaps = [noise.update(ranks, mean, b_small=2, step=s)["gap"] for s in (10, 8, 11)]
    assert gaps == [10, 1, 1]
