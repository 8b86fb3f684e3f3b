"""Context parallelism (pyattn.distributed) on gloo over loopback: world sizes 2 and 4, spawned once per world
size; every check runs inside that one process group and reports here.

Each sharded result (out, lse, dq, dk, dv) is unsharded and judged against single-process pyattn on the
unsplit sequence and the float64 oracle, by the project's rule (helpers.assert_close_to_oracle).
"""
import contextlib
import functools
import os
import traceback
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

import pyattn
from helpers import ATOL, assert_close_to_oracle
from pyattn import AttentionInputError
from pyattn import features as F
from pyattn.distributed import positions, ring, ring_attention, shard, ulysses_attention, unshard
from pyattn.distributed.comm import recording
from pyattn.distributed.layout import rank_chunks
from pyattn.distributed.local import run_local
from pyattn.distributed.ring import rank_plan

WORLDS = (2, 4)
FUNCTIONS = {"ring": ring_attention, "ulysses": ulysses_attention}


@dataclass(frozen=True)
class Case:
    id: str
    fn: str  # "ring" | "ulysses"
    layout: str = "zigzag"
    dtype: torch.dtype = torch.float32
    B: int = 2
    Hq: int = 4
    Hkv: int = 4
    chunk: int = 8  # tokens per zigzag chunk: N = 2 * P * chunk
    D: int = 16
    alibi: tuple = ()  # slopes shape
    kwargs: dict = field(default_factory=dict)
    backend: str = "cpu"
    fp32_accurate: bool = False  # float64 through the ring: merged by the kernels' float32 LSE
    min_piece: int = 2  # ring.MIN_PIECE_TOKENS: small, so that these short shards travel in pieces

    def shapes(self, world):
        N = 2 * world * self.chunk
        return (self.B, self.Hq, N, self.D), (self.B, self.Hkv, N, self.D)


def _ids(*cases):
    return {c.id: c for c in cases}


CASES = _ids(
    Case("ring-full-contiguous", "ring", "contiguous"),
    Case("ring-full-zigzag", "ring"),
    # contiguous causal: rank 0 sees none of the other ranks' shards (every remote block skipped)
    Case("ring-causal-contiguous", "ring", "contiguous", kwargs={"is_causal": True}),
    Case("ring-causal-zigzag", "ring", kwargs={"is_causal": True}),
    Case("ring-causal-zigzag-bf16", "ring", dtype=torch.bfloat16, kwargs={"is_causal": True}),
    Case("ring-causal-zigzag-whole-shards", "ring", min_piece=512, kwargs={"is_causal": True}),
    Case("ring-full-contiguous-whole-shards", "ring", "contiguous", min_piece=512),
    Case("ring-causal-zigzag-fp64", "ring", dtype=torch.float64, kwargs={"is_causal": True}, fp32_accurate=True),
    Case("ring-gqa-causal-zigzag", "ring", Hkv=2, kwargs={"is_causal": True, "enable_gqa": True}),
    Case("ring-window-5-3-zigzag", "ring", kwargs={"window_size": (5, 3)}),
    Case("ring-window-7-0-contiguous", "ring", "contiguous", kwargs={"window_size": (7, 0)}),
    # a window shorter than a chunk: most ranks' shards fall wholly outside the band
    Case("ring-causal-window-3-zigzag", "ring", kwargs={"is_causal": True, "window_size": (3, -1)}),
    Case("ring-window-13-11-zigzag-bf16", "ring", dtype=torch.bfloat16, kwargs={"window_size": (13, 11)}),
    Case("ring-softcap-causal-zigzag", "ring", kwargs={"is_causal": True, "softcap": 2.0}),
    Case("ring-alibi-causal-zigzag", "ring", alibi=(4,), kwargs={"is_causal": True}),
    Case("ring-alibi-BH-window-contiguous", "ring", "contiguous", alibi=(2, 4), kwargs={"window_size": (9, 4)}),
    Case("ring-alibi-full-zigzag-bf16", "ring", dtype=torch.bfloat16, alibi=(4,)),
    Case("ring-combo-gqa-window-softcap-alibi-scale-lse", "ring", Hkv=2, alibi=(4,),
         kwargs={"enable_gqa": True, "window_size": (11, 2), "softcap": 3.0, "scale": 0.4, "return_lse": True}),
    Case("ring-lse-causal-zigzag-bf16", "ring", dtype=torch.bfloat16, kwargs={"is_causal": True, "return_lse": True}),
    Case("ring-triton-causal-zigzag", "ring", B=1, Hq=2, Hkv=2, chunk=4, kwargs={"is_causal": True},
         backend="triton"),
    Case("ulysses-full-contiguous", "ulysses", "contiguous"),
    Case("ulysses-causal-zigzag", "ulysses", kwargs={"is_causal": True}),
    Case("ulysses-causal-zigzag-bf16", "ulysses", dtype=torch.bfloat16, kwargs={"is_causal": True}),
    Case("ulysses-combo-gqa-window-softcap-alibi-lse", "ulysses", Hq=8, Hkv=4, alibi=(8,),
         kwargs={"enable_gqa": True, "window_size": (6, 0), "softcap": 3.0, "return_lse": True}),
)


