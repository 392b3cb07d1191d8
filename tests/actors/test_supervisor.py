"""Supervisors against OTP's documented behaviour: strategies x restart types, restart
intensity, ordered start / reverse shutdown, shutdown timeouts, nesting, child specs."""

import logging
import threading

import pytest
import trio
import trio.testing

import actors
from actors import (
    Actor,
    ChildSpec,
    ChildSpecError,
    RestartIntensityExceeded,
    StartChildError,
    Stop,
    Supervisor,
    child_spec,
    format_reason,
)


class Probe(Actor):
    """Writes (id, event, ...) to a shared journal. Cast "crash" or "normal" to end it."""

    def __init__(self, journal, id, fail_init=False, slow_terminate=0):
        self.journal, self.id = journal, id
        self.fail_init, self.slow_terminate = fail_init, slow_terminate

    async def init(self):
        if self.fail_init:
            raise OSError(f"{self.id} cannot start")
        self.journal.append((self.id, "start"))

    async def handle_cast(self, msg):
        if msg == "crash":
            raise RuntimeError(f"crash {self.id}")
        if msg == "normal":
            raise Stop("normal")

    async def terminate(self, reason):
        self.journal.append((self.id, "terminate", format_reason(reason)))
        await trio.sleep(self.slow_terminate)


def probe_specs(journal, restarts, ids="abc", **kwargs):
    return [
        Probe.child_spec(journal, id, name=id, restart=restart, **kwargs)
        for id, restart in zip(ids, restarts, strict=True)
    ]


def started(journal):
    return [entry[0] for entry in journal if entry[1] == "start"]


def terminated(journal):
    return [entry[0] for entry in journal if entry[1] == "terminate"]


P, T, X = "permanent", "transient", "temporary"

# strategy, restart types of (a, b, c), how b ends, which children restart (in order).
# From OTP's supervisor docs: the strategy applies only if the exited child is to be
# restarted; temporary children are never restarted, even when a sibling's crash
# stopped them; transient ones only after an abnormal exit.
STRATEGY_TABLE = [
    ("one_for_one", (P, P, P), "crash", "b"),
    ("one_for_one", (P, P, P), "normal", "b"),
    ("one_for_one", (T, T, T), "crash", "b"),
    ("one_for_one", (T, T, T), "normal", ""),
    ("one_for_one", (X, X, X), "crash", ""),
    ("one_for_one", (X, X, X), "normal", ""),
    ("one_for_all", (P, P, P), "crash", "abc"),
    ("one_for_all", (P, P, P), "normal", "abc"),
    ("one_for_all", (T, T, T), "crash", "abc"),
    ("one_for_all", (T, T, T), "normal", ""),
    ("one_for_all", (X, X, X), "crash", ""),
    ("one_for_all", (X, P, T), "crash", "bc"),  # a stopped for good
    ("rest_for_one", (P, P, P), "crash", "bc"),
    ("rest_for_one", (P, P, P), "normal", "bc"),
    ("rest_for_one", (T, T, T), "crash", "bc"),
    ("rest_for_one", (T, T, T), "normal", ""),
    ("rest_for_one", (X, X, X), "crash", ""),
    ("rest_for_one", (P, P, X), "crash", "b"),  # c stopped for good
]


@pytest.mark.parametrize("strategy, restarts, ending, expected", STRATEGY_TABLE)
async def test_which_children_restart_follows_otp(strategy, restarts, ending, expected):
    journal = []
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(probe_specs(journal, restarts), strategy=strategy).run)
        journal.clear()
        await actors.cast("b", ending)
        await trio.testing.wait_all_tasks_blocked()
        assert "".join(started(journal)) == expected
        # Siblings are stopped before the restart, in reverse start order.
        siblings = {"one_for_one": "", "one_for_all": "ca", "rest_for_one": "c"}[strategy]
        if expected:
            assert "".join(terminated(journal)) == "b" + siblings
        else:
            assert terminated(journal) == ["b"]
        await actors.stop(sup)


async def test_children_start_in_order_and_stop_in_reverse_order():
    journal = []
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(probe_specs(journal, (P, P, P))).run)
        assert started(journal) == ["a", "b", "c"]
        await actors.stop(sup)
    assert terminated(journal) == ["c", "b", "a"]
    assert {entry[2] for entry in journal if entry[1] == "terminate"} == {"shutdown"}


# --------------------------------------------------------------------- restart intensity


class CrashesAfter(Actor):
    def __init__(self, delay):
        self.delay = delay

    async def init(self):
        self.send_after(self.delay, "crash")

    async def handle_info(self, msg):
        raise RuntimeError("periodic crash")


# crash every `interval` seconds; default intensity 3 restarts in 5 s.
INTENSITY_TABLE = [
    (1.0, {}, 4.0),  # 4th crash within 5 s escalates at t=4
    (2.0, {}, None),  # never more than 3 restarts in any 5 s window
    (1.0, {"max_restarts": 0}, 1.0),  # first crash escalates
    (1.0, {"max_restarts": 10, "max_seconds": 5}, None),
    (0.5, {"max_restarts": 3, "max_seconds": 2}, 2.0),
    (0.5, {"max_restarts": 4, "max_seconds": 2}, None),  # 4 restarts in any 2 s window
]


