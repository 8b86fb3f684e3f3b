"""The kind of a mask (csrc/params.h MaskKind: how the kernels read it) is picked once, by the C++ host from the mask's
dtype under q's (fill_params, csrc/host_params.cpp). The host checks of the kernels launched from Python return it
(pyattn._C.check_fwd / check_bwd, csrc/host_checks.cpp) and the Triton launcher passes it on; pyattn._C.mask_kinds()
names the values."""
import pytest
import torch

import pyattn  # noqa: F401  (loads pyattn._C)
from pyattn import _C
from pyattn.op_args import BwdArgs, FwdArgs, pick

# (q dtype, mask dtype or None, kind)
KINDS = [(torch.float16, None, "MASK_NONE"),
         (torch.float16, torch.bool, "MASK_BOOL"),
         (torch.float16, torch.float16, "MASK_LIKE_Q"),
         (torch.float32, torch.float32, "MASK_LIKE_Q"),
         (torch.float16, torch.float32, "MASK_FLOAT32"),
         (torch.bfloat16, torch.float32, "MASK_FLOAT32")]
KIND_PARAMS = [pytest.param(*k, id=f"q-{str(k[0])[6:]}-mask-{str(k[1]).removeprefix('torch.')}") for k in KINDS]


def test_kinds_are_named_apart():
    kinds = _C.mask_kinds()
    assert set(kinds) == {kind for _, _, kind in KINDS} and len(set(kinds.values())) == len(kinds)


def fwd_args(q_dtype, mask_dtype):
    """fwd's arguments for q (1, 2, 3, 8), k and v (1, 2, 6, 8), and a (1, 2, 3, 6) mask of mask_dtype (or none)."""
    q, k = torch.zeros(1, 2, 3, 8, dtype=q_dtype), torch.zeros(1, 2, 6, 8, dtype=q_dtype)
    mask = None if mask_dtype is None else torch.zeros(1, 2, 3, 6, dtype=mask_dtype)
    return FwdArgs(q=q, k=k, v=k, mask=mask, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=3,
                   max_seqlen_k=6, scale=1.0, window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
                   dropout_p=0.0, rng_state=None)


@pytest.mark.parametrize("q_dtype,mask_dtype,kind", KIND_PARAMS)
def test_host_checks_return_the_kind(q_dtype, mask_dtype, kind):
    a = fwd_args(q_dtype, mask_dtype)
    assert _C.check_fwd("test", [q_dtype], *a) == _C.mask_kinds()[kind]
    out, lse = torch.zeros(1, 2, 3, 8, dtype=q_dtype), torch.zeros(1, 2, 3)
    bwd = pick(BwdArgs, a, dout=out, out=out, lse=lse, dlse=None, mask_grad=False)
    assert _C.check_bwd("test", [q_dtype], *bwd) == _C.mask_kinds()[kind]
