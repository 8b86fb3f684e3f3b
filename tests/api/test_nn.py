"""pyattn.MultiheadAttention against torch.nn.MultiheadAttention (same weights), forward and backward, and
replace_attention on torch's Transformer modules.

Oracle: torch's module in float64. Baseline: torch's module in the tested dtype. Rule: helpers.assert_close_to_oracle.
"""
import functools

import pytest
import torch
from torch.func import functional_call

import pyattn
from helpers import check_fwd_bwd, device_params, dtype_id

N, L, S, E, H = 2, 9, 11, 32, 4

# constructor kwargs, with whether query, key and value are one tensor (self-attention)
CONFIGS = {
    "self-batch_first": (dict(batch_first=True), True),
    "self-seq_first": (dict(), True),
    "cross-kdim-vdim": (dict(batch_first=True, kdim=12, vdim=20), False),
    "bias_kv-zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), False),
    "no-bias": (dict(bias=False, batch_first=True), True),
}


def _masks(kind, device, batched=True, S=S):
    """Forward kwargs for a mask kind; key 0 stays visible so that no row is fully masked."""
    n = N if batched else 1
    kpm = torch.rand(n, S, device=device) > 0.6
    kpm[:, 0] = False
    if not batched:
        kpm = kpm[0]
    attn_bool = torch.rand(L, S, device=device) > 0.7
    attn_bool[:, 0] = False
    return {
        "none": {},
        "kpm-bool": {"key_padding_mask": kpm},
        "kpm-float": {"key_padding_mask": torch.randn(kpm.shape, device=device)},
        "attn2d-bool": {"attn_mask": attn_bool},
        "attn3d-float+kpm-float": {"attn_mask": torch.randn(n * H, L, S, device=device),
                                   "key_padding_mask": torch.randn(kpm.shape, device=device)},
        "causal+kpm": {"attn_mask": torch.ones(L, S, dtype=torch.bool, device=device).triu(1), "is_causal": True,
                       "key_padding_mask": kpm},
    }[kind]


def _inputs(config, device, batched=True):
    kw, self_attn = CONFIGS[config]
    shape = (lambda s, d: (N, s, d) if kw.get("batch_first") else (s, N, d)) if batched else (lambda s, d: (s, d))
    query = torch.randn(shape(L, E), device=device)
    if self_attn:
        return {"query": query}
    return {"query": query, "key": torch.randn(shape(S, kw.get("kdim", E)), device=device),
            "value": torch.randn(shape(S, kw.get("vdim", E)), device=device)}


def _pair(config, device):
    """(torch's module, ours) with the same weights."""
    kw, _ = CONFIGS[config]
    ref = torch.nn.MultiheadAttention(E, H, device=device, **kw)
    ours = pyattn.MultiheadAttention(E, H, device=device, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


MASK_NAMES = ("key_padding_mask", "attn_mask")


def _call(module, need_weights=False, is_causal=False, **t):
    """module's output with parameters, inputs and masks from t (so the tolerance helpers cast and grad them)."""
    params = {name: t[name] for name, _ in module.named_parameters()}
    q = t["query"]
    masks = {name: t[name] for name in MASK_NAMES if name in t}
    return functional_call(module, params, (q, t.get("key", q), t.get("value", q)),
                           dict(masks, need_weights=need_weights, is_causal=is_causal))[0]


def _src_len(config):
    return L if CONFIGS[config][1] else S


def _check(config, device, dtype, mask, batched=True):
    ref, ours = _pair(config, device)
    masks = _masks(mask, device, batched, _src_len(config))
    is_causal = masks.pop("is_causal", False)
    t = dict(_inputs(config, device, batched), **dict(ref.named_parameters()), **masks)
    grads = tuple(name for name in t if name not in MASK_NAMES)
    torch_fn = functools.partial(_call, ref, is_causal=is_causal)
    check_fwd_bwd(functools.partial(_call, ours, is_causal=is_causal), torch_fn, torch_fn, t, dtype,
                  grad_names=grads, out_names=("out",))


devices = pytest.mark.parametrize("device", device_params())
MASK_KINDS = ["none", "kpm-bool", "kpm-float", "attn2d-bool", "attn3d-float+kpm-float", "causal+kpm"]


@devices
@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch(device, config, mask):
    _check(config, device, torch.float32, mask)


@devices
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("mask", ["kpm-bool", "causal+kpm"])
def test_low_precision(device, dtype, mask):
    _check("self-batch_first", device, dtype, mask)


@devices
@pytest.mark.parametrize("mask", ["none", "kpm-bool", "attn3d-float+kpm-float"])
def test_unbatched(device, mask):
    _check("cross-kdim-vdim", device, torch.float32, mask, batched=False)


@devices
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
def test_need_weights_is_torchs(device, average):
    """need_weights=True is the slow path: output and weights are torch's own."""
    ref, ours = _pair("cross-kdim-vdim", device)
    t = _inputs("cross-kdim-vdim", device)
    masks = _masks("kpm-bool", device)
    expect = ref(t["query"], t["key"], t["value"], average_attn_weights=average, **masks)
    got = ours(t["query"], t["key"], t["value"], average_attn_weights=average, **masks)
    assert got[1].shape == ((N, L, S) if average else (N, H, L, S))
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e)


