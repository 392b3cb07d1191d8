"""The job supervisor's readers, on records and files written here: which rank is silent
(supervisor.silent_ranks), the tail of an appended JSON-lines file (JsonlTail), the
errors per hook (HookLedger) and the newest complete checkpoint (Telemetry)."""

from __future__ import annotations

import os

from pipelines.daemon.supervisor import HookLedger, JsonlTail, Telemetry, silent_ranks

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


def _checkpoints(root, *steps_done):
    """step-S dirs under root; a step given as (S, "dir") has a manifest.json directory,
    one given as (S, None) no manifest; each manifest file's mtime is NOW + S."""
    for step, manifest in steps_done:
        d = root / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        if manifest == "file":
            (d / "manifest.json").write_text("{}")
            os.utime(d / "manifest.json", (NOW + step, NOW + step))
        elif manifest == "dir":
            (d / "manifest.json").mkdir()


def test_the_newest_checkpoint_is_the_newest_with_a_manifest(tmp_path):
    _checkpoints(tmp_path, (10, "file"), (20, "file"), (30, None))
    tel = Telemetry()
    tel.read(tmp_path, NOW + 100, {10: NOW + 9.0, 20: NOW + 18.5}, "checkpoints")
    # step 30 is still being written; step 20's manifest came 1.5 s after its step
    assert (tel.checkpoint_step, tel.checkpoint_s) == (20, 1.5)


def test_a_manifest_json_directory_is_no_complete_checkpoint(tmp_path):
    _checkpoints(tmp_path, (10, "file"), (20, "dir"))
    tel = Telemetry()
    tel.read(tmp_path, NOW + 100, {10: NOW + 9.0, 20: NOW + 19.0}, "checkpoints")
    assert tel.checkpoint_step == 10


def test_the_hook_ledger_counts_error_records_per_named_hook_and_lists_healthy_ones():
    ledger = HookLedger()
    for record in [{"hook": "norms", "step": 1}, {"hook": "norms", "step": 2, "error": "x"},
                   {"hook": "probe", "step": 2}, {"hook": "", "error": "x"},
                   {"hook": 3, "error": "x"}, {"step": 4, "error": "x"},
                   {"hook": "norms", "step": 3, "error": "y"}]:  # fmt: skip
        ledger.add(record)
    assert ledger.errors == {"norms": 2, "probe": 0}
