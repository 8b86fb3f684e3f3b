"""The measuring steps of `python -m benchmarks.gpu_profile` (issue 31 item 7), each run in its own process on a GPU:
env (versions, clocks, the run's copy and matmul ceilings), kernels (kernel-only times by torch.profiler: forward,
backward, KV-cache decode eager and under CUDA-graph replay), decode-sweep (split counts and tiles of the decode
forward) and autotune (the backward's autotune over a widened candidate list, every candidate's time). Each step
writes its CSV/JSON rows as they come, so a step cut off at its deadline still leaves what it measured, and returns
a small summary for the profile's index. plan_<step>() says what a step would run, without a GPU."""
import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

from . import gpu_run, measure, serving, sweep

DEVICE, DTYPE = "cuda", torch.bfloat16  # the tests run the steps on the CPU (Triton interpreter, float32)
FWD_SEQLEN = 16384
DECODE_BATCHES, DECODE_SEQLENS, DECODE_LAYOUTS = (1, 16), (32768, 131072), ("contiguous", "paged")
PROFILE_REPS = 20  # launches per profiled case: enough for a stable sum, ~1 s of the longest backward
SWEEP_SPLITS = (0, 8, 16, 32, 64, 128, 4)  # 0: the launcher's own choice
# (BLOCK_N, num_warps, num_stages) of the decode forward; BLOCK_M stays the launcher's (the packed GQA rows); None:
# the launcher's (64, 4, 3 at D=128)
SWEEP_TILES = (None, (128, 4, 3), (64, 8, 3), (32, 4, 3), (64, 4, 4), (128, 8, 2))
# the backward autotune's widened neighbourhood (issue 31 item 4): stages 2-5, 4 and 8 warps, BLOCK_M 32-128
WIDE_BWD = [(bm, bn, w, st) for bm, bn in ((32, 64), (32, 128), (64, 64), (64, 128), (128, 32), (128, 64))
            for w in (4, 8) for st in (2, 3, 4, 5)]
AUTOTUNE_CASES = ((64, False), (128, False))  # (D, causal): the measured case first


# ---------------------------------------------------------------------------------------------------------- files

class Rows:
    """A CSV written row by row (flushed: a step killed at its deadline keeps the rows before it)."""

    def __init__(self, path, fields):
        self.path, self.fields = path, list(fields)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()

    def add(self, row):
        self.writer.writerow({k: _cell(row.get(k)) for k in self.fields})
        self.file.flush()


def _cell(v):
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else v


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)  # whole or absent, never half written


# ------------------------------------------------------------------------------------------------------ profiling

ROLES = (("_attn_fwd_combine", "combine"), ("_attn_fwd", "fwd/split"), ("_attn_bwd_dkdv", "dkdv"),
         ("_attn_bwd_dq", "dq"), ("_attn_bwd_preprocess", "delta"), ("dkdv_kernel", "cuda dkdv"),
         ("dq_kernel", "cuda dq"))


def role(kernel):
    """What a kernel does in the profile: pyattn's kernels by name, the rest are torch's (append, fills, copies)."""
    return next((r for prefix, r in ROLES if re.search(rf"(?:^|\W){prefix}", kernel)), "other")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_events(prof, device_type=None):
    """[(name, microseconds)] of every device activity of a finished torch.profiler run (kernels, memcpy, memset);
    on the CPU (tests), its operators."""
    from torch.autograd import DeviceType
    device_type = device_type or (DeviceType.CUDA if DEVICE == "cuda" else DeviceType.CPU)
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == device_type]


def kernel_rows(events, reps):
    """[(name, us)] of reps repetitions -> one row per kernel name: calls and microseconds per repetition, per call;
    the longest first."""
    totals, calls = {}, {}
    for name, us in events:
        totals[name] = totals.get(name, 0.0) + us
        calls[name] = calls.get(name, 0) + 1
    rows = [dict(kernel=name, role=role(name), calls_per_rep=calls[name] / reps, us_per_rep=totals[name] / reps,
                 us_per_call=totals[name] / calls[name]) for name in totals]
    return sorted(rows, key=lambda r: -r["us_per_rep"])


