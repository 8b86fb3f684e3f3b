// Decode (group * L <= 128 rows, the FwdPath::kDecode* paths): one task per (sequence, chunk of keys, kv heads: all of
// them when there are tasks enough), key block by key block in cache order; a tile stacks all rows of a GQA group's q
// heads, so each key is read once per group. A key block is read, as the plan says, on the cache's rows by fp32 FMA
// (attend_block_rows, decode_rows.h), as matmul operands where it lies (attend_block_direct, all_heads_scores), or
// packed into scratch (pack_keys, attend_block; no copy of the cache). The chunks' partial (o, m, l) are then merged
// in key order, which keeps the result independent of the thread count.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/decode_rows.h"
#include "cpu/fwd_plan.h"
#include "cpu/fwd_tiles.h"
#include "cpu/parallel.h"

namespace pyattn::cpu {
namespace {

// Decode's key block without packing K: S^T (nj, M) = K (the cache rows as they lie; pages staged) @ Q^T (w.qt),
// transposed into w.s; then the softmax and o += P V from V packed (a plain copy, or VNNI's key pairs: one
// matmul over the block's keys, so paged and contiguous caches sum in the same order and agree bit for bit).
// The transposing pack of K^T took ~40% of a bf16 decode step (perf, S = 32k, one thread).
// scores: S^T of this head already computed (key c's M scores at scores + c * ld; all_heads_scores), else null.
template <typename T, typename acc>
void attend_block_direct(const AttnParams& p, const Seq& seq, int64_t b, int64_t hk, const Rows& rows, int64_t j0,
                         int64_t nj, FwdScratch<T, acc>& w, acc* o, acc* m, acc* l, const acc* scores, int64_t ld,
                         const uint8_t* allowed) {
  const int64_t E = p.head_dim, Ev = p.head_dim_v, M = rows.size();
  if (scores == nullptr) {
    const KeyRows<T> kr(p, seq, b, p.k, p.k_strides, hk);
    const T* ka = kr.row(j0);
    int64_t lda = kr.row_stride;
    if (kr.pages != nullptr) {
      // pages: their rows copied into one block (L2-resident scratch), so the block is one matmul, as when
      // contiguous (a matmul per page of 16 ran at about half the speed), and sums in the same order
      T* stage = w.kt.get();
      for (int64_t j = j0; j < j0 + nj; ++j) std::memcpy(stage + (j - j0) * E, kr.row(j), E * sizeof(T));
      ka = stage;
      lda = E;
    }
    matmul(nj, M, E, ka, lda, w.qt.get(), M, w.st.get(), M, false);
    scores = w.st.get();
    ld = M;
  }
  // S^T -> S in blocks of 16 x 16: AVX-512 transposes a block in registers (torch's transpose_mxn), where the
  // element-wise copy took ~30% of a 32-token step over a 64k cache (bf16, 32:8 heads: 1.27-1.35x for 16 and 32
  // tokens, Sapphire Rapids; other ISAs copy the blocks element-wise, as fast as before)
  for (int64_t c0 = 0; c0 < nj; c0 += 16)
    for (int64_t r0 = 0; r0 < M; r0 += 16)
      at::vec::transpose_mxn<acc>(scores + c0 * ld + r0, ld, w.s.get() + r0 * w.bk + c0, w.bk,
                                  int(std::min<int64_t>(16, nj - c0)), int(std::min<int64_t>(16, M - r0)));
  const T* pa = softmax_block<T>(p, seq, b, rows, j0, nj, w, o, m, l, 0, allowed);
  pack_keys<T, T>(p, seq, b, hk, j0, nj, nullptr, 0, w.v.get());
  matmul(M, Ev, nj, pa, w.ldp, w.v.get(), Ev, o, Ev, true);
}

// Paged decode's scores of key block [j0, j0 + nj) for every kv head at once: a page holds each key's heads
// together, so its rows are one matmul as they lie, (run * Hkv, E) @ Q^T of all q heads (w.qt_all, cols =
// Hq * L) -> w.st_all, of which a kv head keeps its own group's columns (Hkv x the few flops of a decode step).
// It replaces copying each head's rows of the block into a staging block, 256 bytes in every 2 KiB of a page per
// head: paged decode 8-12% faster (64k tokens, 32:8 heads, D = 128, B = 1 and 16, Sapphire Rapids).
template <typename T, typename acc>
void all_heads_scores(const AttnParams& p, const Seq& seq, int64_t b, int64_t j0, int64_t nj, int64_t cols,
                      FwdScratch<T, acc>& w) {
  const KeyRows<T> kr(p, seq, b, p.k, p.k_strides, 0);
  const int64_t Hkv = p.heads_kv;
  for (int64_t j = j0, run; j < j0 + nj; j += run) {
    run = kr.run(j, j0 + nj - j);
    matmul(run * Hkv, cols, p.head_dim, kr.row(j), p.head_dim, w.qt_all.get(), cols,
           w.st_all.get() + (j - j0) * Hkv * cols, cols, false);
  }
}

// q rows of the tile -> qt: Q^T (kpad(E), M), a B operand (decode's direct path).
template <typename scalar_t, typename T>
void load_qt(const AttnParams& p, const Seq& seq, const Rows& rows, T* qt) {
  const auto* q = static_cast<const scalar_t*>(p.q);
  const Strides4 qs = p.q_strides;
  for (int64_t g = 0; g < rows.heads; ++g)
    pack_b(q + seq.tb * qs.batch + (rows.h0 + g) * qs.head + (seq.q0 + rows.i0) * qs.row, qs.col, qs.row,
           p.head_dim, rows.n, qt + b_col<T>(g * rows.n), rows.size());
}

// Pointers to rows [j, j + n) of kr -> out.
template <typename S>
void row_pointers(const KeyRows<S>& kr, int64_t j, int64_t n, const void** out) {
  for (int64_t i = 0, run; i < n; i += run) {
    run = kr.run(j + i, n - i);
    const S* r0 = kr.row(j + i);
    for (int64_t k = 0; k < run; ++k) out[i + k] = r0 + k * kr.row_stride;
  }
}

// Decode's key block [j0, j0 + nj) for kv heads [h_lo, h_hi) without packing or brgemm (decode_rows.h). The cache
// is read where it lies (pages included) in memory order, kRowsGroup keys of all heads at a time (their rows lie
// together), once for q.k and once for P V, each group prefetching the next one (then V's first, the next block's
// K: next_nj keys from j0 + nj). Groups of 32 keys (64 KiB at 8 heads of 128 bf16): 16 and 64 measured within 3%.
// partial(hk) -> that head's o (M, Ev), m, l. run: the keys [j0, j0 + nj), and whether they need the block mask.
template <typename scalar_t, typename T, typename acc, typename Partial>
void attend_block_rows(const AttnParams& p, const Seq& seq, int64_t b, int64_t h_lo, int64_t h_hi, const Run& run,
                       int64_t next_nj, int64_t M, const BlockMask& blocks, FwdScratch<T, acc>& w,
                       const Partial& partial) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t kRowsGroup = 32;
    constexpr int64_t kElem = sizeof(scalar_t);
    const int64_t j0 = run.start, nj = run.n;
    const int64_t E = p.head_dim, Ev = p.head_dim_v, group = p.heads_q / p.heads_kv;
    const int64_t ks = p.k_strides.head, vs = p.v_strides.head, Ms = group * seq.L;
    const KeyRows<scalar_t> kr(p, seq, b, p.k, p.k_strides, 0), vr(p, seq, b, p.v, p.v_strides, 0);
    const void** k0 = w.rows.get();
    const void** v0 = k0 + w.bk;
    const void** k_next = v0 + w.bk;
    row_pointers(kr, j0, nj, k0);
    row_pointers(vr, j0, nj, v0);
    if (next_nj > 0) row_pointers(kr, j0 + nj, next_nj, k_next);
    // Group i of the rows this block reads, in order (K's groups, V's, then the next block's first of K), for head hk
    const int64_t G = (nj + kRowsGroup - 1) / kRowsGroup;
    auto prefetch = [&](int64_t i, int64_t hk) {
      if (i < G)
        return RowsPrefetch{k0 + i * kRowsGroup, hk * ks * kElem, std::min(kRowsGroup, nj - i * kRowsGroup), E * kElem};
      if (i < 2 * G) {
        const int64_t j = (i - G) * kRowsGroup;
        return RowsPrefetch{v0 + j, hk * vs * kElem, std::min(kRowsGroup, nj - j), Ev * kElem};
      }
      return RowsPrefetch{k_next, hk * ks * kElem, std::min(kRowsGroup, next_nj), E * kElem};
    };
    // heads whose rows fit in the tile scratch (w.q, w.s, w.p: w.bq rows)
    const int64_t fit = std::max<int64_t>(1, w.bq / Ms);
    for (int64_t hg = h_lo; hg < h_hi; hg += fit) {
      const int64_t hn = std::min(fit, h_hi - hg);
      load_q<scalar_t>(p, seq, Rows{hg * group, hn * group, 0, seq.L}, w);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j = g * kRowsGroup, n = std::min(kRowsGroup, nj - j);
        for (int64_t hk = hg; hk < hg + hn; ++hk) {
          const int64_t t = hk - hg;
          decode_rows_scores<scalar_t>(k0 + j, hk * ks, n, E, w.q.get() + t * Ms * E, E, Ms,
                                       w.s.get() + t * Ms * w.bk + j, w.bk, prefetch(g + 1, hk));
        }
      }
      // fp32 tiles: the probabilities replace the scores in w.s
      for (int64_t hk = hg; hk < hg + hn; ++hk) {
        acc* o = partial(hk);
        const Rows rows{hk * group, group, 0, seq.L};
        softmax_block<scalar_t>(p, seq, b, rows, j0, nj, w, o, o + M * Ev, o + M * Ev + M, (hk - hg) * Ms,
                                run_mask(blocks, rows, run, w, (hk - hg) * Ms));
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t j = g * kRowsGroup, n = std::min(kRowsGroup, nj - j);
        for (int64_t hk = hg; hk < hg + hn; ++hk) {
          const int64_t t = hk - hg;
          decode_rows_pv<scalar_t>(v0 + j, hk * vs, n, Ev, w.s.get() + t * Ms * w.bk + j, w.bk, Ms,
                                   partial(hk), prefetch(G + g + 1, hk));
        }
      }
    }
  }
}

