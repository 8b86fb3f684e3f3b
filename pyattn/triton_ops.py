"""The Triton kernels (pyattn.kernels) as torch.library ops pyattn::triton_fwd / triton_bwd / triton_kvcache_fwd,
with the schemas, fake impls and autograd of the compiled ops (csrc/ops.cpp, pyattn/ops.py). Opaque custom ops:
torch.compile and torch.export keep them whole rather than tracing into the launchers. Importing this needs
triton."""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from .kernels import launch
from .ops import kvcache_fake, register_attention_op


@torch.library.custom_op("pyattn::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
               cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
               scale: float, window_left: int, window_right: int, bottom_right: bool, softcap: float,
               dropout_p: float, rng_state: Optional[Tensor], sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L) float32."""
    with _on_device(q):
        return launch.forward(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              scale, window_left, window_right, bottom_right, softcap, dropout_p, rng_state, sinks)


@torch.library.custom_op("pyattn::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
               mask: Optional[Tensor], alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
               cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
               window_left: int, window_right: int, bottom_right: bool, softcap: float, dropout_p: float,
               rng_state: Optional[Tensor], mask_grad: bool,
               sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv like q, k, v; dmask (B, Hq, L, S) float32 when mask_grad, else empty."""
    with _on_device(q):
        return launch.backward(dout, q, k, v, out, lse, dlse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right, softcap,
                               dropout_p, rng_state, mask_grad)


@torch.library.custom_op("pyattn::triton_kvcache_fwd", mutates_args=())
def triton_kvcache_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor],
                       cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                       alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], scale: float, window_left: int,
                       window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    """kvcache_fwd's schema (csrc/ops.cpp): q (B, L, Hq, E), caches (B_cache, S_max, Hkv, E) or paged
    (num_pages, page_size, Hkv, E) -> out (B, L, Hq, Ev), lse (B, Hq, L) float32. Forward only."""
    with _on_device(q):
        return launch.kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, cache_batch_idx, cache_leftpad,
                                      alibi_slopes, sinks, scale, window_left, window_right, softcap)


def _on_device(t):
    """Launch on t's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


register_attention_op("pyattn::triton_fwd", "pyattn::triton_bwd")
torch.library.register_fake("pyattn::triton_kvcache_fwd")(kvcache_fake)
