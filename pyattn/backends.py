"""One small class per backend: what it supports, why it refuses, and how it runs.

`choose()` walks the backends in order of measured speed (benchmarks/results) and takes the first that
accepts the inputs; `explain()` reports every backend's verdict.
"""
import os

import torch

from . import features as F
from . import op_args, ops, reference
from .errors import AttentionInputError
from .features import ALL_FEATURES, FLEX_FEATURES, KVCACHE_FEATURES, TORCH_FEATURES
from .inputs import AttnInputs

# torch's own function, bound before pyattn.enable() can rebind torch.nn.functional's name to pyattn
TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention


def functorch_active():
    """Whether a torch.func transform wraps this call. torch.library ops have neither grad nor jvp rules there
    (autograd.Functions without setup_context), so the fused backends step aside for torch's SDPA or the
    reference math, which torch.func differentiates. Not asked while Dynamo traces (a constant there)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def forward_ad_active(inp):
    """Whether forward-mode AD must follow this call: torch.func.jvp, jacfwd or hessian around it, or dual tensors of
    torch.autograd.forward_ad among its inputs. Neither torch.library ops nor torch's SDPA kernels have forward
    derivatives (torch's own scaled_dot_product_attention raises there on CPU); the reference math has them."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
            return True
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered: no tangents anywhere
        return False
    tensors = (inp.q, inp.k, inp.v, inp.mask, inp.alibi_slopes, inp.sinks)
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


class Backend:
    name = ""
    devices = ()
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    features = frozenset()  # features (pyattn.features; AttnInputs.uses()) it computes natively
    max_head_dim = None
    forward_ad = False  # computes forward-mode derivatives (forward_ad_active)
    block_backward = False  # has backward(): what ring_attention's blocks need

    def unavailable_reason(self):
        """Why this backend cannot run at all in this installation, or None."""
        return None

    def not_supported_reasons(self, inp: AttnInputs):
        reasons = []
        why_not = self.unavailable_reason()
        if why_not:
            reasons.append(why_not)
        if inp.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)}, not {inp.device.type}")
        if inp.dtype not in self.dtypes:
            reasons.append(f"does not take {inp.dtype}")
        missing = [f for f in inp.uses() if f not in self.features]
        if missing:
            reasons.append(f"does not support {', '.join(missing)}")
        if F.SCORE_MOD in missing:
            reasons.append("an arbitrary Python score_mod is not fused (pyattn.score_mods' alibi, softcap, "
                           "relative_bias and full_bias are): it runs on the reference math")
        E, Ev = inp.head_dims
        if self.max_head_dim is not None and max(E, Ev) > self.max_head_dim:
            reasons.append(f"head dims up to {self.max_head_dim}, got E={E}, Ev={Ev}")
        if not self.forward_ad and forward_ad_active(inp):
            reasons.append("forward-mode AD (torch.func.jvp, jacfwd, hessian or dual tensors) needs forward "
                           "derivatives, which only the reference math has")
        return reasons + self.extra_reasons(inp)

    def extra_reasons(self, inp: AttnInputs):
        return []

    def notes(self, inp: AttnInputs):
        """What explain() adds about how this backend would run the inputs ("" for nothing)."""
        return ""

    def forward(self, inp: AttnInputs):
        """-> out (B, Hq, L, Ev), lse (B, Hq, L) float32."""
        raise NotImplementedError

    def backward(self, inp: AttnInputs, dout, out, lse, dlse, rng_state):
        """The gradients of a block, given the out (B, Hq, L, Ev) and lse (B, Hq, L) float32 of all the keys its rows
        attend to (inp's and other blocks'), so that its softmax is the final one: -> dq, dk, dv like inp.q, inp.k,
        inp.v (no mask gradient). dout (B, Hq, L, Ev); dlse (B, Hq, L) float32 or None; rng_state: the dropout
        (seed, offset) its forward used. Only where block_backward."""
        raise NotImplementedError

    def kvcache_forward(self, inp: AttnInputs):
        """-> out (B, L, Hq, Ev), lse (B, Hq, L) float32 (the cache already holds the appended keys)."""
        raise NotImplementedError


class FusedBackend(Backend):
    """A backend whose kernels implement the fwd/bwd op pair of csrc/ops.cpp."""
    op_name = "fwd"
    bwd_op_name = "bwd"
    kvcache_op_name = "kvcache_fwd"
    block_backward = True
    def extra_reasons(self, inp):
        reasons = []
        if inp.dropout_p >= 1.0:
            reasons.append("dropout_p == 1 drops every weight (left to torch)")
        if functorch_active():
            reasons.append("torch.func transforms (grad, vmap, jvp, ...) are active, and torch.library custom ops have "
                           "no rules for them")
        return reasons

    def forward(self, inp, rng_state=None):
        """rng_state: the dropout (seed, offset) to use (ops.draw_rng_state); None draws one."""
        return ops.fused_forward(inp, self.op_name, rng_state)

    def backward(self, inp, dout, out, lse, dlse, rng_state):
        return ops.fused_backward(inp, dout, out, lse, dlse, rng_state, self.bwd_op_name)

    def kvcache_forward(self, inp):
        return ops.kvcache_forward(inp, self.kvcache_op_name)


