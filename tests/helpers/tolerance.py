"""The tolerance rule and the fwd + bwd comparison against the float64 oracle."""
import torch

# tolerance: FlashAttention's rule. Our error vs a float64 oracle is at most FACTOR x the error of plain
# PyTorch in the same dtype, plus a small absolute term (relative to the oracle's magnitude).

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FACTOR = 2.0


def dtype_id(dtype):
    return {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def assert_close_to_oracle(name, ours, baseline, oracle, dtype, atol=None, factor=FACTOR):
    """max|ours - oracle| <= factor * max|baseline - oracle| + atol * max(1, max|oracle|)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN in output"
    if ours.numel() == 0:
        return
    oracle = oracle.double()
    finite = torch.isfinite(oracle)
    # non-finite entries (e.g. lse = -inf for fully masked rows) must match exactly
    assert torch.equal(torch.isfinite(ours), finite) and torch.equal(ours.double()[~finite], oracle[~finite]), \
        f"{name}: non-finite entries differ from the oracle"
    err = (ours.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    base = (baseline.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, oracle[finite].abs().max().item()) if finite.any() else 1.0
    tol = factor * base + (ATOL[dtype] if atol is None else atol) * scale
    assert err <= tol, (f"{name}: max error {err:.3g} vs oracle > {factor} x baseline error {base:.3g} + atol "
                        f"({tol:.3g} in all)")


def run_fwd_bwd(fn, tensors, grad_names, dtype, cotangents=None):
    """fn(**tensors) -> out or (out, lse). tensors: float ones are cast to dtype (float64 stays float64 for the
    oracle when dtype is float64), names in grad_names get requires_grad. Returns (outputs, grads, cotangents)."""
    args = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and name != "alibi_slopes":
            t = t.detach().to(dtype).requires_grad_(name in grad_names)
        args[name] = t
    outs = fn(**args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if cotangents is None:
        cotangents = [torch.randn(o.shape, dtype=torch.float32, device=o.device) for o in outs]
    if grad_names:
        loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
        grads = torch.autograd.grad(loss, [args[n] for n in grad_names], allow_unused=True)
        grads = [torch.zeros_like(args[n]) if g is None else g for n, g in zip(grad_names, grads)]
    else:
        grads = []
    return [o.detach() for o in outs], [g.detach() for g in grads], cotangents


def check_fwd_bwd(ours, baseline, oracle, tensors, dtype, grad_names=("q", "k", "v"), atol=None, grad_atol=None,
                  out_names=("out", "lse")):
    """Runs ours/baseline in dtype and oracle in float64 on the same values; checks outputs and grads."""
    o_out, o_grads, cot = run_fwd_bwd(oracle, tensors, grad_names, torch.float64)
    b_out, b_grads, _ = run_fwd_bwd(baseline, tensors, grad_names, dtype, cot)
    y_out, y_grads, _ = run_fwd_bwd(ours, tensors, grad_names, dtype, cot)
    assert len(y_out) == len(o_out)
    for name, y, b, o in zip(out_names, y_out, b_out, o_out):
        assert y.dtype == (torch.float32 if name == "lse" else dtype), f"{name}: dtype {y.dtype}"
        assert_close_to_oracle(name, y, b, o, dtype, atol)
    for name, y, b, o in zip(grad_names, y_grads, b_grads, o_grads):
        assert y.shape == tensors[name].shape, f"grad of {name}: shape {tuple(y.shape)}"
        a = grad_atol if grad_atol is not None else atol
        if name == "attn_mask" and dtype == torch.float64 and a is None:
            a = ATOL[torch.float32]  # the ops return dmask in float32 (csrc/ops.cpp): fp32-accurate by contract
        assert_close_to_oracle(f"grad of {name}", y, b, o, dtype, a)
    return y_out, y_grads
