// The block-sparse mask (AttnParams::block_states, block_bits) as the kernels' tiles see it: which blocks a tile's
// rows and keys touch are empty (never computed), full (no per-element mask: the plain path) or partial (bits
// expanded into a byte mask), and the runs of keys (forward) or queries (backward) that skip the empty blocks.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/vec_math.h"
#include "params.h"

namespace pyattn::cpu {

// What a range of blocks holds, all told.
enum class BlockClass { kEmpty, kFull, kPartial };

// The block mask of q heads [h0, h0 + heads) of batch b; inactive (every block full) without one.
struct BlockMask {
  const int32_t* states = nullptr;  // at (b, h0, 0, 0); nullptr: no block mask
  int64_t h0 = 0, head_stride = 0, row_stride = 0, col_stride = 0, heads = 0;
  int64_t bq = 0, bk = 0, row_bytes = 0;
  const uint8_t* bits = nullptr;

  BlockMask() = default;
  BlockMask(const AttnParams& p, int64_t b, int64_t h0_, int64_t heads_)
      : h0(h0_), heads(heads_), bq(p.block_q), bk(p.block_k), row_bytes(p.block_bits_row), bits(p.block_bits) {
    if (p.block_states == nullptr) return;
    const Strides4 s = p.block_states_strides;
    states = p.block_states + b * s.batch + h0 * s.head;
    head_stride = s.head;
    row_stride = s.row;
    col_stride = s.col;
  }
  bool active() const { return states != nullptr; }

  // Query blocks [qb0, qb1) x key blocks [kb0, kb1) of every head, combined.
  BlockClass combine(int64_t qb0, int64_t qb1, int64_t kb0, int64_t kb1) const {
    bool any = false, all_full = true;
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t qb = qb0; qb < qb1; ++qb) {
        const int32_t* row = states + g * head_stride + qb * row_stride;
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          const int32_t s = row[kb * col_stride];
          any |= s != 0;
          all_full &= s == 1;
          if (any && !all_full) return BlockClass::kPartial;
        }
      }
    return !any ? BlockClass::kEmpty : all_full ? BlockClass::kFull : BlockClass::kPartial;
  }
  // The key blocks that queries [i0, i1) meet, one by one; the query blocks that keys [j0, j1) meet (inactive:
  // never asked).
  auto key_blocks(int64_t i0, int64_t i1) const {
    const int64_t qb0 = active() ? i0 / bq : 0, qb1 = active() ? (i1 - 1) / bq + 1 : 0;
    return [this, qb0, qb1](int64_t kb) { return combine(qb0, qb1, kb, kb + 1); };
  }
  auto query_blocks(int64_t j0, int64_t j1) const {
    const int64_t kb0 = active() ? j0 / bk : 0, kb1 = active() ? (j1 - 1) / bk + 1 : 0;
    return [this, kb0, kb1](int64_t qb) { return combine(qb, qb + 1, kb0, kb1); };
  }

  // allowed[r * x_q + c * x_k] = 1 where query i0 + r (r < ni) of q head h may attend key j0 + c (c < nj) by the
  // block mask, else 0.
  void expand(int64_t h, int64_t i0, int64_t ni, int64_t j0, int64_t nj, uint8_t* allowed, int64_t x_q,
              int64_t x_k) const {
    for (int64_t r = 0; r < ni; ++r) {
      const int64_t i = i0 + r, qb = i / bq;
      const int32_t* row = states + (h - h0) * head_stride + qb * row_stride;
      uint8_t* out = allowed + r * x_q;
      for (int64_t j = j0; j < j0 + nj;) {
        const int64_t kb = j / bk, end = std::min(j0 + nj, (kb + 1) * bk);
        const int32_t s = row[kb * col_stride];
        if (s < 2) {
          for (int64_t c = j - j0; c < end - j0; ++c) out[c * x_k] = uint8_t(s);
        } else {
          const uint8_t* b = bits + ((s - 2) * bq + i % bq) * row_bytes;
          for (int64_t c = j - j0, k = j - kb * bk; c < end - j0; ++c, ++k) out[c * x_k] = (b[k >> 3] >> (k & 7)) & 1;
        }
        j = end;
      }
    }
  }
};

// Scores (rows, cols; ld) -> -inf where allowed (ld lda) is 0: the partial blocks' bits, after every other mask.
template <typename acc>
void mask_scores(acc* s, int64_t ld, const uint8_t* allowed, int64_t lda, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (!allowed[r * lda + c]) s[r * ld + c] = neg_inf<acc>();
}

// A run of positions [start, start + n) (keys of a forward tile, queries of a backward one): partial when some
// (query, key) in it needs the block mask's byte mask, else every block it meets is full (or there is no mask).
struct Run {
  int64_t start, n;
  bool partial;
};

// The next run from position `from` (the first not yet visited) before `end`: up to max_n positions (even) from an
// even start (VNNI pairs them), over consecutive non-empty blocks of `block` positions (classify(index) -> BlockClass),
// the empty ones skipped. n == 0: none left. Without a block mask, the plain even-start steps of max_n.
template <typename Classify>
Run next_run(bool active, const Classify& classify, int64_t block, int64_t from, int64_t end, int64_t max_n) {
  if (from >= end) return {from, 0, false};
  if (!active) {
    const int64_t start = from & ~int64_t(1);
    return {start, std::min(max_n, end - start), false};
  }
  int64_t first = from;
  while (first < end && classify(first / block) == BlockClass::kEmpty) first = (first / block + 1) * block;
  if (first >= end) return {first, 0, false};
  // an odd first position brings in the one before it, of an empty block (or before the band): masked
  const int64_t start = first & ~int64_t(1), last = std::min(end, start + max_n);
  bool partial = start < first;
  int64_t pos = first;
  while (pos < last) {
    const BlockClass c = classify(pos / block);
    if (c == BlockClass::kEmpty) break;
    partial |= c == BlockClass::kPartial;
    pos = (pos / block + 1) * block;
  }
  return {start, std::min(pos, last) - start, partial};
}

}  // namespace pyattn::cpu
