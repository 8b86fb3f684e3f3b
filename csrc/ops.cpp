// Every pyattn op schema, in one place, and the pybind11 module that reports how this build was made.
// Kernels register implementations per device: csrc/cpu (CPU) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cpu/dispatch.h"
#include "direct.h"
#include "host_checks.h"
#include "params.h"

// The ops' contract, written once: Python reads these schemas (pyattn/op_args.py: argument names, order and defaults;
// the Triton ops, pyattn/triton_ops.py, take them whole), so each argument's shape is commented here alone.
// Semantics: csrc/params.h.
TORCH_LIBRARY(pyattn, m) {
  // Attention, any strides. Varlen: B == 1 holds packed rows split by cu_seqlens. window_right == 0 is causal.
  // rng_state is a tensor, not ints, so that drawing it stays inside a traced graph (torch.compile).
  m.def("fwd("
        "Tensor q, "                    // (B, Hq, L, E)
        "Tensor k, "                    // (B, Hkv, S, E)
        "Tensor v, "                    // (B, Hkv, S, Ev)
        "Tensor? mask, "                // (B, Hq, L, S) view (stride 0 where broadcast), bool or float
        "Tensor? alibi_slopes, "        // (B, Hq) float32
        "Tensor? cu_seqlens_q, "        // (B + 1,) int32; varlen: q/k/v hold packed rows in batch 1
        "Tensor? cu_seqlens_k, "        // (B + 1,) int32
        "SymInt max_seqlen_q, "         // varlen: the longest sequence of q (else L)
        "SymInt max_seqlen_k, "         // varlen: the longest sequence of k (else S)
        "float scale, "                 // applied to q.k before softcap
        "int window_left, "             // -1 = unbounded
        "int window_right, "            // -1 = unbounded, 0 = causal
        "bool bottom_right, "           // align the last query with the last key
        "float softcap, "               // 0 = off
        "float dropout_p, "             // in [0, 1)
        "Tensor? rng_state, "           // (2,) int64 (seed, offset), needed when dropout_p > 0
        "Tensor? sinks=None, "          // (Hq,) float32 sink logits: in every row's softmax denominator (and lse)
        // Block-sparse mask (flex_attention's BlockMask), ANDed with every other mask. Block (qb, kb) = query rows
        // [qb * block_q, ...) x keys [kb * block_k, ...); its state: 0 = empty (never visited), 1 = full (no
        // per-element mask), 2 + i = partial, masked by block_bits[i]. Not with cu_seqlens.
        "Tensor? block_states=None, "   // (Bm, Hm, Qb, Kb) int32, any strides; Bm in {1, B}, Hm in {1, Hq},
                                        // Qb = ceil(L / block_q), Kb = ceil(S / block_k)
        "Tensor? block_bits=None, "     // (P, block_q, ceil(block_k / 8)) uint8 contiguous: bit c % 8 (LSB first) of
                                        // byte c / 8 of row r: query qb * block_q + r may attend key kb * block_k + c
        "int block_q=0, int block_k=0"  // block sizes (>= 1 with block_states)
        ") -> ("
        "Tensor out, "                  // (B, Hq, L, Ev), laid out like q
        "Tensor lse)");                 // (B, Hq, L) float32
  // Gradients of fwd in q, k, v (and a float mask); out and lse are fwd's, sinks included (the sinks' own gradient
  // is elementwise, pyattn/ops.py). The arguments fwd shares keep its shapes.
  m.def("bwd("
        "Tensor dout, "                 // (B, Hq, L, Ev)
        "Tensor q, Tensor k, Tensor v, "
        "Tensor out, "                  // (B, Hq, L, Ev): fwd's
        "Tensor lse, "                  // (B, Hq, L) float32: fwd's
        "Tensor? dlse, "                // (B, Hq, L) float32: the gradient of lse
        "Tensor? mask, Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
        "SymInt max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, float softcap, "
        "float dropout_p, Tensor? rng_state, "
        "bool mask_grad, "              // also return dmask
        "Tensor? sinks=None, Tensor? block_states=None, Tensor? block_bits=None, int block_q=0, int block_k=0"
        ") -> ("
        "Tensor dq, Tensor dk, Tensor dv, "  // like q, k, v
        "Tensor dmask)");               // (B, Hq, L, S) float32 when mask_grad, else empty
  // Attention over a KV cache (serving; forward only). Sequence b attends to cache positions
  // [cache_leftpad[b] (or 0), seqlens_k[b]) of cache row cache_batch_idx[b] (or b); its queries are bottom-right
  // aligned. window_right == 0 is causal. Appending new keys is the caller's (an in-place write before this op).
  m.def("kvcache_fwd("
        "Tensor q, "                    // (B, L, Hq, E)
        "Tensor k_cache, "              // (B_cache, S_max, Hkv, E), or paged (num_pages, page_size, Hkv, E)
        "Tensor v_cache, "              // like k_cache, last dim Ev
        "Tensor seqlens_k, "            // (B,) int32
        "Tensor? block_table, "         // (B, max_pages) int32: paged
        "Tensor? cache_batch_idx, "     // (B,) int32
        "Tensor? cache_leftpad, "       // (B,) int32
        "Tensor? alibi_slopes, "        // (B, Hq) float32
        "Tensor? sinks, "               // (Hq,) float32
        "float scale, int window_left, int window_right, float softcap"
        ") -> ("
        "Tensor out, "                  // (B, L, Hq, Ev) contiguous
        "Tensor lse)");                 // (B, Hq, L) float32
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

// params.h's MaskKind values by name: the numbering the Triton kernels take (pyattn/kernels/scores.py).
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
  m.def("mask_kinds", &mask_kinds, "csrc/params.h's mask kinds (AttnParams::mask_kind) by name");
  pyattn::def_host_checks(m);
  m.def("sdpa_direct", &pyattn::sdpa_direct,
        "pyattn.scaled_dot_product_attention's direct lane: out for a plainly valid CPU call, else None (csrc/direct.h)");
  m.def("_set_cpu_kernels", &set_cpu_kernels, "use the kernels of a pyattn._cpu_<capability> module");
  m.def("_cpu_fwd_plan", &pyattn::cpu::explain_fwd,
        "explain(): how the CPU kernels in use would run fwd with these arguments (fwd's own)");
  m.def("_cpu_kvcache_fwd_plan", &pyattn::cpu::explain_kvcache_fwd,
        "explain(): how the CPU kernels in use would run kvcache_fwd with these arguments (kvcache_fwd's own)");
  m.def("_cpu_last_fwd_run", &pyattn::cpu::last_fwd_run,
        "for tests: the plan of the CPU forward last run on this thread, '' when none ran since the last call");
}
