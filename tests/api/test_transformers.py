"""attn_implementation="pyattn" in Hugging Face transformers against the library's eager attention.

Tiny random-weight decoder models are built here and saved locally (nothing is downloaded), then loaded with
from_pretrained(..., attn_implementation=...). Logits and gradients follow helpers.assert_close_to_oracle: oracle
eager in float64, baseline eager in the tested dtype. Padding is on the right there: eager upcasts its softmax to
float32, where a fully masked (left-padded) row of float64 min values turns into NaN. Left padding is
checked by greedy generation, which must give the same tokens.
"""
import functools
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, masking_utils  # noqa: E402

import pyattn  # noqa: E402
import pyattn.integrations.transformers as pyattn_hf  # noqa: E402
from helpers import PyattnOps, assert_close_to_oracle, device_params  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)
# sequences are longer than the windows (8), so the windows matter
CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(**COMMON),
    "mistral-window": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "qwen2-window-layer": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8,
                                                           max_window_layers=1),
    "gemma2-softcap-window": lambda: transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=16),
    "gpt-oss-sinks-window": lambda: transformers.GptOssConfig(
        **COMMON, head_dim=16, sliding_window=8, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["sliding_attention", "full_attention"]),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1,
                                            eos_token_id=2),
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert pyattn_hf.register() == "pyattn"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder of a saved tiny random model (built once per module)."""
    folders = {}

    def get(family):
        if family not in folders:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager")
            folders[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(folders[family])
        return folders[family]
    return get


def load(folder, impl, dtype, device, train=False):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl, dtype=dtype,
                                                 experts_implementation="eager").to(device)
    return model.train(train)


def tokens(device, B=2, L=20, right_pad=0):
    ids = torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    if right_pad:
        mask[1, L - right_pad:] = 0
    return ids, mask


def models(folder, device, dtype=torch.float32, train=False):
    """(pyattn in dtype, eager in dtype, eager in float64): ours, baseline, oracle."""
    return (load(folder, "pyattn", dtype, device, train), load(folder, "eager", dtype, device, train),
            load(folder, "eager", torch.float64, device, train))


@pytest.fixture
def seen_masks(monkeypatch):
    """Shapes of the masks that reach pyattn's attention function (None for none)."""
    shapes = []

    def spy(module, query, key, value, attention_mask, **kw):
        shapes.append(None if attention_mask is None else tuple(attention_mask.shape))
        return pyattn_hf.attention_forward(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "pyattn", spy)
    return shapes


def assert_no_dense_mask(shapes):
    assert shapes and all(s is None or len(s) == 2 for s in shapes), f"masks that reached attention: {set(shapes)}"


families = pytest.mark.parametrize("family", list(CONFIGS))
devices = pytest.mark.parametrize("device", device_params())


@devices
@families
@pytest.mark.parametrize("right_pad", [0, 5], ids=["no-padding", "right-padding"])
def test_logits(saved, family, device, right_pad):
    ids, mask = tokens(device, right_pad=right_pad)
    keep = mask.bool()
    with torch.no_grad():
        ours, base, oracle = (m(ids, attention_mask=mask).logits[keep] for m in models(saved(family), device))
    assert_close_to_oracle("logits", ours, base, oracle, torch.float32)


@devices
@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window", "gpt2"])
@pytest.mark.parametrize("right_pad", [0, 5], ids=["no-padding", "right-padding"])
def test_sdpa_models_under_pyattn_enabled(saved, family, device, right_pad):
    """attn_implementation="sdpa" calls torch's function: under pyattn.enabled() that runs pyattn's kernel, once
    per layer, and gives eager's logits (torch's own SDPA with is_causal or transformers' dense mask)."""
    ids, mask = tokens(device, right_pad=right_pad)
    keep = mask.bool()
    sdpa = load(saved(family), "sdpa", torch.float32, device)
    with torch.no_grad(), pyattn.enabled(), PyattnOps() as ops:
        ours = sdpa(ids, attention_mask=mask).logits[keep]
    assert ops.calls == sdpa.config.num_hidden_layers
    with torch.no_grad():
        base, oracle = (load(saved(family), "eager", dtype, device)(ids, attention_mask=mask).logits[keep]
                        for dtype in (torch.float32, torch.float64))
    assert_close_to_oracle("logits", ours, base, oracle, torch.float32)


@devices
@families
def test_training_gradients(saved, family, device):
    ids, mask = tokens(device, right_pad=5)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for model in models(saved(family), device, train=True):
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten().double() for p in model.parameters()]))
    assert_close_to_oracle("parameter grads", *grads, torch.float32)


@devices
@families
def test_chunked_prefill_then_decode(saved, family, device, seen_masks):
    """A prompt fed in two chunks through the KV cache, then one token: each chunk's queries end at the last key
    (bottom-right alignment), the kernel applies causality and windows (no dense mask), and the logits match."""
    ids, _ = tokens(device, L=21)
    outs = []
    for model in models(saved(family), device):
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            chunks = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                      for a, b in ((0, 12), (12, 20), (20, 21))]
        outs.append(torch.cat(chunks, dim=1))
    assert_close_to_oracle("logits", *outs, torch.float32)
    assert_no_dense_mask(seen_masks)


