"""Timing, FLOP and memory models for one benchmark point."""
import os
import statistics
import time

import torch

BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8}


def attention_flops(B, H, L, S, D, causal, pass_):
    """fwd 4*B*H*L*S*D (two matmuls), halved for causal; bwd 2.5x fwd; fwd+bwd 3.5x."""
    fwd = 4 * B * H * L * S * D / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_]


def predicted_bytes(impl, B, H, L, S, D, dtype, pass_, Hkv=None):
    """Memory the point needs: inputs, outputs, grads, and for naive the L x S scores and K/V repeated
    to every query head (GQA)."""
    elt, Hkv = BYTES[dtype], Hkv or H
    io = (2 * B * H * L * D + 2 * B * Hkv * S * D) * elt * (2 if pass_ != "fwd" else 1)
    if impl == "naive" or impl.startswith("torch-sdpa-math"):
        # scores, softmax and its float32 copy (and their grads in backward) are all L x S
        repeated_kv = 2 * B * H * S * D * elt if Hkv != H else 0
        return io + repeated_kv + B * H * L * S * (elt + 4 + elt) * (3 if pass_ != "fwd" else 1)
    return io + B * H * L * 4 * 4


def available_bytes(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def cpu_matmul_gflops(dtype, n=2048, reps=3):
    """Measured matmul peak on this machine, for the fraction-of-peak column."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def gpu_matmul_gflops(dtype, n=8192):
    import triton.testing

    a, b = (torch.randn(n, n, dtype=dtype, device="cuda") for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / ms / 1e6


def copy_tensors(device, nbytes):
    """(src, dst) of nbytes each: dst.copy_(src), whose bandwidth is the roofline of decode points."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return src, torch.empty_like(src)


def copy_rate_gbps(src, ms):
    """GB/s of a copy of src that took ms: bytes read + bytes written."""
    return 2 * src.numel() * src.element_size() / ms / 1e6


def copy_gbps(device, nbytes=1 << 30, tensors=None, best_of=None):
    """Measured device copy bandwidth (read + write) of tensors (copy_tensors()'s, else new ones of nbytes):
    time_ms's median, or on the CPU the best of best_of copies after a warm-up one."""
    src, dst = tensors or copy_tensors(device, nbytes)
    if best_of is None:
        return copy_rate_gbps(src, time_ms(lambda: dst.copy_(src), device))
    dst.copy_(src)
    seconds = []
    for _ in range(best_of):
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - t0)
    return copy_rate_gbps(src, min(seconds) * 1e3)


def peaks(device, dtypes):
    """{dtype name: matmul GFLOP/s, "copy_gbps": GB/s}, measured in this run."""
    matmul = cpu_matmul_gflops if device == "cpu" else gpu_matmul_gflops
    out = {name: matmul(dt) for name, dt in dtypes.items() if not (device == "cpu" and dt == torch.float16)}
    if device == "cpu":  # torch's CPU fp16 matmul is a slow fallback; fp16 attention runs on the fp32 units
        out["fp16"] = out["fp32"]
    out["copy_gbps"] = copy_gbps(device, 1 << 28 if device == "cpu" else 1 << 30)
    return out


def make_step(fn, q, k, v, causal, pass_):
    """A closure that runs one pass; backward re-runs forward once and times only what pass_ names."""
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
        return step
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    if pass_ == "fwd+bwd":
        def step():
            out = fn(qg, kg, vg, causal)
            out.backward(torch.ones_like(out))
        return step
    out = fn(qg, kg, vg, causal)
    grad = torch.ones_like(out)

    def step():
        torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True)
    return step


def time_ms(step, device, min_time=0.25, max_reps=20, max_seconds=2.0, warm=False):
    """Median milliseconds of step after a warm-up (skipped on CPU when the caller's correctness check
    already ran this exact step); CUDA events on GPU, perf_counter on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    if not warm:
        step()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        elapsed = time.perf_counter() - start
        # 3+ repeats over min_time; calls of seconds each vary little, so 2 s of them is enough
        if (len(times) >= 3 and elapsed >= min_time) or (times and elapsed >= max_seconds):
            break
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_interleaved(steps, min_time=0.25, max_rounds=20, max_seconds=2.0):
    """{name: median milliseconds} of warm CPU steps ({name: callable}) timed in turn, one call of each per round:
    on a shared host whose speed drifts over seconds (other tenants' memory traffic), separate runs of two
    impls can differ by 30% while their ratio within interleaved rounds holds. Every other round runs in reverse
    order, so that no step always follows the same one (a step right after a 1 GiB copy starts with the caches
    full of its dirty lines). 3+ rounds over min_time per step; rounds of seconds each stop after 2 once they pass
    max_seconds per step."""
    times = {name: [] for name in steps}
    order = list(steps.items())
    start = time.perf_counter()
    for rounds in range(max_rounds):
        elapsed = (time.perf_counter() - start) / len(steps)
        if (rounds >= 3 and elapsed >= min_time) or (rounds >= 2 and elapsed >= max_seconds):
            break
        for name, step in order if rounds % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Start a new peak-RSS window (VmHWM). Not ru_maxrss: that one survives fork+exec from a big parent."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_rss_bytes():
    return _status_kib("VmHWM")


def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