@pytest.mark.parametrize("interval, intensity, escalates_at", INTENSITY_TABLE)
async def test_restart_intensity_escalates_when_exceeded(
    autojump_clock, interval, intensity, escalates_at
):
    sup = Supervisor([CrashesAfter.child_spec(interval)], **intensity)
    with trio.move_on_after(30):
        with pytest.raises(RestartIntensityExceeded, match="restart"):
            await sup.run()
        assert trio.current_time() == pytest.approx(escalates_at)
        return
    assert escalates_at is None


async def test_escalation_is_logged_as_one_structured_line(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="zerotrain.actors.supervisor")
    with pytest.raises(RestartIntensityExceeded):
        await Supervisor([CrashesAfter.child_spec(1, id="w")], max_restarts=1, name="s").run()
    lines = [r.getMessage() for r in caplog.records if "child_exited" in r.getMessage()]
    assert lines == [
        "[Supervisor s] child_exited id='w' reason='RuntimeError: periodic crash' "
        "restart=permanent action=restart strategy=one_for_one budget=1/1 in 5s",
        "[Supervisor s] child_exited id='w' reason='RuntimeError: periodic crash' "
        "restart=permanent action=escalate strategy=one_for_one budget=2/1 in 5s",
    ]


# ----------------------------------------------------------------------------- shutdown


async def test_a_child_slower_than_its_shutdown_timeout_is_killed(autojump_clock):
    journal = []
    specs = [
        Probe.child_spec(journal, "a", name="a"),
        Probe.child_spec(journal, "slow", name="slow", shutdown=2, slow_terminate=100),
    ]
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(specs).run)
        await actors.stop(sup, timeout=None)
    # "slow" got the stop request at t=0, was killed at t=2; then "a" stopped.
    assert terminated(journal) == ["slow", "a"]
    assert trio.current_time() == pytest.approx(2)


async def test_brutal_kill_skips_terminate(autojump_clock):
    journal = []
    specs = [Probe.child_spec(journal, "a", name="a", shutdown="brutal_kill")]
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(specs).run)
        await actors.stop(sup)
    assert terminated(journal) == []


