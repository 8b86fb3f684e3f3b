// Host-side checks and params filling shared by the CPU and CUDA host APIs (see host_params.h).
#include "host_params.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace pyattn {

Strides4 strides4(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), t.stride(1), t.stride(2), 0};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_device(const Host& host, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == host.device, host.tag, ": ", name, " must be on ", host.device, ", got ", t.device());
}

namespace {

const char* torch_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return c10::toString(dtype);
  }
}

}  // namespace

void check_dtype(const Host& host, const at::Tensor& q, c10::ArrayRef<at::ScalarType> dtypes) {
  if (std::find(dtypes.begin(), dtypes.end(), q.scalar_type()) != dtypes.end()) return;
  std::string names;
  for (size_t i = 0; i < dtypes.size(); ++i)
    names += std::string(i == 0 ? "" : i + 1 == dtypes.size() ? " or " : ", ") + torch_name(dtypes[i]);
  TORCH_CHECK(false, host.tag, ": q must be ", names, ", got ", q.scalar_type());
}

void check_rng_state(const Host& host, const std::optional<at::Tensor>& rng_state, double dropout_p) {
  if (dropout_p == 0) return;
  TORCH_CHECK(rng_state.has_value(), host.tag, ": dropout_p > 0 needs rng_state (seed, offset)");
  const at::Tensor& rng = *rng_state;
  check_device(host, rng, "rng_state");
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.numel() == 2, host.tag,
              ": rng_state must be int64 (seed, offset) of 2 elements, got ", rng.scalar_type(), " of shape ",
              rng.sizes());
}

void check_max_seqlens(const Host& host, int64_t L, int64_t S, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= L && max_seqlen_k >= 0 && max_seqlen_k <= S, host.tag,
              ": max_seqlen_q ", max_seqlen_q, " and max_seqlen_k ", max_seqlen_k, " must lie in [0, ", L,
              "] and [0, ", S, "] (the packed rows)");
}

namespace {

void fill_varlen(const Host& host, AttnParams& p, const at::Tensor& cq, const at::Tensor& ck, int64_t L,
                 int64_t S, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  for (auto [t, name] : {std::pair{&cq, "cu_seqlens_q"}, {&ck, "cu_seqlens_k"}}) {
    check_device(host, *t, name);
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() >= 1, host.tag,
                ": ", name, " must be a contiguous 1-D int32 tensor of size batch + 1, got ", t->scalar_type(),
                " of shape ", t->sizes());
  }
  TORCH_CHECK(cq.numel() == ck.numel(), host.tag, ": cu_seqlens_q ", cq.sizes(), " and cu_seqlens_k ", ck.sizes(),
              " must both have size batch + 1");
  p.cu_seqlens_q = cq.data_ptr<int32_t>();
  p.cu_seqlens_k = ck.data_ptr<int32_t>();
  p.batch = cq.numel() - 1;
  if (!host.device.is_cpu()) {
    check_max_seqlens(host, L, S, max_seqlen_q, max_seqlen_k);
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
    return;
  }
  p.seqlen_q = p.seqlen_k = 0;
  for (auto [cu, rows, name, len] : {std::tuple{p.cu_seqlens_q, L, "cu_seqlens_q", &p.seqlen_q},
                                     {p.cu_seqlens_k, S, "cu_seqlens_k", &p.seqlen_k}}) {
    TORCH_CHECK(cu[0] >= 0 && cu[p.batch] <= rows, host.tag, ": ", name, " spans rows [", cu[0], ", ", cu[p.batch],
                ") outside the ", rows, " packed rows");
    for (int64_t b = 0; b < p.batch; ++b) {
      TORCH_CHECK(cu[b + 1] >= cu[b], host.tag, ": ", name, " must be non-decreasing");
      *len = std::max<int64_t>(*len, cu[b + 1] - cu[b]);
    }
  }
}

