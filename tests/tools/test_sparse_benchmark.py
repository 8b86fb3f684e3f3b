"""The sparse benchmark's patterns: their closed-form block classes and pair counts against the mask itself."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from benchmarks import sparse


def dense_blocks(mask, block):
    """(allowed somewhere, allowed everywhere) per block of a (L, S) bool mask, padded with False to whole blocks."""
    L, S = mask.shape
    pad = torch.zeros(-(-L // block) * block, -(-S // block) * block, dtype=torch.int32)
    pad[:L, :S] = mask.int()
    allowed = pad.view(pad.shape[0] // block, block, pad.shape[1] // block, block).sum((1, 3))
    return allowed > 0, allowed == block * block


@pytest.mark.parametrize("L", [1500, 3000], ids=lambda L: f"L{L}")
@pytest.mark.parametrize("name", sparse.PATTERNS)
def test_block_classes_match_the_mask(name, L):
    pattern = sparse.Pattern(name, L)
    mask = pattern.dense_mask()
    some, every = dense_blocks(mask, sparse.BLOCK)
    full, partial = pattern.block_classes()
    assert torch.equal(full, every)
    assert torch.equal(full | partial, some)
    assert pattern.allowed_pairs() == int(mask.sum())


@pytest.mark.parametrize("name", sparse.PATTERNS)
def test_block_mask_equals_torchs(name):
    L = 2000
    pattern = sparse.Pattern(name, L)
    ours = pattern.block_mask()
    torchs = create_block_mask(pattern.mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=sparse.BLOCK)
    assert torch.equal(ours.to_dense(), torchs.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, torchs.full_kv_num_blocks)
