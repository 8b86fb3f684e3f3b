// Forward kernel: online softmax over the key blocks that a tile of query rows can see. Two task
// shapes share the tile math (attend_block) and the epilogue (store_rows):
//   prefill: one task per (sequence, q head, q block). K^T and V are packed once per (sequence, kv
//            head), a wave of them at a time, in the layout the matmul wants (see operands.h), and shared by
//            the q heads of a GQA group.
//   decode (group * L <= 128): one task per (sequence, chunk of keys, kv heads: all of them when there
//            are tasks enough), key block by key block in cache order; a tile stacks all rows of a GQA
//            group's q heads, so each key is read once per group. K^T and V are packed
//            per key block into scratch (no copy of the cache); the chunks' partial (o, m, l) are then
//            merged in key order, which keeps the result independent of the thread count. Tiles of up to
//            8 rows (6 for bf16 on AMX) skip the packing and brgemm, on fp32 tiles: attend_block_rows
//            (decode_rows.h; decode_rows_take).
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif

#include <ATen/cpu/Utils.h>

#include "cpu/decode_rows.h"
#include "cpu/kernel.h"
#include "cpu/operands.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/tile_math.h"
#include "cpu/vec_math.h"

namespace pyattn::cpu {
namespace {

// A tile: rows of q per task, keys per step.
struct Tile {
  int64_t q, k;
};
// Decode (group * L <= 128 rows): 128 x 256.
constexpr Tile kDecodeTile{128, 256};
// Prefill's tile: 256 x 512 where its working set (the tile's scores, probabilities, o and q, and a key block of K
// and V) fits in 7/8 of a core's L2, else 128 x 256. Measured in one process, interleaved (Sapphire Rapids, 2 MiB
// L2, AMX): 256 x 512 ran bf16 1.02-1.26x faster (32:8 and 16:16 heads, D = 64, 128 and 256, 2k-8k tokens;
// 512 new tokens over a 64k cache: 1.24-1.36x contiguous, 1.09-1.16x paged), fp32 and fp16 (fp32 tiles) within 5%,
// and 0.98-1.10x with torch and pyattn held to AVX2. On the 2-core EPYC Zen 4 (1 MiB L2; B=1 H=8 N=4096 D=64),
// 128 x 256 was best for causal and within 5% of 256 x 512 otherwise. PYATTN_CPU_FWD_TILE=QxK sets the tile (read
// per call: tests and comparisons switch it).
int64_t l2_cache_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}

template <typename T, typename acc>
Tile prefill_tile(int64_t E, int64_t Ev) {
  if (const char* env = std::getenv("PYATTN_CPU_FWD_TILE"); env != nullptr && *env != '\0') {
    Tile t{0, 0};
    char end = 0;
    const int n = std::sscanf(env, "%" SCNd64 "x%" SCNd64 "%c", &t.q, &t.k, &end);
    TORCH_CHECK(n == 2 && t.q >= 1 && t.q <= 4096 && t.k >= 2 && t.k <= 4096 && t.k % 2 == 0,
                "PYATTN_CPU_FWD_TILE must be QxK with 1 <= Q <= 4096 and K even in [2, 4096] (VNNI pairs keys), got '",
                env, "'");
    return t;
  }
  constexpr Tile big{256, 512};
  constexpr int64_t kT = sizeof(T), kAcc = sizeof(acc);
  const int64_t bytes = big.q * big.k * kAcc + (std::is_same_v<T, acc> ? 0 : big.q * kpad<T>(big.k) * kT) +
                        big.q * (Ev * kAcc + kpad<T>(E) * kT) + big.k * (E + Ev) * kT;
  return 8 * bytes <= 7 * l2_cache_bytes() ? big : Tile{128, 256};
}

// Decode: key blocks per task. Fixed (not derived from the thread count) so results are reproducible.
constexpr int64_t kChunkBlocks = 4;

// A task's scratch for tiles of up to tile.q rows and tile.k keys.
template <typename T, typename acc>
struct FwdScratch {
  const int64_t bq, bk;  // the tile
  const int64_t ldp;  // ld of the probabilities as an A operand: w.s itself (fp32 tiles), or w.p
  std::unique_ptr<T[]> q;  // (bq, kpad(E)) A operand
  std::unique_ptr<acc[]> s;  // (bq, bk) scores, then probabilities
  std::unique_ptr<T[]> p;  // (bq, kpad(bk)) probabilities as an A operand (bf16 only)
  std::unique_ptr<acc[]> o;  // (bq, Ev) unnormalized output
  std::unique_ptr<acc[]> m, l;  // (bq,) running max (log2 domain) and sum
  std::unique_ptr<uint8_t[]> keep;  // (bk,) dropout
  std::unique_ptr<T[]> kt, v;  // decode: one key block of K^T (kpad(E), bk) and V (kpad(bk), Ev)
  std::unique_ptr<T[]> qt;  // decode: Q^T (kpad(E), bq) as a B operand
  std::unique_ptr<acc[]> st;  // decode: S^T (bk, bq)
  std::unique_ptr<T[]> qt_all;  // paged decode: Q^T of every q head (kpad(E), cols)
  std::unique_ptr<acc[]> st_all;  // paged decode: (bk * Hkv, cols) scores of a key block, all heads
  // decode on rows (attend_block_rows): pointers to a key block's rows of kv head 0 in K and V, and to the next
  // block's in K (3 bk; the cache's element type, which fp32 tiles widen)
  std::unique_ptr<const void*[]> rows;
  FwdScratch(int64_t E, int64_t Ev, bool decode, Tile tile)
      : bq(tile.q), bk(tile.k), ldp(std::is_same_v<T, acc> ? bk : kpad<T>(bk)), q(new T[bq * kpad<T>(E)]),
        s(new acc[bq * bk]), p(std::is_same_v<T, acc> ? nullptr : new T[bq * ldp]), o(new acc[bq * Ev]),
        m(new acc[bq]), l(new acc[bq]), keep(new uint8_t[bk]),
        kt(decode ? new T[kpad<T>(E) * bk] : nullptr), v(decode ? new T[kpad<T>(bk) * Ev] : nullptr),
        qt(decode ? new T[kpad<T>(E) * bq] : nullptr), st(decode ? new acc[bk * bq] : nullptr),
        rows(decode ? new const void*[3 * bk] : nullptr) {}
  ~FwdScratch() { matmul_release<T>(); }
  void alloc_all_heads(int64_t E, int64_t Hkv, int64_t cols) {
    if (qt_all) return;
    qt_all.reset(new T[kpad<T>(E) * cols]);
    st_all.reset(new acc[bk * Hkv * cols]);
  }
};

// Rows of a tile: query rows [i0, i0 + n) of each of the q heads [h0, h0 + heads), stacked head by head.
struct Rows {
  int64_t h0, heads, i0, n;
  int64_t size() const { return heads * n; }
};

template <typename acc>
void init_rows(int64_t M, int64_t Ev, acc* o, acc* m, acc* l) {
  std::fill(o, o + M * Ev, acc(0));
  std::fill(m, m + M, neg_inf<acc>());
  std::fill(l, l + M, acc(0));
}

// The raw scores of key block [j0, j0 + nj) in w.s (M, nj; ld w.bk; from row r0) -> online softmax update of
// o (M, Ev), m, l (M,); returns the probabilities as the A operand of P V (ld w.ldp; from row r0 of w.s or w.p).
template <typename scalar_t, typename T, typename acc>
const T* softmax_block(const AttnParams& p, const Seq& seq, int64_t b, const Rows& rows, int64_t j0, int64_t nj,
                       FwdScratch<T, acc>& w, acc* o, acc* m, acc* l, int64_t r0 = 0) {
  const int64_t Ev = p.head_dim_v, ldp = w.ldp;
  acc* s0 = w.s.get() + r0 * w.bk;
  T* p0 = std::is_same_v<T, acc> ? nullptr : w.p.get() + r0 * ldp;
  const acc inv_keep = p.dropout_p > 0 ? acc(1 / (1 - p.dropout_p)) : acc(1);
  // bf16/fp16 inputs: a cheaper exp2, and for their bf16 tiles the probabilities written as the A operand directly
  constexpr bool kCheap = !std::is_same_v<scalar_t, acc>;
  for (int64_t g = 0; g < rows.heads; ++g) {
    // per-head score math: ALiBi slope and mask differ per head
    const int64_t h = rows.h0 + g;
    const Scores<scalar_t, acc> sc(p, seq, b, h);
    acc* s = s0 + g * rows.n * w.bk;
    const acc cf = sc.template apply<false>(s, w.bk, rows.i0, rows.n, j0, nj, nullptr);
    for (int64_t r = g * rows.n; r < (g + 1) * rows.n; ++r) {
      acc* x = s0 + r * w.bk;
      bool in_tile = false;  // the probabilities already written to the A operand
      const acc m_new = nan_max(m[r], row_max(x, nj) * cf);
      if (m_new == neg_inf<acc>()) {
        std::fill(x, x + nj, acc(0));  // nothing allowed so far: p = 0, o and l stay 0
      } else {
        const acc alpha = std::exp2(m[r] - m_new);
        acc sum;
        if constexpr (!std::is_same_v<T, acc>) {
          in_tile = p.dropout_p == 0;
          sum = in_tile ? exp2_row_to<kCheap>(x, p0 + r * ldp, nj, cf, m_new)
                        : exp2_row<kCheap>(x, nj, cf, m_new);
        } else {
          sum = exp2_row<kCheap>(x, nj, cf, m_new);
        }
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        if (alpha != 1) scale_row(o + r * Ev, Ev, alpha);
        if (p.dropout_p > 0) {
          uint8_t* keep = w.keep.get();
          dropout_keep_row(p.seed, p.offset, b * p.heads_q + h, rows.i0 + r - g * rows.n, j0, nj, p.dropout_p, keep);
          for (int64_t c = 0; c < nj; ++c) x[c] = keep[c] ? x[c] * inv_keep : acc(0);
        }
      }
      if constexpr (!std::is_same_v<T, acc>) {
        T* pr = p0 + r * ldp;
        if (!in_tile) convert_row(x, pr, nj);
        if (kpad<T>(nj) > nj) pr[nj] = T(0);
      }
    }
  }
  if constexpr (std::is_same_v<T, acc>) return s0;
  else return p0;
}

// One key block [j0, j0 + nj) for the tile's rows (q already in w.q): scores, online softmax update of
// o (M, Ev), m, l (M,), then o += P V. kt: K^T block (column 0 = key j0), ld ldk; vb: V from key j0, ld Ev.
template <typename scalar_t, typename T, typename acc>
void attend_block(const AttnParams& p, const Seq& seq, int64_t b, const Rows& rows, int64_t j0, int64_t nj,
                  const T* kt, int64_t ldk, const T* vb, FwdScratch<T, acc>& w, acc* o, acc* m, acc* l) {
  const int64_t E = p.head_dim, Ev = p.head_dim_v, M = rows.size();
  matmul(M, nj, E, w.q.get(), kpad<T>(E), kt, ldk, w.s.get(), w.bk, false);
  const T* pa = softmax_block<scalar_t>(p, seq, b, rows, j0, nj, w, o, m, l);
  matmul(M, Ev, nj, pa, w.ldp, vb, Ev, o, Ev, true);
}

// Rows [j, j + n) (cols elements each) into L1 ahead of their use. Always inlined: GCC takes a function of nothing
// but prefetches for one without effects and drops its calls (none was left in the object code).
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_rows(const KeyRows<scalar_t>& rows, int64_t j, int64_t n,
                                                        int64_t cols) {
  for (int64_t i = j; i < j + n; ++i)
    for (int64_t c = 0; c < cols * int64_t(sizeof(scalar_t)); c += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows.row(i)) + c, 0, 3);
}

