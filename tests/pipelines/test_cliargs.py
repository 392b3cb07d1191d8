"""The command-line rules several zerotrain commands share (pipelines.cliargs)."""

import argparse

import pytest

from pipelines.cliargs import flag_overrides, int_at_least
from pipelines.config import load_config


@pytest.mark.parametrize(("least", "text", "value"), [(1, "1", 1), (1, "40", 40), (0, "0", 0)])
def test_a_whole_number_at_least_the_bound_is_accepted(least, text, value):
    assert int_at_least(least)(text) == value


@pytest.mark.parametrize(
    ("least", "text", "accepted"),
    [
        (1, "0", "a positive integer"),
        (1, "-3", "a positive integer"),
        (1, "2.5", "a positive integer"),
        (0, "-1", "an integer >= 0"),
        (0, "many", "an integer >= 0"),
    ],
)
def test_anything_else_is_one_line_naming_what_is_accepted(least, text, accepted):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        int_at_least(least)(text)
    assert str(info.value) == f"expected {accepted}, got {text!r}"


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("19", 19), ("10", 10)])
def test_a_whole_number_within_both_bounds_is_accepted(text, value):
    assert int_at_least(0, 19)(text) == value


@pytest.mark.parametrize("text", ["20", "-1", "x"])
def test_outside_both_bounds_is_one_line_naming_the_range(text):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        int_at_least(0, 19)(text)
    assert str(info.value) == f"expected an integer from 0 to 19, got {text!r}"


def _args(**flags):
    given = dict.fromkeys(("ranks", "mode", "steps", "seed"))
    return argparse.Namespace(**{**given, "overrides": [], **flags})


def test_a_flag_beats_a_set_of_its_key_and_the_other_sets_stay():
    args = _args(overrides=["train.steps=5", "train.seed=3"], steps=7, mode="zero1")
    cfg = load_config("mlp_classifier", flag_overrides(args, None))
    assert (cfg.train.steps, cfg.train.seed, cfg.cluster.mode) == (7, 3, "zero1")


def test_flags_not_given_add_nothing_and_a_file_model_is_a_file_spec():
    assert flag_overrides(_args(), None) == []
    assert flag_overrides(_args(ranks=2), "m.py:Net") == [
        "cluster.ranks=2",
        'model.name="file:m.py:Net"',
    ]
