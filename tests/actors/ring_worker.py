"""One rank process for tests/actors/test_collectives.py (spawned, never forked).

    python ring_worker.py ops   RANK WORLD DIR OUT.npz --wire W  # every collective
    python ring_worker.py loop  RANK WORLD DIR --wire W          # all-reduce until failure
    python ring_worker.py early RANK WORLD DIR OUT.npz --wire W  # one all-reduce, rank 0 late
    python ring_worker.py closes ROUNDS DIR --wire W             # 3 rings in this process

`ops` runs each collective on seeded inputs and saves inputs and outputs. `loop` prints
"ready" after its first all-reduce, then all-reduces until a CollectiveError, which it
prints as "collective-error: ..." before exiting with status 3. `early`: every rank but
0 all-reduces once and exits at once; rank 0 starts a second later and saves its result.
`closes`: ROUNDS times, open all three rings of a world of 3 in this one process, run an
all-reduce (odd rounds only), close them one after another (with a pause between closes
on every third round) and print "closed ROUND".
`--wire` is the `wire` fixture of tests/actors/conftest.py: lanes or frames.
"""

import sys
import time

import numpy as np
import trio

from actors._collectives import CollectiveError, Ring, shard_bounds
from actors._transport import ipc_endpoint

SIZES = [1, 7, 1001, 30_011]  # none divisible by 2, 3 or 4 (except 1 < world)
DTYPES = ["float32", "float64"]
CHUNK_BYTES = 4096  # small chunks: many per segment even for small test arrays


def inputs(rank: int, n: int, dtype: str) -> np.ndarray:
    return np.random.default_rng([rank, n]).standard_normal(n).astype(dtype)


async def run_ops(ring: Ring, out: str) -> None:
    results = {}
    step = 0
    for n in SIZES:
        for dtype in DTYPES:
            key = f"{n}-{dtype}"
            x = inputs(ring.rank, n, dtype)
            results[f"input/{key}"] = x.copy()
            step += 1
            results[f"all_reduce/{key}"] = (await ring.all_reduce(x.copy(), step=step)).copy()
            step += 1
            shard = await ring.reduce_scatter(x.copy(), step=step)
            results[f"reduce_scatter/{key}"] = shard.copy()
            gathered = np.full(n, np.nan, dtype)
            start, stop = shard_bounds(n, ring.world, ring.rank)
            gathered[start:stop] = x[start:stop]
            step += 1
            results[f"all_gather/{key}"] = (await ring.all_gather(gathered, step=step)).copy()
            step += 1
            root = 1 % ring.world
            results[f"broadcast/{key}"] = (await ring.broadcast(x.copy(), root, step=step)).copy()
            step += 1
            await ring.barrier(step=step)
    results["stale_discarded"] = np.array(ring.stats()["stale_discarded"])
    np.savez(out, **results)


async def run_loop(ring: Ring) -> None:
    x = np.ones(1 << 16, np.float32)
    step = 0
    try:
        while True:
            step += 1
            await ring.all_reduce(x, step=step)
            if step == 1:
                print("ready", flush=True)
    except CollectiveError as exc:
        print(f"collective-error: {exc}", flush=True)
        sys.exit(3)


async def run_early(ring: Ring, out: str) -> None:
    if ring.rank == 0:
        time.sleep(1.0)  # the others finish and exit before this rank reads anything
    x = np.full(100_003, ring.rank + 1.0, np.float32)
    await ring.all_reduce(x, step=1)
    if ring.rank == 0:
        np.save(out, x)


async def run_closes(rounds: int, directory: str, lanes: bool) -> None:
    for round_ in range(rounds):
        endpoints = [ipc_endpoint(f"c{round_}-{r}", directory) for r in range(3)]
        rings = [Ring(r, 3, endpoints, chunk_bytes=CHUNK_BYTES, lanes=lanes) for r in range(3)]
        if round_ % 2:
            async with trio.open_nursery() as nursery:
                for ring in rings:
                    x = np.ones(10_000, np.float32)
                    nursery.start_soon(lambda ring=ring, x=x: ring.all_reduce(x, step=1))
        for ring in rings:
            ring.close()
            if round_ % 3 == 0:
                await trio.sleep(0.05)  # the neighbours' disconnect events come in
        print(f"closed {round_}", flush=True)


def main() -> None:
    *args, option, wire = sys.argv[1:]
    assert option == "--wire" and wire in ("lanes", "frames"), sys.argv
    lanes = wire == "lanes"
    if args[0] == "closes":
        trio.run(run_closes, int(args[1]), args[2], lanes)
        return
    mode, rank, world, directory = args[0], int(args[1]), int(args[2]), args[3]
    endpoints = [ipc_endpoint(f"rank-{r}", directory) for r in range(world)]

    async def run():
        options = dict(timeout=10.0, chunk_bytes=CHUNK_BYTES, lanes=lanes)
        with Ring(rank, world, endpoints, **options) as ring:
            if mode == "ops":
                await run_ops(ring, args[4])
            elif mode == "early":
                await run_early(ring, args[4])
            else:
                await run_loop(ring)

    trio.run(run)


if __name__ == "__main__":
    main()
