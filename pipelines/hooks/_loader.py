"""Finding hooks: from a file, from an installed package, from the built-ins.

A hook spec is plain data (a string or a small dict) so it can travel in a config file,
on the command line and in a message to the analyzer process, which loads the hooks
itself — functions never cross a process boundary. The accepted forms:

    "scripts/hooks/dead_layer.py"           every Hook at the top level of the file
    "scripts/hooks/dead_layer.py:dead"      the one hook named `dead` (its hook name, or
                                            the name it is bound to in the file)
    "builtin" / "builtin:noise_scale"       the built-in analyzers (pipelines.hooks.builtins)
    "mypkg" / "mypkg:probe"                 the entry point `mypkg` of the group
                                            "zerotrain.hooks" of an installed package: a
                                            Hook, a list of Hooks, or a module of Hooks

A string is a file when it ends in ".py" (before an optional ":NAME") or has a path
separator in it. Relative paths are taken from `base_dir` (the config file's folder,
the current directory by default).

The dict form adds overrides: {"hook": SPEC, "every": 10, "exact": true, "name":
"renamed", "timeout_s": 2.0, "kind": "analyzer", "options": {...}}. `kind` turns a plain,
undecorated function into a hook; `options` are keyword arguments of a built-in
factory (e.g. {"vanishing": 1e-9} for grad_health).

A file is imported under a private module name derived from its resolved path
(`_zerotrain_hook_<hash>_<stem>`), never under its own stem: a script called
`numpy.py` or `test_x.py` does not shadow anything, and loading it again re-executes it.
"""

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
import types
from pathlib import Path

from ._hook import KINDS, Hook, HookError

ENTRY_POINT_GROUP = "zerotrain.hooks"
BUILTIN = "builtin"

_FILE_SPEC = re.compile(r"^(?P<path>.+?\.py)(?::(?P<name>[^:/\\]+))?$")
_KEYS = ("hook", "every", "exact", "name", "timeout_s", "kind", "options")
_ACCEPTED = (
    "'PATH.py', 'PATH.py:NAME', 'builtin[:NAME]', 'ENTRY_POINT[:NAME]', or a dict "
    f"with 'hook' and optionally {', '.join(repr(k) for k in _KEYS[1:])}"
)


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """A normalised hook spec: where to find the hook(s), and the overrides to apply."""

    source: str  # the spec string, as written
    where: str  # "file", "builtin" or "entry_point"
    target: str  # the path, "builtin", or the entry point name
    select: str | None = None  # the NAME after ':'
    every: int | None = None
    exact: bool | None = None
    name: str | None = None
    timeout_s: float | None = None
    kind: str | None = None
    options: dict = dataclasses.field(default_factory=dict)


def normalise_spec(entry, base_dir=None) -> HookSpec:
    """The one place a spec string or dict becomes a HookSpec; HookError if it cannot."""
    overrides = {}
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(_KEYS))
        if "hook" not in entry or unknown:
            raise HookError(f"hook spec: expected {_ACCEPTED}; got {entry!r}")
        overrides = {k: entry[k] for k in _KEYS[1:] if k in entry}
        entry = entry["hook"]
    if not isinstance(entry, str) or not entry.strip():
        raise HookError(f"hook spec: expected {_ACCEPTED}; got {entry!r}")
    spec = entry.strip()
    if overrides.get("kind") not in (None, *KINDS):
        raise HookError(f"hook {spec!r}: kind must be one of {KINDS}, got {overrides['kind']!r}")
    if not isinstance(overrides.get("options", {}), dict):
        raise HookError(f"hook {spec!r}: options must be a dict, got {overrides['options']!r}")
    match = _FILE_SPEC.match(spec)
    if match or "/" in spec or os.sep in spec:
        path = match["path"] if match else spec
        select = match["name"] if match else None
        path = Path(path).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or ".") / path
        return HookSpec(spec, "file", str(path), select, **overrides)
    target, _, select = spec.partition(":")
    where = "builtin" if target == BUILTIN else "entry_point"
    return HookSpec(spec, where, target, select or None, **overrides)


def load_hooks(specs, *, base_dir=None) -> list[Hook]:
    """All hooks named by `specs` (strings or dicts, see the module doc), in order.

    Raises HookError, one line naming the spec and what is wrong, if a spec is
    malformed, a file is missing or fails to import, a NAME does not exist or is not a
    hook, or two hooks end up with the same name.
    """
    if isinstance(specs, str | dict):
        specs = [specs]
    hooks = []
    for entry in specs:
        hooks.extend(load_spec(normalise_spec(entry, base_dir)))
    seen = {}
    for hook in hooks:
        if hook.name in seen:
            raise HookError(
                f"two hooks named {hook.name!r} (from {seen[hook.name]!r} and {hook.source!r}); "
                "rename one with {'hook': ..., 'name': ...} or name= in its decorator"
            )
        seen[hook.name] = hook.source
    return hooks


