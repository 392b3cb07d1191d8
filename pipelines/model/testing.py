"""Gradient-checking tools for models and layers (as numpy.testing is for arrays).

    model = build_model("mlp_classifier", ..., backend="numpy", dtype="float64")
    check_gradients(model, batch, probe_loss())

The probe loss is <R, outputs> with a fixed random R: its gradient is R exactly, so a
finite-difference check through it tests the model's backward and nothing else. For
float64 models (backend="numpy"); central differences in float32 are too noisy to mean
anything.
"""

import numpy as np

from pipelines.model._model import Model

__all__ = ["LayerModel", "check_gradients", "check_input_gradient", "close_enough", "probe_loss"]


def probe_loss(seed=0):
    """A loss callable: sum over outputs of <R_key, outputs[key]>, R ~ N(0, 1) fixed per
    (key, shape) for the life of the callable."""
    weights = {}

    def probe(outputs, batch, grads=None, grad_scale=1.0):
        total = 0.0
        for key in sorted(outputs):
            out = outputs[key]
            r = weights.get((key, out.shape))
            if r is None:
                rng = np.random.default_rng([seed, len(weights)])
                r = weights[(key, out.shape)] = rng.normal(size=out.shape)
            total += float((r * out).sum())
            if grads is not None:
                grads[key] += (grad_scale * r).astype(out.dtype)
        return total

    return probe


class LayerModel(Model):
    """One layer as a model: outputs {"out": layer(batch["x"])}; `dx` keeps the gradient
    of the loss with respect to batch["x"] (when x is float) after compute_gradients.

    `seq=(B, T)` sets the pass's sequence shape for layers that need it (attention).
    Parameter names are the layer's prefixed with "layer.".
    """

    name = "layer_model"
    output_names = ("out",)

    def __init__(self, layer, *, seq=None, backend="numpy", dtype="float64", seed=0, lora=None):
        super().__init__()
        self.seq_shape = seq
        self.dx = None
        self.layer = self.child("layer", layer)
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=lora)

    def _prepare(self, batch, targets):
        self._x = batch["x"]
        return batch

    def _forward(self, ctx, batch):
        if self.seq_shape is not None:
            ctx.batch, ctx.seq = self.seq_shape
        return {"out": self.layer.forward(ctx, batch["x"])}

    def _backward(self, ctx, doutputs):
        need_dx = self._x.dtype.kind == "f"
        self.dx = self.layer.backward(ctx, doutputs["out"], need_dx=need_dx)


def close_enough(numeric, analytic):
    return abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(numeric)


def check_gradients(model, batch, loss, *, seed=0, per_tensor=3, directions=2, eps=1e-6):
    """Assert compute_gradients matches central differences: `per_tensor` random
    coordinates of every trainable tensor, and `directions` random directions through
    all of them. Returns how many derivatives were checked. Parameters are restored."""
    if model.dtype != np.float64:
        raise ValueError(f"check_gradients: needs a float64 model, got {model.dtype.name}")
    _, grads = model.compute_gradients(batch, loss, seed=seed)
    g = grads.copy()
    p0 = model.params.copy()
    rng = np.random.default_rng(1234)

    def central(direction):
        values = []
        for sign in (1.0, -1.0):
            model.params[...] = p0 + sign * eps * direction
            values.append(model.compute_gradients(batch, loss, seed=seed)[0])
        return (values[0] - values[1]) / (2 * eps)

    checked = []
    try:
        for slot in model.layout:
            if not slot.trainable:
                continue
            size = int(np.prod(slot.shape))
            for i in rng.choice(size, size=min(per_tensor, size), replace=False):
                e = np.zeros_like(p0)
                e[slot.offset + i] = 1.0
                checked.append((f"{slot.name}[{i}]", central(e), g[slot.offset + i]))
        for d in range(directions):
            v = rng.normal(size=p0.shape)
            checked.append((f"direction {d}", central(v), float(g @ v)))
    finally:
        model.params[...] = p0
    for what, numeric, analytic in checked:
        assert close_enough(numeric, analytic), (
            f"{what}: finite difference {numeric:.10g} vs backward {analytic:.10g}"
        )
    return len(checked)


def check_input_gradient(model, batch, loss, *, seed=0, coords=4, eps=1e-6):
    """Assert a LayerModel's dx matches central differences in `coords` entries of x."""
    model.compute_gradients(batch, loss, seed=seed)
    dx = model.dx.copy()
    x = batch["x"]
    rng = np.random.default_rng(99)
    for i in rng.choice(x.size, size=min(coords, x.size), replace=False):
        values = []
        for sign in (1.0, -1.0):
            xs = x.copy()
            xs.reshape(-1)[i] += sign * eps
            values.append(model.compute_gradients({**batch, "x": xs}, loss, seed=seed)[0])
        numeric = (values[0] - values[1]) / (2 * eps)
        assert close_enough(numeric, dx.reshape(-1)[i]), (
            f"x[{i}]: finite difference {numeric:.10g} vs backward {dx.reshape(-1)[i]:.10g}"
        )
