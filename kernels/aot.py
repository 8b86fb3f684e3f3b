"""Ahead-of-time compilation of every kernel variant for sm_80 / sm_90, no GPU needed (pyattn.inspect).

Each variant is compiled exactly as the launcher would run it on that architecture (configs.py tiles, TMA on
sm_90) and read back from its cubin: registers, spills, shared memory and tensor-core opcodes.
"""
import functools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import block_mask, configs
from .bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .fwd import _attn_fwd, _attn_fwd_combine
from .scores import MASK_KINDS

FLOAT_ARGS = {"scale", "softcap", "dropout_p"}
# as a launch with contiguous tensors specializes them: unit inner strides are constants, and pointers, head
# dims and the other strides are multiples of 16 (as Triton's launcher marks them for head dims 64/128/256;
# without that mark the head-dim masks split loads into 2-byte pieces and nothing is pipelined)
UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dd", "stride_dkd", "stride_dvd",
                "stride_dqd", "stride_pd", "stride_mn", "stride_lm", "stride_qr", "stride_stk"}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16"}
HEAD_DIMS_CAUSAL = ((64, False), (64, True), (128, False), (128, True))  # and d256 causal, in bf16
BLOCK_MASK_BLOCKS = (128, 128)  # the block-mask variants' block_q, block_k: FlexAttention's default
# the forward's side inputs (all but Q, K, V, Out, Mask) and its KV-cache flags off
FWD_SIDE_PTRS = {"Lse": "*fp32", "Alibi": "*fp32", "CuSeqQ": "*i32", "CuSeqK": "*i32", "Rng": "*i64",
                 "Sinks": "*fp32", "BlockTable": "*i32", "CacheIdx": "*i32", "Leftpad": "*i32",
                 "States": "*i32", "Bits": "*u8", "Lists": "*i32"}
NO_CACHE = dict(KV_CACHE=False, PAGED=False, HAS_CACHE_IDX=False, HAS_LEFTPAD=False, HAS_SINKS=False)


def _source(fn, pointers, constexprs):
    """Triton source: pointers as given, the float options fp32, every other runtime argument i32."""
    sig, attrs = {}, {}
    constexprs = dict(constexprs, **{n: 1 for n in fn.arg_names if n in UNIT_STRIDES})
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
        if name in pointers or name in ("head_dim", "head_dim_v") or (name.startswith("stride_")
                                                                      and name not in constexprs):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _flags(head_dim, causal, **overrides):
    flags = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, MASK_KIND=MASK_KINDS["MASK_NONE"], HAS_ALIBI=False,
                 HAS_SOFTCAP=False, HAS_LEFT=False, HAS_RIGHT=causal, VARLEN=False, DROPOUT=False, DOT_PRECISION="ieee",
                 BLOCK_MASK=block_mask.BLOCK_MASK_NONE.value, CHUNKED=False, K_CHUNK=0, OUT_CHUNK=0)
    flags.update(overrides)
    return flags