def load_spec(spec: HookSpec) -> list[Hook]:
    """The hooks of one normalised spec, with its overrides applied."""
    if spec.options and spec.where != "builtin":
        raise HookError(f"hook {spec.source!r}: options are accepted by builtin hooks only")
    if spec.where == "builtin":
        found = _builtins(spec)
    elif spec.where == "file":
        found = _hooks_in(spec, _import_file(spec), f"the file {spec.target}")
    else:
        found = _entry_point(spec)
    if spec.name is not None and len(found) != 1:
        raise HookError(
            f"hook {spec.source!r}: 'name' renames one hook, but the spec selects {len(found)}; "
            "select one with PATH:NAME"
        )
    changes = {
        k: getattr(spec, k)
        for k in ("every", "exact", "name", "timeout_s")
        if getattr(spec, k) is not None
    }
    return [hook.replace(source=spec.source, **changes) for hook in found]


# ---- the three places --------------------------------------------------------------


def _builtins(spec):
    from .builtins import BUILTINS

    names = [spec.select] if spec.select else list(BUILTINS)
    if spec.select not in (None, *BUILTINS):
        raise HookError(
            f"hook {spec.source!r}: no builtin {spec.select!r}; builtins: {', '.join(BUILTINS)}"
        )
    if spec.options and not spec.select:
        raise HookError(
            f"hook {spec.source!r}: options need one builtin, e.g. 'builtin:grad_health'"
        )
    try:
        return [BUILTINS[n](**spec.options) for n in names]
    except TypeError as exc:
        raise HookError(f"hook {spec.source!r}: bad options {spec.options!r}: {exc}") from None


def _import_file(spec):
    path = Path(spec.target)
    if not path.is_file():
        raise HookError(f"hook {spec.source!r}: no such file {path}")
    resolved = str(path.resolve())
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_zerotrain_hook_{digest}_{stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(loader_spec)
    # Registered under the private name while it runs: dataclasses, pickle and typing
    # look a module up in sys.modules by its __name__.
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise HookError(
            f"hook {spec.source!r}: {path}:{exc.lineno}: syntax error: {exc.msg}"
        ) from None
    except (Exception, SystemExit) as exc:
        del sys.modules[module_name]
        lines = [
            f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == resolved
        ]
        at = f":{lines[-1]}" if lines else ""
        raise HookError(
            f"hook {spec.source!r}: importing {path}{at} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _entry_point(spec):
    available = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    matches = [ep for ep in available if ep.name == spec.target]
    if not matches:
        names = ", ".join(sorted({ep.name for ep in available})) or "none installed"
        raise HookError(
            f"hook {spec.source!r}: not a .py path, 'builtin', nor an entry point of group "
            f"{ENTRY_POINT_GROUP!r} (entry points: {names})"
        )
    try:
        obj = matches[0].load()
    except Exception as exc:
        raise HookError(
            f"hook {spec.source!r}: loading entry point {matches[0].value!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, types.ModuleType):
        return _hooks_in(spec, obj, f"the module {obj.__name__}")
    candidates = list(obj) if isinstance(obj, list | tuple) else [obj]
    if not candidates or not all(isinstance(h, Hook) for h in candidates):
        raise HookError(
            f"hook {spec.source!r}: entry point {matches[0].value!r} must be a Hook, a list of "
            f"Hooks or a module, got {type(obj).__name__}"
        )
    return _select(spec, {h.name: h for h in candidates}, {}, f"entry point {matches[0].value!r}")


def _hooks_in(spec, module, what):
    """The Hooks bound at the top level of `module`, by hook name; plus its other names."""
    hooks, others = {}, {}
    for attr, value in vars(module).items():
        if isinstance(value, Hook):
            hooks.setdefault(value.name, value)
            others.setdefault(attr, value)
        elif not attr.startswith("__"):
            others[attr] = value
    return _select(spec, hooks, others, what)


def _select(spec, hooks, others, what):
    if spec.select is None:
        if spec.kind is not None:
            raise HookError(f"hook {spec.source!r}: 'kind' applies to one function: use PATH:NAME")
        if not hooks:
            raise HookError(
                f"hook {spec.source!r}: {what} defines no hooks "
                "(decorate functions with @analyzer or @transform)"
            )
        return list(hooks.values())
    name = spec.select
    target = hooks.get(name, others.get(name))
    defined = ", ".join(hooks) or "no hooks"
    if target is None:
        raise HookError(
            f"hook {spec.source!r}: {what} has no hook named {name!r} (it defines {defined})"
        )
    if isinstance(target, Hook):
        if spec.kind not in (None, target.kind):
            raise HookError(
                f"hook {spec.source!r}: {name!r} is a {target.kind}, config says {spec.kind}"
            )
        return [target]
    if isinstance(target, types.FunctionType) and spec.kind is not None:
        return [Hook(fn=target, kind=spec.kind, name=name)]
    if isinstance(target, types.FunctionType):
        raise HookError(
            f"hook {spec.source!r}: {name!r} is a plain function, not a hook: decorate it with "
            "@analyzer or @transform, or give 'kind' in its config entry"
        )
    raise HookError(f"hook {spec.source!r}: {name!r} is a {type(target).__name__}, not a hook")
