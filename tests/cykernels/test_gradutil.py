"""cykernels.gradutil: norms, clipping, scaling, accumulation, non-finite counts."""

import numpy as np
import pytest

from cykernels import gradutil, gradutil_ref

SHAPES = [(1,), (7,), (9,), (1031,), (33, 17)]  # tails of the 8-way unrolled sum; 2-D flat


@pytest.mark.parametrize("shape", SHAPES)
def test_sq_norm_matches_twin_in_float64(rng, tolerance, shape):
    x = rng.standard_normal(shape, dtype=np.float32)
    np.testing.assert_allclose(
        gradutil.sq_norm(x), gradutil_ref.sq_norm(x), **tolerance[np.float64]
    )


def test_sq_norm_gives_the_same_bits_every_call(rng):
    x = rng.standard_normal(100_003, dtype=np.float32) * 1e3
    assert len({gradutil.sq_norm(x) for _ in range(5)}) == 1


def test_sq_norm_of_an_empty_shard_is_zero():
    assert gradutil.sq_norm(np.zeros(0, np.float32)) == 0.0


def test_sharded_sq_norms_sum_to_the_global_norm(rng, tolerance):
    grad = rng.standard_normal(1000, dtype=np.float32)
    shards = np.array_split(grad, 3)
    total = sum(gradutil.sq_norm(s) for s in shards)
    np.testing.assert_allclose(total, gradutil.sq_norm(grad), **tolerance[np.float64])


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_by_global_norm_matches_torch(torch, rng, tolerance, max_norm):
    grad = rng.standard_normal(1031, dtype=np.float32)
    tparam = torch.nn.Parameter(torch.zeros(1031))
    tparam.grad = torch.from_numpy(grad.copy())
    expected_norm = torch.nn.utils.clip_grad_norm_([tparam], max_norm).item()
    norm, finite = gradutil.clip_by_global_norm(grad, max_norm)
    assert finite
    np.testing.assert_allclose(norm, expected_norm, **tolerance[np.float32])
    np.testing.assert_allclose(grad, tparam.grad.numpy(), **tolerance[np.float32])


def test_clip_leaves_a_gradient_within_the_norm_bit_for_bit(rng):
    grad = rng.standard_normal(64, dtype=np.float32)
    before = grad.copy()
    norm, finite = gradutil.clip_by_global_norm(grad, 100.0)
    assert finite and norm < 100.0
    np.testing.assert_array_equal(grad, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_reports_a_non_finite_norm_and_leaves_grad_untouched(rng, bad):
    grad = rng.standard_normal(64, dtype=np.float32)
    grad[17] = bad
    before = grad.copy()
    norm, finite = gradutil.clip_by_global_norm(grad, 1.0)
    assert not finite and not np.isfinite(norm)
    np.testing.assert_array_equal(grad, before)
    assert gradutil_ref.clip_by_global_norm(grad.copy(), 1.0)[1] is False


def test_clipping_shards_by_the_all_reduced_norm_equals_clipping_the_whole(rng, tolerance):
    whole = rng.standard_normal(999, dtype=np.float32)
    shards = [s.copy() for s in np.array_split(whole, 4)]
    total_norm = sum(gradutil.sq_norm(s) for s in shards) ** 0.5  # the all-reduce
    for shard in shards:
        assert gradutil.clip_by_global_norm(shard, 1.0, total_norm=total_norm) == (
            total_norm,
            True,
        )
    gradutil.clip_by_global_norm(whole, 1.0)
    np.testing.assert_allclose(np.concatenate(shards), whole, **tolerance[np.float32])


def test_clip_trusts_a_given_non_finite_total_norm(rng):
    grad = rng.standard_normal(8, dtype=np.float32)
    assert gradutil.clip_by_global_norm(grad, 1.0, total_norm=float("nan"))[1] is False


@pytest.mark.parametrize("shape", SHAPES)
def test_scale_and_accumulate_match_twin(rng, tolerance, shape):
    x, y = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    ours, ref = x.copy(), x.copy()
    gradutil.scale(ours, 0.3)
    gradutil_ref.scale(ref, 0.3)
    gradutil.accumulate(ours, y, alpha=-1.5)
    gradutil_ref.accumulate(ref, y, alpha=-1.5)
    np.testing.assert_allclose(ours, ref, **tolerance[np.float32])


def test_count_nonfinite_counts_nan_and_both_infinities_only():
    tiny = np.finfo(np.float32).tiny / 4  # a subnormal
    big = np.finfo(np.float32).max
    x = np.array([0.0, -0.0, tiny, big, -big, np.nan, np.inf, -np.inf, 1.0], np.float32)
    assert gradutil.count_nonfinite(x) == 3 == gradutil_ref.count_nonfinite(x)
    assert gradutil.count_nonfinite(np.tile(x, (5, 3))) == 45


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda x, y: gradutil.sq_norm(x.astype(np.float64)), "x"),
        (lambda x, y: gradutil.count_nonfinite(x[::2]), "x"),
        (lambda x, y: gradutil.clip_by_global_norm(x[::2], 1.0), "grad"),
        (lambda x, y: gradutil.scale(list(x), 2.0), "x"),
        (lambda x, y: gradutil.accumulate(x, y[:-1]), "src"),
        (lambda x, y: gradutil.accumulate(x, x), "dst"),
        (lambda x, y: gradutil.accumulate(x[1:], x[:-1]), "dst"),
        (lambda x, y: gradutil.accumulate(x.astype(np.int32), y), "dst"),
    ],
    ids=["dtype", "strided", "clip_strided", "list", "shape", "alias", "overlap", "int_dst"],
)
def test_bad_arrays_raise_value_error_naming_the_argument(rng, call, name):
    x, y = rng.standard_normal((2, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=f"^{name}: "):
        call(x, y)


def test_scale_rejects_a_read_only_array():
    x = np.ones(4, np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="x: expected a writable array"):
        gradutil.scale(x, 2.0)
