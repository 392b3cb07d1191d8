"""Command-line rules that more than one `zerotrain` command reads the same way.

`int_at_least` is the argparse type of every whole-number flag (`run`, `simulate`,
`env`, `keys init`); `flag_overrides` is how `run`/`simulate` (pipelines.cli) and
`submit` (pipelines.daemon.client) turn `--set` and the flag shorthands (--ranks --mode
--steps --seed --model) into config overrides, so a submitted job and a run started by
hand read the same flags into the same config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["SHORTHAND_KEYS", "flag_overrides", "int_at_least"]

# flag (its argparse dest) -> the config key it stands for
SHORTHAND_KEYS = (
    ("ranks", "cluster.ranks"),
    ("mode", "cluster.mode"),
    ("steps", "train.steps"),
    ("seed", "train.seed"),
)


def int_at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse `type=` that accepts a whole number >= `least` (and <= `most`);
    anything else fails with one line naming what is accepted and what was given."""
    if most is not None:
        accepted = f"an integer from {least} to {most}"
    else:
        accepted = "a positive integer" if least == 1 else f"an integer >= {least}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


def flag_overrides(args: argparse.Namespace, model: str | None) -> list[str]:
    """`--set` overrides, then one per shorthand flag given, then the file model `model`
    (PATH.py:NAME) if any: later overrides win, so a flag beats a `--set` of its key."""
    import json

    overrides = list(args.overrides)
    for flag, key in SHORTHAND_KEYS:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if model is not None:
        overrides.append(f"model.name={json.dumps('file:' + model)}")
    return overrides