def _inputs(case, world, dtype):
    """Full-sequence q, k, v, slopes and cotangents, the same on every rank (one seed)."""
    g = torch.Generator().manual_seed(0)
    qs, kvs = case.shapes(world)
    t = {"q": torch.randn(qs, generator=g), "k": torch.randn(kvs, generator=g), "v": torch.randn(kvs, generator=g),
         "dout": torch.randn(qs, generator=g), "dlse": torch.randn(qs[:-1], generator=g)}
    t = {n: x.to(dtype) if n != "dlse" else x for n, x in t.items()}
    slopes = (torch.rand(case.alibi, generator=g) * 0.5 + 0.05) if case.alibi else None
    return t, slopes


def _loss(outs, t):
    out, lse = outs if isinstance(outs, tuple) else (outs, None)
    loss = (out.float() * t["dout"].float()).sum()
    return loss + ((lse * t["dlse"]).sum() if lse is not None else 0)


def _single(case, world, dtype, backend):
    """Single-process pyattn on the unsplit sequence: outputs and grads."""
    t, slopes = _inputs(case, world, dtype)
    q, k, v = (t[n].detach().requires_grad_() for n in "qkv")
    outs = pyattn.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes, backend=backend, **case.kwargs)
    grads = torch.autograd.grad(_loss(outs, t), (q, k, v))
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs], list(grads)


@contextlib.contextmanager
def pieces_of(tokens):
    """ring_attention's shards travel in pieces of at least tokens keys while inside."""
    saved, ring.MIN_PIECE_TOKENS = ring.MIN_PIECE_TOKENS, tokens
    try:
        yield
    finally:
        ring.MIN_PIECE_TOKENS = saved


def _sharded(case, world, layout=None):
    """The case through the distributed function, unsharded: outputs and grads on the full sequence."""
    layout = layout or case.layout
    t, slopes = _inputs(case, world, case.dtype)
    t = {n: shard(x, layout=layout, seq_dim=2 if n != "dlse" else -1) for n, x in t.items()}
    q, k, v = (t[n].requires_grad_() for n in "qkv")
    with pieces_of(case.min_piece):
        outs = FUNCTIONS[case.fn](q, k, v, layout=layout, alibi_slopes=slopes, backend=case.backend, **case.kwargs)
        grads = torch.autograd.grad(_loss(outs, t), (q, k, v))
    outs = outs if isinstance(outs, tuple) else (outs,)
    full = [unshard(o.detach(), layout=layout, seq_dim=2 if o.dim() == 4 else -1) for o in outs]
    return full, [unshard(g, layout=layout) for g in grads]


