"""Losses by name: the built-ins, your own, and weighted sums of them.

A model resolves its loss from a *spec*, accepted in these forms::

    "cross_entropy"                                   one loss by name
    "cross_entropy + 0.1*kl_div"                      a weighted sum, as a string
    {"cross_entropy": 1.0, "kl_div": 0.1}             the same, as a dict
    {"cross_entropy": {"weight": 1.0, "label_smoothing": 0.1}}   with options
    a callable following the contract below, or a `Loss`

Built-ins (the kernels of cykernels.losses; mean over the rows of the batch):

    cross_entropy   outputs["logits"] (N, C), batch["y"] int64 (N,)
                    options: ignore_index=-100, label_smoothing=0.0
    mse             outputs["predictions"] (N, D), batch["y"] (N, D) (or any shape of N*D)
    kl_div          KL(teacher || softmax(logits)), 'batchmean': outputs["logits"] (N, C),
                    batch[target] (N, C) probabilities; option target="teacher_probs"
    triplet_margin  outputs["anchor"], ["positive"], ["negative"] (B, E)
                    options: margin=1.0, p=2, eps=1e-6, swap=False

The contract of a loss callable (what `register_loss` takes)::

    fn(outputs, batch, grads=None, grad_scale=1.0, **options) -> float

    outputs     dict of the model's raw outputs (views into its buffers: do not keep them).
                Rows are examples: a language model hands logits as (B*T, V) and its
                batch["y"] as (B*T,).
    batch       the model's normalised batch dict (targets and any extra keys you sent).
    grads       None when only the value is wanted (evaluate). Otherwise a dict with one
                array per output key, zero-filled by the model and possibly shared with
                other terms of a sum: ADD grad_scale * d(loss)/d(outputs[key]) into
                grads[key] for each output the loss depends on; never overwrite.
    grad_scale  the weight of this term times the caller's scale.
    returns     the loss value as a float (unscaled: the sum applies the weights).

An exception raised by a loss propagates out of compute_gradients; `grads` are then
undefined until the next successful call.
"""

import inspect
import re

import numpy as np

from pipelines.model._kernels import kernels

__all__ = ["LOSSES", "Loss", "loss_names", "register_loss", "resolve_loss"]


class Loss:
    """A resolved loss: sum_i weight_i * term_i, callable with the contract above."""

    def __init__(self, terms, spec):
        self.terms = terms  # [(weight, callable)]
        self.spec = spec

    def __call__(self, outputs, batch, grads=None, grad_scale=1.0):
        total = 0.0
        for weight, term in self.terms:
            total += weight * float(term(outputs, batch, grads, grad_scale * weight))
        return total

    def __repr__(self):
        return f"Loss({self.spec!r})"


# ---- built-ins -------------------------------------------------------------------------


class _Builtin:
    """A kernel-backed loss: value via <kernel>_forward, gradient via _forward_backward
    into a scratch buffer that is then added to grads (the contract says add).

    The constructor takes the loss's options only (its signature is what a config's
    [loss] section is checked against); `bind` attaches a backend's kernels.
    """

    def __init__(self):
        self.k = None
        self._scratch = {}

    def bind(self, k):
        self.k = k
        return self

    def scratch(self, key, like):
        slot = (key, like.shape, like.dtype)
        buf = self._scratch.get(slot)
        if buf is None:
            buf = self._scratch[slot] = np.empty_like(like)
        return buf


class _CrossEntropy(_Builtin):
    def __init__(self, *, ignore_index=-100, label_smoothing=0.0):
        super().__init__()
        self.options = {
            "ignore_index": int(ignore_index),
            "label_smoothing": float(label_smoothing),
        }

    def __call__(self, outputs, batch, grads=None, grad_scale=1.0):
        logits, y = outputs["logits"], batch["y"]
        if grads is None:
            return self.k.softmax_cross_entropy_forward(logits, y, **self.options)
        d = self.scratch("logits", logits)
        value = self.k.softmax_cross_entropy_forward_backward(
            d, logits, y, **self.options, grad_scale=grad_scale
        )
        np.add(grads["logits"], d, out=grads["logits"])
        return value


class _MSE(_Builtin):
    def __call__(self, outputs, batch, grads=None, grad_scale=1.0):
        pred = outputs["predictions"]
        target = np.ascontiguousarray(batch["y"], dtype=pred.dtype).reshape(pred.shape)
        if grads is None:
            return self.k.mse_forward(pred, target)
        d = self.scratch("predictions", pred)
        value = self.k.mse_forward_backward(d, pred, target, grad_scale=grad_scale)
        np.add(grads["predictions"], d, out=grads["predictions"])
        return value


