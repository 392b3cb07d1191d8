"""RUN/overrides.jsonl and RUN/hooks_live.jsonl (pipelines.store.overrides), as files: what
is appended is read back in order, a malformed overrides line is named in one line, a
torn hooks line is skipped, and live hooks' windows follow their attach and detach
records. The runs that write and replay them are in tests/pipelines/cluster/test_live.py."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.store.overrides import (
    HOOKS_FILE,
    OVERRIDES_FILE,
    OverridesError,
    append_override,
    hook_windows,
    read_live_hooks,
    read_overrides,
)


def _hook(step, action, name, every=1):
    return {"step": step, "action": action, "spec": f"/abs/{name}.py", "name": name,
            "every": every, "exact": False}  # fmt: skip


def test_appended_overrides_are_read_back_in_order(tmp_path):
    assert read_overrides(tmp_path / OVERRIDES_FILE) == []  # none yet
    records = [
        {"step": 57, "key": "optimizer.lr", "value": 0.0005},
        {"step": 3, "key": "train.clip_norm", "value": 1},
        {"step": 60, "key": "eval.split", "value": "train"},
    ]
    for rec in records:
        append_override(tmp_path, rec)
    assert read_overrides(tmp_path / OVERRIDES_FILE) == records


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"step": -1, "key": "optimizer.lr", "value": 0.1}',
        '{"step": 1.0, "key": "optimizer.lr", "value": 0.1}',
        '{"step": 1, "key": "optimizer.lr", "value": [0.1]}',
        '{"step": 1, "key": "optimizer.lr", "value": 0.1, "at": 2}',
    ],
)
def test_a_malformed_overrides_line_is_named_in_one_line(tmp_path, line):
    path = tmp_path / OVERRIDES_FILE
    path.write_text('{"step": 1, "key": "optimizer.lr", "value": 0.1}\n\n' + line + "\n")
    with pytest.raises(OverridesError) as info:
        read_overrides(path)
    assert str(info.value) == (
        f"{path} line 3: expected a JSON object "
        '{"step": int >= 0, "key": "section.key", "value": number, string or bool}'
    )


def test_live_hooks_skip_a_torn_last_line_and_records_that_are_not_theirs(tmp_path):
    assert read_live_hooks(tmp_path) == []
    append_override(tmp_path, _hook(4, "attach", "probe"), HOOKS_FILE)
    append_override(tmp_path, {**_hook(5, "attach", "x"), "every": 0}, HOOKS_FILE)
    with open(tmp_path / HOOKS_FILE, "a") as f:
        f.write(json.dumps(_hook(9, "detach", "probe"))[:30])  # killed mid-write
    assert read_live_hooks(tmp_path) == [_hook(4, "attach", "probe")]


def test_a_hook_sees_the_steps_between_its_attach_and_its_detach():
    records = [
        _hook(10, "attach", "probe"),
        _hook(20, "detach", "probe"),
        _hook(15, "detach", "builtin"),  # a hook the run started with: after 0
        _hook(30, "attach", "late"),
    ]
    assert hook_windows(records) == {
        "probe": (10, 20),
        "builtin": (0, 15),
        "late": (30, math.inf),
    }
