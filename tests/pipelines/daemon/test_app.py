"""The daemon's answers from its job table, without serving: what `status`, `jobs` and
the HTTP snapshot list once many jobs have ended (pipelines.daemon.app)."""

from __future__ import annotations

import pytest
import trio

from pipelines.daemon import protocol
from pipelines.daemon.app import Daemon
from pipelines.daemon.jobs import JobState
from pipelines.daemon.statedir import RECENT_ENDED, DaemonUsageError


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state", cpus=2, http=None)
    d.open()
    yield d
    d.table.close()
    d.state.release()


def _fill(table, ended: int, queued: int) -> list[int]:
    ids = []
    for i in range(ended + queued):
        job = table.add(
            name=f"n{i}",
            pipeline="mlp_classifier",
            config={"train": {"steps": 3}},
            config_hash="h",
            argv=[],
            cwd="/",
            ranks=2,
            priority=0,
            run_dir_for=lambda j: f"/runs/job-{j}",
        )
        if i < ended:
            table.update(job.id, state=JobState.DONE, ended=float(i))
        ids.append(job.id)
    return ids


def test_status_and_the_snapshot_list_the_present_and_jobs_all_every_job(daemon):
    ids = _fill(daemon.table, ended=RECENT_ENDED + 30, queued=2)
    present = ids[30:]  # the last RECENT_ENDED ended, then the two queued
    status = trio.run(daemon.handle, protocol.JobStatus(""))
    assert [j["id"] for j in status["jobs"]] == present
    assert status["daemon"]["jobs"] == {"done": RECENT_ENDED + 30, "queued": 2}
    daemon._publish()
    assert [j["id"] for j in daemon.snapshot["jobs"]] == present
    every = trio.run(daemon.handle, protocol.ListJobs(True))
    assert [j["id"] for j in every] == ids
    assert [j["id"] for j in trio.run(daemon.handle, protocol.ListJobs(False))] == ids[-2:]
    old = trio.run(daemon.handle, protocol.JobStatus("3"))  # an old job: from the database
    assert (old["id"], old["name"], old["state"]) == (3, "n2", "done")
    assert trio.run(daemon.handle, protocol.JobStatus("n5"))["id"] == 6


def test_an_unknown_job_is_answered_with_the_newest_twenty_and_how_many_are_older(daemon):
    _fill(daemon.table, ended=25, queued=0)
    with pytest.raises(DaemonUsageError) as err:
        trio.run(daemon.handle, protocol.JobStatus("nope"))
    message = str(err.value)
    assert message.startswith("zerotrain status: unknown job 'nope'; known jobs: 6 (n5, done),")
    assert message.endswith("25 (n24, done) and 5 older")