template <typename scalar_t, typename T>
void fwd_decode(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan) {
  using acc = acc_t<scalar_t>;
  record_fwd_run(plan, tile_type_of<T>);
  const int64_t B = p.batch, Hkv = p.heads_kv, group = p.heads_q / Hkv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v;
  const int64_t M = group * p.seqlen_q;  // rows per tile, >= any sequence's group * L
  const int64_t part = M * (Ev + 2);  // one task's partial: o (M, Ev), m (M,), l (M,)

  // The keys of each sequence; the partial results of (sequence, kv head, chunk), those of (b, hk) at
  // first[b * Hkv + hk] onwards.
  std::vector<DecodeKeys> keys(B);
  std::vector<int64_t> first(B * Hkv + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    keys[b] = decode_keys(p, seqs[b]);
    for (int64_t hk = 0; hk < Hkv; ++hk) first[b * Hkv + hk + 1] = first[b * Hkv + hk] + keys[b].chunks;
  }
  std::vector<acc> parts(first.back() * part);
  const FwdPath path = plan.path;
  const int64_t heads_per_task = plan.heads_per_task;
  constexpr bool kSameType = std::is_same_v<scalar_t, T>;  // the instances that have the direct paths (plan())
  const int64_t head_tasks = (Hkv + heads_per_task - 1) / heads_per_task;
  std::vector<int64_t> first_chunk(B + 1, 0);  // tasks (sequence, chunk, head group) of b from first_chunk[b]
  for (int64_t b = 0; b < B; ++b) first_chunk[b + 1] = first_chunk[b] + keys[b].chunks * head_tasks;

  const bool block_mask = p.block_states != nullptr;
  parallel_tasks(first_chunk.back(), [&] { return FwdScratch<T, acc>(E, Ev, true, kDecodeTile, block_mask); },
                 [&](int64_t t, FwdScratch<T, acc>& w) {
    const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), t) - first_chunk.begin() - 1;
    const int64_t c = (t - first_chunk[b]) / head_tasks, h_lo = (t - first_chunk[b]) % head_tasks * heads_per_task;
    const int64_t h_hi = std::min(Hkv, h_lo + heads_per_task);
    const Seq& seq = seqs[b];
    const int64_t j_begin = keys[b].lo + c * kChunkBlocks * kDecodeTile.k;
    const int64_t j_end = std::min(keys[b].hi, j_begin + kChunkBlocks * kDecodeTile.k);
    auto partial = [&](int64_t hk) { return parts.data() + (first[b * Hkv + hk] + c) * part; };  // o, then m, l
    for (int64_t hk = h_lo; hk < h_hi; ++hk) {
      acc* o = partial(hk);
      init_rows(group * seq.L, Ev, o, o + M * Ev, o + M * Ev + M);
    }
    if (seq.L == 0) return;
    const int64_t Ms = group * seq.L, cols = Hkv * Ms;
    if constexpr (kSameType)
      if (path == FwdPath::kDecodeAllHeads) {
        w.alloc_all_heads(E, Hkv, Hkv * M);
        load_qt<scalar_t>(p, seq, Rows{0, p.heads_q, 0, seq.L}, w.qt_all.get());
      }
    // Runs of up to kDecodeTile.k keys over the block mask's non-empty blocks for the task's q heads
    const BlockMask blocks(p, b, h_lo * group, (h_hi - h_lo) * group);
    const auto key_blocks = blocks.key_blocks(0, seq.L);
    auto run_from = [&](int64_t j) { return next_run(block_mask, key_blocks, p.block_k, j, j_end, kDecodeTile.k); };
    for (Run run = run_from(j_begin); run.n > 0; run = run_from(run.start + run.n)) {
      const int64_t j0 = run.start, nj = run.n;
      if (path == FwdPath::kDecodeRows) {
        const Run next = run_from(j0 + nj);
        const int64_t next_nj = next.start == j0 + nj ? next.n : 0;  // the rows to prefetch: the next run's, if next
        attend_block_rows<scalar_t>(p, seq, b, h_lo, h_hi, run, next_nj, M, blocks, w, partial);
        continue;
      }
      if constexpr (kSameType)
        if (path == FwdPath::kDecodeAllHeads) all_heads_scores(p, seq, b, j0, nj, cols, w);
      for (int64_t hk = h_lo; hk < h_hi; ++hk) {
        const Rows rows{hk * group, group, 0, seq.L};
        acc* o = partial(hk);
        acc* m = o + M * Ev;
        acc* l = m + M;
        if constexpr (kSameType) {
          if (path == FwdPath::kDecodeDirect || path == FwdPath::kDecodeAllHeads) {
            // key c of head hk: row c * Hkv + hk of the all-heads scores, its group's columns from hk * Ms
            const bool all_heads = path == FwdPath::kDecodeAllHeads;
            const acc* scores = all_heads ? w.st_all.get() + hk * cols + hk * Ms : nullptr;
            if (!all_heads) load_qt<scalar_t>(p, seq, rows, w.qt.get());
            attend_block_direct(p, seq, b, hk, rows, j0, nj, w, o, m, l, scores, Hkv * cols,
                                run_mask(blocks, rows, run, w));
            continue;
          }
        }
        load_q<scalar_t>(p, seq, rows, w);
        // K^T and V of this key block -> scratch B operands
        pack_keys<scalar_t>(p, seq, b, hk, j0, nj, w.kt.get(), nj, w.v.get());
        attend_block<scalar_t>(p, seq, b, rows, j0, nj, w.kt.get(), nj, w.v.get(), w, o, m, l,
                               run_mask(blocks, rows, run, w));
      }
    }
    if (!plan.merge)
      for (int64_t hk = h_lo; hk < h_hi; ++hk) {
        acc* o = partial(hk);
        store_rows<scalar_t>(p, seq, Rows{hk * group, group, 0, seq.L}, o, o + M * Ev, o + M * Ev + M);
      }
  }, plan.threads);
  if (!plan.merge) return;

  // Merge the chunks of each (sequence, kv head) in key order: o, l rescaled to the common max.
  parallel_tasks(B * Hkv, [&] { return FwdScratch<T, acc>(E, Ev, false, kDecodeTile); },
                 [&](int64_t bh, FwdScratch<T, acc>& w) {
    const Seq& seq = seqs[bh / Hkv];
    const Rows rows{bh % Hkv * group, group, 0, seq.L};
    acc* o = w.o.get();
    acc* m = w.m.get();
    acc* l = w.l.get();
    init_rows(rows.size(), Ev, o, m, l);
    for (int64_t t = first[bh]; t < first[bh + 1]; ++t) {
      const acc* oc = parts.data() + t * part;
      const acc* mc = oc + M * Ev;
      const acc* lc = mc + M;
      for (int64_t r = 0; r < rows.size(); ++r) {
        const acc m_new = nan_max(m[r], mc[r]);
        if (m_new == neg_inf<acc>()) continue;
        const acc alpha = std::exp2(m[r] - m_new), beta = std::exp2(mc[r] - m_new);
        l[r] = l[r] * alpha + lc[r] * beta;
        m[r] = m_new;
        for (int64_t e = 0; e < Ev; ++e) o[r * Ev + e] = o[r * Ev + e] * alpha + oc[r * Ev + e] * beta;
      }
    }
    store_rows<scalar_t>(p, seq, rows, o, m, l);
  }, plan.threads);
}

}  // namespace

template <typename scalar_t>
void run_decode(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan) {
  with_tile_type<scalar_t>(plan.tiles, [&](auto tile) { fwd_decode<scalar_t, decltype(tile)>(p, seqs, plan); });
}

template void run_decode<float>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_decode<double>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_decode<c10::BFloat16>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);
template void run_decode<c10::Half>(const AttnParams&, const std::vector<Seq>&, const FwdPlan&);

}  // namespace pyattn::cpu
