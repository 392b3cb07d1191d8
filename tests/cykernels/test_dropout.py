"""cykernels.dropout: a counter-based mask that the numpy twin reproduces bit for bit and
any (seed, offset) regenerates; the backward checked by finite differences."""

import numpy as np
import pytest

from cykernels import dropout, dropout_ref


def run(module, x, dout, p, seed, offset=0):
    """(out, mask, dx) from one forward and one backward."""
    out, dx = np.empty_like(x), np.empty_like(x)
    mask = np.empty(x.shape, np.uint8)
    module.dropout_forward(out, mask, x, p, seed, offset)
    module.dropout_backward(dx, dout, mask, p)
    return out, mask, dx


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.875])
def test_kernel_and_twin_agree_bit_for_bit(rng, p):
    shape = tuple(int(n) for n in rng.integers(1, 12, 3))
    x, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    seed, offset = int(rng.integers(0, 2**63)) * 2 + 1, int(rng.integers(0, 2**40))
    for got, want in zip(
        run(dropout, x, dout, p, seed, offset),
        run(dropout_ref, x, dout, p, seed, offset),
        strict=True,
    ):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def _splitmix64_finaliser(z: int) -> int:
    """Written out here from the published algorithm (Steele, Lea and Flood, 2014), not
    taken from dropout_ref: the kernel and its twin share dropout_params."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_the_mask_is_the_documented_hash_of_seed_and_offset():
    # anchor: splitmix64 started from 0 outputs these two first (its published values)
    assert [_splitmix64_finaliser(k * _GOLDEN) for k in (1, 2)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
    ]
    seed, offset, p, n = 12345, 7, 0.3, 512
    key = _splitmix64_finaliser(seed)
    threshold = int(p * 2**32)
    want = [
        int((_splitmix64_finaliser(key + (offset + i) * _GOLDEN) >> 32) >= threshold)
        for i in range(n)
    ]
    x = np.ones(n, np.float32)
    for module in (dropout, dropout_ref):
        out, mask, _ = run(module, x, x, p, seed, offset)
        assert mask.tolist() == want, module.__name__
        assert out.tolist() == [np.float32(1 / (1 - p)) * k for k in want]


def test_the_mask_of_a_slice_is_the_slice_of_the_mask(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    _, full, _ = run(dropout, x, x, 0.3, seed=42)
    for start in (0, 1, 517, 999):
        _, part, _ = run(dropout, x[start:].copy(), x[start:].copy(), 0.3, seed=42, offset=start)
        np.testing.assert_array_equal(part, full[start:])


def test_the_mask_is_a_pure_function_of_seed_and_offset(rng):
    x = rng.standard_normal((8, 64)).astype(np.float32)
    masks = {key: run(dropout, x, x, 0.5, *key)[1] for key in [(1, 0), (2, 0), (1, 512)]}
    assert len({mask.tobytes() for mask in masks.values()}) == 3
    again = run(dropout, x, x, 0.5, 1, 0)[1]
    np.testing.assert_array_equal(again, masks[(1, 0)])
    assert (masks[(1, 0)] != masks[(2, 0)]).mean() > 0.3  # another seed: another mask
    assert (masks[(1, 0)] != masks[(1, 512)]).mean() > 0.3  # another offset too


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 0.9])
def test_the_keep_rate_is_near_one_minus_p_and_kept_values_are_scaled(rng, p):
    n = 200_000
    x = np.ones(n, np.float32)
    out, mask, _ = run(dropout, x, x, p, seed=int(rng.integers(0, 2**32)))
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(mask.mean() - (1 - p)) < 6 * sigma
    np.testing.assert_array_equal(out[mask == 1], np.float32(1 / (1 - p)))
    assert not out[mask == 0].any()
    assert set(np.unique(mask)) <= {0, 1}


def test_p_zero_is_the_identity(rng):
    x, dout = (rng.standard_normal((5, 7)).astype(np.float32) for _ in range(2))
    out, mask, dx = run(dropout, x, dout, 0.0, seed=3)
    assert out.tobytes() == x.tobytes() and dx.tobytes() == dout.tobytes()
    assert mask.all()


def test_the_backward_is_the_mask_times_the_scale(rng):
    x, dout = (rng.standard_normal((6, 9)).astype(np.float32) for _ in range(2))
    _, mask, dx = run(dropout, x, dout, 0.4, seed=11)
    np.testing.assert_array_equal(dx, np.where(mask == 1, dout * np.float32(1 / 0.6), 0.0))


def test_twin_backward_matches_central_finite_differences_in_float64(rng, finite_differences):
    x, projection = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    _, _, dx = run(dropout_ref, x, projection, 0.3, seed=5)
    out, mask = np.empty_like(x), np.empty(x.shape, np.uint8)

    def loss():  # a random projection of the output is the scalar loss
        dropout_ref.dropout_forward(out, mask, x, 0.3, 5)
        return float((out * projection).sum())

    finite_differences(dx, loss, x)


def test_the_expectation_matches_torch_dropout_scaling(torch, rng):
    # torch's mask comes from its own generator, so compare what both promise: the
    # kept values are x / (1 - p) and the dropped ones are zero.
    x = rng.standard_normal(4096).astype(np.float32) + 3
    out, mask, _ = run(dropout, x, x, 0.2, seed=9)
    theirs = torch.nn.functional.dropout(torch.tensor(x), p=0.2, training=True).numpy()
    kept = theirs != 0
    np.testing.assert_allclose(theirs[kept], x[kept] / 0.8, rtol=1e-6)
    np.testing.assert_allclose(out[mask == 1], x[mask == 1] / 0.8, rtol=1e-6)


# ---- bad input -----------------------------------------------------------------------


def test_bad_probabilities_seeds_and_offsets_are_rejected(rng):
    x = rng.standard_normal(8).astype(np.float32)
    out, mask = np.empty_like(x), np.empty(8, np.uint8)
    for kwargs, message in [
        ({"p": 1.0}, "^p: expected a drop probability in \\[0, 1\\), got 1.0"),
        ({"p": -0.1}, "^p: expected a drop probability"),
        ({"p": float("nan")}, "^p: expected a drop probability"),
        ({"seed": -1}, "^seed: expected an integer in \\[0, 2\\*\\*64\\)"),
        ({"seed": 2**64}, "^seed: expected an integer"),
        ({"offset": -5}, "^offset: expected an integer"),
    ]:
        args = dict({"p": 0.5, "seed": 1, "offset": 0}, **kwargs)
        with pytest.raises(ValueError, match=message):
            dropout.dropout_forward(out, mask, x, **args)
    with pytest.raises(ValueError, match="^p: expected a drop probability"):
        dropout.dropout_backward(out, x, mask, 1.5)


def test_bad_arrays_raise_value_error_naming_the_argument(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    out, mask = np.empty_like(x), np.empty(x.shape, np.uint8)
    for args, name, message in [
        ((out, mask.astype(bool), x), "mask", "expected dtype uint8"),
        ((out, mask, x.astype(np.float64)), "x", "expected dtype float32"),
        ((out, mask[:, :4].copy(), x), "mask", "expected shape \\(4, 5\\)"),
        ((out.T, mask, x), "out", "expected a C-contiguous"),
        ((x, mask, x), "out", "must not share memory with x"),
        ((out, out.view(np.uint8)[:, :5], x), "mask", "expected a C-contiguous"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            dropout.dropout_forward(*args, 0.5, 1)
    with pytest.raises(ValueError, match="^dx: must not share memory with dout"):
        dropout.dropout_backward(x, x, mask, 0.5)


def test_none_for_a_required_array_is_rejected(rng):
    x = rng.standard_normal(6).astype(np.float32)
    mask = np.ones(6, np.uint8)
    for function, args, scalars in [
        (dropout.dropout_forward, {"out": np.empty_like(x), "mask": mask, "x": x}, (0.5, 1)),
        (dropout.dropout_backward, {"dx": np.empty_like(x), "dout": x, "mask": mask}, (0.5,)),
    ]:
        for name in args:
            with pytest.raises(
                ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"
            ):
                function(*dict(args, **{name: None}).values(), *scalars)
