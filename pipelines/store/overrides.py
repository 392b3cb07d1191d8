"""RUN/overrides.jsonl and RUN/hooks_live.jsonl: what a running job was told to change,
one JSON object a line, in the order it was decided.

The live overrides (`zerotrain set`)::

    {"step": 57, "key": "optimizer.lr", "value": 0.0005}

An override of step N governs what the run decides with N steps completed and after
(pipelines.config.LiveConfig). The file is the run's record of them: every recovery
(a rank restarted from a replica or a checkpoint) and every ``--resume`` replays them, and
``zerotrain run --overrides FILE`` applies such a file to a fresh run. A line is appended
and fsynced before any rank applies it, so a run killed at any point finds every
override it may have acted on.

The analyzers attached and detached live (`zerotrain hook attach|detach`)::

    {"step": 40, "action": "attach", "spec": "/abs/probe.py", "name": "probe",
     "every": 5, "exact": false}

An analyzer attached at step S sees the steps after S; one detached at D the steps up to
D. The ranks read the file's records from their Plan (which steps to sample), the
analyzer process from the file itself (which hooks to run on which steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "HOOKS_FILE",
    "OVERRIDES_FILE",
    "OverridesError",
    "append_override",
    "hook_windows",
    "is_live_hook",
    "read_live_hooks",
    "read_overrides",
]

OVERRIDES_FILE = "overrides.jsonl"
HOOKS_FILE = "hooks_live.jsonl"
_HOOK_KEYS = {"step", "action", "spec", "name", "every", "exact"}


class OverridesError(ValueError):
    """An overrides file that cannot be read as one; the text names the file and line."""


def read_overrides(path) -> list[dict]:
    """The records of an overrides file ([] when it does not exist); OverridesError for a
    line that is not ``{"step": int >= 0, "key": str, "value": number, string or bool}``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise OverridesError(f"{path}: cannot be read: {err}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not (
            isinstance(rec, dict)
            and set(rec) == {"step", "key", "value"}
            and type(rec["step"]) is int
            and rec["step"] >= 0
            and isinstance(rec["key"], str)
            and isinstance(rec["value"], int | float | str | bool)
        ):
            raise OverridesError(
                f"{path} line {n}: expected a JSON object "
                '{"step": int >= 0, "key": "section.key", "value": number, string or bool}'
            )
        records.append(rec)
    return records


def is_live_hook(rec) -> bool:
    """Whether `rec` is a record of RUN/hooks_live.jsonl (see the module doc)."""
    return (
        isinstance(rec, dict)
        and set(rec) == _HOOK_KEYS
        and type(rec["step"]) is int
        and rec["step"] >= 0
        and rec["action"] in ("attach", "detach")
        and isinstance(rec["spec"], str | dict)
        and isinstance(rec["name"], str)
        and type(rec["every"]) is int
        and rec["every"] >= 1
        and isinstance(rec["exact"], bool)
    )


def read_live_hooks(run_dir) -> list[dict]:
    """The records of RUN/hooks_live.jsonl ([] when there is none); a line that is not a
    record (a torn last write) is skipped."""
    try:
        lines = (Path(run_dir) / HOOKS_FILE).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if is_live_hook(rec):
            records.append(rec)
    return records


def hook_windows(records: list[dict]) -> dict[str, tuple[int, float]]:
    """name -> (after, until): the steps t with after < t <= until that a hook attached
    or detached live by `records` may see (until: inf while attached). A hook with no
    attach record (one the run started with) has after 0."""
    windows: dict[str, tuple[int, float]] = {}
    for rec in records:
        after, _ = windows.get(rec["name"], (0, float("inf")))
        if rec["action"] == "attach":
            windows[rec["name"]] = (rec["step"], float("inf"))
        else:
            windows[rec["name"]] = (after, rec["step"])
    return windows


def append_override(run_dir, record: dict, file: str = OVERRIDES_FILE) -> None:
    """Append one record to RUN/`file` (RUN/overrides.jsonl by default) and make it
    durable (one O_APPEND write, then fsync)."""
    data = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
    fd = os.open(Path(run_dir) / file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
