"""The job supervisor's readers, on records and files written here: which rank is silent
(supervisor.silent_ranks) and the tail of an appended JSON-lines file (JsonlTail)."""

from __future__ import annotations

from pipelines.daemon.supervisor import JsonlTail, silent_ranks

NOW = 1_000_000.0
HB = 2.0


def rank(r, phase, step, since_ago, written_ago=0.1) -> dict:
    return {"rank": r, "phase": phase, "step": step, "since": NOW - since_ago,
            "t": NOW - written_ago}  # fmt: skip


def test_a_rank_in_its_step_past_the_heartbeat_timeout_while_another_waits_is_silent():
    records = {0: rank(0, "collective", 59, 2.4), 1: rank(1, "step", 59, 2.5)}
    assert silent_ranks(records, HB, NOW) == {1: "silent: step 60 not done in 2.5s, rank 0 waits"}
    # within the timeout it is only slow
    records[1] = rank(1, "step", 59, 1.5)
    assert silent_ranks(records, HB, NOW) == {}


def test_a_rank_that_writes_nothing_while_another_waits_is_silent():
    # its event loop stopped mid-collective: the record is old, whatever it says
    records = {0: rank(0, "collective", 59, 3.0), 1: rank(1, "collective", 59, 3.0, 2.6)}
    assert silent_ranks(records, HB, NOW) == {1: "silent: no telemetry for 2.6s, rank 0 waits"}
    # one write interval (0.5 s) late is the normal age of a record
    records[1] = rank(1, "collective", 59, 3.0, 2.4)
    assert silent_ranks(records, HB, NOW) == {}


def test_no_rank_is_silent_while_none_waits_or_while_it_is_busy_elsewhere():
    # every rank computing a long step: nobody waits for anybody
    assert silent_ranks({0: rank(0, "step", 59, 9), 1: rank(1, "step", 59, 9)}, HB, NOW) == {}
    # rank 0 evaluates (or joins, or waits for a stop decision) while rank 1 waits
    for busy in ("eval", "join", "stop"):
        records = {0: rank(0, busy, 60, 9), 1: rank(1, "collective", 60, 9)}
        assert silent_ranks(records, HB, NOW) == {}, busy
    # the waiting rank is behind the other: it does not wait for that one
    records = {0: rank(0, "collective", 58, 9), 1: rank(1, "step", 59, 9)}
    assert silent_ranks(records, HB, NOW) == {}


def test_a_jsonl_tail_returns_each_complete_object_once(tmp_path):
    path = tmp_path / "hooks.jsonl"
    tail = JsonlTail(path)
    assert tail.read() == []  # no file yet
    path.write_text('{"step": 1}\nnot json\n[1, 2]\n{"step": 2')
    assert tail.read() == [{"step": 1}]  # the last line is still being written
    with open(path, "a") as f:
        f.write(', "error": "x"}\n')
    assert tail.read() == [{"step": 2, "error": "x"}]
    assert tail.read() == []


def test_a_rank_that_writes_nothing_is_silent_whatever_its_phase_and_names_every_waiter():
    # its last record says it evaluates, but nothing came for 2.6 s: its loop stopped
    records = {0: rank(0, "eval", 60, 9, 2.6), 1: rank(1, "collective", 60, 9)}
    assert silent_ranks(records, HB, NOW) == {0: "silent: no telemetry for 2.6s, rank 1 waits"}
    # two ranks wait for the one still in its step
    records = {0: rank(0, "collective", 59, 3), 1: rank(1, "step", 59, 2.5),
               2: rank(2, "collective", 59, 3)}  # fmt: skip
    assert silent_ranks(records, HB, NOW) == {
        1: "silent: step 60 not done in 2.5s, ranks [0, 2] wait"
    }
