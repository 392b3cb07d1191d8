"""Models from the user's file: `model.name = "file:PATH.py:NAME"` (or `--model PATH.py:NAME`).

NAME is a `Model` subclass or a function returning a Model, written with the public
pipelines.model API (its layers, or the user's own `Module` with forward and backward).
It is called with keyword arguments: the [model] options of the config, plus whichever
of these it accepts -- the sizes the data dictates (in_dim, n_classes, vocab, seq_len)
and seed, backend, dtype. Every rank process imports the file itself (the path is in the
run's config), so nothing about the model travels by pickle.

Every mistake is a `ModelFileError` of one line: a file that is not there or does not
import (where: the file and line), a name that is not in it, an object that is not a
model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path

from pipelines.model._model import Model

__all__ = ["ModelFileError", "build_file_model", "load_model_object", "parse_model_spec"]

PREFIX = "file:"


class ModelFileError(ValueError):
    """A model file that cannot give a model; `str(err)` is one line."""


def parse_model_spec(spec: str) -> tuple[Path, str]:
    """ "[file:]PATH.py:NAME" -> (PATH, NAME); ModelFileError for another shape."""
    text = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    path, sep, name = text.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise ModelFileError(
            f"model {spec!r}: expected PATH.py:NAME (NAME a Model subclass or a function "
            "returning a Model)"
        )
    return Path(path), name


def _import(path: Path):
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r}: no such file")
    resolved = path.resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"zerotrain_user_model_{key}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ModelFileError(
            f"{path} line {err.lineno}: does not import: SyntaxError: {err.msg}"
        ) from None
    except Exception as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(resolved)]
        where = f" line {frames[-1].lineno}" if frames else ""
        msg = str(err).splitlines()[0] if str(err) else ""
        raise ModelFileError(
            f"{path}{where}: does not import: {type(err).__name__}: {msg}"
        ) from None
    sys.modules[mod_name] = module
    return module


def load_model_object(spec: str):
    """The class or function `spec` names, imported from its file."""
    path, name = parse_model_spec(spec)
    module = _import(path)
    if not hasattr(module, name):
        found = sorted(
            n
            for n, v in vars(module).items()
            if not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
            and (inspect.isfunction(v) or (inspect.isclass(v) and issubclass(v, Model)))
        )
        raise ModelFileError(
            f"{path}: no name {name!r} (models and functions defined there: "
            f"{', '.join(found) or 'none'})"
        )
    obj = getattr(module, name)
    if not (inspect.isclass(obj) and issubclass(obj, Model)) and not inspect.isfunction(obj):
        raise ModelFileError(
            f"{path}:{name} is a {type(obj).__name__}, not a pipelines.model Model subclass "
            "or a function returning one"
        )
    return obj


def build_file_model(spec: str, options: dict, offered: dict) -> Model:
    """Build the model `spec` names with `options` (all passed: an unknown one is an
    error) and those of `offered` (data sizes, seed, backend, dtype) it accepts."""
    obj = load_model_object(spec)
    path, name = parse_model_spec(spec)
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs.update(options)
    try:
        model = obj(**kwargs)
    except TypeError as err:
        raise ModelFileError(f"{path}:{name}: {str(err).splitlines()[0]}") from None
    if not isinstance(model, Model):
        raise ModelFileError(
            f"{path}:{name} returned a {type(model).__name__}, not a pipelines.model Model"
        )
    if not hasattr(model, "params"):
        raise ModelFileError(
            f"{path}:{name}: the model was not set up (its __init__ must end with "
            "self._setup(seed=..., backend=..., dtype=..., lora=...))"
        )
    model.name = f"{PREFIX}{path}:{name}"
    return model