def profile(fn, reps):
    """Runs fn reps times under torch.profiler -> its profiler (device activities only, on a GPU)."""
    from torch.profiler import ProfilerActivity
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU]) \
            as prof:
        for _ in range(reps):
            fn()
        sync()
    return prof


def wall_us(fn, reps):
    """Host wall-clock microseconds per call of fn, synchronized at the ends only: what a caller waits."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e6


def captured(fn, warmup=3):
    """fn captured into a CUDA graph -> (graph.replay, None), or (None, the error's text) where capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay, None
    except Exception as e:  # noqa: BLE001 - the failure is the record (issue 31 item 1's evidence)
        return None, f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def fixed_tiles():
    """The kernels at their fixed tiles: no autotune launches inside a profile (nor at ncu's one launch)."""
    from pyattn.kernels import configs
    saved = configs.AUTOTUNE_FROM
    configs.AUTOTUNE_FROM = 1 << 40
    try:
        yield
    finally:
        configs.AUTOTUNE_FROM = saved


# ------------------------------------------------------------------------------------------------------- problems

def attention_points():
    """The sweep's bf16 points at FWD_SEQLEN tokens (B*H as the sweep scales them), D 64/128, causal or not."""
    return [p for p in sweep.default_points("cuda", ["pyattn-triton"], seqlens=[FWD_SEQLEN], dtypes=["bf16"],
                                            passes=["fwd", "bwd"])]


def point_name(p):
    return f"{p.pass_} d{p.D} {'causal' if p.causal else 'full'} B{p.B} H{p.H} L{p.L}"


def attention_step(p, backend="triton"):
    """A closure running point p's pass on backend (bwd: dQ, dK, dV of a forward run once here)."""
    import pyattn
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(p.B, p.H, p.L, p.D, dtype=DTYPE, device=DEVICE, generator=g) for _ in range(3))

    def fn(q, k, v, causal):
        return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    return measure.make_step(fn, q, k, v, p.causal, p.pass_)


def decode_cases():
    return [(B, S, layout) for layout in DECODE_LAYOUTS for B in DECODE_BATCHES for S in DECODE_SEQLENS]


def decode_name(B, S, layout):
    return f"decode B{B} S{S // 1024}k {layout}"


def decode_call(B, S, layout, backend="triton"):
    """-> (one kvcache_attention decode step as serving.py calls it, K/V bytes it attends)."""
    import pyattn
    cache = serving.build_cache(layout, serving.lengths_for(B, S), DEVICE)
    q, k_new, v_new, seqlens = serving.inputs(cache, 1)

    def call():
        return pyattn.kvcache_attention(q, cache.k_cache, cache.v_cache, k_new=k_new, v_new=v_new,
                                        cache_seqlens=seqlens, block_table=cache.block_table, backend=backend)
    return call, int(cache.lengths.sum()) * serving.TOKEN_BYTES


def ceilings(index):
    """The copy GB/s and bf16 matmul TFLOP/s that the env step measured in this run (None where it did not)."""
    env = index.get("steps", {}).get("env", {}).get("summary", {})
    return env.get("copy_gbps"), env.get("bf16_matmul_tflops")


# ------------------------------------------------------------------------------------------------------------ env

def _tool_output(cmd, timeout=20):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"


NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,"
                    "clocks.max.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total",
                    "--format=csv"]


BUILD_CAP_S = 120  # of env's cap: the CUDA build for one arch took ~60 s on the H200


def build_command(out_dir, cap_s):
    """gpu_check's build stage (CUDA kernels for this GPU's arch, else CPU-only), its records in out_dir."""
    return [sys.executable, "-m", "benchmarks.gpu_check", "--stage", "build", "--out", out_dir, "--budget",
            str(int(cap_s))]