def check_matches_single_process(case, world):
    ours_out, ours_grads = _sharded(case, world)
    oracle_out, oracle_grads = _single(case, world, torch.float64, "reference")
    base_out, base_grads = _single(case, world, case.dtype, "reference")
    single_out, _ = _single(case, world, case.dtype, case.backend)
    atol = ATOL[torch.float32] if case.fp32_accurate else None
    for name, y, b, o in zip(("out", "lse"), ours_out, base_out, oracle_out):
        assert_close_to_oracle(name, y, b, o, case.dtype, atol)
    for name, y, b, o in zip(("dq", "dk", "dv"), ours_grads, base_grads, oracle_grads):
        assert_close_to_oracle(name, y, b, o, case.dtype, atol)
    if case.dtype == torch.float32:  # fp32: the merge by LSE adds no more than float32 rounding
        err = (ours_out[0] - single_out[0]).abs().max().item()
        assert err <= ATOL[torch.float32] * max(1.0, single_out[0].abs().max().item()), \
            f"out differs from single-process pyattn by {err:.3g}"


def check_deterministic(world):
    """Bitwise the same results for the same inputs and world size."""
    for case in (CASES["ring-gqa-causal-zigzag"], CASES["ulysses-combo-gqa-window-softcap-alibi-lse"]):
        first, again = _sharded(case, world), _sharded(case, world)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b), case.id


def _dropout_run(fn, world, seed, p=0.3, layout="zigzag"):
    """Causal attention with dropout and v = identity (Ev = N), so out is the dropped attention matrix itself
    (B, H, N, N): the keep mask and its scaling are visible. -> q, k, v (full), out, grads (full), dout."""
    N = 8 * world
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 8, N, 8, generator=g), torch.randn(1, 8, N, 8, generator=g)
    v = torch.eye(N).expand(1, 8, N, N).contiguous()
    dout = torch.randn(1, 8, N, N, generator=g)
    qs, ks, vs = (shard(x, layout=layout).requires_grad_() for x in (q, k, v))
    torch.manual_seed(seed)
    with pieces_of(2):
        out = fn(qs, ks, vs, is_causal=True, dropout_p=p, layout=layout)
        grads = torch.autograd.grad((out * shard(dout, layout=layout)).sum(), (qs, ks, vs))
    return (q, k, v), unshard(out.detach(), layout=layout), [unshard(x, layout=layout) for x in grads], dout


def check_dropout(fn_name, world, p=0.3):
    fn = FUNCTIONS[fn_name]
    (q, k, v), a, grads, dout = _dropout_run(fn, world, seed=7, p=p)
    _, again, grads_again, _ = _dropout_run(fn, world, seed=7, p=p)
    _, other, _, _ = _dropout_run(fn, world, seed=8, p=p)
    assert torch.equal(a, again) and all(torch.equal(x, y) for x, y in zip(grads, grads_again)), \
        "the same seed gave a different mask"
    assert not torch.equal(a, other), "another seed gave the same mask"
    N = a.shape[-1]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    keep = a != 0  # a kept weight is softmax > 0
    dropped = 1 - keep[..., causal].double().mean().item()
    assert abs(dropped - p) < 0.1, f"dropped {dropped:.2f} of the weights, expected about {p}"
    assert not keep[..., ~causal].any(), "a weight above the causal diagonal"

    # gradients of softmax(q k^T) * keep / (1 - p) @ v with the forward's mask, in float64 and float32
    def explicit(dtype):
        qe, ke, ve = (x.to(dtype).requires_grad_() for x in (q, k, v))
        s = (qe @ ke.transpose(-2, -1) * 8 ** -0.5).masked_fill(~causal, float("-inf"))
        out = torch.softmax(s, -1) * keep / (1 - p) @ ve
        return out.detach(), torch.autograd.grad((out * dout.to(dtype)).sum(), (qe, ke, ve))

    (o_out, o_grads), (b_out, b_grads) = explicit(torch.float64), explicit(torch.float32)
    assert_close_to_oracle("out", a, b_out, o_out, torch.float32)
    for name, y, b, o in zip(("dq", "dk", "dv"), grads, b_grads, o_grads):
        assert_close_to_oracle(name, y, b, o, torch.float32)


