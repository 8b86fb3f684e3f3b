// The direct lane of pyattn.scaled_dot_product_attention (see direct.h).
#include "direct.h"

#include <torch/csrc/autograd/python_variable.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace pyattn {
namespace {

namespace py = pybind11;

// A plain dense CPU tensor that nothing is watching: no subclass (FakeTensor, DTensor, ...), no functorch wrapper,
// no Python dispatch key, no lazy conjugate or negation, nothing empty.
std::optional<at::Tensor> plain_tensor(py::handle h) {
  if (!THPVariable_CheckExact(h.ptr())) return std::nullopt;
  const at::Tensor& t = THPVariable_Unpack(h.ptr());
  static const c10::DispatchKeySet watched({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::Conjugate,
                                            c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor});
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.is_nested() || t.dim() != 4 ||
      t.numel() == 0 || !(t.key_set() & watched).empty())
    return std::nullopt;
  return t;
}

bool is_bool(py::handle h) { return h.ptr() == Py_True || h.ptr() == Py_False; }

// An exact Python int (bools are not) as int64, or nullopt.
std::optional<int64_t> exact_int(py::handle h) {
  if (!PyLong_CheckExact(h.ptr())) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0) return std::nullopt;
  return v;
}

// An exact Python float or int as a double (validate.real's answer for them), or nullopt.
std::optional<double> exact_real(py::handle h) {
  if (PyFloat_CheckExact(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  if (auto i = exact_int(h)) return double(*i);
  return std::nullopt;
}

bool is_str(py::handle h, const char* s) {
  return PyUnicode_CheckExact(h.ptr()) && PyUnicode_CompareWithASCIIString(h.ptr(), s) == 0;
}

}  // namespace

py::object sdpa_direct(py::handle query, py::handle key, py::handle value, py::handle dropout_p, py::handle is_causal,
                       py::handle scale, py::handle enable_gqa, py::handle window_size, py::handle causal_alignment) {
  const py::object decline = py::none();
  const auto q = plain_tensor(query), k = plain_tensor(key), v = plain_tensor(value);
  if (!q || !k || !v || !is_bool(is_causal) || !is_bool(enable_gqa)) return decline;
  const auto dtype = q->scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf) ||
      k->scalar_type() != dtype || v->scalar_type() != dtype)
    return decline;
  const int64_t B = q->size(0), Hq = q->size(1), L = q->size(2), E = q->size(3);
  const int64_t Hkv = k->size(1), S = k->size(2);
  const bool gqa = enable_gqa.ptr() == Py_True;
  // no broadcasting, GQA only as asked (normalize.batch_shapes' usual call)
  if (k->size(0) != B || v->size(0) != B || v->size(1) != Hkv || v->size(2) != S || k->size(3) != E ||
      (Hq != Hkv && !(gqa && Hq % Hkv == 0)))
    return decline;
  // nothing to differentiate, nothing that changes dtypes or intercepts ops
  if (at::GradMode::is_enabled() && (q->requires_grad() || k->requires_grad() || v->requires_grad())) return decline;
  // a dispatch mode or functorch transform adds its keys to the thread's included set (always there: these two)
  static const c10::DispatchKeySet always({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  if (at::autocast::is_autocast_enabled(at::kCPU) || !(c10::impl::tls_local_dispatch_key_set().included_ - always).empty())
    return decline;
  const auto p = exact_real(dropout_p);
  if (!p || *p != 0.0) return decline;
  double sc = E > 0 ? 1.0 / std::sqrt(double(E)) : 1.0;  // validate.scale's default
  if (!scale.is_none()) {
    const auto given = exact_real(scale);
    if (!given) return decline;
    sc = *given;
  }
  // validate.window: (left, right) >= -1 each, causal folded in as right = 0
  int64_t left = -1, right = -1;
  if (!window_size.is_none()) {
    if (!PyTuple_CheckExact(window_size.ptr()) || PyTuple_GET_SIZE(window_size.ptr()) != 2) return decline;
    const auto l = exact_int(PyTuple_GET_ITEM(window_size.ptr(), 0));
    const auto r = exact_int(PyTuple_GET_ITEM(window_size.ptr(), 1));
    if (!l || !r || *l < -1 || *r < -1) return decline;
    left = *l;
    right = *r;
  }
  if (is_causal.ptr() == Py_True) right = right < 0 ? 0 : std::min<int64_t>(right, 0);
  const bool top_left = is_str(causal_alignment, "top_left");
  if (!top_left && !is_str(causal_alignment, "bottom_right")) return decline;

  // fwd's arguments by name, the rest at their schema defaults (none of them is needed here)
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("pyattn::fwd", "");
  const auto& arguments = op.schema().arguments();
  torch::jit::Stack stack;
  stack.reserve(arguments.size());
  for (const auto& a : arguments) {
    const std::string& n = a.name();
    if (n == "q") stack.emplace_back(*q);
    else if (n == "k") stack.emplace_back(*k);
    else if (n == "v") stack.emplace_back(*v);
    else if (n == "max_seqlen_q") stack.emplace_back(L);
    else if (n == "max_seqlen_k") stack.emplace_back(S);
    else if (n == "scale") stack.emplace_back(sc);
    else if (n == "window_left") stack.emplace_back(left);
    else if (n == "window_right") stack.emplace_back(right);
    else if (n == "bottom_right") stack.emplace_back(!top_left);
    else if (n == "softcap" || n == "dropout_p") stack.emplace_back(0.0);
    else if (a.type()->kind() == c10::TypeKind::OptionalType) stack.emplace_back();  // None
    else if (a.default_value()) stack.push_back(*a.default_value());
    else TORCH_CHECK(false, "pyattn: sdpa_direct does not know fwd's argument ", n);
  }
  {
    py::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // nothing requires grad (checked above)
    op.callBoxed(&stack);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(stack[0].toTensor()));
}

}  // namespace pyattn
