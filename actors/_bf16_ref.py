"""Plain reference twin of actors._bf16 and of the ring's bf16-wire sum.

`bf16_round` here says what rounding to nearest even *means*: of the two bfloat16
values around x (x with its low 16 bits cleared, and the next one away from zero), take
the one nearer by exact distance (float64 holds both distances exactly), the even one
on a tie; the bfloat16 past the largest finite one stands for 2**128, so a value at or
beyond half an ulp above the largest rounds to infinity. NaNs become quiet NaNs.

`ring_sum_bf16` is what a ring of N ranks computes for a float32 sum with ``wire="bf16"``
(actors._collectives, module doc): segment s is folded from rank s+1 around to rank s,
each partial sum rounded to bfloat16 before it travels and the rank's own float32 values
added to it in float32; the finished segment is rounded too, so every rank (the owner
and those it is gathered to) holds the same bits.
"""

from __future__ import annotations

import numpy as np

from ._collectives import shard_bounds

# No __all__: a reference for the tests, not part of actors' public face.


def _magnitude(h: np.ndarray) -> np.ndarray:
    """float64 value of non-negative bfloat16 bits h (0x7F80 stands for 2**128)."""
    h = h.astype(np.int64)
    exponent, mantissa = h >> 7, h & 0x7F
    normal = np.ldexp((128 + mantissa).astype(np.float64), (exponent - 134).astype(np.int32))
    subnormal = np.ldexp(mantissa.astype(np.float64), -133)
    return np.where(exponent > 0, normal, subnormal)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits nearest each float32 of x, ties to even."""
    x = np.asarray(x, np.float32).reshape(-1)
    bits = x.view(np.uint32)
    sign = (bits >> 16).astype(np.uint16) & 0x8000
    low = ((bits >> 16) & 0x7FFF).astype(np.uint16)  # the magnitude, truncated
    high = low + 1  # the next bfloat16 away from zero (0x7F80: 2**128)
    with np.errstate(invalid="ignore"):  # NaNs: set apart below
        value = np.abs(x.astype(np.float64))
        below = value - _magnitude(low)
        above = _magnitude(high) - value
        up = (above < below) | ((above == below) & (low % 2 == 1))
    out = sign | np.where(up, high, low).astype(np.uint16)
    inf = np.isinf(x)
    out[inf] = (bits[inf] >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040
    return out


def bf16_widen(h: np.ndarray) -> np.ndarray:
    """float32 values of uint16 bfloat16 bits."""
    return (np.asarray(h, np.uint16).astype(np.uint32) << 16).view(np.float32)


def ring_sum_bf16(values: list[np.ndarray]) -> np.ndarray:
    """The float32 sum of `values` (one per rank) as a ring with the bf16 wire gives it
    to every rank; one rank (nothing on a wire) returns its values as they are."""
    world = len(values)
    flat = [np.asarray(v, np.float32).reshape(-1) for v in values]
    if world == 1:
        return flat[0].copy()
    total = np.empty_like(flat[0])
    for seg in range(world):
        lo, hi = shard_bounds(total.size, world, seg)
        partial = bf16_round(flat[(seg + 1) % world][lo:hi])
        for j in range(2, world + 1):
            partial = bf16_round(flat[(seg + j) % world][lo:hi] + bf16_widen(partial))
        total[lo:hi] = bf16_widen(partial)
    return total
