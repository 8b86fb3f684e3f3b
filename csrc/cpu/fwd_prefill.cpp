// Prefill (FwdPath::kPrefill): one task per (sequence, q head, q block) over the key blocks its rows can see,
// online softmax (fwd_tiles.h). K^T and V are packed once per (sequence, kv head), a wave of them at a time, in the
// layout the matmul wants (see operands.h), and shared by the q heads of a GQA group.
#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/fwd_plan.h"
#include "cpu/fwd_tiles.h"
#include "cpu/parallel.h"

namespace pyattn::cpu {
namespace {

// Prefill packs the keys a wave of (sequence, kv head) pairs at a time into one buffer that the waves reuse, a wave
// being the fewest pairs that give every thread 4 tasks. Packing every pair at once took a buffer as large as K and
// V (256 MiB for 64k tokens of 8 kv heads of 128, bf16), freshly faulted in on every call: 48 new tokens over a 64k
// cache ran 1.2-1.3x faster in waves (B = 16 over 8k-16k: 1.5-1.7x; 512 new tokens and sdpa prefill within noise,
// Sapphire Rapids, 2 threads, bit-identical results), and the extra memory is a wave's. A wave's packing is split
// by keys too, so that a wave of one pair still keeps every thread busy.
constexpr int64_t kPackKeys = 4096;  // keys per packing task (even: V's VNNI pairs keys)

template <typename scalar_t, typename T>
void fwd_prefill(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan) {
  using acc = acc_t<scalar_t>;
  record_fwd_run(plan, tile_type_of<T>);
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, group = Hq / Hkv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, Ep = kpad<T>(E);
  const Tile tile = plan.tile;
  auto q_blocks = [&](int64_t b) { return (seqs[b].L + tile.q - 1) / tile.q; };

  // Waves [wave[w], wave[w + 1]) of pairs bh = b * Hkv + hk; kv_off: a pair's K^T (E, S) and V (S, Ev), as B
  // operands, in the buffer.
  std::vector<int64_t> wave{0}, kv_off(B * Hkv);
  int64_t bytes = 0, buffer = 0, wave_tasks = 0;
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const Seq& s = seqs[bh / Hkv];
    kv_off[bh] = bytes;
    bytes += Ep * s.S + kpad<T>(s.S) * Ev;
    wave_tasks += group * q_blocks(bh / Hkv);
    if (wave_tasks >= 4 * at::get_num_threads() || bh + 1 == B * Hkv) {
      wave.push_back(bh + 1);
      buffer = std::max(buffer, bytes);
      bytes = wave_tasks = 0;
    }
  }
  const Buffer<T> kv_buf(buffer);
  T* kv = kv_buf.get();

  for (size_t w = 0; w + 1 < wave.size(); ++w) {
    const int64_t bh_lo = wave[w], bh_hi = wave[w + 1];
    std::vector<std::pair<int64_t, int64_t>> packs;  // (pair, first key)
    for (int64_t bh = bh_lo; bh < bh_hi; ++bh)
      for (int64_t j0 = 0; j0 < seqs[bh / Hkv].S; j0 += kPackKeys) packs.emplace_back(bh, j0);
    parallel_tasks(int64_t(packs.size()), [] { return 0; }, [&](int64_t t, int) {
      const auto [bh, j0] = packs[t];
      const Seq& s = seqs[bh / Hkv];
      T* kt = kv + kv_off[bh];
      pack_keys<scalar_t>(p, s, bh / Hkv, bh % Hkv, j0, std::min(kPackKeys, s.S - j0), kt + b_col<T>(j0), s.S,
                          kt + Ep * s.S + j0 * Ev);
    }, plan.threads);

    // Tasks (q block, pair, head of its group) ordered by q block, last first: under causal masks the last blocks
    // cost the most.
    std::vector<int64_t> tasks;  // (qb * B * Hkv + bh) * group + g
    int64_t max_blocks = 0;
    for (int64_t bh = bh_lo; bh < bh_hi; ++bh) max_blocks = std::max(max_blocks, q_blocks(bh / Hkv));
    for (int64_t qb = max_blocks - 1; qb >= 0; --qb)
      for (int64_t bh = bh_lo; bh < bh_hi; ++bh)
        if (qb < q_blocks(bh / Hkv))
          for (int64_t g = 0; g < group; ++g) tasks.push_back((qb * B * Hkv + bh) * group + g);

    const bool block_mask = p.block_states != nullptr;
    parallel_tasks(int64_t(tasks.size()), [&] { return FwdScratch<T, acc>(E, Ev, false, tile, block_mask); },
                   [&](int64_t t, FwdScratch<T, acc>& w) {
      const int64_t g = tasks[t] % group, bh = tasks[t] / group % (B * Hkv), qb = tasks[t] / group / (B * Hkv);
      const int64_t b = bh / Hkv;
      const Seq& seq = seqs[b];
      const Rows rows{bh % Hkv * group + g, 1, qb * tile.q, std::min(tile.q, seq.L - qb * tile.q)};
      load_q<scalar_t>(p, seq, rows, w);
      const T* kt = kv + kv_off[bh];
      const T* vp = kt + Ep * seq.S;
      init_rows(rows.n, Ev, w.o.get(), w.m.get(), w.l.get());
      const auto [klo, khi] = make_band(p, seq).keys(rows.i0, rows.i0 + rows.n);
      // Runs of up to tile.k keys from even starts (V's VNNI pairs keys), over the block mask's non-empty blocks
      const BlockMask blocks(p, b, rows.h0, rows.heads);
      const auto key_blocks = blocks.key_blocks(rows.i0, rows.i0 + rows.n);
      for (Run run = next_run(block_mask, key_blocks, p.block_k, klo, khi, tile.k); run.n > 0;
           run = next_run(block_mask, key_blocks, p.block_k, run.start + run.n, khi, tile.k)) {
        const int64_t j0 = run.start;
        attend_block<scalar_t>(p, seq, b, rows, j0, run.n, kt + b_col<T>(j0), seq.S, vp + j0 * Ev, w, w.o.get(),
                               w.m.get(), w.l.get(), run_mask(blocks, rows, run, w));
      }
      store_rows<scalar_t>(p, seq, rows, w.o.get(), w.m.get(), w.l.get());
    }, plan.threads);
  }
}

}  // namespace

template <typename scalar_t>
void run_prefill(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan) {
  with_tile_type<scalar_t>(plan.tiles, [&](auto tile) { fwd_prefill<scalar_t, decltype(tile)>(p, seqs, plan); });
}

template void run_prefill<float>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_prefill<double>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_prefill<c10::BFloat16>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_prefill<c10::Half>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);

}  // namespace pyattn::cpu
