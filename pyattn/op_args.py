"""The attention ops' arguments, defined once for Python: csrc/ops.cpp's schemas as named tuples.

Every Python caller builds and reads op calls through these (by name, never by position), and the Triton ops
(pyattn/triton_ops.py) take their schemas from here; tests/contract/test_op_args.py checks them against the C++ schemas.
"""
from collections import namedtuple

from torch.fx.experimental.symbolic_shapes import guard_or_false

# the scalars of fwd and bwd between cu_seqlens_k and rng_state (semantics: csrc/params.h)
OPTIONS = ("SymInt max_seqlen_q", "SymInt max_seqlen_k", "float scale", "int window_left", "int window_right",
           "bool bottom_right", "float softcap", "float dropout_p")

FWD = ("Tensor q",  # (B, Hq, L, E)
       "Tensor k",  # (B, Hkv, S, E)
       "Tensor v",  # (B, Hkv, S, Ev)
       "Tensor? mask",  # (B, Hq, L, S) view, bool or float
       "Tensor? alibi_slopes",  # (B, Hq) float32
       "Tensor? cu_seqlens_q",  # (B + 1,) int32; varlen: q/k/v hold packed rows in batch 1
       "Tensor? cu_seqlens_k",  # (B + 1,) int32
       *OPTIONS,
       "Tensor? rng_state",  # (2,) int64 (seed, offset), when dropout_p > 0
       "Tensor? sinks=None")  # (Hq,) float32
FWD_RETURNS = "(Tensor out, Tensor lse)"

BWD = ("Tensor dout",  # (B, Hq, L, Ev)
       *FWD[:3],
       "Tensor out",  # (B, Hq, L, Ev): fwd's
       "Tensor lse",  # (B, Hq, L) float32: fwd's
       "Tensor? dlse",  # (B, Hq, L) float32
       *FWD[3:-1],
       "bool mask_grad",  # also return dmask (B, Hq, L, S) float32
       FWD[-1])
BWD_RETURNS = "(Tensor dq, Tensor dk, Tensor dv, Tensor dmask)"

KVCACHE_FWD = ("Tensor q",  # (B, L, Hq, E)
               "Tensor k_cache",  # (B_cache, S_max, Hkv, E), or paged (num_pages, page_size, Hkv, E)
               "Tensor v_cache",  # like k_cache, last dim Ev
               "Tensor seqlens_k",  # (B,) int32
               "Tensor? block_table",  # (B, max_pages) int32
               "Tensor? cache_batch_idx",  # (B,) int32
               "Tensor? cache_leftpad",  # (B,) int32
               "Tensor? alibi_slopes",  # (B, Hq) float32
               "Tensor? sinks",  # (Hq,) float32
               "float scale", "int window_left", "int window_right", "float softcap")
KVCACHE_FWD_RETURNS = FWD_RETURNS


def _name(decl):
    return decl.split()[1].split("=")[0]


def _tuple(typename, decls):
    """A namedtuple of the schema's arguments; those with a default (always None here) default to None."""
    return namedtuple(typename, [_name(d) for d in decls], defaults=(None,) * sum("=" in d for d in decls))


def schema(decls, returns):
    """torch.library schema text without the op name: '(Tensor q, ...) -> (Tensor out, Tensor lse)'."""
    return f"({', '.join(decls)}) -> {returns}"


def tensor_names(decls):
    return tuple(_name(d) for d in decls if d.startswith("Tensor"))


Options = _tuple("Options", OPTIONS)
FwdArgs = _tuple("FwdArgs", FWD)
BwdArgs = _tuple("BwdArgs", BWD)
KVCacheArgs = _tuple("KVCacheArgs", KVCACHE_FWD)


def pick(cls, *records, **given):
    """cls's fields from given, else from the first of records (AttnInputs, its KVCache part, another args tuple)
    with an attribute of that name."""
    def field(name):
        return given[name] if name in given else getattr(next(r for r in records if hasattr(r, name)), name)
    return cls(**{name: field(name) for name in cls._fields})


def new_out(q, Ev, zeros=False):
    """fwd's out (B, Hq, L, Ev) for q (B, Hq, L, E), laid out like q, as torch's SDPA returns it: (B, L, Hq, Ev) in
    memory when q's heads are inner to its rows (q = x.view(B, L, Hq, E).transpose(1, 2), as models project it),
    else contiguous. csrc/host_params.cpp (alloc_out_lse) allocates the same."""
    B, Hq, L, _ = q.shape
    make = q.new_zeros if zeros else q.new_empty
    return make(B, L, Hq, Ev).transpose(1, 2) if heads_inner(q) else make(B, Hq, L, Ev)


def heads_inner(q):
    """Whether q (B, Hq, L, E)'s heads are inner to its rows in memory (new_out's layout choice). Under torch.compile
    with an unbacked L, a contiguous q's strides compare as L * E < E, unknown while tracing: False, as the kernel finds
    at run time for every L (an empty dim's stride counts it as 1)."""
    return guard_or_false(q.stride(1) < q.stride(2))
