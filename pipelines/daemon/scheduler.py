"""Which queued jobs start now, within the daemon's CPU budget.

A job needs ``ranks`` CPUs (one per rank process; the coordinator and the analyzer
mostly wait). Jobs run side by side while their CPUs add up to at most the budget.
Waiting jobs are taken by priority (higher first), then by submission order (lower id
first), and the order is strict: when the next job in line does not fit, nothing behind
it starts either, even a smaller job that would fit. So a large job is never starved by
a stream of small ones; the price is some idle CPUs while it waits for room.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["queue_order", "to_start"]


def queue_order(queued: Iterable) -> list:
    """Queued jobs in the order they start: priority descending, then id ascending."""
    return sorted(queued, key=lambda job: (-job.priority, job.id))


def to_start(queued: Iterable, cpus_in_use: int, budget: int) -> list:
    """The jobs to start now, in order (see the module doc for the rule)."""
    free = budget - cpus_in_use
    chosen = []
    for job in queue_order(queued):
        if job.ranks > free:
            break
        chosen.append(job)
        free -= job.ranks
    return chosen
