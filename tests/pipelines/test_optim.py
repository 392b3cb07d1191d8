"""The shard optimizer and the LR schedules."""

import math

import numpy as np
import pytest

from pipelines.config import OptimizerConfig, ScheduleConfig
from pipelines.optim import ShardOptimizer, lr_at


def sched(name, **kw):
    return ScheduleConfig(name=name, **kw)


def test_constant_schedule_with_warmup_ramps_linearly_then_holds():
    s = sched("constant", warmup_steps=4)
    assert [lr_at(s, 1.0, k, 100) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_cosine_starts_at_the_peak_and_ends_at_the_floor():
    s = sched("warmup_cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(s, 2.0, 9, 110) == 2.0
    assert lr_at(s, 2.0, 10, 110) == pytest.approx(2.0)
    assert lr_at(s, 2.0, 60, 110) == pytest.approx(0.2 + 1.8 * 0.5)
    assert lr_at(s, 2.0, 110, 110) == pytest.approx(0.2)
    assert lr_at(s, 2.0, 500, 110) == pytest.approx(0.2)  # clamped past the end
    lrs = [lr_at(s, 2.0, k, 110) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_step_decay_multiplies_by_gamma_every_step_size():
    s = sched("step", step_size=10, gamma=0.5)
    assert [lr_at(s, 1.0, k, 100) for k in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_linear_decay_reaches_the_floor_at_total_steps():
    s = sched("linear", min_lr_ratio=0.0)
    assert lr_at(s, 1.0, 0, 10) == 1.0
    assert lr_at(s, 1.0, 5, 10) == pytest.approx(0.5)
    assert lr_at(s, 1.0, 10, 10) == 0.0


def test_a_schedule_is_a_pure_function_of_the_step():
    s = sched("warmup_cosine", warmup_steps=3)
    backwards = {k: lr_at(s, 0.1, k, 50) for k in reversed(range(50))}  # any order, no state
    assert [backwards[k] for k in range(50)] == [lr_at(s, 0.1, k, 50) for k in range(50)]
    assert len(set(backwards.values())) > 40  # and it does vary with the step


def _grads(n, seed=0):
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_non_finite_gradient_skips_the_step_and_is_counted(name):
    opt = ShardOptimizer(OptimizerConfig(name=name, momentum=0.9 if name == "sgd" else 0.0), 8)
    p = np.ones(8, np.float32)
    g = _grads(8)
    assert opt.update(p, g.copy(), lr=0.1, total_sq_norm=float(g @ g)).applied
    before_p, before_state = p.copy(), {k: v.copy() for k, v in opt.state.items()}
    bad = g.copy()
    bad[3] = np.nan
    for sq in (float("nan"), float("inf")):
        r = opt.update(p, bad, lr=0.1, total_sq_norm=sq)
        assert not r.applied and not math.isfinite(r.grad_norm)
    assert opt.skipped == 2 and opt.steps_applied == 1
    np.testing.assert_array_equal(p, before_p)
    for k, v in opt.state.items():
        np.testing.assert_array_equal(v, before_state[k])


def test_clipping_scales_the_gradient_to_the_global_norm():
    opt = ShardOptimizer(OptimizerConfig(name="sgd", lr=1.0), 4)
    p = np.zeros(4, np.float32)
    g = np.array([3, 4, 0, 0], np.float32)
    # this shard holds part of a gradient whose global norm is 10 (sq 100): clip to 1
    r = opt.update(p, g, lr=1.0, total_sq_norm=100.0, clip_norm=1.0)
    assert r.grad_norm == 10.0 and r.clip_coef == pytest.approx(0.1)
    np.testing.assert_allclose(p, [-0.3, -0.4, 0, 0], rtol=1e-5)


def test_state_bytes_count_what_the_shard_owns():
    assert ShardOptimizer(OptimizerConfig(name="adamw"), 100).state_bytes == 800
    assert ShardOptimizer(OptimizerConfig(name="adam", amsgrad=True), 100).state_bytes == 1200
    assert ShardOptimizer(OptimizerConfig(name="sgd"), 100).state_bytes == 0
    assert ShardOptimizer(OptimizerConfig(name="sgd", momentum=0.9), 100).state_bytes == 400


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_few_steps_match_torch_optim(name):
    torch = pytest.importorskip("torch")
    cfg = OptimizerConfig(
        name=name, lr=0.01, weight_decay=0.1, momentum=0.9 if name == "sgd" else 0.0
    )
    n = 37
    p = _grads(n, 1)
    tp = torch.nn.Parameter(torch.tensor(p.copy()))
    if name == "sgd":
        topt = torch.optim.SGD([tp], lr=0.01, momentum=0.9, weight_decay=0.1)
    else:
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        topt = cls([tp], lr=0.01, weight_decay=0.1)
    opt = ShardOptimizer(cfg, n)
    for k in range(5):
        g = _grads(n, 10 + k)
        tp.grad = torch.tensor(g.copy())
        topt.step()
        opt.update(p, g, lr=0.01, total_sq_norm=float(g @ g))
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
