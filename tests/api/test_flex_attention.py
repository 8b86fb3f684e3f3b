"""pyattn.flex_attention against torch's own flex_attention (eager, on the CPU) and its float64 math.

A BlockMask means what torch's compiled kernel does with it: only listed blocks are visited, full blocks need no
mask_mod, partial blocks apply mask_mod at the call's real (b, h). torch's eager flex_attention ignores the block
structure (it applies mask_mod everywhere), so torch runs each case on the same attention written as an element mask
(compiled_mask): the two agree wherever the block structure says nothing mask_mod does not, and pyattn's block
structure is checked where they differ (random block sparsity, a BlockMask made for B = 1 whose mask_mod reads b).
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
from torch.nn.attention.flex_attention import (AuxOutput, AuxRequest, BlockMask, _apply_kernel_options,
                                               create_block_mask, create_mask)
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import pyattn
from helpers import assert_close_to_oracle, backend_params
from pyattn import backends, block_mask as block_masks, features, score_mods
from pyattn.inputs import flex_inputs

pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated")]


# -- block masks, each built for a call of (B, Hq, L, S) ---------------------------------------------------------------

def _documents(B, n, seed=0):
    """(B, n) int64 document ids of packed sequences: ascending, documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, n), generator=g).sort(-1).values


def document_mask(mask_batch):
    """Packed documents, causal inside each; mask_batch 1 makes a BlockMask of B = 1 for a mask_mod that reads b."""
    def build(B, Hq, L, S):
        docs = _documents(B, max(L, S))

        def mask_mod(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)
        return create_block_mask(mask_mod, mask_batch or B, 1, L, S, device="cpu", BLOCK_SIZE=16)
    return build


def prefix_lm(B, Hq, L, S):
    return create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx < 20) | (q_idx >= kv_idx), 1, 1, L, S,
                             device="cpu", BLOCK_SIZE=16)


def window_with_sinks(B, Hq, L, S):
    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx <= 24) & (q_idx >= kv_idx)) | (kv_idx < 4)
    return create_block_mask(mask_mod, 1, 1, L, S, device="cpu", BLOCK_SIZE=16)


def head_window(B, Hq, L, S):
    """A window that widens with the head: mask_mod reads h, the BlockMask is made for H = 1 at head 0."""
    return create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 8 * (h + 1), 1, 1, L, S,
                             device="cpu", BLOCK_SIZE=16)


def causal(block_size):
    def build(B, Hq, L, S):
        return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, L, S, device="cpu",
                                 BLOCK_SIZE=block_size)
    return build


def stacked_causal(B, Hq, L, S):
    """A mask_mod written for scalars (torch.stack needs one shape): pyattn evaluates it under vmap."""
    def mask_mod(b, h, q_idx, kv_idx):
        pair = torch.stack([q_idx, kv_idx])
        return pair[0] >= pair[1]
    return create_block_mask(mask_mod, 1, 1, L, S, device="cpu", BLOCK_SIZE=16)


def _ordered(dense):
    """(..., rows, cols) bool blocks -> kv_num_blocks, kv_indices as BlockMask.from_kv_blocks takes them."""
    order = torch.sort(dense.to(torch.int32), dim=-1, descending=True, stable=True).indices
    return dense.sum(-1).to(torch.int32), order.to(torch.int32)


def random_blocks(density, block=16):
    """BlockMask.from_kv_blocks: a random density of the blocks listed, a third of them full, the rest partial under a
    mask_mod that keeps two keys in three."""
    def build(B, Hq, L, S):
        g = torch.Generator().manual_seed(int(density * 100))
        listed = torch.rand(B, Hq, math.ceil(L / block), math.ceil(S / block), generator=g) < density
        full = listed & (torch.rand(listed.shape, generator=g) < 1 / 3)
        return BlockMask.from_kv_blocks(*_ordered(listed & ~full), *_ordered(full), BLOCK_SIZE=block,
                                        mask_mod=lambda b, h, q_idx, kv_idx: (q_idx + kv_idx) % 3 != 0,
                                        seq_lengths=(L, S))
    return build


def sliced_rows(B, Hq, L, S):
    """block_mask[:, :, :rows] of a longer causal mask, its mask_mod and seq_lengths set again as torch's docs ask."""
    base = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 1, 1, 4 * L, S, device="cpu",
                             BLOCK_SIZE=16)
    sliced = base[:, :, :math.ceil(L / 16)]
    sliced.mask_mod, sliced.seq_lengths = base.mask_mod, (L, S)
    return sliced


