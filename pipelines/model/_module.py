"""Modules, parameters and the flat-buffer machinery underneath every layer.

A `Module` declares its parameters (`param`) and children (`child`) when it is built; it
owns no memory for them. When a model is finished (`Model._bind`), every parameter gets
a view into one of two flat buffers — the trainable `params` (with its twin `grads`) or
the `frozen` buffer — in named_parameters order, PyTorch's order: a module's own
parameters first, then its children's, in registration order.

A module's forward and backward sit side by side and talk through attributes the
forward saves (`self._x`): a model runs one pass at a time and is not re-entrant.
Activation buffers come from `self.buffer(key, shape)`, a per-module cache keyed by
(key, shape, dtype): allocated on the first batch of a shape, reused on every later one
(tests/pipelines/model/test_memory.py guards that steady state allocates nothing).
"""

import math

import numpy as np

# ---- initialisers --------------------------------------------------------------------
# An initialiser is a function (rng, shape) -> float64 array. Drawing in float64 and
# rounding once keeps the bits the same whatever the model dtype's later arithmetic.


def uniform(bound):
    """U(-bound, bound): torch's Linear default (kaiming_uniform(a=sqrt(5)) = 1/sqrt(fan_in))."""
    return lambda rng, shape: rng.uniform(-bound, bound, size=shape)


def normal(std):
    """N(0, std^2): torch's Embedding default (std 1) and GPT-2's Linear/Embedding (0.02)."""
    return lambda rng, shape: rng.normal(0.0, std, size=shape)


def constant(value):
    """Every element `value` (norm weights 1, norm biases 0, LoRA's B 0)."""
    return lambda rng, shape: np.full(shape, float(value))


def linear_bound(fan_in):
    """torch.nn.Linear's default bound for weight and bias: 1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


# ---- parameters ----------------------------------------------------------------------


class Parameter:
    """One named tensor of a model: its shape, initialiser and whether it trains.

    `data` and `grad` are views into the model's flat buffers, set when the model is
    bound (`grad` stays None for a frozen parameter). `index` is the parameter's position
    among the trainable ones (-1 if frozen), used by the gradient-ready tracker.
    """

    __slots__ = ("shape", "init", "trainable", "name", "data", "grad", "index", "offset")

    def __init__(self, shape, init, trainable=True):
        self.shape = tuple(int(s) for s in shape)
        self.init = init
        self.trainable = trainable
        self.name = None
        self.data = None
        self.grad = None
        self.index = -1
        self.offset = -1

    @property
    def size(self):
        return math.prod(self.shape)

    def __repr__(self):
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter({self.name!r}, {self.shape}, {state})"


# ---- modules -------------------------------------------------------------------------


class Module:
    """Base of every layer: parameters, children, a buffer cache, forward and backward.

    Subclasses implement::

        forward(ctx, x) -> y               # saves what backward needs on self
        backward(ctx, dy, need_dx=True) -> dx or None

    `ctx` is the pass (`Pass`): train flag, dropout seed, sequence shape, and the
    tracker a backward reports finished parameter gradients to (`ctx.done(*params)`).
    Parameter gradients ACCUMULATE into `p.grad` (tied weights add up); dx OVERWRITES.
    Every array is 2-D (rows, features) unless a layer says otherwise.
    """

    def __init__(self):
        self._params = {}
        self._children = {}
        self._buffers = {}
        self.k = None  # the kernel namespace, set when the model is bound
        self.dtype = None

    # -- construction ------------------------------------------------------------------

    def param(self, name, shape, init, trainable=True):
        """Declare parameter `name`; it gets memory when the model is bound."""
        p = Parameter(shape, init, trainable)
        self._params[name] = p
        return p

    def child(self, name, module):
        """Register `module` as child `name` (also set as an attribute when it is one)."""
        self._children[name] = module
        if name.isidentifier():
            object.__setattr__(self, name, module)
        return module

    def named_modules(self, prefix=""):
        """(dotted name, module) for this module and every descendant, pre-order."""
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_params(self, prefix=""):
        """(dotted name, Parameter) in PyTorch's order, a shared Parameter listed once."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def grad_params(self):
        """The parameters whose gradient this module's backward writes (`ctx.done`s).

        Own trainable parameters by default; a layer using a parameter it does not own
        (the tied output head) adds it here so the tracker counts that use too.
        """
        return [p for p in self._params.values() if p.trainable]

    # -- buffers -----------------------------------------------------------------------

    def buffer(self, key, shape, dtype=None):
        """A cached array for `key` at `shape`: the same memory every call (contents stale)."""
        dtype = self.dtype if dtype is None else dtype
        slot = (key, shape, dtype)
        buf = self._buffers.get(slot)
        if buf is None:
            buf = self._buffers[slot] = np.empty(shape, dtype=dtype)
        return buf

    def zeros(self, key, shape, dtype=None):
        """`buffer` filled with zeros."""
        buf = self.buffer(key, shape, dtype)
        buf.fill(0)
        return buf

    # -- computation -------------------------------------------------------------------

    def forward(self, ctx, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, ctx, dout, need_dx=True):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def __repr__(self):
        return f"{type(self).__name__}()"