// K^T (kpad(E) rows, ld ldk, column 0 = key j0; skipped when kt is null) and V (rows from key j0, ld Ev) of
// keys [j0, j0 + nj) of kv head hk, as B operands: read run by run, a page at a time when the cache is paged
// (no gather copy).
template <typename scalar_t, typename T>
void pack_keys(const AttnParams& p, const Seq& seq, int64_t b, int64_t hk, int64_t j0, int64_t nj, T* kt,
               int64_t ldk, T* vb) {
  const KeyRows<scalar_t> kr(p, seq, b, p.k, p.k_strides, hk), vr(p, seq, b, p.v, p.v_strides, hk);
  const int64_t E = p.head_dim, Ev = p.head_dim_v, kcol = p.k_strides.col, vcol = p.v_strides.col;
  for (int64_t j = j0, n; kt != nullptr && j < j0 + nj; j += n) {
    n = kr.run(j, j0 + nj - j);
    pack_b(kr.row(j), kcol, kr.row_stride, E, n, kt + b_col<T>(j - j0), ldk);
  }
  if (kVnni<T> && p.block_table != nullptr && (p.page_size % 2 || seq.k0 % 2)) {
    // VNNI pairs consecutive keys, which odd page ends split: pack pair by pair, the second row by its distance
    for (int64_t j = j0; j < j0 + nj; j += 2) {
      const scalar_t* r0 = vr.row(j);
      const int64_t rows = std::min<int64_t>(2, j0 + nj - j);
      pack_b(r0, rows == 2 ? vr.row(j + 1) - r0 : 0, vcol, rows, Ev, vb + (j - j0) * Ev, Ev);
    }
    return;
  }
  for (int64_t j = j0, n; j < j0 + nj; j += n) {
    n = vr.run(j, j0 + nj - j);
    // the next page's rows: the hardware prefetcher does not follow a jump to another page (paged decode 9-12%
    // faster, same measurement as all_heads_scores)
    if (vr.pages != nullptr && j + n < j0 + nj) prefetch_rows(vr, j + n, vr.run(j + n, j0 + nj - j - n), Ev);
    pack_b(vr.row(j), vr.row_stride, vcol, n, Ev, vb + (j - j0) * Ev, Ev);
  }
}

