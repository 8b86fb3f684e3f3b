"""score_mod families that pyattn fuses: each constructor returns a callable with torch's score_mod signature
score_mod(score, b, h, q_idx, kv_idx) (so torch's flex_attention takes it too) that pyattn.flex_attention recognises
and turns into an option its kernels have, with no Python call per score:

    alibi(slopes)         -> alibi_slopes: score - slopes[h] * |q_idx - kv_idx|  (slopes (Hq,) or (B, Hq) float32)
    softcap(cap)          -> softcap:      cap * tanh(score / cap)
    relative_bias(table)  -> a float mask gathered from table (Hq, 2M - 1): score + table[h, q_idx - kv_idx + M - 1]
    full_bias(bias)       -> a float mask: score + bias[h, q_idx, kv_idx] ((Hq, L, S)) or bias[b, h, ...] ((B, Hq, L, S))

Gradients reach the tables (relative_bias, full_bias) through the float mask's gradient. The kernels have no
gradient for alibi slopes: slopes that require one run as a Python score_mod (reference math, autograd), as does any
other callable (pyattn.explain says so).
"""
import torch

from . import validate
from .errors import AttentionInputError


class FusedScoreMod:
    """A score_mod pyattn knows: fuse() says which AttnInputs field computes it."""

    def fuse(self, B, Hq, L, S, query):
        """-> (AttnInputs field, value) for a call of q (B, Hq, L, E) and keys of length S, or None where the kernels
        cannot compute it (the callable then runs as any Python score_mod)."""
        raise NotImplementedError


class _Alibi(FusedScoreMod):
    def __init__(self, slopes):
        self.slopes = slopes  # (Hq,) or (B, Hq) float32

    def __call__(self, score, b, h, q_idx, kv_idx):
        slope = self.slopes[h] if self.slopes.dim() == 1 else self.slopes[b, h]
        return score - slope * (q_idx - kv_idx).abs()

    def fuse(self, B, Hq, L, S, query):
        if torch.is_grad_enabled() and self.slopes.requires_grad:  # the kernels give slopes no gradient
            return None
        slopes = self.slopes.to(torch.float32) if self.slopes.is_floating_point() else self.slopes  # what kernels take
        return "alibi_slopes", validate.alibi(slopes, (B, Hq), query.device)


class _Softcap(FusedScoreMod):
    def __init__(self, cap):
        validate.options(0.0, cap, "top_left", False)
        self.cap = float(cap)

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)

    def fuse(self, B, Hq, L, S, query):
        return "softcap", self.cap


def _bias_dtype(bias, query):
    """The float mask's dtype: the query's or float32 (what the kernels take), converted differentiably."""
    return bias if bias.dtype in (query.dtype, torch.float32) else bias.to(torch.float32)


class _RelativeBias(FusedScoreMod):
    def __init__(self, table):
        validate.tensor("table", table)
        if table.dim() != 2 or table.shape[1] % 2 == 0 or not table.is_floating_point():
            raise AttentionInputError(f"relative_bias: table must be a floating (H, 2 * M - 1) tensor, got "
                                      f"{table.dtype} {tuple(table.shape)}")
        self.table = table
        self.offset = (table.shape[1] - 1) // 2  # M - 1: the column of q_idx == kv_idx

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.table[h, q_idx - kv_idx + self.offset]

    def fuse(self, B, Hq, L, S, query):
        if self.table.shape[0] != Hq or self.table.device != query.device:
            raise AttentionInputError(f"relative_bias: table {tuple(self.table.shape)} on {self.table.device} needs "
                                      f"Hq = {Hq} rows on {query.device}")
        if L - 1 + self.offset >= self.table.shape[1] or self.offset - (S - 1) < 0:
            raise AttentionInputError(f"relative_bias: table {tuple(self.table.shape)} holds offsets q_idx - kv_idx "
                                      f"in [-{self.offset}, {self.offset}], but q_len={L} and kv_len={S} need "
                                      f"[-{S - 1}, {L - 1}]")
        distance = (torch.arange(L, device=query.device)[:, None] - torch.arange(S, device=query.device)[None, :])
        bias = _bias_dtype(self.table, query)[:, distance + self.offset]  # (Hq, L, S), differentiable in table
        return "mask", bias.expand(B, Hq, L, S)


class _FullBias(FusedScoreMod):
    def __init__(self, bias):
        validate.tensor("bias", bias)
        if bias.dim() not in (3, 4) or not bias.is_floating_point():
            raise AttentionInputError(f"full_bias: bias must be a floating (H, L, S) or (B, H, L, S) tensor, got "
                                      f"{bias.dtype} {tuple(bias.shape)}")
        self.bias = bias

    def __call__(self, score, b, h, q_idx, kv_idx):
        if self.bias.dim() == 3:
            return score + self.bias[h, q_idx, kv_idx]
        return score + self.bias[b, h, q_idx, kv_idx]

    def fuse(self, B, Hq, L, S, query):
        want = (Hq, L, S) if self.bias.dim() == 3 else (B, Hq, L, S)
        if tuple(self.bias.shape) != want or self.bias.device != query.device:
            raise AttentionInputError(f"full_bias: bias {tuple(self.bias.shape)} on {self.bias.device} must have "
                                      f"shape {want} on {query.device}")
        return "mask", _bias_dtype(self.bias, query).expand(B, Hq, L, S)


def alibi(slopes):
    """score - slopes[h] * |q_idx - kv_idx| (slopes[b, h] for (B, Hq) slopes): pyattn's alibi_slopes."""
    return _Alibi(slopes)


def softcap(cap):
    """cap * tanh(score / cap) (Gemma-2): pyattn's softcap."""
    return _Softcap(cap)


def relative_bias(table):
    """score + table[h, q_idx - kv_idx + M - 1] for a learnable table (Hq, 2 * M - 1): a T5/relative-position bias."""
    return _RelativeBias(table)


def full_bias(bias):
    """score + bias[h, q_idx, kv_idx] for bias (Hq, L, S), or bias[b, h, q_idx, kv_idx] for (B, Hq, L, S)."""
    return _FullBias(bias)
