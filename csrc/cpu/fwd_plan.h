// The forward's plan: which path run_fwd takes for a call, on which tiles, decided by plan() alone. run_fwd
// dispatches on it and explain() prints it (KernelTable::fwd_plan), so what explain() names is what runs.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/operands.h"
#include "cpu/tile_math.h"
#include "params.h"

namespace pyattn::cpu {

// A tile: rows of q per task, keys per step.
struct Tile {
  int64_t q, k;
};
// Decode (group * L <= 128 rows): 128 x 256.
constexpr Tile kDecodeTile{128, 256};
// Decode: key blocks per task. Fixed (not derived from the thread count) so results are reproducible.
constexpr int64_t kChunkBlocks = 4;

enum class FwdPath {
  kPrefill,  // fwd_prefill (group * L > 128 rows): K^T and V packed per (sequence, kv head), shared by a GQA group
  // fwd_decode, by how a key block is read:
  kDecodeRows,  // attend_block_rows: fp32 FMA on the cache's rows where they lie, no packing or brgemm
  kDecodeAllHeads,  // attend_block_direct on all_heads_scores: a page run's scores of every kv head in one matmul
  kDecodeDirect,  // attend_block_direct: S^T = K Q^T on K where it lies, V packed
  kDecodePacked,  // attend_block on K^T and V packed per key block
};

struct FwdPlan {
  FwdPath path = FwdPath::kPrefill;
  TileType tiles = TileType::kFp32;  // the matmuls' element type (kDecodeRows: the fp32 its FMA computes in)
  bool bf16_widened = false;  // bf16 inputs on fp32 tiles: no bf16 VNNI brgemm here
  Tile tile{0, 0};
  int64_t l2_bytes = 0;  // prefill: the L2 its tile was sized for
  int64_t heads_per_task = 0;  // decode: kv heads a task takes
  bool merge = false;  // decode: chunks merged after the tasks (false: every sequence fits one chunk)
  // A block mask's blocks of block_q x block_k, over the (B, Hq) grid: visited (not empty), of them full, all told
  // (0: no block mask)
  int64_t block_q = 0, block_k = 0, blocks_visited = 0, blocks_full = 0, blocks_total = 0;
  int64_t work = 0;  // multiply-adds of q.k and p.v over the keys the rows see (an estimate: fwd_work)
  int64_t threads = 1;  // threads the tasks run on: 1 for a call too small to share (kParallelWork)
};

// Calls of fewer multiply-adds run on the caller's thread: about 20 us of one core's work, which a second thread
// would shorten by less than waking it and joining it costs (a futex wake-up and cold caches; far more when the
// other core is busy: a 16 x 16 call of 8 heads ran 1.9x slower on 2 threads than on 1 on a loaded 2-core EPYC).
constexpr int64_t kParallelWork = int64_t(1) << 19;

// A decode sequence's keys [lo, hi) that some query of it sees, from an even start (V's VNNI pairs keys), in
// `chunks` tasks' chunks of up to kChunkBlocks key blocks (at least one).
struct DecodeKeys {
  int64_t lo, hi, chunks;
};
DecodeKeys decode_keys(const AttnParams& p, const Seq& seq);

template <typename scalar_t>
FwdPlan plan(const AttnParams& p);

// explain()'s text of a plan, written as snprintf does (at most size bytes with the NUL); returns the full length.
int64_t describe(const FwdPlan& plan, char* out, int64_t size);

// The plan of the forward that runs on this thread, with the tiles of the kernel instance it runs on: for tests,
// which read it back (KernelTable::take_last_fwd_run) to see the path explain() named is the path taken.
void record_fwd_run(const FwdPlan& plan, TileType ran_on);

// The paths that run a plan, on the tiles it names: prefill (fwd_prefill.cpp) and decode's (fwd_decode.cpp).
// seqs: get_seq of each sequence.
template <typename scalar_t>
void run_prefill(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan);
template <typename scalar_t>
void run_decode(const AttnParams& p, const std::vector<Seq>& seqs, const FwdPlan& plan);

}  // namespace pyattn::cpu
