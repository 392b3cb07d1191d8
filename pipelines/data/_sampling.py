"""Which samples a rank takes at a step: a pure function of (seed, epoch, step, rank, world).

The global batch of optimizer step `step` in epoch `epoch` is the slice
perm[step * B : (step + 1) * B] of that epoch's permutation, perm = a shuffle of
range(n) drawn from SeedSequence([seed, SHUFFLE, epoch]). It is cut into `accum`
micro-batches of B / accum, and micro-batch k into `world` equal rank slices, rank r
taking the r-th. The union over ranks and micro-steps is the global batch whatever the
world size — what lets ranks=1 and ranks=4 give the same parameters (guarded by
test_data.py::test_rank_slices_partition_the_world_one_batch). The last partial batch of
an epoch is dropped so every step has exactly B samples.
"""

import functools

import numpy as np

# Purpose tags spawned from the run seed: one stream per use, never shared.
SHUFFLE = 0x5348


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, SHUFFLE, epoch]))
    perm = rng.permutation(n)
    perm.flags.writeable = False  # shared by the cache: nobody may shuffle it in place
    return perm


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one pass over n samples (the partial tail is dropped)."""
    if batch_size > n:
        raise ValueError(f"batch_size: expected at most the dataset size {n}, got {batch_size}")
    return n // batch_size


def position(global_step: int, n: int, batch_size: int) -> tuple[int, int]:
    """(epoch, step within the epoch) of a 0-based global optimizer step."""
    return divmod(global_step, steps_per_epoch(n, batch_size))


def batch_indices(n, seed, epoch, step, rank, world, batch_size, *, micro=0, accum=1):
    """Sample indices of rank `rank`'s slice of micro-batch `micro` of a global batch.

    `batch_size` is the global batch (all ranks, all micro-steps); it must divide by
    world * accum. `step` is the step within `epoch` (see `position`).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world = {world}, got {rank}")
    if not 0 <= micro < accum:
        raise ValueError(f"micro: expected 0 <= micro < accum = {accum}, got {micro}")
    if batch_size % (world * accum):
        raise ValueError(
            f"batch_size: expected a multiple of world * accum = {world * accum}, got {batch_size}"
        )
    spe = steps_per_epoch(n, batch_size)
    if not 0 <= step < spe:
        raise ValueError(f"step: expected 0 <= step < {spe} (steps per epoch), got {step}")
    per_micro = batch_size // accum
    per_rank = per_micro // world
    start = step * batch_size + micro * per_micro + rank * per_rank
    return _permutation(n, seed, epoch)[start : start + per_rank]
