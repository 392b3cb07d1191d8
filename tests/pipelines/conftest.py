"""Shared fixtures for the pipeline tests (a conftest is not importable under
--import-mode=importlib: helpers come as fixtures)."""

import contextlib

import pytest


@pytest.fixture
def raises_one_line():
    """``with raises_one_line(ValueError, match="..."):`` -- pytest.raises that also
    requires the message to be one line (the project's rule for bad input)."""

    @contextlib.contextmanager
    def check(exception, match):
        with pytest.raises(exception, match=match) as info:
            yield info
        assert "\n" not in str(info.value), f"not one line: {str(info.value)!r}"

    return check
