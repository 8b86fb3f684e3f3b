"""The C++ host's checks (csrc/host_params.cpp; dtypes and rng_state: csrc/cpu/attention.cpp) in Python, for ops whose
kernels are launched from Python (pyattn/triton_ops.py): the same conditions and messages, so a direct caller of any
backend's op gets the same refusal (tests/contract/test_host_checks.py makes the same bad calls on both).

As on the C++ host, values inside tensors (cu_seqlens, seqlens_k, block_table, ...) are read only on the CPU: on a GPU
that would synchronize, and pyattn's input records (pyattn/inputs.py, pyattn/kvcache_inputs.py) have checked them.
"""
from dataclasses import dataclass

import torch

from .errors import AttentionInputError
from .op_args import BwdArgs, FwdArgs, KVCacheArgs, pick

# as c10 prints dtypes, so that messages read the same from either host
_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
                torch.bool: "Bool"}


def _text(part):
    """A message part: a tensor by its shape, a dtype by its c10 name."""
    if isinstance(part, torch.Tensor):
        return str(list(part.shape))
    if isinstance(part, torch.dtype):
        return _DTYPE_NAMES.get(part, str(part))
    return str(part)


@dataclass(frozen=True)
class Host:
    tag: str  # message prefix, e.g. "pyattn triton"
    device: torch.device  # every tensor argument must live here
    dtypes: tuple  # q's dtypes the kernels take

    def check(self, ok, *message):
        """Raises unless ok; message parts are only formatted then (tensors by shape, dtypes by name)."""
        if not ok:
            raise AttentionInputError(f"{self.tag}: " + "".join(_text(m) for m in message))

    def check_device(self, t, name):
        self.check(t.device == self.device, name, " must be on ", self.device, ", got ", t.device)

    def check_dtype(self, q):
        if q.dtype not in self.dtypes:
            names = [str(d).removeprefix("torch.") for d in self.dtypes]
            self.check(False, "q must be ", ", ".join(names[:-1]), " or ", names[-1], ", got ", q.dtype)

    def check_qkv(self, layout, **tensors):
        """q and its keys and values: on this device, 4-D (layout: how, for the message), one dtype the kernels take."""
        q, k, v = tensors.values()
        self.check_dtype(q)
        for name, t in tensors.items():
            self.check_device(t, name)
            self.check(t.dim() == 4, name, " must be 4-D", layout, ", got shape ", t)
        self.check(k.dtype == q.dtype and v.dtype == q.dtype, ", ".join(tensors), " must share a dtype, got ",
                   q.dtype, ", ", k.dtype, ", ", v.dtype)

    def check_like(self, t, name, shape, dtype):
        self.check_device(t, name)
        self.check(tuple(t.shape) == tuple(shape), name, " must have shape ", list(shape), ", got ", t)
        self.check(t.dtype == dtype, name, " must be ", dtype, ", got ", t.dtype)

    def int32_vector(self, t, name, n):
        if t is None:
            return
        self.check_device(t, name)
        self.check(t.dim() == 1 and t.shape[0] == n and t.dtype == torch.int32 and t.is_contiguous(), name,
                   " must be a contiguous int32 tensor of shape (", n, "), got ", t.dtype, " of shape ", t)


def _check_alibi(host, a, batch, heads_q):
    if a is None:
        return
    host.check_device(a, "alibi_slopes")
    host.check(a.dim() == 2 and tuple(a.shape) == (batch, heads_q) and a.dtype == torch.float32,
               "alibi_slopes must be float32 (B, Hq) = (", batch, ", ", heads_q, "), got ", a.dtype, " of shape ", a)


def _check_sinks(host, s, heads_q):
    if s is None:
        return
    host.check_device(s, "sinks")
    host.check(s.dim() == 1 and s.shape[0] == heads_q and s.is_contiguous(), "sinks must be a contiguous (Hq,) = (",
               heads_q, ") tensor, got shape ", s)
    host.check(s.dtype == torch.float32, "sinks must be float32, got ", s.dtype)


