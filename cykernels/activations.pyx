# cython: language_level=3
"""Activation functions, forward and backward side by side: relu, gelu (erf and tanh),
silu, tanh, softmax over the last axis, swiglu, and the residual add.

Elementwise ops take float32 C-contiguous arrays of any (equal) shape and walk them as
one flat run. Every output here is an activation or an activation gradient, so every
output OVERWRITES. Nothing allocates; the hot loops run without the GIL and are plain
float32 code gcc vectorises: exp, erf and tanh are polynomial versions in plain
arithmetic (below) because libm's expf/erff/tanhf are scalar calls that stop the
vectoriser (tanhf alone cost 19 ms per million elements); softmax's row reductions run
on 8-float vectors with a fixed lane order (same bits every call, no -ffast-math).
Accuracy against float64, measured on a dense sweep of [-20, 20]: tanh, silu and
gelu(tanh) within 2e-6 relative / 1.3e-6 absolute; gelu(erf) within 1.4e-6 absolute
(the negative tail cancels in 1 + erf, as torch's formula does too).

References: llm.c (gelu tanh forward/backward); the torch.nn.GELU / SiLU / Softmax docs
(the formulas matched here); Cephes expf and tanhf (the polynomials); Eigen/XLA's float
erf (the rational approximation). The numpy twin is cykernels/activations_ref.py.

Shape legend: elementwise ops take any shape; softmax takes (..., C) and normalises
each row of C; swiglu takes x (N, 2H) = [gate | up] and gives out (N, H).
"""

