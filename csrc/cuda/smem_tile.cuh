// Tiles in shared memory: row-major [rows][D] of 16-bit elements, D a multiple of 64, with the 16-byte chunks
// of each row XOR-swizzled within groups of 8 (128 bytes). ldmatrix reads 8 rows at one logical chunk; the
// swizzle puts them in 8 different bank groups, so neither the cp.async writes nor the ldmatrix reads conflict.
#pragma once
#include <cstdint>

#include "cuda/ptx.cuh"

namespace pyattn::cuda {

template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * D + ((chunk & ~7) | ((chunk ^ row) & 7)) * 8;
}

// Copies rows [0, kRows) x cols [0, D) of a global tile into smem with cp.async; row r starts at row_of(r)
// (unit column stride, 16-byte aligned). Rows >= rows_valid and columns >= cols_valid (a multiple of 8) become
// zeros, so partial tiles and padded head dims add nothing to the products. `any` is a valid address read by
// nobody: predicated-off copies still need one.
template <int kRows, int D, int kThreads, typename T, typename RowOf>
__device__ __forceinline__ void load_tile_rows(T* smem, RowOf row_of, int rows_valid, int cols_valid,
                                               const void* any) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool pred = r < rows_valid && c * 8 < cols_valid;
    const void* src = pred ? static_cast<const void*>(row_of(r) + c * 8) : any;
    cp_async_16(smem + swizzled<D>(r, c), src, pred);
  }
}

// The same for evenly strided rows (row stride in elements).
template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int rows_valid,
                                          int cols_valid, const void* any) {
  load_tile_rows<kRows, D, kThreads>(smem, [=](int r) { return gmem + r * row_stride; }, rows_valid, cols_valid,
                                     any);
}

// A operand (16x16) at rows [r0, r0+16), cols [k0, k0+16) of a [rows][D] tile: ldmatrix matrices 0..3 are
// (rows +0, cols +0), (rows +8, cols +0), (rows +0, cols +8), (rows +8, cols +8) = a0..a3.
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* smem, int r0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, smem + swizzled<D>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, k0 / 8 + (lane >> 4)));
}

// B operands of two 8-column tiles [n0, n0+8), [n0+8, n0+16) x k [k0, k0+16) from a tile stored [n][k]
// (K for Q K^T): matrices (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8) = b[0], b[1] of tile 0,
// then of tile 1.
template <int D, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* smem, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, smem + swizzled<D>(n0 + (lane & 7) + (lane >> 4) * 8, k0 / 8 + ((lane >> 3) & 1)));
}

// The same two B tiles from a tile stored [k][n] (V for P V): transposed loads of matrices (k +0, n +0),
// (k +8, n +0), (k +0, n +8), (k +8, n +8); the addresses follow load_a's pattern with rows = k.
template <int D, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* smem, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, smem + swizzled<D>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 / 8 + (lane >> 4)));
}

// acc[16 x 8*kTiles] += A (16 x D, rows r0.. of sa) * B^T where B is [n][D] (rows n0.. of sb).
template <bool kBf16, int D, int kTiles, typename T>
__device__ __forceinline__ void gemm_abt(float (&acc)[kTiles][4], const T* sa, int r0, const T* sb, int n0) {
  static_assert(kTiles % 2 == 0, "B tiles load in pairs");
#pragma unroll
  for (int k = 0; k < D; k += 16) {
    uint32_t a[4];
    load_a<D>(a, sa, r0, k);
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t b[4];
      load_b_nk<D>(b, sb, n0 + n * 8, k);
      mma_16816<kBf16>(acc[n], a, b[0], b[1]);
      mma_16816<kBf16>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x D] += P (16 x 16*kSteps, C fragments of fp32 scores, converted to A fragments in registers)
// * B (rows k0.. of a [k][D] tile). The C fragment of 8-column tiles 2s and 2s+1 is exactly the A fragment
// of k-step s: (c0,c1 | c2,c3) of tile 2s are a0 | a1, those of tile 2s+1 are a2 | a3.
template <bool kBf16, int D, int kSteps, typename T>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&p)[2 * kSteps][4], const T* sb,
                                        int k0) {
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const uint32_t a[4] = {pack2<kBf16>(p[2 * s][0], p[2 * s][1]), pack2<kBf16>(p[2 * s][2], p[2 * s][3]),
                           pack2<kBf16>(p[2 * s + 1][0], p[2 * s + 1][1]),
                           pack2<kBf16>(p[2 * s + 1][2], p[2 * s + 1][3])};
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      load_b_kn<D>(b, sb, k0 + s * 16, n * 8);
      mma_16816<kBf16>(acc[n], a, b[0], b[1]);
      mma_16816<kBf16>(acc[n + 1], a, b[2], b[3]);
    }
  }
}

// Stores a 16 x D fp32 accumulator (rows r0.. of the warp) scaled by row_scale[0|1] (rows g, g+8) into
// global rows [0, rows_valid), cols [0, cols_valid): two elements (4 bytes) per lane and tile.
template <bool kBf16, int D, typename T>
__device__ __forceinline__ void store_acc(T* gmem, int64_t row_stride, const float (&acc)[D / 8][4], int r0,
                                          int rows_valid, int cols_valid, const float (&row_scale)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + 8 * half;
    if (r >= rows_valid) continue;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = n * 8 + 2 * t;
      if (c >= cols_valid) continue;
      const uint32_t v = pack2<kBf16>(acc[n][2 * half] * row_scale[half], acc[n][2 * half + 1] * row_scale[half]);
      *reinterpret_cast<uint32_t*>(gmem + r * row_stride + c) = v;
    }
  }
}

}  // namespace pyattn::cuda
