"""python -m benchmarks --preset serving [--device cpu|cuda]: pyattn.kvcache_attention as a server calls it.

Decode (L_new = 1) and chunked prefill (L_new = 512) over KV caches of 4k to 1M tokens (doubling), bf16,
32:8 heads, D = 128, batch 1 and batch 16 (lengths spread over [S/2, S], shuffled), contiguous caches and
paged ones (pages of 16 tokens, in shuffled order). Every call appends its k_new/v_new in place, as a
server's does. Peers: torch SDPA after gathering the pages into a dense padded (B, Hkv, S, D) tensor with a
bottom-right causal mask (the append, the gather and the mask are timed: that is what a torch user does) and
naive attention (pyattn's reference backend). Per point: ms, GB/s of K and V actually attended
(sum of lengths * Hkv * D * 2 bytes * 2), its fraction of the machine's copy bandwidth, and for paged caches the
speed against the contiguous cache. On the CPU the impls and layouts of a (B, S, workload) and a 1 GiB copy are
timed in interleaved rounds, so ratios and fractions hold on a shared host.
Outputs are checked against float32 math on sampled rows of the first and last sequence before timing.
On a GPU the peers are the same and pyattn runs its Triton and CUDA C++ backends.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pyattn

from . import measure
from .sweep import TOLERANCE
from .table import fmt_bytes, markdown_table, status_cell, write_records

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
WORKLOADS = {"decode": 1, "prefill": 512}
BATCHES = (1, 16)
LAYOUTS = ("contiguous", "paged")
IMPLS = {"cpu": ("pyattn-cpu", "torch-sdpa", "naive"),
         "cuda": ("pyattn-triton", "pyattn-cuda", "torch-sdpa", "naive")}
SEQLENS = [4096 * 2**i for i in range(9)]  # 4k .. 1M
QUICK_SEQLENS = [4096, 16384]
TOKEN_BYTES = HKV * D * 2 * 2  # K and V of one token, bf16


@dataclass
class Cache:
    """One cache layout filled for a batch: what every impl of a point reads."""
    layout: str
    lengths: torch.Tensor  # (B,) int64 on the CPU: tokens each sequence attends (cache + new)
    k_cache: torch.Tensor  # (B, S, Hkv, D) or (num_pages, PAGE, Hkv, D)
    v_cache: torch.Tensor
    block_table: torch.Tensor = None  # (B, max_pages) int32, paged only

    def head0(self, cache, b, n):
        """(n, D) float32: the first n keys (or values) of sequence b, kv head 0."""
        pos = torch.arange(n, device=cache.device)
        if self.block_table is None:
            return cache[b, :n, 0].float()
        return cache[self.block_table[b].long()[pos // PAGE], pos % PAGE, 0].float()


def _fill_(t, pool):
    """Tiles a random pool of tokens over t (n, Hkv, D): random data at copy speed (randn of GiBs is slow)."""
    flat = t.view(-1, HKV, D)
    for start in range(0, flat.shape[0], pool.shape[0]):
        n = min(pool.shape[0], flat.shape[0] - start)
        flat[start:start + n].copy_(pool[:n])


def lengths_for(B, S):
    """(B,) int64: S for one sequence; spread over [S/2, S] (shuffled) for a batch."""
    if B == 1:
        return torch.tensor([S])
    lengths = torch.linspace(S // 2, S, B).round().long()
    return lengths[torch.randperm(B, generator=torch.Generator().manual_seed(B))]


def cache_bytes(layout, lengths):
    if layout == "contiguous":
        return len(lengths) * int(lengths.max()) * TOKEN_BYTES
    return sum(math.ceil(n / PAGE) for n in lengths.tolist()) * PAGE * TOKEN_BYTES


def build_cache(layout, lengths, device):
    torch.manual_seed(0)
    pool = torch.randn(4099, HKV, D, dtype=DTYPE).to(device)  # a prime number of tokens: no period aligned with pages
    B, S = len(lengths), int(lengths.max())
    if layout == "contiguous":
        k, v = (torch.empty(B, S, HKV, D, dtype=DTYPE, device=device) for _ in range(2))
        block_table = None
    else:
        pages = [math.ceil(n / PAGE) for n in lengths.tolist()]
        order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(1)).int()  # shuffled pages
        block_table = torch.zeros(B, max(pages), dtype=torch.int32)
        for b, start in enumerate(torch.tensor([0] + pages).cumsum(0)[:-1].tolist()):
            block_table[b, :pages[b]] = order[start:start + pages[b]]
        k, v = (torch.empty(sum(pages), PAGE, HKV, D, dtype=DTYPE, device=device) for _ in range(2))
        block_table = block_table.to(device)
    _fill_(k, pool)
    _fill_(v, pool.roll(1, 0))
    return Cache(layout, lengths, k, v, block_table)


def inputs(cache, L):
    """q (B, L, Hq, D), k_new/v_new (B, L, Hkv, D), cache_seqlens (B,) int32 = lengths - L, on the cache's device."""
    torch.manual_seed(2)
    B, device = len(cache.lengths), cache.k_cache.device
    q = torch.randn(B, L, HQ, D, dtype=DTYPE, device=device)
    k_new, v_new = (torch.randn(B, L, HKV, D, dtype=DTYPE, device=device) for _ in range(2))
    return q, k_new, v_new, (cache.lengths - L).int().to(device)


