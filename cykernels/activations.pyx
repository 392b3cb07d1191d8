# cython: language_level=3
"""Activation functions, forward and backward side by side: relu, gelu (erf and tanh),
silu, tanh, softmax over the last axis, swiglu, and the residual add.

Elementwise ops take float32 C-contiguous arrays of any (equal) shape and walk them as
one flat run. Every output here is an activation or an activation gradient, so every
output OVERWRITES. Nothing allocates; the hot loops run without the GIL and are plain
float32 code gcc vectorises: exp, erf and tanh are polynomial versions in plain
arithmetic (cykernels/_simd.pxd, shared with norms and attention) because libm's
expf/erff/tanhf are scalar calls that stop the vectoriser (tanhf alone cost 19 ms per
million elements); softmax's row reductions run on 8-float vectors with a fixed lane
order (same bits every call, no -ffast-math). Accuracy against float64, measured on a
dense sweep of [-20, 20]: tanh, silu and gelu(tanh) within 2e-6 relative / 1.3e-6
absolute; gelu(erf) within 1.4e-6 absolute (the negative tail cancels in 1 + erf, as
torch's formula does too).

References: llm.c (gelu tanh forward/backward); the torch.nn.GELU / SiLU / Softmax docs
(the formulas matched here); Cephes expf and tanhf (the polynomials); Eigen/XLA's float
erf (the rational approximation). The numpy twin is cykernels/activations_ref.py.

Shape legend: elementwise ops take any shape; softmax takes (..., C) and normalises
each row of C; swiglu takes x (N, 2H) = [gate | up] and gives out (N, H).
"""

from cykernels._simd cimport zt_dot, zt_erff, zt_expf, zt_max, zt_sum, zt_tanhf

from cykernels._checks import check_array, check_no_alias, check_same_shape


# float32 constants as C float literals (a Cython literal is a double and would promote
# the arithmetic it meets)
cdef extern from *:
    """
    static const float ZT_HALF = 0.5f;
    static const float ZT_ONE = 1.0f;
    static const float ZT_INV_SQRT2 = 0.70710678118654752f;
    static const float ZT_INV_SQRT_2PI = 0.39894228040143268f;
    static const float ZT_SQRT_2_OVER_PI = 0.79788456080286536f;
    static const float ZT_GELU_C = 0.044715f;
    static const float ZT_GELU_3C = 0.134145f;
    """
    const float ZT_HALF, ZT_ONE, ZT_INV_SQRT2, ZT_INV_SQRT_2PI, ZT_SQRT_2_OVER_PI
    const float ZT_GELU_C, ZT_GELU_3C


# ---- argument checks and the elementwise wrapper -------------------------------------


def _flat(outputs, inputs, optional=False):
    """Check float32 C-contiguous arrays of one shape, outputs writable and unaliased.

    `outputs` and `inputs` are dicts name -> array; with `optional` an output may be
    None (skipped; only residual_backward's da, db), otherwise None is a ValueError.
    Shapes are checked against the last input (x, or the saved y), so a mismatch names
    the array that disagrees with it. Returns every array (None kept) reshaped to one
    flat view, outputs first.
    """
    for name, arr in outputs.items():
        if arr is not None or not optional:
            check_array(name, arr, writable=True)
    for name, arr in inputs.items():
        check_array(name, arr)
    ref_name, ref = list(inputs.items())[len(inputs) - 1]  # x (or y): the array in charge
    check_same_shape(ref_name, ref, **outputs, **inputs)
    check_no_alias(outputs, inputs)
    return [None if a is None else a.reshape(-1) for a in (*outputs.values(), *inputs.values())]


# The elementwise ops (relu, gelu, silu, tanh) share one wrapper body: check with _flat,
# then run the cdef kernel on the flat views without the GIL. The kernel is passed as a C
# function pointer; the loops themselves are the cdef functions of each section below.
ctypedef void (*ElementwiseForward)(float[::1] out, const float[::1] x) noexcept nogil
ctypedef void (*ElementwiseBackward)(float[::1] dx, const float[::1] dout,
                                     const float[::1] saved) noexcept nogil


cdef _elementwise_forward(ElementwiseForward kernel, out, x):
    """kernel(out, x) on flat views, after _flat's checks."""
    cdef float[::1] o
    cdef const float[::1] xi
    o, xi = _flat({"out": out}, {"x": x})
    with nogil:
        kernel(o, xi)


