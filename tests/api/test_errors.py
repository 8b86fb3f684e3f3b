"""Bad input raises pyattn.AttentionInputError, whose message names the argument and the shapes: a RuntimeError,
as torch's errors are (code written for torch catches it), and also the ValueError or TypeError (listed here) a
Python caller expects.

Nothing is silently truncated or broadcast into a wrong answer (torch itself accepts K and V of different
lengths on CPU: we do not). Mixed devices use the "meta" device, so this runs on CPU-only machines.
"""
import pytest
import torch

import pyattn

R = torch.randn
E = (ValueError, RuntimeError, TypeError)


def q4(*s, dtype=torch.float32, device="cpu"):
    return torch.randn(*s, dtype=dtype, device=device) if dtype.is_floating_point else \
        torch.zeros(*s, dtype=dtype, device=device)


def good():
    return dict(query=R(2, 3, 5, 16), key=R(2, 3, 7, 16), value=R(2, 3, 7, 8))


def with_(**kw):
    args = good()
    args.update(kw)
    return args


# (id, kwargs for scaled_dot_product_attention, exception, substrings the message must contain)
DENSE = [
    ("query-1d", with_(query=R(16)), ValueError, ["query", "(16,)"]),
    ("key-1d", with_(key=R(16)), ValueError, ["key", "(16,)"]),
    ("query-not-tensor", with_(query=[[1.0]]), TypeError, ["query", "list"]),
    ("E-mismatch", with_(key=R(2, 3, 7, 8)), ValueError, ["head dim", "(2, 3, 5, 16)", "(2, 3, 7, 8)"]),
    ("KV-length-mismatch", with_(value=R(2, 3, 6, 8)), ValueError, ["value", "(2, 3, 7, 16)", "(2, 3, 6, 8)"]),
    ("gqa-not-multiple", with_(query=R(2, 5, 5, 16), key=R(2, 2, 7, 16), value=R(2, 2, 7, 8), enable_gqa=True),
     ValueError, ["heads", "(2, 5, 5, 16)", "(2, 2, 7, 16)"]),
    ("gqa-k-heads-not-divisor",
     with_(query=R(2, 6, 5, 16), key=R(2, 4, 7, 16), value=R(2, 3, 7, 8), enable_gqa=True),
     ValueError, ["heads", "(2, 4, 7, 16)", "(2, 3, 7, 8)"]),
    ("heads-differ-without-gqa", with_(query=R(2, 6, 5, 16), key=R(2, 2, 7, 16), value=R(2, 2, 7, 8)),
     ValueError, ["broadcast", "(2, 6, 5, 16)", "(2, 2, 7, 16)"]),
    ("batch-not-broadcastable", with_(key=R(3, 3, 7, 16), value=R(3, 3, 7, 8)), ValueError,
     ["broadcast", "(2, 3, 5, 16)", "(3, 3, 7, 16)"]),
    ("int-query", with_(query=q4(2, 3, 5, 16, dtype=torch.int64)), TypeError, ["query", "int64", "(2, 3, 5, 16)"]),
    ("bool-key", with_(key=q4(2, 3, 7, 16, dtype=torch.bool)), TypeError, ["key", "bool", "(2, 3, 7, 16)"]),
    ("mixed-dtypes", with_(value=R(2, 3, 7, 8, dtype=torch.float16)), TypeError, ["dtype", "float16", "float32"]),
    ("mixed-float64", with_(query=R(2, 3, 5, 16, dtype=torch.float64)), TypeError, ["dtype", "float64"]),
    ("mask-not-broadcastable", with_(attn_mask=torch.ones(5, 8, dtype=torch.bool)), ValueError,
     ["attn_mask", "(5, 8)", "(2, 3, 5, 7)"]),
    ("mask-batch-not-broadcastable", with_(attn_mask=torch.ones(4, 1, 5, 7, dtype=torch.bool)), ValueError,
     ["attn_mask", "(4, 1, 5, 7)"]),
    ("mask-too-many-dims", with_(attn_mask=torch.ones(1, 2, 3, 5, 7, dtype=torch.bool)), ValueError,
     ["attn_mask", "(1, 2, 3, 5, 7)"]),
    ("mask-1d", with_(attn_mask=torch.ones(7, dtype=torch.bool)), ValueError, ["attn_mask", "(7,)"]),
    ("mask-int", with_(attn_mask=torch.ones(5, 7, dtype=torch.int64)), TypeError, ["attn_mask", "int64", "(5, 7)"]),
    ("mask-float64-on-fp32", with_(attn_mask=R(5, 7, dtype=torch.float64)), TypeError,
     ["attn_mask", "float64", "(5, 7)"]),
    ("mask-not-tensor", with_(attn_mask=[[True]]), TypeError, ["attn_mask"]),
    ("window-one-int", with_(window_size=3), ValueError, ["window_size", "3"]),
    ("window-len1", with_(window_size=(3,)), ValueError, ["window_size", "(3,)"]),
    ("window-len3", with_(window_size=(3, 3, 3)), ValueError, ["window_size"]),
    ("window-float", with_(window_size=(1.5, 2)), ValueError, ["window_size", "1.5"]),
    ("window-below-minus1", with_(window_size=(-2, 0)), ValueError, ["window_size", "-2"]),
    ("window-bool", with_(window_size=(True, False)), ValueError, ["window_size"]),
    ("window-str", with_(window_size="ab"), ValueError, ["window_size"]),
    ("softcap-zero", with_(softcap=0.0), ValueError, ["softcap", "0.0"]),
    ("softcap-negative", with_(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    ("softcap-nan", with_(softcap=float("nan")), ValueError, ["softcap"]),
    ("softcap-str", with_(softcap="1"), ValueError, ["softcap"]),
    ("alibi-wrong-heads", with_(alibi_slopes=R(4)), ValueError, ["alibi_slopes", "(4,)"]),
    ("alibi-3d", with_(alibi_slopes=R(2, 2, 3)), ValueError, ["alibi_slopes", "(2, 2, 3)"]),
    ("alibi-wrong-batch", with_(alibi_slopes=R(3, 3)), ValueError, ["alibi_slopes", "(3, 3)"]),
    ("alibi-float64", with_(alibi_slopes=R(3, dtype=torch.float64)), TypeError, ["alibi_slopes", "float64", "(3,)"]),
    ("alibi-bf16", with_(alibi_slopes=R(3, dtype=torch.bfloat16)), TypeError, ["alibi_slopes", "bfloat16"]),
    ("alibi-int", with_(alibi_slopes=torch.ones(3, dtype=torch.int32)), TypeError, ["alibi_slopes", "int32"]),
    ("alibi-not-tensor", with_(alibi_slopes=[0.5, 0.5, 0.5]), TypeError, ["alibi_slopes"]),
    ("causal-alignment-unknown", with_(causal_alignment="bottom-right"), ValueError,
     ["causal_alignment", "bottom-right"]),
    ("causal-alignment-none", with_(causal_alignment=None), ValueError, ["causal_alignment"]),
    ("return-lse-int", with_(return_lse=1), TypeError, ["return_lse"]),
    ("return-lse-str", with_(return_lse="yes"), TypeError, ["return_lse"]),
    ("is-causal-int", with_(is_causal=1), TypeError, ["is_causal"]),
    ("enable-gqa-str", with_(enable_gqa="yes"), TypeError, ["enable_gqa"]),
    ("scale-str", with_(scale="0.5"), TypeError, ["scale"]),
    ("scale-tensor-of-two", with_(scale=torch.tensor([0.5, 0.5])), TypeError, ["scale"]),
    ("scale-bool", with_(scale=True), TypeError, ["scale"]),
    ("dropout-bool-tensor", with_(dropout_p=torch.tensor(True)), ValueError, ["dropout_p"]),
    ("dropout-negative", with_(dropout_p=-0.5), ValueError, ["dropout_p", "-0.5"]),
    ("dropout-above-one", with_(dropout_p=1.5), ValueError, ["dropout_p", "1.5"]),
    ("key-on-meta", with_(key=R(2, 3, 7, 16, device="meta")), RuntimeError, ["device", "meta"]),
    ("value-on-meta", with_(value=R(2, 3, 7, 8, device="meta")), RuntimeError, ["device", "meta"]),
    ("mask-on-meta", with_(attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta")), RuntimeError,
     ["attn_mask", "meta"]),
    ("alibi-on-meta", with_(alibi_slopes=R(3, device="meta")), RuntimeError, ["alibi_slopes", "meta"]),
]


# validation (pyattn.inputs) runs before a backend is chosen, so these run once, not per backend
@pytest.mark.parametrize("kwargs,exc,needles", [pytest.param(*c[1:], id=c[0]) for c in DENSE])
def test_dense_errors(kwargs, exc, needles):
    with pytest.raises(exc) as info:
        pyattn.scaled_dot_product_attention(**kwargs)
    assert_torch_like(info.value, needles)


def assert_torch_like(error, needles):
    """A RuntimeError like torch's, in pyattn's family, whose message says what is wrong."""
    assert isinstance(error, pyattn.AttentionInputError) and isinstance(error, RuntimeError), type(error).__mro__
    for needle in needles:
        assert needle in str(error), f"message {str(error)!r} does not mention {needle!r}"


@pytest.mark.parametrize("kwargs,exc,needles", [pytest.param(*c[1:], id=c[0]) for c in DENSE[:12]])
def test_explain_validates_too(kwargs, exc, needles):
    with pytest.raises(exc):
        pyattn.explain(**kwargs)


def test_backend_name_unknown():
    with pytest.raises(ValueError, match="backend") as info:
        pyattn.scaled_dot_product_attention(**good(), backend="fastest")
    assert_torch_like(info.value, ["fastest", "reference"])
    with pytest.raises(ValueError, match="backend"):
        pyattn.scaled_dot_product_attention(**good(), backend=3)


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_backend_not_in_this_build(name):
    if name in pyattn.available_backends():
        pytest.skip(f"{name} is part of this build")
    with pytest.raises(RuntimeError, match=name):
        pyattn.scaled_dot_product_attention(**good(), backend=name)


def test_forced_backend_lists_its_reasons():
    """The fused CPU kernel refuses tensors on another device and dropout_p == 1; the message says why."""
    meta = {n: t.to("meta") for n, t in good().items()}
    with pytest.raises(RuntimeError) as info:
        pyattn.scaled_dot_product_attention(**meta, backend="cpu")
    assert_torch_like(info.value, ["'cpu'", "meta"])
    with pytest.raises(RuntimeError, match="dropout_p == 1"):
        pyattn.scaled_dot_product_attention(**good(), dropout_p=1.0, backend="cpu")


def test_forced_torch_fallback_lists_missing_features():
    with pytest.raises(RuntimeError) as info:
        pyattn.scaled_dot_product_attention(**good(), window_size=(2, 2), softcap=3.0, backend="torch")
    assert "sliding window" in str(info.value) and "softcap" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# varlen

def vgood():
    return dict(q=R(12, 4, 16), k=R(10, 2, 16), v=R(10, 2, 8), cu_seqlens_q=torch.tensor([0, 5, 12], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_q=7, max_seqlen_k=6)


def vwith(**kw):
    args = vgood()
    args.update(kw)
    return args


I32 = torch.int32
VARLEN = [
    ("q-4d", vwith(q=R(1, 12, 4, 16)), ValueError, ["q", "3-D", "(1, 12, 4, 16)"]),
    ("k-2d", vwith(k=R(10, 16)), ValueError, ["k", "3-D", "(10, 16)"]),
    ("E-mismatch", vwith(k=R(10, 2, 8)), ValueError, ["head dim", "(12, 4, 16)", "(10, 2, 8)"]),
    ("k-v-length", vwith(v=R(9, 2, 8)), ValueError, ["(10, 2, 16)", "(9, 2, 8)"]),
    ("heads-not-multiple", vwith(k=R(10, 3, 16), v=R(10, 3, 8)), ValueError, ["heads", "(12, 4, 16)", "(10, 3, 16)"]),
    ("cu-int64", vwith(cu_seqlens_q=torch.tensor([0, 5, 12])), ValueError, ["cu_seqlens_q", "int32", "int64"]),
    ("cu-float", vwith(cu_seqlens_k=torch.tensor([0.0, 4.0, 10.0])), ValueError, ["cu_seqlens_k", "int32"]),
    ("cu-2d", vwith(cu_seqlens_q=torch.tensor([[0, 5, 12]], dtype=I32)), ValueError, ["cu_seqlens_q", "(1, 3)"]),
    ("cu-empty", vwith(cu_seqlens_q=torch.tensor([], dtype=I32)), ValueError, ["cu_seqlens_q", "(0,)"]),
    ("cu-sizes-differ", vwith(cu_seqlens_k=torch.tensor([0, 4, 8, 10], dtype=I32)), ValueError,
     ["cu_seqlens_q", "cu_seqlens_k", "(3,)", "(4,)"]),
    ("cu-not-from-0", vwith(cu_seqlens_q=torch.tensor([1, 5, 12], dtype=I32)), ValueError, ["cu_seqlens_q", "[1, 5, 12]"]),
    ("cu-decreasing", vwith(cu_seqlens_k=torch.tensor([0, 6, 4], dtype=I32)), ValueError, ["cu_seqlens_k", "[0, 6, 4]"]),
    ("cu-past-total", vwith(cu_seqlens_q=torch.tensor([0, 5, 13], dtype=I32)), ValueError, ["cu_seqlens_q", "12"]),
    ("max-seqlen-q-too-small", vwith(max_seqlen_q=6), ValueError, ["max_seqlen", "cu_seqlens_q", "7"]),
    ("max-seqlen-k-too-small", vwith(max_seqlen_k=5), ValueError, ["max_seqlen", "cu_seqlens_k", "6"]),
    ("max-seqlen-negative", vwith(max_seqlen_q=-1), ValueError, ["max_seqlen", "-1"]),
    ("max-seqlen-float", vwith(max_seqlen_k=6.0), ValueError, ["max_seqlen", "6.0"]),
    ("mixed-dtypes", vwith(k=R(10, 2, 16, dtype=torch.float16)), TypeError, ["dtype", "float16"]),
    ("int-q", vwith(q=torch.zeros(12, 4, 16, dtype=torch.int32)), TypeError, ["q", "int32"]),
    ("alibi-wrong-batch", vwith(alibi_slopes=R(3, 4)), ValueError, ["alibi_slopes", "(3, 4)"]),
    ("alibi-wrong-heads", vwith(alibi_slopes=R(2)), ValueError, ["alibi_slopes", "(2,)"]),
    ("cu-on-meta", vwith(cu_seqlens_k=torch.tensor([0, 4, 10], dtype=I32, device="meta")), RuntimeError,
     ["cu_seqlens_k", "meta"]),
    ("k-on-meta", vwith(k=R(10, 2, 16, device="meta")), RuntimeError, ["device", "meta"]),
    ("softcap-negative", vwith(softcap=-2.0), ValueError, ["softcap"]),
    ("window-bad", vwith(window_size=(1, 2, 3)), ValueError, ["window_size"]),
    ("dropout-bad", vwith(dropout_p=2.0), ValueError, ["dropout_p"]),
    ("alignment-bad", vwith(causal_alignment="left"), ValueError, ["causal_alignment"]),
]


@pytest.mark.parametrize("kwargs,exc,needles", [pytest.param(*c[1:], id=c[0]) for c in VARLEN])
def test_varlen_errors(kwargs, exc, needles):
    kwargs = dict(kwargs)
    pos = [kwargs.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    with pytest.raises(exc) as info:
        pyattn.varlen_attention(*pos, **kwargs)
    assert_torch_like(info.value, needles)


def test_errors_raise_before_any_work():
    """Validation happens before dispatch: a bad call leaves the default generator untouched."""
    args = with_(value=R(2, 3, 6, 8))
    state = torch.get_rng_state()
    with pytest.raises(ValueError):
        pyattn.scaled_dot_product_attention(**args, dropout_p=0.5)
    torch.testing.assert_close(torch.get_rng_state(), state)
