# cython: language_level=3
"""Row normalisations, forward and backward side by side: LayerNorm and RMSNorm.

Each row of x is normalised over its C channels, then scaled (and shifted) per channel.
The forward saves the per-row statistics (mean, rstd) the backward needs, so the
backward reads x once more instead of recomputing a square root per row.
Parameter gradients (dweight, dbias) ACCUMULATE (+=, so tied weights work); dx
OVERWRITES and may be None to skip it. Nothing allocates; the hot loops run without
the GIL; row sums run on 8-float vectors whose lanes meet in a fixed tree
(cykernels/_simd.pxd), so the bits are the same on every call and the sums still
vectorise without -ffast-math.

References: llm.c layernorm_forward / layernorm_backward (the backward's three-term form);
torch.nn.LayerNorm (biased variance, eps inside the square root); torch.nn.RMSNorm and
torch.nn.functional.rms_norm (y = x / sqrt(mean(x^2) + eps) * weight; here eps is always
explicit). The numpy twin is cykernels/norms_ref.py.

Shape legend: N rows (B*T), C channels.
  x, out, dout, dx   (N, C)      weight, bias, dweight, dbias   (C,)
  mean, rstd         (N,)        saved by the forward for the backward
"""

from libc.math cimport sqrtf

from cykernels._simd cimport zt_dot, zt_dot3_dev, zt_sum, zt_sumsq_dev

from cykernels._checks import check_array, check_no_alias


# ---- argument checks -----------------------------------------------------------------


_OPTIONAL = ("bias", "dbias", "dx")  # the arrays that may be None


def _check(outputs, inputs, n, c):
    """Check float32 C-contiguous arrays against the shape legend (by argument name);
    only the _OPTIONAL ones may be None; outputs must be writable and unaliased."""
    for name, arr in outputs.items():
        if arr is not None or name not in _OPTIONAL:
            check_array(name, arr, shape=_shape(name, n, c), writable=True)
    for name, arr in inputs.items():
        if arr is not None or name not in _OPTIONAL:
            check_array(name, arr, shape=_shape(name, n, c))
    check_no_alias(outputs, inputs)


def _shape(name, n, c):
    if name in ("x", "out", "dout", "dx"):
        return (n, c)
    if name in ("weight", "bias", "dweight", "dbias"):
        return (c,)
    return (n,)  # mean, rstd


def _rows_of(x):
    """(N, C) of x, which must be a float32 C-contiguous matrix with C >= 1."""
    check_array("x", x, ndim=2)
    if x.shape[1] < 1:
        raise ValueError(f"x: expected at least one channel, got shape {x.shape}")
    return x.shape[0], x.shape[1]


def _check_eps(eps):
    if not eps >= 0.0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


# ---- layernorm -----------------------------------------------------------------------


cdef void _layernorm_forward(float[:, ::1] out, float[::1] mean, float[::1] rstd,
                             const float[:, ::1] x, const float[::1] weight,
                             const float[::1] bias, bint has_bias, float eps) noexcept nogil:
    """out = (x - mean) rstd weight + bias, rstd = 1 / sqrt(var + eps), var biased"""
    cdef Py_ssize_t n, c, C = x.shape[1]
    cdef float m, v, r, inv_c = 1.0 / C
    for n in range(x.shape[0]):
        m = zt_sum(&x[n, 0], C) * inv_c
        # two-pass variance: sum (x - m)^2, exact for rows with a large common offset
        v = zt_sumsq_dev(&x[n, 0], m, C)
        r = 1.0 / sqrtf(v * inv_c + eps)
        mean[n] = m
        rstd[n] = r
        if has_bias:
            for c in range(C):
                out[n, c] = (x[n, c] - m) * r * weight[c] + bias[c]
        else:
            for c in range(C):
                out[n, c] = (x[n, c] - m) * r * weight[c]


