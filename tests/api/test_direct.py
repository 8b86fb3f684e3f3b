"""The direct lane of scaled_dot_product_attention (csrc/direct.h): a call it takes returns exactly what the full path
returns, and every call it must not take (one that would raise, needs autograd, autocast, a mode, a transform, a
subclass, or anything beyond its plain arguments) is declined, so the full path's checks and words stay the contract.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyattn
from pyattn import functional
from helpers import dtype_id, qkv, sample_inputs

direct = functional._DIRECT
pytestmark = pytest.mark.skipif(direct is None, reason="pyattn._C is not built")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def lane(q, k, v, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window_size=None,
         causal_alignment="top_left"):
    return direct(q, k, v, dropout_p, is_causal, scale, enable_gqa, window_size, causal_alignment)


def full(q, k, v, **kw):
    """The full path: a named backend never takes the direct lane."""
    return pyattn.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)


@pytest.mark.parametrize("case,dtype", sample_inputs(dtypes=DTYPES, which=("torch", "extras")))
def test_taken_or_declined_never_different(case, dtype):
    """Every sample case: the lane's output is the full path's, bit for bit, or it declines; the plain ones (4-D, no
    mask, no extras it does not carry) it takes."""
    t = {name: x.to(dtype) if x.is_floating_point() else x for name, x in case.make().items()}
    opts = case.opts
    carried = {"is_causal", "scale", "enable_gqa", "window_size", "causal_alignment"}
    carries_all = not set(t) - {"q", "k", "v"} and not set(opts) - carried
    heads_ok = case.q[-3] == case.k[-3] or opts.get("enable_gqa", False)
    plain = carries_all and len(case.q) == 4 and case.q[0] == case.k[0] and heads_ok
    got = lane(t["q"], t["k"], t["v"], **{k: v for k, v in opts.items() if k in carried}) if carries_all else None
    if got is None:
        assert not plain, f"{case.id}: a plain call was declined"
        return
    want = full(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"), **opts)
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)


@pytest.mark.parametrize("window_size,is_causal,alignment", [
    ((8, 4), False, "top_left"), ((-1, 0), False, "bottom_right"), ((16, 2), True, "bottom_right"),
    (None, True, "bottom_right"), ((0, -1), False, "top_left")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_windows_and_alignment(window_size, is_causal, alignment, dtype):
    t = {n: x.to(dtype) for n, x in qkv((2, 4, 7, 32), (2, 2, 40, 32), (2, 2, 40, 16)).items()}
    kw = dict(is_causal=is_causal, enable_gqa=True, window_size=window_size, causal_alignment=alignment, scale=0.2)
    got = lane(t["q"], t["k"], t["v"], **kw)
    assert got is not None
    assert torch.equal(got, full(t["q"], t["k"], t["v"], **kw))


def test_public_function_takes_it(monkeypatch):
    """The public function asks the lane for a plain call, and not for one with anything the lane does not carry."""
    calls = []
    monkeypatch.setattr(functional, "_DIRECT", lambda *a: calls.append(a) or direct(*a))
    t = qkv((1, 8, 16, 64), (1, 8, 16, 64), (1, 8, 16, 64))
    pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"])
    assert len(calls) == 1
    for kw in (dict(backend="cpu"), dict(return_lse=True), dict(softcap=5.0), dict(sinks=torch.zeros(8)),
               dict(alibi_slopes=torch.ones(8)), dict(attn_mask=torch.ones(16, 16, dtype=torch.bool))):
        pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], **kw)
    assert len(calls) == 1
    with PassThrough():
        pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"])
    assert len(calls) == 1


class PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def declines(**changes):
    """A plain fp32 call with changes applied (tensors replaced, or arguments changed) -> whether the lane declines."""
    t = qkv((1, 4, 9, 16), (1, 4, 12, 16), (1, 4, 12, 8))
    args = dict(dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window_size=None,
                causal_alignment="top_left")
    t.update({k: v for k, v in changes.items() if k in t})
    args.update({k: v for k, v in changes.items() if k not in t})
    return lane(t["q"], t["k"], t["v"], **args) is None


BAD = {
    # what the full path refuses: the lane must leave it to the full path's words
    "q-3d": dict(q=torch.randn(4, 9, 16)),
    "k-head-dim": dict(k=torch.randn(1, 4, 12, 8)),
    "v-length": dict(v=torch.randn(1, 4, 11, 8)),
    "kv-heads-no-gqa": dict(k=torch.randn(1, 2, 12, 16), v=torch.randn(1, 2, 12, 8)),
    "gqa-not-dividing": dict(k=torch.randn(1, 3, 12, 16), v=torch.randn(1, 3, 12, 8), enable_gqa=True),
    "k-v-heads-differ": dict(v=torch.randn(1, 2, 12, 8), enable_gqa=True),
    "dtype-mix": dict(k=torch.randn(1, 4, 12, 16, dtype=torch.float64)),
    "int-dtype": dict(q=torch.ones(1, 4, 9, 16, dtype=torch.int32)),
    "complex": dict(q=torch.randn(1, 4, 9, 16, dtype=torch.complex64)),
    "batch-broadcast": dict(k=torch.randn(2, 4, 12, 16), v=torch.randn(2, 4, 12, 8)),
    "meta": dict(q=torch.randn(1, 4, 9, 16, device="meta")),
    "not-a-tensor": dict(q=[[1.0]]),
    "is_causal-int": dict(is_causal=1),
    "enable_gqa-none": dict(enable_gqa=None),
    "dropout-str": dict(dropout_p="0"),
    "dropout-bool": dict(dropout_p=False),
    "scale-str": dict(scale="0.5"),
    "scale-bool": dict(scale=True),
    "window-short": dict(window_size=(4,)),
    "window-below-1": dict(window_size=(-2, 0)),
    "window-float": dict(window_size=(4.0, 0)),
    "alignment-unknown": dict(causal_alignment="middle"),
    # valid, but not the lane's to take
    "dropout": dict(dropout_p=0.1),
    "scale-tensor": dict(scale=torch.tensor(0.5)),
    "window-list": dict(window_size=[4, 0]),
    "empty": dict(q=torch.randn(1, 4, 0, 16)),
    "subclass": dict(q=torch.randn(1, 4, 9, 16).as_subclass(Subclass)),
    "nested": dict(q=torch.nested.nested_tensor([torch.randn(4, 9, 16)])),
    "conj": dict(q=torch.randn(1, 4, 9, 16, dtype=torch.complex64).conj()),
    "sparse": dict(q=torch.randn(1, 4, 9, 16).to_sparse()),
}


@pytest.mark.parametrize("name", BAD)
def test_declines(name):
    assert declines(**BAD[name])


def test_declines_what_autograd_autocast_modes_and_transforms_watch():
    q = torch.randn(1, 4, 9, 16)
    assert not declines()
    assert declines(q=q.clone().requires_grad_())
    with torch.no_grad():
        assert not declines(q=q.clone().requires_grad_())  # no graph to record: taken
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert declines()
    recorder = Recorder()
    with recorder:
        assert declines()
    k, v = torch.randn(1, 4, 12, 16), torch.randn(1, 4, 12, 8)
    seen = []
    torch.func.vmap(lambda x: seen.append(lane(x, k, v) is None) or x)(q[None])
    assert seen == [True]


def test_modes_still_see_the_op_of_a_declined_call():
    """A dispatch mode sees pyattn's op: the lane steps aside for it."""
    t = qkv((1, 4, 9, 16), (1, 4, 12, 16), (1, 4, 12, 8))
    recorder = Recorder()
    with recorder:
        pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"])
    assert any("pyattn" in op for op in recorder.ops)
