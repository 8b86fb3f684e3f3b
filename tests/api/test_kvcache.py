"""kvcache_attention: contiguous and paged caches, in-place append, ragged lengths, sinks, and bad calls that must
leave the cache untouched. The oracle is the same call on the reference backend in float64."""
from dataclasses import dataclass, field

import pytest
import torch

import pyattn
from helpers import assert_close_to_oracle, backend_params, dtype_id, half_dtype, paged_caches
from pyattn.op_args import KVCacheArgs

KV_BACKENDS = backend_params(["cpu"])


@dataclass
class KVCase:
    id: str
    lens: tuple  # cache_seqlens per sequence (before the append)
    L: int = 1  # queries per sequence
    L_new: int = 1  # appended tokens (0: none)
    Hq: int = 4
    Hkv: int = 2
    D: int = 16
    S_max: int = 48
    kw: dict = field(default_factory=dict)


CASES = [
    KVCase("decode", (5, 0, 33)),
    KVCase("decode-mqa", (7, 40), Hq=4, Hkv=1),
    KVCase("decode-noappend", (5, 1, 30), L_new=0),
    KVCase("chunk", (0, 9, 20), L=6, L_new=6),
    KVCase("chunk-long-gqa", (3, 20), L=40, L_new=40, Hq=8, Hkv=2, S_max=80),  # group * L > one tile
    KVCase("window", (5, 30), L=3, L_new=3, kw=dict(window_size=(6, 0))),
    KVCase("noncausal", (5, 30), L=3, L_new=3, kw=dict(is_causal=False)),
    KVCase("softcap-alibi", (12, 3), L=2, L_new=2, kw=dict(softcap=5.0, alibi=True)),
    KVCase("sinks", (0, 17, 31), L=2, L_new=2, kw=dict(sinks=True)),
    KVCase("dv", (6, 11), kw=dict(Dv=8)),
    # decode tiles of up to 8 rows: the CPU kernel reads the cache rows where they lie (decode_rows.h): several key
    # blocks (256) and chunks (1024), ragged lengths, 1 to 8 rows, head dims of 1 to 16 vectors
    KVCase("decode-rows", (1500, 0, 333), Hq=8, Hkv=2, D=64, S_max=1536),
    KVCase("decode-rows-mha-d128", (290, 1), Hq=2, Hkv=2, D=128, S_max=320),
    KVCase("decode-rows-g8-d96", (700, 257), Hq=16, Hkv=2, D=96, S_max=768, kw=dict(Dv=32)),
    KVCase("chunk-rows-g3", (300, 41), L=2, L_new=2, Hq=6, Hkv=2, D=32, S_max=320, kw=dict(sinks=True, softcap=20.0)),
    # 9 to 128 rows: bf16 and fp32 decode tiles score K as it lies and transpose the scores in blocks of 16 (36 rows:
    # two whole blocks and a partial one; partial key blocks)
    KVCase("chunk-tiles-g4", (700, 0, 301), L=9, L_new=9, Hq=8, Hkv=2, D=64, S_max=768),
]


def make(case: KVCase, dtype, page_size=None, generator_seed=0):
    """Inputs of a case: q, caches (contiguous, or paged with shuffled pages), k_new/v_new, kwargs."""
    g = torch.Generator().manual_seed(generator_seed)
    B, Dv = len(case.lens), case.kw.get("Dv", case.D)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q = rand(B, case.L, case.Hq, case.D)
    kc, vc = rand(B, case.S_max, case.Hkv, case.D), rand(B, case.S_max, case.Hkv, Dv)
    kw = dict(cache_seqlens=torch.tensor(case.lens, dtype=torch.int32))
    if case.L_new:
        kw.update(k_new=rand(B, case.L_new, case.Hkv, case.D), v_new=rand(B, case.L_new, case.Hkv, Dv))
    for name in ("window_size", "softcap", "is_causal"):
        if name in case.kw:
            kw[name] = case.kw[name]
    if case.kw.get("alibi"):
        kw["alibi_slopes"] = torch.rand(case.Hq, generator=g) * 0.3
    if case.kw.get("sinks"):
        kw["sinks"] = torch.randn(case.Hq, generator=g)
    if page_size is not None:
        kc, vc, kw["block_table"] = paged_caches(kc, vc, page_size, g)
    return q, kc, vc, kw