def _pyattn(backend):
    def run(c, q, k_new, v_new, cache_seqlens):
        return pyattn.kvcache_attention(q, c.k_cache, c.v_cache, k_new=k_new, v_new=v_new,
                                        cache_seqlens=cache_seqlens, block_table=c.block_table, backend=backend)
    return run


def torch_sdpa(c, q, k_new, v_new, cache_seqlens):
    """What a torch user runs: write the new tokens, gather pages into dense padded K/V, mask, SDPA."""
    B, L = q.shape[:2]
    S = int(c.lengths.max())
    device = q.device
    pos = cache_seqlens.long()[:, None] + torch.arange(L, device=device)  # (B, L)
    if c.block_table is None:
        index = (torch.arange(B, device=device)[:, None].expand(B, L), pos)
    else:
        index = (c.block_table.gather(1, pos // PAGE).long(), pos % PAGE)
    c.k_cache.index_put_(index, k_new)
    c.v_cache.index_put_(index, v_new)
    if c.block_table is None:
        k, v = c.k_cache[:, :S], c.v_cache[:, :S]  # (B, S, Hkv, D) views
    else:
        pages = c.block_table[:, :math.ceil(S / PAGE)].long()
        k, v = (cache[pages].flatten(1, 2)[:, :S] for cache in (c.k_cache, c.v_cache))  # gathered (B, S, Hkv, D)
    # key j visible to query i of sequence b iff j <= lengths[b] - L + i (bottom-right causal; padding hidden)
    mask = torch.arange(S, device=device) <= (cache_seqlens.long()[:, None, None]
                                              + torch.arange(L, device=device)[:, None])  # (B, L, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


BACKENDS = {"pyattn-cpu": "cpu", "pyattn-triton": "triton", "pyattn-cuda": "cuda", "torch-sdpa": "default",
            "naive": "reference"}
FNS = {impl: torch_sdpa if impl == "torch-sdpa" else _pyattn(backend) for impl, backend in BACKENDS.items()}


def max_error(out, c, q, rows=8):
    """Max error of out against float32 math for the first and last sequence, q heads of kv head 0, the first
    and last rows of the chunk."""
    B, L = q.shape[:2]
    group = HQ // HKV
    idx = torch.unique(torch.cat([torch.arange(min(rows, L)), torch.arange(max(0, L - rows), L)])).to(q.device)
    err = 0.0
    for b in sorted({0, B - 1}):
        n = int(c.lengths[b])
        k, v = c.head0(c.k_cache, b, n), c.head0(c.v_cache, b, n)
        s = torch.einsum("rhd,nd->hrn", q[b, idx, :group].float(), k) * D**-0.5  # (group, rows, n)
        s.masked_fill_(torch.arange(n, device=q.device) > (n - L + idx)[:, None], float("-inf"))
        ref = torch.softmax(s, -1) @ v  # (group, rows, D)
        err = max(err, (out[b, idx, :group].float().transpose(0, 1) - ref).abs().max().item())
    return err


def extra_bytes(impl, B, L, S):
    """Memory an impl needs beyond the cache: torch's dense K/V and mask; naive's scores and repeated K/V (one
    sequence at a time)."""
    if impl == "torch-sdpa":
        return 2 * B * S * TOKEN_BYTES + B * L * S
    if impl == "naive":
        return measure.predicted_bytes("naive", 1, HQ, L, S, D, DTYPE, "fwd", HKV) + S * TOKEN_BYTES
    return 0


def attended_flops(lengths, L):
    """4 * Hq * D per (query, key) pair attended: query i of a sequence of n sees n - L + i + 1 keys."""
    pairs = sum(L * n - L * (L - 1) // 2 for n in lengths.tolist())
    return 4 * HQ * D * pairs


def _record(workload, B, S, layout, impl, lengths, device):
    return dict(impl=impl, backend=BACKENDS[impl], device=device, dtype="bf16", workload=workload, B=B, H=HQ,
                Hkv=HKV, D=D, L=WORKLOADS[workload], S=S, layout=layout, page_size=PAGE if layout == "paged" else None,
                lengths=[int(lengths.min()), int(lengths.max())], tokens=int(lengths.sum()), causal=True,
                **{"pass": "fwd"}, ms=None, gbps=None, bandwidth_fraction=None, tflops=None, status="ok", note="")


def check_point(rec, fn, args):
    """Runs the call once (it is also the warm-up) and checks it: (failed record, None) or (None, max error)."""
    try:
        with torch.no_grad():
            err = max_error(fn(*args), args[0], args[1])
    except (RuntimeError, NotImplementedError) as e:
        return {**rec, "status": "error", "note": str(e).splitlines()[0][:200]}, None
    if not err <= TOLERANCE["bf16"]:
        return {**rec, "status": "wrong", "note": f"max error {err:.3g} > {TOLERANCE['bf16']}"}, None
    return None, err


def time_points(checked, copy):
    """Times the checked points of one (B, S) and workload ([(record, fn, max error, args)], over one or both
    layouts; copy: copy_buffers()'s (src, dst, GB/s). On the CPU they run in interleaved rounds together with
    dst.copy_(src), and each point's fraction of copy bandwidth is taken against that copy, measured in the same
    seconds; paged and contiguous points timed together give a ratio that the host's drift does not move. On CUDA
    each is timed alone (CUDA events) against the run's copy GB/s."""
    device = checked[0][0]["device"]
    name = lambda rec: f"{rec['impl']}/{rec['layout']}"  # noqa: E731
    with torch.no_grad():
        steps = {name(r): (lambda fn=fn, args=args: fn(*args)) for r, fn, _, args in checked}
        if device == "cuda":
            ms = {n: measure.time_ms(step, device, warm=True) for n, step in steps.items()}
        else:
            ms = measure.time_interleaved({**steps, "copy": lambda: copy[1].copy_(copy[0])})
    copy_gbps = measure.copy_rate_gbps(copy[0], ms["copy"]) if "copy" in ms else copy[2]
    out = []
    for rec, _, err, args in checked:
        t = ms[name(rec)]
        gbps = rec["tokens"] * TOKEN_BYTES / t / 1e6
        out.append({**rec, "ms": t, "gbps": gbps, "copy_gbps": copy_gbps, "bandwidth_fraction": gbps / copy_gbps,
                    "tflops": attended_flops(args[0].lengths, rec["L"]) / t / 1e9, "note": f"max error {err:.2g}"})
        contiguous = ms.get(f"{rec['impl']}/contiguous")  # same impl, same rounds
        if rec["layout"] == "paged" and contiguous is not None:
            out[-1]["x_contiguous"] = contiguous / t
    return out


def measure_points(seqlens, impls, max_call_s, time_limit, copy, device="cpu", log=print):
    """Batch 1 first (all sizes), then batch 16; one cache per (B, S, layout), shared by its points. A point
    is skipped, with the reason, past the time limit, when it would not fit, or when its time per call,
    extrapolated linearly in the tokens attended from the last point its series (impl, workload, layout) ran,
    exceeds max_call_s (batch 16's first size extrapolates from batch 1's last). The impls of a (cache,
    workload) are timed together (time_points), and both layouts' when their caches fit in memory together;
    copy: copy_buffers()'s (src, dst, GB/s)."""
    records, last, start = [], {}, time.time()

    def predicted_s(rec):
        series = (rec["impl"], rec["workload"], rec["layout"])
        return last[series][0] / 1e3 * rec["tokens"] / last[series][1] if series in last else 0

    def fits(nbytes):
        return nbytes <= 0.7 * measure.available_bytes(device)

    def skip_note(rec, lengths):
        """Why a point of a cache that fits is not run, or None."""
        extra = extra_bytes(rec["impl"], rec["B"], rec["L"], rec["S"])
        if rec["L"] > int(lengths.min()):
            return f"chunk of {rec['L']} is longer than the shortest sequence ({int(lengths.min())})"
        if time.time() - start > time_limit:
            return f"run time limit {time_limit:.0f} s reached"
        if not fits(extra):
            return f"needs {fmt_bytes(extra)} beyond the cache: does not fit"
        if predicted_s(rec) > max_call_s:
            return f"time budget: predicted {predicted_s(rec):.1f} s per call"
        return None

    def check_layout(B, S, lengths, layout, checked):
        """Checks the points of one cache into checked ({workload: [(record, fn, max error, args)]}: their args
        hold the cache) or records why they are skipped."""
        recs = [_record(w, B, S, layout, impl, lengths, device) for w in WORKLOADS for impl in impls]
        need = cache_bytes(layout, lengths)
        if not fits(need):
            records.extend({**r, "status": "skipped", "note": f"cache of {fmt_bytes(need)} does not fit"} for r in recs)
            return
        if time.time() - start > time_limit:
            records.extend({**r, "status": "skipped", "note": f"run time limit {time_limit:.0f} s reached"}
                           for r in recs)
            return
        c = None
        for rec in recs:
            note = skip_note(rec, lengths)
            if note:
                records.append({**rec, "status": "skipped", "note": note})
                continue
            c = c or build_cache(layout, lengths, device)
            args = (c, *inputs(c, rec["L"]))
            failed, err = check_point(rec, FNS[rec["impl"]], args)
            if failed:
                log(_line(failed))
                records.append(failed)
            else:
                checked.setdefault(rec["workload"], []).append((rec, FNS[rec["impl"]], err, args))

    def time_checked(checked):
        for points in checked.values():
            for rec in time_points(points, copy):
                last[(rec["impl"], rec["workload"], rec["layout"])] = (rec["ms"], rec["tokens"])
                log(_line(rec))
                records.append(rec)
        checked.clear()  # drops the caches

    for B in BATCHES:
        for S in seqlens:
            lengths = lengths_for(B, S)
            # both caches, and the largest scratch of a point that will run on top: the layouts are timed together
            # if that fits
            runs = [_record(w, B, S, lay, impl, lengths, device)
                    for w in WORKLOADS for impl in impls for lay in LAYOUTS]
            scratch = max((extra_bytes(r["impl"], B, r["L"], S) for r in runs if skip_note(r, lengths) is None),
                          default=0)
            together = fits(sum(cache_bytes(lay, lengths) for lay in LAYOUTS) + scratch)
            checked = {}
            for layout in LAYOUTS:
                check_layout(B, S, lengths, layout, checked)
                if not together:
                    time_checked(checked)
            time_checked(checked)
    return records


def _line(r):
    got = (f"{r['ms']:9.2f} ms {r['gbps']:7.1f} GB/s ({r['bandwidth_fraction']:.0%} of copy)" if r["ms"] is not None
           else status_cell(r))
    return f"{r['workload']:<8} B={r['B']:<2} S={r['S']:<8} {r['layout']:<10} {r['impl']:<11} {got}"


COLUMNS = ["workload", "B", "S (lengths)", "layout", "impl", "ms", "GB/s of cache", "of copy bandwidth", "GFLOP/s",
           "x torch-sdpa", "x contiguous", "status"]


def serving_table(records):
    """A row a point; "x torch-sdpa" against torch's time at the same (workload, B, S, layout)."""
    rows = []
    torch_ms = {(r["workload"], r["B"], r["S"], r["layout"]): r["ms"] for r in records
                if r["impl"] == "torch-sdpa" and r["ms"] is not None}
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(records, key=lambda r: (order[r["workload"]], r["B"], r["S"], r["layout"], r["impl"])):
        base = torch_ms.get((r["workload"], r["B"], r["S"], r["layout"]))
        lengths = f"{r['S']}" if r["B"] == 1 else f"{r['S']} ({r['lengths'][0]}..{r['lengths'][1]})"
        cells = ["", "", "", "", "", ""]
        if r["ms"] is not None:
            cells = [f"{r['ms']:.2f}", f"{r['gbps']:.1f}", f"{r['bandwidth_fraction']:.0%}", f"{r['tflops'] * 1e3:.0f}",
                     f"{base / r['ms']:.2f}" if base else "",
                     f"{r['x_contiguous']:.2f}" if "x_contiguous" in r else ""]
        rows.append([r["workload"], str(r["B"]), lengths, r["layout"], r["impl"], *cells, status_cell(r)])
    return markdown_table(COLUMNS, rows)


def copy_buffers(device, nbytes=1 << 30, reps=5):
    """(src, dst, GB/s): the copy whose bandwidth (bytes read + bytes written, the best of reps) is the decode
    roofline. On the CPU the buffers stay for time_points to copy again beside every point; on CUDA only the
    bandwidth is kept (several times the L2, median of CUDA-event timings)."""
    if device == "cuda":
        return None, None, measure.copy_gbps(device, 4 * nbytes)
    src, dst = measure.copy_tensors(device, nbytes)
    return src, dst, measure.copy_gbps(device, tensors=(src, dst), best_of=reps)


def run(args, out_dir, meta):
    seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else SEQLENS)
    device = args.device
    impls = args.impl or IMPLS[device]
    unknown = set(impls) - set(IMPLS[device])
    if unknown:
        raise SystemExit(f"unknown --impl {sorted(unknown)} for the serving preset on {device}; "
                         f"available: {list(IMPLS[device])}")
    max_call_s = args.max_call_seconds or (0.5 if args.quick else 3.0)
    time_limit = args.time_limit or (75 if args.quick else 480)
    copy = copy_buffers(device)
    copy_gbps = copy[2]
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (tensor copy, read + write)")
    records = measure_points(seqlens, impls, max_call_s, time_limit, copy, device)
    del copy
    meta = {**meta, "copy_gbps": copy_gbps, "max_call_seconds": max_call_s, "time_limit_seconds": time_limit,
            "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "page_size": PAGE, "dtype": "bf16"}}
    meta["quick"] = bool(args.quick)
    stem = "serving"
    table = serving_table(records)
    quick = " (--quick)" if args.quick else ""
    on = (f"{meta['gpu']}, CUDA {meta['cuda']}" if device == "cuda" else
          f"{meta['cpu_model']}, pyattn CPU capability {meta['cpu_capability']}, {meta['threads']} threads")
    markdown = (f"# serving{quick} on {device} ({on}, torch {meta['torch']}): kvcache_attention, bf16, {HQ}:{HKV} "
                f"heads, D={D}, pages of {PAGE} (shuffled); copy bandwidth {copy_gbps:.1f} GB/s\n\n"
                "GB/s: bytes of K and V attended (sum of lengths x Hkv x D x 2 bytes x 2) per second. "
                "torch-sdpa's time includes the append, the page gather into dense padded K/V and the mask.\n\n")
    if device == "cpu":
        markdown += ("The impls and both layouts of a (B, S, workload) and a 1 GiB copy are timed in interleaved "
                     "rounds (median of each; the layouts one after the other where their caches do not fit together); "
                     "\"of copy bandwidth\" is against that copy, and \"x contiguous\" (paged speed over contiguous, "
                     "same impl) against the contiguous point, measured in the same rounds.\n\n")
    write_records(out_dir, stem, meta, records, markdown + table + "\n")
    print(f"\nwrote {out_dir}/{stem}.json and {stem}.md")
