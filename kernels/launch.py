"""Launchers: allocate outputs, pick tiles and grids, and call the kernels. Inputs arrive validated and
normalized (pyattn.inputs): q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), any strides; KV-cache calls
(pyattn.kvcache_inputs) in the user's layouts, which the launcher views as these by strides (no copies)."""
import functools

import torch
import triton

from ..features import mask_kind
from . import configs
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


def _strides(t, n=4):
    return tuple(t.stride()) if t is not None else (0,) * n


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


def _pointers(q, *optional):
    """Absent optional tensors pass q's pointer: their constexpr flags keep it unread."""
    return tuple(q if t is None else t for t in optional)


def _set_tma_allocator(device):
    # device-side tensor descriptors need a little global scratch per program
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


class _Problem:
    """Sizes and flags shared by the forward and backward launches. A KV cache (q (B, Hq, L, E), caches viewed
    (rows or pages, Hkv, S_max or page_size, E)) sets max_seqlen_k to the cache's capacity per sequence."""

    def __init__(self, q, k, v, mask, alibi_slopes, cu_seqlens_q, max_seqlen_q, max_seqlen_k, window_left,
                 window_right, softcap, dropout_p, kvcache=False):
        self.B, self.Hq, self.L, self.E = q.shape
        self.Hkv, self.S, self.Ev = k.shape[1], k.shape[2], v.shape[3]
        self.varlen = cu_seqlens_q is not None
        self.batches = cu_seqlens_q.shape[0] - 1 if self.varlen else self.B
        self.max_q = max_seqlen_q if self.varlen else self.L
        self.max_k = max_seqlen_k if self.varlen or kvcache else self.S
        self.flags = dict(HEAD_DIM=configs.padded(self.E), HEAD_DIM_V=configs.padded(self.Ev),
                          MASK_KIND=mask_kind(mask, q.dtype),
                          HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0, HAS_LEFT=window_left >= 0,
                          HAS_RIGHT=window_right >= 0, VARLEN=self.varlen, DROPOUT=dropout_p > 0,
                          DOT_PRECISION=_dot_precision(q.dtype))
        self.seq_bucket = configs.seq_bucket(max(self.max_q, self.max_k))
        self.tuned = configs.autotunes(max(self.max_q, self.max_k))
        self.group = self.Hq // self.Hkv
        self.device_index = q.device.index or 0
        self.cc = 0 if configs.INTERPRET else configs.arch(self.device_index)

    def num_splits(self, block_m, block_n):
        """Split the keys when the row blocks alone cannot fill the GPU (decoding), never below 2 blocks each."""
        programs = triton.cdiv(self.group * self.max_q, block_m) * self.batches * self.Hkv
        want = triton.cdiv(2 * configs.num_sms(self.device_index), programs)
        return max(1, min(want, triton.cdiv(self.max_k, 2 * block_n), 128))


_NO_CACHE = dict(KV_CACHE=False, PAGED=False, HAS_CACHE_IDX=False, HAS_LEFTPAD=False)


