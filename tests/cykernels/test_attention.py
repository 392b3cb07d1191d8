"""cykernels.attention: causal multi-head self-attention against the numpy twin, torch's
scaled_dot_product_attention and central finite differences of the twin in float64."""

import numpy as np
import pytest

from cykernels import attention, attention_ref

# Every test here runs with each matrix library (the `blas` fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("blas")


def arrays(rng, dtype, b=None, t=None, n_head=None, head_size=None):
    b = b or int(rng.integers(1, 4))
    t = t or int(rng.integers(1, 10))
    n_head = n_head or int(rng.integers(1, 4))
    head_size = head_size or int(rng.integers(1, 6))
    c = n_head * head_size
    qkv = rng.standard_normal((b, t, 3 * c)).astype(dtype)
    dout = rng.standard_normal((b, t, c)).astype(dtype)
    return qkv, dout, n_head


def run(module, qkv, dout, n_head):
    """(out, att, dqkv) from one forward and one backward."""
    b, t, c3 = qkv.shape
    out = np.empty((b, t, c3 // 3), qkv.dtype)
    att = np.empty((b, n_head, t, t), qkv.dtype)
    module.attention_forward(out, att, qkv, n_head)
    dqkv = np.full_like(qkv, np.nan)  # every element must be overwritten
    scratch = [np.full_like(att, np.nan) for _ in range(2)]
    module.attention_backward(dqkv, *scratch, dout, qkv, att, n_head)
    return out, att, dqkv


def test_kernel_matches_twin_in_float32(rng, tolerance):
    for _ in range(4):
        qkv, dout, n_head = arrays(rng, np.float32)
        got, want = run(attention, qkv, dout, n_head), run(attention_ref, qkv, dout, n_head)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, **tolerance[np.float32])


def test_forward_and_gradient_match_torch_scaled_dot_product_attention(torch, rng, tolerance):
    qkv, dout, n_head = arrays(rng, np.float32, b=2, t=7, n_head=3, head_size=4)
    b, t, c3 = qkv.shape
    tqkv = torch.tensor(qkv, requires_grad=True)

    def heads(z):  # (B, T, C) -> (B, H, T, hs)
        return z.view(b, t, n_head, c3 // 3 // n_head).transpose(1, 2)

    q, k, v = (heads(z) for z in tqkv.split(c3 // 3, dim=2))
    ty = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ty = ty.transpose(1, 2).reshape(b, t, c3 // 3)
    ty.backward(torch.tensor(dout))
    out, _, dqkv = run(attention, qkv, dout, n_head)
    np.testing.assert_allclose(out, ty.detach().numpy(), **tolerance[np.float32])
    np.testing.assert_allclose(dqkv, tqkv.grad.numpy(), **tolerance[np.float32])


def test_twin_gradient_matches_central_finite_differences_in_float64(rng, finite_differences):
    qkv, projection, n_head = arrays(rng, np.float64, b=2, t=5, n_head=2, head_size=3)
    _, _, dqkv = run(attention_ref, qkv, projection, n_head)
    out = np.empty_like(projection)
    att = np.empty((2, n_head, 5, 5))

    def loss():  # a random projection of the output is the scalar loss
        attention_ref.attention_forward(out, att, qkv, n_head)
        return float((out * projection).sum())

    finite_differences(dqkv, loss, qkv)


def test_att_is_causal_rows_sum_to_one_and_the_future_is_exactly_zero(rng):
    qkv, dout, n_head = arrays(rng, np.float32, t=9)
    _, att, _ = run(attention, qkv, dout, n_head)
    future = np.triu(np.ones((9, 9), dtype=bool), k=1)
    assert (att[..., future] == 0.0).all()
    np.testing.assert_allclose(att.sum(axis=-1), 1.0, rtol=1e-6)


def test_the_first_position_attends_only_to_itself(rng):
    qkv, dout, n_head = arrays(rng, np.float32, t=4)
    out, att, _ = run(attention, qkv, dout, n_head)
    c = qkv.shape[2] // 3
    assert (att[:, :, 0, 0] == 1.0).all()
    np.testing.assert_array_equal(out[:, 0], qkv[:, 0, 2 * c :])  # v of position 0


def test_huge_scores_stay_finite(rng):
    qkv, dout, n_head = arrays(rng, np.float32, t=6)
    qkv *= 1e3
    out, att, dqkv = run(attention, qkv, dout, n_head)
    assert np.isfinite(out).all() and np.isfinite(att).all() and np.isfinite(dqkv).all()


def test_repeated_calls_give_the_same_bits(rng):
    qkv, dout, n_head = arrays(rng, np.float32)
    first, again = run(attention, qkv, dout, n_head), run(attention, qkv, dout, n_head)
    for a, b in zip(first, again, strict=True):
        assert a.tobytes() == b.tobytes()


# ---- bad input -----------------------------------------------------------------------


def test_bad_head_counts_raise_value_error(rng):
    qkv, _, _ = arrays(rng, np.float32, b=1, t=3, n_head=2, head_size=3)  # C = 6
    out, att = np.empty((1, 3, 6), np.float32), np.empty((1, 4, 3, 3), np.float32)
    with pytest.raises(
        ValueError, match="^qkv: expected shape \\(B, T, 3C\\) with C > 0 divisible"
    ):
        attention.attention_forward(out, att, qkv, 4)
    for n_head in (0, -1, 2.0):
        with pytest.raises(ValueError, match="^n_head: expected a positive integer"):
            attention.attention_forward(out, att, qkv, n_head)
    with pytest.raises(ValueError, match="^qkv: expected shape \\(B, T, 3C\\)"):
        attention.attention_forward(out, att, qkv[..., :-1].copy(), 1)


def test_bad_arrays_raise_value_error_naming_the_argument(rng):
    qkv, dout, n_head = arrays(rng, np.float32, b=2, t=3, n_head=2, head_size=2)
    out, att, _ = run(attention, qkv, dout, n_head)
    for args, name, message in [
        ((out, att, qkv.astype(np.float64), n_head), "qkv", "expected dtype float32"),
        ((out, att, qkv.transpose(1, 0, 2), n_head), "qkv", "expected a C-contiguous"),
        ((out, att[:, :1].copy(), qkv, n_head), "att", "expected shape \\(2, 2, 3, 3\\)"),
        ((out[:, :2].copy(), att, qkv, n_head), "out", "expected shape \\(2, 3, 4\\)"),
        ((qkv[..., :4], att, qkv, n_head), "out", "expected a C-contiguous"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            attention.attention_forward(*args)
    dqkv, dpreatt, datt = np.empty_like(qkv), np.empty_like(att), np.empty_like(att)
    good = {"dqkv": dqkv, "dpreatt": dpreatt, "datt": datt, "dout": dout, "qkv": qkv, "att": att}
    for name, bad, message in [
        ("dpreatt", datt, "must not share memory with datt"),
        ("dqkv", qkv, "must not share memory with qkv"),
        ("datt", np.empty((2, 2, 3, 4), np.float32), "expected shape \\(2, 2, 3, 3\\)"),
        ("dout", dout[:, :, :2].copy(), "expected shape \\(2, 3, 4\\)"),
        ("att", att.astype(np.float64), "expected dtype float32"),
    ]:
        args = dict(good, **{name: bad})
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            attention.attention_backward(*args.values(), n_head)


def test_none_for_a_required_array_is_rejected(rng):
    qkv, dout, n_head = arrays(rng, np.float32, b=1, t=3, n_head=2, head_size=2)
    out, att, dqkv = run(attention, qkv, dout, n_head)
    for function, args in [
        (attention.attention_forward, {"out": out, "att": att, "qkv": qkv}),
        (
            attention.attention_backward,
            {
                "dqkv": dqkv,
                "dpreatt": att.copy(),
                "datt": att.copy(),
                "dout": dout,
                "qkv": qkv,
                "att": att,
            },
        ),
    ]:
        for name in args:
            with pytest.raises(
                ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"
            ):
                function(*dict(args, **{name: None}).values(), n_head)
