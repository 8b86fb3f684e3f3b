"""Launchers: allocate outputs, pick tiles and grids, and call the kernels with their arguments by name. Inputs arrive
as the ops' argument tuples (pyattn/op_args.py), checked by the compiled ops' host checks (pyattn/triton_ops.py), with
the kind of their mask those return: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), any strides; KV-cache calls
in the user's layouts, which the launcher views as these by strides (no copies)."""
import functools

import torch
import triton

from ..op_args import FwdArgs, new_out
from . import block_mask, configs
from .bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .fwd import _attn_fwd, _attn_fwd_combine

DOT_PRECISION = {True: "tf32", False: "ieee"}

# KV_CACHE: the forward's only (the autotuner skips a key its kernel lacks)
TUNE_KEY = ["seq_bucket", "HEAD_DIM", "HEAD_DIM_V", "HAS_RIGHT", "HAS_LEFT", "KV_CACHE"]
TUNED = {"fwd": (_attn_fwd, configs.fwd_autotune_configs, configs.prune_fwd),
         "dkdv": (_attn_bwd_dkdv, configs.bwd_autotune_configs,
                  functools.partial(configs.prune_bwd, kernel=configs.DKDV_TILES)),
         "dq": (_attn_bwd_dq, configs.bwd_autotune_configs,
                functools.partial(configs.prune_bwd, kernel=configs.DQ_TILES))}


@functools.cache
def _tuned(name, cc):
    """An autotuner per kernel and architecture, so a choice made on one GPU kind is never reused on another.
    No kernel accumulates across launches, so autotuning may rerun any of them freely. The timings are kept in
    Triton's cache (cache_results): tuning a backward key compiles ~40 candidates, about a minute on an H200, paid
    once per machine instead of once per process (the interpreter's stand-in timings are never kept)."""
    kernel, candidates, prune = TUNED[name]
    return triton.autotune(candidates(), key=TUNE_KEY, cache_results=not configs.INTERPRET,
                           prune_configs_by={"early_config_prune": functools.partial(prune, cc=cc)})(kernel)


def _strides(prefix, t, dims):
    """t's strides as the kernels' arguments stride_<prefix><dim> for each of dims; zeros when t is absent."""
    return {f"stride_{prefix}{d}": s for d, s in zip(dims, t.stride() if t is not None else (0,) * len(dims))}


def _run(kernel, grid, args, **meta):
    """kernel[grid] with every runtime argument given by name in args, passed in the kernel's order (as an autotuner
    keys and prunes them); meta: constexprs and launch options."""
    names = kernel.arg_names[:len(args)]
    if set(names) != set(args):
        raise TypeError(f"launch arguments {sorted(set(args) ^ set(names))} do not match the kernel's {names}")
    kernel[grid](*(args[name] for name in names), **meta)


def _dot_precision(dtype):
    return DOT_PRECISION[torch.backends.cuda.matmul.allow_tf32] if dtype == torch.float32 else "ieee"


def _tma_ok(cc, *tensors):
    """TMA needs sm_90+ and unit inner strides and 16-byte aligned bases and strides (fp16/bf16)."""
    if not (configs.TMA_IN_INTERPRETER if configs.INTERPRET else cc >= 90) or not configs.has_tensor_descriptors():
        return False
    for t in tensors:
        size = t.element_size()
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1 or t.data_ptr() % 16 \
                or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _pointers(q, **optional):
    """Absent optional tensors pass q's pointer: their constexpr flags keep it unread."""
    return {name: q if t is None else t for name, t in optional.items()}


def _optional(a, *names):
    """The kernels' optional pointer arguments among names, from the op's arguments a (FwdArgs or BwdArgs)."""
    fields = dict(Mask=a.mask, Alibi=a.alibi_slopes, CuSeqQ=a.cu_seqlens_q, CuSeqK=a.cu_seqlens_k, Rng=a.rng_state,
                  Sinks=a.sinks)
    return _pointers(a.q, **{name: fields[name] for name in names})


def _set_tma_allocator(device):
    # device-side tensor descriptors need a little global scratch per program
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