def _raises(fn, exc, *words):
    """fn() raises exc with every one of words in its message -> the message."""
    try:
        fn()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"message lacks {missing}: {e}"
        return str(e)
    raise AssertionError(f"no {exc.__name__} raised")


def check_bad_input(world):
    x = torch.randn(1, 2, 2 * world * 4 + 1, 8)  # N not a multiple of 2P
    _raises(lambda: shard(x), ValueError, str(x.shape[2]), "zigzag", f"multiple of {2 * world}")
    _raises(lambda: shard(x, layout="diagonal"), ValueError, "layout")
    q = torch.randn(1, 2, 5, 8)  # a zigzag shard of odd length
    _raises(lambda: ring_attention(q, q, q), ValueError, "(1, 2, 5, 8)", "multiple of 2")
    q = torch.randn(1, 2, 8, 8)
    _raises(lambda: ring_attention(q, q[:, :, :4], q), ValueError, "(1, 2, 8, 8)", "(1, 2, 4, 8)")
    _raises(lambda: ring_attention(q, q[:, :1], q[:, :1]), ValueError, "enable_gqa")
    _raises(lambda: ring_attention(q[0], q[0], q[0]), ValueError, "4-D", "(2, 8, 8)")
    # what any attention call must satisfy is dense_inputs' to check; its messages name the caller here too
    _raises(lambda: ring_attention(q.tolist(), q, q), TypeError, "ring_attention:", "query must be a torch.Tensor")
    _raises(lambda: ring_attention(q, q[..., :4], q), ValueError, "ring_attention:", "head dim", "(1, 2, 8, 4)")
    heads = 2 * world + 1  # not a multiple of the world size
    qh = torch.randn(1, heads, 8, 8)
    _raises(lambda: ulysses_attention(qh, qh, qh), ValueError, f"({heads})", f"multiples of {world}")


def check_forced_backend_refusals(world):
    """A forced backend that cannot run a block raises AttentionInputError with the reasons choose() gives for the
    block's own record: a causal ring's blocks are causal or unbanded, never windowed; those of a window shorter
    than their rows are windowed."""
    q = torch.randn(1, 2, 8, 8)
    message = _raises(lambda: ring_attention(q, q, q, is_causal=True, backend="torch"), AttentionInputError,
                      "ring_attention:", "'torch' cannot run", F.RETURN_LSE)
    assert F.SLIDING_WINDOW not in message, message
    _raises(lambda: ring_attention(q, q, q, window_size=(1, 0), backend="torch"), AttentionInputError,
            "'torch' cannot run", F.SLIDING_WINDOW, F.RETURN_LSE)
    _raises(lambda: ring_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="triton"), AttentionInputError,
            "'triton' cannot run", "bfloat16")
    _raises(lambda: ring_attention(q, q, q, dropout_p=1.0, backend="cpu"), AttentionInputError,
            "'cpu' cannot run", "dropout_p == 1")
    _raises(lambda: ring_attention(q, q, q, backend="reference"), AttentionInputError,
            "'reference' has no block backward", "cpu")
    qh = torch.randn(1, 2 * world, 8, 8)
    _raises(lambda: ulysses_attention(qh, qh, qh, return_lse=True, backend="torch"), AttentionInputError,
            "'torch' cannot run", F.RETURN_LSE)


