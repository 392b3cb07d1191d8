"""The bf16 wire (actors._bf16, Ring(...).all_reduce / reduce_scatter with wire="bf16"):
the rounding is round-to-nearest-even as the reference twin (actors._bf16_ref) and
PyTorch's bfloat16 define it, the ring's sums are the twin's bit for bit on every rank
and either wire, run after run whatever the timing, in half the bytes."""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import trio

from actors import CollectiveError, Ring, bf16_round, bf16_widen, shard_bounds
from actors._bf16 import bf16_add
from actors._bf16_ref import bf16_round as ref_round
from actors._bf16_ref import ring_sum_bf16
from actors._transport import ipc_endpoint

WORKER = Path(__file__).with_name("bf16_worker.py")
HANG_GUARD = 120  # seconds; only a hang takes this long
_counter = iter(range(10**9))


def special_floats() -> np.ndarray:
    """Ties (low half exactly 0x8000, odd and even kept bit), values next to ties, the
    largest finite floats (rounding past bfloat16's largest), subnormals, zeros,
    infinities and NaNs of both signs with small and large payloads."""
    kept = np.array([0x3F80, 0x3F81, 0x7F7F, 0x7F7E, 0x0000, 0x0001, 0x007F, 0x0080], np.uint32)
    low = np.array([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    bits = (kept[:, None] << 16 | low[None, :]).reshape(-1)
    bits = np.concatenate([bits, bits | 0x8000_0000])
    extra = [0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0x7F80_0001, 0xFFFF_FFFF, 0x7FFF_8000]
    return np.concatenate([bits, np.array(extra, np.uint32)]).view(np.float32)


def random_floats(n: int) -> np.ndarray:
    """Every bit pattern equally likely: all exponents, NaNs included."""
    bits = np.random.default_rng(7).integers(0, 1 << 32, n, dtype=np.uint64)
    return bits.astype(np.uint32).view(np.float32)


# ----------------------------------------------------------------------------------------
# The rounding
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("floats", [special_floats(), random_floats(1_000_003)])
def test_bf16_round_is_the_twins_round_to_nearest_even(floats):
    assert bf16_round(floats).tobytes() == ref_round(floats).tobytes()


def test_bf16_round_agrees_with_torch_bfloat16_and_keeps_nans_nan():
    torch = pytest.importorskip("torch")
    x = np.concatenate([special_floats(), random_floats(200_003)])
    got = bf16_round(x)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(x)
    assert got[~nan].tobytes() == want.view(np.uint16)[~nan].tobytes()
    # torch writes one canonical NaN; the wire keeps the sign and top payload, quieted
    assert np.isnan(bf16_widen(got[nan])).all()
    assert np.array_equal(got[nan] >> 15, (x[nan].view(np.uint32) >> 31).astype(np.uint16))


def test_every_bfloat16_widens_exactly_and_rounds_back_to_itself():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    wide = bf16_widen(every)
    assert np.array_equal(wide.view(np.uint32), every.astype(np.uint32) << 16)
    back = bf16_round(wide)
    finite_or_inf = ~np.isnan(wide)
    assert np.array_equal(back[finite_or_inf], every[finite_or_inf])
    assert np.isnan(bf16_widen(back[~finite_or_inf])).all()


def test_bf16_functions_refuse_other_dtypes_in_one_line():
    with pytest.raises(TypeError, match="bf16_round takes float32, got float64"):
        bf16_round(np.zeros(3))
    with pytest.raises(TypeError, match="bf16_widen takes uint16 bfloat16 bits, got int16"):
        bf16_widen(np.zeros(3, np.int16))
    with pytest.raises(ValueError, match=r"^out must be uint16 of shape \(3,\), got uint16 \(4,\)"):
        bf16_round(np.zeros(3, np.float32), out=np.zeros(4, np.uint16))
    with pytest.raises(ValueError, match="^out must be float32 of 3 elements, got float32 4$"):
        bf16_widen(np.zeros(3, np.uint16), out=np.zeros(4, np.float32))
    with pytest.raises(TypeError, match=r"float32 target and uint16 bits of one size, got "
                       r"float32 \(3\) and uint16 \(2\)$"):  # fmt: skip
        bf16_add(np.zeros(3, np.float32), np.zeros(2, np.uint16))


def test_bf16_add_widens_and_adds_in_float32_across_its_blocks():
    # more than three of its 65,536-element passes, the last one short
    n = 3 * 65_536 + 11
    rng = np.random.default_rng(5)
    target, other = (rng.standard_normal((2, n)) * 1e3).astype(np.float32)
    h = bf16_round(other)
    want = target + bf16_widen(h)
    got = bf16_add(target, h)
    assert got is target
    assert got.tobytes() == want.tobytes()


# ----------------------------------------------------------------------------------------
# The ring's sums (in one process)
# ----------------------------------------------------------------------------------------


def open_rings(world: int, lanes: bool) -> list[Ring]:
    tag = f"b{os.getpid()}-{next(_counter)}"
    endpoints = [ipc_endpoint(f"{tag}-{r}") for r in range(world)]
    return [
        Ring(r, world, endpoints, chunk_bytes=4096, timeout=10.0, lanes=lanes) for r in range(world)
    ]


async def on_every_rank(rings, op: str, arrays, step: int, wire="bf16"):
    results = [None] * len(rings)

    async def one(ring):
        got = await getattr(ring, op)(arrays[ring.rank], step=step, wire=wire)
        results[ring.rank] = got.copy()

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for ring in rings:
                nursery.start_soon(one, ring)
    return results


def scaled_inputs(world: int, n: int) -> list[np.ndarray]:
    """Rank r's values around 10**r: partial sums round at several exponents."""
    return [
        (np.random.default_rng([r, n]).standard_normal(n) * 10.0**r).astype(np.float32)
        for r in range(world)
    ]


@pytest.mark.parametrize("world", [2, 3, 4])
async def test_bf16_sums_are_the_twins_bits_on_every_rank(world, wire):
    rings = open_rings(world, lanes=wire == "lanes")
    try:
        step = 0
        for n in [0, 1, 5, 4097, 30_011]:
            xs = scaled_inputs(world, n)
            expected = ring_sum_bf16(xs)
            # each of the N roundings is off by at most half an ulp, 2**-8 of what it rounds
            exact = np.sum(xs, axis=0, dtype=np.float64)
            bound = world * 2.0**-8 * np.abs(xs).sum(axis=0, dtype=np.float64)
            assert (np.abs(expected - exact) <= bound).all()
            step += 2
            reduced = await on_every_rank(rings, "all_reduce", [x.copy() for x in xs], step)
            assert all(y.tobytes() == expected.tobytes() for y in reduced)
            shards = await on_every_rank(rings, "reduce_scatter", [x.copy() for x in xs], step + 1)
            for r, shard in enumerate(shards):
                lo, hi = shard_bounds(n, world, r)
                assert shard.tobytes() == expected[lo:hi].tobytes()
    finally:
        for g in rings:
            g.close()


async def test_the_bf16_wire_carries_half_the_bytes_of_the_fp32_wire(wire):
    world, n = 3, 100_003
    xs = scaled_inputs(world, n)
    sent = {}
    for kind in (None, "bf16"):
        rings = open_rings(world, lanes=wire == "lanes")
        try:
            await on_every_rank(rings, "all_reduce", [x.copy() for x in xs], 1, wire=kind)
            stats = [g.stats() for g in rings]
        finally:
            for g in rings:
                g.close()
        sent[kind] = sum(s["bytes_sent"] for s in stats)
        assert sent[kind] == sum(s["bytes_received"] for s in stats)
    # an all-reduce moves 2 (N - 1) / N of the array per rank: 4 bytes an element, or 2
    assert sent[None] == 2 * (world - 1) * n * 4
    assert sent["bf16"] * 2 == sent[None]


async def test_a_wire_the_ring_does_not_have_is_refused_in_one_line():
    rings = open_rings(2, lanes=False)
    try:
        with pytest.raises(
            ValueError,
            match=r"all_reduce wire: expected None \(the array's dtype\) or 'bf16', got 'fp16'",
        ):
            await rings[0].all_reduce(np.zeros(4, np.float32), step=0, wire="fp16")
        with pytest.raises(
            TypeError, match="reduce_scatter wire='bf16' takes a float32 array, got float64"
        ):
            await rings[0].reduce_scatter(np.zeros(4), step=0, wire="bf16")
    finally:
        for g in rings:
            g.close()


async def test_ranks_that_disagree_on_the_wire_all_raise_naming_the_mismatch(wire):
    """A rank on the bf16 wire and ranks on the fp32 one: every rank fails (the header's
    dtype says which wire a chunk is on), none hangs or adds bf16 bits as floats."""
    rings = open_rings(3, lanes=wire == "lanes")
    outcomes = [None] * 3

    async def one(ring):
        x = np.ones(5000, np.float32)
        try:
            await ring.all_reduce(x, step=1, wire="bf16" if ring.rank == 0 else None)
        except CollectiveError as exc:
            outcomes[ring.rank] = exc

    try:
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                for ring in rings:
                    nursery.start_soon(one, ring)
    finally:
        for g in rings:
            g.close()
    assert all(isinstance(o, CollectiveError) for o in outcomes), outcomes
    assert any("all ranks must call the same collectives" in str(o) for o in outcomes)


# ----------------------------------------------------------------------------------------
# Rank processes: the same bits whatever the timing and the wire
# ----------------------------------------------------------------------------------------


def _tcp_endpoints(world: int) -> list[str]:
    ports = []
    for _ in range(world):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    return [f"tcp://127.0.0.1:{p}" for p in ports]


async def run_ranks(world: int, out: Path, jitter: int, endpoints: list[str]) -> list[dict]:
    out.mkdir()
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for r in range(world):
                argv = [sys.executable, str(WORKER), str(r), str(world), str(out / f"{r}.npz")]
                argv += [str(jitter), *endpoints]
                nursery.start_soon(trio.run_process, argv)
    return [dict(np.load(out / f"{r}.npz")) for r in range(world)]


async def test_rank_processes_sum_on_the_bf16_wire_to_the_same_bits_whatever_the_timing(tmp_path):
    """Three rank processes, twice with other random delays before every collective,
    once on shared-memory lanes (ipc) and once on tcp frames: the same bits each time,
    the twin's."""
    world = 3
    (tmp_path / "ipc").mkdir(mode=0o700)
    ipc = [ipc_endpoint(f"r{r}", str(tmp_path / "ipc")) for r in range(world)]
    first = await run_ranks(world, tmp_path / "first", 1, ipc)
    second = await run_ranks(world, tmp_path / "second", 2, _tcp_endpoints(world))
    for one, two in zip(first, second, strict=True):
        assert one.keys() == two.keys()
        assert all(one[k].tobytes() == two[k].tobytes() for k in one if k != "bytes_sent")
    for key in (k for k in first[0] if k.startswith("input/")):
        n = key.split("/")[1]
        expected = ring_sum_bf16([ranks[key] for ranks in first])
        for r, ranks in enumerate(first):
            assert ranks[f"all_reduce/{n}"].tobytes() == expected.tobytes()
            lo, hi = shard_bounds(expected.size, world, r)
            assert ranks[f"reduce_scatter/{n}"].tobytes() == expected[lo:hi].tobytes()
