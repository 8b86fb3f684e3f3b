// The dropout keep-mask as a tensor, drawn exactly as the kernels draw it (for tests and debugging).
#include <ATen/Parallel.h>

#include "cpu/kernel.h"
#include "cpu/philox.h"

namespace pyattn::cpu {

void dropout_mask(bool* keep, int64_t B, int64_t H, int64_t L, int64_t S, float p, uint64_t seed,
                  uint64_t offset) {
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      dropout_keep_row(seed, offset, r / L, r % L, 0, S, p, reinterpret_cast<uint8_t*>(keep + r * S));
  });
}

}  // namespace pyattn::cpu