class _KLDiv(_Builtin):
    """KL(target || softmax(logits)) batchmean: the kl_div kernel on log_softmax(logits)."""

    def __init__(self, *, target="teacher_probs"):
        super().__init__()
        self.target = target

    def __call__(self, outputs, batch, grads=None, grad_scale=1.0):
        logits = outputs["logits"]
        if self.target not in batch:
            raise ValueError(
                f"kl_div: the batch has no key {self.target!r} (the target probabilities)"
            )
        target = np.ascontiguousarray(batch[self.target], dtype=logits.dtype).reshape(logits.shape)
        logp = self.scratch("logp", logits)
        np.subtract(logits, logits.max(axis=1, keepdims=True), out=logp)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        if grads is None:
            return self.k.kl_div_forward(logp, target)
        dlogp = self.scratch("dlogp", logits)
        value = self.k.kl_div_forward_backward(dlogp, logp, target, grad_scale=grad_scale)
        # forward: logp = logits - logsumexp(logits)  ->  dlogits = dlogp - softmax * sum(dlogp)
        g = grads["logits"]
        g += dlogp
        g -= np.exp(logp) * dlogp.sum(axis=1, keepdims=True)
        return value


class _TripletMargin(_Builtin):
    KEYS = ("anchor", "positive", "negative")

    def __init__(self, *, margin=1.0, p=2, eps=1e-6, swap=False):
        super().__init__()
        self.options = {"margin": float(margin), "p": p, "eps": float(eps), "swap": bool(swap)}

    def __call__(self, outputs, batch, grads=None, grad_scale=1.0):
        a, p, n = (outputs[key] for key in self.KEYS)
        if grads is None:
            return self.k.triplet_margin_forward(a, p, n, **self.options)
        da, dp, dn = (self.scratch(key, outputs[key]) for key in self.KEYS)
        value = self.k.triplet_margin_forward_backward(
            da, dp, dn, a, p, n, **self.options, grad_scale=grad_scale
        )
        for key, d in zip(self.KEYS, (da, dp, dn), strict=True):
            np.add(grads[key], d, out=grads[key])
        return value


_BUILTINS = {
    "cross_entropy": _CrossEntropy,
    "mse": _MSE,
    "kl_div": _KLDiv,
    "triplet_margin": _TripletMargin,
}
# The registry: name -> built-in class (its signature is the options) or user callable.
LOSSES = dict(_BUILTINS)


# ---- the registry ----------------------------------------------------------------------


def register_loss(name, fn, *, replace=False):
    """Make `fn` (the contract in this module's docstring) a loss named `name`.

    Options given in a spec ({"name": {"weight": w, "opt": v}}) reach `fn` as keywords.
    Refuses to shadow a built-in, or an earlier registration unless `replace=True`.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"register_loss: expected an identifier for the name, got {name!r}")
    if not callable(fn):
        raise ValueError(
            f"register_loss: expected a callable for {name!r}, got {type(fn).__name__}"
        )
    if name in _BUILTINS or (name in LOSSES and not replace):
        raise ValueError(f"register_loss: {name!r} is already a loss (replace=True to override)")
    LOSSES[name] = fn


def loss_names():
    """Every loss name a spec may use, sorted."""
    return sorted(LOSSES)


def resolve_loss(spec, backend="cython"):
    """A `Loss` from any accepted spec form (module docstring), its kernels on `backend`."""
    if isinstance(spec, Loss):
        return spec
    return Loss([(w, _make(name, options, backend)) for w, name, options in _terms(spec)], spec)


def _terms(spec):
    """The one normalising function: any spec form -> [(weight, name or callable, options)]."""
    if callable(spec):
        return [(1.0, spec, {})]
    if isinstance(spec, str):
        terms = []
        for part in spec.split("+"):
            m = re.fullmatch(r"\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z_]\w*)\s*", part)
            if m is None:
                raise ValueError(
                    f"loss spec: cannot parse {part.strip()!r} in {spec!r}; expected 'name' "
                    f"or 'weight*name' terms joined by '+', e.g. 'cross_entropy + 0.1*kl_div'"
                )
            terms.append((float(m.group(1) or 1.0), m.group(2), {}))
        return terms
    if isinstance(spec, dict) and spec:
        terms = []
        for name, value in spec.items():
            if isinstance(value, dict):
                options = dict(value)
                weight = float(options.pop("weight", 1.0))
            else:
                weight, options = float(value), {}
            terms.append((weight, name, options))
        return terms
    raise ValueError(
        f"loss spec: expected a name, 'a + 0.1*b', {{name: weight}}, {{name: {{'weight': w, "
        f"**options}}}} or a callable, got {spec!r}"
    )


def _make(name, options, backend):
    if callable(name):
        return name
    if name in _BUILTINS:
        factory = _BUILTINS[name]
        accepted = list(inspect.signature(factory).parameters)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"loss {name}: unknown option(s) {unknown}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
        return factory(**options).bind(kernels(backend))
    if name in LOSSES:
        fn = LOSSES[name]
        if not options:
            return fn
        return lambda outputs, batch, grads=None, grad_scale=1.0: fn(
            outputs, batch, grads, grad_scale, **options
        )
    raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(loss_names())}")
