"""PyTorch twins of pipelines.model's models: the test and benchmark reference.

Our state_dict loads into each of them strictly (same names, shapes and layout), so
outputs, losses and gradients can be compared one to one (tests/pipelines/model/
test_torch_parity.py, the 2-rank export check in tests/pipelines/test_cluster.py) and
the same work timed (pipelines/model/bench.py, scripts/_bench_torch_train.py).

torch is a test and benchmark dependency only (the `bench` extra), never a runtime one:
nothing in the package imports this module. It imports torch and nothing from zerotrain,
so scripts that time torch's cold start load it by file path (see
scripts/_bench_torch_train.py) without importing the `pipelines` package.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TorchAttention",
    "TorchBlock",
    "TorchCharTransformer",
    "TorchGeluMLP",
    "TorchLoRALinear",
    "TorchMLP",
    "TorchSwiGLU",
    "gpt2_init",
]


class TorchLoRALinear(nn.Module):
    def __init__(self, i, o, rank, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(o, i), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(o), requires_grad=False)
        self.lora_A = nn.Linear(i, rank, bias=False)
        self.lora_B = nn.Linear(rank, o, bias=False)
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale


class TorchMLP(nn.Module):
    def __init__(self, sizes, act, normalize=False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.act, self.normalize = act, normalize

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return F.normalize(x, dim=1) if self.normalize else x


class TorchAttention(nn.Module):
    def __init__(self, c, h, lora=None):
        super().__init__()
        self.h = h
        self.qkv = TorchLoRALinear(c, 3 * c, *lora) if lora else nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TorchSwiGLU(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.fc = nn.Linear(c, 2 * hidden)
        self.proj = nn.Linear(hidden, c)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class TorchGeluMLP(nn.Module):
    def __init__(self, c, hidden, approximate):
        super().__init__()
        self.fc = nn.Linear(c, hidden)
        self.proj = nn.Linear(hidden, c)
        self.approximate = approximate

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class TorchBlock(nn.Module):
    def __init__(self, c, h, mlp, norm, approximate, lora, mlp_hidden=None):
        super().__init__()
        make_norm = (
            (lambda: nn.LayerNorm(c)) if norm == "layernorm" else (lambda: nn.RMSNorm(c, eps=1e-6))
        )
        self.ln1 = make_norm()
        self.attn = TorchAttention(c, h, lora)
        self.ln2 = make_norm()
        if mlp == "gelu":
            self.mlp = TorchGeluMLP(c, mlp_hidden or 4 * c, approximate)
        elif mlp_hidden is None:  # pipelines.model's default width lives there only
            raise ValueError("a swiglu twin needs mlp_hidden (the model's mlp width)")
        else:
            self.mlp = TorchSwiGLU(c, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchCharTransformer(nn.Module):
    def __init__(
        self,
        vocab,
        d_model,
        n_head,
        n_layer,
        seq_len,
        mlp="gelu",
        norm="layernorm",
        gelu_approximate="tanh",
        lora=None,
        mlp_hidden=None,
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(
            TorchBlock(d_model, n_head, mlp, norm, gelu_approximate, lora, mlp_hidden)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model) if norm == "layernorm" else nn.RMSNorm(d_model, 1e-6)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok_emb(x) + self.pos_emb(torch.arange(t))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok_emb.weight.T  # the tied head


def gpt2_init(module: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2's init, as pipelines.model's char_transformer: biases 0, norms 1, the rest
    N(0, std^2) (torch's default N(0, 1) embeddings through the tied head start at a
    loss near 10). Returns the module."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" not in name:
                nn.init.normal_(p, std=std)
    return module
