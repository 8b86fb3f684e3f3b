"""torch.nn.MultiheadAttention on pyattn's kernels, and replace_attention() to swap it into existing models."""
import torch
import torch.nn.functional as F

from .errors import AttentionInputError, AttentionTypeError
from .functional import scaled_dot_product_attention


def _additive(mask, name, dtype):
    """torch's mask convention (bool True = masked out, float = added) -> float mask in dtype, or None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise AttentionTypeError(f"{name} must be bool or floating point, got {mask.dtype} (shape {tuple(mask.shape)})")
    return mask.to(dtype)


def _pad_key(mask):
    """One more key (bias_kv or the zero key): every query may attend it."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs in pyattn's fused kernels.

    Same constructor, parameters, state_dict keys, forward signature and returns. With need_weights=False
    the attention goes through pyattn.scaled_dot_product_attention: a key_padding_mask reaches the kernel as a
    broadcast (N, 1, 1, S) view and is_causal as the kernel's causal band, so neither builds an L x S mask.
    need_weights=True (torch's default) needs the full L x S weights, so it is torch's own computation: the
    slow path, kept for exact torch semantics. Pass need_weights=False for speed.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = self._check(query, key, value, key_padding_mask, attn_mask, is_causal)
        self_attention = query is key and key is value  # decided before the views below make new objects
        if not batched:  # (L, E) -> (1, L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, self_attention)  # (N, L, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _check(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        """-> whether the inputs are batched; raises on shapes torch's module would refuse."""
        shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise AttentionInputError(f"query, key and value must all be 3-D (batched) or all 2-D (unbatched), "
                                      f"got {shapes}")
        batched = query.dim() == 3
        seq, batch = (1, 0) if self.batch_first else (0, 1)
        if not batched:
            seq = 0
        L, S = query.shape[seq], key.shape[seq]
        N = query.shape[batch] if batched else 1
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise AttentionInputError(f"expected embedding dims query {self.embed_dim}, key {self.kdim}, "
                                      f"value {self.vdim} (last dim), got {shapes}")
        if key.shape[:-1] != value.shape[:-1] or (batched and key.shape[batch] != N):
            raise AttentionInputError(f"key and value must have the same length and the batch of query, got {shapes}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((N, S) if batched else (S,)):
            raise AttentionInputError(f"key_padding_mask must have shape {(N, S) if batched else (S,)} (batch, source "
                                      f"length), got {tuple(key_padding_mask.shape)} with {shapes}")
        if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (N * self.num_heads, L, S)):
            raise AttentionInputError(f"attn_mask must have shape {(L, S)} or {(N * self.num_heads, L, S)} "
                                      f"(batch * heads, target, source), got {tuple(attn_mask.shape)} with {shapes}")
        if is_causal and attn_mask is None:
            raise AttentionInputError("Need attn_mask if specifying the is_causal hint (as "
                                      "torch.nn.MultiheadAttention); nn.Transformer.generate_square_subsequent_mask "
                                      "makes one")
        return batched

    def _project(self, query, key, value, self_attention):
        """(N, L, E), (N, S, kdim), (N, S, vdim) -> q (N, L, E), k, v (N, S, E)."""
        if self._qkv_same_embed_dim and self_attention:  # one matmul
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, self_attention):
        """query (N, L, E), key (N, S, kdim), value (N, S, vdim) -> (N, L, E)."""
        N, L, E = query.shape
        H = self.num_heads
        q, k, v = self._project(query, key, value, self_attention)
        # is_causal is torch's promise that attn_mask is the causal mask: the kernel's band replaces it, unless
        # bias_kv / zero_attn append keys that every query may attend (outside the band)
        is_causal = is_causal and self.bias_k is None and not self.add_zero_attn
        attn_mask = None if is_causal else _additive(attn_mask, "attn_mask", q.dtype)  # (L, S) or (N*H, L, S)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(N, H, L, -1)
        pad = _additive(key_padding_mask, "key_padding_mask", q.dtype)  # (N, S)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, pad = _pad_key(attn_mask), _pad_key(pad)
        q, k, v = (x.unflatten(-1, (H, E // H)).transpose(1, 2) for x in (q, k, v))  # (N, H, len, E/H) views
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
            attn_mask, pad = _pad_key(attn_mask), _pad_key(pad)
        mask = None if pad is None else pad[:, None, None, :]  # (N, 1, 1, S): a broadcast view, no L x S copy
        if attn_mask is not None:
            mask = attn_mask if mask is None else attn_mask + mask
        # the causal band as a window: is_causal would refuse the padding mask beside it, as torch's does
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           window_size=(-1, 0) if is_causal else None)  # (N, H, L, E/H)
        return F.linear(out.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)


def replace_attention(module):
    """Swap every torch.nn.MultiheadAttention inside module (itself included) for pyattn.MultiheadAttention,
    in place: the same parameter objects stay (weights, devices, optimizer state and hooks keep working).

    Subclasses of nn.MultiheadAttention are left alone: they may override forward. Note that torch's
    TransformerEncoderLayer, in eval mode without grad, may take its own fused fast path that never calls
    self_attn; torch.backends.mha.set_fastpath_enabled(False) turns that off. Returns module.
    """
    for m in module.modules():
        if type(m) is torch.nn.MultiheadAttention:
            m.__class__ = MultiheadAttention
    return module