cdef void _layernorm_backward(float[:, ::1] dx, float[::1] dweight, float[::1] dbias,
                              const float[:, ::1] dout, const float[:, ::1] x,
                              const float[::1] weight, const float[::1] mean,
                              const float[::1] rstd, bint has_dx, bint has_dbias) noexcept nogil:
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout weight; dweight += sum dout xhat"""
    cdef Py_ssize_t n, c, C = x.shape[1]
    cdef float m, r, xh, mean_g, mean_gx, inv_c = 1.0 / C
    for n in range(x.shape[0]):
        m = mean[n]
        r = rstd[n]
        # forward: out = xhat weight + bias, xhat = (x - mean) rstd
        if has_dbias:
            for c in range(C):
                dbias[c] += dout[n, c]
        for c in range(C):
            dweight[c] += dout[n, c] * ((x[n, c] - m) * r)
        if not has_dx:
            continue
        # forward: xhat = (x - mean(x)) / sqrt(var(x) + eps), through mean and var too
        mean_g = zt_dot(&dout[n, 0], &weight[0], C)
        mean_gx = zt_dot3_dev(&dout[n, 0], &weight[0], &x[n, 0], m, C) * r
        mean_g = mean_g * inv_c
        mean_gx = mean_gx * inv_c
        for c in range(C):
            xh = (x[n, c] - m) * r
            dx[n, c] = r * (dout[n, c] * weight[c] - mean_g - xh * mean_gx)


def layernorm_forward(out, mean, rstd, x, weight, bias, eps=1e-5):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over each row (bias may be None)"""
    n, c = _rows_of(x)
    _check_eps(eps)
    _check({"out": out, "mean": mean, "rstd": rstd}, {"x": x, "weight": weight, "bias": bias},
           n, c)
    cdef float[:, ::1] o = out
    cdef float[::1] mu = mean, rs = rstd
    cdef const float[:, ::1] xi = x
    cdef const float[::1] w = weight, b = bias
    cdef bint has_bias = bias is not None
    cdef float e = eps
    with nogil:
        _layernorm_forward(o, mu, rs, xi, w, b, has_bias, e)


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dout weight;
    dweight += sum_n dout xhat; dbias += sum_n dout   (dx, dbias may be None)"""
    n, c = _rows_of(x)
    _check({"dx": dx, "dweight": dweight, "dbias": dbias},
           {"dout": dout, "x": x, "weight": weight, "mean": mean, "rstd": rstd}, n, c)
    cdef float[:, ::1] d = dx
    cdef float[::1] dw = dweight, db = dbias
    cdef const float[:, ::1] g = dout, xi = x
    cdef const float[::1] w = weight, mu = mean, rs = rstd
    cdef bint has_dx = dx is not None, has_dbias = dbias is not None
    with nogil:
        _layernorm_backward(d, dw, db, g, xi, w, mu, rs, has_dx, has_dbias)


# ---- rmsnorm -------------------------------------------------------------------------


cdef void _rmsnorm_forward(float[:, ::1] out, float[::1] rstd, const float[:, ::1] x,
                           const float[::1] weight, float eps) noexcept nogil:
    """out = x rstd weight, rstd = 1 / sqrt(mean(x^2) + eps)"""
    cdef Py_ssize_t n, c, C = x.shape[1]
    cdef float v, r, inv_c = 1.0 / C
    for n in range(x.shape[0]):
        v = zt_dot(&x[n, 0], &x[n, 0], C)
        r = 1.0 / sqrtf(v * inv_c + eps)
        rstd[n] = r
        for c in range(C):
            out[n, c] = x[n, c] * r * weight[c]


cdef void _rmsnorm_backward(float[:, ::1] dx, float[::1] dweight, const float[:, ::1] dout,
                            const float[:, ::1] x, const float[::1] weight,
                            const float[::1] rstd, bint has_dx) noexcept nogil:
    """dx = rstd (g - xhat mean(g xhat)), g = dout weight, xhat = x rstd; dweight += sum dout xhat"""
    cdef Py_ssize_t n, c, C = x.shape[1]
    cdef float r, mean_gx, inv_c = 1.0 / C
    for n in range(x.shape[0]):
        r = rstd[n]
        # forward: out = xhat weight, xhat = x rstd
        for c in range(C):
            dweight[c] += dout[n, c] * (x[n, c] * r)
        if not has_dx:
            continue
        # forward: rstd = (mean(x^2) + eps)^(-1/2), so d rstd / dx = -rstd^3 x / C
        mean_gx = zt_dot3_dev(&dout[n, 0], &weight[0], &x[n, 0], 0.0, C) * r
        mean_gx = mean_gx * inv_c
        for c in range(C):
            dx[n, c] = r * (dout[n, c] * weight[c] - (x[n, c] * r) * mean_gx)


def rmsnorm_forward(out, rstd, x, weight, eps=1e-6):
    """out = x / sqrt(mean(x^2) + eps) * weight over each row (torch.nn.RMSNorm, explicit eps)"""
    n, c = _rows_of(x)
    _check_eps(eps)
    _check({"out": out, "rstd": rstd}, {"x": x, "weight": weight}, n, c)
    cdef float[:, ::1] o = out
    cdef float[::1] rs = rstd
    cdef const float[:, ::1] xi = x
    cdef const float[::1] w = weight
    cdef float e = eps
    with nogil:
        _rmsnorm_forward(o, rs, xi, w, e)


def rmsnorm_backward(dx, dweight, dout, x, weight, rstd):
    """dx = rstd (g - xhat mean(g xhat)), g = dout weight, xhat = x rstd;
    dweight += sum_n dout xhat   (dx may be None)"""
    n, c = _rows_of(x)
    _check({"dx": dx, "dweight": dweight}, {"dout": dout, "x": x, "weight": weight, "rstd": rstd},
           n, c)
    cdef float[:, ::1] d = dx
    cdef float[::1] dw = dweight
    cdef const float[:, ::1] g = dout, xi = x
    cdef const float[::1] w = weight, rs = rstd
    cdef bint has_dx = dx is not None
    with nogil:
        _rmsnorm_backward(d, dw, g, xi, w, rs, has_dx)
