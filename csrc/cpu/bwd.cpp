// Backward kernel. One task per (sequence, kv head, chunk of key blocks): it owns dK and dV of its keys
// (summed over the q heads of the GQA group in a fixed order, no atomics) and loops over the q blocks
// that can see each key block. Tiles are transposed (rows = keys, columns = queries), so
// P^T and dS^T come out directly as the A operands of dV += P^T dO and dK += dS^T Q, and dS^T as the
// B operand of dQ^T += K^T dS^T. dQ^T is accumulated per chunk in fp32 and the chunks are summed in a
// fixed order at the end (fp64 accumulates in fp64): the result is bitwise the same for any thread count.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/block_mask.h"
#include "cpu/kernel.h"
#include "cpu/operands.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/tile_math.h"
#include "cpu/vec_math.h"

namespace pyattn::cpu {
namespace {

// Tile sizes: keys per block (rows of a tile), queries per step. 128 x 128 measured best on the 2-core
// EPYC (B=1 H=8 N=4096 D=64, fp32 and bf16; 64 or 256 on either side was slower).
constexpr int64_t kBlockK = 128;
constexpr int64_t kBlockQ = 128;
// Row stride of the (kBlockK, kBlockQ) tiles: padded so that walking a column (the mask pass) does
// not map every row to the same few L1 sets.
constexpr int64_t kLd = kBlockQ + 16;
// Keys of a (sequence, kv head) are split into chunks until there are this many tasks, within the byte
// budget for dQ partial sums. Both depend on shapes only, never on the thread count (determinism).
constexpr int64_t kMinTasks = 16;
constexpr int64_t kPartialBudget = int64_t(128) << 20;

template <typename T, typename acc>
struct BwdScratch {
  static constexpr bool kSame = std::is_same_v<T, acc>;
  std::unique_ptr<T[]> k, v, kt;  // A operands: K (kBlockK, E), V (kBlockK, Ev), K^T (E, kBlockK)
  std::unique_ptr<acc[]> dk, dv;  // (kBlockK, E), (kBlockK, Ev) accumulators
  std::unique_ptr<acc[]> s, dp, dcap;  // (kBlockK, kLd): S^T then P^T, dP^T then dS^T, softcap slope
  std::unique_ptr<T[]> p, ds;  // (kBlockK, kLd) A operands P^T (dropped), dS^T
  std::unique_ptr<T[]> ds_b;  // (kpad(kBlockK), kBlockQ) dS^T as a VNNI B operand
  std::unique_ptr<uint8_t[]> keep;  // (kBlockQ, kBlockK)
  std::unique_ptr<uint8_t[]> allowed;  // (kBlockK, kLd) a partial run's block mask, transposed (only with one)
  BwdScratch(int64_t E, int64_t Ev, bool block_mask)
      : k(new T[kBlockK * kpad<T>(E)]), v(new T[kBlockK * kpad<T>(Ev)]), kt(new T[E * kpad<T>(kBlockK)]),
        dk(new acc[kBlockK * E]), dv(new acc[kBlockK * Ev]), s(new acc[kBlockK * kLd]),
        dp(new acc[kBlockK * kLd]), dcap(new acc[kBlockK * kLd]),
        p(new T[kBlockK * kLd]), ds(kSame ? nullptr : new T[kBlockK * kLd]),
        ds_b(kSame ? nullptr : new T[kpad<T>(kBlockK) * kBlockQ]), keep(new uint8_t[kBlockQ * kBlockK]),
        allowed(block_mask ? new uint8_t[kBlockK * kLd] : nullptr) {}
  ~BwdScratch() { matmul_release<T>(); }
};

// Queries that chunk c of n_chunks of a sequence's key blocks may touch; the start is even because
// q blocks start at even rows (VNNI pairs rows of the B operands dO and Q).
std::pair<int64_t, int64_t> chunk_queries(const Band& band, int64_t c, int64_t n_chunks) {
  const int64_t nkb = (band.S + kBlockK - 1) / kBlockK;
  const int64_t kb0 = c * nkb / n_chunks, kb1 = (c + 1) * nkb / n_chunks;
  if (kb0 >= kb1) return {0, 0};
  auto [lo, hi] = band.queries(kb0 * kBlockK, std::min(kb1 * kBlockK, band.S));
  return {lo & ~int64_t(1), hi};
}

// lse is stored in float32, which would cap float64 gradients near 1e-7 relative error. For float64,
// lse2 (log2 units, rows of one (sequence, q head)) is refined to full precision:
// lse2 += log2(sum_j 2^(s_ij - lse2) + 2^(sink - lse2)). qt: Q^T (E, L) as a B operand.
template <typename scalar_t>
void refine_lse(const AttnParams& p, const Seq& seq, int64_t b, int64_t h, const double* qt, double* lse2) {
  const Scores<scalar_t, double> sc(p, seq, b, h);
  const Strides4 ks = p.k_strides;
  const int64_t E = p.head_dim, L = seq.L;
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + seq.tb * ks.batch + h / (p.heads_q / p.heads_kv) * ks.head;
  std::vector<double> ka(kBlockK * E), st(kBlockK * kBlockQ), sum(L, 0.0);
  const BlockMask blocks(p, b, h, 1);
  std::vector<uint8_t> allowed(blocks.active() ? kBlockK * kBlockQ : 0);
  for (int64_t j0 = 0; j0 < seq.S; j0 += kBlockK) {
    const int64_t nj = std::min(kBlockK, seq.S - j0);
    pack_a(k + (seq.k0 + j0) * ks.row, ks.row, ks.col, nj, E, ka.data());
    for (int64_t i0 = 0; i0 < L; i0 += kBlockQ) {
      const int64_t mi = std::min(kBlockQ, L - i0);
      matmul(nj, mi, E, ka.data(), E, qt + i0, L, st.data(), kBlockQ, false);
      const double cf = sc.template apply<true>(st.data(), kBlockQ, i0, mi, j0, nj, nullptr);
      if (blocks.active()) {
        blocks.expand(h, i0, mi, j0, nj, allowed.data(), 1, kBlockQ);
        mask_scores(st.data(), kBlockQ, allowed.data(), kBlockQ, nj, mi);
      }
      for (int64_t r = 0; r < nj; ++r)
        for (int64_t c = 0; c < mi; ++c) sum[i0 + c] += std::exp2(st[r * kBlockQ + c] * cf - lse2[i0 + c]);
    }
  }
  const double sink = p.sinks != nullptr ? sink_logit(p, h) * kLog2e : neg_inf<double>();
  for (int64_t i = 0; i < L; ++i) {
    sum[i] += std::exp2(sink - lse2[i]);
    if (sum[i] > 0) lse2[i] += std::log2(sum[i]);
  }
}

// What the key-block tasks share, written by the prepass and read-only after it. Per (sequence, q head)
// t: Q^T (E, L), dO^T (Ev, L), dO (L, Ev) and Q (L, E) as B operands at qh + qh_off[t]; lse in log2 units
// and delta = rowsum(dO * O) - dlse at row_off[t]; dQ^T partial sums of key chunk c at
// part + c * part_stride + row_off[t] * E, (E, L) row-major.
template <typename scalar_t, typename T>
struct BwdState {
  using acc = acc_t<scalar_t>;
  const AttnBwdParams& p;
  int64_t group, E, Ev, Ep, Evp;
  std::vector<Seq> seqs;
  std::vector<int64_t> qh_off, row_off;
  int64_t max_nkb = 0, total_rows = 0;
  Buffer<T> qh;
  Buffer<acc> rows;  // lse2 (total_rows), then delta (total_rows)
  int64_t n_chunks = 1, part_stride = 0;
  Buffer<acc> part;

