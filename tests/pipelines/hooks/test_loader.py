import sys
import textwrap

import pytest

from pipelines.hooks import ANALYZER, TRANSFORM, HookError, load_hooks, normalise_spec
from pipelines.hooks.builtins import builtin_hooks

SCRIPT = """
    import numpy as np
    from pipelines.hooks import analyzer, transform

    CALLS = []

    @analyzer(every=5)
    def first(ctx):
        return {"a": 1.0}

    @analyzer(name="second_metric")
    def second(ctx):
        return None

    @transform
    def squash(ctx):
        return None

    def helper(ctx):
        return {"plain": 1.0}
"""


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def load_error(spec, **kwargs):
    with pytest.raises(HookError) as info:
        load_hooks([spec], **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a load error is one line"
    return message


def test_a_file_path_loads_every_hook_in_definition_order(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    hooks = load_hooks([str(path)])
    assert [(h.name, h.kind, h.every) for h in hooks] == [
        ("first", ANALYZER, 5),
        ("second_metric", ANALYZER, 1),
        ("squash", TRANSFORM, 1),
    ]
    assert all(h.source == str(path) for h in hooks)


@pytest.mark.parametrize("name", ["second_metric", "second"])
def test_path_colon_name_selects_one_hook_by_hook_name_or_binding(tmp_path, name):
    path = write(tmp_path, "probe.py", SCRIPT)
    (hook,) = load_hooks([f"{path}:{name}"])
    assert hook.name == "second_metric"


def test_relative_paths_are_taken_from_the_base_dir(tmp_path):
    write(tmp_path, "probe.py", SCRIPT)
    assert [h.name for h in load_hooks(["probe.py:first"], base_dir=tmp_path)] == ["first"]


def test_a_missing_file_is_one_line_naming_the_path(tmp_path):
    message = load_error(str(tmp_path / "nope.py"))
    assert f"no such file {tmp_path / 'nope.py'}" in message


def test_a_missing_name_lists_the_hooks_the_file_defines(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    message = load_error(f"{path}:nothing")
    assert "has no hook named 'nothing'" in message
    assert "first, second_metric, squash" in message


def test_a_plain_function_is_not_a_hook_unless_the_config_gives_its_kind(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    assert "plain function, not a hook" in load_error(f"{path}:helper")
    (hook,) = load_hooks([{"hook": f"{path}:helper", "kind": "analyzer", "every": 4}])
    assert (hook.name, hook.kind, hook.every) == ("helper", ANALYZER, 4)


def test_a_name_bound_to_something_else_is_not_a_hook(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    assert "'np' is a module, not a hook" in load_error(f"{path}:np")


def test_an_import_error_names_the_file_line_and_exception(tmp_path):
    path = write(tmp_path, "broken.py", "x = 1\ny = 1 / 0\n")
    message = load_error(str(path))
    assert f"importing {path}:2 raised ZeroDivisionError" in message
    assert not any(name.endswith("_broken") for name in sys.modules)


def test_a_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "typo.py", "def f(:\n    pass\n")
    assert f"{path}:1: syntax error" in load_error(str(path))


def test_a_file_without_hooks_says_how_to_declare_one(tmp_path):
    path = write(tmp_path, "empty.py", "X = 1\n")
    assert "defines no hooks (decorate functions with @analyzer" in load_error(str(path))


def test_a_script_named_like_a_stdlib_module_shadows_nothing(tmp_path):
    import json

    path = write(tmp_path, "json.py", SCRIPT)
    (hook,) = load_hooks([f"{path}:first"])
    assert sys.modules["json"] is json
    assert hook.fn.__module__.startswith("_zerotrain_hook_")


def test_loading_a_file_again_runs_it_afresh(tmp_path):
    path = write(tmp_path, "state.py", SCRIPT)
    (a,) = load_hooks([f"{path}:first"])
    (b,) = load_hooks([f"{path}:first"])
    assert a.fn.__globals__["CALLS"] is not b.fn.__globals__["CALLS"]


def test_config_dicts_override_period_name_and_timeout(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    (hook,) = load_hooks([{"hook": f"{path}:first", "every": 2, "name": "x", "timeout_s": 3}])
    assert (hook.name, hook.every, hook.timeout_s) == ("x", 2, 3)


def test_an_unknown_config_key_lists_the_accepted_shapes():
    message = load_error({"hook": "builtin", "evry": 2})
    assert "'every'" in message and "{'hook': 'builtin', 'evry': 2}" in message


def test_two_hooks_with_one_name_are_refused_with_both_sources(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    with pytest.raises(HookError, match="two hooks named 'first'") as refused:
        load_hooks([f"{path}:first", {"hook": f"{path}:second", "name": "first"}])
    assert f"{path}:first" in str(refused.value) and f"{path}:second" in str(refused.value)


def test_builtin_loads_every_builtin_and_builtin_colon_name_one():
    names = [h.name for h in load_hooks(["builtin"])]
    # all of them, in order (test_builtins pins that list against builtins.py's table)
    assert names == [h.name for h in builtin_hooks()] and len(names) == 7
    (hook,) = load_hooks([{"hook": "builtin:grad_health", "options": {"vanishing": 1e-9}}])
    assert hook.name == "grad_health"
    assert "no builtin 'nope'; builtins: grad_norm" in load_error("builtin:nope")
    assert "bad options" in load_error({"hook": "builtin:grad_norm", "options": {"x": 1}})


def test_options_are_refused_for_files(tmp_path):
    path = write(tmp_path, "probe.py", SCRIPT)
    assert "options are accepted by builtin hooks only" in load_error(
        {"hook": f"{path}:first", "options": {"a": 1}}
    )


def test_a_spec_is_a_file_when_it_ends_in_py_or_has_a_slash():
    assert normalise_spec("a/b").where == "file"
    assert (normalise_spec("x.py:f").where, normalise_spec("x.py:f").select) == ("file", "f")
    assert normalise_spec("somepkg:probe").where == "entry_point"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A fake installed distribution with entry points in the group zerotrain.hooks."""
    write(tmp_path, "zt_fake_hooks.py", SCRIPT)
    info = tmp_path / "zt_fake_hooks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zt-fake-hooks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[zerotrain.hooks]\nfake = zt_fake_hooks\nfake_one = zt_fake_hooks:first\n"
        "fake_bad = zt_fake_hooks:CALLS\nfake_missing = zt_no_such_module\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("zt_fake_hooks", None)


def test_entry_points_load_a_module_of_hooks_or_one_hook(installed):
    assert [h.name for h in load_hooks(["fake"])] == ["first", "second_metric", "squash"]
    assert [h.name for h in load_hooks(["fake:squash"])] == ["squash"]
    assert [h.name for h in load_hooks(["fake_one"])] == ["first"]


def test_entry_point_errors_are_one_line(installed):
    assert "entry points: fake, fake_bad, fake_missing, fake_one" in load_error("nonesuch")
    assert "must be a Hook, a list of Hooks or a module, got list" in load_error("fake_bad")
    assert "raised ModuleNotFoundError" in load_error("fake_missing")
