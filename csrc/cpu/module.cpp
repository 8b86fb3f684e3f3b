// The Python module pyattn._cpu_<capability>: this capability's kernels as a KernelTable in a capsule,
// which pyattn/cpu_capability.py hands to pyattn._C. Plain CPython API: no pybind11, so the module stays
// small, and with -fvisibility=hidden (setup.py) nothing of it but PyInit is seen by other modules, so
// inline functions compiled for this ISA never stand in for another module's.
#include <Python.h>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/kernel.h"

namespace pyattn::cpu {
namespace {

const KernelTable kTable = {
    KernelTable::kAbi,
    PYATTN_CPU_CAPABILITY_NAME,
    {&run_fwd<float>, &run_fwd<double>, &run_fwd<c10::BFloat16>, &run_fwd<c10::Half>},
    {&run_bwd<float>, &run_bwd<double>, &run_bwd<c10::BFloat16>, &run_bwd<c10::Half>},
    {&fwd_plan<float>, &fwd_plan<double>, &fwd_plan<c10::BFloat16>, &fwd_plan<c10::Half>},
    &take_last_fwd_run,
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
                       "pyattn CPU kernels compiled for one CPU capability", -1, nullptr};

}  // namespace
}  // namespace pyattn::cpu

#define PYATTN_CONCAT_(a, b) a##b
#define PYATTN_CONCAT(a, b) PYATTN_CONCAT_(a, b)

PyMODINIT_FUNC PYATTN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  using namespace pyattn::cpu;
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  PyObject* table = PyCapsule_New(const_cast<KernelTable*>(&kTable), "pyattn.cpu.KernelTable", nullptr);
  const bool ok = table != nullptr && PyModule_AddObjectRef(m, "kernels", table) == 0 &&
                  PyModule_AddStringConstant(m, "capability", PYATTN_CPU_CAPABILITY_NAME) == 0;
  Py_XDECREF(table);
  if (!ok) Py_CLEAR(m);
  return m;
}