// Whether decode can read the cache's rows as matmul operands where they lie (the tile type is the input type:
// attend_block_direct exists only then): rows with unit column stride, and no padding for VNNI's pairs.
template <typename T>
bool direct_keys(const AttnParams& p) {
  return p.k_strides.col == 1 && p.v_strides.col == 1 && (!kVnni<T> || p.head_dim % 2 == 0);
}

// Decode's key block without packing K: S^T (nj, M) = K (the cache rows as they lie; pages staged) @ Q^T (w.qt),
// transposed into w.s; then the softmax and o += P V from V packed (a plain copy, or VNNI's key pairs: one
// matmul over the block's keys, so paged and contiguous caches sum in the same order and agree bit for bit).
// The transposing pack of K^T took ~40% of a bf16 decode step (perf, S = 32k, one thread).
// scores: S^T of this head already computed (key c's M scores at scores + c * ld; all_heads_scores), else null.
template <typename T, typename acc>
void attend_block_direct(const AttnParams& p, const Seq& seq, int64_t b, int64_t hk, const Rows& rows, int64_t j0,
                         int64_t nj, FwdScratch<T, acc>& w, acc* o, acc* m, acc* l, const acc* scores, int64_t ld) {
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
  const T* pa = softmax_block<T>(p, seq, b, rows, j0, nj, w, o, m, l);
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

// q rows of the tile -> w.q as the A operand.
template <typename scalar_t, typename T, typename acc>
void load_q(const AttnParams& p, const Seq& seq, const Rows& rows, FwdScratch<T, acc>& w) {
  const auto* q = static_cast<const scalar_t*>(p.q);
  const Strides4 qs = p.q_strides;
  const int64_t Ep = kpad<T>(p.head_dim);
  for (int64_t g = 0; g < rows.heads; ++g)
    pack_a(q + seq.tb * qs.batch + (rows.h0 + g) * qs.head + (seq.q0 + rows.i0) * qs.row, qs.row, qs.col, rows.n,
           p.head_dim, w.q.get() + g * rows.n * Ep);
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

// Whether decode runs tiles of `rows` q rows (group * L) on the cache's rows where they lie (attend_block_rows: fp32
// FMA, whatever the input type): up to 8 rows of whole vectors, but only up to 6 where bf16 tiles run on AMX. There,
// as bf16 tiles, 8 rows ran 1.10-1.20x faster (7: 1.03x; 5 and 6 rows 0.82x and 0.94x; Sapphire Rapids, 2 threads,
// 64k keys, 8 kv heads of 128); fp32 tiles were slower up to 8 rows.
template <typename scalar_t>
bool decode_rows_take(int64_t rows, int64_t E, int64_t Ev) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    bool amx_tiles = false;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      static const bool amx = at::cpu::init_amx();
      with_tile_type<scalar_t>([&](auto tile) { amx_tiles = amx && std::is_same_v<decltype(tile), scalar_t>; });
    }
    return rows <= (amx_tiles ? 6 : kDecodeTile.q) && decode_rows_fit(rows, E, Ev);
  }
}

