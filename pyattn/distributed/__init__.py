"""Context parallelism over torch.distributed: attention over a sequence split across the ranks of a process
group, by ring (K/V shards passed around, partial results merged by LSE) or by all-to-all over heads
(Ulysses). shard/unshard/positions do the layout bookkeeping. See DESIGN.md's API contract."""
from .layout import LAYOUTS, positions, shard, unshard
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard", "unshard", "positions", "LAYOUTS"]
