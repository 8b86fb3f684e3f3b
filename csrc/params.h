// One plain struct shared by every fused kernel (CPU and CUDA): pointers, strides in elements,
// sizes and options. No torch types here, so device code can include it with nvcc alone.
#pragma once
#include <cstdint>

namespace pyattn {

// Strides of a 4-D (batch, head, row, col) view, in elements. Broadcast dims have stride 0.
struct Strides4 {
  int64_t batch = 0, head = 0, row = 0, col = 0;
};

// What AttnParams::mask points at (fill_params picks it from the mask's dtype). pyattn._C.mask_kinds() gives Python
// these values by name, and the host checks of Python-launched kernels return the kind of their mask.
enum MaskKind : int {
  kMaskNone = 0,
  kMaskBool = 1,     // true = may attend
  kMaskLikeQ = 2,    // added to scores, in q's dtype
  kMaskFloat32 = 3,  // added to scores, float32 under a q of another dtype
};

struct AttnParams {
  // Dense mode: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), out (B, Hq, L, Ev), lse (B, Hq, L).
  // Varlen mode (cu_seqlens_q != nullptr): the same tensors with B == 1 holding packed rows; sequence b
  // owns rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q/out/lse and [cu_seqlens_k[b], ...) of k/v.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // natural log; -inf for fully masked rows
  Strides4 q_strides, k_strides, v_strides, out_strides, lse_strides;  // lse: col unused

  // Optional (B, Hq, L, S) bool (true = keep) or float mask added to scores; broadcast by stride 0.
  const void* mask = nullptr;
  Strides4 mask_strides;
  int mask_kind = kMaskNone;  // MaskKind

  // Optional sink logits (Hq,) (gpt-oss): each row's softmax denominator gains exp(sink); no value is
  // attached, and lse includes it. float32; float64 (sinks_f64) only for float64 inputs, on the CPU.
  const void* sinks = nullptr;
  bool sinks_f64 = false;

  // Optional block-sparse mask, ANDed with every other mask (not with varlen or a KV cache). Block (qb, kb) covers
  // query rows [qb * block_q, (qb + 1) * block_q) x keys [kb * block_k, ...); its state, at
  // block_states[b * bs.batch + h * bs.head + qb * bs.row + kb * bs.col] (stride 0 where broadcast):
  // 0 = empty (never visited: masked out), 1 = full (every pair may attend), 2 + i = partial: row r's bit c
  // (byte c / 8, bit c % 8, LSB first) of block_bits + i * block_q * block_bits_row + r * block_bits_row says
  // whether query qb * block_q + r may attend key kb * block_k + c. num_partial: the P of block_bits (P, block_q,
  // block_bits_row).
  const int32_t* block_states = nullptr;
  Strides4 block_states_strides;
  const uint8_t* block_bits = nullptr;
  int64_t block_q = 0, block_k = 0, block_bits_row = 0;  // block_bits_row = ceil(block_k / 8)
  int64_t num_partial = 0;

  // Optional float32 ALiBi slopes (B, Hq): adds -slope * |i' - j|.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0, alibi_head_stride = 0;

  const int32_t* cu_seqlens_q = nullptr;  // (B + 1,)
  const int32_t* cu_seqlens_k = nullptr;  // (B + 1,)

  // KV-cache mode (seqused_k != nullptr; kvcache_fwd): sequence b attends to cache positions
  // [k_start[b], seqused_k[b]) (k_start: cache_leftpad, else 0) of k/v batch row kv_batch_idx[b] (else b);
  // key j of the sequence is cache position k_start[b] + j. Paged (block_table != nullptr): cache position
  // pos lives in page block_table[b * block_table_stride + pos / page_size], row pos % page_size, and the k/v
  // strides' batch steps pages, row steps rows within a page.
  const int32_t* seqused_k = nullptr;     // (B,)
  const int32_t* k_start = nullptr;       // (B,) or nullptr
  const int32_t* kv_batch_idx = nullptr;  // (B,) or nullptr
  const int32_t* block_table = nullptr;   // (B, max_pages) or nullptr
  int64_t block_table_stride = 0;
  int64_t page_size = 0;

  int64_t batch = 0;     // B (number of sequences in varlen mode)
  int64_t heads_q = 0;   // Hq
  int64_t heads_kv = 0;  // Hkv; Hq % Hkv == 0, q head h reads kv head h / (Hq / Hkv)
  int64_t seqlen_q = 0;  // L (max over sequences in varlen mode)
  int64_t seqlen_k = 0;  // S (max over sequences in varlen mode; cache capacity in KV-cache mode)
  int64_t head_dim = 0;    // E
  int64_t head_dim_v = 0;  // Ev

  // scale, softcap and dropout_p in double, as the op received them: float64 kernels need them unrounded
  // to match float64 math; float kernels round them once.
  double scale = 1;  // applied to q.k before softcap
  double softcap = 0;  // 0 = off; else scores = softcap * tanh(scores / softcap)
  // Query i may attend key j iff i' - window_left <= j <= i' + window_right (-1 = unbounded),
  // with i' = i + (S - L) when bottom_right, else i. Causal is window_right = 0.
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool bottom_right = false;

  double dropout_p = 0;  // probability of dropping; kept values are scaled by 1 / (1 - p)
  uint64_t seed = 0, offset = 0;  // counter-based RNG: the same (seed, offset) gives the same mask
};

// Gradients, for the backward kernels. Shapes match q, k, v (dq, dk, dv) and the dense mask (dmask).
struct AttnBwdParams : AttnParams {
  const void* dout = nullptr;  // (B, Hq, L, Ev)
  const float* dlse = nullptr;  // optional (B, Hq, L): gradient flowing into lse
  Strides4 dout_strides, dlse_strides;
  void* dq = nullptr;  // (B, Hq, L, E), contiguous
  void* dk = nullptr;  // (B, Hkv, S, E), contiguous
  void* dv = nullptr;  // (B, Hkv, S, Ev), contiguous
  Strides4 dq_strides, dk_strides, dv_strides;  // varlen rows are indexed through these
  float* dmask = nullptr;  // optional (B, Hq, L, S) float32, contiguous: d(loss)/d(score added by mask)
};

}  // namespace pyattn