// ... for this call: the rows also need unit column strides.
template <typename scalar_t>
bool decode_on_rows(const AttnParams& p) {
  return decode_rows_take<scalar_t>(p.heads_q / p.heads_kv * p.seqlen_q, p.head_dim, p.head_dim_v) &&
         p.k_strides.col == 1 && p.v_strides.col == 1;
}

// Decode's key block [j0, j0 + nj) for kv heads [h_lo, h_hi) without packing or brgemm (decode_rows.h). The cache
// is read where it lies (pages included) in memory order, kRowsGroup keys of all heads at a time (their rows lie
// together), once for q.k and once for P V, each group prefetching the next one (then V's first, the next block's
// K: next_nj keys from j0 + nj). Groups of 32 keys (64 KiB at 8 heads of 128 bf16): 16 and 64 measured within 3%.
// partial(hk) -> that head's o (M, Ev), m, l.
template <typename scalar_t, typename T, typename acc, typename Partial>
void attend_block_rows(const AttnParams& p, const Seq& seq, int64_t b, int64_t h_lo, int64_t h_hi, int64_t j0,
                       int64_t nj, int64_t next_nj, int64_t M, FwdScratch<T, acc>& w, const Partial& partial) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t kRowsGroup = 32;
    constexpr int64_t kElem = sizeof(scalar_t);
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
        softmax_block<scalar_t>(p, seq, b, Rows{hk * group, group, 0, seq.L}, j0, nj, w, o, o + M * Ev, o + M * Ev + M,
                                (hk - hg) * Ms);
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