  explicit BwdState(const AttnBwdParams& p_) : p(p_), group(p.heads_q / p.heads_kv), E(p.head_dim),
      Ev(p.head_dim_v), Ep(kpad<T>(E)), Evp(kpad<T>(Ev)), seqs(p.batch), qh_off(p.batch * p.heads_q + 1, 0),
      row_off(p.batch * p.heads_q + 1, 0) {
    const int64_t B = p.batch, Hq = p.heads_q;
    for (int64_t b = 0; b < B; ++b) {
      const Seq s = seqs[b] = get_seq(p, b);
      max_nkb = std::max(max_nkb, (s.S + kBlockK - 1) / kBlockK);
      total_rows += s.L;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t i = b * Hq + h;
        qh_off[i + 1] = qh_off[i] + (Ep + Evp) * s.L + kpad<T>(s.L) * (E + Ev);
        row_off[i + 1] = row_off[i] + s.L;
      }
    }
    qh = Buffer<T>(qh_off.back());
    rows = Buffer<acc>(2 * row_off.back());
    n_chunks = std::max<int64_t>(
        1, std::min({(kMinTasks + B * p.heads_kv - 1) / (B * p.heads_kv), max_nkb,
                     kPartialBudget / std::max<int64_t>(1, Hq * E * total_rows * int64_t(sizeof(acc)))}));
    part_stride = row_off.back() * E;
    part = Buffer<acc>(n_chunks * part_stride);
  }
  acc* lse2(int64_t t) const { return rows.get() + row_off[t]; }
  acc* delta(int64_t t) const { return rows.get() + row_off.back() + row_off[t]; }
  acc* dqt(int64_t c, int64_t t) const { return part.get() + c * part_stride + row_off[t] * E; }
};

// Prepass for (sequence, q head) t: the B operands, lse2 and delta.
template <typename scalar_t, typename T>
void prepare_rows(const BwdState<scalar_t, T>& st, int64_t t) {
  using acc = acc_t<scalar_t>;
  const AttnBwdParams& p = st.p;
  const Seq& s = st.seqs[t / p.heads_q];
  const int64_t h = t % p.heads_q, L = s.L, E = st.E, Ev = st.Ev;
  const Strides4 qs = p.q_strides, os = p.out_strides, dos = p.dout_strides, ls = p.lse_strides;
  const auto* qp = static_cast<const scalar_t*>(p.q) + s.tb * qs.batch + h * qs.head + s.q0 * qs.row;
  const auto* dop = static_cast<const scalar_t*>(p.dout) + s.tb * dos.batch + h * dos.head + s.q0 * dos.row;
  const auto* op = static_cast<const scalar_t*>(p.out) + s.tb * os.batch + h * os.head + s.q0 * os.row;
  T* qt = st.qh.get() + st.qh_off[t];
  T* dot = qt + st.Ep * L;
  T* dob = dot + st.Evp * L;
  T* qb = dob + kpad<T>(L) * Ev;
  pack_b(qp, qs.col, qs.row, E, L, qt);
  pack_b(dop, dos.col, dos.row, Ev, L, dot);
  pack_b(dop, dos.row, dos.col, L, Ev, dob);
  pack_b(qp, qs.row, qs.col, L, E, qb);
  acc* lse2 = st.lse2(t);
  acc* delta = st.delta(t);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t row = s.q0 + i;
    const float lse = p.lse[s.tb * ls.batch + h * ls.head + row * ls.row];
    // empty rows: +inf makes every p = 2^(s - inf) = 0
    lse2[i] = lse == neg_inf<float>() ? -neg_inf<acc>() : acc(lse) * acc(kLog2e);
    acc d = 0;
    for (int64_t c = 0; c < Ev; ++c) d += acc(dop[i * dos.row + c * dos.col]) * acc(op[i * os.row + c * os.col]);
    if (p.dlse != nullptr) d -= acc(p.dlse[s.tb * p.dlse_strides.batch + h * p.dlse_strides.head + row * p.dlse_strides.row]);
    delta[i] = d;
  }
  if constexpr (std::is_same_v<acc, double>) refine_lse<scalar_t>(p, s, t / p.heads_q, h, qt, lse2);
}

