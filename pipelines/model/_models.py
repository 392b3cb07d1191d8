"""The models, registered by name, and `build_model`.

Every model is built from plain keyword config (TOML-friendly), and every one also takes::

    seed=0             initialisation: one numpy SeedSequence stream per parameter name
    lora=None          {"rank": 4, "alpha": 8, "targets": ["qkv", ...], "dropout": 0.0}:
                       wrap matching Linear layers (full name, trailing name or glob) in
                       LoRALinear and freeze every other parameter
    backend="cython"   or "numpy" (the kernel twins; for float64 gradient checks)
    dtype="float32"    or "float64" (numpy backend only)

Batches are dicts of numpy arrays; each model's docstring lists its keys. Inputs of the
wrong dtype are converted (a copy); a missing key or a wrong rank is a one-line error.
"""

import inspect
import math

import numpy as np

from pipelines.model._layers import (
    Block,
    Dropout,
    Embedding,
    L2Normalize,
    ModuleList,
    build_stack,
    make_norm,
    stack_backward,
    stack_forward,
)
from pipelines.model._model import Model

# The registry: name -> Model subclass (its keyword-only __init__ is the config schema).
MODELS = {}


def register_model(name):
    """Class decorator: make a Model subclass buildable as `build_model(name, **cfg)`."""

    def register(cls):
        if name in MODELS:
            raise ValueError(f"register_model: {name!r} is already registered")
        cls.name = name
        MODELS[name] = cls
        return cls

    return register


def model_names():
    return sorted(MODELS)


def build_model(name, **cfg):
    """The model registered as `name`, built from keyword config `cfg`.

    One-line ValueErrors for an unknown name (listing the known ones), an unknown config
    key or a missing required one (listing what the model accepts).
    """
    cls = MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = [k for k in cfg if k not in accepted]
    if unknown:
        raise ValueError(
            f"{name}: unknown config key(s) {unknown}; accepted: {', '.join(accepted)}"
        )
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in cfg]
    if missing:
        raise ValueError(
            f"{name}: missing config key(s) {missing}; accepted: {', '.join(accepted)}"
        )
    return cls(**cfg)


def _sizes(in_dim, hidden, out_dim):
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    sizes = [in_dim, *hidden, out_dim]
    if not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"layer sizes: expected positive integers, got {sizes}")
    return sizes


# ---- MLP models --------------------------------------------------------------------------


class _MLPModel(Model):
    """x (B, in_dim) -> the Linear stack -> one output; subclasses read the targets."""

    def _prepare(self, batch, targets):
        if isinstance(batch, np.ndarray):
            batch = {"x": batch}
        out = dict(batch)
        out["x"] = self._array(batch, "x", self.dtype, 2, f"(B, {self.in_dim}) float")
        if targets:
            out["y"] = self._targets(batch)
        return out

    def _forward(self, ctx, batch):
        return {self.output_names[0]: stack_forward(self, ctx, batch["x"])}

    def _backward(self, ctx, doutputs):
        stack_backward(self, ctx, doutputs[self.output_names[0]], need_dx=False)


@register_model("mlp_classifier")
class MLPClassifier(_MLPModel):
    """Multi-layer perceptron classifier: x -> [Linear -> act -> dropout]* -> Linear -> logits.

    batch    {"x": (B, in_dim) float, "y": (B,) int64 class ids}
    outputs  {"logits": (B, n_classes)}
    loss     cross_entropy
    names    layers.0.weight (hidden[0], in_dim), layers.0.bias, ..., layers.L.weight
    """

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
        lora=None,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.in_dim = in_dim
        build_stack(self, _sizes(in_dim, hidden, n_classes), activation, dropout)
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=lora)

    def _targets(self, batch):
        return self._array(batch, "y", np.int64, 1, "(B,) int64 class ids")


@register_model("mlp_regressor")
class MLPRegressor(_MLPModel):
    """Multi-layer perceptron regressor, trained with mean squared error.

    batch    {"x": (B, in_dim) float, "y": (B, out_dim) float (or (B,) when out_dim is 1)}
    outputs  {"predictions": (B, out_dim)}
    loss     mse
    names    layers.0.weight, layers.0.bias, ... as mlp_classifier
    """

    output_names = ("predictions",)
    default_loss = "mse"

    def __init__(
        self,
        *,
        in_dim,
        out_dim=1,
        hidden=(64,),
        activation="relu",
        dropout=0.0,
        seed=0,
        lora=None,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        build_stack(self, _sizes(in_dim, hidden, out_dim), activation, dropout)
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=lora)

    def _targets(self, batch):
        y = batch.get("y")
        ndim = 1 if isinstance(y, np.ndarray) and y.ndim == 1 and self.out_dim == 1 else 2
        y = self._array(batch, "y", self.dtype, ndim, f"(B, {self.out_dim}) float")
        return y.reshape(-1, self.out_dim)


