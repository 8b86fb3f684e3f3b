// Inline-PTX wrappers for the sm_90a forward: mbarriers, TMA tile loads, wgmma and its shared-memory
// descriptors, register reallocation between warpgroups. Device code here compiles only for sm_90a.
//
// Shared-memory tiles are TMA boxes of 64 columns (128 bytes) x rows with the 128-byte swizzle, each box
// 1024-byte aligned; a 128-column tile is two such boxes one after the other ("column blocks").
// wgmma descriptors (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4, 16-29 leading
// byte offset >> 4, 32-45 stride byte offset >> 4, 62-63 swizzle (1 = 128B). In CuTe notation:
//   K-major  SW128: ((8,m),(T,2k)):((8T,SBO),(1,T))           -> SBO = 8 rows x 128 B = 1024, LBO unused
//   MN-major SW128: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))      -> LBO = next 64-column block, SBO = 1024
// A k16 step inside a K-major box moves the start address by 32 bytes (the swizzle acts on address bits,
// which is why boxes are 1024-byte aligned); a k16 step down an MN-major box moves it by 16 rows.
// wgmma's fp32 accumulator of m64nN: warp w of the warpgroup holds rows 16w..16w+15, and per 8-column tile
// the same 4 floats as mma.sync's C fragment; its register A operand is mma.sync's A fragment per warp.
#pragma once
#include <cuda.h>

#include <cstdint>

#include "cuda/ptx.cuh"

namespace pyattn::cuda::sm90 {

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Returns once the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// One TMA box of a 4-D tensor map at coordinates (col, row, head, batch) into smem; completes on bar.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int row,
                                            int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(smem_addr(bar)), "r"(col), "r"(row), "r"(head), "r"(batch)
      : "memory");
}

template <int kRegs>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ uint64_t desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_addr(smem) & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// The 64 accumulator operands of an m64n128 wgmma: acc[16][4], tile-major.
#define PYATTN_ACC16(i) "+f"(acc[i][0]), "+f"(acc[i][1]), "+f"(acc[i][2]), "+f"(acc[i][3])
#define PYATTN_ACC64                                                                                          \
  PYATTN_ACC16(0), PYATTN_ACC16(1), PYATTN_ACC16(2), PYATTN_ACC16(3), PYATTN_ACC16(4), PYATTN_ACC16(5),       \
      PYATTN_ACC16(6), PYATTN_ACC16(7), PYATTN_ACC16(8), PYATTN_ACC16(9), PYATTN_ACC16(10), PYATTN_ACC16(11), \
      PYATTN_ACC16(12), PYATTN_ACC16(13), PYATTN_ACC16(14), PYATTN_ACC16(15)
#define PYATTN_D64                                                                                             \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// scale-d is a predicate: true accumulates into acc (every call here does).
#define PYATTN_WGMMA(types, b_operands) \
  "{\n.reg .pred accumulate;\nsetp.ne.b32 accumulate, 1, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32" types " " PYATTN_D64 ", " b_operands ";\n}\n"

// acc (64 x 128) += A (64 x 16, smem, K-major) * B (16 x 128, smem, K-major: B^T rows are n).
template <bool kBf16>
__device__ __forceinline__ void wgmma_ss(float (&acc)[16][4], uint64_t a, uint64_t b) {
  if constexpr (kBf16) {
    asm volatile(PYATTN_WGMMA(".bf16.bf16", "%64, %65, accumulate, 1, 1, 0, 0") : PYATTN_ACC64 : "l"(a), "l"(b));
  } else {
    asm volatile(PYATTN_WGMMA(".f16.f16", "%64, %65, accumulate, 1, 1, 0, 0") : PYATTN_ACC64 : "l"(a), "l"(b));
  }
}

// acc (64 x 128) += A (64 x 16, registers: this warp's 16 rows) * B (16 x 128, smem, MN-major: transposed).
template <bool kBf16>
__device__ __forceinline__ void wgmma_rs(float (&acc)[16][4], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (kBf16) {
    asm volatile(PYATTN_WGMMA(".bf16.bf16", "{%64, %65, %66, %67}, %68, accumulate, 1, 1, 1")
                 : PYATTN_ACC64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  } else {
    asm volatile(PYATTN_WGMMA(".f16.f16", "{%64, %65, %66, %67}, %68, accumulate, 1, 1, 1")
                 : PYATTN_ACC64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  }
}

#undef PYATTN_ACC16
#undef PYATTN_ACC64
#undef PYATTN_D64
#undef PYATTN_WGMMA

}  // namespace pyattn::cuda::sm90