// Epilogue: out = o / l and lse, for the tile's rows; fully masked rows (l == 0) get 0 and -inf. A sink
// joins l (and lse) with no value: such rows get 0 and the sink. o is normalized in place; m, l may change.
template <typename scalar_t, typename acc>
void store_rows(const AttnParams& p, const Seq& seq, const Rows& rows, acc* o, acc* m, acc* l) {
  auto* out = static_cast<scalar_t*>(p.out);
  const Strides4 os = p.out_strides, ls = p.lse_strides;
  const int64_t Ev = p.head_dim_v;
  for (int64_t g = 0; g < rows.heads; ++g) {
    const int64_t h = rows.h0 + g;
    for (int64_t i = 0; i < rows.n; ++i) {
      const int64_t r = g * rows.n + i, row = seq.q0 + rows.i0 + i;
      scalar_t* dst = out + seq.tb * os.batch + h * os.head + row * os.row;
      acc keep = 1;  // what the sink leaves of o's scale
      if (p.sinks != nullptr) {
        const acc sink = acc(sink_logit(p, h) * kLog2e), m_new = nan_max(m[r], sink);
        keep = std::exp2(m[r] - m_new);
        l[r] = l[r] * keep + std::exp2(sink - m_new);
        m[r] = m_new;
      }
      // l is 0 for a fully masked row (-> 0, -inf), NaN for a row that met a NaN (-> NaN, NaN)
      const acc inv = l[r] == 0 ? acc(0) : keep / l[r];
      acc* o_r = o + r * Ev;
      if (os.col == 1) {
        scale_row(o_r, Ev, inv);
        convert_row(o_r, dst, Ev);
      } else {
        for (int64_t c = 0; c < Ev; ++c) dst[c * os.col] = static_cast<scalar_t>(o_r[c] * inv);
      }
      p.lse[seq.tb * ls.batch + h * ls.head + row * ls.row] =
          l[r] == 0 ? neg_inf<float>() : float(m[r] * acc(kLn2) + std::log(l[r]));
    }
  }
}

