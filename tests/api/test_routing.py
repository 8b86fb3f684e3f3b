"""pyattn.enable() / disable() / enabled(): torch.nn.functional.scaled_dot_product_attention, called by code that
knows nothing of pyattn, runs pyattn's kernels; calls pyattn cannot take, or made inside torch's sdpa_kernel(...),
stay with torch; disable() gives torch its function back. Eager and torch.compile(fullgraph=True). A grid of
dtypes, shapes, masks, GQA and scale through the routed function matches torch's own, forward and backward.
"""
import functools
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import pyattn
from helpers import TORCH_SDPA, PyattnOps, assert_close_to_oracle, check_fwd_bwd, dtype_id, qkv


@pytest.fixture(autouse=True)
def _torch_function_back():
    yield
    pyattn.disable()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def small_qkv(L=17, S=33, H=2, E=16):
    """-> q (2, H, L, E), k and v (2, H, S, E)"""
    return torch.randn(2, H, L, E), torch.randn(2, H, S, E), torch.randn(2, H, S, E)


def ran_pyattn(fn, *args, **kwargs):
    """-> (fn's result, how many pyattn kernels it ran)."""
    with PyattnOps() as ops:
        out = fn(*args, **kwargs)
    return out, ops.calls


def test_enabled_block_routes_then_restores():
    q, k, v = small_qkv()
    with pyattn.enabled():
        out, calls = ran_pyattn(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    assert calls == 1
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True))
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert ran_pyattn(F.scaled_dot_product_attention, q, k, v)[1] == 0


def test_enable_disable_global_nested_and_other_threads():
    q, k, v = small_qkv()
    pyattn.enable()
    with pyattn.enabled():
        pass
    assert F.scaled_dot_product_attention is not TORCH_SDPA, "a block inside enable() must leave it enabled"
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ran_pyattn(F.scaled_dot_product_attention, q, k, v)[1]))
    thread.start()
    thread.join()
    assert seen == [1]
    pyattn.disable()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_torch_signature():
    """scale and enable_gqa are keyword-only, as in torch; positional attn_mask, dropout_p, is_causal."""
    q, k, v = small_qkv()
    mask = torch.rand(17, 33) > 0.3
    with pyattn.enabled():
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.3, enable_gqa=False)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.3)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, mask, scale=0.3))


def test_sdpa_kernel_restriction_is_respected():
    q, k, v = small_qkv()
    with pyattn.enabled():
        for backend in (SDPBackend.MATH, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            with sdpa_kernel(backend):
                assert ran_pyattn(F.scaled_dot_product_attention, q, k, v)[1] == 0
                assert "stays with torch: torch.nn.attention.sdpa_kernel" in pyattn.explain(q, k, v)
        assert ran_pyattn(F.scaled_dot_product_attention, q, k, v)[1] == 1


@pytest.mark.parametrize("args,kwargs", [
    pytest.param(lambda q, k, v: (q, k, v), dict(attn_mask=torch.rand(17, 33) > 0.3, is_causal=True),
                 id="mask-with-is_causal"),  # torch's CPU kernels take it although its docs say it raises
    pytest.param(lambda q, k, v: (q, k[:, :, :20], v), {}, id="k-v-lengths-differ"),  # so does torch on CPU
    pytest.param(lambda q, k, v: (q, k, v), dict(dropout_p=1.0), id="dropout-1"),
    pytest.param(lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), {}, id="meta-device"),
])
def test_calls_pyattn_cannot_take_go_to_torch(args, kwargs):
    """Whatever torch computes for a call pyattn refuses or has no fused kernel for, the routed call computes."""
    tensors = args(*small_qkv())
    with pyattn.enabled():
        routed, calls = ran_pyattn(F.scaled_dot_product_attention, *tensors, **kwargs)
    assert calls == 0
    torch.manual_seed(0)
    want = TORCH_SDPA(*tensors, **kwargs)
    assert routed.shape == want.shape and routed.device == want.device
    if routed.device.type != "meta":
        torch.testing.assert_close(routed, want)


