// Forward kernel: online softmax over the key blocks that a tile of query rows can see. plan() (fwd_plan.cpp)
// decides the path of a call, and explain() prints the same plan; the paths share the tile math (fwd_tiles.h):
//   prefill (fwd_prefill.cpp): one task per (sequence, q head, q block) over K^T and V packed per (sequence, kv head);
//   decode (fwd_decode.cpp; group * L <= 128 rows): one task per (sequence, chunk of keys, kv heads), a tile stacking
//            the rows of a GQA group's q heads, the chunks merged in key order.
#include <vector>

#include "cpu/fwd_plan.h"
#include "cpu/kernel.h"
#include "cpu/tile_math.h"

namespace pyattn::cpu {

template <typename scalar_t>
void run_fwd(const AttnParams& p) {
  std::vector<Seq> seqs(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) seqs[b] = get_seq(p, b);
  const FwdPlan f = plan<scalar_t>(p);
  if (f.path == FwdPath::kPrefill) run_prefill<scalar_t>(p, seqs, f);
  else run_decode<scalar_t>(p, seqs, f);
}

template void run_fwd<float>(const AttnParams&);
template void run_fwd<double>(const AttnParams&);
template void run_fwd<c10::BFloat16>(const AttnParams&);
template void run_fwd<c10::Half>(const AttnParams&);

}  // namespace pyattn::cpu