@devices
def test_padding_mask_reaches_the_kernel_as_a_broadcast_view(device, monkeypatch):
    seen = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return pyattn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(pyattn.nn, "scaled_dot_product_attention", spy)
    _, ours = _pair("self-batch_first", device)
    x = torch.randn(N, L, E, device=device)
    ours(x, x, x, need_weights=False, **_masks("causal+kpm", device, S=L))
    (mask,) = seen
    assert mask.shape == (N, 1, 1, L) and mask.numel() == N * L


@devices
def test_dropout_in_training(device):
    """Dropout applies in training only; torch.manual_seed reproduces it; gradients flow through it."""
    ours = pyattn.MultiheadAttention(E, H, dropout=0.5, batch_first=True, device=device)
    x = torch.randn(N, L, E, device=device, requires_grad=True)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(ours(x, x, x, need_weights=False)[0])
    assert torch.equal(outs[0], outs[1])
    ours.eval()
    plain = ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(outs[0], plain)
    (grad,) = torch.autograd.grad(outs[0].sum(), x)
    assert grad.isfinite().all() and grad.abs().sum() > 0


@pytest.mark.parametrize("call,match", [
    (lambda m, x: m(x, x, x[:, :, :8], need_weights=False), "embedding dims"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool), need_weights=False),
     "key_padding_mask must have shape"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, L, S), need_weights=False), "attn_mask must have shape"),
    (lambda m, x: m(x, x, x, is_causal=True, need_weights=False), "Need attn_mask"),
    (lambda m, x: m(x[0, 0], x, x, need_weights=False), "all be 3-D"),
], ids=["embed-dim", "kpm-shape", "attn-mask-shape", "causal-without-mask", "ranks"])
def test_bad_input(call, match):
    m = pyattn.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(pyattn.AttentionInputError, match=match) as info:
        call(m, torch.randn(N, S if match == "key_padding_mask must have shape" else L, E))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


def _transformer(device):
    return torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                                dropout=0.0, batch_first=True, device=device)


@devices
def test_replace_attention_in_transformer(device):
    """Every attention of an nn.Transformer swapped in place: same parameter objects and state_dict, same result."""
    model = _transformer(device)
    params, keys = list(model.parameters()), list(model.state_dict())
    src, tgt = torch.randn(N, S, E, device=device), torch.randn(N, L, E, device=device)
    pad = torch.rand(N, S, device=device) > 0.7
    pad[:, 0] = False
    causal = model.generate_square_subsequent_mask(L, device=device)
    kw = dict(src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_mask=causal, tgt_is_causal=True)
    expect = model(src, tgt, **kw)

    assert pyattn.replace_attention(model) is model
    swapped = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(swapped) == 6 and all(type(m) is pyattn.MultiheadAttention for m in swapped)
    assert all(a is b for a, b in zip(model.parameters(), params)) and list(model.state_dict()) == keys
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in swapped]
    got = model(src, tgt, **kw)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    assert len(calls) == 6
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    for h in hooks:
        h.remove()


def test_replace_attention_leaves_subclasses():
    class Custom(torch.nn.MultiheadAttention):
        pass

    model = torch.nn.Sequential(Custom(E, H), torch.nn.MultiheadAttention(E, H))
    pyattn.replace_attention(model)
    assert type(model[0]) is Custom and type(model[1]) is pyattn.MultiheadAttention