def ensure_build(ctx):
    """-> what was done: nothing where the tree has a CUDA build, else gpu_check's build stage."""
    if gpu_run.has_cuda_build():
        return "CUDA build present"
    cap = min(BUILD_CAP_S, ctx.deadline - time.time() - 25)
    rc, _, _ = gpu_run.wait(gpu_run.start(build_command(os.path.join(ctx.dir, "build"), cap)), time.time() + cap + 5)
    return f"built (gpu_check --stage build: rc {rc}; CUDA C++ {'yes' if gpu_run.has_cuda_build() else 'no'})"


def plan_env():
    return dict(files=["env.json", "build/gpu-check.json", "build/gpu-check.log"],
                build=shlex.join(build_command("DIR/env/build", BUILD_CAP_S)) + " (where no CUDA build is present)",
                commands=[shlex.join(NVIDIA_SMI_QUERY), "nvcc --version"],
                ceilings=["measure.copy_gbps('cuda') (1 GiB)", "measure.gpu_matmul_gflops(bf16) (8192^3)"])


def run_env(ctx):
    import triton
    build = ensure_build(ctx)
    props = torch.cuda.get_device_properties(0)
    smi = shutil.which("nvidia-smi")
    rec = dict(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
               sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
               l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               nvcc=_tool_output(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else None,
               nvidia_smi_before=_tool_output(NVIDIA_SMI_QUERY) if smi else "no nvidia-smi on PATH", build=build)
    write_json(os.path.join(ctx.dir, "env.json"), rec)
    rec["copy_gbps"] = measure.copy_gbps("cuda")
    rec["bf16_matmul_tflops"] = measure.gpu_matmul_gflops(torch.bfloat16) / 1e3
    if smi:  # the clocks right after the matmul: what the kernels of the next steps run at
        rec["nvidia_smi_after_matmul"] = _tool_output(NVIDIA_SMI_QUERY)
    write_json(os.path.join(ctx.dir, "env.json"), rec)
    return {k: rec[k] for k in ("gpu", "sms", "torch", "triton", "cuda", "build", "copy_gbps", "bf16_matmul_tflops")}


# -------------------------------------------------------------------------------------------------------- kernels

KERNEL_FIELDS = ["case", "mode", "kernel", "role", "calls_per_rep", "us_per_rep", "us_per_call"]
CASE_FIELDS = ["case", "mode", "kernel_us", "wall_us", "wall_over_kernel", "tflops_kernel", "gbps_kernel",
               "gbps_wall", "copy_fraction_kernel", "copy_fraction_wall", "note"]


def plan_kernels():
    return dict(files=["kernels.csv", "cases.csv", "kernels.json"], reps=PROFILE_REPS, tiles="fixed (no autotune)",
                attention=[point_name(p) for p in attention_points()],
                decode=[f"{decode_name(*c)} {mode}" for c in decode_cases() for mode in ("eager", "graph")])


def _case(name, mode, rows, wall, flops=None, nbytes=None, copy_gbps=None, note=None):
    kernel_us = sum(r["us_per_rep"] for r in rows)
    rec = dict(case=name, mode=mode, kernel_us=kernel_us, wall_us=wall, note=note,
               wall_over_kernel=wall / kernel_us if kernel_us and wall else None)
    if flops:
        rec["tflops_kernel"] = flops / kernel_us / 1e6 if kernel_us else None
    if nbytes:
        rec["gbps_kernel"] = nbytes / kernel_us / 1e3 if kernel_us else None
        rec["gbps_wall"] = nbytes / wall / 1e3 if wall else None
        if copy_gbps:
            rec["copy_fraction_kernel"] = rec["gbps_kernel"] and rec["gbps_kernel"] / copy_gbps
            rec["copy_fraction_wall"] = rec["gbps_wall"] and rec["gbps_wall"] / copy_gbps
    return rec


def run_kernels(ctx):
    kernels = Rows(os.path.join(ctx.dir, "kernels.csv"), KERNEL_FIELDS)
    cases = Rows(os.path.join(ctx.dir, "cases.csv"), CASE_FIELDS)
    records = []
    copy_gbps, _ = ceilings(ctx.index)

    def record(name, mode, fn, reps, **model):
        rows = kernel_rows(device_events(profile(fn, reps)), reps)
        wall = wall_us(fn, reps)
        for r in rows:
            kernels.add(dict(r, case=name, mode=mode))
        rec = _case(name, mode, rows, wall, copy_gbps=copy_gbps, **model)
        cases.add(rec)
        records.append(dict(rec, kernels=rows))
        write_json(os.path.join(ctx.dir, "kernels.json"), records)

    with fixed_tiles():
        for p in attention_points():
            if not ctx.time_left(15):
                break
            step = attention_step(p)
            step()
            record(point_name(p), "eager", step, PROFILE_REPS // 4,
                   flops=measure.attention_flops(p.B, p.H, p.L, p.S, p.D, p.causal, p.pass_))
            del step
        calls = []
        for case in decode_cases():
            if not ctx.time_left(10):
                break
            call, nbytes = decode_call(*case)
            call()
            record(decode_name(*case), "eager", call, PROFILE_REPS, nbytes=nbytes)
            calls.append((case, call, nbytes))
        for case, call, nbytes in calls:  # after every eager record: a failed capture can spoil the context
            if not ctx.time_left(5):
                break
            replay, error = captured(call)  # the CPU (tests): an error
            if replay is None:
                cases.add(dict(case=decode_name(*case), mode="graph", note=error))
                records.append(dict(case=decode_name(*case), mode="graph", capture_error=error))
                write_json(os.path.join(ctx.dir, "kernels.json"), records)
                continue
            record(decode_name(*case), "graph", replay, PROFILE_REPS, nbytes=nbytes)
    errors = sorted({r["capture_error"] for r in records if r.get("capture_error")})
    return dict(cases=len(records), graph_capture_errors=errors)


# --------------------------------------------------------------------------------------------------- decode sweep

@contextlib.contextmanager
def forced_decode(splits=0, tiles=None, chosen=None):
    """The decode forward's split count and (BLOCK_N, num_warps, num_stages) forced for the profile's sweep, by
    wrapping the launcher's choices (launch._Problem.num_splits, configs.decode_tiles); 0 and None keep the
    launcher's own. chosen: a dict that receives what the launch used (splits, tiles)."""
    from pyattn.kernels import configs, launch
    problem_splits, decode_tiles = launch._Problem.num_splits, configs.decode_tiles
    chosen = {} if chosen is None else chosen

    def num_splits(self, block_m, block_n):
        chosen["splits"] = splits or problem_splits(self, block_m, block_n)
        return chosen["splits"]

    def tiles_for(rows, head_dim):
        block_m, *own = decode_tiles(rows, head_dim)
        chosen["tiles"] = (block_m, *(tiles or own))
        return chosen["tiles"]

    launch._Problem.num_splits, configs.decode_tiles = num_splits, tiles_for
    try:
        yield chosen
    finally:
        launch._Problem.num_splits, configs.decode_tiles = problem_splits, decode_tiles


SWEEP_FIELDS = ["case", "splits", "block_m", "block_n", "warps", "stages", "split_us", "combine_us", "kernel_us",
                "gbps_kernel", "copy_fraction_kernel", "note"]


def plan_decode_sweep():
    return dict(files=["decode-sweep.csv"], cases=[decode_name(*c) for c in decode_cases()],
                splits=["launcher's" if s == 0 else s for s in SWEEP_SPLITS],
                tiles=["launcher's" if t is None else t for t in SWEEP_TILES],
                points=len(sweep_order()),
                hook="benchmarks.profile_steps.forced_decode (wraps launch._Problem.num_splits, configs.decode_tiles)")


def sweep_order():
    """(tiles, case, splits) in the order the sweep runs them: each split count is its own compile (NUM_SPLITS is a
    constexpr), so the launcher's tiles go over every case first, and contiguous caches before paged ones."""
    return [(tiles, case, splits) for tiles in SWEEP_TILES for layout in DECODE_LAYOUTS
            for case in decode_cases() if case[2] == layout for splits in SWEEP_SPLITS]


def run_decode_sweep(ctx):
    rows = Rows(os.path.join(ctx.dir, "decode-sweep.csv"), SWEEP_FIELDS)
    copy_gbps, _ = ceilings(ctx.index)
    calls, best, done = {}, {}, 0
    for tiles, case, splits in sweep_order():
        if not ctx.time_left(3):
            return dict(best=best, points=done, cut_off=True)
        if case not in calls:
            calls[case] = decode_call(*case)
        call, nbytes = calls[case]
        row = dict(case=decode_name(*case), splits=splits or "launcher")
        try:
            with forced_decode(splits, tiles) as chosen:
                call()
                evs = kernel_rows(device_events(profile(call, 5)), 5)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row, not the end
            rows.add(dict(row, note=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        split_us = sum(r["us_per_rep"] for r in evs if r["role"] == "fwd/split")
        combine_us = sum(r["us_per_rep"] for r in evs if r["role"] == "combine")
        kernel_us = split_us + combine_us
        bm, bn, w, st = chosen["tiles"]
        gbps = nbytes / kernel_us / 1e3 if kernel_us else None
        row.update(splits=chosen["splits"], block_m=bm, block_n=bn, warps=w, stages=st, split_us=split_us,
                   combine_us=combine_us, kernel_us=kernel_us, gbps_kernel=gbps,
                   copy_fraction_kernel=gbps / copy_gbps if gbps and copy_gbps else None)
        rows.add(row)
        done += 1
        if kernel_us and kernel_us < best.get(row["case"], {}).get("kernel_us", float("inf")):
            best[row["case"]] = {k: row[k] for k in ("splits", "block_n", "warps", "stages", "kernel_us")}
    return dict(best=best, points=done)


# ------------------------------------------------------------------------------------------------------- autotune

AUTOTUNE_FIELDS = ["case", "kernel", "block_m", "block_n", "warps", "stages", "ms", "ms_p20", "ms_p80", "best",
                   "source"]


def widened_bwd_configs():
    """configs.py's backward candidates plus WIDE_BWD, each tile once."""
    import triton

    from pyattn.kernels import configs
    own = configs.bwd_autotune_configs()
    tiles = {configs._tile(c) for c in own}
    extra = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in WIDE_BWD if (bm, bn, w, st) not in tiles]
    return own + extra


class RecordingBench:
    """The autotuner's benchmarker: times each pruned candidate in turn (do_bench), writes its row at once, and past
    the deadline answers inf without running (no compile) so the tuning ends in time. The autotuner benches its
    pruned configs in order, one do_bench call each: prune() keeps that order to name each timing's config."""

    def __init__(self, rows, case, kernel, prune, deadline):
        self.rows, self.case, self.kernel, self.prune_fn, self.deadline = rows, case, kernel, prune, deadline
        self.pruned, self.n = [], 0

    def prune(self, configs, named_args, **kwargs):
        self.pruned, self.n = self.prune_fn(configs, named_args, **kwargs), 0
        return self.pruned

    def __call__(self, fn, quantiles=None, **kwargs):
        import triton.testing
        config = self.pruned[self.n] if self.n < len(self.pruned) else None
        self.n += 1
        if time.time() > self.deadline:
            ms, note = [float("inf")] * 3, "past deadline: not run"
        else:
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=(0.5, 0.2, 0.8))
                note = "timed"
            except Exception as e:  # noqa: BLE001 - the autotuner's own handling (out of resources: inf)
                self.rows.add(dict(self._tile(config), case=self.case, kernel=self.kernel, source=repr(e)[:200]))
                raise
        self.rows.add(dict(self._tile(config), case=self.case, kernel=self.kernel, ms=ms[0], ms_p20=ms[1],
                           ms_p80=ms[2], source=note))
        return ms if quantiles else ms[0]

    @staticmethod
    def _tile(config):
        if config is None:
            return {}
        return dict(block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"], warps=config.num_warps,
                    stages=config.num_stages)


def plan_autotune():
    return dict(files=["autotune.csv", "autotune.json", "triton-autotune/*.autotune.json"],
                cases=[f"bwd d{D} {'causal' if c else 'full'} bf16 L{FWD_SEQLEN}" for D, c in AUTOTUNE_CASES],
                candidates=len(widened_bwd_configs()), added=WIDE_BWD,
                pruned_by="configs.prune_bwd (shared memory per arch), the fixed tile always kept")


def _tuned_with(benches, cc):
    """launch._tuned's autotuners over the widened candidates, timed by benches {kernel name: RecordingBench}."""
    import functools

    import triton

    from pyattn.kernels import launch
    made = {}
    for name, bench in benches.items():
        kernel, _, prune = launch.TUNED[name]
        bench.prune_fn = functools.partial(prune, cc=cc)
        options = dict(key=launch.TUNE_KEY, cache_results=True, prune_configs_by={"early_config_prune": bench.prune})
        try:
            made[name] = triton.autotune(widened_bwd_configs(), **options, do_bench=bench)(kernel)
        except TypeError:  # a Triton without autotune(do_bench=): the timings come from configs_timings alone
            made[name] = triton.autotune(widened_bwd_configs(), **options)(kernel)
    return made


def run_autotune(ctx):
    from pyattn.kernels import configs, launch
    rows = Rows(os.path.join(ctx.dir, "autotune.csv"), AUTOTUNE_FIELDS)
    cc, results = configs.arch(0), []
    own_tuned = launch._tuned
    try:
        for D, causal in AUTOTUNE_CASES:
            if not ctx.time_left(20):
                break
            case = f"bwd d{D} {'causal' if causal else 'full'}"
            p = next(p for p in attention_points() if p.pass_ == "bwd" and p.D == D and p.causal == causal)
            deadline = ctx.deadline - 10
            benches = {name: RecordingBench(rows, case, name, None, deadline) for name in ("dkdv", "dq")}
            tuned = _tuned_with(benches, cc)
            launch._tuned = lambda name, cc, _t=tuned: _t[name]
            with fixed_tiles():  # the forward that make_step runs once stays at its fixed tiles
                step = attention_step(p)
            step()
            sync()
            for name, tuner in tuned.items():
                timings = getattr(tuner, "configs_timings", None) or {}
                best = getattr(tuner, "best_config", None)
                for config, ms in timings.items():
                    ms = ms if isinstance(ms, (list, tuple)) else [ms]
                    rows.add(dict(RecordingBench._tile(config), case=case, kernel=name, ms=ms[0], best=config == best,
                                  source="configs_timings"))
                results.append(dict(case=case, kernel=name, best=str(best), candidates=len(timings),
                                    bench_s=getattr(tuner, "bench_time", None)))
            write_json(os.path.join(ctx.dir, "autotune.json"), results)
    finally:
        launch._tuned = own_tuned
        copied = copy_autotune_cache(os.path.join(ctx.dir, "triton-autotune"))
    return dict(results=results, cache_files=copied)


def copy_autotune_cache(dst):
    """Triton's *.autotune.json files of this run (TRITON_CACHE_DIR) into dst, as <hash>-<kernel>.autotune.json."""
    src = os.environ.get("TRITON_CACHE_DIR")
    if not src or not os.path.isdir(src):
        return []
    os.makedirs(dst, exist_ok=True)
    copied = []
    for folder, _, files in os.walk(src):
        for f in files:
            if f.endswith(".autotune.json"):
                name = f"{os.path.basename(folder)[:16]}-{f}"
                shutil.copy(os.path.join(folder, f), os.path.join(dst, name))
                copied.append(name)
    return sorted(copied)
