"""`python -m benchmarks.sanitize`: a few small calls of the CUDA C++ backend, forward and backward, that
exercise every code path once (partial tiles, causal both ways, window, GQA, masks through strides, softcap,
ALiBi, varlen, every padded head dim). make gpu-check runs it under compute-sanitizer memcheck and racecheck;
it also checks the results against the reference, so a silent wrong answer fails too."""
import sys

import torch

import pyattn

CASES = [  # (B, Hq, Hkv, L, S, E, Ev, kwargs)
    (1, 2, 2, 65, 33, 64, 64, {}),
    (2, 4, 2, 130, 77, 128, 128, {"is_causal": True}),
    (1, 2, 1, 33, 70, 40, 24, {"is_causal": True, "causal_alignment": "bottom_right", "softcap": 5.0}),
    (1, 2, 2, 70, 70, 160, 160, {"window_size": (16, 4)}),
    (1, 2, 2, 40, 90, 256, 200, {"alibi": True}),
    (2, 2, 2, 33, 45, 64, 64, {"mask": "bool"}),
    (2, 2, 2, 33, 45, 64, 64, {"mask": "float"}),
]


def run_case(B, Hq, Hkv, L, S, E, Ev, kw, dtype=torch.bfloat16):
    kw = dict(kw)
    q = torch.randn(B, Hq, L, E, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, E, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, Ev, device="cuda", dtype=dtype, requires_grad=True)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(Hq, device="cuda") * 0.5
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(L, S, device="cuda") > 0.3
    elif mask == "float":
        kw["attn_mask"] = torch.randn(B, 1, L, S, device="cuda", dtype=dtype, requires_grad=True)
    results = []
    for backend in ("cuda", "reference"):
        out = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv, backend=backend, **kw)
        grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
        results.append([out, *grads])
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), *results):
        err = (ours.float() - ref.float()).abs().max().item()
        scale = max(1.0, ref.float().abs().max().item())
        if not err <= 0.05 * scale:
            raise AssertionError(f"case {(B, Hq, Hkv, L, S, E, Ev, kw)}: {name} differs by {err:.3g}")


def varlen_case(dtype=torch.float16):
    lens_q, lens_k = [5, 0, 70], [9, 3, 40]
    cu = lambda lens: torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)  # noqa: E731
    q = torch.randn(sum(lens_q), 4, 64, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), 2, 64, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), 2, 64, device="cuda", dtype=dtype)
    out = pyattn.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), is_causal=True,
                                  backend="cuda")
    torch.cuda.synchronize()
    assert not out.isnan().any()


def main():
    torch.manual_seed(0)
    for case in CASES:
        run_case(*case)
    varlen_case()
    torch.cuda.synchronize()
    print(f"sanitize: {len(CASES) + 1} CUDA backend calls ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
