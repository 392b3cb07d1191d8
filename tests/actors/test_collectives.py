"""Ring collectives: numbers, determinism, failure, generations.

Most tests run N rings inside one trio loop (cheap); the ones about processes spawn real
rank processes (tests/actors/ring_worker.py, fresh interpreters, never forked).
"""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from actors._collectives import (
    _ABORT,
    _DATA,
    _HEADER,
    _LANE,
    _LANE_REF,
    _MAGIC,
    _OPS,
    _VERSION,
    CollectiveError,
    Ring,
    shard_bounds,
)
from actors._transport import ipc_directory, ipc_endpoint

WORKER = Path(__file__).with_name("ring_worker.py")
HANG_GUARD = 60  # seconds; only a hang takes this long
_counter = iter(range(10**9))


def ring_order_sum(xs: list[np.ndarray]) -> np.ndarray:
    """The reference: segment s summed as x[s+1] + x[s+2] + ... + x[s], left to right."""
    world, n = len(xs), xs[0].size
    out = np.empty_like(xs[0])
    for s in range(world):
        a, b = shard_bounds(n, world, s)
        acc = xs[(s + 1) % world][a:b].copy()
        for j in range(2, world + 1):
            acc = acc + xs[(s + j) % world][a:b]
        out[a:b] = acc
    return out


def open_rings(world: int, **options) -> list[Ring]:
    tag = f"t{os.getpid()}-{next(_counter)}"
    endpoints = [ipc_endpoint(f"{tag}-{r}") for r in range(world)]
    options.setdefault("chunk_bytes", 4096)
    options.setdefault("timeout", 10.0)
    return [Ring(r, world, endpoints, **options) for r in range(world)]


async def on_every_rank(rings, call):
    """Run call(ring) on every ring concurrently; return the results by rank."""
    results = [None] * len(rings)

    async def one(ring):
        results[ring.rank] = await call(ring)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for ring in rings:
                nursery.start_soon(one, ring)
    return results


async def outcomes_on_every_rank(rings, call):
    """Like on_every_rank, but collect each rank's exception instead of raising it."""

    async def catching(ring):
        try:
            return await call(ring)
        except CollectiveError as exc:
            return exc

    return await on_every_rank(rings, catching)


# ----------------------------------------------------------------------------------------
# shard_bounds
# ----------------------------------------------------------------------------------------


