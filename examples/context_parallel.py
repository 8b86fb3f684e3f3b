"""The tiny GPT of examples/tiny_gpt.py trained with every sequence split across processes: context
parallelism by pyattn.distributed over torch.distributed (gloo on the CPU).

    torchrun --nproc_per_node=2 examples/context_parallel.py [--steps 60] [--attention ring|ulysses]

Every rank holds the same model and batch and computes only its zigzag shard of each sequence (its tokens,
their positions, their attention to the whole sequence); the loss and the gradients are summed across
ranks, so training follows the one-process loss curve, which rank 0 also computes and prints beside it.
"""
import argparse
import copy
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pyattn
from pyattn.distributed import positions, ring_attention, shard, ulysses_attention
from tiny_gpt import GPT, batch, dataset

ATTENTION = {"ring": ring_attention, "ulysses": ulysses_attention}


def train_step(model, opt, x, y, pos=None):
    """One AdamW step on the mean token loss. With pos, x and y are this rank's shards of the tokens and pos
    their positions: each rank adds its share of the mean, and the ranks sum their gradients and losses."""
    share = dist.get_world_size() if pos is not None else 1
    loss = F.cross_entropy(model(x, pos).flatten(0, 1), y.flatten()) / share
    opt.zero_grad()
    loss.backward()
    loss = loss.detach()
    if pos is not None:
        for t in [p.grad for p in model.parameters()] + [loss]:
            dist.all_reduce(t)
    opt.step()
    return loss.item()


def main(argv=None):
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--steps", type=int, default=60)
    args.add_argument("--attention", choices=sorted(ATTENTION), default="ring")
    args = args.parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and batches on every rank
    chars, data = dataset()
    block = 32
    model = GPT(len(chars), block, dropout=0.0, attention=functools.partial(ATTENTION[args.attention], layout="zigzag"))
    single = GPT(len(chars), block, dropout=0.0, attention=pyattn.scaled_dot_product_attention)
    single.load_state_dict(copy.deepcopy(model.state_dict()))
    opt, opt_single = (torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, single))
    pos = positions(block, layout="zigzag")
    for step in range(args.steps):
        x, y = batch(data, block)
        loss = train_step(model, opt, shard(x, layout="zigzag", seq_dim=1), shard(y, layout="zigzag", seq_dim=1), pos)
        if rank == 0:
            loss_single = train_step(single, opt_single, x, y)
            if step % 20 == 0 or step == args.steps - 1:
                print(f"step {step} loss {loss:.4f} (one process: {loss_single:.4f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
