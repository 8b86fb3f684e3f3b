// The host checks of kernels launched from Python, as pyattn._C functions (csrc/host_checks.cpp).
#pragma once
#include <torch/extension.h>

namespace pyattn {

// Defines check_fwd, check_bwd and check_kvcache_fwd on pyattn._C.
void def_host_checks(pybind11::module_& m);

}  // namespace pyattn