@devices
@families
def test_greedy_generation_left_padded(saved, family, device, seen_masks):
    ids, mask = tokens(device, L=12)
    mask[1, :4] = 0
    outs = []
    for impl in ("pyattn", "eager"):
        model = load(saved(family), impl, torch.float32, device)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0))
    assert outs[0].shape == (2, 20)
    assert torch.equal(outs[0], outs[1])
    assert_no_dense_mask(seen_masks)


@devices
def test_compiled_model_fullgraph(saved, device):
    """The attention and mask functions trace into one graph (no closure inspection, no value reads)."""
    torch._dynamo.reset()
    ids, mask = tokens(device, right_pad=5)
    model = load(saved("gemma2-softcap-window"), "pyattn", torch.float32, device)
    compiled = torch.compile(lambda i, m: model(i, attention_mask=m).logits, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask), model(ids, attention_mask=mask).logits)


@devices
def test_static_cache_generation(saved, device, seen_masks):
    """A static cache ends keys past the queries: the mask function falls back to the dense mask."""
    ids, mask = tokens(device, L=12)
    mask[1, :4] = 0
    outs = [load(saved("mistral-window"), impl, torch.float32, device).generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
        for impl in ("pyattn", "eager")]
    assert torch.equal(outs[0], outs[1])
    assert any(s is not None and len(s) == 4 for s in seen_masks)


def _mask(mask_function=masking_utils.causal_mask_function, padding=None, q_offset=0, q_length=5, kv_length=5,
          kv_offset=0, **kw):
    return pyattn_hf.attention_mask(2, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                                    mask_function=mask_function, attention_mask=padding, **kw)


WINDOW3 = SimpleNamespace(sliding_window=3)


def _padding(S):
    padding = torch.ones(2, S, dtype=torch.bool)
    padding[1, :2] = False
    return padding


@pytest.mark.parametrize("call,shape", [
    (lambda: _mask(), None),
    (lambda: _mask(padding=torch.ones(2, 5, dtype=torch.bool)), None),
    (lambda: _mask(padding=_padding(5)), (2, 5)),
    (lambda: _mask(padding=_padding(9), q_offset=8, q_length=1, kv_length=9), (2, 9)),
    (lambda: _mask(masking_utils.sliding_window_causal_mask_function(3), _padding(9), q_offset=8, q_length=1,
                   kv_offset=6, kv_length=3, local_size=3, config=WINDOW3), None),
    (lambda: _mask(masking_utils.sliding_window_causal_mask_function(3), _padding(4), q_offset=3, q_length=1,
                   kv_offset=1, kv_length=3, local_size=3, config=WINDOW3), (2, 3)),
    (lambda: _mask(padding=_padding(5), q_offset=torch.tensor(3), q_length=2, kv_length=8), (2, 1, 2, 8)),
    (lambda: _mask(masking_utils.chunked_causal_mask_function(2, torch.zeros(2, dtype=torch.long)),
                   local_size=2, config=SimpleNamespace(sliding_window=3, attention_chunk_size=2)), (2, 1, 5, 5)),
    (lambda: _mask(masking_utils.and_masks(masking_utils.causal_mask_function, lambda b, h, q, k: k > 0),
                   allow_is_causal_skip=False), (2, 1, 5, 5)),
    (lambda: _mask(functools.partial(masking_utils.causal_mask_function)), (2, 1, 5, 5)),
], ids=["causal", "causal-all-ones", "causal-padding", "decode-padding", "window-past-padding",
        "window-cache-padding",
        "static-cache-dense", "chunked-dense", "custom-dense", "callable-object-dense"])
def test_mask_is_small_for_bands(call, shape):
    """Causal and window patterns give at most a (B, S) padding mask; anything else transformers' dense mask."""
    mask = call()
    assert (None if mask is None else tuple(mask.shape)) == shape


def test_wrong_2d_mask_and_unsupported_arguments_raise():
    class Module(torch.nn.Module):
        is_causal = True

    q = k = torch.randn(2, 4, 5, 16)
    with pytest.raises(ValueError, match=r"padding mask \(2, 5\)"):
        pyattn_hf.attention_forward(Module(), q, k, k, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_bias"):
        pyattn_hf.attention_forward(Module(), q, k, k, None, position_bias=torch.zeros(1, 4, 5, 5))


@pytest.mark.subprocess
def test_import_pyattn_does_not_import_transformers():
    code = "import sys, pyattn, pyattn.integrations.transformers; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@devices
def test_encoder_bidirectional(device, seen_masks):
    """Encoder models (BERT) build bidirectional masks through the same mask interface: logits match eager,
    with right padding."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=128,
                                     attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    eager = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids, mask = tokens(device, right_pad=5)
    outs = {}
    for impl, dtype in (("pyattn", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        model = transformers.BertModel(config, add_pooling_layer=False).to(device, dtype).eval()
        model.load_state_dict(eager.state_dict())
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl, dtype] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen_masks, "pyattn's attention never ran"
    keep = mask.bool()  # padded positions' hidden states are unspecified in both
    assert_close_to_oracle("hidden", outs["pyattn", torch.float32][keep], outs["eager", torch.float32][keep],
                           outs["eager", torch.float64][keep], torch.float32)
