"""cykernels.activations: kernels against their numpy twin, torch autograd and central
finite differences of the twin in float64."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from cykernels import activations, activations_ref

# ---- the table of ops under test -----------------------------------------------------


def any_shape(rng):
    """A random shape of 1 to 3 axes (elementwise ops take any shape)."""
    return tuple(int(n) for n in rng.integers(1, 9, rng.integers(1, 4)))


def rows(rng):
    return (int(rng.integers(1, 7)), int(rng.integers(1, 20)))


def even_rows(rng):
    return (int(rng.integers(1, 7)), 2 * int(rng.integers(1, 10)))


def away_from_zero(rng, shape):
    """Normal samples pushed off |x| < 0.05, so no finite-difference step crosses relu's kink."""
    x = rng.standard_normal(shape)
    return x + 0.05 * np.sign(x)


@dataclass
class Op:
    """One activation under one set of options, with its torch counterpart."""

    name: str
    shape: object  # rng -> input shape
    torch_fn: object  # (torch, F, tensor) -> tensor
    options: dict = field(default_factory=dict)
    saves_output: bool = False  # backward takes the forward output y instead of x
    half_width: bool = False  # swiglu: out has half of x's last axis

    def __str__(self):
        return "-".join([self.name, *map(str, self.options.values())])

    def out_shape(self, shape):
        return (*shape[:-1], shape[-1] // 2) if self.half_width else shape

    def forward(self, module, out, x):
        getattr(module, f"{self.name}_forward")(out, x, **self.options)

    def backward(self, module, dx, dout, x, y):
        saved = y if self.saves_output else x
        getattr(module, f"{self.name}_backward")(dx, dout, saved, **self.options)

    def run(self, module, x, dout):
        """(y, dx) of `module`'s forward and backward on x with output gradient dout."""
        y = np.empty(self.out_shape(x.shape), x.dtype)
        self.forward(module, y, x)
        dx = np.empty_like(x)
        self.backward(module, dx, dout, x, y)
        return y, dx


def torch_swiglu(torch, F, x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


OPS = [
    Op("relu", any_shape, lambda torch, F, x: F.relu(x)),
    Op("gelu", any_shape, lambda torch, F, x: F.gelu(x), {"approximate": "none"}),
    Op(
        "gelu",
        any_shape,
        lambda torch, F, x: F.gelu(x, approximate="tanh"),
        {"approximate": "tanh"},
    ),
    Op("silu", any_shape, lambda torch, F, x: F.silu(x)),
    Op("tanh", any_shape, lambda torch, F, x: torch.tanh(x), saves_output=True),
    Op("softmax", rows, lambda torch, F, x: torch.softmax(x, dim=-1), saves_output=True),
    Op("swiglu", even_rows, torch_swiglu, half_width=True),
]


def inputs(op, rng, dtype, scale=2.0):
    shape = op.shape(rng)
    x = (scale * away_from_zero(rng, shape)).astype(dtype)
    dout = rng.standard_normal(op.out_shape(shape)).astype(dtype)
    return x, dout


# ---- against the twin, torch and finite differences ----------------------------------


@pytest.mark.parametrize("op", OPS, ids=str)
def test_kernel_matches_twin_in_float32(rng, tolerance, op):
    for _ in range(3):
        x, dout = inputs(op, rng, np.float32, scale=4.0)
        for got, want in zip(
            op.run(activations, x, dout), op.run(activations_ref, x, dout), strict=True
        ):
            np.testing.assert_allclose(got, want, **tolerance[np.float32])


@pytest.mark.parametrize("op", OPS, ids=str)
def test_forward_and_gradient_match_torch_autograd(torch, rng, tolerance, op):
    x, dout = inputs(op, rng, np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = op.torch_fn(torch, torch.nn.functional, tx)
    ty.backward(torch.tensor(dout))
    y, dx = op.run(activations, x, dout)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tolerance[np.float32])
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tolerance[np.float32])


@pytest.mark.parametrize("op", OPS, ids=str)
def test_twin_backward_matches_central_finite_differences_in_float64(rng, finite_differences, op):
    x, projection = inputs(op, rng, np.float64)

    def loss():  # a random projection of the output is the scalar loss
        return float((op.run(activations_ref, x, projection)[0] * projection).sum())

    finite_differences(op.run(activations_ref, x, projection)[1], loss, x)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_repeated_calls_give_the_same_bits(rng, op):
    x, dout = inputs(op, rng, np.float32)
    first, again = op.run(activations, x, dout), op.run(activations, x, dout)
    for a, b in zip(first, again, strict=True):
        assert a.tobytes() == b.tobytes()


def test_residual_forward_adds_and_backward_copies_into_both(rng):
    a, b, dout = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3))
    out, da, db = (np.full((3, 5), np.nan, np.float32) for _ in range(3))
    activations.residual_forward(out, a, b)
    np.testing.assert_array_equal(out, a + b)
    activations.residual_backward(da, db, dout)
    np.testing.assert_array_equal(da, dout)
    np.testing.assert_array_equal(db, dout)
    activations.residual_backward(None, db, 2 * dout)  # either side may be skipped
    np.testing.assert_array_equal(db, 2 * dout)
    np.testing.assert_array_equal(da, dout)


