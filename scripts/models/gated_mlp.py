"""A worked example: a classifier with a layer of your own (forward and backward in numpy).

    zerotrain check-model scripts/models/gated_mlp.py:GatedMLP         # gradients first
    zerotrain run mlp_classifier --model scripts/models/gated_mlp.py:GatedMLP \\
        --set data.name=table --set data.path=digits.csv              # then train

GatedLinear is a gated linear unit: y = (x W^T + b) * sigmoid(x G^T + c). Its
parameters live in the model's flat buffer like any built-in layer's (`self.param`),
so the run shards, reduces, checkpoints and hashes them without knowing the layer.
"""

import numpy as np

from pipelines.model import Linear, Model, Module


class GatedLinear(Module):
    """x (N, I) -> (N, O): value (x W^T + b) times gate sigmoid(x G^T + c)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.value = self.child("value", Linear(in_features, out_features))
        self.gate = self.child("gate", Linear(in_features, out_features))

    def forward(self, ctx, x):
        v = self.value.forward(ctx, x)
        self._v = v.copy()
        self._s = 1.0 / (1.0 + np.exp(-self.gate.forward(ctx, x)))
        out = self.buffer("out", v.shape)
        np.multiply(self._v, self._s, out=out)
        return out

    def backward(self, ctx, dout, need_dx=True):
        # forward: out = v * s, s = sigmoid(g): dv = dout * s, dg = dout * v * s (1 - s)
        dv = dout * self._s
        dg = dout * self._v * self._s * (1.0 - self._s)
        dx_v = self.value.backward(ctx, dv.astype(dout.dtype), need_dx)
        dx_v = None if dx_v is None else dx_v.copy()  # the gate's backward reuses buffers
        dx_g = self.gate.backward(ctx, dg.astype(dout.dtype), need_dx)
        return None if dx_v is None else dx_v + dx_g


class GatedMLP(Model):
    """x (B, in_dim) -> GatedLinear -> Linear -> logits (B, n_classes); cross-entropy.

    `hidden` (an int, or a list whose first entry is used) and `activation` come from
    the pipeline's [model] table; the gate is this model's nonlinearity, so
    `activation` is accepted and not used.
    """

    output_names = ("logits",)
    default_loss = "cross_entropy"

    def __init__(
        self,
        *,
        in_dim,
        n_classes,
        hidden=64,
        activation=None,
        seed=0,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.in_dim = in_dim
        width = hidden if isinstance(hidden, int) else hidden[0]
        self.child("gated", GatedLinear(in_dim, width))
        self.child("head", Linear(width, n_classes))
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=None)

    def _prepare(self, batch, targets):
        out = {"x": self._array(batch, "x", self.dtype, 2, f"(B, {self.in_dim}) float")}
        if targets:
            out["y"] = self._array(batch, "y", np.int64, 1, "(B,) int64 class ids")
        return out

    def _forward(self, ctx, batch):
        return {"logits": self.head.forward(ctx, self.gated.forward(ctx, batch["x"]))}

    def _backward(self, ctx, doutputs):
        self.gated.backward(ctx, self.head.backward(ctx, doutputs["logits"]), need_dx=False)
