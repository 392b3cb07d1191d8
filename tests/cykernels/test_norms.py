"""cykernels.norms: LayerNorm and RMSNorm against the numpy twin, torch autograd and
central finite differences of the twin in float64."""

from dataclasses import dataclass

import numpy as np
import pytest

from cykernels import norms, norms_ref


@dataclass
class Norm:
    """One normalisation with or without a bias; runs a forward and a backward."""

    name: str
    bias: bool

    def __str__(self):
        return self.name + ("" if self.bias else "-no-bias")

    def params(self, rng, dtype, c):
        weight = (1 + 0.5 * rng.standard_normal(c)).astype(dtype)
        bias = rng.standard_normal(c).astype(dtype) if self.bias else None
        return [weight, bias] if self.name == "layernorm" else [weight]

    def forward(self, module, x, params, eps):
        """(out, saved statistics)"""
        n = x.shape[0]
        out = np.empty_like(x)
        stats = [np.empty(n, x.dtype) for _ in range(2 if self.name == "layernorm" else 1)]
        getattr(module, f"{self.name}_forward")(out, *stats, x, *params, eps=eps)
        return out, stats

    def backward(self, module, dx, grads, dout, x, params, stats):
        getattr(module, f"{self.name}_backward")(dx, *grads, dout, x, params[0], *stats)

    def run(self, module, x, params, dout, eps=1e-5):
        """[out, *stats, dx, *parameter grads] from one forward and one zeroed backward."""
        out, stats = self.forward(module, x, params, eps)
        dx = np.empty_like(x)
        grads = [None if p is None else np.zeros_like(p) for p in params]
        self.backward(module, dx, grads, dout, x, params, stats)
        return [out, *stats, dx, *grads]


NORMS = [Norm("layernorm", True), Norm("layernorm", False), Norm("rmsnorm", False)]


def arrays(norm, rng, dtype, offset=0.0):
    n, c = int(rng.integers(1, 9)), int(rng.integers(1, 40))
    x = (offset + 2 * rng.standard_normal((n, c))).astype(dtype)
    dout = rng.standard_normal((n, c)).astype(dtype)
    return x, norm.params(rng, dtype, c), dout


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_kernel_matches_twin_in_float32(rng, tolerance, norm):
    for offset in (0.0, 3.0, -50.0):
        x, params, dout = arrays(norm, rng, np.float32, offset)
        got, want = norm.run(norms, x, params, dout), norm.run(norms_ref, x, params, dout)
        for g, w in zip(got, want, strict=True):
            if w is not None:
                np.testing.assert_allclose(g, w, **tolerance[np.float32])


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_forward_and_gradients_match_torch_autograd(torch, rng, tolerance, norm):
    x, params, dout = arrays(norm, rng, np.float32)
    eps = 1e-5
    tx = torch.tensor(x, requires_grad=True)
    tparams = [None if p is None else torch.tensor(p, requires_grad=True) for p in params]
    F = torch.nn.functional
    if norm.name == "layernorm":
        ty = F.layer_norm(tx, (x.shape[1],), tparams[0], tparams[1], eps)
    else:
        ty = F.rms_norm(tx, (x.shape[1],), tparams[0], eps)
    ty.backward(torch.tensor(dout))
    got = norm.run(norms, x, params, dout, eps)
    out, dx, grads = got[0], got[len(got) - len(params) - 1], got[len(got) - len(params) :]
    np.testing.assert_allclose(out, ty.detach().numpy(), **tolerance[np.float32])
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tolerance[np.float32])
    for grad, tparam in zip(grads, tparams, strict=True):
        if tparam is not None:
            np.testing.assert_allclose(grad, tparam.grad.numpy(), **tolerance[np.float32])


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_twin_gradients_match_central_finite_differences_in_float64(rng, finite_differences, norm):
    x, params, projection = arrays(norm, rng, np.float64)
    got = norm.run(norms_ref, x, params, projection)
    grads = got[len(got) - len(params) - 1 :]  # dx, dweight (, dbias)

    def loss():  # a random projection of the output is the scalar loss
        return float((norm.forward(norms_ref, x, params, 1e-5)[0] * projection).sum())

    for array, grad in zip([x, *params], grads, strict=True):
        if array is not None:
            finite_differences(grad, loss, array)


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_parameter_gradients_accumulate_and_dx_overwrites(rng, tolerance, norm):
    x, params, dout = arrays(norm, rng, np.float32)
    got = norm.run(norms, x, params, dout)
    out, stats = norm.forward(norms, x, params, 1e-5)
    once = got[len(got) - len(params) - 1 :]
    dx = np.full_like(x, 7.0)
    grads = [None if p is None else np.zeros_like(p) for p in params]
    for _ in range(2):
        norm.backward(norms, dx, grads, dout, x, params, stats)
    np.testing.assert_array_equal(dx, once[0])
    for grad, single in zip(grads, once[1:], strict=True):
        if grad is not None:
            np.testing.assert_allclose(grad, 2 * single, **tolerance[np.float32])


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_dx_may_be_skipped(rng, norm):
    x, params, dout = arrays(norm, rng, np.float32)
    got = norm.run(norms, x, params, dout)
    _, stats = norm.forward(norms, x, params, 1e-5)
    grads = [None if p is None else np.zeros_like(p) for p in params]
    norm.backward(norms, None, grads, dout, x, params, stats)
    for grad, want in zip(grads, got[len(got) - len(params) :], strict=True):
        if grad is not None:
            np.testing.assert_array_equal(grad, want)


