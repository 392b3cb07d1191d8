"""Reaching a run's control channel (pipelines.cluster.live) when there is no run to
reach: each case is a LiveError of one line saying why, from real files and a real node
(the trained-run cases are in test_live.py)."""

from __future__ import annotations

import json

import pytest

from pipelines.cluster import messages as m
from pipelines.cluster.live import LiveError, call_run, run_endpoint

TOKEN = "ab" * 16


def _run_dir(tmp_path, plan=None, token: str | None = TOKEN):
    ipc = tmp_path / "ipc"
    ipc.mkdir(mode=0o700)
    if token is not None:
        (ipc / "token").write_text(token + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if plan is not False:
        (run_dir / "plan.json").write_text(
            json.dumps({"ipc_dir": str(ipc)} if plan is None else plan)
        )
    return run_dir, ipc


def _refusal(run_dir) -> str:
    with pytest.raises(LiveError) as err:
        run_endpoint(run_dir)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_endpoint_of_a_run_is_its_ipc_dir_and_its_token_without_the_newline(tmp_path):
    run_dir, ipc = _run_dir(tmp_path)
    assert run_endpoint(run_dir) == (str(ipc), TOKEN)


def test_a_dir_that_is_no_running_cluster_run_is_refused_saying_why(tmp_path):
    run_dir, ipc = _run_dir(tmp_path, plan=False)
    assert _refusal(run_dir) == (
        f"{run_dir} has no readable plan.json: not a cluster run that trains now "
        "(a --ranks 1 run has no control channel)"
    )
    (run_dir / "plan.json").write_text(json.dumps({"ipc_dir": str(tmp_path / "gone")}))
    assert _refusal(run_dir) == f"the run in {run_dir} is not running (its ipc directory is gone)"
    (run_dir / "plan.json").write_text(json.dumps([str(ipc)]))
    assert _refusal(run_dir) == f"the run in {run_dir} is not running (its ipc directory is gone)"
    (run_dir / "plan.json").write_text(json.dumps({"ipc_dir": str(ipc)}))
    (ipc / "token").unlink()
    assert _refusal(run_dir) == f"cannot read the run's token in {ipc}: No such file or directory"


def test_a_call_to_a_run_whose_coordinator_is_not_there_is_a_live_error(tmp_path):
    run_dir, _ = _run_dir(tmp_path)  # its files, but no node listening: the run ended
    with pytest.raises(LiveError, match=r"^the run (cannot be reached|did not answer within)"):
        call_run(run_dir, m.RunStatus(), timeout=5.0)
