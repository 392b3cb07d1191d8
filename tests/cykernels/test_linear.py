"""cykernels.linear: out = x @ weight.T + bias against the numpy twin, torch autograd and
central finite differences of the twin in float64."""

import numpy as np
import pytest

from cykernels import linear, linear_ref

# Every test here runs with each matrix library (the `blas` fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("blas")


def arrays(rng, dtype, bias=True):
    n, i, o = (int(v) for v in rng.integers(1, 12, 3))
    x = rng.standard_normal((n, i)).astype(dtype)
    weight = rng.standard_normal((o, i)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    dout = rng.standard_normal((n, o)).astype(dtype)
    return x, weight, b, dout


def run(module, x, weight, bias, dout):
    """(out, dx, dweight, dbias) from one forward and one backward into zeroed grads."""
    out = np.empty((x.shape[0], weight.shape[0]), x.dtype)
    module.linear_forward(out, x, weight, bias)
    dx = np.empty_like(x)
    dweight = np.zeros_like(weight)
    dbias = None if bias is None else np.zeros_like(bias)
    module.linear_backward(dx, dweight, dbias, dout, x, weight)
    return out, dx, dweight, dbias


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_kernel_matches_twin_in_float32(rng, tolerance, bias):
    for _ in range(3):
        x, weight, b, dout = arrays(rng, np.float32, bias)
        got, want = run(linear, x, weight, b, dout), run(linear_ref, x, weight, b, dout)
        for g, w in zip(got, want, strict=True):
            if w is not None:
                np.testing.assert_allclose(g, w, **tolerance[np.float32])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_forward_and_gradients_match_torch_autograd(torch, rng, tolerance, bias):
    x, weight, b, dout = arrays(rng, np.float32, bias)
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, weight))
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(dout))
    out, dx, dweight, dbias = run(linear, x, weight, b, dout)
    want = [ty, tx.grad, tw.grad] + ([] if tb is None else [tb.grad])
    for got, expected in zip([out, dx, dweight, dbias], want, strict=False):
        np.testing.assert_allclose(got, expected.detach().numpy(), **tolerance[np.float32])


def test_twin_gradients_match_central_finite_differences_in_float64(rng, finite_differences):
    x, weight, b, projection = arrays(rng, np.float64)
    _, *grads = run(linear_ref, x, weight, b, projection)
    params = [x, weight, b]

    def loss():  # a random projection of the output is the scalar loss
        out = np.empty_like(projection)
        linear_ref.linear_forward(out, *params)
        return float((out * projection).sum())

    for name, param, grad in zip(["x", "weight", "bias"], params, grads, strict=True):
        finite_differences(grad, loss, param, err_msg=name)


def test_parameter_gradients_accumulate_and_dx_overwrites(rng, tolerance):
    x, weight, b, dout = arrays(rng, np.float32)
    _, dx_once, dweight_once, dbias_once = run(linear, x, weight, b, dout)
    dx, dweight, dbias = np.full_like(x, 7.0), np.zeros_like(weight), np.zeros_like(b)
    for _ in range(2):
        linear.linear_backward(dx, dweight, dbias, dout, x, weight)
    np.testing.assert_array_equal(dx, dx_once)
    np.testing.assert_allclose(dweight, 2 * dweight_once, **tolerance[np.float32])
    np.testing.assert_allclose(dbias, 2 * dbias_once, **tolerance[np.float32])


@pytest.mark.parametrize("module", [linear, linear_ref], ids=["cython", "twin"])
def test_accumulate_false_overwrites_the_parameter_gradients(rng, module):
    x, weight, b, dout = arrays(rng, np.float32)
    _, _, dweight_once, dbias_once = run(module, x, weight, b, dout)
    dweight, dbias = np.full_like(weight, np.nan), np.full_like(b, 5.0)
    module.linear_backward(None, dweight, dbias, dout, x, weight, accumulate=False)
    np.testing.assert_array_equal(dweight, dweight_once)
    np.testing.assert_array_equal(dbias, dbias_once)


