// Dynamic task scheduling on torch's intra-op pool. Tasks are claimed from a shared counter, so unequal
// costs (causal) balance; a task's result depends only on the task, never on the thread that ran it,
// which keeps the kernels deterministic for any thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace pyattn::cpu {

// make_scratch() runs once per worker; fn(task, scratch) for every task in [0, n), on up to max_workers threads
// (1: on the caller's, with no parallel region).
template <typename MakeScratch, typename Fn>
void parallel_tasks(int64_t n, MakeScratch&& make_scratch, Fn&& fn, int64_t max_workers = INT64_MAX) {
  if (n <= 0) return;
  const int64_t workers = std::min({n, int64_t(at::get_num_threads()), max_workers});
  if (workers == 1) {
    auto scratch = make_scratch();
    for (int64_t t = 0; t < n; ++t) fn(t, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    for (int64_t t = next++; t < n; t = next++) fn(t, scratch);
  });
}

}  // namespace pyattn::cpu
