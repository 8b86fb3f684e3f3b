"""The attention ops' arguments for Python, read from the schemas pyattn._C registers (csrc/ops.cpp, where each
argument and its shape are written once): FwdArgs, BwdArgs and KVCacheArgs, named tuples of fwd's, bwd's and
kvcache_fwd's arguments in their order with their defaults, and Options, fwd's arguments that are not tensors (what
autograd keeps besides the saved tensors, trailing ones such as block_q/block_k included). Every Python caller builds
and reads op calls through these (by name, never by position).

The tuples are made on first use, once pyattn/ops.py has loaded pyattn._C; without it (a checkout never built) there
are no ops to call, and naming one raises.
"""
from collections import namedtuple

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

_MISSING = object()
_TUPLES = ("FwdArgs", "BwdArgs", "KVCacheArgs", "Options", "FWD_TENSORS")


def schema(op):
    """The registered schema of torch.ops.pyattn.<op>."""
    return getattr(torch.ops.pyattn, op).default._schema


def schema_text(op):
    """op's schema without its name, '(Tensor q, ...) -> (Tensor out, Tensor lse)': what torch.library.custom_op
    takes to define another op with the same arguments."""
    return str(schema(op)).removeprefix(f"pyattn::{op}")


def _arguments(typename, op):
    arguments = schema(op).arguments
    return namedtuple(typename, [a.name for a in arguments],
                      defaults=[a.default_value for a in arguments if a.has_default_value()])


def _read_schemas():
    fwd = schema("fwd").arguments
    tensors = [a.name for a in fwd if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())]
    return dict(FwdArgs=_arguments("FwdArgs", "fwd"), BwdArgs=_arguments("BwdArgs", "bwd"),
                KVCacheArgs=_arguments("KVCacheArgs", "kvcache_fwd"),
                Options=namedtuple("Options", [a.name for a in fwd if a.name not in tensors]),
                # what backward needs of fwd's inputs, besides the options
                FWD_TENSORS=tuple(tensors))


def __getattr__(name):
    if name not in _TUPLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not hasattr(torch.ops.pyattn, "fwd"):
        raise AttributeError(f"pyattn.op_args.{name} is read from pyattn._C's op schemas, and pyattn._C is not built")
    globals().update(_read_schemas())
    return globals()[name]


def pick(cls, *records, **given):
    """cls's fields from given, else from the first of records (AttnInputs, its KVCache part, another args tuple)
    with an attribute of that name."""
    values = []
    for name in cls._fields:  # a plain loop: this runs on every call (a generator per field cost 3x as much)
        if name in given:
            values.append(given[name])
            continue
        for record in records:
            value = getattr(record, name, _MISSING)
            if value is not _MISSING:
                break
        else:
            raise AttributeError(f"{cls.__name__}.{name}: none of {[type(r).__name__ for r in records]} has it")
        values.append(value)
    return cls._make(values)


def new_out(q, Ev, zeros=False):
    """fwd's out (B, Hq, L, Ev) for q (B, Hq, L, E), laid out like q, as torch's SDPA returns it: (B, L, Hq, Ev) in
    memory when q's heads are inner to its rows (q = x.view(B, L, Hq, E).transpose(1, 2), as models project it),
    else contiguous. csrc/host_params.cpp (alloc_out_lse) allocates the same; this copy serves where no C++ runs: the
    fake impls (shapes alone), the Triton launcher and the reference backend."""
    B, Hq, L, _ = q.shape
    make = q.new_zeros if zeros else q.new_empty
    return make(B, L, Hq, Ev).transpose(1, 2) if heads_inner(q) else make(B, Hq, L, Ev)


def heads_inner(q):
    """Whether q (B, Hq, L, E)'s heads are inner to its rows in memory (new_out's layout choice). Under torch.compile
    with an unbacked L, a contiguous q's strides compare as L * E < E, unknown while tracing: False, as the kernel finds
    at run time for every L (an empty dim's stride counts it as 1)."""
    return guard_or_false(q.stride(1) < q.stride(2))