def run(q, kc, vc, kw, backend, dtype=None):
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() and t.dim() == 4 else t  # noqa: E731
    kw = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    kc, vc = cast(kc).clone(), cast(vc).clone()
    out, lse = pyattn.kvcache_attention(cast(q), kc, vc, return_lse=True, backend=backend, **kw)
    return out, lse, kc, vc


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
PAGE_SIZES = (None, 1, 16, 256)


def grid():
    """Every case x layout x dtype on the CPU capability in use; on the lower ones, fp32/bf16 and two layouts."""
    for bp in KV_BACKENDS:
        full = bp.id == "cpu"
        for dtype in DTYPES if full else (torch.float32, torch.bfloat16):
            for page_size in PAGE_SIZES if full else (None, 16):
                layout = "contiguous" if page_size is None else f"page{page_size}"
                for case in CASES:
                    yield pytest.param(case, page_size, dtype, *bp.values, marks=bp.marks,
                                       id=f"{case.id}-{layout}-{dtype_id(dtype)}-{bp.id}")


@pytest.mark.parametrize("case,page_size,dtype,backend,device", grid())
def test_kvcache_matches_reference(case, page_size, dtype, backend, device):
    q, kc, vc, kw = make(case, torch.float64, page_size)
    o_out, o_lse, o_kc, _ = run(q, kc, vc, kw, "reference")  # the oracle: float64
    b_out, b_lse, _, _ = run(q, kc, vc, kw, "reference", dtype)  # the baseline: plain math in dtype
    out, lse, kc2, vc2 = run(q, kc, vc, kw, backend, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_oracle("out", out, b_out, o_out, dtype)
    assert_close_to_oracle("lse", lse, b_lse, o_lse, dtype)
    assert torch.equal(kc2.double(), o_kc.to(dtype).double()), "the append wrote other cache entries than expected"


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [1, 3, 16], ids=lambda p: f"page{p}")
def test_paged_equals_contiguous(page_size, dtype, backend, device):
    """The same cache contents paged (shuffled, non-contiguous pages) or contiguous give identical results."""
    for case in (c for c in CASES if c.id in ("decode", "chunk", "chunk-long-gqa", "decode-rows", "chunk-rows-g3")):
        q, kc, vc, kw = make(case, dtype)
        qp, kp, vp, kwp = make(case, dtype, page_size)
        pages = kwp["block_table"].to(torch.int64)
        B, S_max = kc.shape[:2]
        kc = kp[pages].flatten(1, 2)[:, :S_max]
        vc = vp[pages].flatten(1, 2)[:, :S_max]
        a = run(q, kc, vc, kw, backend)[:2]
        b = run(q, kp, vp, kwp, backend)[:2]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), case.id



