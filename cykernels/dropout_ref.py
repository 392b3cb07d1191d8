"""Plain-numpy twin of cykernels.dropout: same names, same argument order, same bits.

The mask is counter-based: whether element i (flat C-order index) is kept is a pure
function of (seed, offset + i), so any rank or step can regenerate any slice of it with
no RNG state. The hash is splitmix64's finaliser:

    key  = mix64(seed)                          # nearby seeds -> unrelated streams
    r    = mix64(key + (offset + i) * GOLDEN)   # mod 2^64
    keep = (r >> 32) >= threshold,  threshold = floor(p * 2^32)

so P(keep) = 1 - threshold / 2^32 = 1 - p up to 2^-32. The kept values are scaled by
scale = float32(1 / (1 - p)) (rounded once, in double, then to float32), so the twin
and the kernel agree bit for bit.
"""

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def mix64(z):
    """splitmix64's finaliser on a Python int or a uint64 array (wrapping arithmetic)."""
    if isinstance(z, int):
        z &= _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_params(p, seed, offset):
    """Validate (p, seed, offset); return (threshold, key, scale) shared with the kernel."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    if not 0 <= offset < 1 << 64:
        raise ValueError(f"offset: expected an integer in [0, 2**64), got {offset!r}")
    threshold = int(p * 4294967296.0)
    scale = float(np.float32(1.0 / (1.0 - p)))
    return threshold, mix64(int(seed)), scale


def dropout_mask(mask, seed, offset, p):
    """mask[i] = 1 if element offset + i is kept under (seed, p), else 0."""
    threshold, key, _ = dropout_params(p, seed, offset)
    counter = np.arange(mask.size, dtype=np.uint64) + np.uint64(offset)
    r = mix64(counter * np.uint64(GOLDEN) + np.uint64(key))
    mask.reshape(-1)[...] = (r >> np.uint64(32)) >= np.uint64(threshold)


def dropout_forward(out, mask, x, p, seed, offset=0):
    """out = x * mask * scale, mask[i] = hash(seed, offset + i) keeps with probability 1 - p"""
    _, _, scale = dropout_params(p, seed, offset)
    dropout_mask(mask, seed, offset, p)
    out[...] = np.where(mask != 0, x * x.dtype.type(scale), x.dtype.type(0))


def dropout_backward(dx, dout, mask, p):
    """dx = dout * mask * scale"""
    _, _, scale = dropout_params(p, 0, 0)
    dx[...] = np.where(mask != 0, dout * dout.dtype.type(scale), dout.dtype.type(0))