def adjusted(B, Hq, L, S):
    """A document mask made for longer sequences, cropped by _adjust."""
    return document_mask(None)(B, Hq, L + 40, S + 70)._adjust(L, S)


def compiled_mask(block_mask, B, Hq, L, S):
    """(B, Hq, L, S) bool: what torch's compiled flex_attention lets attend for block_mask (listed blocks only;
    mask_mod at the real b, h in the partial ones)."""
    block_q, block_k = block_mask.BLOCK_SIZE

    def elements(num_blocks, indices):
        blocks = BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=block_mask.BLOCK_SIZE,
                                          seq_lengths=block_mask.seq_lengths).to_dense().bool()
        per_element = blocks.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)
        return per_element[..., :L, :S].expand(B, Hq, L, S)

    partial = elements(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = elements(block_mask.full_kv_num_blocks, block_mask.full_kv_indices) \
        if block_mask.full_kv_num_blocks is not None else torch.zeros_like(partial)
    return full | (partial & create_mask(block_mask.mask_mod, B, Hq, L, S, device="cpu"))


def element_block_mask(allowed):
    """A BlockMask whose mask_mod reads allowed (B, Hq, L, S): the same attention for torch's eager path."""
    B, Hq, L, S = allowed.shape
    return create_block_mask(lambda b, h, q_idx, kv_idx: allowed[b, h, q_idx, kv_idx], B, Hq, L, S, device="cpu")


# -- score_mods ------------------------------------------------------------------------------------------------------

def learnable_bias(Hq, L, S):
    """An arbitrary Python score_mod closing over a learnable tensor (w, one slope a head)."""
    w = torch.linspace(-0.2, 0.3, Hq, dtype=torch.float64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + w[h] * torch.cos((q_idx - kv_idx).to(score.dtype))
    score_mod.tensors = {"w": w}
    return score_mod


FAMILIES = {
    "alibi-H": lambda Hq, L, S: score_mods.alibi(torch.linspace(0.05, 0.5, Hq)),
    "alibi-BH": lambda Hq, L, S: score_mods.alibi(torch.linspace(0.05, 0.5, 2 * Hq).view(2, Hq)),
    "softcap": lambda Hq, L, S: score_mods.softcap(2.0),
    "relative_bias": lambda Hq, L, S: score_mods.relative_bias(torch.randn(Hq, 2 * max(L, S) - 1)),
    "full_bias": lambda Hq, L, S: score_mods.full_bias(torch.randn(Hq, L, S)),
}


@dataclass(frozen=True)
class FlexCase:
    id: str
    q: tuple  # (B, Hq, L, E)
    kv: tuple  # (B, Hkv, S, E)
    block_mask: Optional[Callable] = None  # (B, Hq, L, S) -> BlockMask
    score_mod: Optional[Callable] = None  # (Hq, L, S) -> score_mod
    enable_gqa: bool = False
    return_lse: bool = False

    def make(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(shape, generator=g) for shape in (self.q, self.kv, self.kv))
        B, Hq, L, _ = self.q
        S = self.kv[2]
        block_mask = self.block_mask(B, Hq, L, S) if self.block_mask else None
        score_mod = self.score_mod(Hq, L, S) if self.score_mod else None
        return q, k, v, block_mask, score_mod

    def kwargs(self, block_mask, score_mod):
        return dict(block_mask=block_mask, score_mod=score_mod, enable_gqa=self.enable_gqa, return_lse=self.return_lse)


CASES = [
    FlexCase("document-B2-L96", (2, 2, 96, 16), (2, 2, 96, 16), document_mask(None), return_lse=True),
    FlexCase("document-maskB1-reads-b", (2, 2, 80, 16), (2, 2, 80, 16), document_mask(1)),
    FlexCase("prefix-lm", (1, 2, 90, 16), (1, 2, 90, 16), prefix_lm, return_lse=True),
    FlexCase("window-sinks", (1, 2, 100, 16), (1, 2, 100, 16), window_with_sinks),
    FlexCase("head-window-maskH1-reads-h", (1, 3, 64, 16), (1, 3, 64, 16), head_window),
    FlexCase("random-blocks-10pct", (1, 2, 160, 16), (1, 2, 160, 16), random_blocks(0.1), return_lse=True),
    FlexCase("random-blocks-50pct", (1, 2, 160, 16), (1, 2, 144, 16), random_blocks(0.5)),
    FlexCase("random-blocks-90pct", (2, 1, 96, 16), (2, 1, 96, 16), random_blocks(0.9)),
    FlexCase("causal-L100-S197", (1, 2, 100, 16), (1, 2, 197, 16), causal(32), return_lse=True),
    FlexCase("causal-L197-S100", (1, 2, 197, 16), (1, 2, 100, 16), causal(32)),
    FlexCase("causal-block64x128", (1, 1, 200, 16), (1, 1, 300, 16), causal((64, 128))),
    FlexCase("causal-block16x16", (1, 2, 70, 16), (1, 2, 70, 16), causal((16, 16))),
    FlexCase("scalar-mask_mod-vmap", (1, 2, 48, 16), (1, 2, 48, 16), stacked_causal),
    FlexCase("sliced-rows", (1, 2, 40, 16), (1, 2, 160, 16), sliced_rows),
    FlexCase("adjusted", (1, 2, 60, 16), (1, 2, 50, 16), adjusted),
    FlexCase("gqa-group3-document", (2, 6, 64, 16), (2, 2, 64, 16), document_mask(None), enable_gqa=True,
             return_lse=True),
    FlexCase("kv-batch1-broadcast", (2, 2, 48, 16), (1, 2, 48, 16), document_mask(None)),
    FlexCase("score_mod-closure", (1, 2, 40, 16), (1, 2, 56, 16), causal(16), learnable_bias, return_lse=True),
    FlexCase("score_mod-closure-no-mask", (2, 2, 33, 16), (2, 2, 21, 16), None, learnable_bias),
    *[FlexCase(f"{name}-document", (2, 2, 48, 16), (2, 2, 48, 16), document_mask(None), family, return_lse=True)
      for name, family in FAMILIES.items()],
]


def sample_inputs(cases=CASES):
    return [pytest.param(case, id=case.id) for case in cases]


def torch_flex(q, k, v, case, block_mask, score_mod):
    """torch's eager flex_attention on the attention block_mask means (compiled_mask), without gradients."""
    B, Hq, L, _ = q.shape
    explicit = element_block_mask(compiled_mask(block_mask, B, Hq, L, k.shape[2])) if block_mask else None
    with torch.no_grad():
        return torch_flex_attention(q, k, v, **case.kwargs(explicit, score_mod))


def as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def skip_unless_declared(backend, inp):
    """Fused backends take block masks once they declare it; until then their refusal is the skip reason."""
    if backend != "reference" and features.BLOCK_MASK in inp.uses() \
            and features.BLOCK_MASK not in backends.BACKENDS[backend].features:
        pytest.skip("; ".join(backends.BACKENDS[backend].not_supported_reasons(inp)))


# the Triton interpreter is slow: two cases there
TRITON_CASES = {"document-B2-L96", "random-blocks-50pct"}


@pytest.mark.parametrize("backend,device", backend_params(["reference", "cpu", "triton"], lower_capabilities=False))
@pytest.mark.parametrize("case", sample_inputs())
def test_forward_matches_torch_flex_attention(case, backend, device):
    if backend == "triton" and case.id not in TRITON_CASES:
        pytest.skip("the Triton interpreter runs a few cases only")
    q, k, v, block_mask, score_mod = case.make()
    inp = flex_inputs(q, k, v, score_mod, block_mask, enable_gqa=case.enable_gqa)
    skip_unless_declared(backend, inp)
    if backend != "reference" and features.SCORE_MOD in inp.uses():
        pytest.skip("an arbitrary score_mod runs on the reference backend")
    ours = as_list(pyattn.flex_attention(q, k, v, backend=backend, **case.kwargs(block_mask, score_mod)))
    baseline = as_list(torch_flex(q, k, v, case, block_mask, score_mod))
    oracle = as_list(torch_flex(q.double(), k.double(), v.double(), case, block_mask, score_mod))
    for name, y, b, o in zip(("out", "lse"), ours, baseline, oracle):
        assert y.dtype == torch.float32
        assert_close_to_oracle(name, y, b, o, torch.float32)


def _hop(q, k, v, block_mask, score_mod, scale):
    """torch's eager flex_attention with autograd (the higher-order op its eager path runs; torch's public function
    refuses gradients on the CPU): -> out."""
    options = _apply_kernel_options(q, k, v, False, None)
    score_mod = score_mod or (lambda score, b, h, q_idx, kv_idx: score)
    return flex_attention_hop(q, k, v, score_mod, block_mask.as_tuple(), scale, options)[0]


GRAD_CASES = [c for c in CASES if c.score_mod is None or c.score_mod in FAMILIES.values()]


@pytest.mark.parametrize("case", sample_inputs(GRAD_CASES[::2]))
def test_gradients_match_torch_flex_autograd(case):
    q, k, v, block_mask, score_mod = case.make()
    B, Hq, L, _ = q.shape
    S, E = k.shape[2], q.shape[3]
    explicit = element_block_mask(compiled_mask(block_mask, B, Hq, L, S)) if block_mask \
        else create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, 1, 1, L, S, device="cpu")
    dout = torch.randn(B, Hq, L, k.shape[3])

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, dout.to(dtype))

    def ours(*qkv):
        return pyattn.flex_attention(*qkv, block_mask=block_mask, score_mod=score_mod, enable_gqa=case.enable_gqa)

    def theirs(*qkv):
        return _hop(*qkv, explicit, score_mod, 1 / math.sqrt(E))

    for name, y, b, o in zip("qkv", grads(ours, torch.float32), grads(theirs, torch.float32),
                             grads(theirs, torch.float64)):
        assert_close_to_oracle(f"grad of {name}", y, b, o, torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_score_mod_family_is_fused(family):
    """A pyattn.score_mods callable runs on a fused backend (not the reference), with torch's result for the same
    callable in torch's flex_attention."""
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    score_mod = FAMILIES[family](2, 40, 40)
    inp = flex_inputs(q, k, v, score_mod)
    assert features.SCORE_MOD not in inp.uses()
    assert backends.choose(inp).name == "cpu"
    ours = pyattn.flex_attention(q, k, v, score_mod=score_mod)
    with torch.no_grad():
        baseline = torch_flex_attention(q, k, v, score_mod=score_mod)
        oracle = torch_flex_attention(q.double(), k.double(), v.double(), score_mod=score_mod)
    assert_close_to_oracle("out", ours, baseline, oracle, torch.float32)


def test_alibi_slopes_that_need_a_gradient_run_as_a_python_score_mod():
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([0.1, 0.4], dtype=torch.float64, requires_grad=True)
    inp = flex_inputs(q, k, v, score_mods.alibi(slopes))
    assert features.SCORE_MOD in inp.uses() and backends.choose(inp).name == "reference"
    assert torch.autograd.gradcheck(lambda s: pyattn.flex_attention(q, k, v, score_mod=score_mods.alibi(s)), (slopes,))


@pytest.mark.parametrize("family", ["relative_bias", "full_bias", "closure"])
def test_gradcheck_reaches_the_tensor_a_score_mod_closes_over(family):
    """float64 gradcheck in the score_mod's tensor: a fused bias table through the float mask's gradient (the CPU
    kernel's; its q, k, v gradients are checked against torch above), an arbitrary closure through the reference's
    autograd (in q, k and v too)."""
    Hq, L, S = 2, 5, 6
    table = {"relative_bias": torch.randn(Hq, 2 * S - 1), "full_bias": torch.randn(Hq, L, S),
             "closure": torch.randn(Hq)}[family].double().requires_grad_()
    qkv = [torch.randn(1, Hq, n, 4, dtype=torch.float64, requires_grad=True) for n in (L, S, S)]
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx + 1 >= kv_idx), 1, 1, L, S, device="cpu",
                                   BLOCK_SIZE=2)

    def fn(table, *qkv):
        if family == "closure":
            def score_mod(score, b, h, q_idx, kv_idx):
                return score * table[h]
        else:
            score_mod = getattr(score_mods, family)(table)
        mask = block_mask if family == "closure" else None
        return pyattn.flex_attention(*qkv, score_mod=score_mod, block_mask=mask)

    if family == "closure":
        assert torch.autograd.gradcheck(fn, (table, *qkv))
    else:
        assert torch.autograd.gradcheck(lambda table: fn(table, *(t.detach() for t in qkv)), (table,))


