"""Shared fixtures for the actors tests (a conftest is not importable under
--import-mode=importlib: helpers come as fixtures; actor classes and async helpers used
by several files live in tests/actors/actor_util.py)."""

import pytest


@pytest.fixture(params=["frames", "lanes"])
def wire(request):
    """How a Ring moves tensors between neighbours: "lanes" (shared-memory lanes, the
    default) or "frames" (ZeroMQ frames only, lanes=False). The worker scripts take it
    as `--wire NAME`."""
    return request.param
