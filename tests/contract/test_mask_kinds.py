"""Mask kinds are numbered once per language, csrc/params.h (MaskKind) and pyattn/features.py (MASK_*), and the two
agree; Python picks the kind of each mask dtype the ops accept as the C++ host does (csrc/host_params.cpp), and the
Triton launcher passes that kind to its kernels."""
import pytest
import torch

from pyattn import _C, features
from pyattn.kernels import launch
from pyattn.op_args import FwdArgs

# (q dtype, mask dtype or None, kind)
KINDS = [(torch.float16, None, features.MASK_NONE),
         (torch.float16, torch.bool, features.MASK_BOOL),
         (torch.float16, torch.float16, features.MASK_LIKE_Q),
         (torch.float32, torch.float32, features.MASK_LIKE_Q),
         (torch.float16, torch.float32, features.MASK_FLOAT32),
         (torch.bfloat16, torch.float32, features.MASK_FLOAT32)]
KIND_PARAMS = [pytest.param(*k, id=f"q-{str(k[0])[6:]}-mask-{str(k[1]).removeprefix('torch.')}") for k in KINDS]


def test_python_names_the_cpp_values():
    assert _C.mask_kinds() == {name: value for name, value in vars(features).items() if name.startswith("MASK_")}


def mask_like(q, dtype):
    return None if dtype is None else torch.zeros(*q.shape[:3], 6, dtype=dtype)


@pytest.mark.parametrize("q_dtype,mask_dtype,kind", KIND_PARAMS)
def test_mask_kind(q_dtype, mask_dtype, kind):
    q = torch.zeros(1, 2, 3, 8, dtype=q_dtype)
    assert features.mask_kind(mask_like(q, mask_dtype), q_dtype) == kind


@pytest.mark.parametrize("q_dtype,mask_dtype,kind", KIND_PARAMS)
def test_triton_launcher_passes_the_kind(q_dtype, mask_dtype, kind):
    q, k = torch.zeros(1, 2, 3, 8, dtype=q_dtype), torch.zeros(1, 2, 6, 8, dtype=q_dtype)
    args = FwdArgs(q=q, k=k, v=k, mask=mask_like(q, mask_dtype), alibi_slopes=None, cu_seqlens_q=None,
                   cu_seqlens_k=None, max_seqlen_q=3, max_seqlen_k=6, scale=1.0, window_left=-1, window_right=-1,
                   bottom_right=False, softcap=0.0, dropout_p=0.0, rng_state=None)
    assert launch._Problem(args).flags["MASK_KIND"] == kind