def check_positions(world):
    for layout in ("contiguous", "zigzag"):
        N = 4 * world
        assert torch.equal(positions(N, layout=layout), shard(torch.arange(N), layout=layout, seq_dim=0))
        x = torch.randn(2, 3, N, 5, requires_grad=True)
        full = unshard(shard(x, layout=layout), layout=layout)
        assert torch.equal(full, x)
        # each rank's sum is a function of every rank's shard: the gradient a shard gets is the sum of P ones
        (grad,) = torch.autograd.grad(full.sum(), x)
        mine = torch.zeros(N, dtype=torch.bool)
        mine[positions(N, layout=layout)] = True
        assert torch.equal(grad[:, :, mine], torch.full_like(grad[:, :, mine], float(world)))
        assert not grad[:, :, ~mine].any()


def check_dtensor_inputs(world):
    """DTensors sharded on the sequence dim run on their local shards and come back as DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    t, _ = _inputs(CASES["ulysses-causal-zigzag"], world, torch.float32)
    for fn in FUNCTIONS.values():
        local = [shard(t[n]).requires_grad_() for n in "qkv"]
        out = fn(*(DTensor.from_local(x, mesh, (Shard(2),)) for x in local), is_causal=True, return_lse=True)
        assert all(isinstance(o, DTensor) and o.placements == (Shard(2),) for o in out)
        grads = torch.autograd.grad(out[0].to_local().sum(), local)
        plain = [x.detach().requires_grad_() for x in local]
        expected = fn(*plain, is_causal=True, return_lse=True)
        assert torch.equal(out[0].to_local(), expected[0]) and torch.equal(out[1].to_local(), expected[1])
        assert all(torch.equal(g, e) for g, e in zip(grads, torch.autograd.grad(expected[0].sum(), plain)))
    replicated = DTensor.from_local(t["q"], mesh, (Replicate(),))
    _raises(lambda: ring_attention(replicated, replicated, replicated), ValueError, "Shard(2)")


def check_inside_torch_context_parallel(world):
    """torch's context_parallel shards its buffers head-and-tail, pyattn's zigzag: ring_attention runs on them
    (on the CPU, where torch's own F.scaled_dot_product_attention under context_parallel has no CPU kernel)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (world,))
    t, _ = _inputs(CASES["ring-causal-zigzag"], world, torch.float32)
    expected = shard(pyattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True))
    buffers = [t[n].clone() for n in "qkv"]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        out = ring_attention(*buffers, group=mesh.get_group(), is_causal=True)
    err = (out - expected).abs().max().item()
    assert err <= ATOL[torch.float32] * max(1.0, expected.abs().max().item()), err