cdef _elementwise_backward(ElementwiseBackward kernel, dx, dout, saved, saved_name="x"):
    """kernel(dx, dout, saved) on flat views, after _flat's checks; `saved` is the
    forward's input x or, named "y", its output."""
    cdef float[::1] d
    cdef const float[::1] g, si
    d, g, si = _flat({"dx": dx}, {"dout": dout, saved_name: saved})
    with nogil:
        kernel(d, g, si)


def _check_approximate(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


# ---- relu ----------------------------------------------------------------------------


cdef void _relu_forward(float[::1] out, const float[::1] x) noexcept nogil:
    """out = max(x, 0)   (NaN passes through, as in torch)"""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        out[i] = 0.0 if x[i] <= 0.0 else x[i]


cdef void _relu_backward(float[::1] dx, const float[::1] dout, const float[::1] x) noexcept nogil:
    """dx = dout * [x > 0]"""
    cdef Py_ssize_t i
    cdef float g
    for i in range(x.shape[0]):
        # forward: out = max(x, 0); both loads unconditional so the select vectorises
        g = dout[i]
        dx[i] = g if x[i] > 0.0 else 0.0


def relu_forward(out, x):
    """out = max(x, 0)"""
    _elementwise_forward(_relu_forward, out, x)


def relu_backward(dx, dout, x):
    """dx = dout * [x > 0]"""
    _elementwise_backward(_relu_backward, dx, dout, x)


# ---- gelu ----------------------------------------------------------------------------


cdef void _gelu_erf_forward(float[::1] out, const float[::1] x) noexcept nogil:
    """out = 0.5 x (1 + erf(x / sqrt 2))"""
    cdef Py_ssize_t i
    cdef float v
    for i in range(x.shape[0]):
        v = x[i]
        out[i] = ZT_HALF * v * (ZT_ONE + zt_erff(v * ZT_INV_SQRT2))


cdef void _gelu_erf_backward(float[::1] dx, const float[::1] dout,
                             const float[::1] x) noexcept nogil:
    """dx = dout (Phi(x) + x phi(x))"""
    cdef Py_ssize_t i
    cdef float v, cdf, pdf
    for i in range(x.shape[0]):
        # forward: out = x Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2))
        v = x[i]
        cdf = ZT_HALF * (ZT_ONE + zt_erff(v * ZT_INV_SQRT2))
        pdf = ZT_INV_SQRT_2PI * zt_expf(-ZT_HALF * v * v)
        dx[i] = dout[i] * (cdf + v * pdf)


cdef void _gelu_tanh_forward(float[::1] out, const float[::1] x) noexcept nogil:
    """out = 0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)"""
    cdef Py_ssize_t i
    cdef float v, u
    for i in range(x.shape[0]):
        v = x[i]
        u = ZT_SQRT_2_OVER_PI * (v + ZT_GELU_C * v * v * v)
        out[i] = v / (ZT_ONE + zt_expf(-(u + u)))


cdef void _gelu_tanh_backward(float[::1] dx, const float[::1] dout,
                              const float[::1] x) noexcept nogil:
    """dx = dout (s + 2 x s (1 - s) du/dx), s = sigmoid(2u) = 0.5 (1 + tanh u)"""
    cdef Py_ssize_t i
    cdef float v, u, s, du
    for i in range(x.shape[0]):
        # forward: out = 0.5 x (1 + tanh u); 0.5 (1 - tanh^2 u) = 2 s (1 - s)
        v = x[i]
        u = ZT_SQRT_2_OVER_PI * (v + ZT_GELU_C * v * v * v)
        du = ZT_SQRT_2_OVER_PI * (ZT_ONE + ZT_GELU_3C * v * v)
        s = ZT_ONE / (ZT_ONE + zt_expf(-(u + u)))
        dx[i] = dout[i] * (s + (v + v) * s * (ZT_ONE - s) * du)


def gelu_forward(out, x, approximate="none"):
    """out = x Phi(x); approximate="tanh": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    if _check_approximate(approximate):
        _elementwise_forward(_gelu_tanh_forward, out, x)
    else:
        _elementwise_forward(_gelu_erf_forward, out, x)


def gelu_backward(dx, dout, x, approximate="none"):
    """dx = dout * gelu'(x), with the same `approximate` as the forward"""
    if _check_approximate(approximate):
        _elementwise_backward(_gelu_tanh_backward, dx, dout, x)
    else:
        _elementwise_backward(_gelu_erf_backward, dx, dout, x)


# ---- silu ----------------------------------------------------------------------------


cdef void _silu_forward(float[::1] out, const float[::1] x) noexcept nogil:
    """out = x sigmoid(x) = x / (1 + exp(-x))"""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        out[i] = x[i] / (ZT_ONE + zt_expf(-x[i]))


cdef void _silu_backward(float[::1] dx, const float[::1] dout, const float[::1] x) noexcept nogil:
    """dx = dout s (1 + x (1 - s)), s = sigmoid(x)"""
    cdef Py_ssize_t i
    cdef float s
    for i in range(x.shape[0]):
        # forward: out = x s, ds/dx = s (1 - s)
        s = ZT_ONE / (ZT_ONE + zt_expf(-x[i]))
        dx[i] = dout[i] * s * (ZT_ONE + x[i] * (ZT_ONE - s))


def silu_forward(out, x):
    """out = x * sigmoid(x)"""
    _elementwise_forward(_silu_forward, out, x)


def silu_backward(dx, dout, x):
    """dx = dout * s (1 + x (1 - s)), s = sigmoid(x)"""
    _elementwise_backward(_silu_backward, dx, dout, x)


# ---- tanh ----------------------------------------------------------------------------


cdef void _tanh_forward(float[::1] out, const float[::1] x) noexcept nogil:
    """out = tanh(x)"""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        out[i] = zt_tanhf(x[i])


cdef void _tanh_backward(float[::1] dx, const float[::1] dout, const float[::1] y) noexcept nogil:
    """dx = dout (1 - y^2)"""
    cdef Py_ssize_t i
    for i in range(y.shape[0]):
        # forward: y = tanh(x)
        dx[i] = dout[i] * (ZT_ONE - y[i] * y[i])


def tanh_forward(out, x):
    """out = tanh(x)"""
    _elementwise_forward(_tanh_forward, out, x)


def tanh_backward(dx, dout, y):
    """dx = dout * (1 - y^2), y = tanh(x) the saved forward output"""
    _elementwise_backward(_tanh_backward, dx, dout, y, "y")


# ---- softmax over the last axis ------------------------------------------------------


cdef void _softmax_forward(float[:, ::1] out, const float[:, ::1] x) noexcept nogil:
    """out[n] = exp(x[n] - max x[n]) / sum exp(x[n] - max x[n])"""
    cdef Py_ssize_t n, c, C = x.shape[1]
    cdef float m, inv
    for n in range(x.shape[0]):
        m = zt_max(&x[n, 0], C)
        for c in range(C):
            out[n, c] = zt_expf(x[n, c] - m)
        inv = ZT_ONE / zt_sum(&out[n, 0], C)
        for c in range(C):
            out[n, c] = out[n, c] * inv


cdef void _softmax_backward(float[:, ::1] dx, const float[:, ::1] dout,
                            const float[:, ::1] y) noexcept nogil:
    """dx[n] = y[n] (dout[n] - <dout[n], y[n]>)"""
    cdef Py_ssize_t n, c, C = y.shape[1]
    cdef float d
    for n in range(y.shape[0]):
        # forward: y = exp(x - m) / sum exp(x - m), so dy_c/dx_k = y_c ([c == k] - y_k)
        d = zt_dot(&dout[n, 0], &y[n, 0], C)
        for c in range(C):
            dx[n, c] = y[n, c] * (dout[n, c] - d)


def _rows(outputs, inputs):
    """Like _flat, but each array viewed as (rows, C) with C its last axis (C >= 1)."""
    flat = _flat(outputs, inputs)
    # (no negative indices: this module compiles with wraparound=False)
    ref_name, ref = list(inputs.items())[len(inputs) - 1]
    if ref.ndim < 1 or ref.shape[ref.ndim - 1] < 1:
        raise ValueError(f"{ref_name}: expected at least one axis of length >= 1, got {ref.shape}")
    return [None if a is None else a.reshape(-1, ref.shape[ref.ndim - 1]) for a in flat]


def softmax_forward(out, x):
    """out = exp(x - max) / sum exp(x - max) over the last axis"""
    cdef float[:, ::1] o
    cdef const float[:, ::1] xi
    o, xi = _rows({"out": out}, {"x": x})
    with nogil:
        _softmax_forward(o, xi)


def softmax_backward(dx, dout, y):
    """dx = y * (dout - sum(dout * y)) over the last axis, y the saved forward output"""
    cdef float[:, ::1] d
    cdef const float[:, ::1] g, yi
    d, g, yi = _rows({"dx": dx}, {"dout": dout, "y": y})
    with nogil:
        _softmax_backward(d, g, yi)


# ---- swiglu: x (N, 2H) = [gate | up] -> out (N, H) -----------------------------------


cdef void _swiglu_forward(float[:, ::1] out, const float[:, ::1] x) noexcept nogil:
    """out = silu(gate) up, gate = x[:, :H], up = x[:, H:]"""
    cdef Py_ssize_t n, h, H = out.shape[1]
    cdef float g
    for n in range(x.shape[0]):
        for h in range(H):
            g = x[n, h]
            out[n, h] = g / (ZT_ONE + zt_expf(-g)) * x[n, H + h]


cdef void _swiglu_backward(float[:, ::1] dx, const float[:, ::1] dout,
                           const float[:, ::1] x) noexcept nogil:
    """dgate = dout up s (1 + gate (1 - s)); dup = dout gate s, s = sigmoid(gate)"""
    cdef Py_ssize_t n, h, H = dout.shape[1]
    cdef float g, s
    for n in range(x.shape[0]):
        for h in range(H):
            # forward: out = gate s up
            g = x[n, h]
            s = ZT_ONE / (ZT_ONE + zt_expf(-g))
            dx[n, h] = dout[n, h] * x[n, H + h] * s * (ZT_ONE + g * (ZT_ONE - s))
            dx[n, H + h] = dout[n, h] * g * s


def _check_swiglu(outputs, inputs):
    """x (N, 2H) with an even last axis; out-like arrays (N, H); dx-like arrays x's shape."""
    x = inputs["x"]
    check_array("x", x, ndim=2)
    if x.shape[1] % 2:
        raise ValueError(f"x: expected shape (N, 2H) with an even last axis, got {x.shape}")
    half = (x.shape[0], x.shape[1] // 2)
    for name, arr in outputs.items():
        check_array(name, arr, ndim=2, shape=x.shape if name == "dx" else half, writable=True)
    for name, arr in inputs.items():
        if name != "x":
            check_array(name, arr, ndim=2, shape=half)
    check_no_alias(outputs, inputs)


def swiglu_forward(out, x):
    """out = silu(x[:, :H]) * x[:, H:], x (N, 2H) -> out (N, H)"""
    cdef float[:, ::1] o
    cdef const float[:, ::1] xi
    _check_swiglu({"out": out}, {"x": x})
    o, xi = out, x
    with nogil:
        _swiglu_forward(o, xi)


def swiglu_backward(dx, dout, x):
    """dx[:, :H] = dout up silu'(gate); dx[:, H:] = dout silu(gate)"""
    cdef float[:, ::1] d
    cdef const float[:, ::1] g, xi
    _check_swiglu({"dx": dx}, {"dout": dout, "x": x})
    d, g, xi = dx, dout, x
    with nogil:
        _swiglu_backward(d, g, xi)


# ---- residual ------------------------------------------------------------------------


cdef void _residual_forward(float[::1] out, const float[::1] a, const float[::1] b) noexcept nogil:
    """out = a + b"""
    cdef Py_ssize_t i
    for i in range(a.shape[0]):
        out[i] = a[i] + b[i]


cdef void _copy(float[::1] dst, const float[::1] src) noexcept nogil:
    """dst = src"""
    cdef Py_ssize_t i
    for i in range(src.shape[0]):
        dst[i] = src[i]


def residual_forward(out, a, b):
    """out = a + b"""
    cdef float[::1] o
    cdef const float[::1] ai, bi
    o, ai, bi = _flat({"out": out}, {"a": a, "b": b})
    with nogil:
        _residual_forward(o, ai, bi)


def residual_backward(da, db, dout):
    """da = dout; db = dout (both overwrite; either may be None)"""
    cdef float[::1] dst
    cdef const float[::1] g
    da, db, g = _flat({"da": da, "db": db}, {"dout": dout}, optional=True)
    # forward: out = a + b
    for target in (da, db):
        if target is not None:
            dst = target
            with nogil:
                _copy(dst, g)
