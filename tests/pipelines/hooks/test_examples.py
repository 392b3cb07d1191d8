"""The research scripts in scripts/hooks/ run, on synthetic steps, and find what they
claim to find. (Phase 2 runs them on a short pipeline as well.)"""

from pathlib import Path

import numpy as np
import pytest

from pipelines.hooks import AnalyzerRunner, TransformRunner, load_hooks

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts" / "hooks"
LAYOUT = [("embed.weight", 0, (5, 4)), ("fc.weight", 20, (3, 4)), ("fc.bias", 32, (3,))]


def test_every_example_loads_and_explains_its_research_question():
    paths = sorted(SCRIPTS.glob("*.py"))
    assert len(paths) >= 3
    for path in paths:
        hooks = load_hooks([str(path)])
        assert hooks, path
        module_doc = hooks[0].fn.__globals__["__doc__"]
        assert "Research question." in module_doc, f"{path.name} needs a research question"


def test_dead_layer_flags_a_layer_whose_gradient_stays_zero(step_ctx):
    (hook,) = load_hooks([str(SCRIPTS / "dead_layer.py")])
    runner = AnalyzerRunner([hook], timeout_s=None)
    records = []
    for step in range(30):  # sampled at 0, 10, 20: PATIENCE = 3 samples
        ctx, buffers = step_ctx(step)
        buffers["grads"][20:32] = 0.0  # fc.weight receives nothing
        records += runner.run(ctx)
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[1]["metrics"]["dead_layers"] == 0  # two quiet samples are not enough
    last = records[-1]["metrics"]
    assert last["dead_layers"] == 1 and last["dead/fc.weight"] == 1
    assert last["zero_fraction/fc.weight"] == 1.0 and last["zero_fraction/fc.bias"] == 0.0


def test_critical_batch_recovers_the_noise_scale_of_synthetic_gradients(step_ctx):
    (hook,) = load_hooks([str(SCRIPTS / "critical_batch.py")])
    # step_ctx: each rank's gradient is linspace(-1, 1, 35) + N(0, I) with 8 examples per
    # rank, so tr(Σ) = 8 * 35 and B_simple = 280 / |linspace|².
    truth = 8 * 35 / float(np.sum(np.linspace(-1.0, 1.0, 35) ** 2))
    values = [hook(step_ctx(step, ranks=4, batch_size=8)[0]) for step in range(300)]
    settled = np.mean([v["b_simple"] for v in values[100:]])
    assert settled == pytest.approx(truth, rel=0.15)
    last = values[-1]
    assert last["global_batch"] == 32
    assert last["step_overhead"] == pytest.approx(1 + last["b_simple"] / 32)
    assert last["example_overhead"] == pytest.approx(1 + 32 / last["b_simple"])


def test_rank_agreement_points_at_the_rank_that_disagrees(step_ctx):
    (hook,) = load_hooks([str(SCRIPTS / "rank_agreement.py")])
    ctx, buffers = step_ctx(0, ranks=4, scale=1.0)
    buffers["rank_grads"][2] *= -1.0  # rank 2 climbs the loss instead of descending it
    out = hook(ctx)
    assert out["outlier_rank"] == 2 and out["outlier_gap"] > 0.1
    assert out["rank_mean"]["2"] < 0 < out["cosine"][0][1]
    assert np.asarray(out["cosine"]).shape == (4, 4)
    assert all(0.0 <= v <= 1.0 for v in out["sign_agreement"].values())


def test_clip_and_noise_is_reproducible_and_bounds_each_layer():
    (hook,) = load_hooks([str(SCRIPTS / "clip_and_noise.py")])

    def run(seed):
        grad = np.random.default_rng(0).normal(size=35).astype(np.float32) * 10
        runner = TransformRunner([hook], layout=LAYOUT, seed=seed, rank=1)
        return grad, runner.apply(7, grad)

    (a, records), (b, _), (c, _) = run(5), run(5), run(6)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert records[0]["metrics"] == {"clipped": 3}
    for _, offset, shape in LAYOUT:  # clipped to 1, plus noise of std 0.01 per element
        assert abs(np.linalg.norm(a[offset : offset + int(np.prod(shape))]) - 1.0) < 0.05