def forward(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            window_left, window_right, bottom_right, softcap, dropout_p, rng_state, sinks=None):
    """-> out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32."""
    pb = _Problem(q, k, v, mask, alibi_slopes, cu_seqlens_q, max_seqlen_q, max_seqlen_k, window_left,
                  window_right, softcap, dropout_p)
    out = (torch.zeros if pb.varlen else torch.empty)(pb.B, pb.Hq, pb.L, pb.Ev, dtype=q.dtype, device=q.device)
    lse = torch.full((pb.B, pb.Hq, pb.L), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or pb.batches == 0 or pb.max_q == 0:
        return out, lse
    use_tma = _tma_ok(pb.cc, k, v)
    tail = _pointers(q, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state, sinks, None, None, None)
    flags = dict(_NO_CACHE, HAS_SINKS=sinks is not None)
    _launch_forward(pb, q, k, v, out, lse, tail, mask, alibi_slopes, sinks, (0, 0), scale, window_left,
                    window_right, bottom_right, softcap, dropout_p, use_tma, flags)
    return out, lse


def kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad, alibi_slopes,
                    sinks, scale, window_left, window_right, softcap):
    """q (B, L, Hq, E); caches (B_cache, S_max, Hkv, E) or paged (num_pages, page_size, Hkv, E) with block_table
    (B, max_pages) int32; seqlens_k, cache_batch_idx, cache_leftpad (B,) int32 -> out (B, L, Hq, Ev) contiguous,
    lse (B, Hq, L) float32. Keys are read in place (pages by block_table, in the kernel); queries bottom-right."""
    paged = block_table is not None
    B, L, Hq, _ = q.shape
    out = torch.empty(B, L, Hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    # the kernel's layouts by strides: q (B, Hq, L, E), caches (rows or pages, Hkv, positions, E), out like q
    q_, k_, v_, out_ = (t.transpose(1, 2) for t in (q, k_cache, v_cache, out))
    pb = _Problem(q_, k_, v_, None, alibi_slopes, None, L, capacity, window_left, window_right, softcap, 0.0,
                  kvcache=True)
    pb.tuned = pb.tuned and not paged  # paged tiles are chosen apart (configs.FWD_PAGED_TILES), not autotuned
    tail = _pointers(q, None, alibi_slopes, None, seqlens_k, None, sinks, block_table, cache_batch_idx,
                     cache_leftpad)
    flags = dict(HAS_SINKS=sinks is not None, KV_CACHE=True, PAGED=paged, HAS_CACHE_IDX=cache_batch_idx is not None,
                 HAS_LEFTPAD=cache_leftpad is not None)
    pages = (block_table.stride(0) if paged else 0, k_cache.shape[1])
    # a contiguous cache row is one box for TMA, as a varlen sequence is; pages are read by pointer loads
    use_tma = not paged and _tma_ok(pb.cc, k_, v_)
    _launch_forward(pb, q_, k_, v_, out_, lse, tail, None, alibi_slopes, sinks, pages, scale, window_left,
                    window_right, True, softcap, 0.0, use_tma, flags)
    return out, lse


def _launch_forward(pb, q, k, v, out, lse, tail, mask, alibi_slopes, sinks, pages, scale, window_left,
                    window_right, bottom_right, softcap, dropout_p, use_tma, flags):
    """Runs _attn_fwd (and the split-KV combine) into out (B, Hq, L, Ev) and lse (B, Hq, L), any strides.
    tail: the kernel's optional pointers; pages: (block_table's row stride, page size); flags: its mode flags."""
    if use_tma:
        _set_tma_allocator(q.device)
    sizes = (*q.stride(), *k.stride(), *v.stride())
    extras = (*_strides(mask), *_strides(alibi_slopes, 2), *pages, pb.Hq, pb.Hkv, pb.max_q, pb.max_k, pb.E, pb.Ev,
              scale, softcap, window_left, window_right, int(bottom_right), dropout_p, pb.seq_bucket)
    rows = pb.group * pb.max_q
    block_m, block_n, warps, stages = configs.decode_tiles(rows, max(pb.E, pb.Ev)) if rows <= 64 else \
        configs.fwd_default(max(pb.E, pb.Ev), pb.cc, paged=flags["PAGED"])
    splits = pb.num_splits(block_m, block_n) if rows <= 64 else 1
    if splits == 1:
        dst_out, dst_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        # splits that own no rows (varlen padding) write nothing: leave them empty (0, -inf)
        dst_out = torch.zeros(splits, pb.B, pb.Hq, pb.L, pb.Ev, dtype=torch.float32, device=q.device)
        dst_lse = torch.full((splits, pb.B, pb.Hq, pb.L), float("-inf"), dtype=torch.float32, device=q.device)
    args = (q, k, v, dst_out, dst_lse, *tail, *sizes, *dst_out.stride(), *dst_lse.stride(), *extras)
    if pb.tuned and splits == 1:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), 1, pb.batches * pb.Hkv)  # noqa: E731
        _tuned("fwd", pb.cc)[grid](*args, **pb.flags, **flags, NUM_SPLITS=1, USE_TMA=use_tma)
    else:
        grid = (triton.cdiv(rows, block_m), splits, pb.batches * pb.Hkv)
        _attn_fwd[grid](*args, **pb.flags, **flags, BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=splits,
                        USE_TMA=use_tma, WARP_SPECIALIZE=False, num_warps=warps, num_stages=stages)
    if splits > 1:
        n = pb.B * pb.Hq * pb.L
        part_out, part_lse = dst_out.view(splits, n, pb.Ev), dst_lse.view(splits, n)
        block_r = 16
        _attn_fwd_combine[(triton.cdiv(n, block_r),)](
            part_out, part_lse, out, lse, _pointers(q, sinks)[0], n, splits, pb.Hq, pb.L, pb.Ev, *part_out.stride(),
            *part_lse.stride(), *out.stride(), *lse.stride(), BLOCK_R=block_r, HEAD_DIM_V=pb.flags["HEAD_DIM_V"],
            SPLITS=triton.next_power_of_2(splits), HAS_SINKS=flags["HAS_SINKS"])


