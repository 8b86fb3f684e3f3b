"""The implementations a sweep compares: naive, torch SDPA per backend, FlexAttention, pyattn backends.

Each is (name, backend, fn(q, k, v, causal) -> out), with q (B, H, L, D) on the benchmark device.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyattn


def _torch_sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def _pyattn(backend):
    def run(q, k, v, causal):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1],
                                                   backend=backend)
    return run


def _flex():
    from torch._functorch import config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # the bwd pass replays one graph's backward (retain_graph=True), which donated buffers forbid
    functorch_config.donated_buffer = False
    compiled = torch.compile(flex_attention)
    masks = {}

    def run(q, k, v, causal):
        gqa = q.shape[1] != k.shape[1]
        if not causal:
            return compiled(q, k, v, enable_gqa=gqa)
        key = (q.shape[-2], k.shape[-2])
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, *key, device=q.device)
        return compiled(q, k, v, block_mask=masks[key], enable_gqa=gqa)
    return run


def implementations(device):
    """-> {name: (backend_label, fn)} for everything that exists on this device."""
    impls = {"naive": ("reference", _pyattn("reference"))}
    if device == "cpu":
        impls["torch-sdpa"] = ("default", _torch_sdpa([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]))
    else:
        impls["torch-sdpa-flash"] = ("flash", _torch_sdpa(SDPBackend.FLASH_ATTENTION))
        impls["torch-sdpa-efficient"] = ("efficient", _torch_sdpa(SDPBackend.EFFICIENT_ATTENTION))
        impls["torch-sdpa-cudnn"] = ("cudnn", _torch_sdpa(SDPBackend.CUDNN_ATTENTION))
        impls["flex-attention"] = ("flex", _flex())
    for name in pyattn.available_backends():
        if name in ("reference", "torch"):
            continue
        backend = pyattn.backends.BACKENDS[name]
        if device in backend.devices:
            impls[f"pyattn-{name}"] = (name, _pyattn(name))
    return impls
