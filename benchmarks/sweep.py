"""Benchmark points: which shapes a sweep visits, and running one point into a record."""
from dataclasses import dataclass

import torch

from . import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Point:
    impl: str
    dtype: str
    B: int
    H: int
    L: int
    S: int
    D: int
    causal: bool
    pass_: str
    Hkv: int = 0  # 0 = H; fewer for GQA decode points

    @property
    def kv_heads(self):
        return self.Hkv or self.H

    @property
    def decode(self):
        return self.L == 1


# --quick's one long point: causal forward at 32k tokens, 4 heads; naive's 32k x 32k scores per head (48 GiB in
# fp32) hit the memory wall on most machines while the fused kernels run, which is what the suite exists to show
LONG_N, LONG_H = 32768, 4


def default_points(device, impls, quick=False, seqlens=None, dtypes=None, passes=None):
    """L = S doubling from 512; B*H scaled so every point holds the same number of tokens; --quick adds the
    long point (LONG_N) unless the lengths are given."""
    explicit_seqlens = seqlens is not None
    if device == "cpu":
        seqlens = seqlens or [512 * 2**i for i in range(4 if quick else 8)]
        dtypes, dims = dtypes or ["fp32", "bf16"], [64]
        passes, tokens = passes or (["fwd"] if quick else ["fwd", "fwd+bwd"]), 16384
    else:
        seqlens = seqlens or ([1024 * 2**i for i in range(5)] if quick else [512 * 2**i for i in range(10)])
        dtypes, dims = dtypes or (["bf16"] if quick else ["bf16", "fp16"]), [64, 128]
        passes = passes or (["fwd", "bwd"] if quick else ["fwd", "bwd", "fwd+bwd"])
        tokens = 262144
    points = []
    for D in dims:
        for dtype in dtypes:
            for causal in (False, True):
                for pass_ in passes:
                    for L in seqlens:
                        BH = max(1, tokens // L)
                        H = min(BH, 16)
                        for impl in impls:
                            points.append(Point(impl, dtype, BH // H, H, L, L, D, causal, pass_))
    if quick and not explicit_seqlens:
        points += [Point(impl, dtypes[0], 1, LONG_H, LONG_N, LONG_N, dims[0], True, "fwd") for impl in impls]
    return points


def decode_points(device, impls, seqlens=None, dtypes=None):
    """One new token against a long KV cache, GQA 32:8 heads, D=128: bandwidth-bound."""
    seqlens = seqlens or [4096 * 4**i for i in range(5 if device == "cpu" else 6)]  # up to 1M (4M on GPU)
    dtypes = dtypes or ["bf16"]
    return [Point(impl, dtype, 1, 32, 1, S, 128, False, "fwd", Hkv=8)
            for dtype in dtypes for S in seqlens for impl in impls]


def target_points(impls):
    """The core issue's CPU targets: B=1 H=8 N=4096 D=64, and N=65536 causal memory."""
    pts = []
    for dtype, pass_ in (("fp32", "fwd"), ("fp32", "fwd+bwd"), ("bf16", "fwd"), ("fp16", "fwd")):
        for causal in (False, True):
            for impl in impls:
                if impl == "naive" and dtype != "fp32":  # torch's CPU half-precision matmul crawls: minutes
                    continue
                pts.append(Point(impl, dtype, 1, 8, 4096, 4096, 64, causal, pass_))
    pts += [Point(impl, "fp32", 1, 2, 65536, 65536, 64, True, "fwd") for impl in impls]
    return pts


def _check_rows(out, q, k, v, causal, rows=32):
    """Max error of out against float64 math on a few query rows of the first KV head's group (the full
    scores, or a float64 copy of every head, would not fit at long L)."""
    group = q.shape[1] // k.shape[1]
    out, q, k, v = out[:, :group], q[:, :group], k[:, :1], v[:, :1]
    L, S = q.shape[-2], k.shape[-2]
    idx = torch.unique(torch.cat([torch.arange(min(rows, L)), torch.arange(max(0, L - rows), L)])).to(q.device)
    qs = q[..., idx, :].double()
    mask = None
    if causal:
        mask = torch.arange(S, device=q.device)[None, :] <= idx[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qs, k.double(), v.double(), attn_mask=mask)
    return (out[..., idx, :].double() - ref).abs().max().item()


TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 5e-3}


def _record(p: Point, device):
    return dict(impl=p.impl, device=device, dtype=p.dtype, B=p.B, H=p.H, Hkv=p.kv_heads, L=p.L, S=p.S, D=p.D,
                causal=p.causal, **{"pass": p.pass_}, ms=None, tflops=None, peak_mem_bytes=None,
                predicted_mem_bytes=predicted_bytes(p), status="ok", note="")


def skipped_record(p: Point, device, backend, note):
    return {**_record(p, device), "status": "skipped", "note": note, "backend": backend}


def predicted_bytes(p: Point):
    return measure.predicted_bytes(p.impl, p.B, p.H, p.L, p.S, p.D, DTYPES[p.dtype], p.pass_, p.kv_heads)


def memory_wall(p: Point, device, backend):
    """A skipped record with the predicted bytes if the point cannot fit in memory, else None."""
    need = predicted_bytes(p)
    if need <= 0.8 * measure.available_bytes(device):
        return None
    return {**skipped_record(p, device, backend, f"predicted {need / 2**30:.1f} GiB does not fit"),
            "peak_mem_bytes": need}


def run_point(p: Point, fn, device, peak):
    """-> a record dict (DESIGN.md's fields). peak: {dtype name: matmul GFLOP/s, "copy_gbps": GB/s}."""
    rec = _record(p, device)
    torch.manual_seed(0)
    dtype = DTYPES[p.dtype]
    q = torch.randn(p.B, p.H, p.L, p.D, device=device, dtype=dtype)
    k = torch.randn(p.B, p.kv_heads, p.S, p.D, device=device, dtype=dtype)
    v = torch.randn(p.B, p.kv_heads, p.S, p.D, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            err = _check_rows(fn(q, k, v, p.causal), q, k, v, p.causal)
        if not err <= TOLERANCE[p.dtype]:
            rec.update(status="wrong", note=f"max error {err:.3g} > {TOLERANCE[p.dtype]}")
            return rec
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # the check above ran the forward: for a forward point it was the warm-up
        ms = measure.time_ms(measure.make_step(fn, q, k, v, p.causal, p.pass_), device, warm=p.pass_ == "fwd")
    except torch.OutOfMemoryError:
        rec.update(status="oom", peak_mem_bytes=rec["predicted_mem_bytes"])
        return rec
    except (RuntimeError, NotImplementedError) as e:  # recorded and shown, never dropped from the table
        rec.update(status="error", note=str(e).splitlines()[0][:200])
        return rec
    flops = measure.attention_flops(p.B, p.H, p.L, p.S, p.D, p.causal, p.pass_)
    rec.update(ms=ms, tflops=flops / ms / 1e9, note=f"max error {err:.2g}")
    if p.decode:  # bound by reading the KV cache: report bandwidth against the measured copy bandwidth
        kv_bytes = 2 * p.B * p.kv_heads * p.S * p.D * measure.BYTES[dtype]
        rec["gbps"] = kv_bytes / ms / 1e6
        if peak.get("copy_gbps"):
            rec["bandwidth_fraction"] = rec["gbps"] / peak["copy_gbps"]
    elif peak.get(p.dtype):
        rec["peak_fraction"] = rec["tflops"] * 1e3 / peak[p.dtype]
    if device == "cuda":
        rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    return rec


def order_interleaved(points):
    """Same shape, all impls next to each other: machine drift hits every impl alike."""
    return sorted(points, key=lambda p: (p.decode, p.D, p.dtype, p.causal, p.pass_, p.L, p.S, p.impl))