def test_return_lse_and_return_aux():
    q, k, v, block_mask, _ = CASES[0].make()
    out, lse = pyattn.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    aux_out, aux = pyattn.flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
    assert isinstance(aux, AuxOutput) and aux.max_scores is None
    torch.testing.assert_close(aux_out, out, rtol=0, atol=0)
    torch.testing.assert_close(aux.lse, lse, rtol=0, atol=0)
    _, none = pyattn.flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest())
    assert none.lse is None
    with pytest.raises(pyattn.AttentionInputError, match="max scores"):
        pyattn.flex_attention(q, k, v, return_aux=AuxRequest(lse=True, max_scores=True))


def test_rows_with_no_key_give_zero_and_minus_inf():
    q, k, v = (torch.randn(1, 1, 32, 8) for _ in range(3))
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx < 16) & (q_idx >= kv_idx), 1, 1, 32, 32,
                                   device="cpu", BLOCK_SIZE=16)
    out, lse = pyattn.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    assert torch.equal(out[..., 16:, :], torch.zeros(1, 1, 16, 8))
    assert bool((lse[..., 16:] == float("-inf")).all()) and bool(lse[..., :16].isfinite().all())


def test_kernel_options_take_tuning_hints_and_refuse_the_rest():
    q, k, v, block_mask, _ = CASES[0].make()
    plain = pyattn.flex_attention(q, k, v, block_mask=block_mask)
    hinted = pyattn.flex_attention(q, k, v, block_mask=block_mask, kernel_options={
        "BLOCK_M": 64, "fwd_num_warps": 4, "bwd_BLOCK_M1": 32, "ROWS_GUARANTEED_SAFE": True, "BACKEND": "AUTO"})
    assert torch.equal(plain, hinted)
    for options in ({"BACKEND": "FLASH"}, {"OUTPUT_LOGSUMEXP": True}, {"SOMETHING_NEW": 1}):
        with pytest.raises(pyattn.AttentionInputError, match="kernel_options"):
            pyattn.flex_attention(q, k, v, block_mask=block_mask, kernel_options=options)


