"""cykernels.bf16 (the bf16 wire's conversions): bit for bit the plain twin
(actors._bf16_ref: nearest bfloat16 by exact distance) and actors._bf16's numpy passes,
on every bit pattern class: ties, overflow to infinity, subnormals, zeros, infinities,
NaNs of both signs with small and large payloads, and random bits."""

import numpy as np
import pytest

from actors import _bf16
from actors import _bf16_ref as ref
from cykernels import bf16


def edge_floats() -> np.ndarray:
    """Every kept-bit class around a tie (low half 0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF)
    for ones, the largest finite floats, subnormals and zeros, both signs; infinities;
    NaNs quiet and signalling with small and large payloads, both signs."""
    kept = np.array([0x3F80, 0x3F81, 0x7F7F, 0x7F7E, 0x0000, 0x0001, 0x007F, 0x0080], np.uint32)
    low = np.array([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    bits = (kept[:, None] << 16 | low[None, :]).reshape(-1)
    nans = [0x7F80_0001, 0x7FBF_FFFF, 0x7FC0_0000, 0x7FFF_FFFF, 0x7FFF_8000, 0x7F80_8000]
    bits = np.concatenate([bits, np.array([0x7F80_0000, *nans], np.uint32)])
    return np.concatenate([bits, bits | 0x8000_0000]).view(np.float32)


def random_bits(n: int, seed: int = 5) -> np.ndarray:
    """Every float32 bit pattern equally likely (NaNs and subnormals included)."""
    bits = np.random.default_rng(seed).integers(0, 1 << 32, n, dtype=np.uint64)
    return bits.astype(np.uint32).view(np.float32)


FLOATS = {"edges": edge_floats(), "random bits": random_bits(300_007)}
EVERY_BF16 = np.arange(1 << 16, dtype=np.uint16)


@pytest.fixture
def numpy_passes(monkeypatch):
    """actors._bf16 as it runs without the compiled kernel."""
    monkeypatch.setattr(_bf16, "_kernel", None)
    return _bf16


@pytest.mark.parametrize("name", sorted(FLOATS))
def test_bf16_round_is_the_twins_bits_and_the_numpy_passes_bits(name, numpy_passes):
    x = FLOATS[name]
    got = bf16.bf16_round(x, np.empty(x.size, np.uint16))
    assert got.tobytes() == ref.bf16_round(x).tobytes()
    assert got.tobytes() == numpy_passes.bf16_round(x).tobytes()


def test_every_bfloat16_widens_to_the_twins_float32():
    got = bf16.bf16_widen(EVERY_BF16, np.empty(EVERY_BF16.size, np.float32))
    assert got.tobytes() == ref.bf16_widen(EVERY_BF16).tobytes()


def same_sums(got: np.ndarray, want: np.ndarray, both_nan: np.ndarray) -> bool:
    """Bit for bit, except where both addends are NaN: IEEE 754 leaves which operand's
    payload a sum keeps to the implementation (numpy's loop and gcc's pick differently);
    there a NaN is required."""
    bf16_bits = got.dtype == np.uint16
    got_bits, want_bits = (a.view(np.uint16 if bf16_bits else np.uint32) for a in (got, want))
    nan = np.isnan(ref.bf16_widen(got) if bf16_bits else got)
    return np.array_equal(got_bits[~both_nan], want_bits[~both_nan]) and nan[both_nan].all()


def addends(name: str, seed: int):
    x = FLOATS[name].copy()
    h = np.random.default_rng(seed).integers(0, 1 << 16, x.size, dtype=np.uint16)
    return x, h, np.isnan(x) & np.isnan(ref.bf16_widen(h))


@pytest.mark.parametrize("name", sorted(FLOATS))
def test_bf16_add_is_the_float32_sum_with_the_widened_bits(name, numpy_passes):
    target, h, both_nan = addends(name, 9)
    with np.errstate(invalid="ignore", over="ignore"):
        twin = target + ref.bf16_widen(h)
        slow = numpy_passes.bf16_add(target.copy(), h)
    bf16.bf16_add(target, h)
    assert same_sums(target, twin, both_nan) and same_sums(target, slow, both_nan)


@pytest.mark.parametrize("name", sorted(FLOATS))
def test_bf16_add_round_is_add_then_round_then_widen_of_the_twin(name, numpy_passes):
    target, h, both_nan = addends(name, 3)
    with np.errstate(invalid="ignore", over="ignore"):
        want_bits = ref.bf16_round(target + ref.bf16_widen(h))
        slow = target.copy()
        slow_bits = numpy_passes.bf16_add_round(slow, h)
    bits = bf16.bf16_add_round(target, h, np.empty(target.size, np.uint16))
    assert same_sums(bits, want_bits, both_nan) and same_sums(bits, slow_bits, both_nan)
    assert target.tobytes() == ref.bf16_widen(bits).tobytes()
    assert same_sums(target, slow, both_nan)


def test_actors_bf16_runs_the_kernel_where_the_package_is_built():
    # cykernels.bf16 imported above, so actors._bf16 must not be on its numpy passes
    assert _bf16.BACKEND == "cython" and _bf16._kernel is bf16


F32, U16, F64 = np.float32, np.uint16, np.float64
BAD_CALLS = {
    "x: expected dtype float32, got float64": lambda: bf16.bf16_round(
        np.zeros(4, F64), np.empty(4, U16)
    ),
    "out: expected 4 elements, got 3": lambda: bf16.bf16_round(np.zeros(4, F32), np.empty(3, U16)),
    "out: expected dtype float32, got float64": lambda: bf16.bf16_widen(
        np.zeros(4, U16), np.empty(4, F64)
    ),
    "target: expected a C-contiguous array": lambda: bf16.bf16_add(
        np.zeros(8, F32)[::2], np.zeros(4, U16)
    ),
    "bits: expected dtype uint16, got float32": lambda: bf16.bf16_add_round(
        np.zeros(4, F32), np.zeros(4, U16), np.zeros(4, F32)
    ),
}


@pytest.mark.parametrize("message", sorted(BAD_CALLS))
def test_bad_arguments_are_refused_in_one_line_naming_them(message):
    with pytest.raises(ValueError) as info:
        BAD_CALLS[message]()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_output_sharing_memory_with_its_input_is_refused():
    buf = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        bf16.bf16_round(buf, buf.view(np.uint16)[:8])
