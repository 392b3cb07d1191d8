"""scripts/bench_noise_scale.py checks the noise_scale hook against brute force; these
tests check that the two sides of that comparison are the same thing.

- The same average: fed the same per-step (|G|², tr Σ), the benchmark's `smoothed` and
  the hook's NoiseScale give the same B_simple at every step, gaps included; a hook
  that missed steps is compared over its own steps, and one whose averages restarted
  is refused.
- The same gradients: the squared norms a real two-rank run's hook records for a step
  are those of the gradients the PyTorch twin computes on that step's rank batches at
  the parameters of the checkpoint before it (the benchmark's `batch_norms`).
"""

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from pipelines.hooks.builtins import NoiseScale
from tests.pipelines.cli_util import zerotrain

BENCH = Path(__file__).resolve().parents[3] / "scripts" / "bench_noise_scale.py"


@pytest.fixture(scope="module")
def bench() -> dict:
    """The benchmark script's functions (it is a script, not a module of a package)."""
    return runpy.run_path(str(BENCH))


def two_ranks_with(g2: float, trace: float) -> dict:
    """Rank gradients a + d and a - d (a ⟂ d, one example per rank) whose estimates are
    exactly (g2, trace): |G_big|² = |a|², |G_small|² = |a|² + |d|², so
    |G|² = |a|² - |d|² and tr Σ = 2 |d|²."""
    d2 = trace / 2
    a = np.array([math.sqrt(g2 + d2), 0.0])
    d = np.array([0.0, math.sqrt(d2)])
    return {0: {"w": a + d}, 1: {"w": a - d}}


def test_the_benchmark_averages_exact_values_as_the_hook_averages_its_estimates(bench):
    rng = np.random.default_rng(5)
    steps = [1, 2, 3, 5, 6, 10, 11, 12, 30, 31]  # consecutive runs and gaps
    # |G|² swinging over two decades between steps, as it does under Adam
    series = {s: (float(10 ** rng.uniform(-2, 0)), float(rng.uniform(5, 50))) for s in steps}
    for beta in (0.9, 0.99):
        want = bench["smoothed"](series, beta)
        for step, out in hook_run(series, steps, beta).items():
            assert (out["g2_step"], out["trace_sigma_step"]) == pytest.approx(series[step])
            assert out["b_simple"] == pytest.approx(want[step], rel=1e-12), (beta, step)


def hook_run(series: dict, steps, beta: float) -> dict:
    """step -> the metrics NoiseScale reports when it sees exactly `series` at `steps`."""
    noise = NoiseScale(beta)
    out = {}
    for step in steps:
        ranks = two_ranks_with(*series[step])
        grads = {"w": (ranks[0]["w"] + ranks[1]["w"]) / 2}
        out[step] = noise.update(ranks, grads, b_small=1, step=step)
    return out


def test_a_hook_that_missed_steps_is_compared_with_the_brute_force_over_its_own_steps(bench):
    rng = np.random.default_rng(6)
    series = {s: (float(10 ** rng.uniform(-2, 0)), float(rng.uniform(5, 50))) for s in range(1, 61)}
    seen = [s for s in series if s % 10 == 0 or s % 3 == 1]  # every checkpoint, and gaps
    result = bench["compare"]("synthetic", hook_run(series, seen, 0.9), series, 0.9, 10)
    assert result["steps_seen"] == len(seen)
    assert [r["step"] for r in result["checkpoints"]] == list(range(10, 61, 10))
    for row in result["checkpoints"]:  # exact per-step values: nothing left to differ
        assert abs(row["rel_diff"]) < 1e-12 and row["noise_sd"] < 1e-12, row


