"""The `--chaos SPEC` grammar of `zerotrain simulate` (parsing and validation only).

SPEC is `;`-separated events `KIND:key=value,...`:

    kill:rank=R,step=S[,at=P]        SIGKILL rank R when it reaches step S; P is where in
                                     the step: start (default), compute, reduce, gather,
                                     checkpoint (after its shard file of step S is written)
    term:rank=R,step=S[,at=P]        SIGTERM
    stall:rank=R,step=S,seconds=T    SIGSTOP, then SIGCONT after T seconds
    hang:rank=R,step=S               rank R's step never ends, its heartbeats go on (a
                                     stuck computation: the process looks alive)
    delay:rank=R,ms=M                M ms added to every send of rank R
    straggler:rank=R,factor=F        rank R computes F times slower (F >= 1)
    random-kill:every=K,seed=X       SIGKILL a random rank every K steps (seeded)
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError

__all__ = ["ChaosEvent", "parse_chaos"]

# kind -> {key: type}; every key is required except those in OPTIONAL.
KINDS: dict[str, dict[str, type]] = {
    "kill": {"rank": int, "step": int},
    "term": {"rank": int, "step": int},
    "stall": {"rank": int, "step": int, "seconds": float},
    "hang": {"rank": int, "step": int},
    "delay": {"rank": int, "ms": float},
    "straggler": {"rank": int, "factor": float},
    "random-kill": {"every": int, "seed": int},
}
PHASES = ("start", "compute", "reduce", "gather", "checkpoint")
OPTIONAL: dict[str, dict[str, type]] = {"kill": {"at": str}, "term": {"at": str}}


@dataclass(frozen=True)
class ChaosEvent:
    kind: str
    args: dict


def _event(text: str, ranks: int) -> ChaosEvent:
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ConfigError(
            f"--chaos: expected an event kind of {', '.join(KINDS)}, got "
            f"{kind!r} in {text.strip()!r}"
        )
    schema = dict(KINDS[kind], **OPTIONAL.get(kind, {}))
    args = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in schema:
            raise ConfigError(
                f"--chaos {kind}: expected keys {', '.join(schema)} as key=value, got {item!r}"
            )
        try:
            args[key] = schema[key](value)
        except ValueError:
            raise ConfigError(
                f"--chaos {kind}.{key}: expected "
                f"{'an integer' if schema[key] is int else 'a number'}, got "
                f"{value!r}"
            ) from None
    missing = [k for k in KINDS[kind] if k not in args]
    if missing:
        raise ConfigError(
            f"--chaos {kind}: missing {', '.join(missing)} (expected "
            f"{kind}:" + ",".join(f"{k}=..." for k in schema) + ")"
        )
    if "rank" in args and not 0 <= args["rank"] < ranks:
        raise ConfigError(f"--chaos {kind}.rank: expected 0 <= rank < {ranks}, got {args['rank']}")
    for key in ("step", "every"):
        if key in args and args[key] < (1 if key == "every" else 0):
            raise ConfigError(f"--chaos {kind}.{key}: expected a positive integer, got {args[key]}")
    for key in ("seconds", "ms"):
        if key in args and args[key] < 0:
            raise ConfigError(f"--chaos {kind}.{key}: expected >= 0, got {args[key]}")
    if kind == "straggler" and args["factor"] < 1:
        raise ConfigError(f"--chaos straggler.factor: expected >= 1, got {args['factor']}")
    if "at" in args and args["at"] not in PHASES:
        raise ConfigError(
            f"--chaos {kind}.at: expected one of {', '.join(PHASES)}, got {args['at']!r}"
        )
    return ChaosEvent(kind, args)


def parse_chaos(spec: str, ranks: int) -> list[ChaosEvent]:
    """Events of a SPEC for a world of `ranks`; ConfigError (one line) when malformed."""
    events = [_event(part, ranks) for part in spec.split(";") if part.strip()]
    if not events:
        raise ConfigError(
            f"--chaos: expected at least one event such as kill:rank=1,step=10, got {spec!r}"
        )
    return events
