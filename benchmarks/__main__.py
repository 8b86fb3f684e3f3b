"""python -m benchmarks [--device cpu|cuda] [--quick] [--preset default|targets|decode|context-parallel|serving|model|sparse]

Sweeps sequence length for naive attention, torch SDPA (and FlexAttention on CUDA) and every pyattn
backend; writes JSON records and a markdown table under benchmarks/results/<device>/ and prints a summary.
"""
import argparse
import datetime
import os
import platform
import time

import torch

import pyattn

from . import context_parallel, measure, model, serving, sparse
from .impls import implementations
from .memory import measure_in_child
from .plots import plot_memory, plot_speed
from .report import records_table, summary
from .sweep import (DTYPES, decode_points, default_points, memory_wall, order_interleaved, run_point,
                    skipped_record, target_points)
from .table import write_records


def parse_args():
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer lengths and passes")
    ap.add_argument("--preset", choices=["default", "targets", "decode", "context-parallel", "serving", "model",
                                         "sparse"],
                    default="default",
                    help="default: the L = S sweep; targets: the CPU targets of the core issue; decode: L = 1 only; "
                         "context-parallel: ring attention over 1, 2, 4 CPU processes (gloo); "
                         "serving: kvcache_attention decode and chunked prefill over contiguous and paged caches; "
                         "model: a Llama-shaped transformers model's prefill and decode step per attn_implementation; "
                         "sparse: BlockMask attention (documents, window + global tokens) against dense and "
                         "torch's compiled flex_attention")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device>; CPU: cpu-<capability>)")
    ap.add_argument("--impl", nargs="+", help="only these implementations")
    ap.add_argument("--seqlens", nargs="+", type=int)
    ap.add_argument("--contexts", nargs="+", type=int, help="model preset: prompt lengths (default 512 4096 16384)")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES))
    ap.add_argument("--pass", dest="passes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"])
    ap.add_argument("--decode", action="store_true", help="add decode points (L=1, long S, GQA)")
    ap.add_argument("--decode-seqlens", nargs="+", type=int)
    ap.add_argument("--max-call-seconds", type=float,
                    help="skip a point whose time per call, extrapolated from the previous length, exceeds this "
                         "(default 4 for the sweep, 3 for serving (0.5 quick); no limit for the targets and decode "
                         "presets)")
    ap.add_argument("--time-limit", type=float, help="seconds; past it, remaining points are recorded as skipped")
    ap.add_argument("--memory", action="store_true", help="measure CPU peak memory per point in a child process")
    return ap.parse_args()


def metadata(device):
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, pyattn=pyattn.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine())
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        info.update(cpu_info())
    return info


