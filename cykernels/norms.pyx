# cython: language_level=3
"""Row normalisations, forward and backward side by side: LayerNorm and RMSNorm.

Each row of x is normalised over its C channels, then scaled (and shifted) per channel.
The forward saves the per-row statistics (mean, rstd) the backward needs, so the
backward reads x once more instead of recomputing a square root per row.
Parameter gradients (dweight, dbias) ACCUMULATE (+=, so tied weights work); dx
OVERWRITES and may be None to skip it. Nothing allocates; the hot loops run without
the GIL; row sums use 8 interleaved partial sums combined in a fixed tree, so the bits
are the same on every call and gcc still vectorises them.

References: llm.c layernorm_forward / layernorm_backward (the backward's three-term form);
torch.nn.LayerNorm (biased variance, eps inside the square root); torch.nn.RMSNorm and
torch.nn.functional.rms_norm (y = x / sqrt(mean(x^2) + eps) * weight; here eps is always
explicit). The numpy twin is cykernels/norms_ref.py.

Shape legend: N rows (B*T), C channels.
  x, out, dout, dx   (N, C)      weight, bias, dweight, dbias   (C,)
  mean, rstd         (N,)        saved by the forward for the backward
"""

from libc.math cimport sqrtf

from cykernels._checks import check_array, check_no_alias


# ---- argument checks -----------------------------------------------------------------


def _check(outputs, inputs, n, c):
    """Check float32 C-contiguous arrays against the shape legend (by argument name);
    None entries are skipped; outputs must be writable and unaliased."""
    for name, arr in outputs.items():
        if arr is not None:
            check_array(name, arr, shape=_shape(name, n, c), writable=True)
    for name, arr in inputs.items():
        if arr is not None:
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
    cdef float m, d, v, r, inv_c = 1.0 / C
    cdef float s[8]
    cdef int j
    for n in range(x.shape[0]):
        for j in range(8):
            s[j] = 0.0
        c = 0
        while c + 8 <= C:
            for j in range(8):
                s[j] += x[n, c + j]
            c += 8
        m = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        while c < C:
            m += x[n, c]
            c += 1
        m = m * inv_c
        # two-pass variance: sum (x - m)^2, exact for rows with a large common offset
        for j in range(8):
            s[j] = 0.0
        c = 0
        while c + 8 <= C:
            for j in range(8):
                d = x[n, c + j] - m
                s[j] += d * d
            c += 8
        v = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        while c < C:
            d = x[n, c] - m
            v += d * d
            c += 1
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
    cdef float m, r, g, xh, mean_g, mean_gx, inv_c = 1.0 / C
    cdef float s[8]
    cdef float t[8]
    cdef int j
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
        for j in range(8):
            s[j] = 0.0
            t[j] = 0.0
        c = 0
        while c + 8 <= C:
            for j in range(8):
                g = dout[n, c + j] * weight[c + j]
                s[j] += g
                t[j] += g * ((x[n, c + j] - m) * r)
            c += 8
        mean_g = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        mean_gx = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]))
        while c < C:
            g = dout[n, c] * weight[c]
            mean_g += g
            mean_gx += g * ((x[n, c] - m) * r)
            c += 1
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
    cdef float s[8]
    cdef int j
    for n in range(x.shape[0]):
        for j in range(8):
            s[j] = 0.0
        c = 0
        while c + 8 <= C:
            for j in range(8):
                s[j] += x[n, c + j] * x[n, c + j]
            c += 8
        v = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        while c < C:
            v += x[n, c] * x[n, c]
            c += 1
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
    cdef float s[8]
    cdef int j
    for n in range(x.shape[0]):
        r = rstd[n]
        # forward: out = xhat weight, xhat = x rstd
        for c in range(C):
            dweight[c] += dout[n, c] * (x[n, c] * r)
        if not has_dx:
            continue
        # forward: rstd = (mean(x^2) + eps)^(-1/2), so d rstd / dx = -rstd^3 x / C
        for j in range(8):
            s[j] = 0.0
        c = 0
        while c + 8 <= C:
            for j in range(8):
                s[j] += dout[n, c + j] * weight[c + j] * (x[n, c + j] * r)
            c += 8
        mean_gx = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))
        while c < C:
            mean_gx += dout[n, c] * weight[c] * (x[n, c] * r)
            c += 1
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