// One tile: key block [j0, j0 + nj) (K, V, K^T packed in w) x q head h x queries [i0, i0 + mi) of
// sequence b, chunk c. Adds to w.dk, w.dv and to the chunk's dQ^T; writes dmask. allowed: the tile's block mask
// (nj, mi; ld kLd), or null.
template <typename scalar_t, typename T>
void bwd_tile(const BwdState<scalar_t, T>& st, BwdScratch<T, acc_t<scalar_t>>& w, const Scores<scalar_t, acc_t<scalar_t>>& sc,
              int64_t c, int64_t b, int64_t h, int64_t j0, int64_t nj, int64_t i0, int64_t mi,
              const uint8_t* allowed) {
  using acc = acc_t<scalar_t>;
  constexpr bool kSame = std::is_same_v<T, acc>;
  const AttnBwdParams& p = st.p;
  const int64_t t = b * p.heads_q + h, L = st.seqs[b].L, E = st.E, Ev = st.Ev;
  const T* qt = st.qh.get() + st.qh_off[t];
  const T* dot = qt + st.Ep * L;
  const T* dob = dot + st.Evp * L;
  const T* qb = dob + kpad<T>(L) * Ev;
  const acc* lse2 = st.lse2(t) + i0;
  const acc* delta = st.delta(t) + i0;
  const acc scale = acc(p.scale);
  const acc inv_keep = p.dropout_p > 0 ? acc(1 / (1 - p.dropout_p)) : acc(1);
  acc* s = w.s.get();
  acc* dp = w.dp.get();
  acc* dcap = p.softcap > 0 ? w.dcap.get() : nullptr;
  matmul(nj, mi, E, w.k.get(), st.Ep, qt + b_col<T>(i0), L, s, kLd, false);
  const acc cf = sc.template apply<true>(s, kLd, i0, mi, j0, nj, dcap);
  if (allowed != nullptr) mask_scores(s, kLd, allowed, kLd, nj, mi);
  matmul(nj, mi, Ev, w.v.get(), st.Evp, dot + b_col<T>(i0), L, dp, kLd, false);
  if (p.dropout_p > 0)
    for (int64_t cq = 0; cq < mi; ++cq)
      dropout_keep_row(p.seed, p.offset, t, i0 + cq, j0, nj, p.dropout_p, w.keep.get() + cq * kBlockK);
  for (int64_t r = 0; r < nj; ++r) {
    acc* x = s + r * kLd;
    acc* d = dp + r * kLd;
    exp2_sub_row(x, mi, cf, lse2);  // P^T
    T* pr = w.p.get() + r * kLd;
    if (p.dropout_p > 0) {
      for (int64_t cq = 0; cq < mi; ++cq) {
        const acc z = w.keep[cq * kBlockK + r] ? inv_keep : acc(0);
        pr[cq] = static_cast<T>(x[cq] * z);
        d[cq] *= z;
      }
    } else if constexpr (!kSame) {
      convert_row(x, pr, mi);
    }
    for (int64_t cq = 0; cq < mi; ++cq) d[cq] = x[cq] * (d[cq] - delta[cq]);  // dS^T
    if (p.dmask != nullptr) {
      float* dm = p.dmask + ((b * p.heads_q + h) * p.seqlen_q + i0) * p.seqlen_k + j0 + r;
      for (int64_t cq = 0; cq < mi; ++cq) dm[cq * p.seqlen_k] = float(d[cq]);
    }
    // d(q.k) = dS * scale * softcap slope; the scale is folded here for both dQ and dK
    if (dcap != nullptr) {
      const acc* g = dcap + r * kLd;
      for (int64_t cq = 0; cq < mi; ++cq) d[cq] *= scale * g[cq];
    } else {
      scale_row(d, mi, scale);
    }
    if constexpr (!kSame) {
      T* dr = w.ds.get() + r * kLd;
      convert_row(d, dr, mi);
      T* db = w.ds_b.get() + (r / 2) * 2 * kBlockQ + (r % 2);
      for (int64_t cq = 0; cq < mi; ++cq) db[2 * cq] = dr[cq];
      if (kpad<T>(mi) > mi) {
        pr[mi] = T(0);
        dr[mi] = T(0);
      }
    }
  }
  if constexpr (!kSame) {
    if (nj % 2) {  // zero the pad row of the last VNNI pair
      T* db = w.ds_b.get() + (nj / 2) * 2 * kBlockQ + 1;
      for (int64_t cq = 0; cq < mi; ++cq) db[2 * cq] = T(0);
    }
  }
  const T* pa = w.p.get();
  const T* dsa = nullptr;
  const T* dsb = nullptr;
  if constexpr (kSame) {
    if (p.dropout_p == 0) pa = s;
    dsa = dsb = dp;
  } else {
    dsa = w.ds.get();
    dsb = w.ds_b.get();
  }
  matmul(nj, Ev, mi, pa, kLd, dob + i0 * Ev, Ev, w.dv.get(), Ev, true);
  matmul(nj, E, mi, dsa, kLd, qb + i0 * E, E, w.dk.get(), E, true);
  matmul(E, mi, nj, w.kt.get(), kpad<T>(nj), dsb, kSame ? kLd : kBlockQ, st.dqt(c, t) + i0, L, true);
}