// Prefill packs the keys a wave of (sequence, kv head) pairs at a time into one buffer that the waves reuse, a wave
// being the fewest pairs that give every thread 4 tasks. Packing every pair at once took a buffer as large as K and
// V (256 MiB for 64k tokens of 8 kv heads of 128, bf16), freshly faulted in on every call: 48 new tokens over a 64k
// cache ran 1.2-1.3x faster in waves (B = 16 over 8k-16k: 1.5-1.7x; 512 new tokens and sdpa prefill within noise,
// Sapphire Rapids, 2 threads, bit-identical results), and the extra memory is a wave's. A wave's packing is split
// by keys too, so that a wave of one pair still keeps every thread busy.
constexpr int64_t kPackKeys = 4096;  // keys per packing task (even: V's VNNI pairs keys)

template <typename scalar_t, typename T>
void fwd_prefill(const AttnParams& p, const std::vector<Seq>& seqs) {
  using acc = acc_t<scalar_t>;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, group = Hq / Hkv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, Ep = kpad<T>(E);
  const Tile tile = prefill_tile<T, acc>(E, Ev);
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
    });

    // Tasks (q block, pair, head of its group) ordered by q block, last first: under causal masks the last blocks
    // cost the most.
    std::vector<int64_t> tasks;  // (qb * B * Hkv + bh) * group + g
    int64_t max_blocks = 0;
    for (int64_t bh = bh_lo; bh < bh_hi; ++bh) max_blocks = std::max(max_blocks, q_blocks(bh / Hkv));
    for (int64_t qb = max_blocks - 1; qb >= 0; --qb)
      for (int64_t bh = bh_lo; bh < bh_hi; ++bh)
        if (qb < q_blocks(bh / Hkv))
          for (int64_t g = 0; g < group; ++g) tasks.push_back((qb * B * Hkv + bh) * group + g);

    parallel_tasks(int64_t(tasks.size()), [&] { return FwdScratch<T, acc>(E, Ev, false, tile); },
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
      // Even block starts: V's VNNI pairs keys.
      for (int64_t j0 = klo & ~int64_t(1); j0 < khi; j0 += tile.k) {
        const int64_t nj = std::min(tile.k, khi - j0);
        attend_block<scalar_t>(p, seq, b, rows, j0, nj, kt + b_col<T>(j0), seq.S, vp + j0 * Ev, w, w.o.get(),
                               w.m.get(), w.l.get());
      }
      store_rows<scalar_t>(p, seq, rows, w.o.get(), w.m.get(), w.l.get());
    });
  }
}

