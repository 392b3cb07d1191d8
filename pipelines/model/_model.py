"""The Model base: flat buffers, the compute/apply split, state dicts.

Design note. Every trainable parameter of a model is a view into ONE contiguous buffer,
`model.params`, laid out in named_parameters order; its gradient is the same view into
`model.grads`. So a ZeRO shard is a slice, a collective is one call on a slice, a
checkpoint is one array and a hash is one pass. Frozen parameters (a LoRA base model)
live in a third buffer, `model.frozen`, which the optimizer, the sharding and weight
decay never see.

`compute_gradients` is the whole of a model's part in a training step: it zeroes and
fills `grads` with dLoss/dparams and leaves `params` untouched; applying the update is
the Optimizer's business, on its shard. During the backward it can report contiguous
ranges of `grads` as they become final (`grad_ready`), so the Reducer overlaps.

A model runs one call at a time (it is not re-entrant): the GradientWorker owns it.
"""

import fnmatch
import math
import zlib
from typing import NamedTuple

import numpy as np

from pipelines.model import losses as _losses
from pipelines.model._kernels import check_backend, kernels
from pipelines.model._layers import Dropout, Linear, LoRALinear
from pipelines.model._module import GradTracker, Module, Pass


class ParamSlot(NamedTuple):
    """Where one parameter lives: in `params` (trainable) or in `frozen`, from `offset`."""

    name: str
    offset: int
    shape: tuple
    trainable: bool


LORA_KEYS = ("rank", "alpha", "targets", "dropout")


