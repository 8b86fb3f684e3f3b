"""python -m benchmarks --preset sparse [--device cpu|cuda] [--quick] [--seqlens ...] [--dtype ...] [--pass ...]:
block-sparse attention, where time should fall with density.

Two FlexAttention patterns, as BlockMasks of 128 x 128 blocks: "document", 8 packed documents of random lengths with
causal attention inside each, and "window+global", causal attention over a window of 1024 keys plus the first 128
tokens, which every query sees. The blocks are classified from each block's first and last rows and keys (checked
against torch's create_block_mask in tests/tools/test_sparse_benchmark.py), so that a 128k mask is built without
evaluating it at L x S points. Impls, interleaved at each point:
  pyattn             pyattn.flex_attention(q, k, v, block_mask=...) (backend auto)
  pyattn-dense-mask  pyattn.scaled_dot_product_attention with the same mask as an L x S bool tensor
  pyattn-dense       no mask at all: the full L x L work the sparsity saves
  flex-compiled      torch.compile(torch's flex_attention), forward only on the CPU (it has no CPU backward)
Per point: median ms, GFLOP/s over the pairs the mask allows (fwd 4 * H * D per pair; fwd+bwd 3.5x), the run's
matmul roof, and speedups over the dense call and over flex-compiled.
"""
import os
import time

import torch

import pyattn

from . import measure
from .sweep import DTYPES
from .table import fmt_bytes, markdown_table, status_cell, write_records

BLOCK = 128
B, H, D = 1, 8, 64
DOCUMENTS, WINDOW, GLOBAL_TOKENS = 8, 1024, 128
PATTERNS = ("document", "window+global")
IMPLS = ("pyattn", "pyattn-dense-mask", "pyattn-dense", "flex-compiled")
SEQLENS, QUICK_SEQLENS = [16384, 32768, 65536, 131072], [16384]