@pytest.mark.parametrize("backend,device", KV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [5, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("case", [KVCase("decode-long", (3000, 5100), Hq=8, Hkv=2, D=32, S_max=5104),
                                  KVCase("decode-many-heads", (2100, 1900), Hq=160, Hkv=20, D=32, S_max=2112)],
                         ids=lambda c: c.id)
def test_paged_decode_of_all_heads(case, page_size, dtype, backend, device):
    """Decode chunks long enough that a task takes every kv head (one thread), where the CPU kernel reads a page's
    keys of all heads together (one matmul; on AVX512-BF16 in memory order, in groups of heads when 20 heads of 8
    rows are more than a tile holds): identical to the contiguous cache, and close to the float64 oracle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q, kc, vc, kw = make(case, dtype)
        qp, kp, vp, kwp = make(case, dtype, page_size)
        pages = kwp["block_table"].to(torch.int64)
        kc, vc = (t[pages].flatten(1, 2)[:, :case.S_max] for t in (kp, vp))
        a = run(q, kc, vc, kw, backend)[:2]
        b = run(q, kp, vp, kwp, backend)[:2]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    f64 = {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in kw.items()}
    o_out = run(q.double(), kc.double(), vc.double(), f64, "reference")[0]
    base = run(q, kc, vc, kw, "reference")[0]
    assert_close_to_oracle("out", b[0], base, o_out, dtype)

@pytest.mark.parametrize("backend,device", KV_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [None, 5], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_prefill_over_long_caches_in_waves(page_size, dtype, backend, device):
    """Chunked prefill (group * L past a decode tile) over caches longer than a packing task's 4096 keys, odd
    lengths: the CPU kernel packs the keys a wave of (sequence, kv head) pairs at a time, as many pairs as give each
    thread 4 tasks (1, 2 or all 6 of them here, by the thread count), split by keys. The same results whatever the
    waves, and close to the float64 oracle."""
    case = KVCase("prefill-waves", (4500, 4101, 0), L=40, L_new=40, Hq=8, Hkv=2, D=32, S_max=4608)
    q, kc, vc, kw = make(case, dtype, page_size)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 8):
            torch.set_num_threads(n)
            outs.append(run(q, kc, vc, kw, backend)[:2])
    finally:
        torch.set_num_threads(threads)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
    f64 = {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in kw.items()}
    o_out = run(q.double(), kc.double(), vc.double(), f64, "reference")[0]
    assert_close_to_oracle("out", outs[0][0], run(q, kc, vc, kw, "reference")[0], o_out, dtype)


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
def test_append_then_attend_equals_dense(backend, device):
    """Appending L_new tokens then attending equals bottom-right causal attention on the whole sequences."""
    case = CASES[3]
    q, kc, vc, kw = make(case, torch.float64)
    out, _, kc2, vc2 = run(q, kc, vc, kw, backend)
    for b, n in enumerate(case.lens):
        k, v = kc2[b, :n + case.L_new].transpose(0, 1), vc2[b, :n + case.L_new].transpose(0, 1)
        assert torch.equal(kc2[b, n:n + case.L_new], kw["k_new"][b])
        want = pyattn.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, window_size=(-1, 0),
                                                   causal_alignment="bottom_right", enable_gqa=True,
                                                   backend="reference")
        torch.testing.assert_close(out[b].transpose(0, 1), want, rtol=1e-10, atol=1e-10)


def test_cache_batch_idx_and_leftpad():
    """cache_batch_idx picks rows; cache_leftpad starts each sequence later (positions counted from there)."""
    case = CASES[0]
    q, kc, vc, kw = make(case, torch.float64)
    kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    kw["cache_seqlens"] = torch.tensor([9, 4, 30], dtype=torch.int32)
    kw["cache_leftpad"] = torch.tensor([3, 0, 11], dtype=torch.int32)
    kc, vc = torch.cat([kc, kc[:1]]), torch.cat([vc, vc[:1]])  # 4 rows for 3 sequences
    o_ref = run(q, kc, vc, kw, "reference")
    o_cpu = run(q, kc, vc, kw, "cpu")
    torch.testing.assert_close(o_cpu[0], o_ref[0], rtol=1e-10, atol=1e-10)
    for b, (row, start, n) in enumerate(zip((2, 0, 1), (3, 0, 11), (9, 4, 30))):
        k = o_ref[2][row, start:n + 1].transpose(0, 1)
        v = o_ref[3][row, start:n + 1].transpose(0, 1)
        want = pyattn.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, enable_gqa=True, backend="reference")
        torch.testing.assert_close(o_ref[0][b].transpose(0, 1), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("page_size", [None, 16], ids=lambda p: "contiguous" if p is None else f"page{p}")
def test_cache_batch_idx_and_leftpad_in_bf16_decode(page_size):
    """cache_batch_idx and cache_leftpad where the CPU kernel reads bf16 decode rows directly (decode-rows): close to
    the float64 oracle."""
    case = next(c for c in CASES if c.id == "decode-rows")
    q, kc, vc, kw = make(case, torch.float64)
    kw["cache_leftpad"] = torch.tensor([5, 0, 17], dtype=torch.int32)
    if page_size is None:
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    else:
        kc, vc, kw["block_table"] = paged_caches(kc, vc, page_size, torch.Generator().manual_seed(3))
    o_out = run(q, kc, vc, kw, "reference")[0]
    base = run(q, kc, vc, kw, "reference", torch.bfloat16)[0]
    out = run(q, kc, vc, kw, "cpu", torch.bfloat16)[0]
    assert_close_to_oracle("out", out, base, o_out, torch.bfloat16)


def test_kvcache_gradients_by_finite_differences():
    """With autograd on, the reference backend runs it: gradients of q, the caches and the sinks in float64."""
    case = KVCase("tiny", (3, 0, 6), L=2, L_new=0, Hq=2, Hkv=1, D=4, S_max=8, kw=dict(sinks=True))
    q, kc, vc, kw = make(case, torch.float64, page_size=3)
    kw["sinks"] = kw["sinks"].double()

    def f(q, kc, vc, sinks):
        return pyattn.kvcache_attention(q, kc, vc, **{**kw, "sinks": sinks})

    args = (q.requires_grad_(), kc.requires_grad_(), vc.requires_grad_(), kw["sinks"].requires_grad_())
    assert "reference" in pyattn.explain(*args[:3], **{**kw, "sinks": args[3]}).split("chosen")[0].splitlines()[-1]
    torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("api", ["dense", "varlen"])
def test_sinks_gradients_by_finite_differences(api, backend):
    """sinks fwd + bwd in float64: q, k, v and sinks against finite differences (lse is float32 by contract, so
    its gradient is compared with the reference's instead)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    sinks = torch.randn(3, generator=g, dtype=torch.float64)
    if api == "dense":
        def f(q, k, v, sinks):
            return pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, sinks=sinks, return_lse=True,
                                                       backend=backend)[0]
    else:
        cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)

        def f(q, k, v, sinks):
            return pyattn.varlen_attention(q, k, v, cu_q, cu_k, 3, 4, is_causal=True, sinks=sinks, return_lse=True,
                                           backend=backend)[0]
    args = tuple(t.requires_grad_() for t in (q, k, v, sinks))
    torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
def test_sinks_lse_gradient_matches_reference(backend, device):
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    sinks = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grads = []
    for name in (backend, "reference"):
        out, lse = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, sinks=sinks, return_lse=True,
                                                       backend=name)
        grads.append(torch.autograd.grad((out.sum(-1) * lse.cos()).sum() + lse.sum(), (q, k, v, sinks)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sinks_fully_masked_row_gives_zero_and_the_sink():
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    sinks = torch.tensor([0.5, -1.0])
    for backend in ("cpu", "reference"):
        out, lse = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True,
                                                       backend=backend)
        assert torch.equal(out[0, :, 1], torch.zeros(2, 8)) and torch.allclose(lse[0, :, 1], sinks), backend


@pytest.mark.parametrize("backend,device", KV_BACKENDS)
def test_sinks_half_matches_reference(backend, device):
    dtype = half_dtype(backend)
    q, k, v = (torch.randn(1, 4, 40, 16, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(4) * 2
    oracle = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, sinks=sinks, backend="reference")
    ours, base = (pyattn.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True,
                                                      sinks=sinks, backend=name) for name in (backend, "reference"))
    assert_close_to_oracle("out", ours, base, oracle, dtype)


def _bad_calls():
    """(id, kwargs update, expected message part): each must raise before writing anything."""
    return [
        ("page-out-of-range", dict(block_table=lambda kw: kw["block_table"].masked_fill(
            torch.zeros_like(kw["block_table"], dtype=torch.bool).index_fill_(1, torch.tensor([0]), True), 99)),
         "block_table"),
        ("over-capacity", dict(cache_seqlens=lambda kw: torch.tensor([5, 0, 48], dtype=torch.int32)), "capacity"),
        ("negative-seqlen", dict(cache_seqlens=lambda kw: torch.tensor([5, -1, 3], dtype=torch.int32)), "capacity"),
        ("seqlens-dtype", dict(cache_seqlens=lambda kw: kw["cache_seqlens"].long()), "int32"),
        ("k-new-dtype", dict(k_new=lambda kw: kw["k_new"].double()), "k_new"),
        ("k-new-alone", dict(v_new=lambda kw: None), "together"),
        ("k-new-heads", dict(k_new=lambda kw: kw["k_new"][:, :, :1]), "k_new"),
        ("sinks-shape", dict(sinks=lambda kw: torch.zeros(3)), "sinks"),
        ("batch-idx-with-pages", dict(cache_batch_idx=lambda kw: torch.zeros(3, dtype=torch.int32)),
         "cache_batch_idx"),
        ("leftpad-past-seqlen", dict(cache_leftpad=lambda kw: torch.tensor([6, 0, 0], dtype=torch.int32)),
         "cache_leftpad"),
    ]


@pytest.mark.parametrize("bad", _bad_calls(), ids=lambda b: b[0])
def test_bad_calls_leave_the_cache_untouched(bad):
    _, update, message = bad
    q, kc, vc, kw = make(CASES[0], torch.float32, page_size=16)
    for name, fn in update.items():
        kw[name] = fn(kw)
    k_before, v_before = kc.clone(), vc.clone()
    with pytest.raises((ValueError, TypeError), match=message) as e:
        pyattn.kvcache_attention(q, kc, vc, **kw)
    assert isinstance(e.value, RuntimeError)
    assert torch.equal(kc, k_before) and torch.equal(vc, v_before)


@pytest.mark.parametrize("column,fails", [(0, False), (1, True), (4, True), (5, False), (7, False)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("value", [-1, 40])
def test_only_the_pages_a_sequence_reads_are_checked(column, fails, value):
    """Sequence 0 reads positions [6, 17) (cache_leftpad 6, 15 cached and 2 appended) of pages of 4: block table
    columns 1 to 4, the last one only for the appended keys. An entry outside the cache anywhere else (-1 for a free
    slot, as serving engines leave them) is never read and must not fail the call."""
    g = torch.Generator().manual_seed(0)
    kp, vp = torch.randn(40, 4, 2, 16, generator=g), torch.randn(40, 4, 2, 16, generator=g)
    table = torch.arange(16, dtype=torch.int32).view(2, 8)
    table[0, column] = value
    kw = dict(cache_seqlens=torch.tensor([15, 3], dtype=torch.int32), block_table=table,
              cache_leftpad=torch.tensor([6, 0], dtype=torch.int32), k_new=torch.randn(2, 2, 2, 16, generator=g),
              v_new=torch.randn(2, 2, 2, 16, generator=g))
    q = torch.randn(2, 2, 4, 16, generator=g)
    k_before = kp.clone()
    if fails:
        with pytest.raises(ValueError, match=rf"block_table\[0, {column}\] = {value} is not a page"):
            pyattn.kvcache_attention(q, kp, vp, **kw)
        assert torch.equal(kp, k_before)
    else:
        out = pyattn.kvcache_attention(q, kp, vp, **kw)
        want = pyattn.kvcache_attention(q, kp.clone(), vp.clone(), **{**kw, "block_table": torch.where(
            table < 0, 39, table.clamp(max=39))}, backend="reference")
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged"])
def test_indices_cross_to_the_host_once(page_size, monkeypatch):
    """A valid call reads its indices back in one transfer: on a GPU each read is a sync, and a serving loop calls
    kvcache_attention in every layer of every step."""
    q, kc, vc, kw = make(CASES[0], torch.float32, page_size=page_size)
    kw["cache_leftpad"] = torch.zeros(3, dtype=torch.int32)
    if page_size is None:
        kw["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _m=method, _n=name: reads.append(_n) or _m(t, *a))
    pyattn.kvcache_attention(q, kc, vc, **kw, backend="cpu")  # the fused kernels read nothing back
    assert reads == ["tolist"]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
def test_autocast_appends_to_the_callers_cache(cache_dtype, page_size):
    # under autocast the new tokens (bf16 from a Linear) land in the caller's cache, whatever its dtype, and the step
    # equals the same call without autocast with q and the new tokens in the cache's dtype
    torch.manual_seed(0)
    B, S_max, Hq, Hkv, D = 2, 12, 4, 2, 16
    lens = torch.tensor([3, 7], dtype=torch.int32)
    shape = (B, S_max, Hkv, D) if page_size is None else (B * S_max // page_size, page_size, Hkv, D)
    k_cache, v_cache = (torch.randn(shape).to(cache_dtype) for _ in range(2))
    table = None if page_size is None else torch.randperm(shape[0]).int().view(B, -1)
    q, k_new, v_new = (torch.randn(B, 1, h, D, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    caches = (k_cache.clone(), v_cache.clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pyattn.kvcache_attention(q, k_cache, v_cache, k_new=k_new, v_new=v_new, cache_seqlens=lens,
                                       block_table=table)
    expected = pyattn.kvcache_attention(q.to(cache_dtype), *caches, k_new=k_new.to(cache_dtype),
                                        v_new=v_new.to(cache_dtype), cache_seqlens=lens, block_table=table)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    assert out.dtype == cache_dtype and torch.equal(out, expected)

def test_table_of_no_pages_attends_to_nothing():
    """A paged call whose block_table has no columns (nothing cached, nothing appended): every row sees no key,
    so out is 0 and lse -inf, as for any fully masked row; the index checks have nothing to look at."""
    q, kc = torch.randn(2, 1, 4, 8), torch.zeros(3, 16, 2, 8)
    no_pages = torch.zeros(2, 0, dtype=torch.int32)
    out, lse = pyattn.kvcache_attention(q, kc, kc.clone(), cache_seqlens=0, block_table=no_pages, return_lse=True,
                                        backend="cpu")
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())


def test_contiguous_cache_errors():
    q, kc, vc, kw = make(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="B_cache"):
        pyattn.kvcache_attention(q, kc[:2], vc[:2], **kw)
    kw["cache_batch_idx"] = torch.tensor([0, 5, 1], dtype=torch.int32)
    before = kc.clone()
    with pytest.raises(ValueError, match="cache_batch_idx"):
        pyattn.kvcache_attention(q, kc, vc, **kw)
    assert torch.equal(kc, before)


def test_op_checks_indices_itself():
    """The CPU op checks the indices too (on the CPU that costs nothing): a direct call cannot read out of bounds."""
    q, kc, vc, kw = make(CASES[0], torch.float32, page_size=16)
    bt = kw["block_table"].clone()
    bt[1, 0] = 1000
    args = KVCacheArgs(q=q, k_cache=kc, v_cache=vc, seqlens_k=torch.tensor([5, 3, 2], dtype=torch.int32),
                       block_table=bt, cache_batch_idx=None, cache_leftpad=None, alibi_slopes=None, sinks=None,
                       scale=0.25, window_left=-1, window_right=0, softcap=0.0)
    with pytest.raises(RuntimeError, match="block_table"):
        torch.ops.pyattn.kvcache_fwd(*args)
    with pytest.raises(RuntimeError, match="capacity"):
        torch.ops.pyattn.kvcache_fwd(*args._replace(seqlens_k=torch.tensor([5, 3, 2000], dtype=torch.int32),
                                                    block_table=kw["block_table"]))


def test_opcheck_kvcache_fwd():
    for page_size in (None, 16):
        q, kc, vc, kw = make(CASES[8], torch.float32, page_size)
        args = KVCacheArgs(q=q, k_cache=kc, v_cache=vc, seqlens_k=kw["cache_seqlens"] + 2,
                           block_table=kw.get("block_table"), cache_batch_idx=None, cache_leftpad=None,
                           alibi_slopes=None, sinks=kw["sinks"], scale=0.25, window_left=-1, window_right=0,
                           softcap=0.0)
        torch.library.opcheck(torch.ops.pyattn.kvcache_fwd.default, args)


@pytest.mark.compiles  # torch.compile's default backend
def test_compiled_decode_step_matches_eager():
    q, kc, vc, kw = make(CASES[0], torch.float32, page_size=16)
    step = torch.compile(pyattn.kvcache_attention, fullgraph=True)
    kc2, vc2 = kc.clone(), vc.clone()
    want = pyattn.kvcache_attention(q, kc, vc, **kw)
    got = step(q, kc2, vc2, **kw)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


def test_explain_covers_kvcache():
    q, kc, vc, kw = make(CASES[0], torch.float32, page_size=16)
    text = pyattn.explain(q, kc, vc, **kw)
    assert "kvcache" in text and "paged kv cache" in text and "chosen" in text
    assert "torch" in text and "cannot" in text
