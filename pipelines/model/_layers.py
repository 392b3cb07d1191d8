"""Layers: each a small Module whose forward and backward read side by side.

Shape legend: N rows (B*T for sequence models), I/O in/out features, C channels,
B batch, T time, H heads, V vocabulary, r LoRA rank.

Conventions (the kernels' own): float arrays C-contiguous; every output is a buffer the
layer owns (`self.buffer`), never an input written in place, so nothing a later backward
reads is clobbered; dx overwrites; parameter gradients accumulate, except that the
first write of a pass overwrites (`ctx.fresh`) or zeroes first (`ctx.zero_fresh`): the
gradient buffer is not zeroed between passes. Each backward ends by
telling the pass which parameter gradients it has finished (`ctx.done`), which is what
lets the Reducer start on the tail of the gradient while backward still runs.

Ops without a kernel (L2 normalisation, LoRA's scale) are short numpy here, written
with `out=` so they allocate nothing per step.
"""

import numpy as np

from pipelines.model._module import Module, ModuleList, constant, linear_bound, normal, uniform

# ---- linear --------------------------------------------------------------------------


class Linear(Module):
    """y = x W^T + b.  x (N, I) -> y (N, O); weight (O, I), bias (O,) as torch.nn.Linear.

    `std=None` gives torch's default init (weight and bias U(+-1/sqrt(I))); a float gives
    GPT-2's (weight N(0, std^2), bias 0).
    """

    def __init__(self, in_features, out_features, bias=True, std=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = linear_bound(in_features)
        w_init = uniform(bound) if std is None else normal(std)
        b_init = uniform(bound) if std is None else constant(0.0)
        self.weight = self.param("weight", (out_features, in_features), w_init)
        self.bias = self.param("bias", (out_features,), b_init) if bias else None

    def forward(self, ctx, x):
        self._x = x
        out = self.buffer("out", (x.shape[0], self.out_features))
        bias = None if self.bias is None else self.bias.data
        self.k.linear_forward(out, x, self.weight.data, bias)
        return out

    def backward(self, ctx, dout, need_dx=True):
        # forward: out = x @ W.T + b
        x, w, b = self._x, self.weight, self.bias
        dx = self.buffer("dx", x.shape) if need_dx else None
        if w.trainable:
            db = b.grad if b is not None and b.trainable else None
            overwrite = ctx.fresh(w) and (db is None or ctx.fresh(b))
            if not overwrite:
                ctx.zero_fresh(w, b)
            self.k.linear_backward(dx, w.grad, db, dout, x, w.data, accumulate=not overwrite)
        else:
            # Frozen weight (a LoRA base, a frozen layer): the kernel's dweight is not
            # optional, and dx = dout @ W is one BLAS call anyway.
            if dx is not None:
                np.matmul(dout, w.data, out=dx)
            if b is not None and b.trainable:
                ctx.zero_fresh(b)
                b.grad += dout.sum(axis=0)
        ctx.done(w, b)
        return dx

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"


class LoRALinear(Module):
    """y = x W^T + b + (alpha / r) * B(A(dropout(x))) with W, b frozen (Hu et al. 2021).

    Wraps a `Linear` and takes over its parameters, frozen, under the same names
    (`<name>.weight`, `<name>.bias`), so a base checkpoint loads unchanged. The trainable
    adapters are children `lora_A` (r, I) and `lora_B` (O, r), named `<name>.lora_A.weight`
    and `<name>.lora_B.weight` (peft's names without its adapter key "default"). A starts
    as torch's Linear default (kaiming_uniform, as peft), B at zero: the adapted model
    starts equal to the base model.
    """

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank: expected an integer >= 1, got {rank!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        self.weight.trainable = False
        self._params["weight"] = self.weight
        if self.bias is not None:
            self.bias.trainable = False
            self._params["bias"] = self.bias
        self.lora_dropout = self.child("lora_dropout", Dropout(dropout))
        self.lora_A = self.child("lora_A", Linear(self.in_features, rank, bias=False))
        self.lora_B = self.child("lora_B", Linear(rank, self.out_features, bias=False))
        self.lora_B.weight.init = constant(0.0)

    def forward(self, ctx, x):
        base = self.buffer("base", (x.shape[0], self.out_features))
        bias = None if self.bias is None else self.bias.data
        self.k.linear_forward(base, x, self.weight.data, bias)
        u = self.lora_B.forward(ctx, self.lora_A.forward(ctx, self.lora_dropout.forward(ctx, x)))
        np.multiply(u, self.scale, out=u)  # u is lora_B's output; its backward needs only h
        out = self.buffer("out", base.shape)
        self.k.residual_forward(out, base, u)
        return out

    def backward(self, ctx, dout, need_dx=True):
        # forward: out = base(x) + scale * B(A(drop(x)))
        du = self.buffer("du", dout.shape)
        np.multiply(dout, self.scale, out=du)
        dh = self.lora_B.backward(ctx, du)
        dxd = self.lora_A.backward(ctx, dh, need_dx=need_dx)
        if not need_dx:
            return None
        dx_lora = self.lora_dropout.backward(ctx, dxd)
        dx_base = self.buffer("dx_base", dx_lora.shape)
        np.matmul(dout, self.weight.data, out=dx_base)  # W frozen: dx only
        dx = self.buffer("dx", dx_lora.shape)
        # a fork's gradient is the sum of its branches'
        self.k.residual_forward(dx, dx_base, dx_lora)
        return dx

    def __repr__(self):
        return f"LoRALinear({self.in_features}, {self.out_features}, rank={self.rank})"


# ---- activations ---------------------------------------------------------------------


class Activation(Module):
    """Elementwise relu | gelu | silu | tanh (gelu's `approximate` "none" or "tanh")."""

    NAMES = ("relu", "gelu", "silu", "tanh")

    def __init__(self, name, approximate="none"):
        super().__init__()
        if name not in self.NAMES:
            raise ValueError(f"activation: expected one of {', '.join(self.NAMES)}, got {name!r}")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
        self.name, self.approximate = name, approximate

    def forward(self, ctx, x):
        out = self.buffer("out", x.shape)
        k = self.k
        if self.name == "relu":
            k.relu_forward(out, x)
        elif self.name == "gelu":
            k.gelu_forward(out, x, self.approximate)
        elif self.name == "silu":
            k.silu_forward(out, x)
        else:
            k.tanh_forward(out, x)
        self._x, self._y = x, out
        return out

    def backward(self, ctx, dout, need_dx=True):
        dx = self.buffer("dx", dout.shape)
        k, x = self.k, self._x
        if self.name == "relu":
            k.relu_backward(dx, dout, x)
        elif self.name == "gelu":
            k.gelu_backward(dx, dout, x, self.approximate)
        elif self.name == "silu":
            k.silu_backward(dx, dout, x)
        else:
            k.tanh_backward(dx, dout, self._y)  # tanh' = 1 - y^2 from the saved output
        return dx

    def __repr__(self):
        return f"Activation({self.name!r})"


class Dropout(Module):
    """Inverted dropout: y = x * mask / (1 - p) while training, identity otherwise.

    The mask is a pure function of (pass seed, this layer's stream, element index): the
    kernel's counter starts at `stream * 2**40`, the stream numbered when the model is
    bound, so two dropout layers never share mask bits and a step can be replayed.
    """

    STREAM_STRIDE = 1 << 40

    def __init__(self, p=0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.stream = 0

    def forward(self, ctx, x):
        if not ctx.train or self.p == 0.0:
            self._mask = None
            return x
        out = self.buffer("out", x.shape)
        mask = self.buffer("mask", x.shape, np.uint8)
        self.k.dropout_forward(out, mask, x, self.p, ctx.seed, self.stream * self.STREAM_STRIDE)
        self._mask = mask
        return out

    def backward(self, ctx, dout, need_dx=True):
        if self._mask is None:
            return dout
        dx = self.buffer("dx", dout.shape)
        self.k.dropout_backward(dx, dout, self._mask, self.p)
        return dx

    def __repr__(self):
        return f"Dropout(p={self.p})"


# ---- normalisation -------------------------------------------------------------------


class LayerNorm(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (torch.nn.LayerNorm)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = self.param("weight", (dim,), constant(1.0))
        self.bias = self.param("bias", (dim,), constant(0.0))

    def forward(self, ctx, x):
        n = x.shape[0]
        out = self.buffer("out", x.shape)
        self._mean = self.buffer("mean", (n,))
        self._rstd = self.buffer("rstd", (n,))
        self._x = x
        self.k.layernorm_forward(
            out, self._mean, self._rstd, x, self.weight.data, self.bias.data, self.eps
        )
        return out

    def backward(self, ctx, dout, need_dx=True):
        x, w, b = self._x, self.weight, self.bias
        dx = self.buffer("dx", x.shape) if need_dx else None
        ctx.zero_fresh(w, b)  # the kernel accumulates
        dw = w.grad if w.trainable else self.zeros("dw_frozen", w.shape)
        db = b.grad if b.trainable else self.zeros("db_frozen", b.shape)
        self.k.layernorm_backward(dx, dw, db, dout, x, w.data, self._mean, self._rstd)
        ctx.done(w, b)
        return dx


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis (torch.nn.RMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = self.param("weight", (dim,), constant(1.0))

    def forward(self, ctx, x):
        out = self.buffer("out", x.shape)
        self._rstd = self.buffer("rstd", (x.shape[0],))
        self._x = x
        self.k.rmsnorm_forward(out, self._rstd, x, self.weight.data, self.eps)
        return out

    def backward(self, ctx, dout, need_dx=True):
        x, w = self._x, self.weight
        dx = self.buffer("dx", x.shape) if need_dx else None
        ctx.zero_fresh(w)  # the kernel accumulates
        dw = w.grad if w.trainable else self.zeros("dw_frozen", w.shape)
        self.k.rmsnorm_backward(dx, dw, dout, x, w.data, self._rstd)
        ctx.done(w)
        return dx


def make_norm(kind, dim):
    """LayerNorm(dim) for "layernorm", RMSNorm(dim) for "rmsnorm"."""
    if kind == "layernorm":
        return LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm: expected 'layernorm' or 'rmsnorm', got {kind!r}")


class L2Normalize(Module):
    """y = x / max(||x||_2, eps) per row (torch.nn.functional.normalize). No kernel: numpy."""

    def __init__(self, eps=1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, ctx, x):
        n = x.shape[0]
        norm = self.buffer("norm", (n, 1))
        sq = self.buffer("sq", x.shape)
        np.multiply(x, x, out=sq)
        np.sum(sq, axis=1, keepdims=True, out=norm)
        np.sqrt(norm, out=norm)
        np.maximum(norm, self.eps, out=norm)
        out = self.buffer("out", x.shape)
        np.divide(x, norm, out=out)
        self._y, self._norm = out, norm
        return out

    def backward(self, ctx, dout, need_dx=True):
        # forward: y = x / n, n = max(|x|, eps).  dx = (dy - y <dy, y>) / n where |x| > eps
        # (the clamp is then inactive), dx = dy / eps where it is (n constant).
        y, norm = self._y, self._norm
        dot = self.buffer("dot", norm.shape)
        tmp = self.buffer("tmp", y.shape)
        np.multiply(dout, y, out=tmp)
        np.sum(tmp, axis=1, keepdims=True, out=dot)
        np.multiply(dot, norm > self.eps, out=dot)
        dx = self.buffer("dx", y.shape)
        np.multiply(y, dot, out=tmp)
        np.subtract(dout, tmp, out=dx)
        np.divide(dx, norm, out=dx)
        return dx


# ---- embedding -----------------------------------------------------------------------


class Embedding(Module):
    """y[n] = weight[ids[n]]: ids int64 (N,), weight (V, C) as torch.nn.Embedding (N(0, std^2))."""

    def __init__(self, num_embeddings, dim, std=1.0):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = self.param("weight", (num_embeddings, dim), normal(std))

    def forward(self, ctx, ids):
        out = self.buffer("out", (ids.shape[0], self.dim))
        self.k.embedding_forward(out, ids, self.weight.data)
        self._ids = ids
        return out

    def backward(self, ctx, dout, need_dx=False):
        # forward: out[n] = W[ids[n]]  ->  dW[ids[n]] += dout[n]; ids have no gradient
        if self.weight.trainable:
            ctx.zero_fresh(self.weight)  # a scatter-add: it accumulates
            self.k.embedding_backward(self.weight.grad, dout, self._ids)
        ctx.done(self.weight)
        return None


# ---- blocks --------------------------------------------------------------------------


class MLP(Module):
    """fc -> activation -> proj: (N, C) -> (N, hidden) -> (N, C) (GPT-2's MLP with GELU)."""

    def __init__(self, dim, hidden, activation="gelu", approximate="none", std=None, proj_std=None):
        super().__init__()
        self.fc = self.child("fc", Linear(dim, hidden, std=std))
        self.act = self.child("act", Activation(activation, approximate))
        self.proj = self.child("proj", Linear(hidden, dim, std=proj_std))

    def forward(self, ctx, x):
        return self.proj.forward(ctx, self.act.forward(ctx, self.fc.forward(ctx, x)))

    def backward(self, ctx, dout, need_dx=True):
        dh = self.act.backward(ctx, self.proj.backward(ctx, dout))
        return self.fc.backward(ctx, dh, need_dx)


class SwiGLUMLP(Module):
    """fc -> swiglu -> proj: (N, C) -> (N, 2H) = [gate | up] -> (N, H) -> (N, C) (Shazeer 2020)."""

    def __init__(self, dim, hidden, std=None, proj_std=None):
        super().__init__()
        self.hidden = hidden
        self.fc = self.child("fc", Linear(dim, 2 * hidden, std=std))
        self.proj = self.child("proj", Linear(hidden, dim, std=proj_std))

    def forward(self, ctx, x):
        gu = self.fc.forward(ctx, x)
        h = self.buffer("h", (x.shape[0], self.hidden))
        self.k.swiglu_forward(h, gu)
        self._gu = gu
        return self.proj.forward(ctx, h)

    def backward(self, ctx, dout, need_dx=True):
        dh = self.proj.backward(ctx, dout)
        # forward: h = silu(gate) * up
        dgu = self.buffer("dgu", self._gu.shape)
        self.k.swiglu_backward(dgu, dh, self._gu)
        return self.fc.backward(ctx, dgu, need_dx)


class CausalSelfAttention(Module):
    """qkv projection -> causal multi-head attention core -> output projection.

    x (B*T, C) -> qkv (B*T, 3C) = [q | k | v] -> y (B*T, C); the (B, T) come from the
    pass. The core saves the softmax probabilities att (B, H, T, T) for the backward.
    """

    def __init__(self, dim, n_head, std=None, proj_std=None):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"n_head: must divide d_model {dim}, got {n_head}")
        self.dim, self.n_head = dim, n_head
        self.qkv = self.child("qkv", Linear(dim, 3 * dim, std=std))
        self.proj = self.child("proj", Linear(dim, dim, std=proj_std))

    def forward(self, ctx, x):
        b, t, c, h = ctx.batch, ctx.seq, self.dim, self.n_head
        qkv = self.qkv.forward(ctx, x).reshape(b, t, 3 * c)
        att = self.buffer("att", (b, h, t, t))
        y = self.buffer("y", (b, t, c))
        self.k.attention_forward(y, att, qkv, h)
        self._qkv, self._att = qkv, att
        return self.proj.forward(ctx, y.reshape(b * t, c))

    def backward(self, ctx, dout, need_dx=True):
        b, t, c, h = ctx.batch, ctx.seq, self.dim, self.n_head
        dy = self.proj.backward(ctx, dout).reshape(b, t, c)
        dqkv = self.buffer("dqkv", (b, t, 3 * c))
        dpreatt = self.buffer("dpreatt", (b, h, t, t))
        datt = self.buffer("datt", (b, h, t, t))
        # forward: y = softmax(causal(q k^T / sqrt(hs))) v
        self.k.attention_backward(dqkv, dpreatt, datt, dy, self._qkv, self._att, h)
        return self.qkv.backward(ctx, dqkv.reshape(b * t, 3 * c), need_dx)


class Block(Module):
    """Pre-norm transformer block: x += drop(attn(ln1(x))); x += drop(mlp(ln2(x)))."""

    def __init__(
        self,
        dim,
        n_head,
        mlp="gelu",
        hidden=None,
        norm="layernorm",
        dropout=0.0,
        approximate="none",
        std=None,
        proj_std=None,
    ):
        super().__init__()
        self.ln1 = self.child("ln1", make_norm(norm, dim))
        self.attn = self.child("attn", CausalSelfAttention(dim, n_head, std, proj_std))
        self.ln2 = self.child("ln2", make_norm(norm, dim))
        if mlp == "gelu":
            m = MLP(dim, hidden or 4 * dim, "gelu", approximate, std, proj_std)
        elif mlp == "swiglu":
            m = SwiGLUMLP(dim, hidden or swiglu_hidden(dim), std, proj_std)
        else:
            raise ValueError(f"mlp: expected 'gelu' or 'swiglu', got {mlp!r}")
        self.mlp = self.child("mlp", m)
        self.drop_attn = self.child("drop_attn", Dropout(dropout))
        self.drop_mlp = self.child("drop_mlp", Dropout(dropout))

    def forward(self, ctx, x):
        a = self.drop_attn.forward(ctx, self.attn.forward(ctx, self.ln1.forward(ctx, x)))
        x1 = self.buffer("x1", x.shape)
        self.k.residual_forward(x1, x, a)
        m = self.drop_mlp.forward(ctx, self.mlp.forward(ctx, self.ln2.forward(ctx, x1)))
        x2 = self.buffer("x2", x.shape)
        self.k.residual_forward(x2, x1, m)
        return x2

    def backward(self, ctx, dx2, need_dx=True):
        # forward: x2 = x1 + m(x1): the skip passes dx2 on, the branch adds its own dx1
        dm = self.drop_mlp.backward(ctx, dx2)
        dbranch = self.ln2.backward(ctx, self.mlp.backward(ctx, dm))
        dx1 = self.buffer("dx1", dx2.shape)
        self.k.residual_forward(dx1, dx2, dbranch)
        # forward: x1 = x + a(x)
        da = self.drop_attn.backward(ctx, dx1)
        dbranch = self.ln1.backward(ctx, self.attn.backward(ctx, da))
        dx = self.buffer("dx", dx2.shape)
        self.k.residual_forward(dx, dx1, dbranch)
        return dx


def swiglu_hidden(dim):
    """LLaMA's SwiGLU width: 2/3 of 4 * dim (the parameters of a 4x GELU MLP), rounded up to 16."""
    return -(-(8 * dim // 3) // 16) * 16


# ---- MLP stacks ----------------------------------------------------------------------
# The body of the MLP models, as functions over the model itself (not a child module) so
# the parameter names are exactly torch.nn.ModuleList's: `layers.0.weight`, ...


def build_stack(module, sizes, activation="relu", dropout=0.0):
    """Give `module` children `layers` (Linear sizes[i] -> sizes[i+1]) and, between them,
    `acts.i` / `drops.i` (no parameters): x -> layers.0 -> act -> drop -> layers.1 -> ...
    with no activation after the last layer."""
    pairs = zip(sizes[:-1], sizes[1:], strict=False)
    module.child("layers", ModuleList(Linear(a, b) for a, b in pairs))
    n_hidden = len(sizes) - 2
    module.child("acts", ModuleList(Activation(activation) for _ in range(n_hidden)))
    module.child("drops", ModuleList(Dropout(dropout) for _ in range(n_hidden)))


def stack_forward(module, ctx, x):
    layers, acts, drops = module.layers, module.acts, module.drops
    for i in range(len(layers) - 1):
        x = drops[i].forward(ctx, acts[i].forward(ctx, layers[i].forward(ctx, x)))
    return layers[-1].forward(ctx, x)


def stack_backward(module, ctx, dout, need_dx=False):
    layers, acts, drops = module.layers, module.acts, module.drops
    d = dout
    for i in range(len(layers) - 1, 0, -1):
        d = acts[i - 1].backward(ctx, drops[i - 1].backward(ctx, layers[i].backward(ctx, d)))
    return layers[0].backward(ctx, d, need_dx)