class Model(Module):
    """Base of every model: subclasses build their modules, then call `_setup`.

    Subclass contract::

        output_names                  the keys of the outputs dict ("logits", ...)
        default_loss                  a loss spec (see pipelines.model.losses)
        _prepare(batch, targets)      -> the normalised batch dict (checked, converted)
        _forward(ctx, batch)          -> outputs dict (views of the model's buffers)
        _output_grads(outputs)        -> zeroed dict of the same arrays' gradients
        _backward(ctx, doutputs)      -> None (parameter gradients via the modules)
        _export(outputs)              -> outputs as returned to callers (copies)
    """

    name = "model"
    output_names = ("logits",)
    default_loss = "cross_entropy"

    # ---- construction ----------------------------------------------------------------

    def _setup(self, *, seed, backend, dtype, lora):
        """Apply LoRA, give every parameter memory, initialise it from `seed`."""
        self.backend = check_backend(backend)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype: expected float32 or float64, got {dtype!r}")
        if self.dtype == np.float64 and backend != "numpy":
            raise ValueError("dtype: float64 needs backend='numpy' (the kernels are float32)")
        self.seed = int(seed)
        self.lora = _normalise_lora(lora)
        if self.lora is not None:
            self._apply_lora(**self.lora)
        self._bind()
        self._losses = {}
        self._train_pass = Pass(train=True, tracker=self._tracker)
        self._eval_pass = Pass(train=False)

    def _apply_lora(self, rank, alpha, targets, dropout):
        """Wrap each Linear matched by a target in a LoRALinear; freeze everything else."""
        linears = [
            (f"{name}.{child_name}" if name else child_name, mod, child_name, child)
            for name, mod in self.named_modules()
            for child_name, child in mod._children.items()
            if type(child) is Linear
        ]
        used = set()
        for full, parent, child_name, child in linears:
            hits = [t for t in targets if _lora_match(full, t)]
            if hits:
                used.update(hits)
                parent.child(child_name, LoRALinear(child, rank, alpha, dropout))
        unused = [t for t in targets if t not in used]
        if unused:
            names = ", ".join(full for full, *_ in linears)
            raise ValueError(f"lora targets {unused} match no Linear layer; the layers: {names}")
        for name, p in self.named_params():
            if ".lora_A." not in f".{name}" and ".lora_B." not in f".{name}":
                p.trainable = False

    def _bind(self):
        named = list(self.named_params())
        sizes = {"params": 0, "frozen": 0}
        self.layout = []
        for name, p in named:
            where = "params" if p.trainable else "frozen"
            p.name, p.offset = name, sizes[where]
            sizes[where] += p.size
            self.layout.append(ParamSlot(name, p.offset, p.shape, p.trainable))
        self.params = np.zeros(sizes["params"], self.dtype)
        self.grads = np.zeros(sizes["params"], self.dtype)
        self.frozen = np.zeros(sizes["frozen"], self.dtype)
        self._named = dict(named)
        trainable = [p for _, p in named if p.trainable]
        for i, p in enumerate(trainable):
            p.index = i
        for name, p in named:
            buf = self.params if p.trainable else self.frozen
            p.data = buf[p.offset : p.offset + p.size].reshape(p.shape)
            p.grad = (
                self.grads[p.offset : p.offset + p.size].reshape(p.shape) if p.trainable else None
            )
            # One stream per parameter name: a parameter's init does not depend on the
            # rest of the model (a LoRA model's base equals the plain model's bits).
            seq = np.random.SeedSequence(self.seed, spawn_key=(zlib.crc32(name.encode()),))
            p.data[...] = p.init(np.random.default_rng(seq), p.shape)
        k = kernels(self.backend)
        uses = [0] * len(trainable)
        stream = 0
        for _, mod in self.named_modules():
            mod.k, mod.dtype = k, self.dtype
            if isinstance(mod, Dropout):
                mod.stream, stream = stream, stream + 1
            for p in mod.grad_params():
                uses[p.index] += 1
        unused = [p.name for p, u in zip(trainable, uses, strict=True) if u == 0]
        if unused:
            raise RuntimeError(f"no module writes the gradient of {unused}")
        self._tracker = GradTracker(trainable, uses, self.params.size)

    # ---- parameters and state --------------------------------------------------------

    def named_parameters(self):
        """(name, array view) for every parameter, trainable and frozen, in layout order.

        The views are live: writing one writes the model (`params` or `frozen`).
        """
        for name, p in self._named.items():
            yield name, p.data

    def num_parameters(self, trainable_only=False):
        """Number of scalars in the parameters (only the trainable ones if asked)."""
        return self.params.size + (0 if trainable_only else self.frozen.size)

    def state_dict(self):
        """name -> a copy of that parameter (trainable and frozen), in layout order."""
        return {name: p.data.copy() for name, p in self._named.items()}

    def load_state_dict(self, state_dict):
        """Copy every parameter from `state_dict` (name -> array), all checked first.

        Raises a one-line ValueError for a missing or unexpected key, or a shape or
        dtype that differs from the model's; nothing is written then.
        """
        for key in state_dict:
            if key not in self._named:
                raise ValueError(
                    f"load_state_dict: unexpected key {key!r} "
                    f"(the model has {len(self._named)} keys: {_few(self._named)})"
                )
        for key, p in self._named.items():
            if key not in state_dict:
                raise ValueError(f"load_state_dict: missing key {key!r} (shape {p.shape})")
            value = state_dict[key]
            shape = tuple(getattr(value, "shape", ()))
            dtype = getattr(value, "dtype", type(value).__name__)
            if shape != p.shape:
                raise ValueError(f"load_state_dict: {key!r} has shape {shape}, expected {p.shape}")
            if dtype != self.dtype:
                raise ValueError(
                    f"load_state_dict: {key!r} has dtype {dtype}, expected {self.dtype.name}"
                )
        for key, p in self._named.items():
            p.data[...] = state_dict[key]

    # ---- the compute/apply split -----------------------------------------------------

    def compute_gradients(self, batch, loss_fn=None, *, seed=0, grad_ready=None):
        """Loss and its true gradient: `grads` zeroed then filled, `params` untouched.

        batch       the model's batch dict (see the model's docstring)
        loss_fn     a loss spec (pipelines.model.losses.resolve_loss); None = the model's
        seed        drives every dropout mask (a pure function of seed, layer, element)
        grad_ready  called as grad_ready(start, stop) each time grads[start:stop] is
                    final, from the end of the buffer toward the start; the ranges
                    cover the buffer exactly once (none at all if nothing trains).
                    It runs on the thread running compute_gradients, inside the
                    backward: hand the range off and return (an exception aborts the
                    call and leaves `grads` undefined).

        Returns (loss, self.grads): the gradient is of the mean loss over the batch, in
        the model's own buffer, overwritten by the next call — copy it to keep it.
        """
        batch = self._prepare(batch, targets=True)
        loss = self._resolve_loss(loss_fn)
        ctx = self._train_pass
        ctx.seed = int(seed)
        outputs = self._forward(ctx, batch)
        doutputs = self._output_grads(outputs)
        value = float(loss(outputs, batch, doutputs, 1.0))
        # No zeroing pass over `grads`: each parameter's first write of the pass
        # overwrites it (Pass.fresh), as torch's zero_grad(set_to_none=True) does.
        self._tracker.reset(grad_ready)
        self._backward(ctx, doutputs)
        self._tracker.finish()
        return value, self.grads

    def forward(self, inputs):
        """The model's outputs for `inputs` (a batch dict; targets not needed), no dropout.

        Returns a dict of fresh arrays (see `output_names`); no gradient work is done.
        """
        return self._export(self._forward(self._eval_pass, self._prepare(inputs, targets=False)))

    def evaluate(self, batch, loss_fn=None):
        """{"loss": float, **outputs} for a batch with targets, no dropout, no gradients."""
        batch = self._prepare(batch, targets=True)
        outputs = self._forward(self._eval_pass, batch)
        value = float(self._resolve_loss(loss_fn)(outputs, batch, None, 1.0))
        return {"loss": value, **self._export(outputs)}

    def _resolve_loss(self, spec):
        spec = self.default_loss if spec is None else spec
        if isinstance(spec, _losses.Loss):
            return spec
        if callable(spec):
            return _losses.resolve_loss(spec, self.backend)
        key = repr(spec)
        loss = self._losses.get(key)
        if loss is None:
            loss = self._losses[key] = _losses.resolve_loss(spec, self.backend)
        return loss

    # ---- defaults shared by the single-output models ---------------------------------

    def _output_grads(self, outputs):
        return {k: self.zeros(f"d_{k}", v.shape) for k, v in outputs.items()}

    def _export(self, outputs):
        return {k: v.copy() for k, v in outputs.items()}

    def _array(self, batch, key, dtype, ndim, hint):
        """batch[key] as a C-contiguous `dtype` array of `ndim` dims, or a one-line error."""
        if key not in batch:
            raise ValueError(
                f"{self.name} batch: missing key {key!r} (expected {hint}); "
                f"got keys {sorted(batch)}"
            )
        a = batch[key]
        if not isinstance(a, np.ndarray) or a.ndim != ndim:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{self.name} batch[{key!r}]: expected {hint}, got {got}")
        if np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu":
            raise ValueError(f"{self.name} batch[{key!r}]: expected {hint}, got {a.dtype} ids")
        return np.ascontiguousarray(a, dtype=dtype)

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.name!r}, {self.num_parameters(True)} trainable + "
            f"{self.frozen.size} frozen parameters, backend={self.backend!r})"
        )


# ---- LoRA config -----------------------------------------------------------------------


def _normalise_lora(lora):
    """None, or {"rank", "alpha", "targets", "dropout"} with defaults filled in."""
    if lora is None or lora is False:
        return None
    if not isinstance(lora, dict):
        raise ValueError(
            f"lora: expected a dict like {{'rank': 4, 'alpha': 8, 'targets': ['qkv']}}, "
            f"got {type(lora).__name__}"
        )
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"lora: unknown key(s) {unknown}; accepted: {', '.join(LORA_KEYS)}")
    rank = lora.get("rank", 4)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: expected an integer >= 1, got {rank!r}")
    targets = lora.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("lora targets: expected a list of Linear layer names or patterns")
    alpha = float(lora.get("alpha", rank))
    dropout = float(lora.get("dropout", 0.0))
    if not math.isfinite(alpha):
        raise ValueError(f"lora alpha: expected a finite number, got {alpha!r}")
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "dropout": dropout}


def _lora_match(name, target):
    """A target matches a layer by full name, by trailing name ("qkv") or by glob."""
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def _few(names, n=6):
    names = list(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
