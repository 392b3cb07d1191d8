# cython: language_level=3
"""Gradient utilities on flat float32 buffers: squared norm, global-norm clipping, scaling,
accumulation and a non-finite count — what the Optimizer actor does to a gradient shard
before the update, and what gradient hooks read.

Distributed global-norm clipping is three steps, and these kernels are the local ones:
each rank computes sq_norm(its shard), the ranks all-reduce the sum, every rank calls
clip_by_global_norm(shard, max_norm, total_norm=sqrt(sum)). The norm is not a sum of
shard norms but the root of a sum of squares, which is why sq_norm is exposed.

Determinism: sq_norm sums in float64 in a fixed order (sixteen interleaved partial
sums combined pairwise), so the same shard gives the same bits on every call. The grouping
follows element positions, so sq_norm(concat(a, b)) and sq_norm(a) + sq_norm(b) may
differ in the last bits: a pipeline that must give identical numbers in ddp and zero
modes should compute the global norm the same way (per shard, shard order) in both.

References: torch.nn.utils.clip_grad_norm_ (clip_coef = max_norm / (norm + 1e-6), applied
only when below 1; error_if_nonfinite); DeepSpeed ZeRO's partitioned norm computation.

Shape legend: P = elements (any shape, C-contiguous float32; treated as flat).
"""

import numpy as np

from cykernels._checks import check_array, check_no_alias, check_same_shape

# clip_grad_norm_'s epsilon: clip_coef = max_norm / (total_norm + 1e-6).
CLIP_EPS = 1e-6


cdef double _sq_norm(const float[::1] x) noexcept nogil:
    """sum_i x_i^2 in float64, sixteen interleaved partial sums, combined pairwise"""
    # Sixteen independent sums keep four 4-wide double adds in flight (the add latency,
    # not memory, bounds a single chain); the order is fixed, so the bits are too.
    cdef Py_ssize_t i, j, n = x.shape[0], n16 = x.shape[0] - x.shape[0] % 16
    cdef double acc[16]
    cdef double xi
    for j in range(16):
        acc[j] = 0.0
    for i in range(0, n16, 16):
        for j in range(16):
            xi = x[i + j]
            acc[j] += xi * xi
    for i in range(n16, n):
        xi = x[i]
        acc[i - n16] += xi * xi
    for j in range(8):                        # pairwise: 16 -> 8 -> 4 -> 2 -> 1
        acc[j] = acc[2 * j] + acc[2 * j + 1]
    for j in range(4):
        acc[j] = acc[2 * j] + acc[2 * j + 1]
    return (acc[0] + acc[1]) + (acc[2] + acc[3])


cdef void _scale(float[::1] x, float alpha) noexcept nogil:
    """x *= alpha"""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        x[i] = x[i] * alpha


cdef void _accumulate(float[::1] dst, const float[::1] src, float alpha) noexcept nogil:
    """dst += alpha * src"""
    cdef Py_ssize_t i
    for i in range(dst.shape[0]):
        dst[i] = dst[i] + alpha * src[i]


cdef Py_ssize_t _count_nonfinite(const float[::1] x) noexcept nogil:
    """#{i : x_i is NaN or +-Inf}"""
    # x - x is 0 for every finite x and NaN for NaN and +-Inf; one compare that vectorises
    # (no -ffinite-math-only in setup.py, so gcc may not fold it to 0). Counted in int
    # blocks (8 lanes wide) and summed into the Py_ssize_t total per block.
    cdef Py_ssize_t i, start, stop, count = 0
    cdef int block
    cdef float xi
    for start in range(0, x.shape[0], 1 << 20):
        stop = min(start + (1 << 20), x.shape[0])
        block = 0
        for i in range(start, stop):
            xi = x[i]
            block += xi - xi != 0.0
        count += block
    return count


def _flat(name, x, writable=False):
    """Check `x` (float32, C-contiguous, any shape) and return its flat view."""
    check_array(name, x, writable=writable)
    return x.reshape(-1)


def sq_norm(x):
    """sum(x**2) as a Python float, accumulated in float64 in a fixed order."""
    cdef const float[::1] flat = _flat("x", x)
    cdef double total
    with nogil:
        total = _sq_norm(flat)
    return total


def clip_by_global_norm(grad, double max_norm, total_norm=None):
    """Scale `grad` in place so the global norm is at most max_norm; return (norm, finite).

    norm is the pre-clip global L2 norm: `total_norm` when given (the root of the
    all-reduced shard sq_norms), else computed from `grad` alone. As
    torch.nn.utils.clip_grad_norm_, grad is multiplied by max_norm / (norm + 1e-6) when
    that factor is below 1, and left alone otherwise. A non-finite norm (NaN or Inf
    anywhere) returns finite=False and leaves grad untouched: the caller skips the step
    instead of scaling every entry to NaN (torch would scale, or raise with
    error_if_nonfinite).
    """
    cdef float[::1] flat = _flat("grad", grad, writable=True)
    if max_norm < 0.0:
        raise ValueError(f"max_norm: expected >= 0, got {max_norm}")
    cdef double norm
    if total_norm is None:
        with nogil:
            norm = _sq_norm(flat) ** 0.5
    else:
        norm = total_norm
    if not np.isfinite(norm):
        return norm, False
    cdef double clip_coef = max_norm / (norm + CLIP_EPS)
    if clip_coef < 1.0:
        with nogil:
            _scale(flat, <float>clip_coef)
    return norm, True


def scale(x, double alpha):
    """x *= alpha in place (float32 multiply)."""
    cdef float[::1] flat = _flat("x", x, writable=True)
    with nogil:
        _scale(flat, <float>alpha)


def accumulate(dst, src, double alpha=1.0):
    """dst += alpha * src in place (float32; e.g. summing micro-batch gradients)."""
    check_array("dst", dst, writable=True)
    check_array("src", src)
    check_same_shape("dst", dst, src=src)
    check_no_alias({"dst": dst}, {"src": src})
    cdef float[::1] d = dst.reshape(-1)
    cdef const float[::1] s = src.reshape(-1)
    with nogil:
        _accumulate(d, s, <float>alpha)


def count_nonfinite(x):
    """Number of NaN and +-Inf entries of x (0 means the gradient is safe to apply)."""
    cdef const float[::1] flat = _flat("x", x)
    cdef Py_ssize_t count
    with nogil:
        count = _count_nonfinite(flat)
    return count
