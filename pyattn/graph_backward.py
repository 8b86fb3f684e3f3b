"""Backward with a graph (create_graph=True: gradient penalties, Hessian-vector products, MAML): the fused bwd ops
have no derivative of their own, so such a backward recomputes the forward in the reference math (pyattn.reference,
memory O(L * S) like torch's math backend) and differentiates that, keeping the graph. Dropout uses the keep-mask
the fused forward drew."""
import torch

from . import op_args, reference
from .errors import AttentionInputError
from .inputs import AttnInputs

_TENSORS = ("q", "k", "v", "mask", "sinks")  # the arguments with a gradient
_HALF = (torch.bfloat16, torch.float16)


def wanted(fwd, dout):
    """Whether this backward must keep a graph: grad mode on inside backward (create_graph=True) with something
    that requires grad. fwd: the forward's saved tensors by name."""
    return torch.is_grad_enabled() and (dout.requires_grad or any(
        fwd.get(name) is not None and fwd[name].requires_grad for name in _TENSORS))


def _keep_mask(args: "op_args.FwdArgs"):
    """(B, Hq, L, S) bool: the keep-mask the fused forward drew, where it can be drawn again."""
    if args.cu_seqlens_q is not None or args.q.device.type != "cpu":
        raise AttentionInputError(
            f"backward with create_graph=True and dropout_p={args.dropout_p} is supported for dense CPU inputs only "
            f"(q {tuple(args.q.shape)} on {args.q.device}{', varlen' if args.cu_seqlens_q is not None else ''}): "
            "the dropout mask of this kernel cannot be drawn again in differentiable form")
    seed, offset = (int(x) for x in args.rng_state.tolist())
    B, H, L, _ = args.q.shape
    return torch.ops.pyattn.cpu_dropout_mask(B, H, L, args.k.shape[2], args.dropout_p, seed, offset)


def backward(args: "op_args.FwdArgs", dout, dlse, mask_grad, sinks_grad):
    """{name: gradient} for q, k, v (and the float mask, the sinks when asked) of the forward called with args, each
    differentiable."""
    if args.block_states is not None:  # the reference math takes no block-sparse mask: refused, never ignored
        raise AttentionInputError("backward with create_graph=True is not supported with a block-sparse mask "
                                  f"(block_states {tuple(args.block_states.shape)})")
    keep = _keep_mask(args) if args.dropout_p > 0 else None
    names = [name for name in ("q", "k", "v") if getattr(args, name).requires_grad]
    names += ["mask"] * mask_grad + ["sinks"] * sinks_grad
    if not names:
        return {}
    with torch.enable_grad():
        # bf16/fp16 in float32, as torch's math backend computes them
        wide = {name: getattr(args, name).float() for name in ("q", "k", "v")} if args.q.dtype in _HALF else {}
        fields = {name: getattr(args, name) for name in op_args.FwdArgs._fields if name != "rng_state"}
        inp = AttnInputs(**{**fields, **wide, "return_lse": dlse is not None, "out_shape": None})
        out, lse = reference.attention(inp, keep)
        out = out.to(args.q.dtype)
        outputs, grad_outputs = [out], [dout]
        if dlse is not None:
            outputs.append(lse)
            grad_outputs.append(dlse)
        grads = torch.autograd.grad(outputs, [getattr(args, name) for name in names], grad_outputs,
                                    create_graph=True, allow_unused=True)
    return {name: torch.zeros_like(getattr(args, name)) if g is None else g for name, g in zip(names, grads)}
