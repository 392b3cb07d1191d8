"""The shape of pipelines/: no function longer than a screen and a bit, a README tour
that names every module, and tests that mirror the modules.

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


# ---- the README's tour names every module ----------------------------------------------

README = ROOT.parent / "README.md"


def tour_entries(readme: str) -> set[str]:
    """The names the "Where things are" block lists: `x.py` and `pkg/` at the top, `pkg/x`
    for a module listed under its package (`client, commands` lists two)."""
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    entries, package = set(), ""
    for line in section.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        names = line.strip().split("  ", 1)[0]
        if not names or indent not in (4, 6):
            continue
        for name in names.split(", "):
            if indent == 4:
                package = name if name.endswith("/") else ""
                entries.add(name)
            elif package:
                entries.add(package + name)
    return entries


def public_modules() -> set[str]:
    """Each public module of pipelines/ as the tour names it (private `_x` modules are told
    by their package's line)."""
    found = set()
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith("_") for part in parts[:-1]) or parts[-1].startswith("_"):
            if parts[-1] == "__init__.py" and len(parts) == 2:
                found.add(parts[0] + "/")
            continue
        found.add(parts[0] if len(parts) == 1 else f"{parts[0]}/{path.stem}")
    return found


def test_the_readme_tour_lists_every_public_module_of_pipelines():
    missing = sorted(public_modules() - tour_entries(README.read_text()))
    assert missing == [], f"README.md 'Where things are' does not list: {missing}"


# ---- tests mirror modules --------------------------------------------------------------

TESTS = ROOT.parent / "tests" / "pipelines"

# modules whose tests are named for what they test rather than for the module
TESTED_IN = {
    "cluster/main.py": ["cluster/test_cluster.py"],
    "daemon/control.py": ["daemon/test_bad_input.py"],
    "daemon/http.py": ["daemon/test_http_notify.py", "daemon/test_status_page.py"],
    "daemon/notify.py": ["daemon/test_http_notify.py"],
    "daemon/protocol.py": ["daemon/test_bad_input.py"],
    "daemon/statedir.py": ["daemon/test_bad_input.py"],
    "data/_files.py": ["data/test_table.py", "data/test_text.py"],
    "data/_sampling.py": ["test_data.py"],
    "hooks/_hook.py": ["hooks/test_decorators.py"],
    "hooks/link.py": ["hooks/test_process.py"],
    "model/_file.py": ["model/test_file_models.py"],
    "model/_kernels.py": ["model/test_kernels_and_bench.py"],
    "model/bench.py": ["model/test_kernels_and_bench.py"],
    "model/_model.py": ["model/test_flat_buffers.py", "model/test_memory.py"],
    "model/_module.py": ["model/test_flat_buffers.py"],
    "model/testing.py": ["model/test_layers.py", "model/test_models.py"],
    "model/torch_twin.py": ["model/test_torch_parity.py"],
    "store/safetensors.py": ["store/test_checkpoint.py"],
}


def untested_modules(tested_in: dict[str, list[str]]) -> list[str]:
    """Modules of pipelines/ with neither tests/pipelines/<dir>/test_<name>.py (`_name.py`
    too) nor an entry of `tested_in` whose files all exist."""
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        module = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue
        own = TESTS / module.parent / f"test_{path.stem.lstrip('_')}.py"
        named = [TESTS / t for t in tested_in.get(str(module), [])]
        if not own.exists() and not (named and all(t.exists() for t in named)):
            missing.append(str(module))
    return missing


def test_every_module_of_pipelines_has_its_tests():
    assert untested_modules(TESTED_IN) == []


def test_the_table_of_tests_named_otherwise_names_only_modules_without_their_own():
    stale = [m for m in TESTED_IN if not (ROOT / m).exists()]
    own = [
        m
        for m in TESTED_IN
        if (TESTS / Path(m).parent / f"test_{Path(m).stem.lstrip('_')}.py").exists()
    ]
    assert stale == [] and own == []
