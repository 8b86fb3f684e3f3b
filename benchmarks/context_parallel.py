"""python -m benchmarks --preset context-parallel: ring attention (pyattn.distributed) over P = 1, 2, 4 CPU
processes on gloo, over a grid of total lengths N: a row of the grid is fixed N, a diagonal fixed N/P.

Each process runs one thread pinned to core rank % cores: P processes on P cores against one process on one
core. Per point and rank: median time of a call, peak extra memory (VmHWM growth, large buffers from mmap so
freed memory leaves the RSS), bytes sent, the (query, key) pairs its kernel calls compute (from the ring's
plan: the work balance, free of the host's noise), time computing and time blocked on communication; then the same
ring traffic without compute, timed alone, says how much of the communication ran behind compute. Every
output is checked against float64 math on sampled rows (of the unsharded result) after it is measured.
"""
import os
import statistics
import time

import torch
import torch.distributed as dist

from pyattn.distributed import ring_attention, unshard
from pyattn.distributed.comm import Ring, recording
from pyattn.distributed.local import run_local
from pyattn.distributed.ring import rank_plan

from . import measure
from .plots import _log_axes, _pyplot, _save
from .sweep import DTYPES, TOLERANCE, _check_rows
from .table import fmt_bytes, markdown_table, status_cell, write_records

WORLDS = (1, 2, 4)
B, H, D = 1, 1, 64
SEQLENS = [8192 * 2**i for i in range(5)]  # up to 131072
QUICK_SEQLENS = [2048, 4096, 8192]


def _comm_only_ms(group, kv, pass_):
    """The ring traffic of one call (K/V forward; K/V again and float32 dK/dV backward) without compute."""
    world = dist.get_world_size(group)
    ring = Ring(group, dist.get_rank(group), world)
    hops = [kv] * (world - 1) * (1 if pass_ == "fwd" else 2)
    if pass_ != "fwd":
        hops += [tuple(t.float() for t in kv)] * world
    dist.barrier(group)
    start = time.perf_counter()
    for tensors in hops:
        ring.pass_on(tensors).wait()
    return (time.perf_counter() - start) * 1e3