// Key block kb of (sequence b, kv head hk), in chunk c: dK and dV of its keys, summed over the GQA group's
// q heads and the q blocks that see the block, then stored.
template <typename scalar_t, typename T>
void bwd_key_block(const BwdState<scalar_t, T>& st, BwdScratch<T, acc_t<scalar_t>>& w, int64_t c, int64_t b,
                   int64_t hk, int64_t kb) {
  using acc = acc_t<scalar_t>;
  const AttnBwdParams& p = st.p;
  const Seq& seq = st.seqs[b];
  const int64_t E = st.E, Ev = st.Ev, j0 = kb * kBlockK, nj = std::min(kBlockK, seq.S - j0);
  const Strides4 ks = p.k_strides, vs = p.v_strides, dks = p.dk_strides, dvs = p.dv_strides;
  const auto* kp = static_cast<const scalar_t*>(p.k) + seq.tb * ks.batch + hk * ks.head + (seq.k0 + j0) * ks.row;
  const auto* vp = static_cast<const scalar_t*>(p.v) + seq.tb * vs.batch + hk * vs.head + (seq.k0 + j0) * vs.row;
  pack_a(kp, ks.row, ks.col, nj, E, w.k.get());
  pack_a(vp, vs.row, vs.col, nj, Ev, w.v.get());
  pack_a(kp, ks.col, ks.row, E, nj, w.kt.get());
  std::fill(w.dk.get(), w.dk.get() + nj * E, acc(0));
  std::fill(w.dv.get(), w.dv.get() + nj * Ev, acc(0));
  const auto [qlo, qhi] = make_band(p, seq).queries(j0, j0 + nj);
  const bool block_mask = p.block_states != nullptr;
  for (int64_t h = hk * st.group; h < (hk + 1) * st.group; ++h) {
    const Scores<scalar_t, acc> sc(p, seq, b, h);
    // runs of up to kBlockQ queries from even starts (VNNI pairs the rows of dO and Q) over the block mask's
    // non-empty blocks of these keys
    const BlockMask blocks(p, b, h, 1);
    const auto query_blocks = blocks.query_blocks(j0, j0 + nj);
    for (Run run = next_run(block_mask, query_blocks, p.block_q, qlo, qhi, kBlockQ); run.n > 0;
         run = next_run(block_mask, query_blocks, p.block_q, run.start + run.n, qhi, kBlockQ)) {
      if (run.partial) blocks.expand(h, run.start, run.n, j0, nj, w.allowed.get(), 1, kLd);
      bwd_tile(st, w, sc, c, b, h, j0, nj, run.start, run.n, run.partial ? w.allowed.get() : nullptr);
    }
  }
  auto* dk_out = static_cast<scalar_t*>(p.dk) + seq.tb * dks.batch + hk * dks.head;
  auto* dv_out = static_cast<scalar_t*>(p.dv) + seq.tb * dvs.batch + hk * dvs.head;
  for (int64_t r = 0; r < nj; ++r) {
    const int64_t row = seq.k0 + j0 + r;
    for (int64_t e = 0; e < E; ++e) dk_out[row * dks.row + e * dks.col] = static_cast<scalar_t>(w.dk[r * E + e]);
    for (int64_t e = 0; e < Ev; ++e) dv_out[row * dvs.row + e * dvs.col] = static_cast<scalar_t>(w.dv[r * Ev + e]);
  }
}

