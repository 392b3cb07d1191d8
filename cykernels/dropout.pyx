# cython: language_level=3
"""Dropout with a counter-based mask, forward and backward side by side.

Whether element i (flat C-order index) is kept is a pure function of (seed, offset + i):
no RNG state, so any rank or step can regenerate any slice of the mask, a restarted
rank reproduces the exact mask of the step it lost, and the numpy twin reproduces the
kernel bit for bit. The hash is splitmix64's finaliser (Steele, Lea & Flood 2014):

    key  = mix64(seed)                          # nearby seeds -> unrelated streams
    r    = mix64(key + (offset + i) * GOLDEN)   # mod 2^64
    keep = (r >> 32) >= threshold,  threshold = floor(p * 2^32)

so P(keep) = 1 - p to within 2^-32. Kept values are scaled by scale = float32(1/(1-p))
(rounded once in double, then to float32): out = x * mask * scale; p = 0 is the identity.
The mask is saved (uint8, 0 or 1) so the backward needs no hashing. Nothing allocates;
the loops run without the GIL.

References: torch.nn.Dropout (inverted dropout, the 1/(1-p) scale); Salmon et al. 2011,
"Parallel random numbers: as easy as 1, 2, 3" (counter-based generators); splitmix64.
The numpy twin (and the (threshold, key, scale) derivation both share) is
cykernels/dropout_ref.py.

Shape legend: any shape; x, out, dout, dx float32 and mask uint8 all of one shape.
"""

import numpy as np

from cykernels._checks import check_array, check_no_alias, check_same_shape
from cykernels.dropout_ref import dropout_params

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    """splitmix64's finaliser (wrapping uint64 arithmetic)"""
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef void _dropout_forward(float[::1] out, uint8_t[::1] mask, const float[::1] x,
                           uint32_t threshold, uint64_t key, uint64_t offset,
                           float scale) noexcept nogil:
    """mask[i] = [mix64(key + (offset + i) GOLDEN) >> 32 >= threshold]; out = x mask scale"""
    cdef Py_ssize_t i
    cdef uint64_t r
    cdef uint8_t keep
    for i in range(x.shape[0]):
        r = _mix64(key + (offset + <uint64_t>i) * <uint64_t>0x9E3779B97F4A7C15ULL)
        keep = <uint32_t>(r >> 32) >= threshold
        mask[i] = keep
        out[i] = x[i] * scale if keep else 0.0


cdef void _dropout_backward(float[::1] dx, const float[::1] dout, const uint8_t[::1] mask,
                            float scale) noexcept nogil:
    """dx = dout mask scale"""
    cdef Py_ssize_t i
    cdef float g
    for i in range(dout.shape[0]):
        # forward: out = x mask scale
        g = dout[i] * scale
        dx[i] = g if mask[i] != 0 else 0.0


def _check(out_name, out, mask, in_name, arr, mask_is_output):
    check_array(out_name, out, writable=True)
    check_array("mask", mask, dtype=np.uint8, writable=mask_is_output)
    check_array(in_name, arr)
    check_same_shape(in_name, arr, **{out_name: out, "mask": mask})
    if mask_is_output:
        check_no_alias({out_name: out, "mask": mask}, {in_name: arr})
    else:
        check_no_alias({out_name: out}, {in_name: arr, "mask": mask})


def dropout_forward(out, mask, x, p, seed, offset=0):
    """out = x * mask / (1 - p), mask[i] = keep(seed, offset + i) with P(keep) = 1 - p"""
    threshold, key, scale = dropout_params(p, seed, offset)
    _check("out", out, mask, "x", x, True)
    cdef float[::1] o = out.reshape(-1)
    cdef uint8_t[::1] m = mask.reshape(-1)
    cdef const float[::1] xi = x.reshape(-1)
    cdef uint32_t t = threshold
    cdef uint64_t k = key, off = offset
    cdef float s = scale
    with nogil:
        _dropout_forward(o, m, xi, t, k, off, s)


def dropout_backward(dx, dout, mask, p):
    """dx = dout * mask / (1 - p), mask the one the forward wrote"""
    _, _, scale = dropout_params(p, 0, 0)
    _check("dx", dx, mask, "dout", dout, False)
    cdef float[::1] d = dx.reshape(-1)
    cdef const float[::1] g = dout.reshape(-1)
    cdef const uint8_t[::1] m = mask.reshape(-1)
    cdef float s = scale
    with nogil:
        _dropout_backward(d, g, m, s)