def test_layernorm_keeps_precision_for_rows_with_a_large_offset(rng):
    x = (1000 + rng.standard_normal((4, 64))).astype(np.float32)
    weight, bias = np.ones(64, np.float32), np.zeros(64, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32)
    norms.layernorm_forward(out, mean, rstd, x, weight, bias)
    want = np.empty(x.shape)
    norms_ref.layernorm_forward(want, np.empty(4), np.empty(4), x.astype(np.float64), weight, bias)
    # the reference gets the same float32 x, so only the kernel's arithmetic differs:
    # measured <= 4.3e-5; a naive float32 mean gives ~1.2e-4, a one-pass variance ~0.1
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_a_constant_row_normalises_to_the_bias_and_rmsnorm_of_zeros_is_zero():
    x = np.full((2, 8), 3.0, np.float32)
    weight, bias = np.full(8, 2.0, np.float32), np.arange(8, dtype=np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32)
    norms.layernorm_forward(out, mean, rstd, x, weight, bias)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, x.shape))
    norms.rmsnorm_forward(out, rstd, np.zeros_like(x), weight)
    np.testing.assert_array_equal(out, 0.0)


def test_repeated_calls_give_the_same_bits(rng):
    for norm in NORMS:
        x, params, dout = arrays(norm, rng, np.float32)
        first, again = norm.run(norms, x, params, dout), norm.run(norms, x, params, dout)
        for a, b in zip(first, again, strict=True):
            assert a is None or a.tobytes() == b.tobytes()


# ---- bad input -----------------------------------------------------------------------


def test_bad_arrays_raise_value_error_naming_the_argument(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    weight, bias = np.ones(5, np.float32), np.zeros(5, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32)
    good = {"out": out, "mean": mean, "rstd": rstd, "x": x, "weight": weight, "bias": bias}
    for name, bad, message in [
        ("x", x.astype(np.float64), "expected dtype float32"),
        ("x", x.T, "expected a C-contiguous"),
        ("x", x[0], "expected 2 dimensions"),
        ("weight", np.ones(4, np.float32), "expected shape \\(5,\\)"),
        ("bias", np.ones((1, 5), np.float32), "expected shape \\(5,\\)"),
        ("mean", np.empty(4, np.float32), "expected shape \\(3,\\)"),
        ("rstd", np.empty(3, np.float64), "expected dtype float32"),
        ("out", np.empty((3, 6), np.float32), "expected shape \\(3, 5\\)"),
        ("out", x, "must not share memory with x"),
        ("mean", rstd, "must not share memory with rstd"),
    ]:
        args = dict(good, **{name: bad})
        with pytest.raises(ValueError, match=f"^{name}: {message}"):
            norms.layernorm_forward(*args.values())
    with pytest.raises(ValueError, match="^eps: expected a number >= 0"):
        norms.rmsnorm_forward(out, rstd, x, weight, eps=-1.0)
    dweight = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="^dweight: expected shape \\(5,\\)"):
        norms.rmsnorm_backward(None, dweight[:4], x, x, weight, rstd)
    with pytest.raises(ValueError, match="^dx: must not share memory with dout"):
        norms.rmsnorm_backward(x, dweight, x, x.copy(), weight, rstd)


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_none_for_a_required_array_is_rejected(rng, norm):
    x, params, dout = arrays(norm, rng, np.float32)
    out, stats = norm.forward(norms, x, params, 1e-5)
    names = ["out", "mean", "rstd"] if norm.name == "layernorm" else ["out", "rstd"]
    forward = dict(zip(names, [out, *stats], strict=True), x=x, weight=params[0])
    if norm.name == "layernorm":
        forward["bias"] = params[1]
    for name in forward:
        if name == "bias":
            continue
        args = dict(forward, **{name: None})
        with pytest.raises(ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"):
            getattr(norms, f"{norm.name}_forward")(*args.values())
    grads = {"dx": np.empty_like(x), "dweight": np.zeros_like(params[0])}
    if norm.name == "layernorm":
        grads["dbias"] = np.zeros_like(params[0])
    backward = dict(
        grads, dout=dout, x=x, weight=params[0], **dict(zip(names[1:], stats, strict=True))
    )
    for name in backward:
        if name in ("dx", "dbias"):
            continue
        args = dict(backward, **{name: None})
        with pytest.raises(ValueError, match=f"^{name}: expected a numpy.ndarray, got NoneType"):
            getattr(norms, f"{norm.name}_backward")(*args.values())
