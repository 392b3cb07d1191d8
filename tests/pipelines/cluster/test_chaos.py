"""Chaos events: expansion into numbered one-shot events and standing conditions."""

from __future__ import annotations

import trio
import trio.testing

import actors
from pipelines.cluster.chaos import RankChaos, expand, parse_chaos
from pipelines.cluster.coordinator import FaultLog
from pipelines.cluster.messages import ChaosFired


def test_random_kill_expands_deterministically_from_its_seed():
    events = parse_chaos("random-kill:every=10,seed=3", 4)
    first, again = expand(events, 4, 50), expand(events, 4, 50)
    assert first == again
    assert [e["step"] for e in first] == [10, 20, 30, 40]
    assert all(e["kind"] == "kill" and 0 <= e["rank"] < 4 and e["at"] == "start" for e in first)
    assert [e["id"] for e in first] == [0, 1, 2, 3]
    # the seed picks the ranks: pinned, so a run's faults stay the same across versions
    assert [e["rank"] for e in first] == [3, 0, 0, 0]
    other = expand(parse_chaos("random-kill:every=10,seed=4", 4), 4, 50)
    assert [e["rank"] for e in other] == [2, 3, 3, 2]


def test_a_rank_takes_its_own_events_and_conditions():
    events = expand(
        parse_chaos(
            "kill:rank=1,step=5,at=reduce;delay:rank=1,ms=20;straggler:rank=1,factor=3;"
            "hang:rank=0,step=2",
            2,
        ),
        2,
        10,
    )
    one = RankChaos(1, "Coordinator@cluster")
    one.load(events)
    assert [(e["kind"], e["step"], e["at"]) for e in one.pending] == [("kill", 5, "reduce")]
    assert one.delay_s == 0.02 and one.straggler_factor == 3
    zero = RankChaos(0, "Coordinator@cluster")
    zero.load(events)
    assert [e["kind"] for e in zero.pending] == ["hang"]
    assert zero.delay_s == 0 and zero.straggler_factor == 1


def test_a_wait_holds_its_step_until_the_file_exists_and_fires_once(tmp_path):
    gate = tmp_path / "gate"
    chaos = RankChaos(0, "coordinator")
    chaos.load(expand(parse_chaos(f"wait:rank=0,step=3,until={gate}", 1), 1, 10))
    progress = []

    async def steps():
        for s in (2, 3):
            await chaos.at(s, "start")
            progress.append(s)
        gate.unlink()  # step 3 again: a replay after a recovery does not wait, gate or not
        await chaos.at(3, "start")
        progress.append(3)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(steps)
            await trio.sleep(60)  # virtual time: a minute of polling
            assert progress == [2]
            gate.touch()
            await trio.sleep(1)
            assert progress == [2, 3, 3]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class FiredLog(actors.Actor):
    """The Coordinator's part in chaos: ChaosFired recorded in a real FaultLog."""

    def __init__(self, log: FaultLog):
        self.fault_log = log

    async def handle_call(self, request, from_):
        assert isinstance(request, ChaosFired), request
        self.fault_log.fired(request.event_id, 3, 1)
        return True


def test_a_wait_that_passed_is_not_given_again_to_a_rank_that_rejoins(tmp_path):
    """A rank reports its wait once the gate opened; the pending events every later plan
    carries no longer hold it, so a rejoining rank (or one started in a dead rank's
    place) replays the step without waiting, though the gate is gone. No fault."""
    gate = tmp_path / "gate"
    events = expand(parse_chaos(f"wait:rank=0,step=3,until={gate};kill:rank=0,step=5", 1), 1, 9)
    log = FaultLog(events)

    async def main():
        async with trio.open_nursery() as nursery:
            await actors.spawn(nursery, FiredLog(log), name="coordinator")
            first = RankChaos(0, "coordinator")
            first.load(log.pending())
            gate.touch()
            await first.at(3, "start")
            assert [e["kind"] for e in log.pending()] == ["kill"]
            gate.unlink()
            again = RankChaos(0, "coordinator")
            again.load(log.pending())
            with trio.fail_after(60):  # virtual time: a wait given again would poll on
                await again.at(3, "start")
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert log.faults == []
