// Launch of the sm_90a forward: TMA descriptors for q, k, v from the params' sizes and strides, through
// the driver's cuTensorMapEncodeTiled (found at run time: no link against libcuda).
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include "cuda/dispatch.h"
#include "cuda/fwd_sm90_kernel.cuh"
#include "cuda/launch.cuh"

namespace pyattn::cuda {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
               : nullptr;
  }();
  return fn;
}

// (cols, rows, heads, batch) of 16-bit elements, boxes of 64 x 128 with the 128-byte swizzle. A dim of size
// 1 gets a stride that TMA accepts whatever the tensor says (it is never stepped over).
inline bool encode_map(CUtensorMap* map, const void* ptr, bool bf16, int64_t cols, int64_t rows, int64_t heads,
                       int64_t batch, const Strides4& st) {
  const auto encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[4] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batch)};
  cuuint64_t strides[3] = {cuuint64_t(st.row * 2), cuuint64_t(st.head * 2), cuuint64_t(st.batch * 2)};
  if (rows == 1) strides[0] = cuuint64_t(cols * 2 + 15) / 16 * 16;
  if (heads == 1) strides[1] = strides[0] * rows;
  if (batch == 1) strides[2] = strides[1] * heads;
  const cuuint32_t box[4] = {64, 128, 1, 1}, unit[4] = {1, 1, 1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                const_cast<void*>(ptr), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <bool kBf16, bool kWindow>
bool run_fwd_sm90(const AttnParams& p, int64_t q_rows, int64_t k_rows, int64_t q_batch, cudaStream_t stream) {
  CUtensorMap tq, tk, tv;
  if (!encode_map(&tq, p.q, kBf16, p.head_dim, q_rows, p.heads_q, q_batch, p.q_strides) ||
      !encode_map(&tk, p.k, kBf16, p.head_dim, k_rows, p.heads_kv, q_batch, p.k_strides) ||
      !encode_map(&tv, p.v, kBf16, p.head_dim_v, k_rows, p.heads_kv, q_batch, p.v_strides))
    return false;
  auto kernel = fwd_sm90_kernel<kBf16, kWindow>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm90Tiles::kSmem);
  const dim3 grid(ceil_div(p.seqlen_q, Sm90Tiles::kBlockM), p.heads_q, p.batch);
  kernel<<<grid, Sm90Tiles::kThreads, Sm90Tiles::kSmem, stream>>>(p, tq, tk, tv);
  return true;
}

}  // namespace pyattn::cuda
