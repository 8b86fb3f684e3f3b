// The CPU capability in use: the KernelTable of one pyattn._cpu_<capability> module, set from Python
// (pyattn/cpu_capability.py) through pyattn._C._set_cpu_kernels. Lives in pyattn._C.
#pragma once
#include <c10/core/ScalarType.h>

#include <string>

#include "cpu/kernel.h"

namespace pyattn::cpu {

// Checks the table's abi; nullptr unsets.
void set_kernels(const KernelTable* table);
// The table in use; raises if none was set.
const KernelTable& kernels();
// Name of the capability in use, or "" when none is set.
const char* capability_in_use();
// explain(): how the kernels in use run the forward of a dtype (float, double, bfloat16, half), rows = q rows of a
// GQA group's tile (heads x L), head dims E, Ev (KernelTable::fwd_plan).
std::string fwd_plan(at::ScalarType dtype, int64_t rows, int64_t E, int64_t Ev);

}  // namespace pyattn::cpu
