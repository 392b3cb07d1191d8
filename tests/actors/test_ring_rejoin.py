"""A killed rank is replaced by a fresh process and the ring carries on.

The recovery protocol the pipeline uses: the survivors' collective raises
CollectiveError; a fresh process for the dead rank builds a new Ring on the *same*
endpoint with generation g+1 (the survivors keep their Ring objects); every rank calls
``set_generation(g + 1)``; collectives continue. Real rank processes over ipc://
(tests/actors/rejoin_worker.py); run with ``-s`` to see how long the survivors took to
notice the kill.
"""

import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from actors._collectives import shard_bounds

WORKER = Path(__file__).with_name("rejoin_worker.py")
HANG_GUARD = 90  # seconds; only a hang takes this long (the rings' own timeout is 120 s)
WORLD, VICTIM, GENERATION = 3, 1, 3


class RankProcess:
    """A rejoin_worker.py process, driven line by line over its stdin and stdout."""

    def __init__(self, rank: int, proc: trio.Process) -> None:
        self.rank = rank
        self.proc = proc
        self._buffer = b""

    @classmethod
    async def start(cls, rank: int, generation: int, directory: Path, wire: str):
        argv = [sys.executable, str(WORKER), str(rank), str(WORLD), str(directory)]
        argv += [str(generation), "--wire", wire]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return cls(rank, proc)

    async def send(self, command: str) -> None:
        await self.proc.stdin.send_all(command.encode() + b"\n")

    async def line(self) -> str:
        while b"\n" not in self._buffer:
            data = await self.proc.stdout.receive_some(65536)
            if not data:
                raise AssertionError(f"rank {self.rank} exited: {self.proc.returncode}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def expect(self, word: str) -> str:
        line = await self.line()
        assert line.split(" ", 1)[0] == word, f"rank {self.rank}: {line}"
        return line

    def kill(self) -> float:
        """SIGKILL the process; returns the monotonic time of the kill."""
        self.proc.send_signal(signal.SIGKILL)
        return time.monotonic()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@pytest.fixture
async def ring_dir(tmp_path):
    directory = tmp_path / "ring"
    directory.mkdir(mode=0o700)
    return directory


@asynccontextmanager
async def running_ranks(directory: Path, wire: str):
    """WORLD rejoin_worker processes at GENERATION, as (ranks, survivors: all but VICTIM),
    the whole test bounded by HANG_GUARD. On the way out every process still running is
    killed: the ones started here (a frozen victim too) and the replacements a test put
    into `ranks`."""
    ranks = [await RankProcess.start(r, GENERATION, directory, wire) for r in range(WORLD)]
    started = list(ranks)
    try:
        with trio.fail_after(HANG_GUARD):
            yield ranks, [r for r in ranks if r.rank != VICTIM]
    finally:
        for rank in {id(r): r for r in [*started, *ranks]}.values():
            await rank.stop()


async def exit_all(ranks: list[RankProcess]) -> None:
    """Ask every rank to close its ring and exit; each must exit with status 0."""
    for rank in ranks:
        await rank.send("exit")
        assert await rank.proc.wait() == 0


async def survivors_fail(survivors: list[RankProcess], since: float, event: str) -> dict:
    """Each survivor reports a CollectiveError that is not its no-progress timeout.

    Returns each survivor's error message by rank.
    """
    messages = {}
    for rank in survivors:
        line = await rank.expect("error")
        _, at, message = line.split(" ", 2)
        assert "no progress" not in message, message
        delay = float(at) - since
        print(f"\nrank {rank.rank} raised {delay:.3f} s after {event}: {message}")
        messages[rank.rank] = message
    return messages


async def replace_and_check(ranks: list[RankProcess], directory: Path, wire: str) -> None:
    """Start a fresh VICTIM at GENERATION + 1, move everyone there, check the numbers."""
    ranks[VICTIM] = await RankProcess.start(VICTIM, GENERATION + 1, directory, wire)
    outs = [directory / f"check{r}.npz" for r in range(WORLD)]
    for rank, out in zip(ranks, outs, strict=True):
        await rank.send(f"check {GENERATION + 1} {out}")
    for rank in ranks:
        await rank.expect("checked")
    assert_exact([dict(np.load(out)) for out in outs])


def assert_exact(results: list[dict]) -> None:
    """Integer-valued inputs: every summation order gives numpy's exact sum."""
    for key in [k for k in results[0] if k.startswith("input/")]:
        n = int(key.split("/")[1])
        xs = [r[key] for r in results]
        expected = np.sum(xs, axis=0)
        gathered = np.empty_like(expected)
        for r, x in enumerate(xs):
            start, stop = shard_bounds(n, WORLD, r)
            gathered[start:stop] = x[start:stop]
        for r, got in enumerate(results):
            start, stop = shard_bounds(n, WORLD, r)
            assert np.array_equal(got[f"all_reduce/{n}"], expected)
            assert np.array_equal(got[f"reduce_scatter/{n}"], expected[start:stop])
            assert np.array_equal(got[f"all_gather/{n}"], gathered)


@pytest.mark.parametrize("when", ["mid-collective", "between-collectives", "stopped"])
async def test_a_killed_rank_is_replaced_by_a_fresh_process_at_the_next_generation(
    when, wire, ring_dir
):
    async with running_ranks(ring_dir, wire) as (ranks, survivors):
        for rank in survivors:
            await rank.send("loop")
        if when != "between-collectives":  # all-reducing 16 MiB over and over
            await ranks[VICTIM].send("loop")
            await ranks[VICTIM].expect("ready")
            for rank in survivors:
                await rank.expect("ready")
            await trio.sleep(0.2)
        else:  # the victim did one all-reduce; the survivors wait in the next one
            await ranks[VICTIM].send("reduce")
            await ranks[VICTIM].expect("ok")
            for rank in survivors:
                await rank.expect("ready")
            await trio.sleep(0.5)
        if when == "stopped":  # frozen, then killed by its supervisor after 1 s
            ranks[VICTIM].proc.send_signal(signal.SIGSTOP)
            await trio.sleep(1.0)
        killed_at = ranks[VICTIM].kill()
        await ranks[VICTIM].proc.wait()
        await survivors_fail(survivors, killed_at, f"the kill ({when}, {wire})")
        await replace_and_check(ranks, ring_dir, wire)
        await exit_all(ranks)


async def test_a_survivor_still_waiting_when_the_replacement_speaks_fails_and_keeps_it(
    wire, ring_dir
):
    # The victim is frozen (SIGSTOP: no disconnect) while the survivors wait in the
    # next all-reduce, and its replacement is started before it is killed. The
    # replacement's first generation g+1 chunk must fail the waiting collective at once
    # (not after the 120 s timeout), and be kept and used in generation g+1.
    async with running_ranks(ring_dir, wire) as (ranks, survivors):
        for rank in ranks:
            await rank.send("reduce")
        for rank in ranks:
            await rank.expect("ok")
        for rank in survivors:
            await rank.send("reduce")
        frozen = ranks[VICTIM]
        frozen.proc.send_signal(signal.SIGSTOP)
        ranks[VICTIM] = await RankProcess.start(VICTIM, GENERATION + 1, ring_dir, wire)
        started_at = time.monotonic()
        outs = [ring_dir / f"check{r}.npz" for r in range(WORLD)]
        await ranks[VICTIM].send(f"check {GENERATION + 1} {outs[VICTIM]}")
        lines = await survivors_fail(survivors, started_at, f"the replacement started ({wire})")
        assert "already at generation" in lines[VICTIM + 1]  # the victim's right
        frozen.kill()
        await frozen.proc.wait()
        await trio.sleep(0.5)  # as a supervisor would: the kill comes before the news
        for rank in survivors:
            await rank.send(f"check {GENERATION + 1} {outs[rank.rank]}")
        for rank in ranks:
            await rank.expect("checked")
        assert_exact([dict(np.load(out)) for out in outs])
        await exit_all(ranks)
