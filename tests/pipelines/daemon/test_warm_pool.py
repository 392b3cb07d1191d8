"""The daemon's side of the warm runner (pipelines.daemon.warm.WarmPool) with runners
that are real processes but no runner's work: one that dies before it says ready counts
against MAX_FAILURES, and at that many in a row no runner is started again (jobs start
cold); one that dies after it said ready is replaced without counting."""

from __future__ import annotations

import sys

import trio

from pipelines.daemon.warm import MAX_FAILURES, WarmPool

DIES_AT_ONCE = "import sys; sys.exit(3)"
# says ready, then dies while it waits (after the pool has read the line)
READY_THEN_DIES = "import sys, time; print('ready', flush=True); time.sleep(1.0); sys.exit(3)"


def _pool(tmp_path, program: str) -> WarmPool:
    """A pool whose runners are `program` (its runner's arguments after it, unused)."""
    return WarmPool(
        tmp_path, launch=[sys.executable, "-c", program], log_path=tmp_path / "warm.log"
    )


async def _run_until(pool: WarmPool, done, then: float = 0.0, limit: float = 60.0) -> None:
    """Run the pool (the daemon idle) until ``done(stats)``, then ``then`` seconds more."""
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, lambda: (1, 0))  # room: warm, 0 templates
            while not done(pool.stats()):
                await trio.sleep(0.05)
            await trio.sleep(then)
            nursery.cancel_scope.cancel()


async def test_runners_that_die_before_they_are_ready_stop_being_started(tmp_path):
    pool = _pool(tmp_path, DIES_AT_ONCE)
    await _run_until(pool, lambda s: s["disabled"], then=1.0)  # 10 polls more: none starts
    assert (pool.started, pool.replaced) == (MAX_FAILURES, MAX_FAILURES)


async def test_a_runner_that_dies_after_it_said_ready_is_replaced_without_counting(tmp_path):
    pool = _pool(tmp_path, READY_THEN_DIES)
    await _run_until(pool, lambda s: s["replaced"] >= MAX_FAILURES + 1)
    assert not pool.stats()["disabled"] and pool.failures == 0