def _work_pairs(rank, world, N, causal):
    """The (query, key) pairs rank's kernel calls compute in one forward (zigzag, as _point calls it)."""
    if world == 1:
        return B * H * (N * (N + 1) // 2 if causal else N * N)
    _, steps = rank_plan(rank, world, "zigzag", N // (2 * world), -1, 0 if causal else -1)
    return B * H * sum(b.pairs() for piece_steps in steps for blocks in piece_steps for b in blocks)


def _point(group, N, pass_, dtype, causal):
    """One grid point on this rank of group -> its measurements (every rank runs the same calls)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(rank)
    q, k, v = (torch.randn(B, H, N // world, D, dtype=DTYPES[dtype]) for _ in range(3))
    step = measure.make_step(lambda q, k, v, causal: ring_attention(q, k, v, group=group, is_causal=causal),
                             q, k, v, causal, pass_)
    step()  # warm-up
    dist.barrier(group)
    measure.reset_peak_rss()
    before = measure.current_rss_bytes()
    with recording() as stats:
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times, cpu_s = [time.perf_counter() - start], time.process_time() - cpu_start
    peak = measure.cpu_peak_rss_bytes() - before
    reps = [max(0, min(4, int(1.0 / times[0])))]  # short calls: repeat, as the group's first rank says, up to ~1 s
    dist.broadcast_object_list(reps, group=group, group_src=0)
    for _ in range(reps[0]):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    comm_ms = _comm_only_ms(group, (k, v), pass_) if world > 1 else 0.0
    with torch.no_grad():
        full = [unshard(t, group=group) for t in (ring_attention(q, k, v, group=group, is_causal=causal), q, k, v)]
    err = _check_rows(*full, causal)
    return dict(ms=statistics.median(times) * 1e3, cpu_ms=cpu_s * 1e3, peak_mem_bytes=max(0, peak),
                bytes_sent=stats["bytes_sent"], work_pairs=_work_pairs(rank, world, N, causal),
                compute_ms=stats["compute_s"] * 1e3, wait_ms=stats["wait_s"] * 1e3, comm_ms=comm_ms, max_error=err)


def _grid(seqlens, pass_, dtype, causal):
    """Runs in each of max(WORLDS) processes, one thread each, pinned to core rank % cores: for each P, the
    first P ranks measure every N that P splits while the others wait -> {P: {N: measurements}}."""
    rank = dist.get_rank()
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    results = {}
    for world in WORLDS:
        group = dist.new_group(list(range(world)))
        if rank < world:
            results[world] = {}
            for N in (n for n in seqlens if n % (2 * world) == 0):
                try:
                    results[world][N] = {"status": "ok", **_point(group, N, pass_, dtype, causal)}
                except (RuntimeError, ValueError) as e:
                    results[world][N] = {"status": "skipped", "note": str(e).splitlines()[0][:200]}
        dist.barrier()
    return results


def _record(N, world, ranks, pass_, dtype, causal):
    """Per-rank measurements of one point -> one record (times and memory: the slowest / largest rank)."""
    rec = dict(impl="pyattn-ring", backend="cpu", device="cpu", dtype=dtype, B=B, H=H, L=N, S=N, D=D, causal=causal,
               P=world, N_per_rank=N // world, **{"pass": pass_}, cores=min(world, os.cpu_count()))
    per = [r[N] for r in ranks]
    if any(m["status"] != "ok" for m in per):
        return {**rec, "status": "skipped", "note": next(m["note"] for m in per if m["status"] != "ok"), "ms": None,
                "tflops": None, "peak_mem_bytes": None}
    ms = max(m["ms"] for m in per)
    comm, wait = max(m["comm_ms"] for m in per), max(m["wait_ms"] for m in per)
    compute = [m["compute_ms"] for m in per]
    err = max(m["max_error"] for m in per)
    status = "ok" if err <= TOLERANCE[dtype] else "wrong"
    return {**rec, "status": status, "note": f"max error {err:.2g}", "ms": ms,
            "tflops": measure.attention_flops(B, H, N, N, D, causal, pass_) / ms / 1e9,  # all ranks together
            "peak_mem_bytes": max(m["peak_mem_bytes"] for m in per), "bytes_sent": max(m["bytes_sent"] for m in per),
            "rank_ms": [m["ms"] for m in per], "rank_compute_ms": compute, "cpu_ms": max(m["cpu_ms"] for m in per),
            "rank_peak_mem_bytes": [m["peak_mem_bytes"] for m in per],
            "compute_balance": max(compute) / min(compute) if min(compute) > 0 else None,
            "rank_work_pairs": [m["work_pairs"] for m in per],
            "work_balance": max(m["work_pairs"] for m in per) / min(m["work_pairs"] for m in per),
            "comm_ms": comm, "wait_ms": wait,
            # communication that ran while the rank computed: its share of the traffic, and of the compute
            "comm_hidden": min(1.0, max(0.0, 1 - wait / comm)) if comm > 0 else None,
            "compute_overlapped": min(1.0, max(0.0, comm - wait) / max(compute)) if comm > 0 else None}


COLUMNS = ["N", "P", "N/P", "ms per rank", "x of P=1", "CPU ms per rank", "x of P=1", "work balance (max/min)",
           "compute time balance (max/min)", "peak extra mem per rank", "x of P=1", "sent per rank", "comm hidden",
           "status"]


def context_parallel_table(records):
    """A row per (N, P); the "x of P=1" columns against the single-process record of the same N."""
    single = {r["L"]: r for r in records if r["P"] == 1 and r["status"] == "ok"}
    rows = []
    for r in sorted(records, key=lambda r: (r["L"], r["P"])):
        base = single.get(r["L"])
        rel = lambda key: f"{r[key] / base[key]:.2f}" if base and r.get(key) and base.get(key) else ""  # noqa: E731
        rows.append([str(r["L"]), str(r["P"]), str(r["N_per_rank"]), f"{r['ms']:.0f}" if r["ms"] is not None else "",
                     rel("ms"), f"{r['cpu_ms']:.0f}" if r.get("cpu_ms") is not None else "", rel("cpu_ms"),
                     f"{r['work_balance']:.3f}" if r.get("work_balance") and r["P"] > 1 else "",
                     f"{r['compute_balance']:.2f}" if r.get("compute_balance") else "",
                     fmt_bytes(r["peak_mem_bytes"]), rel("peak_mem_bytes"), fmt_bytes(r.get("bytes_sent")),
                     f"{r['comm_hidden']:.0%}" if r.get("comm_hidden") is not None else "", status_cell(r)])
    return markdown_table(COLUMNS, rows)


def plot(records, path, title):
    """Per-rank time and per-rank peak extra memory against N, a line per P."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "ms", "time per rank (ms)", 1),
              (axes[1], "peak_mem_bytes", "peak extra memory per rank (MiB)", 2**20))
    for ax, key, label, unit in panels:
        for world in WORLDS:
            pts = sorted((r["L"], r[key] / unit) for r in records if r["P"] == world and r["status"] == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"P = {world}")
        _log_axes(ax, label, f"{label.split(' (')[0]} against total N")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def run(args, out_dir, meta):
    """The preset: spawn each world size once, measure the grid, write JSON, table and plot."""
    seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else SEQLENS)
    pass_ = (args.passes or ["fwd"])[0]
    dtype = (args.dtype or ["fp32"])[0]
    causal = True
    # large buffers straight from mmap, so freed memory leaves the RSS the peaks are read from
    ranks = run_local(_grid, max(WORLDS), seqlens, pass_, dtype, causal, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    records = [_record(N, world, [r[world] for r in ranks[:world]], pass_, dtype, causal)
               for world in WORLDS for N in sorted(ranks[0][world])]
    meta = {**meta, "threads_per_process": 1, "cores": os.cpu_count()}
    table = context_parallel_table(records)
    head = (f"# context-parallel on cpu ({meta['machine']}, {os.cpu_count()} cores, one thread per process, "
            f"torch {meta['torch']}): ring attention, causal, {dtype}, {pass_}, B={B} H={H} D={D}\n\n")
    write_records(out_dir, "context-parallel", meta, records, head + table + "\n")
    plot(records, os.path.join(out_dir, "context-parallel.png"),
         f"ring attention on {os.cpu_count()} CPU cores (gloo), causal {dtype} {pass_}")
    print(table)
    print(f"\nwrote {out_dir}/context-parallel.json, .md and .png")
