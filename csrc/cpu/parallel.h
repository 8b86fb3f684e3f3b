// Dynamic task scheduling on torch's intra-op pool. Tasks are claimed from a shared counter, so unequal
// costs (causal) balance; a task's result depends only on the task, never on the thread that ran it,
// which keeps the kernels deterministic for any thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace pyattn::cpu {

// make_scratch() runs once per worker; fn(task, scratch) for every task in [0, n).
template <typename MakeScratch, typename Fn>
void parallel_tasks(int64_t n, MakeScratch&& make_scratch, Fn&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    for (int64_t t = next++; t < n; t = next++) fn(t, scratch);
  });
}

}  // namespace pyattn::cpu
