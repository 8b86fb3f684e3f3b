"""Which build of the CPU kernel runs. setup.py compiles the kernel once per CPU capability, into the modules
pyattn._cpu_<name>; the best one that this CPU supports is loaded, unless PYATTN_CPU_CAPABILITY or torch's own
ATEN_CPU_CAPABILITY asks for a lower one. use() switches at run time (the tests run every path this way).
"""
import contextlib
import importlib
import os
import platform
import warnings

import torch

# Lowest first, per machine arch; the same names as setup.py's CPU_CAPABILITIES.
ORDER = {"x86_64": ("default", "avx2", "avx512", "avx512_bf16"), "aarch64": ("default", "sve256")}
# torch's ATEN_CPU_CAPABILITY values -> the highest of ours they allow (torch's avx512 covers avx512_bf16)
ATEN_LIMIT = {"default": "default", "avx2": "avx2", "avx512": "avx512_bf16", "sve256": "sve256"}

_state = {"name": None, "why_not_higher": {}}


def order():
    return ORDER.get(platform.machine().lower(), ("default",))


def compiled():
    from . import _C
    return list(_C.build_info()["cpu_capabilities"])


def cpu_supports(name):
    """Whether this CPU runs the instructions of capability name (torch's cpuinfo answers)."""
    checks = {
        "default": lambda: True,
        "avx2": torch.cpu._is_avx2_supported,
        "avx512": torch.cpu._is_avx512_supported,
        "avx512_bf16": lambda: torch.cpu._is_avx512_supported() and torch.cpu._is_avx512_bf16_supported(),
        # torch picks SVE256 only where SVE's vector length is 256 bits
        "sve256": lambda: torch.backends.cpu.get_cpu_capability() == "SVE256",
    }
    return name in checks and bool(checks[name]())


def _limit():
    """(highest allowed name, why) from PYATTN_CPU_CAPABILITY, then ATEN_CPU_CAPABILITY; (None, None) if unset."""
    names = order()
    ours = os.environ.get("PYATTN_CPU_CAPABILITY", "").strip().lower()
    if ours:
        if ours in names:
            return ours, f"PYATTN_CPU_CAPABILITY={ours}"
        warnings.warn(f"PYATTN_CPU_CAPABILITY={ours!r} is not one of {list(names)}; ignored", stacklevel=3)
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ATEN_LIMIT and ATEN_LIMIT[aten] in names:
        return ATEN_LIMIT[aten], f"ATEN_CPU_CAPABILITY={aten}"
    return None, None


def choose():
    """-> (name, {higher name: why it is not used}) for this CPU, build and environment."""
    built, names = set(compiled()), order()
    limit, limit_why = _limit()
    top = names.index(limit) if limit else len(names) - 1

    def why_not(name):
        if name not in built:
            return "not compiled into this build (setup.py's PYATTN_CPU_CAPABILITIES)"
        if not cpu_supports(name):
            return f"this CPU lacks {name}"
        if names.index(name) > top:
            return f"held back by {limit_why}"
        return None

    usable = [n for n in names if why_not(n) is None]
    if not usable:
        raise RuntimeError(f"pyattn: no CPU kernel module runs on this CPU (compiled: {sorted(built)})")
    chosen = usable[-1]
    return chosen, {n: why_not(n) for n in names[names.index(chosen) + 1:]}


def use(name, why_not_higher=None):
    """Makes the CPU backend run the kernels compiled for capability name."""
    from . import _C
    if name not in compiled():
        raise ValueError(f"CPU capability {name!r} is not compiled into this build; compiled: {compiled()}")
    if not cpu_supports(name):
        raise ValueError(f"this CPU cannot run CPU capability {name!r}")
    module = importlib.import_module(f"pyattn._cpu_{name}")
    _C._set_cpu_kernels(module.kernels)
    _state.update(name=name, why_not_higher=dict(why_not_higher or {}))


def load():
    """Loads the best capability (choose()); called once when pyattn._C is imported."""
    use(*choose())


@contextlib.contextmanager
def forced(name):
    """Runs the block on capability name, then restores the previous one."""
    previous = dict(_state)
    use(name, {n: "forced lower for this block" for n in order() if order().index(n) > order().index(name)})
    try:
        yield
    finally:
        use(previous["name"], previous["why_not_higher"])


def current():
    return _state["name"]


def describe():
    """One line for explain(): the capability in use and why no higher one."""
    why = "; ".join(f"not {n}: {w}" for n, w in _state["why_not_higher"].items())
    return f"CPU capability {current()}" + (f" ({why})" if why else " (the highest there is)")


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
