"""bfloat16 on the wire: float32 rounded to its top 16 bits, round-to-nearest-even.

A bfloat16 is a float32 with the low 16 mantissa bits dropped (same sign, same 8-bit
exponent, 7 mantissa bits), so widening is exact (a shift) and rounding is integer
arithmetic on the float32's bits: add 0x7FFF plus the lowest kept bit, then drop 16
bits. Ties go to the even neighbour; a finite value past the largest bfloat16 (by half
an ulp or more) becomes an infinity, as IEEE 754 rounding to nearest does; infinities
stay; a NaN stays a NaN (made quiet, sign kept; the integer trick alone could carry a
NaN's mantissa into the sign bit). No floating-point operation is involved, so the bits
are the same on every machine and every run.

The ring (actors._collectives) sends a float32 sum's partial sums this way when asked
(``wire="bf16"``) and adds in float32; ``actors._bf16_ref`` is the plain reference twin
(nearest neighbour by exact distance), the tests hold the two together and against
PyTorch's ``torch.bfloat16``.

Two implementations of the same integer arithmetic, the same bits: the compiled kernels
of ``cykernels.bf16`` (one pass over memory per call; the ring converts every chunk it
sends and receives, and on a loaded two-core host the CPU it spends there is link time
lost) when the package is built, else the numpy passes below (``BACKEND`` says which).
actors imports no other kernel and runs without any: cykernels imports only numpy.
"""

from __future__ import annotations

import importlib

import numpy as np

__all__ = ["bf16_round", "bf16_widen"]  # (bf16_add, bf16_add_round: the ring's, not public)

_F32 = np.dtype("<f4")
_U16 = np.dtype("<u2")
# Elements per pass: the integer temporaries of a block stay in cache (a whole 16 MiB
# array at once runs at memory speed, several passes over it).
_BLOCK = 1 << 16


def _load_kernel():
    try:
        return importlib.import_module("cykernels.bf16"), "cython"
    except ImportError:  # a source tree without the build: the numpy passes
        return None, "numpy"


_kernel, BACKEND = _load_kernel()


def bf16_round(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out[i] = the bfloat16 bits (uint16) nearest float32 x[i], ties to even."""
    if x.dtype != _F32:
        raise TypeError(f"bf16_round takes float32, got {x.dtype}")
    x = x.reshape(-1)
    if out is None:
        out = np.empty(x.size, _U16)
    elif out.dtype != _U16 or out.shape != (x.size,):
        raise ValueError(f"out must be uint16 of shape ({x.size},), got {out.dtype} {out.shape}")
    if _kernel is not None and out.flags.c_contiguous:
        return _kernel.bf16_round(x, out)
    t = np.empty(min(x.size, _BLOCK), np.uint32)
    for a in range(0, x.size, _BLOCK):
        bits = x[a : a + _BLOCK].view(np.uint32)
        tb = t[: bits.size]
        np.right_shift(bits, 16, out=tb)
        tb &= 1
        tb += 0x7FFF
        tb += bits  # wraps around only for NaNs with a large mantissa: fixed below
        tb >>= 16
        np.copyto(out[a : a + _BLOCK], tb, casting="unsafe")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = (x.view(np.uint32)[nan] >> 16).astype(_U16) | 0x0040
    return out


def bf16_widen(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out[i] = bfloat16 bits h[i] as the float32 they stand for (exact)."""
    if h.dtype != _U16:
        raise TypeError(f"bf16_widen takes uint16 bfloat16 bits, got {h.dtype}")
    h = h.reshape(-1)
    if out is None:
        out = np.empty(h.size, _F32)
    elif out.dtype != _F32 or out.size != h.size:
        raise ValueError(f"out must be float32 of {h.size} elements, got {out.dtype} {out.size}")
    if _kernel is not None and out.flags.c_contiguous:
        _kernel.bf16_widen(h, out.reshape(-1))
        return out
    wide = out.reshape(-1).view(np.uint32)
    np.left_shift(h, 16, out=wide, dtype=np.uint32)
    return out


def bf16_add(target: np.ndarray, h: np.ndarray) -> np.ndarray:
    """target[i] += bfloat16 bits h[i] widened, in float32 (in place; returns target)."""
    if target.dtype != _F32 or h.dtype != _U16 or target.size != h.size:
        raise TypeError(
            f"bf16_add takes float32 target and uint16 bits of one size, got "
            f"{target.dtype} ({target.size}) and {h.dtype} ({h.size})"
        )
    flat, h = target.reshape(-1), h.reshape(-1)
    if _kernel is not None and target.flags.c_contiguous:
        _kernel.bf16_add(flat, h)
        return target
    wide = np.empty(min(flat.size, _BLOCK), _F32)
    for a in range(0, flat.size, _BLOCK):
        part = flat[a : a + _BLOCK]
        w = bf16_widen(h[a : a + _BLOCK], wide[: part.size])
        np.add(part, w, out=part)
    return target


def bf16_add_round(target: np.ndarray, h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out[i] = the bfloat16 bits nearest target[i] + widened h[i]; target[i] becomes
    their value (in place). The ring's last adding hop: the sum, its wire bits and the
    float32 every rank will hold. Returns out."""
    if target.dtype != _F32 or h.dtype != _U16 or target.size != h.size:
        raise TypeError(
            f"bf16_add_round takes float32 target and uint16 bits of one size, got "
            f"{target.dtype} ({target.size}) and {h.dtype} ({h.size})"
        )
    flat, h = target.reshape(-1), h.reshape(-1)
    if out is None:
        out = np.empty(flat.size, _U16)
    elif out.dtype != _U16 or out.shape != (flat.size,):
        raise ValueError(f"out must be uint16 of shape ({flat.size},), got {out.dtype} {out.shape}")
    if _kernel is not None and target.flags.c_contiguous and out.flags.c_contiguous:
        return _kernel.bf16_add_round(flat, h, out)
    bf16_add(flat, h)
    bf16_round(flat, out=out)
    bf16_widen(out, out=flat)
    return out
