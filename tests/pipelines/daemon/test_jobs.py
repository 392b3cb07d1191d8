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


def _end(table, job, when):
    table.update(job.id, state=JobState.DONE, ended=when, summary={"params_sha256": "z"})


def test_a_listing_of_the_present_is_the_jobs_not_ended_and_the_last_ended(tmp_path):
    table = JobTable(tmp_path / "jobs.sqlite3")
    jobs = [_add(table, name="a" if i % 2 else "b") for i in range(8)]
    for job, when in zip(jobs[:6], [5.0, 1.0, 6.0, 2.0, 3.0, 4.0], strict=True):
        _end(table, job, when)
    table.update(jobs[6].id, state=JobState.RUNNING)
    # ended last: jobs[2] (6.0) and jobs[0] (5.0); not ended: jobs[6], jobs[7]
    assert [j.id for j in table.recent(2)] == [jobs[i].id for i in (0, 2, 6, 7)]
    assert [j.id for j in table.recent(0)] == [jobs[6].id, jobs[7].id]
    assert table.counts() == {"done": 6, "queued": 1, "running": 1}
    assert table.named("a").id == jobs[7].id and table.named("c") is None
    assert [j.id for j in table.all({JobState.DONE, JobState.RUNNING})] == [j.id for j in jobs[:7]]


def test_ended_jobs_are_read_from_the_database_not_held_in_memory(tmp_path):
    """A long-lived daemon's history stays on disk: reading every ended job (as `jobs
    --all` does) keeps only ``ended_cached`` of them parsed."""
    import tracemalloc

    table = JobTable(tmp_path / "jobs.sqlite3", ended_cached=4)
    big = {"train": {"steps": 3}, "note": "x" * 20_000}
    for i in range(150):
        job = _add(table)
        table.update(job.id, config=big)
        _end(table, job, float(i))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert len(table.all()) == 150 and table.get(1).config["note"] == big["note"]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 500_000, f"{held} bytes still held after reading 150 ended jobs of 20 KB"


def _vm_steps(table, read) -> int:
    """SQLite virtual-machine instructions ``read`` costs (counted every 100)."""
    steps = [0]

    def count():
        steps[0] += 1

    table.db.set_progress_handler(count, 100)
    try:
        read()
    finally:
        table.db.set_progress_handler(None, 100)
    return steps[0] * 100


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.recent(20),
        lambda t: t.all({JobState.QUEUED, JobState.RUNNING}),
        lambda t: t.named("n5"),
        lambda t: t.newest(20),
    ],
    ids=["recent", "not_ended", "named", "newest"],
)
def test_what_the_daemon_reads_each_second_costs_the_same_for_a_long_history(tmp_path, read):
    costs = []
    for history in (100, 1000):
        table = JobTable(tmp_path / f"{history}.sqlite3", ended_cached=0)
        table.db.execute("BEGIN")
        for i in range(history):  # ended jobs, straight into the table
            table.db.execute(
                "INSERT INTO jobs (name, pipeline, config, config_hash, argv, cwd, ranks, "
                "priority, state, run_dir, submitted, ended) "
                "VALUES (?, 'p', '{}', 'h', '[]', '/', 1, 0, 'done', '/r', ?, ?)",
                (f"n{i}", float(i), float(i)),
            )
        table.db.execute("COMMIT")
        _add(table), _add(table)
        costs.append(_vm_steps(table, lambda table=table: read(table)))
        table.close()
    assert costs[1] <= costs[0] + 200, f"{costs[0]} -> {costs[1]} VM steps for 10x the history"
