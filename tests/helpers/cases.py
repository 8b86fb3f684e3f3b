"""The case catalogue: one list of readable cases (CASES, sample_inputs), reused by correctness, gradient and
opcheck tests, and the op-level arguments built from a case (attn_inputs, fwd_args)."""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.inputs import dense_inputs, varlen_inputs
from pyattn.op_args import FwdArgs, pick

from .tolerance import dtype_id

# sample_inputs: one list of readable cases, reused by correctness, gradient and opcheck tests.

@dataclass(frozen=True)
class Case:
    id: str
    q: tuple  # dense (..., L, E); varlen (total_q, Hq, E)
    k: tuple
    v: tuple
    mask: Optional[tuple] = None  # mask shape
    mask_dtype: Optional[str] = None  # "bool" or "float"
    mask_grad: bool = False
    alibi: Optional[tuple] = None  # slopes shape: (H,) or (B, H)
    seqlens: Optional[tuple] = None  # varlen: ((lens_q...), (lens_k...))
    kwargs: tuple = ()  # (name, value) pairs: is_causal, scale, enable_gqa, window_size, softcap, ...

    @property
    def opts(self):
        return dict(self.kwargs)

    @property
    def varlen(self):
        return self.seqlens is not None

    @property
    def torch_ok(self):
        """torch.nn.functional.scaled_dot_product_attention takes it."""
        extras = {"window_size", "softcap", "causal_alignment", "return_lse"}
        return not self.varlen and self.alibi is None and not extras & set(self.opts)

    @property
    def grad_names(self):
        return ("q", "k", "v", "attn_mask") if self.mask_grad else ("q", "k", "v")

    def make(self, device="cpu", seed=0):
        """Float32 values (cast per dtype later) and int/bool side inputs."""
        g = torch.Generator().manual_seed(seed)
        t = {name: torch.randn(shape, generator=g).to(device) for name, shape in
             (("q", self.q), ("k", self.k), ("v", self.v))}
        if self.mask is not None:
            if self.mask_dtype == "bool":
                t["attn_mask"] = (torch.rand(self.mask, generator=g) > 0.25).to(device)
            else:
                t["attn_mask"] = torch.randn(self.mask, generator=g).to(device)
        if self.alibi is not None:
            t["alibi_slopes"] = (torch.rand(self.alibi, generator=g) * 0.5 + 0.05).to(device)
        if self.varlen:
            for name, lens in zip(("cu_seqlens_q", "cu_seqlens_k"), self.seqlens):
                t[name] = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
        return t

    def call(self, backend, **t):
        """Runs the case: backend "torch" is torch's F.sdpa; else pyattn with that backend."""
        opts = self.opts
        if backend == "torch":
            assert self.torch_ok, self.id
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"), **opts)
        if self.varlen:
            lq, lk = self.seqlens
            return pyattn.varlen_attention(t["q"], t["k"], t["v"], t["cu_seqlens_q"], t["cu_seqlens_k"],
                                           max(lq, default=0), max(lk, default=0),
                                           alibi_slopes=t.get("alibi_slopes"), backend=backend, **opts)
        return pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"),
                                                   alibi_slopes=t.get("alibi_slopes"), backend=backend, **opts)


def _dense(id, B, Hq, Hkv, L, S, E, Ev=None, **kw):
    Ev = E if Ev is None else Ev
    kw["kwargs"] = tuple(sorted(kw.get("kwargs", {}).items()))
    return Case(id, (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev), **kw)


def _varlen(id, lens_q, lens_k, Hq, Hkv, E, Ev=None, **kw):
    Ev = E if Ev is None else Ev
    kw["kwargs"] = tuple(sorted(kw.get("kwargs", {}).items()))
    return Case(id, (sum(lens_q), Hq, E), (sum(lens_k), Hkv, E), (sum(lens_k), Hkv, Ev),
                seqlens=(tuple(lens_q), tuple(lens_k)), **kw)


