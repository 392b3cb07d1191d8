"""One rank process for tests/actors/test_bf16.py (spawned, never forked).

    python bf16_worker.py RANK WORLD OUT.npz JITTER ENDPOINT...

Runs, for each size in SIZES, an all_reduce and a reduce_scatter with ``wire="bf16"``
on seeded float32 inputs (a function of rank and size only) and saves inputs and
outputs. Before each collective the rank sleeps a random 0-30 ms drawn from (JITTER,
rank): runs with different JITTER seeds reach the collectives in other orders and at
other times, with the same numbers.
"""

import sys

import numpy as np
import trio

from actors import Ring

SIZES = [1, 7, 4097, 100_003]
CHUNK_BYTES = 4096  # many chunks per segment, so many messages to interleave


def inputs(rank: int, n: int) -> np.ndarray:
    # spread over magnitudes, so partial sums round at many exponents
    rng = np.random.default_rng([rank, n])
    return (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32)


async def run(rank: int, world: int, out: str, jitter: int, endpoints: list[str]) -> None:
    delays = np.random.default_rng([jitter, rank])
    results = {}
    with Ring(rank, world, endpoints, timeout=30.0, chunk_bytes=CHUNK_BYTES) as ring:
        step = 0
        for n in SIZES:
            x = inputs(rank, n)
            results[f"input/{n}"] = x.copy()
            for op in ("all_reduce", "reduce_scatter"):
                await trio.sleep(delays.uniform(0, 0.03))
                step += 1
                got = await getattr(ring, op)(x.copy(), step=step, wire="bf16")
                results[f"{op}/{n}"] = got.copy()
        results["bytes_sent"] = np.array(ring.stats()["bytes_sent"])
    np.savez(out, **results)


def main() -> None:
    rank, world, out, jitter, *endpoints = sys.argv[1:]
    trio.run(run, int(rank), int(world), out, int(jitter), endpoints)


if __name__ == "__main__":
    main()
