"""Gradient hooks: research code that watches (analyzers) or edits (transforms) gradients.

A research script is a plain Python file of decorated functions:

    import numpy as np
    from pipelines.hooks import analyzer

    @analyzer(every=10)
    def embedding_norm(ctx):
        # Does the embedding's gradient shrink as training goes on?
        return {"norm": float(np.linalg.norm(ctx.grads["embed.weight"]))}

run with `zerotrain run --hook path/to/script.py[:embedding_norm]`, listed in the
config's hooks, or installed as an entry point of the group "zerotrain.hooks". Each hook
gets a `HookContext` (step, loss, lr, the reduced gradient, each rank's own gradient,
the parameters and the update, all by parameter name) and returns a dict of metrics or
None; the metrics go to hooks.jsonl and TensorBoard, and `zerotrain report` plots them.

Analyzers run in the analyzer process, read-only, off the critical path: a raising or
hanging analyzer is logged, counted and isolated (see `AnalyzerRunner`), and training
never waits for one. Transforms run in each rank on the rank's gradient before the
reduction, with a deterministic RNG (see `TransformRunner`). The built-in analyses are
in `pipelines.hooks.builtins`.

This module is the public face of the private modules beside it; every public name is
exported here exactly once (tests/pipelines/hooks/test_api.py).
"""

from ._context import HookContext, flat_views, normalise_layout
from ._hook import ANALYZER, TRANSFORM, Hook, HookError, analyzer, transform
from ._loader import ENTRY_POINT_GROUP, HookSpec, load_hooks, normalise_spec
from ._metrics import MAX_ARRAY_SIZE, Histogram, make_record, validate_metrics
from ._runner import DEFAULT_TIMEOUT_S, AnalyzerRunner, HooksLog, HookState
from ._transforms import TransformError, TransformRunner, transform_rng

__all__ = [
    "ANALYZER",
    "DEFAULT_TIMEOUT_S",
    "ENTRY_POINT_GROUP",
    "MAX_ARRAY_SIZE",
    "TRANSFORM",
    "AnalyzerRunner",
    "Histogram",
    "Hook",
    "HookContext",
    "HookError",
    "HookSpec",
    "HookState",
    "HooksLog",
    "TransformError",
    "TransformRunner",
    "analyzer",
    "flat_views",
    "load_hooks",
    "make_record",
    "normalise_layout",
    "normalise_spec",
    "transform",
    "transform_rng",
    "validate_metrics",
]