class _Problem:
    """Sizes and flags shared by the forward and backward launches, from an op's arguments a (FwdArgs or BwdArgs) and
    the kind of its mask (csrc/params.h MaskKind, as the host checks found it). A KV cache (q (B, Hq, L, E), caches
    viewed (rows or pages, Hkv, S_max or page_size, E)) sets max_seqlen_k to the cache's capacity per sequence."""

    def __init__(self, a, mask_kind, kvcache=False):
        self.B, self.Hq, self.L, self.E = a.q.shape
        self.Hkv, self.S, self.Ev = a.k.shape[1], a.k.shape[2], a.v.shape[3]
        self.varlen = a.cu_seqlens_q is not None
        self.batches = a.cu_seqlens_q.shape[0] - 1 if self.varlen else self.B
        self.max_q = a.max_seqlen_q if self.varlen else self.L
        self.max_k = a.max_seqlen_k if self.varlen or kvcache else self.S
        self.chunked = configs.chunked(self.E, self.Ev)
        k_chunk, self.out_chunk = configs.chunks() if self.chunked else (0, 0)
        # chunked: the dims rounded up to whole contraction chunks, not to a power of two
        dims = [triton.cdiv(d, k_chunk) * k_chunk if self.chunked else configs.padded(d) for d in (self.E, self.Ev)]
        self.flags = dict(HEAD_DIM=dims[0], HEAD_DIM_V=dims[1], CHUNKED=self.chunked, K_CHUNK=k_chunk,
                          OUT_CHUNK=self.out_chunk,
                          MASK_KIND=mask_kind, HAS_ALIBI=a.alibi_slopes is not None,
                          HAS_SOFTCAP=a.softcap > 0, HAS_LEFT=a.window_left >= 0, HAS_RIGHT=a.window_right >= 0,
                          VARLEN=self.varlen, DROPOUT=a.dropout_p > 0, DOT_PRECISION=_dot_precision(a.q.dtype))
        self.seq_bucket = configs.seq_bucket(max(self.max_q, self.max_k))
        self.tuned = configs.autotunes(max(self.max_q, self.max_k)) and not self.chunked  # fixed chunked tiles
        self.group = self.Hq // max(self.Hkv, 1)  # no heads at all: an empty call
        self.device_index = a.q.device.index or 0
        self.cc = 0 if configs.INTERPRET else configs.arch(self.device_index)

    def num_splits(self, block_m, block_n):
        """Split the keys when the row blocks alone cannot fill the GPU (decoding), never below 2 blocks each."""
        programs = triton.cdiv(self.group * self.max_q, block_m) * self.batches * self.Hkv
        want = triton.cdiv(2 * configs.num_sms(self.device_index), programs)
        return max(1, min(want, triton.cdiv(self.max_k, 2 * block_n), 128))

    def scores_args(self, a):
        """The runtime arguments of every attention kernel after its tensors' own strides: mask and ALiBi strides,
        sizes and the score options."""
        return dict(**_strides("m", a.mask, "bhmn"), **_strides("a", a.alibi_slopes, "bh"), H_Q=self.Hq,
                    H_KV=self.Hkv, seqlen_q=self.max_q, seqlen_k=self.max_k, head_dim=self.E, head_dim_v=self.Ev,
                    scale=a.scale, softcap=a.softcap, window_left=a.window_left, window_right=a.window_right,
                    bottom_right=int(a.bottom_right), dropout_p=a.dropout_p, seq_bucket=self.seq_bucket)


_NO_CACHE = dict(KV_CACHE=False, PAGED=False, HAS_CACHE_IDX=False, HAS_LEFTPAD=False)


def forward(a: FwdArgs, mask_kind):
    """-> out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32."""
    pb = _Problem(a, mask_kind)
    out = new_out(a.q, pb.Ev, zeros=pb.varlen)
    lse = torch.full((pb.B, pb.Hq, pb.L), float("-inf"), dtype=torch.float32, device=a.q.device)
    if out.numel() == 0 or pb.batches == 0 or pb.max_q == 0:
        return out, lse
    use_tma = _tma_ok(pb.cc, a.k, a.v) and not pb.chunked  # chunks are read by pointer loads
    pointers = dict(**_optional(a, "Mask", "Alibi", "CuSeqQ", "CuSeqK", "Rng", "Sinks"),
                    **_pointers(a.q, BlockTable=None, CacheIdx=None, Leftpad=None))
    flags = dict(_NO_CACHE, HAS_SINKS=a.sinks is not None)
    _launch_forward(pb, a, out, lse, pointers, dict(stride_bt=0, page_size=0), use_tma, flags, _block_mask(a))
    return out, lse


