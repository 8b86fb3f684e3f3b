"""torch.export of the public functions and of MultiheadAttention (static and dynamic lengths), and
torch.compile(fullgraph=True) of MultiheadAttention. torch.compile of the functions is in tests/backends/test_ops.py.

The exported graphs must call pyattn's op (not a decomposition) wherever a fused backend runs on the device,
and agree with eager calls.
"""
import pytest
import torch

import pyattn
from helpers import FUSED, backend_device, device_params

devices = pytest.mark.parametrize("device", device_params())
LENGTH = torch.export.Dim("length", min=2, max=256)


class SDPA(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, window_size=(8, 0),
                                                   softcap=5.0)


class Varlen(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens):
        return pyattn.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 13, 13, is_causal=True)


class SelfAttention(torch.nn.Module):
    """Causal self-attention with a key padding mask, as nn.TransformerEncoderLayer calls it."""

    def __init__(self, device):
        super().__init__()
        self.mha = pyattn.MultiheadAttention(32, 4, batch_first=True, device=device)

    def forward(self, x, padding, causal):
        return self.mha(x, x, x, key_padding_mask=padding, attn_mask=causal, is_causal=True, need_weights=False)[0]


def sdpa_inputs(L, device):
    q, k, v = (torch.randn(2, h, L, 16, device=device) for h in (4, 2, 2))
    return q, k, v, torch.rand(2, 1, 1, L, device=device) > 0.2


def mha_inputs(L, device):
    padding = torch.rand(2, L, device=device) > 0.7
    padding[:, 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device)
    return torch.randn(2, L, 32, device=device), padding, causal


def fused_backend_on(device):
    return any(backend_device(b) == device for b in FUSED if b in pyattn.available_backends())


def export_and_compare(module, inputs, dynamic_shapes=None, other_inputs=None):
    """Exports module on inputs; its program must match eager on inputs (and other_inputs, of other lengths,
    when the lengths are dynamic) and call a pyattn op where a fused backend runs on the device."""
    program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes)
    assert ("torch.ops.pyattn." in program.graph_module.code) == fused_backend_on(inputs[0].device.type)
    for args in (inputs, other_inputs or inputs):
        torch.testing.assert_close(program.module()(*args), module(*args))


@devices
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-length"])
def test_export_sdpa(device, dynamic):
    shapes = ({2: LENGTH}, {2: LENGTH}, {2: LENGTH}, {3: LENGTH}) if dynamic else None
    export_and_compare(SDPA(), sdpa_inputs(17, device), shapes, sdpa_inputs(40, device) if dynamic else None)


@devices
def test_export_varlen(device):
    q = torch.randn(20, 2, 16, device=device)
    export_and_compare(Varlen(), (q, q, q, torch.tensor([0, 7, 20], dtype=torch.int32, device=device)))


@devices
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-length"])
def test_export_multihead_attention(device, dynamic):
    shapes = ({1: LENGTH}, {1: LENGTH}, {0: LENGTH, 1: LENGTH}) if dynamic else None
    export_and_compare(SelfAttention(device).eval(), mha_inputs(9, device), shapes,
                       mha_inputs(21, device) if dynamic else None)


@devices
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.compiles)])
def test_compile_multihead_attention(device, compiler):
    """fullgraph: no graph breaks; forward and parameter gradients match eager."""
    torch._dynamo.reset()
    module = SelfAttention(device)
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    inputs = mha_inputs(9, device)
    results = []
    for fn in (module, compiled):
        out = fn(*inputs)
        grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
        results.append((out, grads))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
    for e, c in zip(eager_grads, comp_grads):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
