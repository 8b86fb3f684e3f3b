// Tile shapes per padded head dim D (a multiple of 64: 64, 128, 192, 256). Plain C++ so that host code and
// pyattn/cuda_aot.py (which compiles a small program including this header to print kSmem*) share one source
// of truth.
// Every warp owns 16 rows of its tile (one m16n8k16 row block), so rows per block = 16 x warps.
// Register budget per thread: the fp32 accumulators are D/2 floats per 16-row operand (O, dQ, dK, dV) and
// N/2 floats per 16 x N score tile. The shapes below are the largest that ptxas fits in 255 registers
// without spilling (checked with -Xptxas -v for sm_80 and sm_90a: tests/backends/test_cuda_compile.py). Shared
// memory stays under 99 KiB so sm_86/sm_89 (101376 bytes per block) take every kernel.
#pragma once

namespace pyattn::cuda {

constexpr int kElemBytes = 2;  // fp16 / bf16

template <int D>
struct FwdTiles {
  static_assert(D % 64 == 0 && D <= 256, "padded head dim must be 64, 128, 192 or 256");
  static constexpr int kBlockM = 128;  // queries per CTA (FlashAttention-2's sm_80 choice for d <= 256)
  static constexpr int kBlockN = D <= 192 ? 64 : 16;  // keys per step
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kSmem = (kBlockM + 2 * kBlockN) * D * kElemBytes;  // Q, K, V
};

template <int D>
struct BwdTiles {
  static_assert(D % 64 == 0 && D <= 256, "padded head dim must be 64, 128, 192 or 256");
  // dK/dV kernel: a CTA owns kDkvBlockN keys and walks the query blocks. Above D = 128, holding dK and dV
  // (D floats per thread) does not fit beside the scores, so each CTA computes one of them (kSplitDkv).
  static constexpr bool kSplitDkv = D > 128;
  static constexpr int kDkvBlockN = D <= 128 ? 128 : 64;
  static constexpr int kDkvBlockM = D <= 64 ? 64 : 32;
  static constexpr int kDkvWarps = kDkvBlockN / 16;
  static constexpr int kDkvSmem = (2 * kDkvBlockN + 2 * kDkvBlockM) * D * kElemBytes + 2 * kDkvBlockM * 4;
  // dQ kernel: a CTA owns kDqBlockM queries and walks the key blocks.
  static constexpr int kDqBlockM = D <= 128 ? 128 : 64;
  static constexpr int kDqBlockN = D <= 128 ? 64 : D <= 192 ? 32 : 16;
  static constexpr int kDqWarps = kDqBlockM / 16;
  static constexpr int kDqSmem = (2 * kDqBlockM + 2 * kDqBlockN) * D * kElemBytes;
  static constexpr int kDeltaWarps = 8;  // delta prepass: one warp per query row
};

// sm_90a forward (fwd_sm90_kernel.cuh): head dims padded to 128, a producer warpgroup and two consumer
// warpgroups of 64 query rows, K/V in a two-stage ring of TMA boxes (64 columns x 128 rows, 128-byte swizzle).
struct Sm90Tiles {
  static constexpr int kD = 128, kBlockM = 128, kBlockN = 128, kStages = 2;
  static constexpr int kThreads = 3 * 128;
  static constexpr int kBoxBytes = 64 * kElemBytes * 128;
  static constexpr int kTileBytes = 2 * kBoxBytes;  // 128 columns
  // Q, then K and V per stage, then the barriers; +1024 to align the tiles for the 128-byte swizzle
  static constexpr int kSmem = (1 + 2 * kStages) * kTileBytes + 64 + 1024;
};

}  // namespace pyattn::cuda
