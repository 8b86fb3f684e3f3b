"""What the cuda backend class declares and refuses, checked on any machine (no GPU, no CUDA build needed)."""
import torch

from pyattn import backends, features
from pyattn.inputs import dense_inputs


def inputs(E=64, Ev=64, dtype=torch.bfloat16, dropout_p=0.0):
    q, k, v = (torch.randn(1, 2, 9, d, dtype=dtype) for d in (E, E, Ev))
    return dense_inputs(q, k, v, dropout_p=dropout_p, is_causal=True)


def test_declares_every_feature_but_dropout():
    cuda = backends.CUDABackend()
    assert cuda.features == (features.ALL_FEATURES - {features.DROPOUT}) | features.KVCACHE_FEATURES
    assert features.SINKS in cuda.features and features.KVCACHE_GRADIENT not in cuda.features
    assert cuda.kvcache_op_name == "kvcache_fwd"
    assert cuda.dtypes == (torch.float16, torch.bfloat16) and cuda.max_head_dim == 256


def test_refusals_name_their_reason():
    reasons = "; ".join(backends.CUDABackend().not_supported_reasons(inputs(E=40, Ev=20, dtype=torch.float32,
                                                                            dropout_p=0.1)))
    for needle in ("runs on cuda, not cpu", "does not take torch.float32", "does not support dropout",
                   "multiples of 8", "E=40, Ev=20"):
        assert needle in reasons, reasons


def test_part_of_the_build_only_with_its_kernels():
    built = "cuda" in backends.ops.build_info()["backends"]
    assert ("cuda" in backends.BACKENDS) == built and ("cuda" in backends.auto_order("cuda")) == built
    if not built:
        assert "without its CUDA kernels" in backends.CUDABackend().unavailable_reason() or \
            "not built" in backends.CUDABackend().unavailable_reason()
