"""pipelines' public faces: each package and public module lists what it exports in
`__all__`, once, and no module reaches into another package's private modules or names.

A private module (`_x.py`) or name (`_x`) belongs to the package that holds it: its
modules may share it, everyone else goes through a public namespace (STYLE.md 1 and 12;
tests/actors/test_public_api.py holds actors to the same rule from the inside).
"""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import pipelines

ROOT = Path(pipelines.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def public_namespaces() -> list[str]:
    """pipelines and every package and module below it with no private part in its name."""
    names = ["pipelines"]
    names += [m.name for m in pkgutil.walk_packages(pipelines.__path__, "pipelines.")]
    return [n for n in names if not any(is_private(part) for part in n.split("."))]


def _load(name: str):
    """The module, or None when an optional dependency it needs (torch for torch_twin)
    is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name.partition(".")[0] in ("actors", "cykernels", "pipelines"):
            raise
        return None


def exporting() -> list[str]:
    """The public namespaces that list their exports in `__all__`."""
    return [n for n in public_namespaces() if hasattr(_load(n), "__all__")]


# ---- each public name exported once ----------------------------------------------------


@pytest.mark.parametrize("namespace", exporting())
def test_every_exported_name_is_listed_once_exists_and_is_public(namespace):
    module = importlib.import_module(namespace)
    listed = list(module.__all__)
    assert len(listed) == len(set(listed)), f"{namespace}.__all__ repeats a name"
    assert [n for n in listed if not hasattr(module, n)] == [], f"{namespace}: missing"
    assert [n for n in listed if is_private(n)] == [], f"{namespace}: private names exported"


def test_a_name_is_exported_by_one_namespace_or_by_its_module_and_that_package():
    """A package may list a name of one of its own public modules (pipelines.model lists
    losses.resolve_loss); two unrelated namespaces listing one object is a second home."""
    homes: dict[int, list[str]] = {}
    for namespace in exporting():
        module = importlib.import_module(namespace)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                homes.setdefault(id(value), []).append(namespace)

    def nested(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a.startswith(b + ".")

    twice = [
        where
        for where in homes.values()
        if any(not nested(a, b) for i, a in enumerate(where) for b in where[i + 1 :])
    ]
    assert twice == []


# ---- no public class outside __all__ ---------------------------------------------------

PACKAGES = ["pipelines"] + [
    m.name for m in pkgutil.iter_modules(pipelines.__path__, "pipelines.") if m.ispkg
]


def _classes_defined_in(module) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and not is_private(name)
    ]


def unlisted_classes(package: str) -> list[str]:
    """The public classes of `package`'s modules that no `__all__` lists: a public
    module's (and the package's own) must be in its `__all__`; a private module's in the
    package's `__all__`, or in the private module's own, which names what its sibling
    modules share (hooks.process takes HookStats from hooks._runner)."""
    top = importlib.import_module(package)
    found = [f"{package}.{name}" for name in _classes_defined_in(top)]
    found = [n for n in found if n.rpartition(".")[2] not in getattr(top, "__all__", ())]
    for info in pkgutil.iter_modules(top.__path__, package + "."):
        module = None if info.ispkg else _load(info.name)
        if module is None:  # a subpackage (its own parameter) or an optional dependency
            continue
        listed = set(getattr(module, "__all__", ()))
        if is_private(info.name.rpartition(".")[2]):
            listed |= set(getattr(top, "__all__", ()))
        found += [f"{info.name}.{n}" for n in _classes_defined_in(module) if n not in listed]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_class_of_a_package_is_listed_in_an_all(package):
    """As tests/pipelines/model/test_api.py holds pipelines.model, for every package."""
    assert unlisted_classes(package) == []


# ---- no reaching into another package's private parts ----------------------------------


def _package_of(dotted: list[str]) -> str:
    """The package that holds `dotted` (itself if it is a package)."""
    name = ".".join(dotted)
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a name inside a module, not a module
        spec = None
    is_package = spec is not None and spec.submodule_search_locations is not None
    return name if is_package else ".".join(dotted[:-1])


def _private_owner(dotted: list[str]) -> list[str] | None:
    """The namespace whose private part `dotted` names (actors for actors._frames.encode,
    pipelines.model.losses for pipelines.model.losses._table), or None if all public."""
    for i, part in enumerate(dotted):
        if is_private(part):
            return dotted[:i]
    return None


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[list[str]]:
    """The dotted paths an import statement brings in, relative ones resolved."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".") for alias in node.names]
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1] if node.level else []
    module = base + (node.module.split(".") if node.module else [])
    return [module] + [[*module, alias.name] for alias in node.names if alias.name != "*"]


def private_imports(source: str, package: str, where: str) -> list[str]:
    """`where:line: statement` for each import in `source` (a module of `package`) that
    names a private module or name held by another package."""
    bad = []
    for node in ast.walk(ast.parse(source, where)):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        owners = {
            ".".join(owner)
            for owner in map(_private_owner, _imported(node, package))
            if owner and _package_of(owner) != package
        }
        if owners:
            statement = " ".join(ast.get_source_segment(source, node).split())
            bad.append(f"{where}:{node.lineno}: {statement} (private to {', '.join(owners)})")
    return bad


def test_no_module_imports_another_packages_private_modules_or_names():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        bad += private_imports(path.read_text(), package, str(path.relative_to(ROOT.parent)))
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize(
    "source, allowed",
    [
        ("from actors._collectives import shard_bounds", False),
        ("import actors._frames", False),
        ("from actors import _registry", False),
        ("from pipelines.hooks._runner import HooksLog", False),
        ("from ..hooks._runner import HooksLog", False),
        ("from pipelines.model.losses import _resolve", False),
        ("from pipelines import _x", False),
        ("def f():\n    from actors import current_node, _registry", False),
        ("from ._chaos_runtime import Runtime", True),  # this package's own private module
        ("from pipelines.cluster.roles import _helper", True),  # a sibling module's name
        ("from pipelines.model import losses as _losses", True),  # a private alias only
        ("from pipelines.hooks import load_hooks", True),
        ("import actors, numpy as np", True),
    ],
)
def test_the_import_scan_tells_private_from_public(source, allowed):
    found = private_imports(source, "pipelines.cluster", "pipelines/cluster/x.py")
    assert (found == []) is allowed, found
