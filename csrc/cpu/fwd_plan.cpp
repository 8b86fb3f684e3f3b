// plan(): the one place that decides how run_fwd runs a call (cpu/fwd_plan.h), and explain()'s text of it.
#include "cpu/fwd_plan.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <optional>
#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf: the L2 size
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include "cpu/decode_rows.h"
#include "cpu/kernel.h"

namespace pyattn::cpu {
namespace {

// Prefill's tile: 256 x 512 where its working set (the tile's scores, probabilities, o and q, and a key block of K
// and V) fits in 7/8 of a core's L2, else 128 x 256. Measured in one process, interleaved (Sapphire Rapids, 2 MiB
// L2, AMX): 256 x 512 ran bf16 1.02-1.26x faster (32:8 and 16:16 heads, D = 64, 128 and 256, 2k-8k tokens;
// 512 new tokens over a 64k cache: 1.24-1.36x contiguous, 1.09-1.16x paged), fp32 and fp16 (fp32 tiles) within 5%,
// and 0.98-1.10x with torch and pyattn held to AVX2. On the 2-core EPYC Zen 4 (1 MiB L2; B=1 H=8 N=4096 D=64),
// 128 x 256 was best for causal and within 5% of 256 x 512 otherwise. With a block mask, 128 x 256: a tile visits
// every key block that any of its q rows' blocks does, so taller tiles visit more of them (fp32, B=1 H=8 N=8192
// D=64, random 10% of 128 x 128 blocks, Zen 4, interleaved: 48 ms against 86 at 256 x 512; dense 400).
// PYATTN_CPU_FWD_TILE=QxK sets the tile (read per call: tests and comparisons switch it).
int64_t l2_cache_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}

template <typename T, typename acc>
Tile prefill_tile(int64_t E, int64_t Ev, bool block_mask) {
  if (const char* env = std::getenv("PYATTN_CPU_FWD_TILE"); env != nullptr && *env != '\0') {
    Tile t{0, 0};
    char end = 0;
    const int n = std::sscanf(env, "%" SCNd64 "x%" SCNd64 "%c", &t.q, &t.k, &end);
    TORCH_CHECK(n == 2 && t.q >= 1 && t.q <= 4096 && t.k >= 2 && t.k <= 4096 && t.k % 2 == 0,
                "PYATTN_CPU_FWD_TILE must be QxK with 1 <= Q <= 4096 and K even in [2, 4096] (VNNI pairs keys), got '",
                env, "'");
    return t;
  }
  if (block_mask) return Tile{128, 256};
  constexpr Tile big{256, 512};
  constexpr int64_t kT = sizeof(T), kAcc = sizeof(acc);
  const int64_t bytes = big.q * big.k * kAcc + (std::is_same_v<T, acc> ? 0 : big.q * kpad<T>(big.k) * kT) +
                        big.q * (Ev * kAcc + kpad<T>(E) * kT) + big.k * (E + Ev) * kT;
  return 8 * bytes <= 7 * l2_cache_bytes() ? big : Tile{128, 256};
}

// Whether decode runs tiles of `rows` q rows (group * L) on the cache's rows where they lie (attend_block_rows: fp32
// FMA, whatever the input type): up to 8 rows of whole vectors, but only up to 6 where bf16 tiles run on AMX. There,
// as bf16 tiles, 8 rows ran 1.10-1.20x faster (7: 1.03x; 5 and 6 rows 0.82x and 0.94x; Sapphire Rapids, 2 threads,
// 64k keys, 8 kv heads of 128); fp32 tiles were slower up to 8 rows. The rows also need unit column strides.
template <typename scalar_t>
bool decode_on_rows(const AttnParams& p, int64_t rows, TileType tiles) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    bool amx_tiles = false;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      static const bool amx = at::cpu::init_amx();
      amx_tiles = amx && tiles == TileType::kBf16Vnni;
    }
    return rows <= (amx_tiles ? 6 : kDecodeTile.q) && decode_rows_fit(rows, p.head_dim, p.head_dim_v) &&
           p.k_strides.col == 1 && p.v_strides.col == 1;
  }
}

// Whether decode can read the cache's rows as matmul operands where they lie (attend_block_direct, whose tiles are
// of the input type): rows with unit column stride, and no padding for VNNI's pairs.
template <typename T>
bool direct_keys(const AttnParams& p) {
  return p.k_strides.col == 1 && p.v_strides.col == 1 && (!kVnni<T> || p.head_dim % 2 == 0);
}

