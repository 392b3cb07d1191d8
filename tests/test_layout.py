"""The shape of pipelines/: no function longer than a screen and a bit.

A function of pipelines/ is at most MAX_LINES lines (``def`` to its last line) unless
the comment block right above it (above its decorators) opens with ``# one function:``
and says why it must be one (issue 16's acceptance).
"""

import ast
from pathlib import Path

import pytest

import pipelines

ROOT = Path(pipelines.__file__).resolve().parent
MAX_LINES = 80
REASON = "# one function:"


def _reason_above(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the comment block right above `node` (and its decorators) gives a reason."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    i = first - 2  # 0-based index of the line above
    block = []
    while i >= 0 and lines[i].strip().startswith("#"):
        block.append(lines[i].strip())
        i -= 1
    return bool(block) and block[-1].startswith(REASON)


def long_functions(source: str, where: str) -> list[str]:
    """`where:line: name (N lines)` for each function of `source` over MAX_LINES lines
    without a reason above it."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES and not _reason_above(lines, node):
                found.append(f"{where}:{node.lineno}: {node.name} ({length} lines)")
    return found


def test_no_function_of_pipelines_is_over_80_lines_without_a_reason():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        found += long_functions(path.read_text(), str(path.relative_to(ROOT.parent)))
    assert found == [], "split these, or say above each why it must be one:\n" + "\n".join(found)


def _function(n: int, above: str = "", indent: str = "") -> str:
    """A function of exactly `n` lines (def + n - 1 body lines)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(n - 1))
    return f"{above}{indent}def f():\n{body}"


@pytest.mark.parametrize(
    "source, flagged",
    [
        (_function(80), False),
        (_function(81), True),
        ("class C:\n" + _function(81, indent="    "), True),  # methods count too
        ("async " + _function(81), True),
        (_function(81, "# one function: the steps share one trio nursery\n"), False),
        (_function(81, "# one function: why\n@decorator\n"), False),
        (_function(81, "# a comment that gives no reason\n"), True),
        (_function(81, "# one function: not the block's first line\n# more\n"), False),
        (_function(81, "# first line\n# one function: too late\n"), True),
    ],
)
def test_the_scan_flags_long_functions_without_a_reason(source, flagged):
    assert bool(long_functions(source, "x.py")) is flagged

