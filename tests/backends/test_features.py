"""Feature names (pyattn.features) are defined once: backends declare only known ones, and the input records report
only known ones, so a misspelt name cannot silently change what a backend supports."""
import torch

import pyattn
from pyattn import backends, features
from pyattn.inputs import dense_inputs, flex_inputs, kvcache_inputs, varlen_inputs

KNOWN = features.ALL_FEATURES | features.KVCACHE_FEATURES | {features.KVCACHE_GRADIENT} | features.FLEX_FEATURES


def test_every_constant_is_in_a_set_and_every_set_member_is_a_constant():
    constants = {v for n, v in vars(features).items() if n.isupper() and isinstance(v, str)}
    assert constants == KNOWN
    assert features.TORCH_FEATURES <= features.ALL_FEATURES


def test_backends_declare_known_features():
    for backend in (backends.TritonBackend(), backends.CUDABackend(), backends.CPUBackend(), backends.TorchBackend(),
                    backends.ReferenceBackend()):
        assert backend.features <= KNOWN, (backend.name, backend.features - KNOWN)


def test_inputs_report_known_features():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    inp = dense_inputs(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), dropout_p=0.1, enable_gqa=True,
                       window_size=(3, 2), softcap=5.0, alibi_slopes=torch.rand(4), causal_alignment="bottom_right",
                       return_lse=True, sinks=torch.zeros(4))
    assert set(inp.uses()) == features.ALL_FEATURES - {features.FLOAT_MASK, features.CAUSAL, features.VARLEN}
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    inp = varlen_inputs(q[0].transpose(0, 1), k[0, :, :5].transpose(0, 1), v[0, :, :5].transpose(0, 1), cu, cu, 3, 3,
                        is_causal=True)
    assert set(inp.uses()) == {features.VARLEN, features.CAUSAL, features.GQA}
    cache = torch.randn(2, 8, 2, 16)
    inp = kvcache_inputs(q.transpose(1, 2), cache, cache.clone(), k_new=None, v_new=None, cache_seqlens=3,
                         block_table=None, cache_batch_idx=None, cache_leftpad=None, is_causal=True, window_size=None,
                         softcap=None, alibi_slopes=None, sinks=None, scale=None, return_lse=False)
    assert set(inp.uses()) == {features.KVCACHE, features.CAUSAL, features.BOTTOM_RIGHT, features.GQA}
    assert pyattn.explain(q, k, v, enable_gqa=True).count(features.GQA) >= 1
    from torch.nn.attention.flex_attention import create_block_mask
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 5, 7, device="cpu")
    inp = flex_inputs(q, k, v, lambda score, b, h, q_idx, kv_idx: score, block_mask, enable_gqa=True)
    assert set(inp.uses()) == {features.BLOCK_MASK, features.SCORE_MOD, features.GQA}