void check_like(const Host& host, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                at::ScalarType dtype) {
  check_device(host, t, name);
  TORCH_CHECK(t.sizes() == shape, host.tag, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, host.tag, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void fill_alibi(const Host& host, AttnParams& p, const std::optional<at::Tensor>& alibi_slopes) {
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& a = *alibi_slopes;
  check_device(host, a, "alibi_slopes");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == p.batch && a.size(1) == p.heads_q && a.scalar_type() == at::kFloat,
              host.tag, ": alibi_slopes must be float32 (B, Hq) = (", p.batch, ", ", p.heads_q, "), got ",
              a.scalar_type(), " of shape ", a.sizes());
  p.alibi_slopes = a.data_ptr<float>();
  p.alibi_batch_stride = a.stride(0);
  p.alibi_head_stride = a.stride(1);
}

void fill_sinks(const Host& host, AttnParams& p, const std::optional<at::Tensor>& sinks, at::ScalarType dtype) {
  if (!sinks.has_value()) return;
  const at::Tensor& s = *sinks;
  check_device(host, s, "sinks");
  TORCH_CHECK(s.dim() == 1 && s.size(0) == p.heads_q && s.is_contiguous(), host.tag,
              ": sinks must be a contiguous (Hq,) = (", p.heads_q, ") tensor, got shape ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || (s.scalar_type() == at::kDouble && dtype == at::kDouble &&
              host.device.is_cpu()), host.tag, ": sinks must be float32 (float64 only with float64 inputs on the "
              "CPU), got ", s.scalar_type());
  p.sinks = s.data_ptr();
  p.sinks_f64 = s.scalar_type() == at::kDouble;
}

// The block-sparse mask (csrc/ops.cpp's block_states, block_bits, block_q, block_k) against q (B, Hq, L, _) and
// keys of length S; on the CPU, every state is checked to name an empty, full or existing partial block.
void fill_block_mask(const Host& host, AttnParams& p, const std::optional<at::Tensor>& block_states,
                     const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k, bool varlen) {
  if (!block_states.has_value()) {
    TORCH_CHECK(!block_bits.has_value(), host.tag, ": block_bits ", block_bits->sizes(), " needs block_states");
    return;
  }
  TORCH_CHECK(!varlen, host.tag, ": block_states is not supported with cu_seqlens (varlen)");
  TORCH_CHECK(block_q >= 1 && block_k >= 1, host.tag, ": block_q and block_k must be >= 1 with block_states, got ",
              block_q, " and ", block_k);
  const int64_t B = p.batch, Hq = p.heads_q, Qb = (p.seqlen_q + block_q - 1) / block_q;
  const int64_t Kb = (p.seqlen_k + block_k - 1) / block_k, row_bytes = (block_k + 7) / 8;
  const at::Tensor& st = *block_states;
  check_device(host, st, "block_states");
  TORCH_CHECK(st.scalar_type() == at::kInt && st.dim() == 4 && (st.size(0) == 1 || st.size(0) == B) &&
              (st.size(1) == 1 || st.size(1) == Hq) && st.size(2) == Qb && st.size(3) == Kb, host.tag,
              ": block_states must be int32 (1 or B, 1 or Hq, ceil(L / block_q), ceil(S / block_k)) = (1 or ", B,
              ", 1 or ", Hq, ", ", Qb, ", ", Kb, ") for L ", p.seqlen_q, ", S ", p.seqlen_k, ", block_q ", block_q,
              ", block_k ", block_k, ", got ", st.scalar_type(), " of shape ", st.sizes());
  int64_t num_partial = 0;
  if (block_bits.has_value()) {
    const at::Tensor& bits = *block_bits;
    check_device(host, bits, "block_bits");
    TORCH_CHECK(bits.scalar_type() == at::kByte && bits.dim() == 3 && bits.size(1) == block_q &&
                bits.size(2) == row_bytes && bits.is_contiguous(), host.tag,
                ": block_bits must be a contiguous uint8 (P, block_q, ceil(block_k / 8)) = (P, ", block_q, ", ",
                row_bytes, ") tensor, got ", bits.scalar_type(), " of shape ", bits.sizes(),
                bits.is_contiguous() ? "" : " (not contiguous)");
    num_partial = bits.size(0);
    p.block_bits = bits.data_ptr<uint8_t>();
  }
  p.block_states = st.data_ptr<int32_t>();
  // broadcast dims read at stride 0, whatever stride a size-1 dim has
  p.block_states_strides = {st.size(0) == 1 ? 0 : st.stride(0), st.size(1) == 1 ? 0 : st.stride(1), st.stride(2),
                            st.stride(3)};
  p.block_q = block_q;
  p.block_k = block_k;
  p.block_bits_row = row_bytes;
  p.num_partial = num_partial;
  if (!host.device.is_cpu()) return;
  const Strides4 ss = strides4(st);
  for (int64_t b = 0; b < st.size(0); ++b)
    for (int64_t h = 0; h < st.size(1); ++h)
      for (int64_t qb = 0; qb < Qb; ++qb)
        for (int64_t kb = 0; kb < Kb; ++kb) {
          const int32_t s = p.block_states[b * ss.batch + h * ss.head + qb * ss.row + kb * ss.col];
          TORCH_CHECK(s >= 0 && s < 2 + num_partial, host.tag, ": block_states[", b, ", ", h, ", ", qb, ", ", kb,
                      "] = ", s, " is outside [0, ", 2 + num_partial, "): 0 empty, 1 full, 2 + i partial with "
                      "block_bits[i], of block_bits ", block_bits.has_value() ? block_bits->sizes() : at::IntArrayRef{});
        }
}

