"""mlp_classifier written again from the public pipelines.model API, as a user would.

    zerotrain run mlp_classifier --model scripts/models/copy_mlp.py:CopyMLP --ranks 2 --mode zero2

The same parameter names, shapes and initialisers as the built-in (a parameter's initial
values come from the seed and its name), the same layers in the same order: it trains to
the same bits as `zerotrain run mlp_classifier` (tests/pipelines/model/test_file_models.py).
"""

import numpy as np

from pipelines.model import Activation, Dropout, Linear, Model, ModuleList


class CopyMLP(Model):
    """x (B, in_dim) -> [Linear -> act -> dropout]* -> Linear -> logits (B, n_classes)."""

    output_names = ("logits",)
    default_loss = "cross_entropy"

    def __init__(
        self,
        *,
        in_dim,
        n_classes,
        hidden=(64,),
        activation="relu",
        dropout=0.0,
        seed=0,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.in_dim = in_dim
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        sizes = [in_dim, *hidden, n_classes]
        self.child(
            "layers", ModuleList(Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        )
        self.child("acts", ModuleList(Activation(activation) for _ in hidden))
        self.child("drops", ModuleList(Dropout(dropout) for _ in hidden))
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=None)

    def _prepare(self, batch, targets):
        out = {"x": self._array(batch, "x", self.dtype, 2, f"(B, {self.in_dim}) float")}
        if targets:
            out["y"] = self._array(batch, "y", np.int64, 1, "(B,) int64 class ids")
        return out

    def _forward(self, ctx, batch):
        x = batch["x"]
        for i in range(len(self.layers) - 1):
            x = self.layers[i].forward(ctx, x)
            x = self.drops[i].forward(ctx, self.acts[i].forward(ctx, x))
        return {"logits": self.layers[-1].forward(ctx, x)}

    def _backward(self, ctx, doutputs):
        # forward: x -> layers.0 -> act -> drop -> ... -> layers.L; read bottom up
        d = doutputs["logits"]
        for i in range(len(self.layers) - 1, 0, -1):
            d = self.layers[i].backward(ctx, d)
            d = self.acts[i - 1].backward(ctx, self.drops[i - 1].backward(ctx, d))
        self.layers[0].backward(ctx, d, need_dx=False)
