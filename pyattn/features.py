"""Feature names, defined once: what AttnInputs.uses() reports and backends declare.

They are plain strings (explain() prints them), but code names them only through these constants, so a typo
is a NameError at import or first call instead of a silent change in what a backend supports.
"""

BOOL_MASK = "bool mask"
FLOAT_MASK = "float mask"
SLIDING_WINDOW = "sliding window"
CAUSAL = "causal"
BOTTOM_RIGHT = "bottom_right alignment"
SOFTCAP = "softcap"
ALIBI = "alibi"
DROPOUT = "dropout"
VARLEN = "varlen"
RETURN_LSE = "return_lse"
GQA = "gqa"
SINKS = "sinks"

# kvcache_attention only (a record with a cache part)
KVCACHE = "kvcache"
PAGED_KV_CACHE = "paged kv cache"
CACHE_BATCH_IDX = "cache_batch_idx"
CACHE_LEFTPAD = "cache_leftpad"
KVCACHE_GRADIENT = "kvcache gradient"  # a differentiable call: left to the reference backend

# flex_attention (and a BlockMask as scaled_dot_product_attention's attn_mask)
BLOCK_MASK = "block_mask"  # a torch BlockMask: block_states / block_bits (pyattn/block_mask.py)
SCORE_MOD = "score_mod"  # an arbitrary Python score_mod (pyattn.score_mods' families become the features above)

# every feature of scaled_dot_product_attention / varlen_attention
ALL_FEATURES = frozenset({BOOL_MASK, FLOAT_MASK, SLIDING_WINDOW, CAUSAL, BOTTOM_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                          VARLEN, RETURN_LSE, GQA, SINKS})
# what kvcache_attention adds to them (KVCACHE_GRADIENT is not among them: only the reference takes it)
KVCACHE_FEATURES = frozenset({KVCACHE, PAGED_KV_CACHE, CACHE_BATCH_IDX, CACHE_LEFTPAD})
# what torch's own F.scaled_dot_product_attention computes
TORCH_FEATURES = frozenset({BOOL_MASK, FLOAT_MASK, CAUSAL, DROPOUT, GQA})
# what flex_attention adds (fused backends declare BLOCK_MASK once their kernels take it; SCORE_MOD: reference only)
FLEX_FEATURES = frozenset({BLOCK_MASK, SCORE_MOD})