// Pointers, strides and sizes of q (B, Hq, L, E), k (_, Hkv, S, E), v (_, Hkv, S, Ev) views, and the options.
void set_tensors_and_options(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             double scale, double softcap, int64_t window_left, int64_t window_right,
                             bool bottom_right) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = strides4(q);
  p.k_strides = strides4(k);
  p.v_strides = strides4(v);
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.seqlen_q = q.size(2);
  p.head_dim = q.size(3);
  p.heads_kv = k.size(1);
  p.seqlen_k = k.size(2);
  p.head_dim_v = v.size(3);
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
}

void check_options(const Host& host, double softcap) {
  TORCH_CHECK(softcap >= 0, host.tag, ": softcap must be >= 0 (0 = off), got ", softcap);
}

// A contiguous int32 (n,) tensor on the host's device, or nullptr when absent.
const int32_t* int32_vector(const Host& host, const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_device(host, *t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kInt && t->is_contiguous(), host.tag,
              ": ", name, " must be a contiguous int32 tensor of shape (", n, "), got ", t->scalar_type(),
              " of shape ", t->sizes());
  return t->data_ptr<int32_t>();
}

// On the CPU, every sequence's cache range, cache row and pages against the cache's extent.
void check_kvcache_values(const Host& host, const AttnParams& p, int64_t cache_rows) {
  const int64_t capacity = p.block_table != nullptr ? p.block_table_stride * p.page_size : p.seqlen_k;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t start = p.k_start != nullptr ? p.k_start[b] : 0, end = p.seqused_k[b];
    TORCH_CHECK(0 <= start && start <= end && end <= capacity, host.tag, ": sequence ", b, " spans cache positions [",
                start, ", ", end, ") (cache_leftpad, seqlens_k), outside the cache capacity ", capacity);
    if (p.kv_batch_idx != nullptr)
      TORCH_CHECK(0 <= p.kv_batch_idx[b] && p.kv_batch_idx[b] < cache_rows, host.tag, ": cache_batch_idx[", b,
                  "] = ", p.kv_batch_idx[b], " is outside the cache's ", cache_rows, " rows");
    if (p.block_table == nullptr) continue;
    const int32_t* pages = p.block_table + b * p.block_table_stride;
    for (int64_t i = start / p.page_size; i < (end + p.page_size - 1) / p.page_size; ++i)
      TORCH_CHECK(0 <= pages[i] && pages[i] < cache_rows, host.tag, ": block_table[", b, ", ", i, "] = ", pages[i],
                  " is not a page of the cache (", cache_rows, " pages)");
  }
}

}  // namespace

