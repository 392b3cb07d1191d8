"""Slurm host lists: `expand_hostlist("rack[1-2]-n[01-02]")` is the list of host names
`scontrol show hostnames` prints for the same text, in the same order.

The grammar this accepts (what Slurm writes into SLURM_JOB_NODELIST and
SLURM_STEP_NODELIST, and what users write after `-w`):

    list   := entry ("," entry)*          empty entries are skipped, as scontrol does
    entry  := NAME                        a plain host name
            | (NAME? "[" ranges "]")+     each bracket a factor of a product: with two,
                                          the first is the slowest (rack[1-2]-n[01-02]
                                          is rack1-n01, rack1-n02, rack2-n01, rack2-n02);
                                          with more, scontrol's order (_expand_entry)
    ranges := range ("," range)*
    range  := DIGITS | DIGITS "-" DIGITS  lo <= hi; printed zero-padded to len(lo):
                                          n[098-100] is n098 n099 n100, n[1-03] n1 n2 n3

Duplicates are kept (`x[1-2],x1` is x1 x2 x1). Text after the last `]` is refused
(scontrol 22.05 calls `a[1-2]x` an invalid host list). Whitespace, a stray bracket, an
empty or reversed range, and more than MAX_HOSTS names are refused with one line naming
the list and what is wrong; those are the cases where scontrol errs too, or prints
something no scheduler produces (`a[1-2` comes out as `a]`).

tests/pipelines/launch/test_hostlist.py compares this with the real scontrol on generated
lists (a hypothesis property test).
"""

from __future__ import annotations

import itertools
import re

__all__ = ["MAX_HOSTS", "HostlistError", "expand_hostlist"]

# Slurm refuses a range of more than 64 Ki hosts; a whole list this long is a mistake too.
MAX_HOSTS = 65536

_NAME = re.compile(r"[^\[\],\s]+")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class HostlistError(ValueError):
    """A host list that is not in the grammar above (the message is one line)."""


def expand_hostlist(text: str) -> list[str]:
    """The host names of a Slurm host list, in scontrol's order, duplicates kept.

    Raises HostlistError naming the list and the problem for anything outside the
    grammar in this module's docstring, or when the list names no host at all.
    """
    hosts: list[str] = []
    for entry in _split_top_level(text):
        if entry:
            hosts.extend(_expand_entry(entry, text))
            if len(hosts) > MAX_HOSTS:
                raise HostlistError(f"host list {text!r}: more than {MAX_HOSTS} hosts")
    if not hosts:
        raise HostlistError(f"host list {text!r}: names no host (expected e.g. 'node[01-04]')")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """`text` cut at the commas that are not inside brackets."""
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"host list {text!r}: '[' inside brackets at {i}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"host list {text!r}: ']' without '[' at {i}")
        elif char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"host list {text!r}: '[' not closed")
    entries.append(text[start:])
    return entries


def _expand_entry(entry: str, text: str) -> list[str]:
    """One entry's names: the product of its bracket groups, each after its prefix."""
    factors: list[list[str]] = []
    pos = 0
    while pos < len(entry):
        name = _NAME.match(entry, pos)
        prefix = name.group() if name else ""
        pos += len(prefix)
        if pos == len(entry):
            if factors:
                raise HostlistError(
                    f"host list {text!r}: {prefix!r} after the last ']' of {entry!r} "
                    "(Slurm allows text only before a bracket)"
                )
            factors.append([prefix])
            break
        if entry[pos] != "[":
            raise HostlistError(
                f"host list {text!r}: unexpected {entry[pos]!r} in {entry!r} "
                "(host names may not hold whitespace)"
            )
        close = entry.index("]", pos)  # _split_top_level saw every '[' closed
        factors.append([prefix + n for n in _expand_ranges(entry[pos + 1 : close], text)])
        pos = close + 1
    # scontrol's loop order, outermost first, is bracket n-1, n-2, ..., 1, then n (seen
    # on Slurm 22.05: a[1,2][3,4][5,6] is a135 a136 a235 a236 a145 a146 a245 a246);
    # for one or two brackets that is the plain product, the first bracket slowest.
    order = [*range(len(factors) - 2, -1, -1), len(factors) - 1] if len(factors) > 1 else [0]
    names = []
    for picked in itertools.product(*(factors[i] for i in order)):
        parts = dict(zip(order, picked, strict=True))
        names.append("".join(parts[i] for i in range(len(factors))))
    if len(names) > MAX_HOSTS:
        raise HostlistError(f"host list {text!r}: {entry!r} names more than {MAX_HOSTS} hosts")
    return names


def _expand_ranges(ranges: str, text: str) -> list[str]:
    """'1,3,08-10' -> ['1', '3', '08', '09', '10'] (zero-padded to the low end's width)."""
    numbers: list[str] = []
    for part in ranges.split(","):
        match = _RANGE.fullmatch(part)
        if match is None:
            raise HostlistError(
                f"host list {text!r}: bad range {part!r} in [{ranges}] "
                "(expected N or LO-HI, digits only)"
            )
        lo_text, hi_text = match.group(1), match.group(2)
        lo = int(lo_text)
        hi = lo if hi_text is None else int(hi_text)
        if hi < lo:
            raise HostlistError(f"host list {text!r}: range {part!r} runs backwards")
        if hi - lo >= MAX_HOSTS:
            raise HostlistError(f"host list {text!r}: range {part!r} has more than {MAX_HOSTS}")
        width = len(lo_text)
        numbers.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return numbers