def test_dx_and_dbias_may_be_skipped(rng):
    x, weight, b, dout = arrays(rng, np.float32)
    _, _, dweight_full, _ = run(linear, x, weight, b, dout)
    dweight = np.zeros_like(weight)
    linear.linear_backward(None, dweight, None, dout, x, weight)
    np.testing.assert_array_equal(dweight, dweight_full)


def test_an_empty_batch_gives_zero_parameter_gradients(rng):
    x = np.empty((0, 3), np.float32)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    out, dx, dweight, dbias = run(
        linear, x, weight, np.zeros(4, np.float32), np.empty((0, 4), np.float32)
    )
    assert out.shape == (0, 4) and dx.shape == (0, 3)
    assert not dweight.any() and not dbias.any()


def test_repeated_calls_give_the_same_bits(rng):
    x, weight, b, dout = arrays(rng, np.float32)
    first, again = run(linear, x, weight, b, dout), run(linear, x, weight, b, dout)
    for a, c in zip(first, again, strict=True):
        assert a.tobytes() == c.tobytes()


# ---- bad input -----------------------------------------------------------------------


def test_mismatched_shapes_raise_value_error_naming_the_argument(rng):
    x, weight, b, dout = arrays(rng, np.float32)
    n, o = dout.shape
    out = np.empty((n, o), np.float32)
    with pytest.raises(ValueError, match="^weight: expected shape"):
        linear.linear_forward(out, x, weight[:, :0].copy(), b)
    with pytest.raises(ValueError, match="^out: expected shape"):
        linear.linear_forward(np.empty((n, o + 1), np.float32), x, weight, b)
    with pytest.raises(ValueError, match="^bias: expected shape"):
        linear.linear_forward(out, x, weight, np.zeros(o + 1, np.float32))
    grads = {"dx": np.empty_like(x), "dweight": np.zeros_like(weight), "dbias": np.zeros_like(b)}
    for name in [*grads, "dout"]:
        args = dict(grads, dout=dout)
        args[name] = np.zeros((args[name].shape[0] + 1, *args[name].shape[1:]), np.float32)
        with pytest.raises(ValueError, match=f"^{name}: expected shape"):
            linear.linear_backward(
                args["dx"], args["dweight"], args["dbias"], args["dout"], x, weight
            )


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda a: a.astype(np.float64), "expected dtype float32"),
        (
            # at least 2 x 2, so the Fortran-order copy is not also C-contiguous
            lambda a: np.asfortranarray(np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)),
            "expected a C-contiguous",
        ),
        (lambda a: a[None], "expected 2 dimensions"),
    ],
    ids=["float64", "fortran", "3d"],
)
def test_bad_x_or_weight_raise_value_error_naming_it(rng, spoil, message):
    x, weight, b, dout = arrays(rng, np.float32)
    out = np.empty_like(dout)
    with pytest.raises(ValueError, match=f"^x: {message}"):
        linear.linear_forward(out, spoil(x), weight, b)
    with pytest.raises(ValueError, match=f"^weight: {message}"):
        linear.linear_forward(out, x, spoil(weight), b)


def test_outputs_aliasing_inputs_are_rejected(rng):
    x = rng.standard_normal((4, 4)).astype(np.float32)
    weight = rng.standard_normal((4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="^out: must not share memory with x"):
        linear.linear_forward(x, x, weight, None)
    with pytest.raises(ValueError, match="^dweight: must not share memory with weight"):
        linear.linear_backward(None, weight, None, x.copy(), x, weight)


def test_none_for_a_required_array_is_rejected(rng):
    x, weight, b, dout = arrays(rng, np.float32)
    forward = {"out": np.empty_like(dout), "x": x, "weight": weight}
    backward = {"dweight": np.zeros_like(weight), "dout": dout, "x": x, "weight": weight}

    def call_forward(a):
        linear.linear_forward(a["out"], a["x"], a["weight"], b)

    def call_backward(a):  # dx and dbias are the optional ones
        linear.linear_backward(None, a["dweight"], None, a["dout"], a["x"], a["weight"])

    for args, call in [(forward, call_forward), (backward, call_backward)]:
        for name in args:
            with pytest.raises(
                ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"
            ):
                call(dict(args, **{name: None}))
