from dataclasses import dataclass

from pipelines.daemon.scheduler import queue_order, to_start


@dataclass
class J:
    id: int
    ranks: int
    priority: int = 0


def test_queued_jobs_go_by_priority_then_submission_order():
    jobs = [J(1, 1), J(2, 1, priority=5), J(3, 1), J(4, 1, priority=5)]
    assert [j.id for j in queue_order(jobs)] == [2, 4, 1, 3]


def test_jobs_start_while_their_cpus_fit_the_budget():
    jobs = [J(1, 2), J(2, 1), J(3, 1)]
    assert [j.id for j in to_start(jobs, cpus_in_use=0, budget=4)] == [1, 2, 3]
    assert [j.id for j in to_start(jobs, cpus_in_use=1, budget=4)] == [1, 2]
    assert to_start(jobs, cpus_in_use=3, budget=4) == []  # the head needs 2: nobody passes


def test_a_small_job_does_not_pass_a_large_one_that_waits_for_room():
    jobs = [J(1, 4), J(2, 1)]
    assert to_start(jobs, cpus_in_use=2, budget=4) == []
