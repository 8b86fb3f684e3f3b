"""Continuous batching over a paged KV cache: requests join and leave, their pages come from a free pool and
go back to it when they finish.

    python examples/serve_paged.py [--requests 8] [--pages 24] [--page-size 4] [--chunk 8]

The "model" is one random attention layer: token + position embeddings -> q, k, v projections -> attention
over the cache -> logits, greedy next token. Each step, every joining request prefills one chunk of its
prompt (pyattn.kvcache_attention appends its keys and values into its pages), and all running requests
decode one token together in one batched call. Then each request is generated again alone, with a contiguous
cache and its whole prompt in one call, and the tokens must be the same.
"""
import argparse
from dataclasses import dataclass, field

import torch

import pyattn

VOCAB, DIM, HQ, HKV, D, MAX_LEN = 96, 64, 4, 2, 16, 256


class Model:
    """One attention layer with random weights; float32 so batched and one-at-a-time runs agree."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        w = lambda *shape: torch.randn(*shape, generator=g) / shape[0] ** 0.5
        self.tok, self.pos = w(VOCAB, DIM) * VOCAB**0.5, w(MAX_LEN, DIM) * MAX_LEN**0.5
        self.wq, self.wk, self.wv, self.wo = w(DIM, HQ * D), w(DIM, HKV * D), w(DIM, HKV * D), w(HQ * D, VOCAB)

    def qkv(self, tokens, start):
        """tokens (B, L) at positions start (B,) ... -> q (B, L, Hq, D), k, v (B, L, Hkv, D)."""
        B, L = tokens.shape
        x = self.tok[tokens] + self.pos[start[:, None] + torch.arange(L)]
        return (x @ self.wq).view(B, L, HQ, D), (x @ self.wk).view(B, L, HKV, D), (x @ self.wv).view(B, L, HKV, D)

    def step(self, tokens, start, k_cache, v_cache, **cache):
        """Appends tokens (B, L) to the cache at start (B,) and returns the next token after each row (B,)."""
        q, k, v = self.qkv(tokens, start)
        out = pyattn.kvcache_attention(q, k_cache, v_cache, k_new=k, v_new=v,
                                       cache_seqlens=start.to(torch.int32), **cache)  # (B, L, Hq, D)
        return (out[:, -1].flatten(1) @ self.wo).argmax(-1)


@dataclass
class Request:
    id: int
    prompt: list
    max_new: int
    arrival: int
    pages: list = field(default_factory=list)
    length: int = 0  # tokens in the cache
    budget: int = 0  # pages promised at admission
    out: list = field(default_factory=list)


class PagePool:
    """(num_pages, page_size, Hkv, D) K and V caches and the free list of their pages."""

    def __init__(self, num_pages, page_size):
        self.k, self.v = (torch.zeros(num_pages, page_size, HKV, D) for _ in range(2))
        self.page_size, self.free, self.used = page_size, list(range(num_pages)), set()
        self.promised = 0  # pages admitted requests may still take
        self.reused = 0

    def pages_for(self, tokens):
        return -(-tokens // self.page_size)

    def admit(self, req):
        """Takes req if the free pages can hold its whole life (prompt + new tokens): pages are then taken as
        it grows and never run out mid-request."""
        need = self.pages_for(len(req.prompt) + req.max_new)
        if need > len(self.free) - self.promised:
            return False
        self.promised += need
        req.budget = need
        return True

    def grow(self, req, tokens):
        """Gives req the pages it needs for `tokens` more tokens, from the free list."""
        for _ in range(self.pages_for(req.length + tokens) - len(req.pages)):
            page = self.free.pop(0)
            self.reused += page in self.used
            self.used.add(page)
            req.pages.append(page)
            self.promised -= 1

    def release(self, req):
        self.promised -= req.budget - len(req.pages)
        self.free += req.pages
        req.pages = []

    def block_table(self, reqs):
        """(B, max_pages) int32; rows padded with page 0, which no sequence reads past its length."""
        width = max(len(r.pages) for r in reqs)
        return torch.tensor([r.pages + [0] * (width - len(r.pages)) for r in reqs], dtype=torch.int32)


def serve(model, requests, pool, chunk):
    """The continuous-batching loop -> {request id: generated tokens}, number of steps, largest decode batch."""
    waiting = sorted(requests, key=lambda r: r.arrival)
    prefilling, running, done, step, widest = [], [], {}, 0, 0
    while waiting or prefilling or running:
        while waiting and waiting[0].arrival <= step and pool.admit(waiting[0]):  # first come, first served
            prefilling.append(waiting.pop(0))
        # chunked prefill: one chunk of each joining request's prompt (one call each: chunks differ in length)
        for req in list(prefilling):
            part = req.prompt[req.length:req.length + chunk]
            pool.grow(req, len(part))
            nxt = model.step(torch.tensor([part]), torch.tensor([req.length]), pool.k, pool.v,
                             block_table=pool.block_table([req]))
            req.length += len(part)
            if req.length == len(req.prompt):  # prompt done: its last logits give the first new token
                req.out.append(int(nxt))
                prefilling.remove(req)
                running.append(req)
        # decode: every running request, one token each, in one batched call
        batch = [r for r in running if len(r.out) < r.max_new]
        for r in batch:
            pool.grow(r, 1)
        if batch:
            widest = max(widest, len(batch))
            nxt = model.step(torch.tensor([[r.out[-1]] for r in batch]), torch.tensor([r.length for r in batch]),
                             pool.k, pool.v, block_table=pool.block_table(batch))
            for r, t in zip(batch, nxt.tolist()):
                r.length += 1
                r.out.append(t)
        for r in [r for r in running if len(r.out) == r.max_new]:  # finished: pages back to the pool
            pool.release(r)
            running.remove(r)
            done[r.id] = r.out
            print(f"step {step:3d}: request {r.id} done ({len(r.prompt)} prompt + {r.max_new} tokens), "
                  f"{len(pool.free)} pages free")
        step += 1
    return done, step, widest


def generate_alone(model, req):
    """The same request with nothing else running: a contiguous (1, MAX_LEN, Hkv, D) cache, the whole prompt
    in one call."""
    k_cache, v_cache = (torch.zeros(1, MAX_LEN, HKV, D) for _ in range(2))
    out = [int(model.step(torch.tensor([req.prompt]), torch.tensor([0]), k_cache, v_cache))]
    length = len(req.prompt)
    while len(out) < req.max_new:
        out.append(int(model.step(torch.tensor([[out[-1]]]), torch.tensor([length]), k_cache, v_cache)))
        length += 1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--pages", type=int, default=24, help="pages in the pool (fewer than all requests need)")
    ap.add_argument("--page-size", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=8, help="prompt tokens per prefill call")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Model()
    requests = [Request(i, torch.randint(VOCAB, (int(torch.randint(3, 24, ())),)).tolist(),
                        max_new=int(torch.randint(4, 16, ())), arrival=int(torch.randint(0, 2 * args.requests, ())))
                for i in range(args.requests)]
    pool = PagePool(args.pages, args.page_size)
    need = max(-(-(len(r.prompt) + r.max_new) // args.page_size) for r in requests)
    assert need <= args.pages, f"--pages {args.pages} cannot hold the longest request ({need} pages)"
    served, steps, widest = serve(model, requests, pool, args.chunk)
    alone = {r.id: generate_alone(model, r) for r in requests}
    match = all(served[i] == alone[i] for i in alone)
    print(f"{len(requests)} requests in {steps} steps over {args.pages} pages of {args.page_size} tokens "
          f"(decode batches of up to {widest}; {pool.reused} page allocations reused a freed page)")
    print(f"same tokens as one request at a time: {match}")
    return 0 if match else 1


if __name__ == "__main__":
    raise SystemExit(main())