template <typename scalar_t, typename T>
void fwd_decode(const AttnParams& p, const std::vector<Seq>& seqs) {
  using acc = acc_t<scalar_t>;
  const int64_t B = p.batch, Hkv = p.heads_kv, group = p.heads_q / Hkv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v;
  const int64_t M = group * p.seqlen_q;  // rows per tile, >= any sequence's group * L
  const int64_t part = M * (Ev + 2);  // one task's partial: o (M, Ev), m (M,), l (M,)

  // Keys [lo, hi) that some query of the sequence sees, from an even start (V's VNNI pairs keys); the partial
  // results of (sequence, kv head, chunk), those of (b, hk) at first[b * Hkv + hk] onwards.
  std::vector<std::pair<int64_t, int64_t>> keys(B);
  std::vector<int64_t> first(B * Hkv + 1, 0), chunks(B);
  for (int64_t b = 0; b < B; ++b) {
    const auto [klo, khi] = make_band(p, seqs[b]).keys(0, seqs[b].L);
    keys[b] = {klo & ~int64_t(1), khi};
    const int64_t blocks = seqs[b].L > 0 && khi > klo ? (khi - keys[b].first + kDecodeTile.k - 1) / kDecodeTile.k : 0;
    chunks[b] = std::max<int64_t>(1, (blocks + kChunkBlocks - 1) / kChunkBlocks);
    for (int64_t hk = 0; hk < Hkv; ++hk) first[b * Hkv + hk + 1] = first[b * Hkv + hk] + chunks[b];
  }
  std::vector<acc> parts(first.back() * part);
  // Every sequence in one chunk (up to kChunkBlocks key blocks, a decode step's first ~1k tokens): the tasks
  // store their results, with no merge pass (what it would compute: the same values).
  const bool single_chunks = first.back() == B * Hkv;
  constexpr bool kSameType = std::is_same_v<scalar_t, T>;
  const bool direct = kSameType && direct_keys<T>(p);
  const bool on_rows = std::is_same_v<T, float> && decode_on_rows<scalar_t>(p);
  // pages with a key's heads together, and scores of all heads small enough for L2 (all_heads_scores)
  const bool pages_whole = direct && !on_rows && p.block_table != nullptr && p.k_strides.head == E &&
                           p.k_strides.row == Hkv * E && Hkv * Hkv * M <= 256;
  // A task takes a chunk of one sequence for several kv heads (all of them unless that leaves fewer than 4 tasks
  // per thread), key block by key block: a block's rows of all heads lie together in the cache, and reading them
  // head by head at the cache's row stride (2 KiB at 8 heads of 128 bf16) ran at ~40% of the bandwidth of reading
  // them in order (9.5 vs 25.8 GB/s at 2 threads on the Sapphire Rapids). The partial results do not depend on
  // the grouping, so neither does the output.
  int64_t heads_per_task = Hkv;
  while (heads_per_task > 1 && first.back() / heads_per_task < 4 * at::get_num_threads())
    heads_per_task = (heads_per_task + 1) / 2;
  const int64_t head_tasks = (Hkv + heads_per_task - 1) / heads_per_task;
  std::vector<int64_t> first_chunk(B + 1, 0);  // tasks (sequence, chunk, head group) of b from first_chunk[b]
  for (int64_t b = 0; b < B; ++b) first_chunk[b + 1] = first_chunk[b] + chunks[b] * head_tasks;

  parallel_tasks(first_chunk.back(), [&] { return FwdScratch<T, acc>(E, Ev, true, kDecodeTile); },
                 [&](int64_t t, FwdScratch<T, acc>& w) {
    const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), t) - first_chunk.begin() - 1;
    const int64_t c = (t - first_chunk[b]) / head_tasks, h_lo = (t - first_chunk[b]) % head_tasks * heads_per_task;
    const int64_t h_hi = std::min(Hkv, h_lo + heads_per_task);
    const Seq& seq = seqs[b];
    const int64_t j_begin = keys[b].first + c * kChunkBlocks * kDecodeTile.k;
    const int64_t j_end = std::min(keys[b].second, j_begin + kChunkBlocks * kDecodeTile.k);
    auto partial = [&](int64_t hk) { return parts.data() + (first[b * Hkv + hk] + c) * part; };  // o, then m, l
    for (int64_t hk = h_lo; hk < h_hi; ++hk) {
      acc* o = partial(hk);
      init_rows(group * seq.L, Ev, o, o + M * Ev, o + M * Ev + M);
    }
    if (seq.L == 0) return;
    const int64_t Ms = group * seq.L, cols = Hkv * Ms;
    const bool all_heads = pages_whole && h_hi - h_lo == Hkv;
    if constexpr (kSameType)
      if (all_heads) {
        w.alloc_all_heads(E, Hkv, Hkv * M);
        load_qt<scalar_t>(p, seq, Rows{0, p.heads_q, 0, seq.L}, w.qt_all.get());
      }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeTile.k) {
      const int64_t nj = std::min(kDecodeTile.k, j_end - j0);
      if (on_rows) {
        const int64_t next_nj = std::clamp<int64_t>(j_end - j0 - kDecodeTile.k, 0, kDecodeTile.k);
        attend_block_rows<scalar_t>(p, seq, b, h_lo, h_hi, j0, nj, next_nj, M, w, partial);
        continue;
      }
      if constexpr (kSameType)
        if (all_heads) all_heads_scores(p, seq, b, j0, nj, cols, w);
      for (int64_t hk = h_lo; hk < h_hi; ++hk) {
        const Rows rows{hk * group, group, 0, seq.L};
        acc* o = partial(hk);
        acc* m = o + M * Ev;
        acc* l = m + M;
        if constexpr (kSameType) {
          if (direct) {
            // key c of head hk: row c * Hkv + hk of the all-heads scores, its group's columns from hk * Ms
            const acc* scores = all_heads ? w.st_all.get() + hk * cols + hk * Ms : nullptr;
            if (!all_heads) load_qt<scalar_t>(p, seq, rows, w.qt.get());
            attend_block_direct(p, seq, b, hk, rows, j0, nj, w, o, m, l, scores, Hkv * cols);
            continue;
          }
        }
        load_q<scalar_t>(p, seq, rows, w);
        // K^T and V of this key block -> scratch B operands
        pack_keys<scalar_t>(p, seq, b, hk, j0, nj, w.kt.get(), nj, w.v.get());
        attend_block<scalar_t>(p, seq, b, rows, j0, nj, w.kt.get(), nj, w.v.get(), w, o, m, l);
      }
    }
    if (single_chunks)
      for (int64_t hk = h_lo; hk < h_hi; ++hk) {
        acc* o = partial(hk);
        store_rows<scalar_t>(p, seq, Rows{hk * group, group, 0, seq.L}, o, o + M * Ev, o + M * Ev + M);
      }
  });
  if (single_chunks) return;

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
  });
}

}  // namespace