class TritonBackend(FusedBackend):
    """The Triton kernels (pyattn.kernels): every feature on CUDA; on CPU tensors only under the Triton
    interpreter (TRITON_INTERPRET=1), which is for tests: slow, and its bf16 dot is wrong. Block masks of any block
    size: tiles fitted to the blocks, or a per-element fallback where no tile fits (kernels/block_mask.py)."""
    name = "triton"
    features = ALL_FEATURES | KVCACHE_FEATURES | {F.BLOCK_MASK}
    max_head_dim = 576  # above 256 the kernels take the head dims in chunks (kernels/configs.py); 576: MLA's, tested
    op_name = "triton_fwd"
    bwd_op_name = "triton_bwd"
    kvcache_op_name = "triton_kvcache_fwd"

    def __init__(self):
        self.interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        self.devices = ("cuda", "cpu") if self.interpreting else ("cuda",)
        self.dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def unavailable_reason(self):
        why = ops.triton_unavailable_reason()
        if why:
            return why
        if not self.interpreting and not torch.cuda.is_available():
            return "no CUDA GPU (TRITON_INTERPRET=1 runs it on CPU tensors, for tests)"
        return None

    def extra_reasons(self, inp):
        reasons = super().extra_reasons(inp)
        if inp.device.type == "cpu" and inp.dtype == torch.bfloat16:
            reasons.append("the Triton interpreter's bfloat16 dot is wrong, so bfloat16 runs on CUDA only")
        return reasons

    def notes(self, inp):
        if inp.block_states is None:
            return ""
        from .kernels import block_mask  # triton with it: explain() only
        mode, *_ = block_mask.fitted_tiles(16, 16, inp.block_q, inp.block_k)
        if mode == block_mask.BLOCK_MASK_TILES.value:
            return f" [block mask: tiles fitted to its {inp.block_q}x{inp.block_k} blocks, empty blocks skipped]"
        return (f" [block mask: no 16-wide tile divides its {inp.block_q}x{inp.block_k} blocks, so every element looks "
                f"its block up (correct, no skipping: slow)]")


class CPUBackend(FusedBackend):
    """The fused C++ kernel (csrc/cpu), compiled per CPU capability: tiled online softmax on torch's portable
    vectors, brgemm matmuls (bf16 on VNNI tiles where oneDNN takes them)."""
    name = "cpu"
    devices = ("cpu",)
    features = ALL_FEATURES | KVCACHE_FEATURES | {F.BLOCK_MASK}

    def unavailable_reason(self):
        return None if ops.has_op("fwd") else f"pyattn._C is not built ({ops.load_error()})"

    def notes(self, inp):
        from . import _C, cpu_capability
        # planned from the op's own arguments, filled as the op fills them: the path named is the path taken
        if inp.cache is not None:
            plan = _C._cpu_kvcache_fwd_plan(*ops.kvcache_args(inp))
        else:
            plan = _C._cpu_fwd_plan(*op_args.pick(op_args.FwdArgs, inp, rng_state=None))
        return f" [{cpu_capability.describe()}; forward: {plan}]"


class CUDABackend(FusedBackend):
    """CUDA C++ tensor-core kernels (csrc/cuda): mma.sync m16n8k16 on sm_80 and newer, fwd + bwd; kvcache_fwd
    (contiguous or paged caches) on the sm_80 forward."""
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    features = (ALL_FEATURES - {F.DROPOUT}) | KVCACHE_FEATURES
    kvcache_op_name = "kvcache_fwd"  # csrc/cuda/api.cpp registers it for the CUDA dispatch key
    max_head_dim = 256  # padded to 64, 128, 192 or 256 (csrc/cuda/generate.py)

    def unavailable_reason(self):
        if not ops.has_op("fwd"):
            return f"pyattn._C is not built ({ops.load_error()})"
        if "cuda" not in ops.COMPILED_BACKENDS:
            return "pyattn._C was built without its CUDA kernels (needs nvcc and a CUDA torch at build time)"
        return None

    def extra_reasons(self, inp):
        reasons = super().extra_reasons(inp)
        E, Ev = inp.head_dims
        if E % 8 or Ev % 8:
            reasons.append(f"head dims must be multiples of 8 (16-byte rows), got E={E}, Ev={Ev}")
        if inp.device.type == "cuda" and torch.cuda.get_device_capability(inp.device)[0] < 8:
            reasons.append("needs compute capability 8.0 or newer")
        return reasons