def _block_mask(a):
    """(block_states, block_bits, block_q, block_k) of an op's arguments a (FwdArgs or BwdArgs), or None."""
    return None if a.block_states is None else (a.block_states, a.block_bits, a.block_q, a.block_k)


def _block_mask_tiles(mask, block_m, block_n):
    """-> (BLOCK_MASK mode, BLOCK_M, BLOCK_N) for a config's tiles and a block mask (None: none)."""
    if mask is None:
        return block_mask.BLOCK_MASK_NONE.value, block_m, block_n
    return block_mask.fitted_tiles(block_m, block_n, mask[2], mask[3])


def _packed_rows(pb, mode, block_m):
    """Rows of one kv head's program grid: TILES pads each query head's rows to a multiple of BLOCK_M."""
    pitch = triton.cdiv(pb.max_q, block_m) * block_m if mode == block_mask.BLOCK_MASK_TILES.value else pb.max_q
    return pb.group * pitch


def kvcache_forward(a, mask_kind):
    """a: KVCacheArgs. q (B, L, Hq, E); caches (B_cache, S_max, Hkv, E) or paged (num_pages, page_size, Hkv, E) with
    block_table (B, max_pages) int32; seqlens_k, cache_batch_idx, cache_leftpad (B,) int32 -> out (B, L, Hq, Ev)
    contiguous, lse (B, Hq, L) float32. Keys are read in place (pages by block_table, in the kernel); queries
    bottom-right."""
    paged = a.block_table is not None
    B, L, Hq, _ = a.q.shape
    out = torch.empty(B, L, Hq, a.v_cache.shape[-1], dtype=a.q.dtype, device=a.q.device)
    lse = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=a.q.device)
    if out.numel() == 0:
        return out, lse
    capacity = a.block_table.shape[1] * a.k_cache.shape[1] if paged else a.k_cache.shape[1]
    # the kernel's layouts by strides: q (B, Hq, L, E), caches (rows or pages, Hkv, positions, E), out like q
    q_, k_, v_, out_ = (t.transpose(1, 2) for t in (a.q, a.k_cache, a.v_cache, out))
    view = FwdArgs(q=q_, k=k_, v=v_, mask=None, alibi_slopes=a.alibi_slopes, cu_seqlens_q=None, cu_seqlens_k=None,
                   max_seqlen_q=L, max_seqlen_k=capacity, scale=a.scale, window_left=a.window_left,
                   window_right=a.window_right, bottom_right=True, softcap=a.softcap, dropout_p=0.0, rng_state=None,
                   sinks=a.sinks)
    pb = _Problem(view, mask_kind, kvcache=True)
    pb.tuned = pb.tuned and not paged  # paged tiles are chosen apart (configs.FWD_PAGED_TILES), not autotuned
    # CuSeqK carries seqlens_k in KV-cache mode
    pointers = dict(**_optional(view, "Mask", "Alibi", "CuSeqQ", "Rng", "Sinks"),
                    **_pointers(a.q, CuSeqK=a.seqlens_k, BlockTable=a.block_table, CacheIdx=a.cache_batch_idx,
                                Leftpad=a.cache_leftpad))
    flags = dict(HAS_SINKS=a.sinks is not None, KV_CACHE=True, PAGED=paged, HAS_CACHE_IDX=a.cache_batch_idx is not None,
                 HAS_LEFTPAD=a.cache_leftpad is not None)
    pages = dict(stride_bt=a.block_table.stride(0) if paged else 0, page_size=a.k_cache.shape[1])
    # a contiguous cache row is one box for TMA, as a varlen sequence is; pages are read by pointer loads
    use_tma = not paged and not pb.chunked and _tma_ok(pb.cc, k_, v_)
    _launch_forward(pb, view, out_, lse, pointers, pages, use_tma, flags)
    return out, lse