def test_sdpa_takes_a_block_mask_as_attn_mask():
    q, k, v, block_mask, _ = CASES[0].make()
    torch.testing.assert_close(pyattn.scaled_dot_product_attention(q, k, v, attn_mask=block_mask),
                               pyattn.flex_attention(q, k, v, block_mask=block_mask), rtol=0, atol=0)
    with pytest.raises(pyattn.AttentionInputError, match="BlockMask of shape .* and is_causal=True"):
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=block_mask, is_causal=True)


def _torch_error(fn):
    with pytest.raises((RuntimeError, ValueError, NotImplementedError, AssertionError)) as error:
        fn()
    return str(error.value)


def _bad_calls():
    """id -> (q, k, v, flex_attention keyword arguments) that torch's flex_attention refuses."""
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    causal32 = causal(16)(1, 2, 32, 32)
    return {
        "query-3d": (q[0], k[0], k[0], {}),
        "heads-differ-without-gqa": (q, k[:, :1], k[:, :1], {}),
        "gqa-heads-do-not-divide": (torch.randn(1, 3, 32, 8), k, k, {"enable_gqa": True}),
        "embed-dims-differ": (q, torch.randn(1, 2, 32, 4), k, {}),
        "block_mask-for-longer-sequences": (q[:, :, :16], k, k, {"block_mask": causal32}),
        "block_mask-for-shorter-sequences": (torch.randn(1, 2, 48, 8), k, k, {"block_mask": causal32}),
        "sliced-block_mask-mask_mod": (q, k, k, {"block_mask": causal32[:, :1]}),
        "return_lse-and-return_aux": (q, k, k, {"return_lse": True, "return_aux": AuxRequest(lse=True)}),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_refusals_start_with_torch_words(name):
    q, k, v, kwargs = _bad_calls()[name]
    words = _torch_error(lambda: torch_flex_attention(q, k, v, **kwargs))
    with pytest.raises(pyattn.AttentionInputError) as ours:
        pyattn.flex_attention(q, k, v, **kwargs)
    assert isinstance(ours.value, RuntimeError)
    assert str(ours.value).startswith(words), (str(ours.value), words)


def test_conversion_is_cached_per_block_mask_and_call():
    calls = []

    def mask_mod(b, h, q_idx, kv_idx):
        calls.append(q_idx.shape)
        return q_idx >= kv_idx
    block_mask = create_block_mask(mask_mod, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
    q = torch.randn(2, 2, 64, 8)
    calls.clear()
    first = pyattn.flex_attention(q, q, q, block_mask=block_mask)
    evaluated = len(calls)
    assert 1 <= evaluated <= 2  # the dependence probe and one chunk holding all 4 partial (diagonal) blocks
    assert calls[-1] == (4, 16, 1)
    second = pyattn.flex_attention(q, q, q, block_mask=block_mask)
    assert len(calls) == evaluated and torch.equal(first, second)
    pyattn.flex_attention(q[:1], q[:1], q[:1], block_mask=block_mask)  # another batch: converted again
    assert len(calls) > evaluated


@pytest.mark.parametrize("build,expected", [
    (causal(16), (1, 1)), (document_mask(1), (2, 1)), (head_window, (1, 3)), (document_mask(None), (2, 1))],
    ids=["causal-broadcast", "reads-b-expanded", "reads-h-expanded", "batch-of-the-mask"])
def test_states_expand_only_along_what_mask_mod_reads(build, expected):
    B, Hq, L = 2, 3, 64
    blocks = block_masks.block_sparse(build(B, Hq, L, L), B, Hq, L, L, torch.device("cpu"))
    assert tuple(blocks.states.shape[:2]) == expected
    assert blocks.states.dtype == torch.int32 and blocks.bits.dtype == torch.uint8
    assert tuple(blocks.bits.shape[1:]) == (16, 2)


def test_mask_mod_that_refuses_a_block_of_indices_runs_under_vmap():
    """A mask_mod that takes the dependence probe's few indices but not a block's falls back to vmap, the same bits."""
    def picky(b, h, q_idx, kv_idx):
        if q_idx.numel() > 4:
            raise RuntimeError("written for a few indices at a time")
        return q_idx >= kv_idx
    block_mask = causal(16)(1, 1, 64, 64)
    block_mask.mask_mod = picky
    blocks = block_masks.convert(block_mask, 1, 1, 64, 64, torch.device("cpu"))
    allowed = block_masks.dense(blocks.states, blocks.bits, 16, 16, 1, 1, 64, 64)
    assert torch.equal(allowed[0, 0], torch.ones(64, 64, dtype=torch.bool).tril())


def test_conversion_memory_is_blocks_plus_partial_bits():
    """N = 65536, 128 x 128 blocks, 90% of them empty: the converted tensors take (N / 128)^2 int32 states and one bit
    per (query, key) of the partial blocks, never N^2 of anything."""
    N, block = 65536, 128
    blocks = N // block
    g = torch.Generator().manual_seed(0)
    listed = torch.rand(1, 1, blocks, blocks, generator=g) < 0.1
    full = listed & (torch.rand(listed.shape, generator=g) < 0.9)
    block_mask = BlockMask.from_kv_blocks(*_ordered(listed & ~full), *_ordered(full), BLOCK_SIZE=block,
                                          mask_mod=lambda b, h, q_idx, kv_idx: (q_idx ^ kv_idx) & 1 == 0,
                                          seq_lengths=(N, N))
    converted = block_masks.block_sparse(block_mask, 1, 1, N, N, torch.device("cpu"))
    partial = int((listed & ~full).sum())
    assert converted.states.numel() * converted.states.element_size() == blocks * blocks * 4
    assert converted.bits.numel() * converted.bits.element_size() == partial * block * block // 8
    assert int((converted.states == block_masks.FULL).sum()) == int(full.sum())


def test_op_arguments_take_the_block_part_by_name():
    """The fused ops get block_states, block_bits, block_q and block_k from the record by name (op_args.pick), as
    every other argument (csrc/ops.cpp has them)."""
    from pyattn import op_args
    q, k, v, block_mask, _ = CASES[0].make()
    inp = flex_inputs(q, k, v, block_mask=block_mask)
    args = op_args.pick(op_args.FwdArgs, inp, rng_state=None)
    blocks = block_masks.block_sparse(block_mask, *q.shape[:3], k.shape[2], q.device)
    assert args.block_states is blocks.states and args.block_bits is blocks.bits
    assert (args.block_q, args.block_k) == (16, 16)


def test_fused_score_mod_compiles_whole():
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    score_mod = score_mods.alibi(torch.tensor([0.1, 0.3]))
    compiled = torch.compile(lambda q, k, v: pyattn.flex_attention(q, k, v, score_mod=score_mod, return_lse=True),
                             fullgraph=True)
    for ours, eager in zip(compiled(q, k, v), pyattn.flex_attention(q, k, v, score_mod=score_mod, return_lse=True)):
        torch.testing.assert_close(ours, eager)