from cykernels._checks import check_array, check_no_alias, check_same_shape


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>

    static const float ZT_HALF = 0.5f;
    static const float ZT_ONE = 1.0f;
    static const float ZT_INV_SQRT2 = 0.70710678118654752f;
    static const float ZT_INV_SQRT_2PI = 0.39894228040143268f;
    static const float ZT_SQRT_2_OVER_PI = 0.79788456080286536f;
    static const float ZT_GELU_C = 0.044715f;
    static const float ZT_GELU_3C = 0.134145f;

    /* exp(x) in float32 arithmetic gcc vectorises (Cephes expf: x = n ln2 + r,
       |r| <= ln2/2, a degree-6 polynomial for exp(r), 2^n built from its bits).
       About 2 ulp over [-87, 88]; 0 below -87; +inf above 88; NaN stays NaN.
       Kept in step with the copy in attention.pyx. */
    static inline float zt_expf(float x) {
        float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
        /* round to nearest integer by the 1.5 * 2^23 trick (no floorf: it is a call) */
        float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
        float r = xc - n * 0.693359375f;
        r = r - n * -2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float y = p * (r * r) + r + 1.0f;
        /* the bits of 2^n, (n + 127) << 23, formed in float arithmetic (exact: 8
           significant bits) so no integer vector op is needed (AVX1 has none 8-wide) */
        int32_t bits = (int32_t)((n + 127.0f) * 8388608.0f);
        float two_n;
        memcpy(&two_n, &bits, sizeof two_n);
        y = y * two_n;
        y = x > 88.0f ? INFINITY : y;
        return x < -87.0f ? 0.0f : y;
    }

    /* erf(x) in float32 arithmetic gcc vectorises: Eigen/XLA's rational approximation,
       odd degree-13 over even degree-8, on x clamped to [-4, 4] (erf is +-1 in float32
       beyond). Absolute error below 5e-7 (measured against math.erf). */
    static inline float zt_erff(float x) {
        float xc = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
        float x2 = xc * xc;
        float p = -2.72614225801306e-10f;
        p = p * x2 + 2.77068142495902e-08f;
        p = p * x2 + -2.10102402082508e-06f;
        p = p * x2 + -5.69250639462346e-05f;
        p = p * x2 + -7.34990630326855e-04f;
        p = p * x2 + -2.95459980854025e-03f;
        p = p * x2 + -1.60960333262415e-02f;
        p = p * xc;
        float q = -1.45660718464996e-05f;
        q = q * x2 + -2.13374055278905e-04f;
        q = q * x2 + -1.68282697438203e-03f;
        q = q * x2 + -7.37332916720468e-03f;
        q = q * x2 + -1.42647390514189e-02f;
        return p / q;
    }

    /* tanh(x) in float32 arithmetic gcc vectorises (Cephes tanhf): an odd polynomial
       for |x| < 0.625, where 1 - 2 / (e^2|x| + 1) would cancel; that form beyond. */
    static inline float zt_tanhf(float x) {
        float a = fabsf(x);
        float big = 1.0f - 2.0f / (zt_expf(a + a) + 1.0f);
        float z = x * x;
        float small = -5.70498872745e-3f;
        small = small * z + 2.06390887954e-2f;
        small = small * z + -5.37397155531e-2f;
        small = small * z + 1.33314422036e-1f;
        small = small * z + -3.33332819422e-1f;
        small = small * z * x + x;
        return a < 0.625f ? small : copysignf(big, x);
    }

    /* Row reductions on 8-float vectors (GCC/Clang vector extensions: one ymm register
       with -mavx, two xmm without). Lane j sums elements j, j+8, j+16, ..., the lanes
       meet in a fixed tree, the tail is added in order: the same bits on every call, and
       vectorised without -ffast-math (which a plain sum loop would need). */
    typedef float zt_v8 __attribute__((vector_size(32)));
    typedef int32_t zt_v8i __attribute__((vector_size(32)));
    #define ZT_LOAD8(v, p) memcpy(&(v), (p), sizeof(v))
    #define ZT_HSUM8(s) ((((s)[0] + (s)[4]) + ((s)[1] + (s)[5])) + (((s)[2] + (s)[6]) + ((s)[3] + (s)[7])))

    static inline float zt_sum(const float *x, Py_ssize_t n) {
        zt_v8 s = {0}, v;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { ZT_LOAD8(v, x + i); s += v; }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += x[i];
        return t;
    }

    static inline float zt_dot(const float *a, const float *b, Py_ssize_t n) {
        zt_v8 s = {0}, va, vb;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { ZT_LOAD8(va, a + i); ZT_LOAD8(vb, b + i); s += va * vb; }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += a[i] * b[i];
        return t;
    }

    /* max of x[0..n), n >= 1; NaN elements are skipped unless x[0] is NaN (a NaN row
       still comes out NaN from the softmax: exp(NaN - m) is NaN) */
    static inline float zt_max(const float *x, Py_ssize_t n) {
        float t = x[0];
        Py_ssize_t i = 0;
        if (n >= 8) {
            zt_v8 m, v;
            ZT_LOAD8(m, x);
            for (i = 8; i + 8 <= n; i += 8) {
                ZT_LOAD8(v, x + i);
                zt_v8i gt = v > m;
                m = (zt_v8)(((zt_v8i)v & gt) | ((zt_v8i)m & ~gt));
            }
            t = m[0];
            for (int j = 1; j < 8; j++) t = m[j] > t ? m[j] : t;
        }
        for (; i < n; i++) t = x[i] > t ? x[i] : t;
        return t;
    }
    """
    const float ZT_HALF, ZT_ONE, ZT_INV_SQRT2, ZT_INV_SQRT_2PI, ZT_SQRT_2_OVER_PI
    const float ZT_GELU_C, ZT_GELU_3C
    float zt_expf(float x) noexcept nogil
    float zt_erff(float x) noexcept nogil
    float zt_tanhf(float x) noexcept nogil
    float zt_sum(const float *x, Py_ssize_t n) noexcept nogil
    float zt_dot(const float *a, const float *b, Py_ssize_t n) noexcept nogil
    float zt_max(const float *x, Py_ssize_t n) noexcept nogil


# ---- argument checks -----------------------------------------------------------------


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
    cdef float[::1] o
    cdef const float[::1] xi
    o, xi = _flat({"out": out}, {"x": x})
    with nogil:
        _relu_forward(o, xi)


def relu_backward(dx, dout, x):
    """dx = dout * [x > 0]"""
    cdef float[::1] d
    cdef const float[::1] g, xi
    d, g, xi = _flat({"dx": dx}, {"dout": dout, "x": x})
    with nogil:
        _relu_backward(d, g, xi)


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
    cdef bint use_tanh = _check_approximate(approximate)
    cdef float[::1] o
    cdef const float[::1] xi
    o, xi = _flat({"out": out}, {"x": x})
    with nogil:
        if use_tanh:
            _gelu_tanh_forward(o, xi)
        else:
            _gelu_erf_forward(o, xi)


def gelu_backward(dx, dout, x, approximate="none"):
    """dx = dout * gelu'(x), with the same `approximate` as the forward"""
    cdef bint use_tanh = _check_approximate(approximate)
    cdef float[::1] d
    cdef const float[::1] g, xi
    d, g, xi = _flat({"dx": dx}, {"dout": dout, "x": x})
    with nogil:
        if use_tanh:
            _gelu_tanh_backward(d, g, xi)
        else:
            _gelu_erf_backward(d, g, xi)


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
    cdef float[::1] o
    cdef const float[::1] xi
    o, xi = _flat({"out": out}, {"x": x})
    with nogil:
        _silu_forward(o, xi)


def silu_backward(dx, dout, x):
    """dx = dout * s (1 + x (1 - s)), s = sigmoid(x)"""
    cdef float[::1] d
    cdef const float[::1] g, xi
    d, g, xi = _flat({"dx": dx}, {"dout": dout, "x": x})
    with nogil:
        _silu_backward(d, g, xi)


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
    cdef float[::1] o
    cdef const float[::1] xi
    o, xi = _flat({"out": out}, {"x": x})
    with nogil:
        _tanh_forward(o, xi)


def tanh_backward(dx, dout, y):
    """dx = dout * (1 - y^2), y = tanh(x) the saved forward output"""
    cdef float[::1] d
    cdef const float[::1] g, xi
    d, g, xi = _flat({"dx": dx}, {"dout": dout, "y": y})
    with nogil:
        _tanh_backward(d, g, xi)


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
