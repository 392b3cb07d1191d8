"""The daemon verbs' command line (pipelines.daemon.commands): every verb parses, a
malformed `set` is refused in one line before any daemon is asked, and `status` prints
a job's fields or the daemon's line. The verbs against a running daemon are in
test_daemon.py and test_live_control.py."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from pipelines.daemon import DAEMON_COMMANDS, commands
from tests.pipelines.cli_util import cli, one_line

VERBS = {
    "serve": ["--cpus", "2", "--http", "off"],
    "submit": ["mlp_classifier", "--ranks", "2", "--priority", "3"],
    "jobs": ["--all"],
    "status": ["7"],
    "pause": ["7", "--wait"],
    "resume": ["7"],
    "stop": ["7"],
    "cancel": ["7"],
    "logs": ["7", "-f"],
    "export": ["7", "out.safetensors"],
    "checkpoint": ["7"],
    "set": ["7", "optimizer.lr=3e-4", "--at-step", "40"],
    "hook": ["attach", "7", "probe.py:probe"],
}


def test_every_daemon_verb_has_its_parser():
    import argparse

    parser = argparse.ArgumentParser()
    commands.register_daemon_commands(parser.add_subparsers(dest="command"))
    assert sorted(VERBS) == sorted(DAEMON_COMMANDS)
    for verb, args in VERBS.items():
        parsed = parser.parse_args([verb, *args, "--state-dir", "/nowhere"])
        assert parsed.command == verb and parsed.state_dir == "/nowhere"


def test_serve_runs_jobs_10_nice_levels_below_the_daemon_unless_told():
    serve = _verb_parsers("serve")["serve"]
    assert serve.parse_args([]).job_nice == 10
    assert serve.parse_args(["--job-nice", "0"]).job_nice == 0


def _verb_parsers(verb: str | None) -> dict:
    import argparse

    sub = argparse.ArgumentParser(prog="zerotrain").add_subparsers(dest="command")
    commands.register_daemon_commands(sub, verb)
    return sub.choices


def test_a_verbs_own_parser_is_the_one_the_full_command_line_builds_for_it():
    # `zerotrain VERB` builds VERB's parser alone (pipelines.cli._daemon_parser)
    full = _verb_parsers(None)
    assert sorted(full) == sorted(DAEMON_COMMANDS)
    for verb in DAEMON_COMMANDS:
        alone = _verb_parsers(verb)
        assert list(alone) == [verb]
        assert alone[verb].format_help() == full[verb].format_help(), verb
        parsed = alone[verb].parse_args([*VERBS[verb], "--state-dir", "/nowhere"])
        assert parsed == full[verb].parse_args([*VERBS[verb], "--state-dir", "/nowhere"])


@pytest.mark.parametrize("assignment", ["optimizer.lr", "=3e-4", "optimizer.lr= "])
def test_a_set_that_is_not_key_equals_value_is_refused_before_any_daemon(
    capsys, tmp_path, assignment
):
    code, out, err = cli(capsys, "set", "7", assignment, "--state-dir", tmp_path / "none")
    assert code == 2 and out == ""
    assert one_line(err) == (
        "zerotrain set: expected KEY=VALUE (e.g. optimizer.lr=3e-4), got "
        f"{assignment!r}; nothing changed"
    )


def test_status_prints_a_jobs_fields_without_its_config_and_summary():
    out = io.StringIO()
    reply = {"id": 7, "name": "job-7", "state": "running", "step": None,
             "config": {"x": 1}, "summary": {"loss": 1.0}}  # fmt: skip
    commands._print_status(reply, SimpleNamespace(json=False, job="7"), out)
    # one column as wide as the longest key ("summary", though not printed); None as ""
    assert out.getvalue().splitlines() == [
        "id       7",
        "name     job-7",
        "state    running",
        "step     ",
    ]


def test_status_without_a_job_prints_the_daemons_line_and_its_jobs():
    out = io.StringIO()
    daemon = {"pid": 42, "state_dir": "/s", "cpus_in_use": 2, "cpus": 4, "http": None}
    commands._print_status({"daemon": daemon, "jobs": []}, SimpleNamespace(json=False, job=""), out)
    first = out.getvalue().splitlines()[0]
    assert first == "daemon pid 42 at /s: 2 of 4 cpus in use, http off"
