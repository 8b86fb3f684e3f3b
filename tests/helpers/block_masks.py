"""Block-sparse masks for the kernels' tests: random block_states / block_bits, and the dense mask they mean."""
import torch


def random_block_mask(Bm, Hm, L, S, block_q, block_k, density, generator):
    """-> block_states (Bm, Hm, Qb, Kb) int32 with about `density` of its blocks non-empty (half of them partial),
    block_bits (P, block_q, ceil(block_k / 8)) uint8 random bits for the partial ones."""
    Qb, Kb = -(-L // block_q), -(-S // block_k)
    u = torch.rand(Bm, Hm, Qb, Kb, generator=generator)
    states = torch.where(u < density, 1, 0).to(torch.int32)
    partial = (u < density / 2).flatten()
    states.view(-1)[partial] = 2 + torch.arange(int(partial.sum()), dtype=torch.int32)
    bits = torch.randint(0, 256, (int(partial.sum()), block_q, -(-block_k // 8)), generator=generator,
                         dtype=torch.uint8)
    return states, bits


def dense_block_mask(states, bits, block_q, block_k, B, H, L, S):
    """The (B, H, L, S) bool mask that block_states and block_bits mean (csrc/ops.cpp)."""
    i, j = torch.arange(L), torch.arange(S)
    s = states.expand(B, H, -1, -1).long()[:, :, i // block_q][:, :, :, j // block_k]
    allowed = s == 1
    if bits.shape[0] > 0:
        byte = bits.long()[(s - 2).clamp(min=0), (i % block_q)[:, None], ((j % block_k) // 8)[None, :]]
        allowed |= (s >= 2) & ((byte >> ((j % block_k) % 8)) & 1).bool()
    return allowed
