import sqlite3

import pytest

from pipelines.daemon.jobs import JobState, JobTable
from pipelines.daemon.statedir import DaemonUsageError, StateDir


def _add(table, name=""):
    return table.add(
        name=name,
        pipeline="mlp_classifier",
        config={"train": {"steps": 3}},
        config_hash="h",
        argv=["--set", "train.steps=3"],
        cwd="/",
        ranks=2,
        priority=0,
        run_dir_for=lambda i: f"/runs/job-{i}",
    )


def test_a_job_and_its_state_survive_reopening_the_table(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite3")
    job = _add(table)
    assert (job.name, job.run_dir, job.state) == ("job-1", "/runs/job-1", JobState.QUEUED)
    table.update(job.id, state=JobState.RUNNING, summary={"params_sha256": "x"}, step=7)
    table.close()
    again = JobTable(tmp_path / "jobs.sqlite3").get(job.id)
    assert again.state == JobState.RUNNING and again.step == 7
    assert again.summary == {"params_sha256": "x"} and again.argv == ["--set", "train.steps=3"]
    assert sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA journal_mode").fetchone() == (
        "wal",
    )


def test_a_table_of_another_shape_is_refused_not_altered(tmp_path, raises_one_line):
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, what TEXT)")
    db.commit()
    db.close()
    with raises_one_line(DaemonUsageError, match="lacks columns .*'config'"):
        JobTable(path)
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")]
    assert cols == ["id", "what"]


def test_the_state_dir_is_private_and_has_one_owner(tmp_path, raises_one_line):
    first = StateDir(tmp_path / "s")
    first.acquire()
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    with raises_one_line(DaemonUsageError, match=r"in use by the daemon with pid \d+"):
        StateDir(tmp_path / "s").acquire()
    first.release()
    StateDir(tmp_path / "s").acquire()  # released: free again


def test_unknown_columns_are_not_written(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite3")
    job = _add(table)
    with pytest.raises(KeyError):
        table.update(job.id, **{"state = 'done', step": 1})


def test_reads_show_every_update_though_rows_are_parsed_once(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite3")
    first, second = _add(table), _add(table)
    assert table.get(first.id) is table.get(first.id)  # parsed once, then shared
    table.update(first.id, state=JobState.DONE, summary={"params_sha256": "y"}, step=3)
    done = table.get(first.id)
    assert (done.state, done.step, done.summary) == (JobState.DONE, 3, {"params_sha256": "y"})
    assert [j.state for j in table.all()] == [JobState.DONE, JobState.QUEUED]
    assert [j.id for j in table.all({JobState.QUEUED})] == [second.id]
    assert table.get(99) is None
