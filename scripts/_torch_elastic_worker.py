"""The torchrun side of scripts/bench_recovery.py: an elastic char-transformer training run.

    python -m torch.distributed.run --standalone --nproc-per-node 4 --max-restarts 3 \\
        scripts/_torch_elastic_worker.py --steps 40 --batch 8 --step-log STEPS.jsonl \\
        --ckpt CKPT.pt --ckpt-every 10

Not a user-facing tool. It is the usual torch.distributed.elastic recipe: every worker
(re)starts from the newest checkpoint (rank 0 writes one every --ckpt-every steps --
the twin of zerotrain's in-memory snapshot every cluster.snapshot_every steps -- to a
temp name, then renames it, before logging that step), builds DDP over gloo, and trains.
The model is the default pipeline's char transformer (scripts/_bench_torch_train.py's
char_transformer: 2 layers, d_model 128, 4 heads, seq 64) with AdamW and clipping;
the data is a few fixed synthetic batches (the values do not change the work).

What the benchmark reads:

    --step-log   rank 0 appends one JSON line per completed step, flushed at once:
                 {"step": s (1-based), "t": time.time(), "restart": the elastic restart
                 count (TORCHELASTIC_RESTART_COUNT), "resumed_from": the checkpoint step}
    (that).pids  every rank appends {"rank", "pid", "restart"} as it starts (before the
                 process group), so the benchmark can SIGKILL one worker of the
                 current group, and end any worker left behind
"""

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_torch_train import (  # noqa: E402  (imports torch only)
    add_char_transformer_args,
    char_transformer,
    train_step,
)

N_BATCHES = 4


def append_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="samples per rank per step")
    p.add_argument("--step-log", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument(
        "--store-prefix-per-restart",
        action="store_true",
        help="init the process group under a per-restart key prefix (see main)",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.99])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0)
    add_char_transformer_args(p)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # before the process group: a worker stuck in gloo's connect can be found and ended
    append_line(args.step_log + ".pids", {"rank": rank, "pid": os.getpid(), "restart": restart})
    if args.store_prefix_per_restart:
        # every restarted group under a fresh key prefix of the agent's store: without it
        # a new group apparently reads gloo addresses left there by an earlier group
        # (connectFullMesh: Connection refused, see bench_recovery.py)
        world = int(os.environ["WORLD_SIZE"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
            is_master=not agent and rank == 0, timeout=timedelta(seconds=300),
        )  # fmt: skip
        store = dist.PrefixStore(f"bench_restart_{restart}", store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")

    torch.manual_seed(0)
    module = char_transformer(args.vocab, args.d_model, args.n_head, args.n_layer, args.seq_len)
    opt = torch.optim.AdamW(
        module.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay
    )
    start = 0
    if os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, weights_only=True)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    model = DistributedDataParallel(module)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(N_BATCHES):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1)))

    for step in range(start, args.steps):
        loss = train_step(model, opt, *batches[step % N_BATCHES], args.clip_norm)
        s = step + 1
        if rank == 0:
            if args.ckpt_every and s % args.ckpt_every == 0 and s != args.steps:
                tmp = args.ckpt + ".tmp"
                torch.save({"model": module.state_dict(), "opt": opt.state_dict(), "step": s}, tmp)
                os.replace(tmp, args.ckpt)
            append_line(
                args.step_log,
                {"step": s, "t": time.time(), "restart": restart, "resumed_from": start,
                 "loss": loss.item()},
            )  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