// A decode task takes a chunk of one sequence for several kv heads (all of them unless that leaves fewer than 4 tasks
// per thread), key block by key block: a block's rows of all heads lie together in the cache, and reading them
// head by head at the cache's row stride (2 KiB at 8 heads of 128 bf16) ran at ~40% of the bandwidth of reading
// them in order (9.5 vs 25.8 GB/s at 2 threads on the Sapphire Rapids). The partial results do not depend on
// the grouping, so neither does the output. chunks: of (sequence, kv head) pairs, all told.
int64_t decode_heads_per_task(int64_t Hkv, int64_t chunks) {
  int64_t heads_per_task = Hkv;
  while (heads_per_task > 1 && chunks / heads_per_task < 4 * at::get_num_threads())
    heads_per_task = (heads_per_task + 1) / 2;
  return heads_per_task;
}

thread_local std::optional<FwdPlan> last_run;

// The block mask's census for explain(): its blocks over every (sequence, q head), broadcast ones counted per head.
void count_blocks(const AttnParams& p, FwdPlan& f) {
  if (p.block_states == nullptr) return;
  const Strides4 s = p.block_states_strides;
  const int64_t Qb = (p.seqlen_q + p.block_q - 1) / p.block_q, Kb = (p.seqlen_k + p.block_k - 1) / p.block_k;
  f.block_q = p.block_q;
  f.block_k = p.block_k;
  f.blocks_total = p.batch * p.heads_q * Qb * Kb;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t qb = 0; qb < Qb; ++qb)
        for (int64_t kb = 0; kb < Kb; ++kb) {
          const int32_t state = p.block_states[b * s.batch + h * s.head + qb * s.row + kb * s.col];
          f.blocks_visited += state != 0;
          f.blocks_full += state == 1;
        }
}

}  // namespace

DecodeKeys decode_keys(const AttnParams& p, const Seq& seq) {
  const auto [klo, khi] = make_band(p, seq).keys(0, seq.L);
  const int64_t lo = klo & ~int64_t(1);
  const int64_t blocks = seq.L > 0 && khi > klo ? (khi - lo + kDecodeTile.k - 1) / kDecodeTile.k : 0;
  return {lo, khi, std::max<int64_t>(1, (blocks + kChunkBlocks - 1) / kChunkBlocks)};
}

// Multiply-adds of q.k and p.v over the keys each query row sees (its band), every q head: estimated from the band's
// end rows (exact where no bound clamps).
int64_t fwd_work(const AttnParams& p) {
  int64_t work = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq seq = get_seq(p, b);
    const Band band = make_band(p, seq);
    int64_t keys = 0;  // summed over the rows
    if (seq.L > 0) keys = (std::max<int64_t>(0, band.hi(0) - band.lo(0)) +
                           std::max<int64_t>(0, band.hi(seq.L - 1) - band.lo(seq.L - 1))) * seq.L / 2;
    work += keys * p.heads_q * (p.head_dim + p.head_dim_v);
  }
  return work;
}

template <typename scalar_t>
FwdPlan plan(const AttnParams& p) {
  const int64_t B = p.batch, Hkv = p.heads_kv, E = p.head_dim, Ev = p.head_dim_v;
  const int64_t M = (Hkv > 0 ? p.heads_q / Hkv : 0) * p.seqlen_q;  // rows a tile stacks: a GQA group's heads x L
  FwdPlan f;
  count_blocks(p, f);
  f.work = fwd_work(p);
  f.threads = f.work < kParallelWork ? 1 : at::get_num_threads();
  f.tiles = tile_type<scalar_t>();
  f.bf16_widened = std::is_same_v<scalar_t, c10::BFloat16> && f.tiles == TileType::kFp32;
  if (M > kDecodeTile.q) {
    f.path = FwdPath::kPrefill;
    const bool block_mask = p.block_states != nullptr;
    with_tile_type<scalar_t>(f.tiles, [&](auto tile) {
      f.tile = prefill_tile<decltype(tile), acc_t<scalar_t>>(E, Ev, block_mask);
    });
    f.l2_bytes = l2_cache_bytes();
    return f;
  }
  // Short queries: a tile holds every row of a GQA group, so each key block is read once per group.
  f.tile = kDecodeTile;
  int64_t chunks = 0;
  for (int64_t b = 0; b < B; ++b) chunks += decode_keys(p, get_seq(p, b)).chunks * Hkv;
  // Every sequence in one chunk (up to kChunkBlocks key blocks, a decode step's first ~1k tokens): the tasks
  // store their results, with no merge pass (what it would compute: the same values).
  f.merge = chunks != B * Hkv;
  f.heads_per_task = decode_heads_per_task(Hkv, chunks);
  if (decode_on_rows<scalar_t>(p, M, f.tiles)) {
    f.path = FwdPath::kDecodeRows;
    f.tiles = TileType::kFp32;
    f.bf16_widened = false;
    return f;
  }
  // the tiles are of the input type (fp16 always widens)
  const bool same_type = !std::is_same_v<scalar_t, c10::Half> && f.tiles == tile_type_of<scalar_t>;
  const bool direct = same_type && direct_keys<scalar_t>(p);
  // pages with a key's heads together, and scores of all heads small enough for L2 (all_heads_scores), of every
  // head of a task
  const bool all_heads = direct && p.block_table != nullptr && p.k_strides.head == E && p.k_strides.row == Hkv * E &&
                         Hkv * Hkv * M <= 256 && f.heads_per_task == Hkv;
  f.path = all_heads ? FwdPath::kDecodeAllHeads : direct ? FwdPath::kDecodeDirect : FwdPath::kDecodePacked;
  return f;
}