@functools.cache
def variants(cc):
    """(name, kernel, pointer types, constexprs, num_warps, num_stages) for architecture cc (80, 90)."""
    out = []
    for dt, ptr in DTYPES.items():
        qkv = {"Q": ptr, "K": ptr, "V": ptr}
        for d, causal in HEAD_DIMS_CAUSAL + (((256, True),) if dt == "bf16" else ()):
            tag = f"{dt}_d{d}{'_causal' if causal else ''}"
            bm, bn, warps, stages = configs.fwd_default(d, cc)
            fwd_ptrs = {**qkv, "Out": ptr, **FWD_SIDE_PTRS, "Mask": ptr}
            out.append((f"fwd_{tag}", _attn_fwd, fwd_ptrs,
                        dict(_flags(d, causal), **NO_CACHE, BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=1, USE_TMA=cc >= 90,
                             WARP_SPECIALIZE=False), warps, stages))
            dkdv_tiles, dq_tiles = configs.bwd_default(d, cc)
            bwd_ptrs = {**qkv, "DOut": ptr, "Lse": "*fp32", "Delta": "*fp32", "DK": ptr, "DV": ptr, "DQ": ptr,
                        "DMask": "*fp32", "Mask": ptr, "Alibi": "*fp32", "CuSeqQ": "*i32", "CuSeqK": "*i32",
                        "Rng": "*i64", "States": "*i32", "Bits": "*u8", "Lists": "*i32"}
            bm, bn, warps, stages = dkdv_tiles
            out.append((f"bwd_dkdv_{tag}", _attn_bwd_dkdv, bwd_ptrs,
                        dict(_flags(d, causal), BLOCK_M=bm, BLOCK_N=bn, OUT_DV=False), warps, stages))
            bm, bn, warps, stages = dq_tiles
            out.append((f"bwd_dq_{tag}", _attn_bwd_dq, bwd_ptrs,
                        dict(_flags(d, causal), BLOCK_M=bm, BLOCK_N=bn, MASK_GRAD=False), warps, stages))
            if dt == "bf16" and (not causal or d == 256):  # block-sparse (TILES: tiles fitted to 128 x 128 blocks)
                masked = _flags(d, causal, BLOCK_MASK=block_mask.BLOCK_MASK_TILES.value)
                for name, fn, ptrs, tiles, extra in (
                        ("fwd", _attn_fwd, fwd_ptrs, configs.fwd_default(d, cc, block_mask=True),
                         dict(NO_CACHE, NUM_SPLITS=1, USE_TMA=cc >= 90, WARP_SPECIALIZE=False)),
                        ("bwd_dkdv", _attn_bwd_dkdv, bwd_ptrs, dkdv_tiles, dict(OUT_DV=False)),
                        ("bwd_dq", _attn_bwd_dq, bwd_ptrs, dq_tiles, dict(MASK_GRAD=False))):
                    bm, bn, warps, stages = tiles
                    _, bm, bn = block_mask.fitted_tiles(bm, bn, *BLOCK_MASK_BLOCKS)
                    out.append((f"{name}_blockmask_{tag}", fn, ptrs, dict(masked, **extra, BLOCK_M=bm, BLOCK_N=bn),
                                warps, stages))
        # head dims in chunks (configs.CHUNKED_FROM): MLA's 576 / 512, causal, as the launcher runs them (no TMA)
        chunked = _flags(576, True, HEAD_DIM_V=512, CHUNKED=True, K_CHUNK=configs.K_CHUNK, OUT_CHUNK=configs.OUT_CHUNK)
        for name, fn, ptrs, table, extra in (
                ("fwd", _attn_fwd, fwd_ptrs, configs.CHUNKED_FWD_TILES,
                 dict(NO_CACHE, NUM_SPLITS=1, USE_TMA=False, WARP_SPECIALIZE=False)),
                ("bwd_dkdv_dv", _attn_bwd_dkdv, bwd_ptrs, configs.CHUNKED_DKDV_TILES, dict(OUT_DV=True)),
                ("bwd_dkdv_dk", _attn_bwd_dkdv, bwd_ptrs, configs.CHUNKED_DKDV_TILES, dict(OUT_DV=False)),
                ("bwd_dq", _attn_bwd_dq, bwd_ptrs, configs.CHUNKED_DQ_TILES, dict(MASK_GRAD=False))):
            bm, bn, warps, stages = configs.chunked_tiles(table, cc)
            out.append((f"{name}_chunked_{dt}_d576_dv512_causal", fn, ptrs, dict(chunked, **extra, BLOCK_M=bm,
                                                                                  BLOCK_N=bn), warps, stages))
        bm, bn, warps, stages = configs.decode_tiles(4, 128)
        split_ptrs = {**qkv, "Out": "*fp32", **FWD_SIDE_PTRS, "Mask": ptr}
        out.append((f"fwd_decode_split_{dt}_d128", _attn_fwd, split_ptrs,
                    dict(_flags(128, True), **NO_CACHE, BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=16, USE_TMA=cc >= 90,
                         WARP_SPECIALIZE=False), warps, stages))
        # KV cache (kvcache_fwd): split-KV decoding over a contiguous cache and over pages, and a chunked prefill
        # over pages (as launch.kvcache_forward runs them: TMA on sm_90 for a contiguous cache, pointer loads for
        # pages; sinks, alibi per sequence)
        for paged in (False, True):
            kind = "paged" if paged else "contiguous"
            cache = dict(KV_CACHE=True, PAGED=paged, HAS_CACHE_IDX=not paged, HAS_LEFTPAD=True, HAS_SINKS=True)
            out.append((f"fwd_kvcache_{kind}_decode_split_{dt}_d128", _attn_fwd, split_ptrs,
                        dict(_flags(128, True, HAS_ALIBI=True), **cache, BLOCK_M=bm, BLOCK_N=bn, NUM_SPLITS=16,
                             USE_TMA=cc >= 90 and not paged, WARP_SPECIALIZE=False), warps, stages))
        pbm, pbn, pwarps, pstages = configs.fwd_default(128, cc, paged=True)
        out.append((f"fwd_kvcache_paged_prefill_{dt}_d128_causal", _attn_fwd, {**qkv, "Out": ptr, **FWD_SIDE_PTRS,
                                                                                  "Mask": ptr},
                    dict(_flags(128, True), KV_CACHE=True, PAGED=True, HAS_CACHE_IDX=False, HAS_LEFTPAD=False,
                         HAS_SINKS=False, BLOCK_M=pbm, BLOCK_N=pbn, NUM_SPLITS=1, USE_TMA=False,
                         WARP_SPECIALIZE=False), pwarps, pstages))
        for sinks in (False, True):
            out.append((f"fwd_decode_combine_{dt}_d128{'_sinks' if sinks else ''}", _attn_fwd_combine,
                        {"OutPart": "*fp32", "LsePart": "*fp32", "Out": ptr, "Lse": "*fp32", "Sinks": "*fp32"},
                        dict(BLOCK_R=16, HEAD_DIM_V=128, SPLITS=16, HAS_SINKS=sinks), 4, 1))
        out.append((f"bwd_preprocess_{dt}_d128", _attn_bwd_preprocess,
                    {"Out": ptr, "DOut": ptr, "DLse": "*fp32", "Delta": "*fp32"},
                    dict(BLOCK_M=64, HEAD_DIM_V=128, HAS_DLSE=False), 4, 1))
    return out


@functools.cache
def compile_variant(name, cc):
    """-> (cubin bytes, kernel function name, dynamic shared memory bytes)."""
    (_, fn, pointers, constexprs, warps, stages), = [v for v in variants(cc) if v[0] == name]
    compiled = triton.compile(_source(fn, pointers, constexprs), target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"], compiled.metadata.name, compiled.metadata.shared


def aot_reports(cc):
    """pyattn.inspect's per-kernel records for architecture cc."""
    from pyattn import sass
    reports = []
    for name, *_ in variants(cc):
        cubin, function, shared = compile_variant(name, cc)
        reports.append({"name": name, "backend": "triton", "arch": f"sm_{cc}", **sass.report(cubin, function, shared)})
    return reports
