"""PyTorch reference runs for scripts/bench_train.py: one training run, timed per step.

    python scripts/_bench_torch_train.py --model mlp --batch 128 --steps 60 --out R.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        scripts/_bench_torch_train.py --model mlp --batch 128 --steps 60 --out R.json

Not a user-facing tool: bench_train.py builds these command lines from the zerotrain
config it compares against (optimizer, lr, betas, weight decay, clipping) and reads the
JSON that rank 0 writes to --out:

    step_s            wall seconds of every step (batch fetch + forward + backward
                      [+ DDP's all-reduce] [+ clipping] + optimizer), first step included
    first_step_unix   time.time() when rank 0 finished its first step (cold start is
                      that minus the launcher's own time.time() before it spawned us)
    n_params          trainable parameters (the tied head counted once), to check the
                      model is the one zerotrain trains
    world, threads, batch (per rank), optimizer, torch

Under torchrun (WORLD_SIZE set) it trains with DistributedDataParallel over gloo; else in
one process. It imports torch only -- nothing from zerotrain -- so torch's cold start is
torch's own. The models mirror pipelines/model: the MLP is Linear/ReLU with PyTorch's
layout, the char transformer is pipelines/model/torch_twin.py's (GELU tanh, layernorm,
tied head, causal scaled_dot_product_attention), loaded by file path. Data is
synthetic: a few fixed random batches used in turn (the values do not change the work).
"""

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

N_BATCHES = 4  # distinct synthetic batches cycled through


def mlp(in_dim, hidden, n_classes):
    sizes = [in_dim, *hidden, n_classes]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _torch_twin():
    """pipelines/model/torch_twin.py (the torch twins of our models), loaded by file
    path: it imports torch only, while importing the `pipelines` package would add
    zerotrain's own import time to torch's measured cold start."""
    path = Path(__file__).resolve().parents[1] / "pipelines" / "model" / "torch_twin.py"
    spec = importlib.util.spec_from_file_location("zerotrain_torch_twin", path)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    return twin


def char_transformer(vocab, d_model, n_head, n_layer, seq_len):
    """The default char_transformer's torch twin, with GPT-2's init as ours."""
    twin = _torch_twin()
    return twin.gpt2_init(twin.TorchCharTransformer(vocab, d_model, n_head, n_layer, seq_len))


def add_char_transformer_args(parser) -> None:
    """--vocab --d-model --n-head --n-layer --seq-len, the default pipeline's sizes."""
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)


def train_step(module, opt, x, y, clip_norm: float):
    """One optimizer step on (x, y) with cross-entropy and optional clipping; the loss."""
    opt.zero_grad(set_to_none=True)
    out = module(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
    opt.step()
    return loss


def build(args, gen):
    """(module, batches): batches are (x, y) with y flattened for cross_entropy."""
    if args.model == "mlp":
        module = mlp(args.in_dim, args.hidden, args.n_classes)
        batches = [
            (
                torch.randn(args.batch, args.in_dim, generator=gen),
                torch.randint(0, args.n_classes, (args.batch,), generator=gen),
            )
            for _ in range(N_BATCHES)
        ]
    else:
        module = char_transformer(args.vocab, args.d_model, args.n_head, args.n_layer, args.seq_len)
        batches = []
        for _ in range(N_BATCHES):
            tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
            batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1)))
    return module, batches


def optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=args.lr,
            momentum=args.momentum,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay,
        )
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
               weight_decay=args.weight_decay)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "char_lm"), required=True)
    p.add_argument("--batch", type=int, required=True, help="samples per rank per step")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--clip-norm", type=float, default=0.0)
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--n-classes", type=int, default=10)
    add_char_transformer_args(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    torch.manual_seed(0)  # same initial weights on every rank (DDP broadcasts anyway)
    gen = torch.Generator().manual_seed(1000 + rank)
    module, batches = build(args, gen)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module)
    opt = optimizer(args, module.parameters())

    step_s, first_step_unix = [], None
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step(module, opt, *batches[step % N_BATCHES], args.clip_norm)
        step_s.append(time.perf_counter() - t0)
        if first_step_unix is None:
            first_step_unix = time.time()
    loss = loss.detach()
    if not torch.isfinite(loss):
        raise SystemExit(f"_bench_torch_train: non-finite loss {loss.item()}")
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        result = {
            "step_s": step_s,
            "first_step_unix": first_step_unix,
            "world": world,
            "threads": args.threads,
            "batch": args.batch,
            "optimizer": args.optimizer,
            "final_loss": loss.item(),
            "n_params": sum(p.numel() for p in module.parameters()),
            "torch": torch.__version__,
        }
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