async def test_a_child_that_ignores_cancellation_is_abandoned_after_its_timeout(
    autojump_clock, caplog
):
    """Trio cannot kill a task that ignores cancellation: the supervisor gives up on it
    after shutdown + ABANDON_AFTER seconds, stops the others, and its own exit waits."""
    events = []

    async def stubborn(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # like a thread without abandon_on_cancel
                await trio.sleep(100)
                events.append(("stubborn ended", trio.current_time()))

    async def polite(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            events.append(("polite stopped", trio.current_time()))

    specs = [
        {"id": "polite", "start": polite},
        {"id": "stubborn", "start": stubborn, "shutdown": 2},
    ]
    caplog.set_level(logging.WARNING, logger="zerotrain.actors.supervisor")
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(specs).run)
        await actors.stop(sup, timeout=None)
    assert events == [
        ("polite stopped", pytest.approx(2 + actors.ABANDON_AFTER)),
        ("stubborn ended", pytest.approx(100)),
    ]
    assert "abandon id='stubborn'" in caplog.text


async def test_a_child_in_a_thread_abandoned_on_cancel_stops_at_once(autojump_clock):
    """With abandon_on_cancel=True the task ends when killed; the thread runs on."""
    release = threading.Event()

    async def in_thread(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.to_thread.run_sync(release.wait, abandon_on_cancel=True)

    specs = [{"id": "thread", "start": in_thread, "shutdown": 2}]
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(Supervisor(specs).run)
        await actors.stop(sup)
    assert trio.current_time() == 0  # no shutdown timeout was needed
    release.set()  # let the abandoned thread finish


# ------------------------------------------------------------------------------ nesting


async def test_nested_supervisors_restart_within_their_own_subtree():
    journal = []
    inner = Supervisor(probe_specs(journal, (P, P), ids="xy"), strategy="one_for_all")
    outer = Supervisor([*probe_specs(journal, (P,), ids="a"), inner.child_spec(id="inner")])
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(outer.run)
        assert started(journal) == ["a", "x", "y"]
        journal.clear()
        await actors.cast("x", "crash")
        await trio.testing.wait_all_tasks_blocked()
        assert started(journal) == ["x", "y"]  # "a" untouched
        await actors.stop(sup)
    assert terminated(journal)[-3:] == ["y", "x", "a"]


@pytest.mark.parametrize("restart, restarted", [(P, True), (T, False)])
async def test_an_escalating_child_supervisor_is_restarted_only_if_permanent(
    autojump_clock, restart, restarted
):
    journal = []
    inner = Supervisor(probe_specs(journal, (P,), ids="x"), max_restarts=0)
    outer = Supervisor([inner.child_spec(id="inner", restart=restart)], name="outer")
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(outer.run)
        journal.clear()
        await actors.cast("x", "crash")  # inner gives up at once: shutdown-class reason
        await trio.testing.wait_all_tasks_blocked()
        [info] = await actors.which_children("outer")
        assert info.last_exit.startswith("RestartIntensityExceeded")
        assert (started(journal) == ["x"]) is restarted
        assert info.state == ("running" if restarted else "done")
        await actors.stop(sup)


async def test_a_child_that_fails_to_start_fails_the_supervisor_start():
    journal = []
    specs = [
        Probe.child_spec(journal, "a", name="a"),
        Probe.child_spec(journal, "b", name="b", fail_init=True),
        Probe.child_spec(journal, "c", name="c"),
    ]
    error = pytest.RaisesExc(StartChildError, match=r"failed to start child 'b': OSError")
    with pytest.RaisesGroup(error):
        async with trio.open_nursery() as nursery:
            await nursery.start(Supervisor(specs).run)
    assert journal == [("a", "start"), ("a", "terminate", "shutdown")]


# ------------------------------------------------------------------------ introspection


async def test_which_children_reports_restarts_and_last_exit_reason():
    journal = []
    async with trio.open_nursery() as nursery:
        specs = probe_specs(journal, (P, T), ids="ab")
        sup = await nursery.start(Supervisor(specs, name="sup").run)
        await actors.cast("a", "crash")
        await trio.testing.wait_all_tasks_blocked()
        a, b = await actors.which_children("sup")
        assert (a.id, a.state, a.restarts) == ("a", "running", 1)
        assert a.last_exit == "RuntimeError: crash a"
        assert (b.id, b.state, b.restarts, b.last_exit) == ("b", "running", 0, None)
        assert await actors.count_children("sup") == {
            "specs": 2,
            "active": 2,
            "supervisors": 0,
            "workers": 2,
        }
        assert (await actors.statistics("a")).restarts == 1
        await actors.terminate_child("sup", "b")
        assert actors.whereis("b") is None
        assert (await actors.which_children("sup"))[1].state == "done"
        await actors.restart_child("sup", "b")
        assert actors.whereis("b") is not None
        await actors.stop(sup)


# ------------------------------------------------------------------------- child specs


async def _noop(task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()


SPEC_SHAPES = [
    (ChildSpec(id="n", start=_noop), "n"),
    ({"id": "n", "start": _noop, "restart": "transient"}, "n"),
    (Probe, "Probe"),  # Actor subclass: Probe.child_spec() -- id is the class name
    (Supervisor([]), "supervisor"),
]


@pytest.mark.parametrize("shape, expected_id", SPEC_SHAPES)
def test_child_specs_are_accepted_in_several_shapes(shape, expected_id):
    assert child_spec(shape).id == expected_id


def test_a_tuple_passes_its_argument_to_child_spec():
    class WithArg(Actor):
        @classmethod
        def child_spec(cls, arg):
            return ChildSpec(id=f"with-{arg}", start=_noop)

    assert child_spec((WithArg, 7)).id == "with-7"


def test_overrides_replace_fields_after_normalising():
    spec = child_spec(Probe, id="p2", restart="temporary")
    assert (spec.id, spec.restart, spec.shutdown) == ("p2", actors.Restart.TEMPORARY, 5.0)


BAD_SPECS = [
    (42, "invalid child spec: 42"),
    ({"id": "x"}, r"missing \['start'\]"),
    ({"id": "x", "start": _noop, "restrat": "permanent"}, r"unknown keys \['restrat'\]"),
    ({"id": "x", "start": _noop, "restart": "always"}, "restart must be one of 'permanent'"),
    ({"id": "x", "start": _noop, "shutdown": -1}, "shutdown must be seconds >= 0"),
    ({"id": "x", "start": "not callable"}, "start must be an async function"),
]


@pytest.mark.parametrize("bad, message", BAD_SPECS)
def test_a_bad_child_spec_error_shows_what_was_received(bad, message):
    with pytest.raises(ChildSpecError, match=message) as info:
        child_spec(bad)
    if "invalid child spec" in str(info.value):
        assert "accepted shapes:" in str(info.value)


def test_supervisor_children_defaults_match_elixir():
    worker = child_spec({"id": "w", "start": _noop})
    sup = child_spec(Supervisor([]))
    assert (worker.restart.value, worker.shutdown, worker.type.value) == (
        "permanent",
        5.0,
        "worker",
    )
    assert (sup.shutdown, sup.type.value) == ("infinity", "supervisor")
    assert (Supervisor([]).max_restarts, Supervisor([]).max_seconds) == (3, 5.0)


def test_duplicate_child_ids_are_rejected():
    with pytest.raises(ValueError, match="duplicated: 'Probe'"):
        Supervisor([Probe, Probe])
