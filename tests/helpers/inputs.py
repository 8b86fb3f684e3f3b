"""Random inputs that many test files build the same way: q, k, v of given shapes, and a KV cache laid out in pages."""
import torch


def qkv(*shapes):
    """{"q", "k", "v"}: standard normal float32 CPU tensors of the three shapes."""
    return dict(zip(("q", "k", "v"), (torch.randn(s) for s in shapes)))


def paged_caches(k_cache, v_cache, page_size, generator, spare_pages=3):
    """The same keys in pages, shuffled across a pool that also holds spare_pages pages of noise (a kernel reading a
    wrong page sees it); a sequence's last page is padded with zeros.

    k_cache, v_cache: (B, S_max, Hkv, E), (B, S_max, Hkv, Ev)
    -> k_pages (num_pages, page_size, Hkv, E), v_pages (num_pages, page_size, Hkv, Ev),
       block_table (B, ceil(S_max / page_size)) int32, all on the caches' device."""
    B, S_max = k_cache.shape[:2]
    per_seq = -(-S_max // page_size)
    num_pages = B * per_seq + spare_pages
    order = torch.randperm(num_pages, generator=generator)[:B * per_seq]
    pools = []
    for cache in (k_cache, v_cache):
        padded = torch.cat([cache, cache.new_zeros(B, per_seq * page_size - S_max, *cache.shape[2:])], 1)
        pool = torch.randn(num_pages, page_size, *cache.shape[2:], generator=generator, dtype=torch.float64).to(cache)
        pool[order.to(cache.device)] = padded.reshape(B * per_seq, page_size, *cache.shape[2:])
        pools.append(pool)
    return pools[0], pools[1], order.view(B, per_seq).to(device=k_cache.device, dtype=torch.int32)