@register_model("triplet_embedder")
class TripletEmbedder(Model):
    """MLP embedding, L2-normalised (or plain), trained with the triplet margin loss.

    batch    {"anchor", "positive", "negative": (B, in_dim) float each}
             (forward also takes {"x": (B, in_dim)} and returns {"embeddings"})
    outputs  {"anchor", "positive", "negative": (B, embed_dim)}
    loss     triplet_margin with this model's margin, p and swap
    names    layers.0.weight, layers.0.bias, ... as mlp_classifier

    The three inputs run as one (3B, in_dim) batch: one pass, bigger matrix products.
    """

    output_names = ("anchor", "positive", "negative")

    def __init__(
        self,
        *,
        in_dim,
        embed_dim=16,
        hidden=(64,),
        activation="relu",
        dropout=0.0,
        normalize=True,
        margin=1.0,
        p=2,
        swap=False,
        seed=0,
        lora=None,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.in_dim, self.embed_dim = in_dim, embed_dim
        build_stack(self, _sizes(in_dim, hidden, embed_dim), activation, dropout)
        self.normalize = self.child("normalize", L2Normalize()) if normalize else None
        self.default_loss = {
            "triplet_margin": {"weight": 1.0, "margin": margin, "p": p, "swap": swap}
        }
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=lora)

    def _prepare(self, batch, targets):
        if isinstance(batch, np.ndarray):
            batch = {"x": batch}
        hint = f"(B, {self.in_dim}) float"
        if not targets and "x" in batch:
            return {"x": self._array(batch, "x", self.dtype, 2, hint)}
        a, p, n = (self._array(batch, key, self.dtype, 2, hint) for key in self.output_names)
        if not a.shape == p.shape == n.shape:
            raise ValueError(
                f"{self.name} batch: anchor, positive, negative must have one shape, got "
                f"{a.shape}, {p.shape}, {n.shape}"
            )
        b = a.shape[0]
        x = self.buffer("x3", (3 * b, self.in_dim))
        x[:b], x[b : 2 * b], x[2 * b :] = a, p, n
        return {**batch, "x": x, "b": b}

    def _forward(self, ctx, batch):
        e = stack_forward(self, ctx, batch["x"])
        if self.normalize is not None:
            e = self.normalize.forward(ctx, e)
        if "b" not in batch:
            return {"embeddings": e}
        b = batch["b"]
        return {"anchor": e[:b], "positive": e[b : 2 * b], "negative": e[2 * b :]}

    def _output_grads(self, outputs):
        b = outputs["anchor"].shape[0]
        d = self._d_all = self.zeros("d_e", (3 * b, self.embed_dim))
        return {"anchor": d[:b], "positive": d[b : 2 * b], "negative": d[2 * b :]}

    def _backward(self, ctx, doutputs):
        d = self._d_all  # the three views' base: one backward pass for all of them
        if self.normalize is not None:
            d = self.normalize.backward(ctx, d)
        stack_backward(self, ctx, d, need_dx=False)


# ---- the character transformer -------------------------------------------------------------