def _launch_forward(pb, a, out, lse, pointers, pages, use_tma, flags, mask=None):
    """Runs _attn_fwd (and the split-KV combine) for a (FwdArgs of (B, Hq, L, E) views) into out (B, Hq, L, Ev) and
    lse (B, Hq, L), any strides. pointers: the kernel's optional pointers by name; pages: block_table's row stride
    and the page size (stride_bt, page_size); flags: its mode flags; mask: _block_mask's."""
    if use_tma:
        _set_tma_allocator(a.q.device)
    rows = pb.group * pb.max_q
    if pb.chunked:  # one tile for every chunked forward, decoding included (its accumulator rows are few anyway)
        block_m, block_n, warps, stages = configs.chunked_tiles(configs.CHUNKED_FWD_TILES, pb.cc)
    else:
        block_m, block_n, warps, stages = configs.decode_tiles(rows, max(pb.E, pb.Ev)) if rows <= 64 else \
            configs.fwd_default(max(pb.E, pb.Ev), pb.cc, paged=flags["PAGED"], block_mask=mask is not None)
    mode, block_m, block_n = _block_mask_tiles(mask, block_m, block_n)
    splits = pb.num_splits(block_m, block_n) if rows <= 64 else 1
    rows = _packed_rows(pb, mode, block_m)
    if splits == 1:
        dst_out, dst_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        # splits that own no rows (varlen padding) write nothing: leave them empty (0, -inf)
        dst_out = torch.zeros(splits, pb.B, pb.Hq, pb.L, pb.Ev, dtype=torch.float32, device=a.q.device)
        dst_lse = torch.full((splits, pb.B, pb.Hq, pb.L), float("-inf"), dtype=torch.float32, device=a.q.device)
    args = dict(Q=a.q, K=a.k, V=a.v, Out=dst_out, Lse=dst_lse, **pointers, **_strides("q", a.q, "bhmd"),
                **_strides("k", a.k, "bhnd"), **_strides("v", a.v, "bhnd"), **_strides("o", dst_out, "sbhmd"),
                **_strides("l", dst_lse, "sbhm"), **pages, **pb.scores_args(a),
                **block_mask.kernel_args(a.q, *(mask or ())))
    flags = dict(flags, BLOCK_MASK=mode)
    # a block mask runs the fixed tiles fitted to its blocks: autotune candidates need not divide them
    if pb.tuned and splits == 1 and mask is None:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), 1, pb.batches * pb.Hkv)  # noqa: E731
        _run(_tuned("fwd", pb.cc), grid, args, **pb.flags, **flags, NUM_SPLITS=1, USE_TMA=use_tma)
    else:
        out_chunks = triton.cdiv(pb.Ev, pb.out_chunk) if pb.chunked else 1
        grid = (triton.cdiv(rows, block_m), splits * out_chunks, pb.batches * pb.Hkv)
        _run(_attn_fwd, grid, args, **pb.flags, **flags, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=splits,
             USE_TMA=use_tma, WARP_SPECIALIZE=False, num_warps=warps, num_stages=stages)
    if splits > 1:
        n = pb.B * pb.Hq * pb.L
        part_out, part_lse = dst_out.view(splits, n, pb.Ev), dst_lse.view(splits, n)
        block_r = 16
        combine = dict(OutPart=part_out, LsePart=part_lse, Out=out, Lse=lse, **_pointers(a.q, Sinks=a.sinks),
                       num_rows=n, num_splits=splits, H_Q=pb.Hq, seqlen_q=pb.L, head_dim_v=pb.Ev,
                       **_strides("p", part_out, "srd"), **_strides("q", part_lse, "sr"), **_strides("o", out, "bhmd"),
                       **_strides("l", lse, "bhm"))
        _run(_attn_fwd_combine, (triton.cdiv(n, block_r),), combine, BLOCK_R=block_r,
             HEAD_DIM_V=configs.padded(pb.Ev), SPLITS=triton.next_power_of_2(splits), HAS_SINKS=flags["HAS_SINKS"])


def _out_chunks(pb, dim):
    """Programs along grid dim 2: the output chunks of a head dim of size dim (1 unchunked)."""
    return triton.cdiv(dim, pb.out_chunk) if pb.chunked else 1


