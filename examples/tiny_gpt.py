"""A tiny character-level GPT whose attention is pyattn's, trained for a few steps on the CPU.

    python examples/tiny_gpt.py [--steps 60]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyattn

TEXT = ("attention is all you need. flash attention is attention that never writes the scores to memory. "
        "pyattn runs it on the cpu and on the gpu. ") * 20


class Block(nn.Module):
    def __init__(self, dim, heads, dropout, attention=pyattn.scaled_dot_product_attention):
        super().__init__()
        self.heads, self.dropout, self.attention = heads, dropout, attention
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):  # x (B, T, C)
        q, k, v = self.qkv(self.ln1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        y = self.attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block=32, dim=64, heads=4, layers=2, dropout=0.1,
                 attention=pyattn.scaled_dot_product_attention):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, dropout, attention) for _ in range(layers)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, idx, pos=None):  # idx (B, T) -> logits (B, T, vocab); pos (T,) positions, default 0..T-1
        pos = torch.arange(idx.shape[1]) if pos is None else pos
        return self.head(self.blocks(self.tok(idx) + self.pos(pos)))


def dataset():
    """-> the characters, and TEXT as their indices (len(TEXT),)."""
    chars = sorted(set(TEXT))
    return chars, torch.tensor([chars.index(c) for c in TEXT])


def batch(data, block, size=16):
    """Random windows of data: inputs x (size, block) and next-character targets y (size, block)."""
    starts = torch.randint(len(data) - block - 1, (size,))
    x = torch.stack([data[s:s + block] for s in starts])
    return x, torch.stack([data[s + 1:s + block + 1] for s in starts])


def main(argv=None):
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--steps", type=int, default=60)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    chars, data = dataset()
    model, block = GPT(len(chars)), 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        x, y = batch(data, block)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f}")
    model.eval()
    idx = data[:1][None]
    with torch.no_grad():
        for _ in range(40):
            idx = torch.cat([idx, model(idx[:, -block:])[:, -1:].argmax(-1)], dim=1)
    print("sample:", "".join(chars[i] for i in idx[0]))


if __name__ == "__main__":
    main()
