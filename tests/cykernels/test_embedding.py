"""cykernels.embedding: lookup and deterministic scatter-add against the numpy twin, torch
autograd and central finite differences of the twin in float64."""

import numpy as np
import pytest

from cykernels import embedding, embedding_ref


def arrays(rng, dtype):
    v, c, n = int(rng.integers(1, 10)), int(rng.integers(1, 12)), int(rng.integers(1, 30))
    ids = rng.integers(0, v, n)  # n > v often: repeated ids
    weight = rng.standard_normal((v, c)).astype(dtype)
    dout = rng.standard_normal((n, c)).astype(dtype)
    return ids, weight, dout


def run(module, ids, weight, dout):
    out = np.empty((ids.shape[0], weight.shape[1]), weight.dtype)
    module.embedding_forward(out, ids, weight)
    dweight = np.zeros_like(weight)
    module.embedding_backward(dweight, dout, ids)
    return out, dweight


def test_kernel_matches_twin_in_float32(rng, tolerance):
    for _ in range(3):
        ids, weight, dout = arrays(rng, np.float32)
        out, dweight = run(embedding, ids, weight, dout)
        want_out, want_dweight = run(embedding_ref, ids, weight, dout)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_allclose(dweight, want_dweight, **tolerance[np.float32])


def test_forward_and_gradient_match_torch_autograd(torch, rng, tolerance):
    ids, weight, dout = arrays(rng, np.float32)
    tw = torch.tensor(weight, requires_grad=True)
    ty = torch.nn.functional.embedding(torch.tensor(ids), tw)
    ty.backward(torch.tensor(dout))
    out, dweight = run(embedding, ids, weight, dout)
    np.testing.assert_array_equal(out, ty.detach().numpy())
    np.testing.assert_allclose(dweight, tw.grad.numpy(), **tolerance[np.float32])


def test_twin_gradient_matches_central_finite_differences_in_float64(rng, finite_differences):
    ids, weight, projection = arrays(rng, np.float64)
    _, dweight = run(embedding_ref, ids, weight, projection)
    out = np.empty_like(projection)

    def loss():  # a random projection of the output is the scalar loss
        embedding_ref.embedding_forward(out, ids, weight)
        return float((out * projection).sum())

    finite_differences(dweight, loss, weight)


def test_repeated_ids_sum_in_row_order_and_the_bits_repeat():
    ids = np.array([2, 0, 2, 2], np.int64)
    dout = np.array([[1e8], [1.0], [1.0], [-1e8]], np.float32)
    dweight = np.zeros((3, 1), np.float32)
    embedding.embedding_backward(dweight, dout, ids)
    # in row order: ((0 + 1e8) + 1) - 1e8 = 0 in float32 (the 1 is absorbed): fixed order
    assert dweight[2, 0] == 0.0 and dweight[0, 0] == 1.0 and dweight[1, 0] == 0.0


def test_the_gradient_accumulates_for_tied_weights(rng, tolerance):
    ids, weight, dout = arrays(rng, np.float32)
    _, once = run(embedding, ids, weight, dout)
    dweight = np.zeros_like(weight)
    embedding.embedding_backward(dweight, dout, ids)
    embedding.embedding_backward(dweight, dout, ids)
    np.testing.assert_allclose(dweight, 2 * once, **tolerance[np.float32])


def test_an_empty_batch_is_a_no_op(rng):
    ids = np.empty(0, np.int64)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    out, dweight = run(embedding, ids, weight, np.empty((0, 3), np.float32))
    assert out.shape == (0, 3) and not dweight.any()


# ---- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 5, 2**40])
def test_out_of_range_ids_raise_value_error_naming_ids_and_touch_nothing(rng, bad_id):
    weight = rng.standard_normal((5, 3)).astype(np.float32)
    ids = np.array([0, bad_id, 4], np.int64)
    out = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="^ids: ids must lie in \\[0, 5\\)"):
        embedding.embedding_forward(out, ids, weight)
    dweight = np.zeros_like(weight)
    with pytest.raises(ValueError, match="^ids: ids must lie in \\[0, 5\\)"):
        embedding.embedding_backward(dweight, np.ones((3, 3), np.float32), ids)
    assert not out.any() and not dweight.any()


def test_bad_arrays_raise_value_error_naming_the_argument(rng):
    weight = rng.standard_normal((5, 3)).astype(np.float32)
    ids = np.array([0, 1, 4], np.int64)
    out = np.empty((3, 3), np.float32)
    for args, name, message in [
        ((out, ids.astype(np.int32), weight), "ids", "expected dtype int64"),
        ((out, ids[::2], weight), "ids", "expected a C-contiguous|expected shape"),
        ((out, ids.reshape(3, 1), weight), "ids", "expected 1 dimensions"),
        ((out, ids, weight.astype(np.float64)), "weight", "expected dtype float32"),
        ((np.empty((3, 4), np.float32), ids, weight), "out", "expected shape \\(3, 3\\)"),
        ((weight[:3], ids, weight), "out", "must not share memory with weight"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            embedding.embedding_forward(*args)
    with pytest.raises(ValueError, match="^dout: expected shape \\(3, 3\\)"):
        embedding.embedding_backward(np.zeros_like(weight), np.ones((2, 3), np.float32), ids)


def test_none_for_a_required_array_is_rejected(rng):
    ids, weight, dout = arrays(rng, np.float32)
    out = np.empty_like(dout)
    for function, args in [
        (embedding.embedding_forward, {"out": out, "ids": ids, "weight": weight}),
        (
            embedding.embedding_backward,
            {"dweight": np.zeros_like(weight), "dout": dout, "ids": ids},
        ),
    ]:
        for name in args:
            with pytest.raises(
                ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"
            ):
                function(*dict(args, **{name: None}).values())