def test_torch_errors_stay_torch_errors():
    q, k, v = small_qkv()
    with pyattn.enabled(), pytest.raises(RuntimeError, match="same dtype"):  # torch's own message
        F.scaled_dot_product_attention(q, k, v.double())


def test_nested_tensors_go_to_torch():
    seqs = [torch.randn(2, n, 16) for n in (5, 9)]  # (H, L_i, E) each
    q = torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)
    with pyattn.enabled():
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.is_nested


def test_explain_says_where_a_routed_call_goes():
    q, k, v = small_qkv()
    assert "pyattn.enable() (off now): runs pyattn's 'cpu' backend" in pyattn.explain(q, k, v)
    with pyattn.enabled():
        assert "(on now)" in pyattn.explain(q, k, v)
    assert "stays with torch: no fused pyattn backend" in pyattn.explain(q, k, v, dropout_p=1.0)


@pytest.mark.filterwarnings("ignore:Lower right causal bias")
def test_causal_bias_through_torch_function():
    q, k, v = (x.requires_grad_() for x in small_qkv(L=33, S=17))
    bias = causal_lower_right(33, 17)
    with pyattn.enabled():
        out, calls = ran_pyattn(F.scaled_dot_product_attention, q, k, v, attn_mask=bias)
    assert calls == 1
    want = TORCH_SDPA(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v)))


def test_multihead_attention_and_transformer_slow_paths():
    """torch's own modules call F.scaled_dot_product_attention: their results, forward and backward, with pyattn's
    kernels running (training mode: the slow path)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True = may not attend, as the padding mask

    def run(module, x, **kw):
        return module(x, **kw)

    def mha(x):
        return layer.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    for fn in (lambda x: run(layer, x, src_key_padding_mask=pad, src_mask=causal, is_causal=True), mha):
        with pyattn.enabled():
            got, calls = ran_pyattn(fn, x.requires_grad_())
        assert calls >= 1
        want = fn(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x))


def test_compiled_fullgraph_follows_enable_and_disable():
    """A compiled model calling torch's function: pyattn's op in the graph while enabled, torch's after disable()
    (dynamo guards the name), same values as eager, forward and backward."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def model(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend=record)
    q, k, v = (x.requires_grad_() for x in small_qkv())
    mask = torch.randn(2, 1, 17, 33)
    with pyattn.enabled():
        got = compiled(q, k, v, mask)
    assert "torch.ops.pyattn" in graphs[-1] and "scaled_dot_product_attention" not in graphs[-1]
    want = model(q, k, v, mask)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v)))
    compiled(q, k, v, mask)
    assert "torch.ops.pyattn" not in graphs[-1] and "scaled_dot_product_attention" in graphs[-1]
    bias = causal_lower_right(17, 33)
    with pyattn.enabled():
        got = compiled(q, k, v, bias)
    assert "torch.ops.pyattn" in graphs[-1]
    torch.testing.assert_close(got, model(q, k, v, bias))