class TorchBackend(Backend):
    """torch's own F.scaled_dot_product_attention: the fallback for what no fused backend takes."""
    name = "torch"
    devices = ("cpu", "cuda")
    features = TORCH_FEATURES

    def extra_reasons(self, inp):
        return ["causal together with a float mask"] if inp.mask is not None and inp.mask.dtype != torch.bool and \
            inp.is_causal else []

    def forward(self, inp):
        mask = inp.mask
        if mask is not None and inp.is_causal:  # torch refuses a mask with is_causal: fold the band into the mask
            L, S = inp.q.shape[-2], inp.k.shape[-2]
            mask = mask & torch.ones(L, S, dtype=torch.bool, device=inp.device).tril()
        out = TORCH_SDPA(inp.q, inp.k, inp.v, attn_mask=mask, dropout_p=inp.dropout_p,
                         is_causal=inp.is_causal and mask is None, scale=inp.scale,
                         enable_gqa=inp.q.shape[1] != inp.k.shape[1])
        return out, None


class ReferenceBackend(Backend):
    """Naive math (pyattn.reference): every feature, any device, L x S memory."""
    name = "reference"
    devices = ("cpu", "cuda", "meta", "mps", "xpu")
    features = ALL_FEATURES | KVCACHE_FEATURES | {F.KVCACHE_GRADIENT} | FLEX_FEATURES
    forward_ad = True

    def forward(self, inp):
        out, lse = reference.attention(inp)
        if op_args.heads_inner(inp.q):  # laid out like q, as the fused backends return it (op_args.new_out)
            out = op_args.new_out(inp.q, out.shape[-1]).copy_(out)
        return out, lse

    def kvcache_forward(self, inp):
        return reference.kvcache_attention(inp)


# "cuda" is part of this build only when pyattn._C holds its kernels (its build info, no device probing)
BACKENDS = {b.name: b for b in (TritonBackend(), CUDABackend(), CPUBackend(), TorchBackend(), ReferenceBackend())
            if b.name != "cuda" or "cuda" in ops.COMPILED_BACKENDS}
# auto's order per device, fastest first. CPU: benchmarks/results/cpu-* (the fused kernel against torch's SDPA).
# CUDA: the fused backends before torch's SDPA, as DESIGN.md asks; triton first: on the H200
# (benchmarks/results/nvidia-h200) it ran backward ~4x and KV-cache decode 3-6x faster than the CUDA C++ kernels.
AUTO_ORDER = {"cpu": ("cpu", "torch", "reference"),
              "cuda": tuple(n for n in ("triton", "cuda", "torch", "reference") if n in BACKENDS)}
PUBLIC_NAMES = ("triton", "cuda", "cpu", "reference")


def auto_order(device_type):
    return AUTO_ORDER.get(device_type, ("reference",))


def available_backends():
    return [name for name, b in BACKENDS.items() if b.unavailable_reason() is None]


def choose(inp: AttnInputs, requested=None):
    if requested in (None, "auto"):
        for name in auto_order(inp.device.type):
            if not BACKENDS[name].not_supported_reasons(inp):
                return BACKENDS[name]
        raise AttentionInputError("no backend can run these inputs:\n" + explain_inputs(inp))
    if not isinstance(requested, str) or requested not in BACKENDS:
        if requested in PUBLIC_NAMES:
            raise AttentionInputError(f"backend {requested!r} is not part of this build of pyattn; "
                                      f"available: {available_backends()}")
        raise AttentionInputError(f"backend must be None, 'auto' or one of "
                                  f"{sorted(set(PUBLIC_NAMES) | set(BACKENDS))}, got {requested!r}")
    reasons = BACKENDS[requested].not_supported_reasons(inp)
    if reasons:
        raise AttentionInputError(f"backend {requested!r} cannot run these inputs: " + "; ".join(reasons))
    return BACKENDS[requested]


def explain_inputs(inp: AttnInputs, requested=None):
    lines = [f"inputs: {inp.describe()} {inp.dtype} on {inp.device}; features: {', '.join(inp.uses()) or 'none'}"]
    try:
        chosen = choose(inp, requested).name
    except AttentionInputError:
        chosen = None
    order = auto_order(inp.device.type)
    for name in order + tuple(n for n in BACKENDS if n not in order):
        reasons = BACKENDS[name].not_supported_reasons(inp)
        verdict = "chosen" if name == chosen else ("can run" if not reasons else "cannot: " + "; ".join(reasons))
        if not reasons:
            verdict += BACKENDS[name].notes(inp)
        lines.append(f"  {name:<10} {verdict}")
    for name in PUBLIC_NAMES:
        if name not in BACKENDS:
            lines.append(f"  {name:<10} cannot: not part of this build")
    if chosen in ("torch", "reference"):
        lines.append(f"no fused pyattn backend takes these inputs, so {chosen!r} runs them")
    return "\n".join(lines)