// dq of (sequence, q head) t = sum over chunks, in chunk order, of the chunks' dQ^T. Rows at a time:
// the partial sums are read along their rows (contiguous), then the block is stored transposed.
template <typename scalar_t, typename T>
void reduce_dq(const BwdState<scalar_t, T>& st, int64_t t) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kRows = 64;
  const AttnBwdParams& p = st.p;
  const int64_t b = t / p.heads_q, h = t % p.heads_q, n_chunks = st.n_chunks, E = st.E;
  const Seq& seq = st.seqs[b];
  const Band band = make_band(p, seq);
  const Strides4 dqs = p.dq_strides;
  std::vector<std::pair<int64_t, int64_t>> ranges(n_chunks);
  for (int64_t c = 0; c < n_chunks; ++c) ranges[c] = chunk_queries(band, c, n_chunks);
  std::vector<acc> sum(E * kRows);  // (E, kRows)
  scalar_t* dq = static_cast<scalar_t*>(p.dq) + seq.tb * dqs.batch + h * dqs.head + seq.q0 * dqs.row;
  for (int64_t i0 = 0; i0 < seq.L; i0 += kRows) {
    const int64_t n = std::min(kRows, seq.L - i0);
    std::fill(sum.begin(), sum.end(), acc(0));
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t lo = std::max(ranges[c].first, i0), hi = std::min(ranges[c].second, i0 + n);
      const acc* part = st.dqt(c, t);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t i = lo; i < hi; ++i) sum[e * kRows + i - i0] += part[e * seq.L + i];
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < E; ++e) dq[(i0 + i) * dqs.row + e * dqs.col] = static_cast<scalar_t>(sum[e * kRows + i]);
  }
}

