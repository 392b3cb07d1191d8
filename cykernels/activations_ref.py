"""Plain-numpy twin of cykernels.activations: same names, same argument order.

The reference the Cython kernels are tested against, and the float64 model the
finite-difference gradient checks run on. Outputs first, then inputs, then scalars;
every output here is an activation gradient or an activation, so every output
OVERWRITES. Works for any float dtype (float32 and float64 are the ones tested).

Shape legend: elementwise ops take any shape; softmax takes (N, C) and normalises
the last axis; swiglu takes x (N, 2H) = [gate | up] and gives (N, H).
"""

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_erf_object = np.frompyfunc(math.erf, 1, 1)


def _erf(x):
    """erf elementwise at double precision (numpy has none), cast back to x's dtype."""
    return _erf_object(x).astype(x.dtype)


def _sigmoid(x):
    """1 / (1 + exp(-x)); exp overflow for very negative x gives the right limit 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


# ---- relu ----------------------------------------------------------------------------


def relu_forward(out, x):
    """out = max(x, 0)"""
    np.maximum(x, 0, out=out)


def relu_backward(dx, dout, x):
    """dx = dout * [x > 0]"""
    dx[...] = np.where(x > 0, dout, 0)


# ---- gelu ----------------------------------------------------------------------------


def gelu_forward(out, x, approximate="none"):
    """out = x * Phi(x); "tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    if approximate == "none":
        out[...] = 0.5 * x * (1.0 + _erf(x * _INV_SQRT_2))
    elif approximate == "tanh":
        out[...] = 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)))
    else:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def gelu_backward(dx, dout, x, approximate="none"):
    """dx = dout * d/dx gelu(x)"""
    if approximate == "none":
        # forward: out = 0.5 x (1 + erf(x / sqrt 2)), so d/dx = Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + _erf(x * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * np.exp(-0.5 * x * x)
        dx[...] = dout * (cdf + x * pdf)
    elif approximate == "tanh":
        # forward: out = 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + c x^3)
        t = np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
        dx[...] = dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    else:
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


# ---- silu ----------------------------------------------------------------------------


def silu_forward(out, x):
    """out = x * sigmoid(x)"""
    out[...] = x * _sigmoid(x)


def silu_backward(dx, dout, x):
    """dx = dout * s (1 + x (1 - s)), s = sigmoid(x)"""
    s = _sigmoid(x)
    dx[...] = dout * s * (1.0 + x * (1.0 - s))


# ---- tanh ----------------------------------------------------------------------------


def tanh_forward(out, x):
    """out = tanh(x)"""
    np.tanh(x, out=out)


def tanh_backward(dx, dout, y):
    """dx = dout * (1 - y^2), y = tanh(x) the saved forward output"""
    dx[...] = dout * (1.0 - y * y)


# ---- softmax (last axis of (N, C)) ---------------------------------------------------


def softmax_forward(out, x):
    """out[n] = exp(x[n] - max x[n]) / sum exp(x[n] - max x[n])"""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out[...] = e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dx, dout, y):
    """dx[n] = y[n] * (dout[n] - <dout[n], y[n]>), y the saved forward output"""
    dx[...] = y * (dout - (dout * y).sum(axis=-1, keepdims=True))


# ---- swiglu: x (N, 2H) = [gate | up] -> out (N, H) -----------------------------------


def swiglu_forward(out, x):
    """out = silu(gate) * up, gate = x[:, :H], up = x[:, H:]"""
    h = x.shape[-1] // 2
    gate, up = x[:, :h], x[:, h:]
    out[...] = gate * _sigmoid(gate) * up


def swiglu_backward(dx, dout, x):
    """dgate = dout * up * silu'(gate); dup = dout * silu(gate)"""
    h = x.shape[-1] // 2
    gate, up = x[:, :h], x[:, h:]
    s = _sigmoid(gate)
    dx[:, :h] = dout * up * s * (1.0 + gate * (1.0 - s))
    dx[:, h:] = dout * gate * s


# ---- residual ------------------------------------------------------------------------


def residual_forward(out, a, b):
    """out = a + b"""
    np.add(a, b, out=out)


def residual_backward(da, db, dout):
    """da = dout; db = dout (either may be None)"""
    if da is not None:
        da[...] = dout
    if db is not None:
        db[...] = dout
