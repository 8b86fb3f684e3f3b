"""Run a function on P processes of this machine joined in a gloo process group over loopback: context
parallelism without torchrun, for tests, benchmarks and trying it out."""
import os
import pickle
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, store, out_dir, threads, fn, args):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_local(fn, world, *args, threads=1, env=None, timeout=None):
    """fn(*args) on world spawned processes, each in the default process group (gloo, rendezvous through a file,
    so no port is taken) with `threads` torch threads -> [fn's result on rank r for r in range(world)].

    fn must be importable by name (a module-level function) and its result picklable; env: variables the
    processes start with (e.g. allocator settings); a process that fails raises here with its traceback.
    """
    env = {"GLOO_SOCKET_IFNAME": "lo", **(env or {})}
    saved = {name: os.environ.get(name) for name in env}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(env)  # spawned processes copy the environment when they start
        try:
            ctx = mp.start_processes(_rank_main, args=(world, os.path.join(tmp, "store"), tmp, threads, fn, args),
                                     nprocs=world, join=False, start_method="spawn")
        finally:
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ctx.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"run_local: {fn.__name__} on {world} processes ran past {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results