def backward(a, mask_kind):
    """a: BwdArgs -> dq, dk, dv (like q, k, v, contiguous), dmask (B, Hq, L, S) float32 if mask_grad else empty."""
    pb = _Problem(a, mask_kind)
    q, k, v = a.q, a.k, a.v
    dmask = torch.zeros((pb.B, pb.Hq, pb.L, pb.S) if a.mask_grad else (0,), dtype=torch.float32, device=q.device)
    if pb.batches == 0 or pb.max_q == 0 or pb.max_k == 0 or q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (q, k, v)) + (dmask,)
    alloc = torch.zeros if pb.varlen else torch.empty  # varlen rows past the last sequence get no gradient
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    lse = a.lse.contiguous()
    delta = torch.empty_like(lse)
    block = 16 if configs.INTERPRET or pb.chunked else 64  # chunked: (16, Ev <= 1024) rows of O and dO
    _run(_attn_bwd_preprocess, (triton.cdiv(pb.L, block), pb.B * pb.Hq),
         dict(Out=a.out, DOut=a.dout, DLse=a.dlse if a.dlse is not None else lse, Delta=delta,
              **_strides("o", a.out, "bhmd"), **_strides("d", a.dout, "bhmd"), **_strides("l", a.dlse, "bhm"),
              H_Q=pb.Hq, seqlen_q=pb.L, head_dim_v=pb.Ev),
         BLOCK_M=block, HEAD_DIM_V=configs.padded(pb.Ev), HAS_DLSE=a.dlse is not None)

    inputs = dict(Q=q, K=k, V=v, DOut=a.dout, Lse=lse, Delta=delta, **_optional(a, "Mask", "Alibi", "CuSeqQ", "CuSeqK",
                                                                                 "Rng"),
                  **_strides("q", q, "bhmd"), **_strides("k", k, "bhnd"), **_strides("v", v, "bhnd"),
                  **_strides("d", a.dout, "bhmd"), stride_lb=lse.stride(0), stride_lh=lse.stride(1),
                  **pb.scores_args(a))
    dkdv_args = dict(inputs, DK=dk, DV=dv, **_strides("dk", dk, "bhnd"), **_strides("dv", dv, "bhnd"))
    dq_args = dict(inputs, DQ=dq, DMask=dmask, **_strides("dq", dq, "bhmd"))
    mask = _block_mask(a)
    if pb.tuned and mask is None:  # a block mask runs the fixed tiles fitted to its blocks, as in the forward
        rows = pb.group * pb.max_q
        _run(_tuned("dkdv", pb.cc), lambda meta: (triton.cdiv(pb.max_k, meta["BLOCK_N"]), pb.batches * pb.Hkv),
             dict(dkdv_args, **block_mask.kernel_args(q)), **pb.flags, BLOCK_MASK=block_mask.BLOCK_MASK_NONE.value,
             OUT_DV=False)
        _run(_tuned("dq", pb.cc), lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), pb.batches * pb.Hkv),
             dict(dq_args, **block_mask.kernel_args(q)), **pb.flags, MASK_GRAD=a.mask_grad,
             BLOCK_MASK=block_mask.BLOCK_MASK_NONE.value)
    else:
        if pb.chunked:
            (bm, bn, warps, stages), (bm2, bn2, warps2, stages2) = (
                configs.chunked_tiles(configs.CHUNKED_DKDV_TILES, pb.cc), configs.chunked_tiles(configs.CHUNKED_DQ_TILES, pb.cc))
        else:
            (bm, bn, warps, stages), (bm2, bn2, warps2, stages2) = configs.bwd_default(max(pb.E, pb.Ev), pb.cc)
        mode, bm, bn = _block_mask_tiles(mask, bm, bn)
        # chunked: one launch per output (dK, dV), its chunks along grid dim 2; else one launch writes both
        for out_dv, dim in ((True, pb.Ev), (False, pb.E)) if pb.chunked else ((False, 1),):
            _run(_attn_bwd_dkdv, (triton.cdiv(pb.max_k, bn), pb.batches * pb.Hkv, _out_chunks(pb, dim)),
                 dict(dkdv_args, **block_mask.kernel_args(q, *(mask or ()), columns=True)), **pb.flags, BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_MASK=mode, OUT_DV=out_dv, num_warps=warps, num_stages=stages)
        mode, bm2, bn2 = _block_mask_tiles(mask, bm2, bn2)
        _run(_attn_bwd_dq, (triton.cdiv(_packed_rows(pb, mode, bm2), bm2), pb.batches * pb.Hkv, _out_chunks(pb, pb.E)),
             dict(dq_args, **block_mask.kernel_args(q, *(mask or ()))), **pb.flags, MASK_GRAD=a.mask_grad,
             BLOCK_M=bm2, BLOCK_N=bn2, BLOCK_MASK=mode, num_warps=warps2, num_stages=stages2)
    return dq, dk, dv, dmask