CASES = [
    # plain drop-in cases (torch takes them)
    _dense("L7-S33-E16", 2, 3, 3, 7, 33, 16),
    _dense("L1-S1-E8", 1, 2, 2, 1, 1, 8),
    _dense("L65-S33-E40-Ev24", 1, 2, 2, 65, 33, 40, 24),
    _dense("causal-L33-S33", 1, 2, 2, 33, 33, 32, kwargs={"is_causal": True}),
    _dense("causal-L33-S65", 1, 2, 2, 33, 65, 16, kwargs={"is_causal": True}),
    _dense("causal-L65-S33", 1, 2, 2, 65, 33, 16, kwargs={"is_causal": True}),
    _dense("boolmask-LS-L33-S65", 2, 2, 2, 33, 65, 16, mask=(33, 65), mask_dtype="bool"),
    _dense("floatmask-B1LS-grad", 2, 3, 3, 17, 33, 16, mask=(2, 1, 17, 33), mask_dtype="float", mask_grad=True),
    _dense("scale0.3-L33-S7", 1, 2, 2, 33, 7, 64, kwargs={"scale": 0.3}),
    _dense("gqa-Hq6-Hkv2", 2, 6, 2, 17, 33, 16, kwargs={"enable_gqa": True}),
    _dense("mqa-Hq4-Hkv1-causal", 1, 4, 1, 33, 33, 16, kwargs={"enable_gqa": True, "is_causal": True}),
    # extras (no torch equivalent)
    _dense("window-8-4-L65", 1, 2, 2, 65, 65, 16, kwargs={"window_size": (8, 4)}),
    _dense("window-0-right-inf", 1, 2, 2, 33, 33, 16, kwargs={"window_size": (0, -1)}),
    _dense("bottomright-causal-L7-S33", 1, 2, 2, 7, 33, 16,
           kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _dense("softcap5-L33-S33", 1, 2, 2, 33, 33, 16, kwargs={"softcap": 5.0}),
    _dense("alibi-H", 1, 3, 3, 33, 33, 16, alibi=(3,)),
    _dense("alibi-BH-bottomright-causal", 2, 3, 3, 17, 33, 16, alibi=(2, 3),
           kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _dense("lse-causal", 1, 2, 2, 33, 65, 16, kwargs={"is_causal": True, "return_lse": True}),
    _dense("combo-window-softcap-alibi-gqa-mask", 2, 4, 2, 33, 65, 32, mask=(33, 65), mask_dtype="float",
           mask_grad=True, alibi=(4,), kwargs={"window_size": (16, 8), "softcap": 10.0, "enable_gqa": True,
                                               "causal_alignment": "bottom_right", "return_lse": True}),
    # decode-shaped (short q, GQA 8:2): the kernel's split-KV path, S > 1024 merges several key chunks
    _dense("decode-L1-S1100-gqa-floatmask", 2, 8, 2, 1, 1100, 32, mask=(2, 8, 1, 1100), mask_dtype="float",
           kwargs={"enable_gqa": True, "return_lse": True}),
    _dense("decode-L3-S777-gqa-alibi-window-br", 1, 8, 2, 3, 777, 32, alibi=(8,),
           kwargs={"window_size": (300, 0), "causal_alignment": "bottom_right", "enable_gqa": True,
                   "return_lse": True}),
    _dense("decode-L3-S300-gqa-boolmask-causalband", 1, 8, 2, 3, 300, 16, mask=(3, 300), mask_dtype="bool",
           kwargs={"window_size": (-1, 0), "enable_gqa": True}),
    # varlen
    _varlen("decode-varlen-gqa-br-lse", (1, 3, 0), (300, 1100, 5), 8, 2, 16,
            kwargs={"is_causal": True, "causal_alignment": "bottom_right", "return_lse": True}),
    _varlen("varlen-3seq-incl0", (5, 0, 33), (9, 0, 17), 2, 2, 16),
    _varlen("varlen-causal-br-gqa", (7, 33, 1), (33, 7, 5), 4, 2, 16,
            kwargs={"is_causal": True, "causal_alignment": "bottom_right"}),
    _varlen("varlen-window-alibi-lse", (17, 9), (17, 33), 2, 1, 16, alibi=(2, 2),
            kwargs={"window_size": (4, 2), "return_lse": True}),
]


def sample_inputs(dtypes=(torch.float32,), which=("torch", "extras", "varlen"), cases=None):
    """pytest.param(case, dtype) for each case of the chosen kinds and each dtype, id "<case>-<dtype>"."""
    def kind(c):
        return "varlen" if c.varlen else ("torch" if c.torch_ok else "extras")

    params = []
    for c in cases or CASES:
        if kind(c) not in which:
            continue
        for dtype in dtypes:
            params.append(pytest.param(c, dtype, id=f"{c.id}-{dtype_id(dtype)}"))
    return params


def attn_inputs(case: Case, t, dropout_p=0.0):
    """The normalized AttnInputs the public function would build for this case."""
    o = case.opts
    if case.varlen:
        lq, lk = case.seqlens
        return varlen_inputs(t["q"], t["k"], t["v"], t["cu_seqlens_q"], t["cu_seqlens_k"], max(lq), max(lk),
                             alibi_slopes=t.get("alibi_slopes"), dropout_p=dropout_p, **o)
    return dense_inputs(t["q"], t["k"], t["v"], attn_mask=t.get("attn_mask"), alibi_slopes=t.get("alibi_slopes"),
                        dropout_p=dropout_p, **o)


def leaf(x, requires_grad):
    return None if x is None else x.detach().requires_grad_(requires_grad)


def fwd_args(inp, requires_grad=True, mask_grad=False, seed=0, offset=0):
    """torch.ops.pyattn.fwd's arguments (pyattn.op_args.FwdArgs) for inp, q/k/v (and mask) as fresh leaves."""
    return pick(FwdArgs, inp, q=leaf(inp.q, requires_grad), k=leaf(inp.k, requires_grad), v=leaf(inp.v, requires_grad),
                mask=leaf(inp.mask, mask_grad), rng_state=torch.tensor([seed, offset]) if inp.dropout_p > 0 else None)
