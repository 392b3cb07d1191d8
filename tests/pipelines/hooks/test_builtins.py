"""Each built-in analysis against the same quantity computed with torch (or by hand)."""

import math

import numpy as np
import pytest
import torch

from pipelines.hooks import AnalyzerRunner, HookContext
from pipelines.hooks.builtins import (
    DEFAULT_LOG10_EDGES,
    builtin_hooks,
    grad_distribution,
    grad_flow,
    grad_health,
    grad_norms,
    noise_scale_estimates,
    rank_cosine,
    update_ratios,
)


def layers(seed=0, big=70_000):
    """Three float32 layers, one bigger than the float64 accumulation chunk."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.normal(size=(big,)).astype(np.float32).reshape(-1, 7),
        "fc.weight": (1e-3 * rng.normal(size=(6, 5))).astype(np.float32),
        "fc.bias": rng.normal(size=(6,)).astype(np.float32),
    }


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def cat(grads):
    return torch.cat([t(g).flatten() for g in grads.values()])


def test_global_and_per_layer_norms_match_torch():
    grads = layers()
    total, per_layer = grad_norms(grads)
    assert total == pytest.approx(torch.linalg.vector_norm(cat(grads)).item(), rel=1e-12)
    for name, g in grads.items():
        assert per_layer[name] == pytest.approx(torch.linalg.vector_norm(t(g)).item(), rel=1e-12)
    assert list(per_layer) == list(grads)


def test_distribution_statistics_and_histogram_match_torch():
    grads = layers()
    grads["fc.weight"][0, :3] = 0.0  # some exact zeros
    grads["fc.bias"][1] = np.nan  # and one non-finite element
    out = grad_distribution(grads)

    finite = cat(grads)[torch.isfinite(cat(grads))]
    assert out["mean"] == pytest.approx(finite.mean().item(), rel=1e-9, abs=1e-12)
    assert out["std"] == pytest.approx(finite.std(correction=0).item(), rel=1e-9)
    assert out["min"] == finite.min().item() and out["max"] == finite.max().item()
    assert out["sparsity"] == 3 / cat(grads).numel()
    assert out["nonfinite"] == 1

    logs = torch.log10(finite[finite != 0].abs()).clamp(-10.0, 2.0)
    edges = DEFAULT_LOG10_EDGES
    expected = torch.histc(logs, bins=edges.size - 1, min=edges[0], max=edges[-1])
    assert out["hist"].edges.tolist() == edges.tolist()
    assert out["hist"].counts.tolist() == expected.long().tolist()
    assert out["hist"].counts.sum() == finite.numel() - 3


def test_histogram_bins_are_fixed_and_out_of_range_values_land_in_the_end_bins():
    out = grad_distribution({"w": np.array([1e-30, 1e-5, 1e5, -3.0])}, edges=[-6.0, -2.0, 2.0])
    assert out["hist"].counts.tolist() == [2, 2]


def test_gradient_flow_is_mean_absolute_gradient_in_layer_order():
    grads = layers()
    flow = grad_flow(grads)
    assert list(flow) == list(grads)
    for name, g in grads.items():
        assert flow[name] == pytest.approx(t(g).abs().mean().item(), rel=1e-12)


def test_health_flags_vanishing_exploding_and_non_finite_layers():
    grads = {
        "ok": np.ones(4, np.float32),
        "tiny": np.full(4, 1e-9, np.float32),
        "huge": np.full(4, 1e4, np.float32),
        "broken": np.array([1.0, np.nan, np.inf, 0.0], np.float32),
    }
    out = grad_health(grads, vanishing=1e-6, exploding=1e3)
    assert (out["vanishing"], out["exploding"], out["nonfinite"]) == (1, 1, 2)
    assert out["vanishing/tiny"] == 1 and out["exploding/huge"] == 1
    assert out["nonfinite/broken"] == 2
    assert out["healthy"] == 0 and math.isnan(out["global_norm"])
    calm = grad_health({"ok": grads["ok"], "tiny": grads["tiny"]}, vanishing=1e-12)
    assert calm["healthy"] == 1 and calm["global_norm"] == pytest.approx(2.0)


def test_update_to_weight_ratio_matches_torch_and_is_nan_for_zero_weights():
    params = layers(1)
    update = {k: (1e-3 * v).astype(np.float32) for k, v in layers(2).items()}
    params["fc.bias"][:] = 0.0
    ratios = update_ratios(update, params)
    for name in ("embed.weight", "fc.weight"):
        ref = torch.linalg.vector_norm(t(update[name])) / torch.linalg.vector_norm(t(params[name]))
        assert ratios[name] == pytest.approx(ref.item(), rel=1e-12)
    assert math.isnan(ratios["fc.bias"])


def test_rank_cosine_matches_torch_pairwise_on_whole_gradients():
    ranks = {r: layers(10 + r, big=700) for r in range(3)}
    ranks[2] = {k: -v for k, v in ranks[0].items()}  # rank 2 is rank 0 reversed
    matrix, mean = rank_cosine(ranks)
    flat = [cat(ranks[r]) for r in range(3)]
    for i in range(3):
        for j in range(3):
            ref = torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0).item()
            assert matrix[i, j] == pytest.approx(ref, abs=1e-12)
    assert matrix[0, 2] == pytest.approx(-1.0)
    assert mean == pytest.approx((matrix[0, 1] + matrix[0, 2] + matrix[1, 2]) / 3)


def test_noise_scale_estimators_are_exact_on_their_expectations():
    g2, trace, b_small, b_big = 2.0, 50.0, 4, 16
    small_sq, big_sq = g2 + trace / b_small, g2 + trace / b_big  # E|G_B|^2 = |G|^2 + tr/B
    assert noise_scale_estimates(small_sq, big_sq, b_small, b_big) == pytest.approx((g2, trace))
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        noise_scale_estimates(1.0, 1.0, 4, 4)


def test_every_builtin_hook_returns_valid_metrics_on_a_step(step_ctx):
    runner = AnalyzerRunner(builtin_hooks(), timeout_s=None)
    records = runner.run(step_ctx(0, ranks=4)[0])
    assert [r["hook"] for r in records] == [
        "grad_norm",
        "grad_distribution",
        "grad_flow",
        "grad_health",
        "update_ratio",
        "rank_cosine",
        "noise_scale",
    ]
    assert not [r for r in records if "error" in r]
    by_hook = {r["hook"]: r["metrics"] for r in records}
    assert set(by_hook["grad_flow"]) == {"flow/embed.weight", "flow/fc.weight", "flow/fc.bias"}
    assert len(by_hook["rank_cosine"]["matrix"]) == 4
    assert by_hook["noise_scale"]["b_big"] == 32


def test_builtin_hooks_report_an_infinite_norm_as_nan_not_an_error():
    ctx = HookContext(step=0, grads={"w": np.array([1.0, np.inf], np.float32)})
    (record,) = AnalyzerRunner(builtin_hooks()[:1], timeout_s=None).run(ctx)
    assert record["metrics"]["global"] is None  # nan, written as null


def test_rank_hooks_are_silent_with_one_rank(step_ctx):
    runner = AnalyzerRunner(builtin_hooks(), timeout_s=None)
    hooks = {r["hook"] for r in runner.run(step_ctx(0, ranks=1)[0])}
    assert "rank_cosine" not in hooks and "noise_scale" not in hooks