static int64_t describe_path(const FwdPlan& f, char* out, int64_t size) {
  const char* type = f.tiles == TileType::kFp64 ? "fp64" : f.tiles == TileType::kFp32 ? "fp32" : "bf16 VNNI";
  const char* why = f.bf16_widened ? " (bf16 widened: no bf16 VNNI brgemm here)" : "";
  if (f.path == FwdPath::kPrefill)
    return std::snprintf(out, size, "prefill: %s tiles of %" PRId64 " x %" PRId64 "%s (L2 %" PRId64 " KiB)", type,
                         f.tile.q, f.tile.k, why, f.l2_bytes / 1024);
  char split[128];
  std::snprintf(split, sizeof(split), "split-KV chunks of %" PRId64 " keys (%s), kv heads per task: %" PRId64,
                kChunkBlocks * f.tile.k, f.merge ? "merged" : "one per sequence", f.heads_per_task);
  if (f.path == FwdPath::kDecodeRows)
    return std::snprintf(out, size, "decode: fp32 FMA on the cache's rows where they lie (unit column strides), %s",
                         split);
  const char* keys = f.path == FwdPath::kDecodeAllHeads ? "K read where it lies, a page run's scores of every kv "
                                                          "head in one matmul, V packed"
                     : f.path == FwdPath::kDecodeDirect ? "K read where it lies (S^T = K Q^T), V packed"
                                                        : "K^T and V packed per key block";
  return std::snprintf(out, size, "decode: %s tiles of %" PRId64 " x %" PRId64 "%s, %s; %s", type, f.tile.q,
                       f.tile.k, why, split, keys);
}

int64_t describe(const FwdPlan& f, char* out, int64_t size) {
  int64_t n = describe_path(f, out, size);
  // each addition appends where the text so far ends (a truncated text stays as it is)
  auto append = [&](auto... args) {
    if (n >= 0 && n < size) n += std::snprintf(out + n, size - n, args...);
  };
  if (f.blocks_total != 0)
    append("; block mask of %" PRId64 " x %" PRId64 " blocks: %" PRId64 " of %" PRId64 " visited (%" PRId64
           " full, %" PRId64 " partial), empty ones skipped", f.block_q, f.block_k, f.blocks_visited, f.blocks_total,
           f.blocks_full, f.blocks_visited - f.blocks_full);
  if (f.threads == 1) append("; on one thread (%" PRId64 " multiply-adds: too few to share)", f.work);
  return n;
}

void record_fwd_run(const FwdPlan& plan, TileType ran_on) {
  FwdPlan ran = plan;
  ran.tiles = ran_on;
  last_run = ran;
}

template <typename scalar_t>
int64_t fwd_plan(const AttnParams& p, char* out, int64_t size) {
  return describe(plan<scalar_t>(p), out, size);
}

int64_t take_last_fwd_run(char* out, int64_t size) {
  if (!last_run) return size > 0 ? (out[0] = '\0', 0) : 0;
  const int64_t n = describe(*last_run, out, size);
  last_run.reset();
  return n;
}

template FwdPlan plan<float>(const AttnParams&);
template FwdPlan plan<double>(const AttnParams&);
template FwdPlan plan<c10::BFloat16>(const AttnParams&);
template FwdPlan plan<c10::Half>(const AttnParams&);
template int64_t fwd_plan<float>(const AttnParams&, char*, int64_t);
template int64_t fwd_plan<double>(const AttnParams&, char*, int64_t);
template int64_t fwd_plan<c10::BFloat16>(const AttnParams&, char*, int64_t);
template int64_t fwd_plan<c10::Half>(const AttnParams&, char*, int64_t);

}  // namespace pyattn::cpu