void fill_kvcache_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                         const std::optional<at::Tensor>& block_table,
                         const std::optional<at::Tensor>& cache_batch_idx,
                         const std::optional<at::Tensor>& cache_leftpad,
                         const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks,
                         double scale, int64_t window_left, int64_t window_right, double softcap) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_device(host, *t, name);
    TORCH_CHECK(t->dim() == 4, host.tag, ": ", name, " must be 4-D, got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, host.tag,
              ": q, k_cache, v_cache must share a dtype, got ", dt, ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type());
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2), E = q.size(3);
  const int64_t rows = k_cache.size(0), S = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == E, host.tag, ": head dim of q ", q.sizes(), " and k_cache ", k_cache.sizes(),
              " differ");
  TORCH_CHECK(v_cache.size(0) == rows && v_cache.size(1) == S && v_cache.size(2) == Hkv, host.tag, ": k_cache ",
              k_cache.sizes(), " and v_cache ", v_cache.sizes(), " must agree in all but the last dim");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, host.tag, ": heads of q ", q.sizes(), " must be a multiple of heads of "
              "k_cache ", k_cache.sizes());
  check_options(host, softcap);
  // (B, L, Hq, E) and (rows, S, Hkv, E) seen as the kernels' (batch, head, row, col)
  set_tensors_and_options(p, q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), scale, softcap,
                          window_left, window_right, true);

  p.seqused_k = int32_vector(host, seqlens_k, "seqlens_k", B);
  p.k_start = int32_vector(host, cache_leftpad, "cache_leftpad", B);
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    check_device(host, bt, "block_table");
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B && bt.scalar_type() == at::kInt && bt.stride(1) == 1, host.tag,
                ": block_table must be int32 (B, max_pages) = (", B, ", ...) with unit column stride, got ",
                bt.scalar_type(), " of shape ", bt.sizes());
    TORCH_CHECK(!cache_batch_idx.has_value(), host.tag, ": cache_batch_idx is for contiguous caches, not with "
                "block_table");
    p.block_table = bt.data_ptr<int32_t>();
    p.block_table_stride = bt.stride(0);
    p.page_size = S;
    p.seqlen_k = bt.size(1) * S;
  } else {
    p.kv_batch_idx = int32_vector(host, cache_batch_idx, "cache_batch_idx", B);
    TORCH_CHECK(cache_batch_idx.has_value() || rows >= B, host.tag, ": k_cache ", k_cache.sizes(), " has fewer rows "
                "than the batch of q ", q.sizes(), " (pass cache_batch_idx to pick rows)");
  }
  if (host.device.is_cpu()) check_kvcache_values(host, p, rows);
  fill_alibi(host, p, alibi_slopes);
  fill_sinks(host, p, sinks, dt);
}

std::tuple<at::Tensor, at::Tensor> alloc_kvcache_out_lse(AttnParams& p, const at::Tensor& q,
                                                         const at::Tensor& v_cache) {
  const int64_t B = q.size(0), L = q.size(1), Hq = q.size(2);
  at::Tensor out = at::empty({B, L, Hq, v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({B, Hq, L}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_strides = strides4(out.transpose(1, 2));
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
  return {out, lse};
}

void fill_params(const Host& host, AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
                 const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                 int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
                 int64_t window_right, bool bottom_right, double softcap, double dropout_p,
                 const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& block_states,
                 const std::optional<at::Tensor>& block_bits, int64_t block_q, int64_t block_k) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check_device(host, *t, name);
    TORCH_CHECK(t->dim() == 4, host.tag, ": ", name, " must be 4-D (B, H, seq, dim), got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, host.tag, ": q, k, v must share a dtype, got ", dt,
              ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, host.tag, ": batch of q ", q.sizes(), ", k ", k.sizes(), " and v ",
              v.sizes(), " differ");
  TORCH_CHECK(k.size(3) == E, host.tag, ": head dim of q ", q.sizes(), " and k ", k.sizes(), " differ");
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, host.tag, ": k ", k.sizes(), " and v ", v.sizes(),
              " must have the same heads and length");
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, host.tag, ": heads of q ", q.sizes(),
              " must be a multiple of heads of k ", k.sizes());
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, host.tag, ": dropout_p must be in [0, 1), got ", dropout_p);
  check_options(host, softcap);
  set_tensors_and_options(p, q, k, v, scale, softcap, window_left, window_right, bottom_right);
  p.dropout_p = dropout_p;

  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), host.tag,
              ": cu_seqlens_q and cu_seqlens_k must be given together");
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(B == 1, host.tag, ": varlen q ", q.sizes(), " must hold packed rows in batch 1");
    TORCH_CHECK(!mask.has_value(), host.tag, ": attn_mask is not supported with cu_seqlens (varlen)");
    fill_varlen(host, p, *cu_seqlens_q, *cu_seqlens_k, L, S, max_seqlen_q, max_seqlen_k);
  }

  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_device(host, m, "attn_mask");
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L && m.size(3) == S, host.tag,
                ": attn_mask must be a (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S,
                ") view (stride 0 where broadcast), got shape ", m.sizes());
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == dt || mt == at::kFloat, host.tag, ": attn_mask must be bool, ", dt,
                " or float32, got ", mt);
    p.mask = m.data_ptr();
    p.mask_strides = strides4(m);
    p.mask_kind = mt == at::kBool ? kMaskBool : mt == dt ? kMaskLikeQ : kMaskFloat32;
  }
  fill_alibi(host, p, alibi_slopes);
  fill_sinks(host, p, sinks, dt);
  fill_block_mask(host, p, block_states, block_bits, block_q, block_k, cu_seqlens_q.has_value());
}

