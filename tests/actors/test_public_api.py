"""actors/__init__ is the public face: each public name of a private module is exported
exactly once, from the module that defines it."""

import importlib
import pkgutil
import subprocess
import sys

import actors


def private_modules():
    for info in pkgutil.iter_modules(actors.__path__):
        if info.name.startswith("_"):
            yield importlib.import_module(f"actors.{info.name}")


def test_every_exported_name_is_listed_once():
    assert len(actors.__all__) == len(set(actors.__all__))
    for name in actors.__all__:
        assert hasattr(actors, name), name


def test_every_exported_name_comes_from_exactly_one_private_module():
    for name in actors.__all__:
        homes = [m.__name__ for m in private_modules() if name in getattr(m, "__all__", ())]
        assert len(homes) == 1, f"{name} is public in {homes or 'no private module'}"
        obj = getattr(actors, name)
        assert obj is getattr(importlib.import_module(homes[0]), name)
        module = getattr(obj, "__module__", None)
        if module is not None and not isinstance(obj, int | str | dict | float | tuple):
            assert module == homes[0], f"{name}.__module__ is {module}, expected {homes[0]}"


def test_every_public_name_of_a_private_module_is_exported():
    missing = [
        f"{m.__name__}.{name}"
        for m in private_modules()
        for name in getattr(m, "__all__", ())
        if name not in actors.__all__
    ]
    assert missing == []


def test_the_package_imports_without_pipelines():
    code = "import actors, sys; print(sorted(m for m in sys.modules if m.startswith('pipelines')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_lazy_table_is_each_private_modules_all_in_its_order():
    """actors._HOMES (what `import actors` loads on first use) repeats each private
    module's `__all__`: a name added, removed or moved on one side only fails here."""
    table = {
        m.__name__.rpartition(".")[2]: tuple(getattr(m, "__all__", ())) for m in private_modules()
    }
    assert actors._HOMES == {module: names for module, names in table.items() if names}