class ModuleList(Module):
    """Children named "0", "1", ... as torch.nn.ModuleList (names `layers.0.weight`)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        self.child(str(len(self._children)), module)

    def __getitem__(self, i):
        return self._children[str(i if i >= 0 else len(self._children) + i)]

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __reversed__(self):
        return reversed(self._children.values())


# ---- one pass and its gradient tracker -----------------------------------------------


class Pass:
    """What one forward (+ backward) needs beyond its input.

    train       dropout active (compute_gradients) or not (forward / evaluate)
    seed        the dropout seed: masks are a pure function of (seed, layer, element)
    batch, seq  the (B, T) of a sequence model, for the attention core's reshapes
    tracker     a `GradTracker` (backward only)
    """

    __slots__ = ("train", "seed", "batch", "seq", "tracker")

    def __init__(self, train, seed=0, tracker=None):
        self.train = train
        self.seed = seed
        self.batch = self.seq = 0
        self.tracker = tracker

    def fresh(self, p):
        """True while no backward of this pass has written p's gradient yet: its buffer
        holds last pass's values, so the first write must overwrite (or zero first)."""
        return self.tracker.fresh(p)

    def zero_fresh(self, *params):
        """Zero the gradients of `params` not yet written in this pass: for a kernel
        that can only accumulate into them."""
        for p in params:
            if p is not None and p.trainable and self.tracker.fresh(p):
                p.grad.fill(0)

    def done(self, *params):
        """A backward has finished its contribution to these parameters' gradients."""
        tracker = self.tracker
        for p in params:
            if p is not None and p.trainable:
                tracker.done(p)


class GradTracker:
    """Turns "parameter p's gradient is final" into contiguous ranges of the flat buffer.

    Backward runs from the last layer, so gradients complete roughly from the end of the
    buffer toward the start. The tracker keeps a frontier: every parameter at or above it
    is final and already reported. When the parameter just below the frontier finishes
    (all its uses counted), the frontier moves down over every finished parameter and
    `grad_ready(start, stop)` is called once for the newly final range. So the ranges are
    disjoint, descending, and cover [0, grads.size) exactly once; a parameter finishing
    early (a tied weight used by the head) is held until the frontier reaches it.
    """

    def __init__(self, params, uses, total):
        self.params = params  # trainable, ascending offset
        self.uses = uses  # backward calls that write each one's gradient
        self.total = total
        self.remaining = list(uses)
        self.frontier = len(params)
        self.callback = None

    def reset(self, callback):
        self.remaining[:] = self.uses
        self.frontier = len(self.params)
        self.callback = callback

    def fresh(self, p):
        """No backward call has finished writing p's gradient in this pass (the
        gradient buffer is not zeroed between passes: see Model.compute_gradients)."""
        return self.remaining[p.index] == self.uses[p.index]

    def done(self, p):
        remaining = self.remaining
        remaining[p.index] -= 1
        if p.index != self.frontier - 1 or remaining[p.index]:
            return
        stop = (
            self.total if self.frontier == len(self.params) else self.params[self.frontier].offset
        )
        f = self.frontier
        while f and remaining[f - 1] == 0:
            f -= 1
        self.frontier = f
        if self.callback is not None:
            self.callback(self.params[f].offset, stop)

    def finish(self):
        """Check every gradient was reported final (a backward that forgot one is a bug)."""
        if self.frontier:
            pending = [p.name for p, r in zip(self.params, self.remaining, strict=True) if r]
            raise RuntimeError(f"backward left gradients unfinished: {', '.join(pending)}")