def _check_varlen(host, cq, ck, L, S, max_seqlen_q, max_seqlen_k):
    """cu_seqlens (B + 1,) int32 over L and S packed rows; max_seqlen_q/k are what the kernels loop over."""
    for t, name in ((cq, "cu_seqlens_q"), (ck, "cu_seqlens_k")):
        host.check_device(t, name)
        host.check(t.dim() == 1 and t.dtype == torch.int32 and t.is_contiguous() and t.numel() >= 1, name,
                   " must be a contiguous 1-D int32 tensor of size batch + 1, got ", t.dtype, " of shape ", t)
    host.check(cq.numel() == ck.numel(), "cu_seqlens_q ", cq, " and cu_seqlens_k ", ck,
               " must both have size batch + 1")
    if host.device.type == "cpu":
        for t, name, rows in ((cq, "cu_seqlens_q", L), (ck, "cu_seqlens_k", S)):
            cu = t.tolist()
            host.check(cu[0] >= 0 and cu[-1] <= rows, name, " spans rows [", cu[0], ", ", cu[-1], ") outside the ",
                       rows, " packed rows")
            host.check(all(a <= b for a, b in zip(cu, cu[1:])), name, " must be non-decreasing")
    host.check(0 <= max_seqlen_q <= L and 0 <= max_seqlen_k <= S, "max_seqlen_q ", max_seqlen_q, " and max_seqlen_k ",
               max_seqlen_k, " must lie in [0, ", L, "] and [0, ", S, "] (the packed rows)")


def check_fwd(host: Host, a: FwdArgs):
    """fwd's arguments, as fill_params (csrc/host_params.cpp) and the CPU host's check_dtype and set_rng check them."""
    host.check_qkv(" (B, H, seq, dim)", q=a.q, k=a.k, v=a.v)
    q, k, v = a.q, a.k, a.v
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    host.check(k.shape[0] == B and v.shape[0] == B, "batch of q ", q, ", k ", k, " and v ", v, " differ")
    host.check(k.shape[3] == E, "head dim of q ", q, " and k ", k, " differ")
    host.check(v.shape[1] == Hkv and v.shape[2] == S, "k ", k, " and v ", v, " must have the same heads and length")
    host.check(Hq % Hkv == 0 if Hkv > 0 else Hq == 0, "heads of q ", q, " must be a multiple of heads of k ", k)
    host.check(0 <= a.dropout_p < 1, "dropout_p must be in [0, 1), got ", a.dropout_p)
    host.check(a.softcap >= 0, "softcap must be >= 0 (0 = off), got ", a.softcap)
    host.check((a.cu_seqlens_q is None) == (a.cu_seqlens_k is None),
               "cu_seqlens_q and cu_seqlens_k must be given together")
    batch = B
    if a.cu_seqlens_q is not None:
        host.check(B == 1, "varlen q ", q, " must hold packed rows in batch 1")
        host.check(a.mask is None, "attn_mask is not supported with cu_seqlens (varlen)")
        _check_varlen(host, a.cu_seqlens_q, a.cu_seqlens_k, L, S, a.max_seqlen_q, a.max_seqlen_k)
        batch = a.cu_seqlens_q.numel() - 1
    if a.mask is not None:
        m = a.mask
        host.check_device(m, "attn_mask")
        host.check(tuple(m.shape) == (B, Hq, L, S), "attn_mask must be a (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ",
                   S, ") view (stride 0 where broadcast), got shape ", m)
        host.check(m.dtype in (torch.bool, q.dtype, torch.float32), "attn_mask must be bool, ", q.dtype,
                   " or float32, got ", m.dtype)
    _check_alibi(host, a.alibi_slopes, batch, Hq)
    _check_sinks(host, a.sinks, Hq)
    if a.dropout_p > 0:
        host.check(a.rng_state is not None, "dropout_p > 0 needs rng_state (seed, offset)")
        host.check_device(a.rng_state, "rng_state")
        host.check(a.rng_state.dtype == torch.int64 and a.rng_state.numel() == 2,
                   "rng_state must be int64 (seed, offset) of 2 elements, got ", a.rng_state.dtype, " of shape ",
                   a.rng_state)


