"""The rank's shared state (pipelines.cluster.roles.RankState): what a regroup interrupts."""

from types import SimpleNamespace

import trio
import trio.testing

from pipelines.cluster.roles import RankState

LIMIT = 10  # seconds: a hang fails the test


def state(generation=0):
    ring = SimpleNamespace(generation=generation)  # only its generation is read here
    fields = dict.fromkeys(
        ("cfg", "dataset", "evalset", "model", "step", "ckpt_root", "chaos", "initial_params")
    )
    return RankState(rank=0, world=2, ring=ring, **fields)


async def test_a_regroup_ends_a_wait_for_something_a_dead_neighbour_will_never_send():
    # e.g. the ack of a snapshot replica: the right neighbour died before sending it
    st, never = state(), trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def wait():
                await st.wait_unless_regroup(never)
                done.set()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            st.abort_collectives(1)
        assert done.is_set() and not never.is_set()
        await st.wait_unless_regroup(trio.Event())  # already called for: no wait at all


async def test_without_a_regroup_the_wait_is_for_the_event():
    st, acked = state(), trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def wait():
                await st.wait_unless_regroup(acked)
                done.set()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # waiting for the event
            acked.set()
        assert done.is_set() and st.min_generation == 0
