"""Passing tensors around a ring of ranks with torch.distributed point-to-point ops, and optional counters of
what that cost (for the context-parallel benchmark).

The transport is the user's process group (gloo on CPU, NCCL on GPUs): nothing of our own.
"""
import contextlib
import time

import torch.distributed as dist

_stats = None  # a dict while `recording()` is active


@contextlib.contextmanager
def recording():
    """Counts, while active, in this process: bytes_sent, wait_s (time blocked on communication) and
    compute_s (time in attention blocks). Wall-clock timers: meaningful on CPU, where calls are synchronous."""
    global _stats
    previous, _stats = _stats, {"bytes_sent": 0, "wait_s": 0.0, "compute_s": 0.0}
    try:
        yield _stats
    finally:
        _stats = previous


@contextlib.contextmanager
def timed(counter):
    """Adds the time spent in the block to the active recording's counter."""
    if _stats is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        _stats[counter] += time.perf_counter() - start


class InFlight:
    """Tensors being received; wait() blocks until they (and the matching sends) are done."""

    def __init__(self, works, received):
        self.works, self.received = works, received

    def wait(self):
        with timed("wait_s"):
            for w in self.works:
                w.wait()
        return self.received


class Ring:
    """Ranks of a group in a ring: each sends to rank + 1 and receives from rank - 1."""

    def __init__(self, group, rank, world):
        self.group, self.rank, self.world = group, rank, world

    def pass_on(self, tensors):
        """Start sending tensors (contiguous) to the next rank and receiving as many of the same shapes from the
        previous one. -> InFlight."""
        received = [t.new_empty(t.shape) for t in tensors]
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=nxt) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, group=self.group, group_peer=prev) for r in received]
        if _stats is not None:
            _stats["bytes_sent"] += sum(t.numel() * t.element_size() for t in tensors)
        return InFlight(dist.batch_isend_irecv(ops), received)