std::tuple<at::Tensor, at::Tensor> alloc_out_lse(AttnParams& p, const at::Tensor& q, const at::Tensor& v,
                                                 bool varlen) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2);
  const auto lse_options = q.options().dtype(at::kFloat);
  // out laid out like q, as torch's SDPA returns it: (B, L, Hq, Ev) in memory when q's heads are inner to its rows
  // (q = x.view(B, L, Hq, E).transpose(1, 2), as models project it), else contiguous. pyattn/op_args.py (new_out)
  // says the same for the fake impls, which run on shapes alone, and for the Triton launcher.
  const bool heads_inner = q.stride(1) < q.stride(2);
  std::vector<int64_t> sizes{B, Hq, L, v.size(3)};
  if (heads_inner) std::swap(sizes[1], sizes[2]);
  at::Tensor out = varlen ? at::zeros(sizes, q.options()) : at::empty(sizes, q.options());
  if (heads_inner) out = out.transpose(1, 2);
  at::Tensor lse = varlen ? at::full({B, Hq, L}, -std::numeric_limits<float>::infinity(), lse_options)
                          : at::empty({B, Hq, L}, lse_options);
  p.out = out.data_ptr();
  p.out_strides = strides4(out);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
  return {out, lse};
}

void check_bwd_inputs(const Host& host, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                      bool varlen, bool mask_grad) {
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), Ev = v.size(3);
  check_like(host, dout, "dout", {B, Hq, L, Ev}, q.scalar_type());
  check_like(host, out, "out", {B, Hq, L, Ev}, q.scalar_type());
  check_like(host, lse, "lse", {B, Hq, L}, at::kFloat);
  if (dlse.has_value()) check_like(host, *dlse, "dlse", {B, Hq, L}, at::kFloat);
  TORCH_CHECK(!(mask_grad && varlen), host.tag, ": mask_grad is not supported with cu_seqlens (varlen)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare_bwd(
    const Host& host, AttnBwdParams& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    bool varlen, bool mask_grad) {
  check_bwd_inputs(host, dout, q, v, out, lse, dlse, varlen, mask_grad);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2);

  auto alloc = [&](const at::Tensor& like) {
    return varlen ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dmask = mask_grad ? at::zeros({B, Hq, L, S}, f32) : at::empty({0}, f32);
  p.out = out.data_ptr();
  p.out_strides = strides4(out);
  p.lse = lse.data_ptr<float>();
  p.lse_strides = strides4(lse);
  p.dout = dout.data_ptr();
  p.dout_strides = strides4(dout);
  if (dlse.has_value()) {
    p.dlse = dlse->data_ptr<float>();
    p.dlse_strides = strides4(*dlse);
  }
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_strides = strides4(dq);
  p.dk_strides = strides4(dk);
  p.dv_strides = strides4(dv);
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  return {dq, dk, dv, dmask};
}

}  // namespace pyattn