template <typename scalar_t, typename T>
void bwd(const AttnBwdParams& p) {
  static_assert(kBlockQ % 2 == 0 && kBlockK % 2 == 0 && kLd % 2 == 0, "VNNI pairs need even blocks");
  using acc = acc_t<scalar_t>;
  const BwdState<scalar_t, T> st(p);
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv;
  parallel_tasks(B * Hq, [] { return 0; }, [&](int64_t t, int) { prepare_rows(st, t); });
  // Tasks (chunk, sequence, kv head), chunk-major: with causal masks the first key chunks see the most queries.
  parallel_tasks(st.n_chunks * B * Hkv, [&] { return BwdScratch<T, acc>(st.E, st.Ev, p.block_states != nullptr); },
                 [&](int64_t task, BwdScratch<T, acc>& w) {
    const int64_t c = task / (B * Hkv), b = task / Hkv % B, hk = task % Hkv;
    const Seq& seq = st.seqs[b];
    const Band band = make_band(p, seq);
    const int64_t nkb = (seq.S + kBlockK - 1) / kBlockK;
    const auto [qlo, qhi] = chunk_queries(band, c, st.n_chunks);
    for (int64_t h = hk * st.group; h < (hk + 1) * st.group; ++h)
      for (int64_t e = 0; e < st.E; ++e) {
        acc* dst = st.dqt(c, b * Hq + h) + e * seq.L;
        std::fill(dst + qlo, dst + std::max(qlo, qhi), acc(0));
      }
    for (int64_t kb = c * nkb / st.n_chunks; kb < (c + 1) * nkb / st.n_chunks; ++kb) bwd_key_block(st, w, c, b, hk, kb);
  });
  parallel_tasks(B * Hq, [] { return 0; }, [&](int64_t t, int) { reduce_dq(st, t); });
}

}  // namespace

template <typename scalar_t>
void run_bwd(const AttnBwdParams& p) {
  with_tile_type<scalar_t>([&](auto tile) { bwd<scalar_t, decltype(tile)>(p); });
}

template void run_bwd<float>(const AttnBwdParams&);
template void run_bwd<double>(const AttnBwdParams&);
template void run_bwd<c10::BFloat16>(const AttnBwdParams&);
template void run_bwd<c10::Half>(const AttnBwdParams&);

}  // namespace pyattn::cpu
