"""pyattn: fused attention for PyTorch."""
from . import distributed, flash_attn, score_mods
from .backends import available_backends
from .errors import AttentionInputError, AttentionTypeError
from .functional import explain, flex_attention, scaled_dot_product_attention, varlen_attention
from .kvcache import kvcache_attention
from .nn import MultiheadAttention, replace_attention
from .ops import build_info
from .routing import disable, enable, enabled

__version__ = "0.1.0"  # written here alone: setup.py reads it into the package metadata and the C++ build
__all__ = ["scaled_dot_product_attention", "flex_attention", "varlen_attention", "kvcache_attention",
           "MultiheadAttention", "replace_attention", "explain", "available_backends", "build_info", "enable",
           "disable", "enabled", "AttentionInputError", "AttentionTypeError", "distributed", "flash_attn",
           "score_mods"]