def cpu_info():
    """The CPU and the ISA each side ran at: pyattn's capability, torch's, and the switches that hold torch's
    libraries lower (an AVX-512 machine standing in for an AVX2 one sets all of them)."""
    from pyattn import cpu_capability
    held = {k: os.environ[k] for k in ("PYATTN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                       "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    return dict(cpu_model=cpu_capability.cpu_model(), cpu_capability=cpu_capability.current(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), isa_switches=held)


def progress(items):
    try:
        from tqdm import tqdm

        return tqdm(items, ncols=100, leave=False)
    except ImportError:
        return items


def _memory_point(p, points):
    """Which CPU points get a child-process memory measurement by default: one curve per impl (the first
    dtype, non-causal forward) and every point of 64k tokens and more; each costs a fresh interpreter."""
    first = points[0].dtype if points else None
    return (p.pass_ == "fwd" and not p.causal and p.dtype == first and not p.decode) or p.L >= 65536


def results_dir(args, device, cpu_capability):
    """--out, else benchmarks/results/<device>, per capability on the CPU: the same code runs at very different
    speeds on each."""
    where = f"cpu-{cpu_capability}" if device == "cpu" else device
    out_dir = args.out or os.path.join(os.path.dirname(__file__), "results", where)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def main():
    args = parse_args()
    own = {"context-parallel": context_parallel, "serving": serving, "model": model, "sparse": sparse}
    if args.preset in own:  # presets with their own records and tables
        device = "cpu" if args.preset == "context-parallel" else args.device
        meta = metadata(device)
        out_dir = results_dir(args, device, meta.get("cpu_capability"))
        return own[args.preset].run(args, out_dir, meta)
    if args.max_call_seconds is None:
        args.max_call_seconds = 4.0 if args.preset == "default" else float("inf")
    impls = implementations(args.device)
    if args.impl:
        unknown = set(args.impl) - set(impls)
        if unknown:
            raise SystemExit(f"unknown --impl {sorted(unknown)}; available: {sorted(impls)}")
        impls = {k: impls[k] for k in args.impl}
    if args.preset == "targets":
        points = target_points(impls)
    elif args.preset == "decode":
        points = []
    else:
        points = default_points(args.device, impls, args.quick, args.seqlens, args.dtype, args.passes)
    if args.decode or args.preset == "decode":
        points += decode_points(args.device, impls, args.decode_seqlens, args.dtype)
    peak = measure.peaks(args.device, DTYPES)
    cpu = cpu_info() if args.device == "cpu" else {}
    records, last_ms, last_len, start = [], {}, {}, time.time()
    bar = progress(order_interleaved(points))
    for p in bar:
        if hasattr(bar, "set_description"):
            bar.set_description(f"{p.impl} {p.dtype} L={p.L} {'causal' if p.causal else ''} {p.pass_}")
        series = (p.impl, p.dtype, p.D, p.causal, p.pass_, p.decode)
        # work grows with B*H*L*S: extrapolate from the last length this series ran
        predicted_s = last_ms.get(series, 0) / 1e3 * (p.B * p.H * p.L * p.S) / last_len.get(series, 1)
        wall = memory_wall(p, args.device, impls[p.impl][0])
        if args.time_limit and time.time() - start > args.time_limit:
            wall = skipped_record(p, args.device, impls[p.impl][0], f"run time limit {args.time_limit:.0f} s reached")
        if wall or predicted_s > args.max_call_seconds:
            records.append(wall or skipped_record(p, args.device, impls[p.impl][0],
                                                  f"time budget: predicted {predicted_s:.1f} s per call"))
            continue
        rec = run_point(p, impls[p.impl][1], args.device, peak)
        rec["backend"] = impls[p.impl][0]
        if args.device == "cpu":
            rec.update(cpu_model=cpu["cpu_model"], cpu_capability=cpu["cpu_capability"])
        if rec["ms"] is not None:
            last_ms[series], last_len[series] = rec["ms"], p.B * p.H * p.L * p.S
        if args.device == "cpu" and rec["status"] == "ok" and (args.memory or _memory_point(p, points)):
            rec["peak_mem_bytes"] = measure_in_child(p)
        records.append(rec)
    out_dir = results_dir(args, args.device, cpu.get("cpu_capability"))
    stem = args.preset if args.preset != "default" else ("quick" if args.quick else "sweep")
    meta = metadata(args.device)
    meta["peaks"] = peak
    on = (f"{meta['cpu_model']}, pyattn CPU capability {meta['cpu_capability']}, torch {meta['torch_cpu_capability']}"
          f"{''.join(f', {k}={v}' for k, v in meta['isa_switches'].items())}" if args.device == "cpu"
          else meta["machine"])
    write_records(out_dir, stem, meta, records, f"# {stem} on {args.device} ({on}, {meta['threads']} threads, torch "
                  f"{meta['torch']})\n\n{records_table(records)}\n")
    title = f"{stem} on {args.device} ({meta.get('gpu', meta['machine'])}, torch {meta['torch']})"
    plot_speed(records, os.path.join(out_dir, f"{stem}.png"), title)
    plot_memory(records, os.path.join(out_dir, f"{stem}-memory.png"), title)
    print(summary(records))
    print(f"\nwrote {out_dir}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