def test_sdpa_kernel_inside_compiled_function():
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def model(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    with pyattn.enabled():
        torch.compile(model, fullgraph=True, backend=record)(*small_qkv())
    assert "torch.ops.pyattn" not in graphs[-1]


def test_autocast():
    """Under torch.autocast the routed call runs in the autocast dtype, as torch's does."""
    q, k, v = small_qkv()
    with pyattn.enabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, calls = ran_pyattn(F.scaled_dot_product_attention, q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = TORCH_SDPA(q, k, v)
    assert calls == 1 and out.dtype == want.dtype == torch.bfloat16
    oracle = TORCH_SDPA(q.double(), k.double(), v.double())
    assert_close_to_oracle("out", out, want, oracle, torch.bfloat16)



def test_autocast_leaves_float64_alone():
    """torch's autocast casts float32 only: float64 attention stays float64, direct or routed."""
    q, k, v = (t.double() for t in small_qkv())
    want = TORCH_SDPA(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = pyattn.scaled_dot_product_attention(q, k, v)
        with pyattn.enabled():
            routed, _ = ran_pyattn(F.scaled_dot_product_attention, q, k, v)
    for out in (direct, routed):
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, want)

def test_dropout_is_pyattns_with_torch_seed():
    """Routed dropout draws its seed from torch's generator: torch.manual_seed reproduces a call."""
    q, k, v = small_qkv()
    with pyattn.enabled():
        outs = []
        for _ in range(2):
            torch.manual_seed(3)
            outs.append(ran_pyattn(F.scaled_dot_product_attention, q, k, v, dropout_p=0.3))
    assert outs[0][1] == 1 and torch.equal(outs[0][0], outs[1][0])


# ---------------------------------------------------------------------------------------------------------
# torch's function, routed by pyattn.enabled(), over a grid

def _bool_mask(*shape):
    return lambda: torch.rand(shape) > 0.3


GRID = [  # (id, q, k, v shapes, extra tensors, keyword arguments)
    ("4d-L<S", ((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 24)), {}, {}),
    ("3d-L>S", ((3, 33, 16), (3, 17, 16), (3, 17, 16)), {}, {}),
    ("5d-batch-broadcast", ((2, 2, 3, 9, 16), (1, 2, 1, 17, 16), (2, 1, 3, 17, 16)), {}, {}),
    ("causal", ((2, 2, 17, 32), (2, 2, 33, 32), (2, 2, 33, 32)), {}, {"is_causal": True}),
    ("bool-mask-broadcast", ((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 16)), {"attn_mask": _bool_mask(17, 33)}, {}),
    ("float-mask-grad", ((2, 3, 17, 16), (2, 3, 33, 16), (2, 3, 33, 16)),
     {"attn_mask": lambda: torch.randn(2, 1, 17, 33)}, {}),
    ("gqa", ((2, 6, 17, 16), (2, 2, 33, 16), (2, 2, 33, 16)), {}, {"enable_gqa": True}),
    ("scale", ((1, 2, 33, 16), (1, 2, 17, 16), (1, 2, 17, 16)), {}, {"scale": 0.3}),
    ("causal-upper-left", ((1, 2, 17, 16), (1, 2, 33, 16), (1, 2, 33, 16)), {}, {"bias": causal_upper_left}),
    ("causal-lower-right", ((1, 2, 17, 16), (1, 2, 33, 16), (1, 2, 33, 16)), {}, {"bias": causal_lower_right}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shapes,extra,kwargs", [pytest.param(*c[1:], id=c[0]) for c in GRID])
def test_routed_torch_function(shapes, extra, kwargs, dtype):
    """F.scaled_dot_product_attention under pyattn.enabled() runs pyattn's kernel and matches torch's own, forward
    and backward (grads of q, k, v and a float mask)."""
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    L_, S_ = shapes[0][-2], shapes[1][-2]
    t = dict(qkv(*shapes), **{name: make() for name, make in extra.items()})

    def call(sdpa, q, k, v, attn_mask=None):
        return sdpa(q, k, v, attn_mask=bias(L_, S_) if bias else attn_mask, **kwargs)

    ops = PyattnOps()

    def routed(q, k, v, attn_mask=None):
        mask = bias(L_, S_) if bias else attn_mask  # a CausalBias cannot be made inside a dispatch mode
        with pyattn.enabled(), ops:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    grads = ("q", "k", "v", "attn_mask") if "attn_mask" in t and t["attn_mask"].is_floating_point() else ("q", "k", "v")
    torch_fn = functools.partial(call, TORCH_SDPA)
    check_fwd_bwd(routed, torch_fn, torch_fn, t, dtype, grads, out_names=("out",))
    assert ops.calls >= 1, "pyattn's kernel did not run"
    assert F.scaled_dot_product_attention is TORCH_SDPA
