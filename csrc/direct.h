// The direct lane of pyattn.scaled_dot_product_attention: a call that is plainly valid and certain to run on the CPU
// kernel goes from Python straight to pyattn::fwd, without the Python input record (pyattn/inputs.py) and backend
// choice, which cost more than a tiny call's kernel (B=1, H=8, L=S=16, D=64: ~12 us of Python against torch's whole
// SDPA call of ~16 us, CPU time). Anything else, including every call that would raise, is declined (None) and
// takes the full path, whose checks and words stay the only ones: the lane accepts only what they accept and runs
// what they would run (tests/api/test_direct.py compares the two).
#pragma once
#include <torch/extension.h>

namespace pyattn {

// pyattn.scaled_dot_product_attention's arguments that a direct call may carry (the others are their defaults):
// -> out (B, Hq, L, Ev) as the full path returns it, or None to decline. Accepted: exact 4-D dense CPU tensors of
// one float dtype, unbroadcast batch, Hq == Hkv or GQA asked for; dropout_p 0; bools, exact Python numbers and
// window pairs; nothing requiring grad, no autocast, no dispatch mode or functorch transform.
pybind11::object sdpa_direct(pybind11::handle query, pybind11::handle key, pybind11::handle value,
                             pybind11::handle dropout_p, pybind11::handle is_causal, pybind11::handle scale,
                             pybind11::handle enable_gqa, pybind11::handle window_size,
                             pybind11::handle causal_alignment);

}  // namespace pyattn
