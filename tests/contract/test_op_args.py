"""The ops' arguments are defined once per language: csrc/ops.cpp's schemas (C++) and pyattn/op_args.py (Python). The
Triton ops take their schemas from op_args; each must equal its compiled twin's argument for argument (names, types,
defaults, returns), and op_args' named tuples must list the C++ schema's arguments in its order."""
import pytest
import torch

import pyattn  # noqa: F401  (loads pyattn._C and defines the Triton ops)
from pyattn import op_args

# (compiled op, Triton op, the named tuple of their arguments)
PAIRS = [pytest.param("fwd", "triton_fwd", op_args.FwdArgs, id="fwd"),
         pytest.param("bwd", "triton_bwd", op_args.BwdArgs, id="bwd"),
         pytest.param("kvcache_fwd", "triton_kvcache_fwd", op_args.KVCacheArgs, id="kvcache_fwd")]


def schema(name):
    return getattr(torch.ops.pyattn, name).default._schema


@pytest.mark.parametrize("compiled,triton,args", PAIRS)
def test_triton_schema_is_the_compiled_one(compiled, triton, args):
    assert str(schema(triton)).removeprefix(f"pyattn::{triton}") == str(schema(compiled)).removeprefix(
        f"pyattn::{compiled}")


@pytest.mark.parametrize("compiled,triton,args", PAIRS)
def test_named_tuple_lists_the_cpp_arguments(compiled, triton, args):
    arguments = schema(compiled).arguments
    assert args._fields == tuple(a.name for a in arguments)
    assert args._field_defaults == {a.name: a.default_value for a in arguments if a.has_default_value()}


def test_options_are_the_scalars_between_cu_seqlens_k_and_rng_state():
    for args in (op_args.FwdArgs, op_args.BwdArgs):
        names = args._fields
        assert op_args.Options._fields == names[names.index("cu_seqlens_k") + 1:names.index("rng_state")]
