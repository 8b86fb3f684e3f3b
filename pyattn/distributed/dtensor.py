"""DTensor inputs for ring_attention and ulysses_attention: q, k, v sharded on the sequence dim (Shard(2)) over a
1-D DeviceMesh run on their local shards with the mesh's process group, and come back as DTensors placed the
same way. Only public DTensor API (to_local, from_local, device_mesh.get_group).

The layout argument still says which tokens a shard holds: torch's context_parallel (with its default load
balancing, when N is a multiple of 2P) shards buffers head-and-tail, which is layout="zigzag".
"""
import functools

import torch.distributed as dist
from ..errors import AttentionInputError


def _dtensor_types():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def accepts_dtensors(fn):
    """fn(q, k, v, **kwargs) that also takes DTensors (see above); plain tensors pass straight through."""
    @functools.wraps(fn)
    def run(q, k, v, **kwargs):
        types = _dtensor_types()
        if types is None or not any(isinstance(t, types[0]) for t in (q, k, v)):
            return fn(q, k, v, **kwargs)
        DTensor, Shard = types
        mesh = q.device_mesh if isinstance(q, DTensor) else None
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, DTensor) or t.device_mesh != mesh or mesh.ndim != 1 or t.placements != (Shard(2),):
                raise AttentionInputError(f"{fn.__name__}: DTensor inputs must all be DTensors on one 1-D DeviceMesh, sharded "
                                 f"on the sequence dim (placements (Shard(2),)); {name} is "
                                 f"{getattr(t, 'placements', type(t).__name__)} on {getattr(t, 'device_mesh', None)}")
        group = mesh.get_group()
        if kwargs.get("group") not in (None, group):
            raise AttentionInputError(f"{fn.__name__}: group must be None or the DTensors' mesh group")
        res = fn(q.to_local(), k.to_local(), v.to_local(), **{**kwargs, "group": group})
        wrap = lambda t: DTensor.from_local(t, mesh, (Shard(2),), run_check=False)  # noqa: E731
        return tuple(map(wrap, res)) if isinstance(res, tuple) else wrap(res)

    return run