template <typename scalar_t>
void run_fwd(const AttnParams& p) {
  std::vector<Seq> seqs(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) seqs[b] = get_seq(p, b);
  // Short queries: a tile holds every row of a GQA group, so each key block is read once per group.
  const bool decode = p.heads_q / p.heads_kv * p.seqlen_q <= kDecodeTile.q;
  if constexpr (!std::is_same_v<scalar_t, double>)
    if (decode_on_rows<scalar_t>(p)) return fwd_decode<scalar_t, float>(p, seqs);
  with_tile_type<scalar_t>([&](auto tile) {
    using T = decltype(tile);
    if (decode) fwd_decode<scalar_t, T>(p, seqs);
    else fwd_prefill<scalar_t, T>(p, seqs);
  });
}

template <typename scalar_t>
int64_t fwd_plan(int64_t rows, int64_t E, int64_t Ev, char* out, int64_t size) {
  const bool decode = rows <= kDecodeTile.q;
  if (decode_rows_take<scalar_t>(rows, E, Ev))
    return std::snprintf(out, size, "decode: fp32 FMA on the cache's rows where they lie (unit column strides), "
                         "split-KV chunks of %" PRId64 " keys", kChunkBlocks * kDecodeTile.k);
  int64_t n = 0;
  with_tile_type<scalar_t>([&](auto tile) {
    using T = decltype(tile);
    const char* type = std::is_same_v<T, double> ? "fp64" : std::is_same_v<T, float> ? "fp32" : "bf16 VNNI";
    const char* why = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>
                          ? " (bf16 widened: no bf16 VNNI brgemm here)" : "";
    if (decode) {
      n = std::snprintf(out, size, "decode: %s tiles of %" PRId64 " x %" PRId64 "%s, split-KV chunks of %" PRId64
                        " keys", type, kDecodeTile.q, kDecodeTile.k, why, kChunkBlocks * kDecodeTile.k);
    } else {
      const Tile t = prefill_tile<T, acc_t<scalar_t>>(E, Ev);
      n = std::snprintf(out, size, "prefill: %s tiles of %" PRId64 " x %" PRId64 "%s (L2 %" PRId64 " KiB)", type, t.q,
                        t.k, why, l2_cache_bytes() / 1024);
    }
  });
  return n;
}

template void run_fwd<float>(const AttnParams&);
template void run_fwd<double>(const AttnParams&);
template void run_fwd<c10::BFloat16>(const AttnParams&);
template void run_fwd<c10::Half>(const AttnParams&);
template int64_t fwd_plan<float>(int64_t, int64_t, int64_t, char*, int64_t);
template int64_t fwd_plan<double>(int64_t, int64_t, int64_t, char*, int64_t);
template int64_t fwd_plan<c10::BFloat16>(int64_t, int64_t, int64_t, char*, int64_t);
template int64_t fwd_plan<c10::Half>(int64_t, int64_t, int64_t, char*, int64_t);

}  // namespace pyattn::cpu