@given(st.integers(0, 10**6), st.integers(1, 64))
def test_shard_bounds_cut_an_array_into_contiguous_near_equal_shards(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("args", [(-1, 2, 0), (4, 0, 0), (4, 2, 2), (4, 2, -1)])
def test_shard_bounds_reject_impossible_arguments(args):
    with pytest.raises(ValueError, match="need n >= 0"):
        shard_bounds(*args)


# ----------------------------------------------------------------------------------------
# Numbers (in one process)
# ----------------------------------------------------------------------------------------


async def everywhere(rings, method: str, arrays, *args, step: int):
    """Call ring.<method>(arrays[rank], *args, step=step) on every rank at once."""
    return await on_every_rank(
        rings, lambda g: getattr(g, method)(arrays[g.rank], *args, step=step)
    )


def own_shards(xs):
    """Per rank: NaN everywhere except its own shard, as all_gather expects it."""
    world, n = len(xs), xs[0].size
    arrays = [np.full(n, np.nan, xs[0].dtype) for _ in xs]
    for r, (x, y) in enumerate(zip(xs, arrays, strict=True)):
        start, stop = shard_bounds(n, world, r)
        y[start:stop] = x[start:stop]
    return arrays


def rngs(world, n):
    return [np.random.default_rng([r, n]) for r in range(world)]


def copies(xs):
    return [x.copy() for x in xs]


@pytest.mark.parametrize("world", [2, 3, 4])
async def test_collectives_match_numpy_with_sizes_not_divisible_by_the_world(world, wire):
    rings = open_rings(world, lanes=wire == "lanes")
    assert all(g.lanes == (wire == "lanes") for g in rings)
    step = 0
    for n in [0, 1, 5, 4097, 10_001]:
        for dtype in ["float32", "float64"]:
            xs = [rng.standard_normal(n).astype(dtype) for rng in rngs(world, n)]
            expected = ring_order_sum(xs)
            np.testing.assert_allclose(expected, np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
            step += 1

            for y in await everywhere(rings, "all_reduce", copies(xs), step=step):
                assert y.tobytes() == expected.tobytes()

            shards = await everywhere(rings, "reduce_scatter", copies(xs), step=step + 1)
            for r, shard in enumerate(shards):
                start, stop = shard_bounds(n, world, r)
                assert shard.tobytes() == expected[start:stop].tobytes()

            gathered = np.concatenate([y[~np.isnan(y)] for y in own_shards(xs)])
            for y in await everywhere(rings, "all_gather", own_shards(xs), step=step + 2):
                assert y.tobytes() == gathered.tobytes()

            root = world - 1
            for y in await everywhere(rings, "broadcast", copies(xs), root, step=step + 3):
                assert y.tobytes() == xs[root].tobytes()

            await on_every_rank(rings, lambda g, s=step + 4: g.barrier(step=s))
            step += 4
    assert all(g.stats()["stale_discarded"] == 0 for g in rings)
    for g in rings:
        g.close()


async def test_all_reduce_gives_the_same_bits_as_reduce_scatter_then_all_gather():
    rings = open_rings(3)
    xs = [np.random.default_rng(r).standard_normal(9_999).astype(np.float32) for r in range(3)]
    reduced = await everywhere(rings, "all_reduce", copies(xs), step=1)
    zero2 = copies(xs)
    await everywhere(rings, "reduce_scatter", zero2, step=2)
    await everywhere(rings, "all_gather", zero2, step=3)
    assert [y.tobytes() for y in zero2] == [y.tobytes() for y in reduced]
    for g in rings:
        g.close()


async def test_a_world_of_one_leaves_the_array_as_it_is():
    with Ring(0, 1, ["ipc:///unused"]) as ring:
        x = np.arange(5, dtype=np.float32)
        assert (await ring.all_reduce(x, step=0)) is x and x.tolist() == [0, 1, 2, 3, 4]
        assert (await ring.reduce_scatter(x, step=0)).tolist() == [0, 1, 2, 3, 4]
        assert (await ring.all_gather(x, step=0)).tolist() == [0, 1, 2, 3, 4]
        await ring.barrier(step=0)
        assert x.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "array, complaint",
    [
        (np.arange(10, dtype=np.float32)[::2], "C-contiguous"),
        (np.arange(10, dtype=np.int8), "accepts dtypes"),
        (np.frombuffer(b"\0" * 16, np.float32), "writeable"),
        ([1.0, 2.0], "numpy array"),
    ],
)
async def test_collectives_refuse_arrays_they_cannot_reduce_in_place(array, complaint):
    rings = open_rings(2)
    with pytest.raises((TypeError, ValueError), match=complaint):
        await rings[0].all_reduce(array, step=0)
    for g in rings:
        g.close()


# ----------------------------------------------------------------------------------------
# Numbers and determinism (across real rank processes)
# ----------------------------------------------------------------------------------------


async def spawn_ranks(mode: str, world: int, directory: Path, wire: str, out=None) -> list:
    """Start `world` ring_worker.py processes (fresh interpreters) and wait for them."""
    directory.mkdir(mode=0o700)
    procs = []
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for r in range(world):
                argv = [sys.executable, str(WORKER), mode, str(r), str(world), str(directory)]
                argv += [str(out(r))] if out else []
                argv += ["--wire", wire]
                procs.append(await nursery.start(trio.run_process, argv))
    return [p.returncode for p in procs]


async def run_rank_processes(world: int, directory: Path, wire: str = "lanes") -> list[dict]:
    def out(r):
        return directory / f"rank{r}.npz"

    assert await spawn_ranks("ops", world, directory, wire, out) == [0] * world
    return [dict(np.load(out(r))) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
async def test_rank_processes_compute_what_numpy_computes(world, wire, tmp_path):
    results = await run_rank_processes(world, tmp_path / "ring", wire)
    keys = [k.split("/", 1)[1] for k in results[0] if k.startswith("input/")]
    for key in keys:
        xs = [r[f"input/{key}"] for r in results]
        n = xs[0].size
        expected = ring_order_sum(xs)
        np.testing.assert_allclose(expected, np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
        gathered = np.concatenate([y[~np.isnan(y)] for y in own_shards(xs)])
        for rank, got in enumerate(results):
            assert (
                got[f"all_reduce/{key}"].tobytes() == expected.tobytes()
            )  # identical on every rank
            start, stop = shard_bounds(n, world, rank)
            assert got[f"reduce_scatter/{key}"].tobytes() == expected[start:stop].tobytes()
            assert got[f"all_gather/{key}"].tobytes() == gathered.tobytes()
            assert got[f"broadcast/{key}"].tobytes() == xs[1 % world].tobytes()
    assert all(int(r["stale_discarded"]) == 0 for r in results)


async def test_rank_processes_give_the_same_bits_run_after_run_on_either_wire(tmp_path):
    first = await run_rank_processes(3, tmp_path / "first", "lanes")
    second = await run_rank_processes(3, tmp_path / "second", "lanes")
    frames = await run_rank_processes(3, tmp_path / "frames", "frames")
    for one, two, three in zip(first, second, frames, strict=True):
        assert one.keys() == two.keys() == three.keys()
        assert all(one[k].tobytes() == two[k].tobytes() == three[k].tobytes() for k in one)


async def test_a_rank_that_exits_right_after_a_collective_does_not_fail_a_slower_one(
    wire, tmp_path
):
    def out(r):
        return tmp_path / "rank0.npy"

    assert await spawn_ranks("early", 3, tmp_path / "ring", wire, out) == [0, 0, 0]
    assert np.load(out(0)).tolist() == [6.0] * 100_003


# ----------------------------------------------------------------------------------------
# Failure
# ----------------------------------------------------------------------------------------


async def test_a_rank_killed_mid_collective_makes_every_other_rank_raise(wire, tmp_path):
    world, victim = 3, 1
    directory = tmp_path / "ring"
    directory.mkdir(mode=0o700)
    argv = [sys.executable, str(WORKER), "loop"]
    procs = [
        await trio.lowlevel.open_process(
            [*argv, str(r), str(world), str(directory), "--wire", wire], stdout=subprocess.PIPE
        )
        for r in range(world)
    ]
    try:
        with trio.fail_after(HANG_GUARD):
            for proc in procs:  # every rank is inside the all-reduce loop
                assert (await proc.stdout.receive_some(100)).startswith(b"ready")
            procs[victim].send_signal(signal.SIGKILL)
            for rank, proc in enumerate(procs):
                status = await proc.wait()
                if rank != victim:
                    output = await proc.stdout.receive_some(10_000)
                    assert status == 3 and b"collective-error" in output, output
                    # told of the lost peer, not left to the ring's own timeout
                    assert b"no progress" not in output, output
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_closing_many_rings_one_after_another_never_hangs(wire, tmp_path):
    # In a child process: a close stuck in libzmq holds the GIL, so only a process
    # boundary lets fail_after turn the hang into a failure.
    directory = tmp_path / "ring"
    directory.mkdir(mode=0o700)
    rounds = 20
    argv = [sys.executable, str(WORKER), "closes", str(rounds), str(directory), "--wire", wire]
    with trio.fail_after(HANG_GUARD):
        proc = await trio.run_process(argv, capture_stdout=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.decode().split("\n")[-2] == f"closed {rounds - 1}"


async def test_a_neighbour_lost_between_collectives_fails_the_next_one_until_a_new_generation():
    rings = open_rings(3, timeout=30.0)
    x = np.ones(5000, np.float32)
    await on_every_rank(rings, lambda g: g.all_reduce(x.copy(), step=1))
    rings[1].close()  # as if killed while nobody was in a collective
    await trio.sleep(0.3)  # the disconnect events arrive
    survivors = [rings[0], rings[2]]
    for g in survivors:
        with trio.fail_after(5), pytest.raises(CollectiveError) as failed:  # not after 30 s
            await g.all_reduce(x, step=2)
        assert "disconnected since the last collective" in str(failed.value)
    # A replacement on the same endpoint at the next generation; the survivors move on.
    rings[1] = Ring(1, 3, rings[0].endpoints, generation=1, chunk_bytes=4096, timeout=30.0)
    for g in survivors:
        g.set_generation(1)
    got = await on_every_rank(rings, lambda g: g.all_reduce(np.ones(5000, np.float32), step=3))
    assert all(y.tolist() == [3.0] * 5000 for y in got)
    for g in rings:
        g.close()


async def test_a_silent_peer_turns_into_collective_error_after_the_timeout():
    rings = open_rings(2, timeout=0.3)
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(CollectiveError, match="no progress for 0.3 s"):
        await rings[0].all_reduce(np.ones(10_000, np.float32), step=1)
    assert trio.current_time() - started >= 0.3  # not before its timeout
    for g in rings:
        g.close()


async def test_ranks_calling_different_collectives_all_raise():
    rings = open_rings(3)
    x = np.ones(5000, np.float32)

    def mismatched(g):
        if g.rank == 0:
            return g.all_reduce(x.copy(), step=1)
        return g.all_gather(x.copy(), step=1)

    outcomes = await outcomes_on_every_rank(rings, mismatched)
    assert all(isinstance(o, CollectiveError) for o in outcomes), outcomes
    assert any("all ranks must call the same collectives" in str(o) for o in outcomes)
    for g in rings:
        g.close()


async def test_a_broken_ring_refuses_work_until_every_rank_sets_a_new_generation():
    rings = open_rings(2, timeout=0.3)
    x = np.arange(3000, dtype=np.float32)
    with pytest.raises(CollectiveError):
        await rings[0].all_reduce(x.copy(), step=1)  # rank 1 never joins
    with pytest.raises(CollectiveError, match="set_generation"):
        await rings[0].all_reduce(x.copy(), step=1)
    with pytest.raises(ValueError, match="must grow"):
        rings[0].set_generation(0)
    for g in rings:
        g.set_generation(1)
    got = await on_every_rank(rings, lambda g: g.all_reduce(x.copy(), step=1))
    assert all(y.tobytes() == (x + x).tobytes() for y in got)
    # Rank 0's half-finished generation-0 chunks reached rank 1 and were thrown away.
    assert rings[1].stats()["stale_discarded"] > 0
    for g in rings:
        g.close()


async def test_messages_from_an_older_generation_are_discarded():
    rings = open_rings(2)
    for g in rings:
        g.set_generation(5)
    payload = np.full(1024, 1e9, np.float32)  # would poison the sum if it were used
    outbox = rings[0]._outbox
    for generation, kind in [(4, _DATA), (4, _ABORT), (0, _DATA)]:
        fields = (kind, _OPS["all_reduce"], 10, 0, 0, generation, 1, 0, 0, 0, 2048)
        header = _HEADER.pack(_MAGIC, _VERSION, *fields)
        await outbox.send_multipart([header, payload])
    x = np.ones(2048, np.float32)
    got = await on_every_rank(rings, lambda g: g.all_reduce(x.copy(), step=1))
    assert all(y.tolist() == [2.0] * 2048 for y in got)
    assert rings[1].stats()["stale_discarded"] == 3
    for g in rings:
        g.close()


async def test_a_message_from_a_newer_generation_fails_the_collective_and_is_kept():
    rings = open_rings(2)
    x = np.ones(3000, np.float32)
    rings[0].set_generation(1)  # rank 0 has moved on; rank 1 has not heard yet
    async with trio.open_nursery() as nursery:
        results = []

        async def rank0():
            results.append(await rings[0].all_reduce(x.copy(), step=7))

        nursery.start_soon(rank0)
        with pytest.raises(CollectiveError, match="already at generation 1"):
            await rings[1].all_reduce(x.copy(), step=6)
        rings[1].set_generation(1)
        results.append(await rings[1].all_reduce(x.copy(), step=7))
    assert [y.tolist() for y in results] == [[2.0] * 3000] * 2
    for g in rings:
        g.close()


async def test_a_cancelled_collective_leaves_the_ring_broken_until_a_new_generation():
    rings = open_rings(2)
    x = np.ones(10_000, np.float32)
    with trio.move_on_after(0.2):
        await rings[0].all_reduce(x, step=1)  # rank 1 never joins; the caller gives up
    with pytest.raises(CollectiveError, match="was interrupted"):
        await rings[0].all_reduce(x, step=2)
    for g in rings:
        g.set_generation(1)
    arrays = [np.ones(10_000, np.float32) for _ in rings]  # one array per rank
    got = await everywhere(rings, "all_reduce", arrays, step=3)
    assert [y.tobytes() for y in got] == [np.full(10_000, 2, np.float32).tobytes()] * 2
    for g in rings:
        g.close()


async def test_a_lane_notice_that_does_not_match_the_lane_is_refused():
    rings = open_rings(2, lanes=True)
    arrays = [np.ones(2048, np.float32) for _ in rings]
    await everywhere(rings, "all_reduce", arrays, step=1)  # rank 0's lane now exists
    lane = rings[0]._out_lane
    # a notice naming rank 0's real lane (pid, fd) under another token: the second
    # collective of generation 0 (seq 1), step 2, hop 0, chunk 0 of 2048 float32s
    fields = (_LANE, _OPS["all_reduce"], 10, 0, 0, 0, 2, 1, 0, 0, 2048)
    bogus = _LANE_REF.pack(bytes(16), lane.pid, lane.fd, 0)
    await rings[0]._outbox.send_multipart([_HEADER.pack(_MAGIC, _VERSION, *fields), bogus])
    with pytest.raises(CollectiveError, match="does not match its notice"):
        await rings[1].all_reduce(np.ones(2048, np.float32), step=2)
    for g in rings:
        g.close()


def test_ipc_rings_bind_inside_the_private_directory():
    rings = open_rings(2)
    try:
        directory = ipc_directory()
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        for endpoint in rings[0].endpoints:  # bound: a socket file in that directory
            path = endpoint.removeprefix("ipc://")
            assert os.path.dirname(path) == directory
            assert stat.S_ISSOCK(os.stat(path).st_mode), path
    finally:
        for g in rings:
            g.close()