@register_model("char_transformer")
class CharTransformer(Model):
    """GPT-style character language model with the output head tied to the token embedding.

    tokens + positions -> dropout -> n_layer pre-norm blocks (causal attention, MLP)
    -> final norm -> logits = h @ tok_emb.weight^T.

    batch    {"x": (B, T) int64, "y": (B, T) int64 next tokens}, T <= seq_len,
             or {"tokens": (B, T+1) int64}, split as x = tokens[:, :-1], y = tokens[:, 1:]
    outputs  {"logits": (B, T, vocab)} from forward/evaluate; a loss sees (B*T, vocab)
             and batch["y"] as (B*T,)
    loss     cross_entropy (per token)
    names    tok_emb.weight (vocab, d_model), pos_emb.weight (seq_len, d_model),
             blocks.i.{ln1, attn.qkv, attn.proj, ln2, mlp.fc, mlp.proj}.{weight, bias},
             ln_f.weight, ln_f.bias (rmsnorm: no biases on the norms)
    init     GPT-2's: N(0, 0.02^2) weights and embeddings, zero biases, and the residual
             projections (attn.proj, mlp.proj) at 0.02 / sqrt(2 n_layer)
    """

    output_names = ("logits",)
    default_loss = "cross_entropy"

    def __init__(
        self,
        *,
        vocab=96,
        d_model=128,
        n_head=4,
        n_layer=2,
        seq_len=64,
        mlp="gelu",
        mlp_hidden=None,
        norm="layernorm",
        dropout=0.0,
        gelu_approximate="tanh",
        init_std=0.02,
        seed=0,
        lora=None,
        backend="cython",
        dtype="float32",
    ):
        super().__init__()
        self.vocab, self.d_model, self.seq_len = vocab, d_model, seq_len
        std, proj_std = init_std, init_std / math.sqrt(2 * n_layer)
        self.tok_emb = self.child("tok_emb", Embedding(vocab, d_model, std))
        self.pos_emb = self.child("pos_emb", Embedding(seq_len, d_model, std))
        self.drop = self.child("drop", Dropout(dropout))
        self.blocks = self.child(
            "blocks",
            ModuleList(
                Block(
                    d_model, n_head, mlp, mlp_hidden, norm, dropout, gelu_approximate, std, proj_std
                )
                for _ in range(n_layer)
            ),
        )
        self.ln_f = self.child("ln_f", make_norm(norm, d_model))
        self._pos = {}
        self._setup(seed=seed, backend=backend, dtype=dtype, lora=lora)

    def grad_params(self):
        # the tied head writes tok_emb.weight's gradient too (a second use)
        w = self.tok_emb.weight
        return [w] if w.trainable else []

    def _prepare(self, batch, targets):
        if isinstance(batch, np.ndarray):
            batch = {"x": batch}
        out = dict(batch)
        if "tokens" in batch:
            tokens = self._array(batch, "tokens", np.int64, 2, "(B, T+1) int64")
            b, t = tokens.shape[0], tokens.shape[1] - 1
            x = out["x"] = self.buffer("x", (b, t), np.int64)
            x[...] = tokens[:, :-1]
            y = self.buffer("y", (b, t), np.int64)
            y[...] = tokens[:, 1:]
            out["y"] = y.reshape(-1)
        else:
            x = out["x"] = self._array(batch, "x", np.int64, 2, "(B, T) int64")
            if targets:
                y = self._array(batch, "y", np.int64, 2, "(B, T) int64")
                if y.shape != x.shape:
                    raise ValueError(
                        f"{self.name} batch['y']: expected shape {x.shape}, got {y.shape}"
                    )
                out["y"] = y.reshape(-1)
        if not 0 < x.shape[1] <= self.seq_len:
            raise ValueError(
                f"{self.name} batch: sequence length must be in [1, {self.seq_len}], "
                f"got {x.shape[1]}"
            )
        return out

    def _positions(self, b, t):
        """Position ids 0..t-1 for each of b rows, (b*t,) int64, made once per shape."""
        pos = self._pos.get((b, t))
        if pos is None:
            pos = self._pos[(b, t)] = np.tile(np.arange(t, dtype=np.int64), b)
        return pos

    def _forward(self, ctx, batch):
        x = batch["x"]
        b, t = x.shape
        ctx.batch, ctx.seq = self._bt = b, t
        tok = self.tok_emb.forward(ctx, x.reshape(-1))
        pos = self.pos_emb.forward(ctx, self._positions(b, t))
        h = self.buffer("h0", tok.shape)
        self.k.residual_forward(h, tok, pos)
        h = self.drop.forward(ctx, h)
        for block in self.blocks:
            h = block.forward(ctx, h)
        h = self.ln_f.forward(ctx, h)
        logits = self.buffer("logits", (b * t, self.vocab))
        self.k.linear_forward(logits, h, self.tok_emb.weight.data, None)
        self._h = h
        return {"logits": logits}

    def _backward(self, ctx, doutputs):
        # forward: logits = h @ W_tok^T (the tied head)
        w = self.tok_emb.weight
        dh = self.buffer("dh", self._h.shape)
        if w.trainable:
            accumulate = not ctx.fresh(w)  # first here: the embedding adds to it later
            self.k.linear_backward(
                dh, w.grad, None, doutputs["logits"], self._h, w.data, accumulate=accumulate
            )
        else:
            np.matmul(doutputs["logits"], w.data, out=dh)
        ctx.done(w)
        dh = self.ln_f.backward(ctx, dh)
        for block in reversed(self.blocks):
            dh = block.backward(ctx, dh)
        dh = self.drop.backward(ctx, dh)
        # forward: h0 = tok_emb(x) + pos_emb(positions): both get dh
        self.pos_emb.backward(ctx, dh)
        self.tok_emb.backward(ctx, dh)

    def _export(self, outputs):
        return {"logits": outputs["logits"].reshape(*self._bt, self.vocab).copy()}
