# cython: language_level=3
"""bfloat16 conversions for the ring's bf16 wire (actors._bf16), one pass over memory each.

A bfloat16 is the top 16 bits of a float32. Rounding to nearest even is integer
arithmetic on the float32's bits: add 0x7FFF plus the lowest kept bit, drop 16 bits
(ties go to the even neighbour; a finite value half an ulp or more past the largest
bfloat16 carries into the exponent and becomes an infinity; infinities stay). A NaN
keeps its sign and top payload bits and is made quiet (0x0040), so the carry cannot run
into the sign bit. Widening is exact: a 16-bit shift. No floating-point operation takes
part in a conversion, so the bits are the same on every machine; the one float add
(bf16_add, bf16_add_round) is an IEEE float32 add, as numpy's.

actors._bf16 calls these when the package is built and falls back to its numpy passes
otherwise; actors._bf16_ref is the plain twin (nearest neighbour by exact distance), and
tests/cykernels/test_bf16.py holds the three together bit for bit, NaNs, infinities and
subnormals included.

Shape legend: N = elements (flat, C-contiguous); x, target float32[N]; h, bits uint16[N].
"""

import numpy as np

from cykernels._checks import check_array, check_no_alias

from libc.stdint cimport uint16_t, uint32_t


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* float32 <-> its bits (memcpy: no aliasing questions, vectorises to nothing) */
    static inline uint32_t zt_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float zt_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

    /* the bfloat16 nearest float32 bits u, ties to even; NaN: quiet, sign kept */
    static inline uint16_t zt_bf16_round(uint32_t u) {
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        uint32_t nan = (u >> 16) | 0x0040u;
        return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
    }
    """
    uint32_t zt_f2u(float f) nogil
    float zt_u2f(uint32_t u) nogil
    uint16_t zt_bf16_round(uint32_t u) nogil


cdef void _round(uint16_t[::1] out, const float[::1] x) noexcept nogil:
    """out[i] = bfloat16 bits nearest x[i], ties to even"""
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        out[i] = zt_bf16_round(zt_f2u(x[i]))


cdef void _widen(float[::1] out, const uint16_t[::1] h) noexcept nogil:
    """out[i] = the float32 bfloat16 bits h[i] stand for (exact)"""
    cdef Py_ssize_t i
    for i in range(h.shape[0]):
        out[i] = zt_u2f(<uint32_t>h[i] << 16)


cdef void _add(float[::1] target, const uint16_t[::1] h) noexcept nogil:
    """target[i] += widen(h[i]), in float32"""
    cdef Py_ssize_t i
    for i in range(h.shape[0]):
        target[i] = target[i] + zt_u2f(<uint32_t>h[i] << 16)


cdef void _add_round(uint16_t[::1] bits, float[::1] target, const uint16_t[::1] h) noexcept nogil:
    """bits[i] = round(target[i] + widen(h[i])); target[i] = widen(bits[i])"""
    cdef Py_ssize_t i
    cdef uint16_t r
    for i in range(h.shape[0]):
        r = zt_bf16_round(zt_f2u(target[i] + zt_u2f(<uint32_t>h[i] << 16)))
        bits[i] = r
        target[i] = zt_u2f(<uint32_t>r << 16)


def _flat(name, arr, dtype, writable=False):
    check_array(name, arr, dtype=dtype, writable=writable)
    return arr.reshape(-1)


def _same_size(name, arr, n):
    if arr.size != n:
        raise ValueError(f"{name}: expected {n} elements, got {arr.size}")


def bf16_round(x, out):
    """out = the bfloat16 bits (uint16) nearest float32 x, ties to even; returns out."""
    cdef const float[::1] xv = _flat("x", x, np.float32)
    cdef uint16_t[::1] ov = _flat("out", out, np.uint16, writable=True)
    _same_size("out", out, x.size)
    check_no_alias({"out": out}, {"x": x})
    with nogil:
        _round(ov, xv)
    return out


def bf16_widen(h, out):
    """out = the float32 values of bfloat16 bits h (exact); returns out."""
    cdef const uint16_t[::1] hv = _flat("h", h, np.uint16)
    cdef float[::1] ov = _flat("out", out, np.float32, writable=True)
    _same_size("out", out, h.size)
    check_no_alias({"out": out}, {"h": h})
    with nogil:
        _widen(ov, hv)
    return out


def bf16_add(target, h):
    """target += the float32 values of bfloat16 bits h, in float32; returns target."""
    cdef float[::1] tv = _flat("target", target, np.float32, writable=True)
    cdef const uint16_t[::1] hv = _flat("h", h, np.uint16)
    _same_size("h", h, target.size)
    check_no_alias({"target": target}, {"h": h})
    with nogil:
        _add(tv, hv)
    return target


def bf16_add_round(target, h, bits):
    """bits = round(target + widen(h)) to bfloat16; target = widen(bits); returns bits.

    The last adding hop of a ring segment in one pass: the sum, its wire bits, and the
    value every rank will hold.
    """
    cdef float[::1] tv = _flat("target", target, np.float32, writable=True)
    cdef const uint16_t[::1] hv = _flat("h", h, np.uint16)
    cdef uint16_t[::1] bv = _flat("bits", bits, np.uint16, writable=True)
    _same_size("h", h, target.size)
    _same_size("bits", bits, target.size)
    check_no_alias({"target": target, "bits": bits}, {"h": h})
    with nogil:
        _add_round(bv, tv, hv)
    return bits