def _peak_extra_bytes(step):
    """Peak RSS growth (VmHWM after resetting it) while step() runs, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    step()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return peak - before


MEMORY_SHARD = (1, 8, 2048, 64)  # fixed N/P: 4 MiB of float32 per q/k/v shard


def measure_memory(world):
    """Peak extra memory of one causal forward+backward per rank at fixed N/P, and the bytes it sent."""
    q, k, v = (torch.randn(MEMORY_SHARD, requires_grad=True) for _ in range(3))

    def step():
        out = ring_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    step()  # warm: code paths, thread pools, the allocator
    with recording() as stats:
        peak = _peak_extra_bytes(step)
    return {"peak_extra_bytes": peak, "bytes_sent": stats["bytes_sent"]}


def _all_checks(world):
    """Runs in each spawned process: every check -> {name: {"ok", "value" or "error"}}."""
    checks = {f"match-{cid}": functools.partial(check_matches_single_process, case) for cid, case in CASES.items()}
    checks.update({"deterministic": check_deterministic, "dropout-ring": functools.partial(check_dropout, "ring"),
                   "dropout-ulysses": functools.partial(check_dropout, "ulysses"), "bad-input": check_bad_input,
                   "forced-backend": check_forced_backend_refusals,
                   "positions": check_positions, "dtensor": check_dtensor_inputs,
                   "torch-context-parallel": check_inside_torch_context_parallel, "memory": measure_memory})
    results = {}
    for name, check in checks.items():
        try:
            results[name] = {"ok": True, "value": check(world=world)}
        except Exception as e:  # reported by the test of that name
            results[name] = {"ok": False, "error": f"rank {dist.get_rank()}: {type(e).__name__}: {e}\n"
                                                   f"{traceback.format_exc()}"}
    return results


@functools.cache
def run_world(world):
    """Spawns world processes once and runs every check there -> [results of rank r for r in range(world)].
    Large buffers come straight from mmap, so freed memory leaves the RSS that the memory check reads. The ranks
    talk over gloo on CPU tensors, so the Triton case runs under its interpreter there, on a GPU machine too."""
    return run_local(_all_checks, world, world, env={"MALLOC_MMAP_THRESHOLD_": "65536", "TRITON_INTERPRET": "1"},
                     timeout=600)


def _result(world, name):
    ranks = run_world(world)
    for res in ranks:
        assert res[name]["ok"], res[name]["error"]
    return [res[name]["value"] for res in ranks]


@pytest.fixture(params=[pytest.param(w, id=f"P{w}", marks=pytest.mark.subprocess) for w in WORLDS])
def world(request):
    return request.param


@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_single_process(world, case_id):
    _result(world, f"match-{case_id}")


def test_deterministic(world):
    _result(world, "deterministic")


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_dropout_reproducible_and_backward_uses_the_forward_mask(world, fn):
    _result(world, f"dropout-{fn}")


def test_bad_input_raises_clearly(world):
    _result(world, "bad-input")


def test_forced_backend_that_cannot_run_a_block_names_its_reasons(world):
    _result(world, "forced-backend")


def test_positions_shard_unshard(world):
    _result(world, "positions")


def test_dtensor_inputs(world):
    _result(world, "dtensor")


def test_runs_inside_torch_context_parallel(world):
    _result(world, "torch-context-parallel")


@pytest.mark.subprocess
def test_memory_does_not_grow_with_world_size():
    """At fixed N/P a rank's peak extra memory stays the same from P = 2 to P = 4 (nothing of size N is
    gathered), and it sends each K/V shard on once per step forward and K/V + float32 dK/dV backward."""
    shard_bytes = torch.tensor(MEMORY_SHARD).prod().item() * 4
    peaks = {}
    for w in WORLDS:
        per_rank = _result(w, "memory")
        peaks[w] = max(r["peak_extra_bytes"] for r in per_rank)
        # forward: (P - 1) K/V hops; backward: (P - 1) K/V hops and P dK/dV hops (float32)
        expected = (w - 1) * 2 * shard_bytes * 2 + w * 2 * shard_bytes
        assert all(r["bytes_sent"] == expected for r in per_rank), (per_rank, expected)
    assert peaks[4] <= 1.25 * peaks[2] + 4 * 2**20, peaks
    assert peaks[4] <= 32 * shard_bytes, (peaks, shard_bytes)


@pytest.fixture
def world_of_one(tmp_path):
    """This pytest process as a process group of one (gloo)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_world_of_one_is_single_process_pyattn(world_of_one, layout):
    """With P = 1 the ring is one fused call on the whole sequence: bitwise single-process pyattn, dropout
    mask included (the same draw from the default generator)."""
    q, k, v = (torch.randn(2, 4, 24, 16, requires_grad=True) for _ in range(3))
    kw = dict(is_causal=True, window_size=(7, -1), dropout_p=0.2, alibi_slopes=torch.rand(4), return_lse=True)
    results = []
    for call in (lambda: ring_attention(q, k, v, layout=layout, **kw), lambda: pyattn.scaled_dot_product_attention(
            q, k, v, **kw)):
        torch.manual_seed(3)
        out, lse = call()
        results.append((out, lse, *torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    kw.pop("dropout_p")
    expected = pyattn.scaled_dot_product_attention(q, k, v, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ulysses_attention(q, k, v, layout=layout, **kw), expected))


PLAN_WINDOWS = {"causal": (-1, 0), "full": (-1, -1), "window-5-3": (5, 3), "causal-window-3": (3, 0)}


def _global_rows(rank, world, layout, chunk):
    """Global positions of a shard's rows."""
    return [c * chunk + i for c in rank_chunks(rank, world, layout) for i in range(chunk)]


@pytest.mark.parametrize("world", [2, 3, 4], ids=lambda w: f"P{w}")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("window", list(PLAN_WINDOWS))
@pytest.mark.parametrize("alibi", [False, True], ids=["pieces", "alibi-whole-shards"])
def test_ring_plan_computes_every_visible_pair_once(world, layout, window, alibi):
    """Over every rank, piece and ring step, the blocks cover each (query, key) pair the global band allows
    exactly once and no other; Block.pairs counts what a block covers."""
    left, right = PLAN_WINDOWS[window]
    chunk = 8
    N = chunk * world * (2 if layout == "zigzag" else 1)
    covered = torch.zeros(N, N, dtype=torch.int64)
    with pieces_of(2):
        for rank in range(world):
            q_rows = _global_rows(rank, world, layout, chunk)
            pieces, steps = rank_plan(rank, world, layout, chunk, left, right, alibi=alibi)
            assert sorted(r for piece in pieces for a, b in piece for r in range(a, b)) == list(range(len(q_rows)))
            for piece, piece_steps in zip(pieces, steps):
                for step, blocks in enumerate(piece_steps):
                    kv_rows = _global_rows((rank - step) % world, world, layout, chunk)
                    k_rows = [kv_rows[r] for a, b in piece for r in range(a, b)]
                    for blk in blocks:
                        i = torch.arange(blk.q1 - blk.q0)[:, None]
                        j = torch.arange(blk.k1 - blk.k0)[None]
                        band = torch.ones(len(i), j.shape[1], dtype=torch.bool)
                        if blk.window_right >= 0:
                            band &= j <= i + blk.window_right
                        if blk.window_left >= 0:
                            band &= j >= i - blk.window_left
                        assert blk.pairs() == band.sum().item(), blk
                        gq = torch.tensor(q_rows[blk.q0:blk.q1])[:, None].expand_as(band)
                        gk = torch.tensor(k_rows[blk.k0:blk.k1])[None].expand_as(band)
                        assert blk.q_pos == gq[0, 0] and blk.k_pos == gk[0, 0]
                        covered.index_put_((gq[band], gk[band]), torch.tensor(1), accumulate=True)
    gi, gj = torch.arange(N)[:, None], torch.arange(N)[None]
    allowed = torch.ones(N, N, dtype=torch.bool)
    if right >= 0:
        allowed &= gj <= gi + right
    if left >= 0:
        allowed &= gj >= gi - left
    assert torch.equal(covered, allowed.long())


@pytest.mark.parametrize("world", [2, 3, 4, 8], ids=lambda w: f"P{w}")
def test_zigzag_pieces_balance_causal_work_at_every_step(world):
    """Under a causal mask, zigzag shards travelling in pieces give every rank the same work at every step of
    every piece, up to the diagonal's half-rows (ranks wait for each other at each step), and mirrored pieces
    have the same work as each other."""
    chunk = 4 * ring.MIN_PIECE_TOKENS
    work = []
    for rank in range(world):
        pieces, steps = rank_plan(rank, world, "zigzag", chunk, -1, 0)
        assert len(pieces) == ring.PIECES_PER_SHARD
        work.append([[sum(b.pairs() for b in blocks) for blocks in piece_steps] for piece_steps in steps])
    work = torch.tensor(work, dtype=torch.float64)  # (rank, piece, step)
    assert (work.amax(0) / work.amin(0)).max() <= 1.001, work
    per_piece = work.sum(2)
    assert (per_piece.amax(1) / per_piece.amin(1)).max() <= 1.001, per_piece
