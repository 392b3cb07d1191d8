"""Names: registration, lookup, name@node addressing."""

import threading

import pytest
import trio

import actors
from actors import Actor, Address, NameTaken, NoSuchActor, _registry


class Idle(Actor):
    async def handle_call(self, request, from_):
        return request


async def test_a_registered_actor_is_found_by_name_until_it_exits():
    async with trio.open_nursery() as nursery:
        ref = await actors.spawn(nursery, Idle(), name="idle")
        assert actors.whereis("idle") is ref
        assert actors.registered() == ["idle"]
        await actors.stop("idle")
    assert actors.whereis("idle") is None
    assert actors.registered() == []


async def test_a_name_held_by_a_live_actor_cannot_be_taken():
    async with trio.open_nursery() as nursery:
        await actors.spawn(nursery, Idle(), name="idle")
        with pytest.raises(NameTaken, match="'idle' is already registered"):
            await actors.spawn(nursery, Idle(), name="idle")
        await actors.stop("idle")
        await actors.spawn(nursery, Idle(), name="idle")  # free again
        await actors.stop("idle")


async def test_wait_registered_returns_once_the_name_appears(autojump_clock):
    async with trio.open_nursery() as nursery:

        async def late():
            await trio.sleep(2)
            await actors.spawn(nursery, Idle(), name="late")

        nursery.start_soon(late)
        ref = await actors.wait_registered("late")
        assert trio.current_time() == pytest.approx(2)
        assert await actors.call(ref, "hi") == "hi"
        await actors.stop(ref)
        with pytest.raises(TimeoutError, match="no actor registered as 'late' within 1s"):
            await actors.wait_registered("late", timeout=1)


class FakeNode:
    name = "rank0"


TARGETS = [
    ("Optimizer", "Optimizer"),
    ("Optimizer@rank1", Address("Optimizer", "rank1")),
    ("Optimizer@rank0", "Optimizer"),  # this process's own node: local
    (Address("Optimizer", "rank0"), "Optimizer"),
    (Address("Optimizer", "rank2"), Address("Optimizer", "rank2")),
]


@pytest.mark.parametrize("target, parsed", TARGETS)
async def test_targets_parse_into_local_names_or_remote_addresses(target, parsed):
    _registry.set_node(FakeNode())
    assert _registry.parse_target(target) == parsed
    assert str(Address("Optimizer", "rank1")) == "Optimizer@rank1"


@pytest.mark.parametrize("bad", ["", "a b", "a@", "@node", "a@b@c"])
async def test_malformed_names_are_rejected_saying_what_a_name_is(bad):
    with pytest.raises(ValueError, match="must be a non-empty string without '@' or whitespace"):
        _registry.parse_target(bad)


@pytest.mark.parametrize("bad", [3, None, b"idle"])
async def test_targets_of_another_type_are_rejected_with_the_accepted_shapes(bad):
    shapes = r"an ActorRef, a local name \('Optimizer'\) or a remote name \('Optimizer@rank1'\)"
    with pytest.raises(TypeError, match=shapes):
        _registry.parse_target(bad)


async def test_remote_targets_without_a_node_say_how_to_open_one():
    with pytest.raises(actors.NoNode, match="open_node"):
        await actors.call("Optimizer@rank1", 1)


async def test_a_trio_run_starts_with_an_empty_registry():
    assert actors.registered() == []
    with pytest.raises(NoSuchActor):
        await actors.call("idle", 1)


def test_trio_runs_at_the_same_time_have_registries_of_their_own():
    """Two runs in two threads each register "idle" at once: no NameTaken, and each
    finds its own actor under the name."""
    both_registered = threading.Barrier(2, timeout=10)
    found = {}

    async def one_run(label):
        async with trio.open_nursery() as nursery:
            ref = await actors.spawn(nursery, Idle(), name="idle")
            await trio.to_thread.run_sync(both_registered.wait)
            found[label] = (actors.whereis("idle") is ref, actors.registered())
            await actors.stop("idle")

    threads = [threading.Thread(target=trio.run, args=(one_run, label)) for label in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert found == {"a": (True, ["idle"]), "b": (True, ["idle"])}