def check_bwd(host: Host, a: BwdArgs):
    """bwd's arguments: fwd's, then the gradient inputs as prepare_bwd (csrc/host_params.cpp) checks them."""
    check_fwd(host, pick(FwdArgs, a))
    B, Hq, L, _ = a.q.shape
    Ev = a.v.shape[3]
    host.check_like(a.dout, "dout", (B, Hq, L, Ev), a.q.dtype)
    host.check_like(a.out, "out", (B, Hq, L, Ev), a.q.dtype)
    host.check_like(a.lse, "lse", (B, Hq, L), torch.float32)
    if a.dlse is not None:
        host.check_like(a.dlse, "dlse", (B, Hq, L), torch.float32)
    host.check(not (a.mask_grad and a.cu_seqlens_q is not None), "mask_grad is not supported with cu_seqlens (varlen)")


def _check_cache_values(host, a, rows, capacity, page_size):
    """Every sequence's cache range, cache row and pages against the cache's extent (CPU tensors only)."""
    ends = a.seqlens_k.tolist()
    starts = a.cache_leftpad.tolist() if a.cache_leftpad is not None else [0] * len(ends)
    cache_rows = a.cache_batch_idx.tolist() if a.cache_batch_idx is not None else None
    pages = a.block_table.tolist() if a.block_table is not None else None
    for b, (start, end) in enumerate(zip(starts, ends)):
        host.check(0 <= start <= end <= capacity, "sequence ", b, " spans cache positions [", start, ", ", end,
                   ") (cache_leftpad, seqlens_k), outside the cache capacity ", capacity)
        if cache_rows is not None:
            host.check(0 <= cache_rows[b] < rows, "cache_batch_idx[", b, "] = ", cache_rows[b], " is outside the "
                       "cache's ", rows, " rows")
        if pages is None:
            continue
        for i in range(start // page_size, (end + page_size - 1) // page_size):
            host.check(0 <= pages[b][i] < rows, "block_table[", b, ", ", i, "] = ", pages[b][i], " is not a page of "
                       "the cache (", rows, " pages)")


def check_kvcache(host: Host, a: KVCacheArgs):
    """kvcache_fwd's arguments, as fill_kvcache_params (csrc/host_params.cpp) checks them."""
    host.check_qkv("", q=a.q, k_cache=a.k_cache, v_cache=a.v_cache)
    q, kc, vc = a.q, a.k_cache, a.v_cache
    B, _, Hq, E = q.shape
    rows, S, Hkv, _ = kc.shape
    host.check(kc.shape[3] == E, "head dim of q ", q, " and k_cache ", kc, " differ")
    host.check(tuple(vc.shape[:3]) == (rows, S, Hkv), "k_cache ", kc, " and v_cache ", vc, " must agree in all but "
               "the last dim")
    host.check(Hkv > 0 and Hq % Hkv == 0, "heads of q ", q, " must be a multiple of heads of k_cache ", kc)
    host.check(a.softcap >= 0, "softcap must be >= 0 (0 = off), got ", a.softcap)
    host.int32_vector(a.seqlens_k, "seqlens_k", B)
    host.int32_vector(a.cache_leftpad, "cache_leftpad", B)
    capacity = S
    if a.block_table is not None:
        bt = a.block_table
        host.check_device(bt, "block_table")
        host.check(bt.dim() == 2 and bt.shape[0] == B and bt.dtype == torch.int32 and bt.stride(1) == 1,
                   "block_table must be int32 (B, max_pages) = (", B, ", ...) with unit column stride, got ",
                   bt.dtype, " of shape ", bt)
        host.check(a.cache_batch_idx is None, "cache_batch_idx is for contiguous caches, not with block_table")
        capacity = bt.shape[1] * S
    else:
        host.int32_vector(a.cache_batch_idx, "cache_batch_idx", B)
        host.check(a.cache_batch_idx is not None or rows >= B, "k_cache ", kc, " has fewer rows than the "
                   "batch of q ", q, " (pass cache_batch_idx to pick rows)")
    if host.device.type == "cpu":
        _check_cache_values(host, a, rows, capacity, S)
    _check_alibi(host, a.alibi_slopes, B, Hq)
    _check_sinks(host, a.sinks, Hq)
