"""Slurm host lists expand exactly as `scontrol show hostnames` does: fixed cases whose
expected names were printed by scontrol 22.05, and generated lists compared with the
real scontrol (marker slurm)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.launch import MAX_HOSTS, HostlistError, expand_hostlist


@pytest.mark.parametrize(
    "text, names",
    [
        ("zn1", ["zn1"]),
        ("zn[1-2]", ["zn1", "zn2"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("a[098-100]", ["a098", "a099", "a100"]),
        ("n[01-3]", ["n01", "n02", "n03"]),
        ("n[1-03]", ["n1", "n2", "n3"]),  # the low end's width, not the high end's
        ("a[00-0]", ["a00"]),
        ("a[1,3,5-6]", ["a1", "a3", "a5", "a6"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("x[1-2],x1", ["x1", "x2", "x1"]),  # duplicates kept
        ("[1-2]", ["1", "2"]),
        ("a[1-2][3-4]", ["a13", "a14", "a23", "a24"]),
        ("a[1-2,4]-x[5,7]", ["a1-x5", "a1-x7", "a2-x5", "a2-x7", "a4-x5", "a4-x7"]),
        # three brackets and more: the last fastest, then the first, second, ... (22.05)
        ("a[1,2][3,4][5,6]", "a135 a136 a235 a236 a145 a146 a245 a246".split()),
        ("a[1,2][3,03][4]", ["a134", "a234", "a1034", "a2034"]),
        (
            "a[1-2]-[3-4]-[5-6]-[7-8]",
            "a1-3-5-7 a1-3-5-8 a2-3-5-7 a2-3-5-8 a1-4-5-7 a1-4-5-8 a2-4-5-7 a2-4-5-8 "
            "a1-3-6-7 a1-3-6-8 a2-3-6-7 a2-3-6-8 a1-4-6-7 a1-4-6-8 a2-4-6-7 a2-4-6-8".split(),
        ),
        ("n[1-2],", ["n1", "n2"]),  # empty entries are skipped
        ("a,,b", ["a", "b"]),
        ("n1-n3", ["n1-n3"]),  # no brackets, no range
        ("a1[1-2]", ["a11", "a12"]),
    ],
)
def test_a_host_list_expands_as_scontrol_prints_it(text, names):
    assert expand_hostlist(text) == names


@pytest.mark.parametrize(
    "text, says",
    [
        ("a[3-1]", "runs backwards"),
        ("a[1-2]x", "after the last ']'"),  # scontrol: Invalid hostlist
        ("a[]", "bad range ''"),
        ("a[1,]", "bad range ''"),
        ("a[x]", "bad range 'x'"),
        ("a[1-2", "not closed"),
        ("a]", "without '['"),
        ("a[[1]]", "inside brackets"),
        ("a b", "whitespace"),
        ("", "names no host"),
        (",", "names no host"),
        (f"x[0-{MAX_HOSTS}]", f"range '0-{MAX_HOSTS}' has more than {MAX_HOSTS}"),
        ("x[0-300][0-300]", f"names more than {MAX_HOSTS} hosts"),
        (f"x[1-{MAX_HOSTS}],y", f": more than {MAX_HOSTS} hosts"),
    ],
)
def test_a_list_outside_the_grammar_is_refused_in_one_line_naming_it(text, says, raises_one_line):
    with raises_one_line(HostlistError, match=f"host list {text!r}.*{says}".replace("[", r"\[")):
        expand_hostlist(text)


def test_a_list_of_exactly_max_hosts_names_is_accepted():
    assert len(expand_hostlist(f"x[1-{MAX_HOSTS}]")) == MAX_HOSTS
    assert len(expand_hostlist(f"x[1-{MAX_HOSTS - 1}],y")) == MAX_HOSTS


# ---- generated lists against the real scontrol ----------------------------------------

_NAME_CHARS = "abcxyzAZ0189-_."
_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abnrxzAZ"),
    st.text(_NAME_CHARS, max_size=5),
)


@st.composite
def _ranges(draw):
    """'lo' or 'lo-hi' items joined by commas, with random zero padding on both ends."""
    items = []
    for _ in range(draw(st.integers(1, 3))):
        lo = draw(st.integers(0, 120))
        text = f"{lo:0{draw(st.integers(1, 4))}d}"
        if draw(st.booleans()):
            hi = lo + draw(st.integers(0, 6))
            text += f"-{hi:0{draw(st.integers(1, 4))}d}"
        items.append(text)
    return ",".join(items)


@st.composite
def _entries(draw):
    if draw(st.booleans()):
        return draw(_names)
    groups = draw(st.integers(1, 3))
    parts = []
    for i in range(groups):
        prefix = draw(_names) if i == 0 else draw(st.sampled_from(["", "-", "-n", "x", "_r"]))
        parts.append(f"{prefix}[{draw(_ranges())}]")
    return "".join(parts)


_hostlists = st.lists(_entries(), min_size=1, max_size=4).map(",".join)


@pytest.mark.slurm
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_hostlists)
def test_generated_host_lists_expand_exactly_as_the_real_scontrol(scontrol, text):
    assert expand_hostlist(text) == scontrol(text)
