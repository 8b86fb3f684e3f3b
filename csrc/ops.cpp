// Every pyattn op schema, in one place, and the pybind11 module that reports how this build was made.
// Kernels register implementations per device: csrc/cpu (CPU) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cpu/dispatch.h"
#include "params.h"

TORCH_LIBRARY(pyattn, m) {
  // q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), any strides -> out (B, Hq, L, Ev), lse (B, Hq, L)
  // float32. mask: (B, Hq, L, S) view (stride 0 where broadcast), bool or float. Varlen: B == 1 holds
  // packed rows split by cu_seqlens. window_right == 0 is causal. rng_state: int64 (seed, offset), needed
  // when dropout_p > 0; a tensor, not ints, so that drawing it stays inside a traced graph (torch.compile).
  // sinks: float32 (Hq,) sink logits, part of every row's softmax denominator (and of lse).
  // Semantics: csrc/params.h.
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, int window_left, "
      "int window_right, bool bottom_right, float softcap, float dropout_p, Tensor? rng_state, Tensor? sinks=None) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of fwd in q, k, v (and a float mask); out and lse are fwd's, sinks included (the sinks' own
  // gradient is elementwise, pyattn/ops.py). dlse: optional gradient of lse. dmask (B, Hq, L, S) float32
  // when mask_grad, else an empty tensor.
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor? mask, "
      "Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, float softcap, "
      "float dropout_p, Tensor? rng_state, bool mask_grad, Tensor? sinks=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // Attention over a KV cache (serving; forward only). q (B, L, Hq, E); caches (B_cache, S_max, Hkv, E|Ev), or
  // paged (num_pages, page_size, Hkv, E|Ev) with block_table (B, max_pages) int32. Sequence b attends to cache
  // positions [cache_leftpad[b] (or 0), seqlens_k[b]) of cache row cache_batch_idx[b] (or b); its queries are
  // bottom-right aligned. window_right == 0 is causal. Appending new keys is the caller's (an in-place write
  // before this op). -> out (B, L, Hq, Ev) contiguous, lse (B, Hq, L) float32. Semantics: csrc/params.h.
  m.def(
      "kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? block_table, "
      "Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? alibi_slopes, Tensor? sinks, float scale, "
      "int window_left, int window_right, float softcap) -> (Tensor out, Tensor lse)");
  // The keep-mask (B, H, L, S) bool that the CPU kernels draw for (seed, offset): for tests and debugging.
  m.def(
      "cpu_dropout_mask(int batch, int heads, int seqlen_q, int seqlen_k, float dropout_p, int seed, "
      "int offset) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = PYATTN_VERSION;
  pybind11::list backends;
  backends.append("cpu");
#ifdef PYATTN_WITH_CUDA
  backends.append("cuda");
  info["cuda_archs"] = std::string(PYATTN_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string();
#endif
  info["backends"] = backends;
  info["torch"] = std::string(PYATTN_TORCH_VERSION);
  pybind11::list caps;
  std::stringstream names(PYATTN_CPU_CAPABILITIES);  // "default;avx2;..."
  for (std::string name; std::getline(names, name, ';');)
    if (!name.empty()) caps.append(name);
  info["cpu_capabilities"] = caps;
  info["cpu_capability"] = std::string(pyattn::cpu::capability_in_use());
  return info;
}

// A KernelTable capsule from a pyattn._cpu_<capability> module becomes the CPU kernels in use; None unsets.
void set_cpu_kernels(pybind11::object capsule) {
  if (capsule.is_none()) return pyattn::cpu::set_kernels(nullptr);
  auto* table = static_cast<const pyattn::cpu::KernelTable*>(
      PyCapsule_GetPointer(capsule.ptr(), "pyattn.cpu.KernelTable"));
  if (table == nullptr) throw pybind11::error_already_set();
  pyattn::cpu::set_kernels(table);
}

// params.h's MaskKind values by the names pyattn/features.py gives them, for tests/contract/test_mask_kinds.py.
pybind11::dict mask_kinds() {
  pybind11::dict kinds;
  kinds["MASK_NONE"] = int(pyattn::kMaskNone);
  kinds["MASK_BOOL"] = int(pyattn::kMaskBool);
  kinds["MASK_LIKE_Q"] = int(pyattn::kMaskLikeQ);
  kinds["MASK_FLOAT32"] = int(pyattn::kMaskFloat32);
  return kinds;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyattn compiled ops";
  m.def("build_info", &build_info,
        "version, compiled backends, CUDA architectures and CPU capabilities of this build, and the one in use");
  m.def("mask_kinds", &mask_kinds, "csrc/params.h's mask kinds (AttnParams::mask_kind) by their Python names");
  m.def("_set_cpu_kernels", &set_cpu_kernels, "use the kernels of a pyattn._cpu_<capability> module");
  m.def("_cpu_fwd_plan",
        [](const at::Tensor& like, int64_t rows, int64_t E, int64_t Ev) {
          return pyattn::cpu::fwd_plan(like.scalar_type(), rows, E, Ev);
        },
        "how the CPU kernels in use run the forward of like's dtype on tiles of `rows` q rows (a GQA group's heads "
        "x L), head dims E, Ev");
}