def backward(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, scale, window_left, window_right, bottom_right, softcap, dropout_p, rng_state,
             mask_grad):
    """-> dq, dk, dv (like q, k, v, contiguous), dmask (B, Hq, L, S) float32 if mask_grad else empty."""
    pb = _Problem(q, k, v, mask, alibi_slopes, cu_seqlens_q, max_seqlen_q, max_seqlen_k, window_left,
                  window_right, softcap, dropout_p)
    dmask = torch.zeros((pb.B, pb.Hq, pb.L, pb.S) if mask_grad else (0,), dtype=torch.float32, device=q.device)
    if pb.batches == 0 or pb.max_q == 0 or pb.max_k == 0 or q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (q, k, v)) + (dmask,)
    alloc = torch.zeros if pb.varlen else torch.empty  # varlen rows past the last sequence get no gradient
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block = 16 if configs.INTERPRET else 64
    _attn_bwd_preprocess[(triton.cdiv(pb.L, block), pb.B * pb.Hq)](
        out, dout, dlse if dlse is not None else lse, delta, *out.stride(), *dout.stride(), *_strides(dlse, 3),
        pb.Hq, pb.L, pb.Ev, BLOCK_M=block, HEAD_DIM_V=pb.flags["HEAD_DIM_V"], HAS_DLSE=dlse is not None)

    tail = _pointers(q, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng_state)
    inputs = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    extras = (*_strides(mask), *_strides(alibi_slopes, 2), *lse.stride()[:2], pb.Hq, pb.Hkv, pb.max_q,
              pb.max_k, pb.E, pb.Ev, scale, softcap, window_left, window_right, int(bottom_right), dropout_p,
              pb.seq_bucket)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *tail, *inputs, *dk.stride(), *dv.stride(), *extras)
    dq_args = (q, k, v, dout, lse, delta, dq, dmask, *tail, *inputs, *dq.stride(), *extras)
    rows = pb.group * pb.max_q
    if pb.tuned:
        _tuned("dkdv", pb.cc)[lambda meta: (triton.cdiv(pb.max_k, meta["BLOCK_N"]), pb.batches * pb.Hkv)](
            *dkdv_args, **pb.flags)
        _tuned("dq", pb.cc)[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), pb.batches * pb.Hkv)](
            *dq_args, **pb.flags, MASK_GRAD=mask_grad)
    else:
        (bm, bn, warps, stages), (bm2, bn2, warps2, stages2) = configs.bwd_default(max(pb.E, pb.Ev), pb.cc)
        _attn_bwd_dkdv[(triton.cdiv(pb.max_k, bn), pb.batches * pb.Hkv)](
            *dkdv_args, **pb.flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        _attn_bwd_dq[(triton.cdiv(rows, bm2), pb.batches * pb.Hkv)](
            *dq_args, **pb.flags, MASK_GRAD=mask_grad, BLOCK_M=bm2, BLOCK_N=bn2, num_warps=warps2,
            num_stages=stages2)
    return dq, dk, dv, dmask