def test_residual_kernel_and_twin_are_exact(rng):
    """out = a + b is one correctly rounded addition, and d/da sum(dout * (a + b)) is
    dout exactly (likewise for b): kernel and twin give exactly those bits."""
    a, b, dout = (rng.standard_normal((2, 4)).astype(np.float32) for _ in range(3))
    for module in (activations, activations_ref):
        out = np.empty_like(a)
        module.residual_forward(out, a, b)
        np.testing.assert_array_equal(out, a + b)
        da, db = np.full_like(a, np.nan), np.full_like(b, np.nan)
        module.residual_backward(da, db, dout)
        np.testing.assert_array_equal(da, dout)
        np.testing.assert_array_equal(db, dout)


# ---- special values ------------------------------------------------------------------


def test_softmax_is_stable_for_huge_logits_and_rows_sum_to_one(rng):
    x = (1e4 * rng.standard_normal((5, 37))).astype(np.float32)
    x[0] = 3e38  # a row of equal huge logits is uniform
    y = np.empty_like(x)
    activations.softmax_forward(y, x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], 1 / 37, rtol=1e-6)


def test_saturating_activations_reach_their_limits_without_overflow():
    x = np.array([-200.0, -90.0, -30.0, 30.0, 90.0, 200.0], np.float32)
    out = np.empty_like(x)
    for name, options, want in [
        ("gelu", {"approximate": "none"}, np.maximum(x, 0)),
        ("gelu", {"approximate": "tanh"}, np.maximum(x, 0)),
        ("silu", {}, np.maximum(x, 0)),
        ("tanh", {}, np.sign(x)),
    ]:
        getattr(activations, f"{name}_forward")(out, x, **options)
        np.testing.assert_allclose(out, want, atol=1e-6, err_msg=name)


def test_nan_passes_through_every_elementwise_activation():
    x = np.array([np.nan, 1.0], np.float32)
    out = np.empty_like(x)
    for name in ("relu", "gelu", "silu", "tanh"):
        getattr(activations, f"{name}_forward")(out, x)
        assert np.isnan(out[0]), name


def test_an_empty_array_is_a_no_op():
    x = np.empty((0, 4), np.float32)
    for op in OPS:
        op.run(activations, x, np.empty(op.out_shape(x.shape), np.float32))


# ---- bad input -----------------------------------------------------------------------


SPOILERS = {  # label -> (array -> bad array, message after "<name>: ")
    "float64": (lambda a: a.astype(np.float64), "expected dtype float32"),
    "list": (lambda a: a.tolist(), "expected a numpy.ndarray"),
    "strided": (lambda a: np.repeat(a, 2, axis=-1)[..., ::2], "expected a C-contiguous"),
    "shape": (lambda a: np.zeros((*a.shape[:-1], a.shape[-1] + 2), a.dtype), "expected shape"),
}


def call_arrays(op, rng):
    """The forward's and the backward's arrays as (function, {name: array}) pairs."""
    x, dout = inputs(op, rng, np.float32)
    y = np.empty(op.out_shape(x.shape), np.float32)
    op.forward(activations, y, x)
    saved = {"y": y} if op.saves_output else {"x": x}
    return [
        (getattr(activations, f"{op.name}_forward"), {"out": y, "x": x}),
        (
            getattr(activations, f"{op.name}_backward"),
            {"dx": np.empty_like(x), "dout": dout, **saved},
        ),
    ]


@pytest.mark.parametrize("op", OPS, ids=str)
@pytest.mark.parametrize("spoiler", SPOILERS)
def test_bad_arrays_raise_value_error_naming_the_argument(rng, op, spoiler):
    spoil, message = SPOILERS[spoiler]
    for function, arrays in call_arrays(op, rng):
        for name in arrays:
            if spoiler == "shape" and name in ("x", "y"):
                continue  # the reference shape: a mismatch is reported on the others
            bad = dict(arrays, **{name: spoil(arrays[name])})
            with pytest.raises(ValueError, match=f"^{name}: {message}"):
                function(*bad.values(), **op.options)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_none_for_a_required_array_is_rejected(rng, op):
    for function, arrays in call_arrays(op, rng):
        for name in arrays:
            bad = dict(arrays, **{name: None})
            with pytest.raises(
                ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"
            ):
                function(*bad.values(), **op.options)


@pytest.mark.parametrize("op", OPS, ids=str)
def test_an_output_aliasing_an_input_is_rejected(rng, op):
    x, dout = inputs(op, rng, np.float32)
    if op.half_width:
        with pytest.raises(ValueError, match="dx"):
            activations.swiglu_backward(x, dout, x)
        return
    with pytest.raises(ValueError, match="out"):
        op.forward(activations, x, x)
    with pytest.raises(ValueError, match="dx"):
        op.backward(activations, dout, dout, x, x)


def test_a_read_only_output_is_rejected(rng):
    x = rng.standard_normal(4).astype(np.float32)
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable"):
        activations.relu_forward(out, x)


def test_read_only_inputs_are_accepted(rng):
    x = rng.standard_normal(4).astype(np.float32)
    x.flags.writeable = False
    out = np.empty_like(x)
    activations.gelu_forward(out, x)


def test_unknown_gelu_approximation_and_odd_swiglu_width_are_rejected(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh', got 'erf'"):
        activations.gelu_forward(np.empty_like(x), x, approximate="erf")
    with pytest.raises(ValueError, match="x: expected shape \\(N, 2H\\)"):
        activations.swiglu_forward(np.empty((2, 1), np.float32), x)


def test_residual_rejects_mismatched_shapes_and_aliasing(rng):
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="b"):
        activations.residual_forward(np.empty_like(a), a, b[:, :2].copy())
    with pytest.raises(ValueError, match="out"):
        activations.residual_forward(a, a, b)
    with pytest.raises(ValueError, match="da"):
        activations.residual_backward(a, a, b)