def document_bounds(L, seed=0):
    """(DOCUMENTS + 1,) int64 boundaries of documents of random lengths (each at least L / 32) covering [0, L)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(DOCUMENTS, generator=g) + 0.25
    lengths = (weights / weights.sum() * L).long()
    lengths[-1] += L - lengths.sum()
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


class Pattern:
    """A mask as mask_mod(b, h, q_idx, kv_idx) (torch's signature) on device, its block classes (full, partial) over
    BLOCK x BLOCK blocks and its allowed pairs, for L = S."""

    def __init__(self, name, L, device="cpu"):
        self.name, self.L, self.device = name, L, device
        if name == "document":
            bounds = document_bounds(L)
            self.doc = torch.bucketize(torch.arange(L), bounds[1:], right=True)  # (L,) document of each token
            doc = self.doc.to(device)

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (doc[q_idx] == doc[kv_idx])
        elif name == "window+global":
            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & ((q_idx - kv_idx < WINDOW) | (kv_idx < GLOBAL_TOKENS))
        else:
            raise ValueError(f"unknown pattern {name!r}; known: {PATTERNS}")
        self.mask_mod = mask_mod  # a plain function: torch tells mask_mods from score_mods by their arguments

    def block_classes(self):
        """(full, partial) bool (Qb, Kb): blocks every pair of which the mask allows, and blocks with some but not
        all of their pairs allowed (the first and last row and key of a block bound what it holds). A block cut
        short by the sequence's end is never full, as torch's create_block_mask counts its padding as masked."""
        n = (self.L + BLOCK - 1) // BLOCK
        first = torch.arange(n) * BLOCK
        last = torch.clamp(first + BLOCK - 1, max=self.L - 1)
        q0, q1, k0, k1 = first[:, None], last[:, None], first[None, :], last[None, :]
        below = k1 <= q0  # every key at or before every query
        whole = (q1 - q0 == BLOCK - 1) & (k1 - k0 == BLOCK - 1)
        none_causal = k0 > q1
        if self.name == "document":
            doc = self.doc
            one_doc = (doc[q0] == doc[q1]) & (doc[k0] == doc[k1]) & (doc[q0] == doc[k0])
            disjoint = (doc[k1] < doc[q0]) | (doc[k0] > doc[q1])
            full, empty = below & one_doc & whole, none_causal | disjoint
        else:
            in_window = q1 - k0 < WINDOW
            all_global = k1 < GLOBAL_TOKENS
            full = below & (in_window | all_global) & whole
            empty = none_causal | ((q0 - k1 >= WINDOW) & (k0 >= GLOBAL_TOKENS))
        return full, ~full & ~empty

    def allowed_pairs(self):
        i = torch.arange(self.L)
        if self.name == "document":
            lengths = torch.bincount(self.doc)
            return int((lengths * (lengths + 1) // 2).sum())
        window = torch.clamp(i + 1, max=WINDOW)
        extra_global = torch.clamp(i - WINDOW + 1, min=0).clamp(max=GLOBAL_TOKENS)
        return int((window + extra_global).sum())

    def block_mask(self):
        from torch.nn.attention.flex_attention import BlockMask

        full, partial = self.block_classes()

        def lists(blocks):  # (1, 1, Qb) counts and (1, 1, Qb, Kb) indices, listed blocks first
            order = torch.argsort(blocks.int(), dim=-1, descending=True, stable=True)
            return blocks.sum(-1).int()[None, None].to(self.device), order.int()[None, None].to(self.device)

        kv_num, kv_idx = lists(partial)
        full_num, full_idx = lists(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=self.mask_mod,
                                        seq_lengths=(self.L, self.L))

    def dense_mask(self):
        """(L, L) bool, True = attend: the mask as one tensor, made a band of rows at a time so that mask_mod's int64
        temporaries stay small beside it."""
        i = torch.arange(self.L, device=self.device)
        mask = torch.empty(self.L, self.L, dtype=torch.bool, device=self.device)
        for r in range(0, self.L, 1024):
            mask[r:r + 1024] = self.mask_mod(None, None, i[r:r + 1024, None], i[None, :])
        return mask


def _flex_compiled():
    from torch._functorch import config as functorch_config
    from torch.nn.attention.flex_attention import flex_attention

    functorch_config.donated_buffer = False
    return torch.compile(flex_attention, dynamic=False)


def impl_fns(pattern, impls):
    """{impl: fn(q, k, v)} of the impls that can run this pattern here, and {impl: why not} of the others."""
    fns, why = {}, {}
    block_mask = pattern.block_mask()
    for impl in impls:
        if impl == "pyattn":
            fns[impl] = lambda q, k, v: pyattn.flex_attention(q, k, v, block_mask=block_mask)
        elif impl == "pyattn-dense":
            fns[impl] = lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v)
        elif impl == "pyattn-dense-mask":
            need = pattern.L * pattern.L
            if need > 0.25 * measure.available_bytes(pattern.device):
                why[impl] = f"the L x S bool mask of {fmt_bytes(need)} does not fit"
                continue
            mask = pattern.dense_mask()
            fns[impl] = lambda q, k, v: pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif impl == "flex-compiled":
            compiled = _flex_compiled()
            fns[impl] = lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    return fns, why


def _step(fn, q, k, v, pass_):
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v)
        return step
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def step():
        out = fn(qg, kg, vg)
        out.backward(torch.ones_like(out))
    return step


def measure_point(pattern, dtype, pass_, fns, device, max_call_s, last):
    """-> {impl: ms or a skip note}. A first call of each impl (compiles, caches) is outside the timing, and an
    impl whose extrapolated time passes max_call_s is skipped."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, pattern.L, D, dtype=DTYPES[dtype], device=device) for _ in range(3))
    steps, out = {}, {}
    for impl, fn in fns.items():
        if pass_ != "fwd" and impl == "flex-compiled" and device == "cpu":
            out[impl] = "torch's flex_attention has no CPU backward"
            continue
        L0, ms0 = last.get((impl, dtype, pass_), (None, None))
        predicted_s = ms0 / 1e3 * (pattern.L / L0) ** 2 if L0 else 0
        if predicted_s > max_call_s:
            out[impl] = f"time budget: predicted {predicted_s:.0f} s per call"
            continue
        step = _step(fn, q, k, v, pass_)
        try:
            step()
        except Exception as e:  # a peer that cannot run this point: its reason is the record
            out[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        steps[impl] = step
    if steps:
        out.update(measure.time_interleaved(steps, min_time=0.5, max_seconds=4.0) if device == "cpu" else
                   {impl: measure.time_ms(step, device, warm=True) for impl, step in steps.items()})
    return out


def records_of(pattern, dtype, pass_, got, peak, device):
    pairs = pattern.allowed_pairs()
    flops = 4 * B * H * D * pairs * (3.5 if pass_ == "fwd+bwd" else 1)
    full, partial = pattern.block_classes()
    density = float((full | partial).float().mean())
    dense_ms = got.get("pyattn-dense") if isinstance(got.get("pyattn-dense"), float) else None
    flex_ms = got.get("flex-compiled") if isinstance(got.get("flex-compiled"), float) else None
    roof = peak.get(dtype)
    out = []
    for impl, ms in got.items():
        rec = dict(kind="sparse", impl=impl, pattern=pattern.name, device=device, dtype=dtype, B=B, H=H,
                   L=pattern.L, S=pattern.L, D=D, block=BLOCK, pass_=pass_, pair_density=pairs / pattern.L ** 2,
                   block_density=density, ms=None, gflops=None, roof_gflops=roof, roof_fraction=None,
                   x_dense=None, x_flex=None, status="ok", note="")
        if isinstance(ms, float):
            gflops = flops / ms / 1e6
            # the dense call does all L x L pairs: its GFLOP/s count them, so that it reads against the roof
            if impl == "pyattn-dense":
                gflops = flops / (pairs / pattern.L ** 2) / ms / 1e6
            rec.update(ms=ms, gflops=gflops, roof_fraction=gflops / roof if roof else None,
                       x_dense=dense_ms / ms if dense_ms else None, x_flex=flex_ms / ms if flex_ms else None)
        else:
            rec.update(status="skipped", note=ms)
        out.append(rec)
    return out


COLUMNS = ["pattern", "L", "pair density", "dtype", "pass", "impl", "ms", "GFLOP/s (allowed pairs)", "of roof",
           "x dense", "x flex-compiled", "status"]


def table(records):
    def x(v):
        return f"{v:.2f}x" if v is not None else ""

    rows = []
    for r in records:
        ok = r["status"] == "ok"
        rows.append([r["pattern"], str(r["L"]), f"{r['pair_density']:.1%}", r["dtype"], r["pass_"], r["impl"],
                     f"{r['ms']:.1f}" if ok else "", f"{r['gflops']:.0f}" if ok else "",
                     f"{r['roof_fraction']:.0%}" if ok and r["roof_fraction"] else "", x(r["x_dense"]),
                     x(r["x_flex"]), status_cell(r)])
    return markdown_table(COLUMNS, rows)


def run(args, out_dir, meta):
    device, quick = args.device, bool(args.quick)
    impls = tuple(args.impl or IMPLS)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impl {sorted(unknown)} for the sparse preset; available: {list(IMPLS)}")
    dtypes = args.dtype or ["fp32", "bf16"]
    passes = args.passes or (["fwd"] if quick else ["fwd", "fwd+bwd"])
    seqlens = args.seqlens or (QUICK_SEQLENS if quick else SEQLENS)
    max_call_s = args.max_call_seconds or (5.0 if quick else 20.0)
    time_limit = args.time_limit or (120 if quick else 900)
    start, load_before = time.time(), os.getloadavg()
    peak = measure.peaks(device, DTYPES)
    records, last = [], {}
    for L in seqlens:  # both patterns at each length before the next: the time limit cuts the longest
        for name in PATTERNS:
            pattern = Pattern(name, L, device)
            over = time.time() - start > time_limit
            fns, why = impl_fns(pattern, impls) if not over else ({}, {})
            for dtype in dtypes:
                for pass_ in passes:
                    if time.time() - start > time_limit:
                        got = {impl: f"run time limit {time_limit:.0f} s reached" for impl in impls}
                    else:
                        got = {**why, **measure_point(pattern, dtype, pass_, fns, device, max_call_s, last)}
                    for impl, ms in got.items():
                        if isinstance(ms, float):
                            last[(impl, dtype, pass_)] = (L, ms)
                    for rec in records_of(pattern, dtype, pass_, got, peak, device):
                        records.append(rec)
                        print(f"{name:<13} L={L:<6} {dtype} {pass_:<7} {rec['impl']:<17} "
                              + (f"{rec['ms']:10.1f} ms" if rec["ms"] is not None else status_cell(rec)))
    meta = {**meta, "peaks": peak, "quick": quick, "block": BLOCK, "documents": DOCUMENTS, "window": WINDOW,
            "global_tokens": GLOBAL_TOKENS, "seconds": round(time.time() - start), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg()}
    on = (f"{meta['gpu']}, CUDA {meta['cuda']}" if device == "cuda" else
          f"{meta['cpu_model']}, pyattn CPU capability {meta['cpu_capability']}, {meta['threads']} threads")
    roof = ", ".join(f"{k} matmul {peak[k]:.0f} GFLOP/s" for k in dtypes if k in peak)
    markdown = (f"# sparse{' (--quick)' if quick else ''} on {device} ({on}, torch {meta['torch']}); {roof}; load "
                f"average {load_before[0]:.2f} before, {meta['loadavg_after'][0]:.2f} after\n\n"
                f"B={B}, H={H}, D={D}, BlockMasks of {BLOCK} x {BLOCK} blocks. document: {DOCUMENTS} packed documents, "
                f"causal inside each; window+global: causal, {WINDOW} keys back plus the first {GLOBAL_TOKENS} "
                "tokens. Impls interleaved per point; \"x dense\": the unmasked call's time over this one's, \"x "
                "flex-compiled\": torch.compile(flex_attention)'s over this one's.\n\n" + table(records) + "\n")
    write_records(out_dir, "sparse", meta, records, markdown)
    print(f"\nwrote {out_dir}/sparse.json and sparse.md")
