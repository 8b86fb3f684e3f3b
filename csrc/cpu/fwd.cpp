// Forward kernel: one task per (sequence, q head, q block); online softmax over the key blocks that
// the block's band can see. K^T and V are packed once per (sequence, kv head) up front, in the layout
// the matmul wants (see operands.h), and shared by the q heads of a GQA group.
#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/kernel.h"
#include "cpu/operands.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/tile_math.h"
#include "cpu/vec_math.h"

namespace pyattn::cpu {
namespace {

// Tile sizes: rows of q per task, keys per step. Measured on the 2-core EPYC (AVX-512, no AMX), B=1 H=8
// N=4096 D=64: 128 x 256 was best for causal and within 5% of the best (256 x 512) otherwise.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

template <typename T, typename acc>
struct FwdScratch {
  std::unique_ptr<T[]> q;  // (kBlockQ, kpad(E)) A operand
  std::unique_ptr<acc[]> s;  // (kBlockQ, kBlockK) scores, then probabilities
  std::unique_ptr<T[]> p;  // (kBlockQ, kpad(kBlockK)) probabilities as an A operand (bf16 only)
  std::unique_ptr<acc[]> o;  // (kBlockQ, Ev) unnormalized output
  std::unique_ptr<acc[]> m, l;  // (kBlockQ,) running max (log2 domain) and sum
  std::unique_ptr<uint8_t[]> keep;  // (kBlockK,) dropout
  FwdScratch(int64_t E, int64_t Ev)
      : q(new T[kBlockQ * kpad<T>(E)]), s(new acc[kBlockQ * kBlockK]),
        p(std::is_same_v<T, acc> ? nullptr : new T[kBlockQ * kpad<T>(kBlockK)]), o(new acc[kBlockQ * Ev]),
        m(new acc[kBlockQ]), l(new acc[kBlockQ]), keep(new uint8_t[kBlockK]) {}
  ~FwdScratch() { matmul_release<T>(); }
};

}  // namespace

template <typename scalar_t>
void run_fwd(const AttnParams& p) {
  using T = typename Compute<scalar_t>::T;
  using acc = typename Compute<scalar_t>::acc;
  const int64_t B = p.batch, Hq = p.heads_q, Hkv = p.heads_kv, group = Hq / Hkv;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, Ep = kpad<T>(E);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  auto* out = static_cast<scalar_t*>(p.out);
  const Strides4 qs = p.q_strides, ks = p.k_strides, vs = p.v_strides, os = p.out_strides, ls = p.lse_strides;

  std::vector<Seq> seqs(B);
  std::vector<int64_t> kv_off(B * Hkv + 1, 0);
  int64_t max_blocks = 0;
  for (int64_t b = 0; b < B; ++b) {
    seqs[b] = get_seq(p, b);
    max_blocks = std::max(max_blocks, (seqs[b].L + kBlockQ - 1) / kBlockQ);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      kv_off[b * Hkv + hk + 1] = kv_off[b * Hkv + hk] + Ep * seqs[b].S + kpad<T>(seqs[b].S) * Ev;
  }

  // K^T (E, S) and V (S, Ev) as B operands, per (sequence, kv head).
  at::Tensor kv_buf = at::empty({int64_t(kv_off.back() * sizeof(T))}, at::kByte);
  T* kv = reinterpret_cast<T*>(kv_buf.data_ptr());
  parallel_tasks(B * Hkv, [] { return 0; }, [&](int64_t t, int) {
    const Seq& s = seqs[t / Hkv];
    const int64_t hk = t % Hkv;
    T* kt = kv + kv_off[t];
    pack_b(k + s.tb * ks.batch + hk * ks.head + s.k0 * ks.row, ks.col, ks.row, E, s.S, kt);
    pack_b(v + s.tb * vs.batch + hk * vs.head + s.k0 * vs.row, vs.row, vs.col, s.S, Ev, kt + Ep * s.S);
  });

  // Tasks ordered by q block, last first: under causal masks the last blocks cost the most.
  std::vector<int64_t> tasks;  // (qb * B + b) * Hq + h
  for (int64_t qb = max_blocks - 1; qb >= 0; --qb)
    for (int64_t b = 0; b < B; ++b)
      if (qb * kBlockQ < seqs[b].L)
        for (int64_t h = 0; h < Hq; ++h) tasks.push_back((qb * B + b) * Hq + h);

  const acc inv_keep = p.dropout_p > 0 ? acc(1 / (1 - p.dropout_p_f64)) : acc(1);
  const int64_t ldp = std::is_same_v<T, acc> ? kBlockK : kpad<T>(kBlockK);

  parallel_tasks(int64_t(tasks.size()), [&] { return FwdScratch<T, acc>(E, Ev); },
                 [&](int64_t t, FwdScratch<T, acc>& w) {
    const int64_t h = tasks[t] % Hq, b = tasks[t] / Hq % B, qb = tasks[t] / Hq / B;
    const Seq& seq = seqs[b];
    const Scores<scalar_t, acc> sc(p, seq, b, h);
    const int64_t i0 = qb * kBlockQ, mi = std::min(kBlockQ, seq.L - i0);
    pack_a(q + seq.tb * qs.batch + h * qs.head + (seq.q0 + i0) * qs.row, qs.row, qs.col, mi, E, w.q.get());
    const T* kt = kv + kv_off[b * Hkv + h / group];
    const T* vp = kt + Ep * seq.S;
    acc* s = w.s.get();
    acc* o = w.o.get();
    acc* m = w.m.get();
    acc* l = w.l.get();
    const T* pa = nullptr;
    if constexpr (std::is_same_v<T, acc>) pa = s;
    else pa = w.p.get();
    std::fill(o, o + mi * Ev, acc(0));
    std::fill(m, m + mi, neg_inf<acc>());
    std::fill(l, l + mi, acc(0));

    const auto [klo, khi] = sc.band.keys(i0, i0 + mi);
    // Even block starts: V's VNNI pairs keys.
    for (int64_t j0 = klo & ~int64_t(1); j0 < khi; j0 += kBlockK) {
      const int64_t nj = std::min(kBlockK, khi - j0);
      matmul(mi, nj, E, w.q.get(), Ep, kt + b_col<T>(j0), seq.S, s, kBlockK, false);
      const acc cf = sc.template apply<false>(s, kBlockK, i0, mi, j0, nj, nullptr);
      for (int64_t r = 0; r < mi; ++r) {
        acc* x = s + r * kBlockK;
        const acc m_new = std::max(m[r], row_max(x, nj) * cf);
        if (m_new == neg_inf<acc>()) {
          std::fill(x, x + nj, acc(0));  // nothing allowed so far: p = 0, o and l stay 0
        } else {
          const acc alpha = std::exp2(m[r] - m_new);
          l[r] = l[r] * alpha + exp2_row(x, nj, cf, m_new);
          m[r] = m_new;
          if (alpha != 1) scale_row(o + r * Ev, Ev, alpha);
          if (p.dropout_p > 0) {
            uint8_t* keep = w.keep.get();
            dropout_keep_row(p.seed, p.offset, b * Hq + h, i0 + r, j0, nj, p.dropout_p, keep);
            for (int64_t c = 0; c < nj; ++c) x[c] = keep[c] ? x[c] * inv_keep : acc(0);
          }
        }
        if constexpr (!std::is_same_v<T, acc>) {
          T* pr = w.p.get() + r * ldp;
          convert_row(x, pr, nj);
          if (kpad<T>(nj) > nj) pr[nj] = T(0);
        }
      }
      matmul(mi, Ev, nj, pa, ldp, vp + j0 * Ev, Ev, o, Ev, true);
    }

    for (int64_t r = 0; r < mi; ++r) {
      const int64_t row = seq.q0 + i0 + r;
      scalar_t* dst = out + seq.tb * os.batch + h * os.head + row * os.row;
      const acc inv = l[r] > 0 ? 1 / l[r] : acc(0);
      for (int64_t c = 0; c < Ev; ++c) dst[c * os.col] = static_cast<scalar_t>(o[r * Ev + c] * inv);
      p.lse[seq.tb * ls.batch + h * ls.head + row * ls.row] =
          l[r] > 0 ? float(m[r] * acc(kLn2) + std::log(l[r])) : neg_inf<float>();
    }
  });
}

template void run_fwd<float>(const AttnParams&);
template void run_fwd<double>(const AttnParams&);
template void run_fwd<c10::BFloat16>(const AttnParams&);
template void run_fwd<c10::Half>(const AttnParams&);

}  // namespace pyattn::cpu