def test_a_hook_series_whose_averages_restarted_is_refused(bench, tmp_path):
    series = {s: (1.0, 10.0) for s in range(1, 6)}
    run = hook_run(series, [1, 2, 4], 0.9)  # steps 1, 2, 4: a gap is fine
    run[5] = hook_run(series, [5], 0.9)[5]  # a fresh NoiseScale: gap 5 after step 4
    lines = [{"step": s, "hook": "noise_scale_0_9", "metrics": m} for s, m in run.items()]
    (tmp_path / "hooks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(SystemExit, match="restarted its averages at step 5"):
        bench["hook_records"](tmp_path, "noise_scale_0_9")
    (tmp_path / "hooks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    assert sorted(bench["hook_records"](tmp_path, "noise_scale_0_9")) == [1, 2, 4]
    # a restarted analyzer's series says so, even where its gap looks continuous
    lines[2]["restarted_at"] = 4  # step 4, gap 2 after step 2
    (tmp_path / "hooks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    with pytest.raises(SystemExit, match="restarted its averages at step 4"):
        bench["hook_records"](tmp_path, "noise_scale_0_9")


STEPS, RANKS, BATCH = 4, 2, 64


def test_the_hooks_squared_norms_are_the_gradients_of_the_steps_batches(tmp_path, bench):
    pytest.importorskip("torch")
    run_dir = tmp_path / "run"
    proc = zerotrain(
        "run", "mlp_regressor", "--ranks", str(RANKS), "--mode", "zero2",
        "--steps", str(STEPS), "--run-dir", str(run_dir),
        "--set", "data.n_train=512", "--set", "model.hidden=[32,32]",
        "--set", f"train.batch_size={BATCH}", "--set", "eval.every=0",
        "--set", "checkpoint.every=1", "--set", f"checkpoint.keep_last={STEPS}",
        "--set", 'hooks.specs=[{hook = "builtin:noise_scale", exact = true}]',
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {
        r["step"]: r["metrics"]
        for r in map(json.loads, (run_dir / "hooks.jsonl").read_text().splitlines())
        if r["hook"] == "noise_scale"
    }
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, m in records.items():
        assert (m["b_small"], m["b_big"]) == (BATCH // RANKS, BATCH)
        small, big = bench["batch_norms"]("mlp_regressor", run_dir, step)
        # float32 gradients of 32 examples, summed in different orders: 1e-5 is ~100
        # float32 roundings; a wrong step, batch or scale is off by far more
        assert m["small_sq_step"] == pytest.approx(small, rel=1e-5), step
        assert m["big_sq_step"] == pytest.approx(big, rel=1e-5), step


def test_the_noise_column_is_the_spread_one_wrong_step_implies(bench):
    """One per-step estimate off by e (tr Σ of step 8, after a missed step 7) in an
    otherwise exact, constant series (|G|² = 1, tr Σ = 10): at step 10 the averages'
    relative error is that step's weight c = (1 - β²) β² times e / T, T = 10 (1 - β¹⁰)
    the brute force's average of tr Σ (the weights add up to 1 - β¹⁰, gaps included),
    and the noise column says the same."""
    beta, e = 0.9, 5.0
    exact = {s: (1.0, 10.0) for s in range(1, 11)}
    seen = [s for s in exact if s != 7]
    wrong = {**exact, 8: (1.0, 10.0 + e)}
    (row,) = bench["compare"]("synthetic", hook_run(wrong, seen, beta), exact, beta, 10)[
        "checkpoints"
    ]
    want = (1 - beta**2) * beta**2 * e / (10.0 * (1 - beta**10))
    assert row["rel_diff"] == pytest.approx(want, rel=1e-9)
    assert row["noise_sd"] == pytest.approx(want, rel=1e-9)


def test_the_noise_column_splits_into_the_parts_of_g2_and_of_trace(bench):
    """A wrong tr Σ (step 4) and a wrong |G|² (step 8) in an otherwise exact constant
    series: the `tr` part is step 4's term alone, the `g2` part step 8's alone, and the
    whole the root of their squares' sum (their errors enter as e_tr / T - e_g2 / G)."""
    beta, e_tr, e_g2 = 0.9, 5.0, 0.25
    exact = {s: (1.0, 10.0) for s in range(1, 11)}
    wrong = {**exact, 4: (1.0, 10.0 + e_tr), 8: (1.0 + e_g2, 10.0)}
    (row,) = bench["compare"]("synthetic", hook_run(wrong, list(exact), beta), exact, beta, 10)[
        "checkpoints"
    ]
    weight = {s: (1 - beta) * beta ** (10 - s) for s in (4, 8)}
    total = 1 - beta**10  # the weights' sum: T = 10 total, G = total
    want_tr = weight[4] * e_tr / (10.0 * total)
    want_g2 = weight[8] * e_g2 / total
    assert row["noise_sd_trace"] == pytest.approx(want_tr, rel=1e-9)
    assert row["noise_sd_g2"] == pytest.approx(want_g2, rel=1e-9)
    assert row["noise_sd"] == pytest.approx(math.hypot(want_tr, want_g2), rel=1e-9)


def test_a_beta_passes_only_if_every_counted_checkpoint_is_within_ten_percent(bench):
    """Checkpoints every 10 steps, beta 0.9 (window 10 steps: the checkpoints after step
    10 count). A hook whose tr Σ is 5 % high throughout passes; one 30 % high from step
    35 on is 14 % off at step 40 and fails, and a run too short to count any checkpoint
    does not pass either."""
    exact = {s: (1.0, 10.0) for s in range(1, 41)}

    def hook_off(rel: float, start: int) -> dict:
        off = {s: (g2, tr * (1 + rel)) if s >= start else (g2, tr) for s, (g2, tr) in exact.items()}
        return hook_run(off, list(exact), 0.9)

    good = bench["compare"]("synthetic", hook_off(0.05, 1), exact, 0.9, 10)
    assert good["pass"] and good["counted"] == 3
    assert good["max_abs_rel_diff"] == pytest.approx(0.05)
    bad = bench["compare"]("synthetic", hook_off(0.30, 35), exact, 0.9, 10)
    assert not bad["pass"] and bad["counted"] == 3
    assert [abs(r["rel_diff"]) <= 0.10 for r in bad["checkpoints"]] == [True] * 3 + [False]
    short = {s: v for s, v in exact.items() if s <= 9}
    none = bench["compare"]("synthetic", hook_run(short, list(short), 0.9), short, 0.9, 3)
    assert none["counted"] == 0 and not none["pass"]


def test_the_chance_of_passing_is_the_product_of_each_checkpoints_normal_probability(bench):
    chance = bench["chance_within"]
    assert chance([0.05], 0.10) == pytest.approx(0.954499736, rel=1e-9)  # 2 sd
    assert chance([0.05, 0.10], 0.10) == pytest.approx(0.954499736 * 0.682689492, rel=1e-9)
    assert chance([], 0.10) == 1.0 and chance([0.0], 0.10) == 1.0
    assert math.isnan(chance([0.05, math.nan], 0.10))
