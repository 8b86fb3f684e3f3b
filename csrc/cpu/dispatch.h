// The CPU capability in use: the KernelTable of one pyattn._cpu_<capability> module, set from Python
// (pyattn/cpu_capability.py) through pyattn._C._set_cpu_kernels. Lives in pyattn._C.
#pragma once
#include "cpu/kernel.h"

namespace pyattn::cpu {

// Checks the table's abi; nullptr unsets.
void set_kernels(const KernelTable* table);
// The table in use; raises if none was set.
const KernelTable& kernels();
// Name of the capability in use, or "" when none is set.
const char* capability_in_use();

}  // namespace pyattn::cpu
