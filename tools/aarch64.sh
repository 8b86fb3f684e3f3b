#!/usr/bin/env bash
# pyattn on Linux aarch64, emulated by qemu-user on an x86-64 Debian 12 host (`make test-aarch64`).
#
# An arm64 Debian root with python and PyPI's aarch64 wheels is set up once and cached in $AARCH64_ROOT. The C++
# extensions are cross-compiled at native speed: the emulated python runs setup.py itself, and its compiler is the
# host's aarch64-linux-gnu-g++ (an x86 program, bind-mounted into the root with the x86 libraries it needs, so
# the kernel runs it natively). Only python, ninja and the tests run under qemu.
#
# usage, as root from the repository root: tools/aarch64.sh [STEP...]      (no STEP: setup build test)
#   setup   host rootfs packages wheels venv; each is skipped once done with the same inputs
#   build   copy the working tree into the root (build outputs stay: ninja rebuilds what changed), build_ext
#   test    python -m pytest $PYTEST_ARGS inside the root, once per emulated CPU in $AARCH64_CPUS
#   shell   a shell inside the root, mounted as for the build, on the first of $AARCH64_CPUS;  clean  delete the root
# environment:
#   AARCH64_ROOT     cache folder (default /var/tmp/pyattn-aarch64, shared by all checkouts)
#   AARCH64_CPUS     CPUs the tests run on: neon (a Neoverse N1: NEON, no SVE) and/or sveBITS (every feature qemu
#                    has, SVE vectors of BITS: 128 to 2048); default "neon sve256" (Neoverse V1 / Graviton 3: 256)
#   PYTEST_ARGS      default: the CPU backend's cases of the kernel, dropout, module, error and op tests
#   PYATTN_CPU_ARCH  -march for setup.py's CPU kernel (default armv8-a; the cross compiler has no -march=native)
#   MAX_JOBS         build parallelism (default 2);  MIRROR  Debian mirror for debootstrap;  STEP_TIMEOUT  seconds
set -euo pipefail

REPO=$(git rev-parse --show-toplevel)
ROOT=${AARCH64_ROOT:-/var/tmp/pyattn-aarch64}
SUITE=bookworm                      # python 3.11 and glibc 2.36: the host's, so the cross toolchain matches
STEP_TIMEOUT=${STEP_TIMEOUT:-3600}
CPUS=${AARCH64_CPUS:-neon sve256}
# the CPU backend's cases of the kernel, dropout, module, error and op-registration tests; not gradcheck (float64
# finite differences: long under emulation, and test_dropin checks the gradients) nor inductor (the root has no
# native compiler, and the cross compiler takes no -march=native)
DEFAULT_TESTS="tests/api/test_dropin.py tests/api/test_extras.py tests/backends/test_dropout.py tests/api/test_nn.py \
  tests/api/test_errors.py tests/backends/test_ops.py -k 'cpu and not gradcheck and not inductor' --tb=short"
PYTEST_ARGS=${PYTEST_ARGS:-$DEFAULT_TESTS}
HOST_PACKAGES=(qemu-user-static binfmt-support debootstrap g++-aarch64-linux-gnu rsync)
ROOT_PACKAGES=(python3 python3-venv python3-dev libgomp1)
# the pins the build and the CPU tests need (triton and transformers tests stay on x86)
PINS=$(grep -E '^(torch|numpy|pytest|ninja|setuptools|pybind11|expecttest)==' "$REPO/requirements.txt" | tr '\n' ' ')
CROSS=aarch64-linux-gnu
HOST=/host                          # the host's toolchain as seen inside the root
STAMPS=$ROOT/.pyattn-stamps

say() { printf '== %s\n' "$*"; }
die() { printf 'aarch64.sh: %s\n' "$*" >&2; exit 1; }

# done_with NAME INPUTS: true when step NAME already ran with these inputs; did NAME INPUTS records it
done_with() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
did() { mkdir -p "$STAMPS" && printf '%s' "$2" > "$STAMPS/$1"; }

# --- mounts: every one under the root is undone on exit (a killed run's leftovers too), deepest first --------
bind() {  # bind SRC DST [ro]: DST is a path inside the root
  local dst=$ROOT$2
  mountpoint -q "$dst" && return
  if [ -d "$1" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")" && touch "$dst"; fi
  mount --bind "$1" "$dst"
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$dst"; fi
}
mounts_in_root() { awk -v root="$ROOT/" 'index($5, root) == 1 {print $5}' /proc/self/mountinfo | sort -r; }
unmount_all() {
  local m
  for m in $(mounts_in_root); do umount "$m" 2>/dev/null || umount --lazy "$m"; done
}
# timeout runs each command inside the root in a process group of its own, which no ^C reaches: stop it here
IN_ROOT_PID=
finish() {
  if [ -n "$IN_ROOT_PID" ]; then kill "$IN_ROOT_PID" 2>/dev/null || true; wait "$IN_ROOT_PID" || true; fi
  unmount_all
}
trap finish EXIT
trap 'exit 130' INT TERM

# use_cpu NAME: the emulated CPU of what runs inside the root from now on. Neoverse N1 (Graviton 2, armv8.2) is
# the oldest kind torch's aarch64 wheel runs on (it dies of SIGILL on an armv8.0 Cortex-A72). qemu's "max" has every
# feature qemu emulates; its SVE vector length is set in bytes.
use_cpu() {
  case $1 in
    neon) QEMU_CPU=neoverse-n1 ;;
    sve*) local bits=${1#sve}
          [[ $bits =~ ^(128|256|512|1024|2048)$ ]] || die "AARCH64_CPUS: $1 is not neon or sve128 ... sve2048"
          QEMU_CPU=max,sve-default-vector-length=$((bits / 8)) ;;
    *) die "AARCH64_CPUS: unknown CPU $1 (neon, sve128 ... sve2048)" ;;
  esac
  CPU=$1
}

# qemu-user shows the host's x86 /proc/cpuinfo, on which torch's cpuinfo library crashes in `import torch`: the
# root gets an arm64 one, one entry per host core, a Neoverse N1 (no SVE) or V1. torch reads the features
# themselves from the HWCAPs qemu gives. (oneDNN's "Can't open MIDR_EL1 sysfs entry" at import is harmless.)
write_cpuinfo() {
  local i part=0xd0c
  local features="fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop asimddp"
  [ "$CPU" = neon ] || { features+=" sve"; part=0xd40; }
  for i in $(seq 0 $(($(nproc) - 1))); do
    printf 'processor\t: %s\nBogoMIPS\t: 2000.00\nFeatures\t: %s\n' "$i" "$features"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\n' "$part"
    printf 'CPU revision\t: 1\n\n'
  done > "$ROOT/etc/pyattn-cpuinfo"
}

mount_root() {
  bind /proc /proc
  write_cpuinfo
  bind "$ROOT/etc/pyattn-cpuinfo" /proc/cpuinfo ro
  bind /sys /sys ro
  bind /dev /dev
}

# The host's cross compiler inside the root, read-only, under /host/usr: gcc finds its own programs, headers and
# libraries relative to where it runs from, so they keep their places (/usr/bin, /usr/lib/gcc-cross,
# /usr/aarch64-linux-gnu) under one prefix. The x86 loader and libraries it runs on go to their own paths: the
# root is arm64-only, so these shadow nothing in it.
mount_toolchain() {
  local d
  for d in bin lib/gcc-cross $CROSS; do bind "/usr/$d" "$HOST/usr/$d" ro; done
  [ -e "$ROOT/lib64" ] || ln -s usr/lib64 "$ROOT/lib64"
  bind /usr/lib64 /usr/lib64 ro
  bind /usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu ro
}

# the environment inside the root: nothing of the host's
root_env() {
  echo HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" PATH=/opt/venv/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
}

# run a command inside the root: clean environment, niced, bounded
in_root() {
  # shellcheck disable=SC2046
  timeout "$STEP_TIMEOUT" nice -n 10 chroot "$ROOT" /usr/bin/env -i TERM=dumb $(root_env) "$@" &
  IN_ROOT_PID=$!
  local rc=0
  wait "$IN_ROOT_PID" || rc=$?
  IN_ROOT_PID=
  return $rc
}

# --- setup -------------------------------------------------------------------------------------------------
step_host() {
  dpkg -s "${HOST_PACKAGES[@]}" > /dev/null 2>&1 || {
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${HOST_PACKAGES[@]}"
  }
  local binfmt=/proc/sys/fs/binfmt_misc
  mountpoint -q $binfmt || mount -t binfmt_misc binfmt_misc $binfmt
  [ -e $binfmt/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  # F: the kernel opened qemu when it was registered, so the root needs no copy of it
  grep -q '^flags: .*F' $binfmt/qemu-aarch64 || die "qemu-aarch64 is registered without binfmt's F flag"
}

step_rootfs() {
  done_with rootfs $SUITE && return
  [ -e "$ROOT" ] && die "$ROOT exists but was not set up by this script: remove it or set AARCH64_ROOT"
  # into a temporary folder first, so an interrupted debootstrap never looks like a finished root
  rm -rf --one-file-system "$ROOT.new"
  timeout "$STEP_TIMEOUT" nice -n 10 debootstrap --arch=arm64 --variant=minbase $SUITE "$ROOT.new" \
    "${MIRROR:-http://deb.debian.org/debian}"
  mv "$ROOT.new" "$ROOT"
  did rootfs $SUITE
}

step_packages() {
  done_with packages "${ROOT_PACKAGES[*]}" && return
  mount_root
  in_root apt-get update -q
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${ROOT_PACKAGES[@]}"
  in_root apt-get clean
  did packages "${ROOT_PACKAGES[*]}"
}

# The host's pip fetches the aarch64 wheels (its index and certificate settings apply); they are installed
# offline inside. PyPI's aarch64 torch is a CUDA build: its nvidia wheels come along, and it runs on the CPU.
step_wheels() {
  done_with wheels "$PINS" && return
  # an explicit --platform does not take older manylinux tags: list each one glibc 2.36 accepts
  local plats=(--platform manylinux2014_aarch64) v
  for v in $(seq 17 36); do plats+=(--platform "manylinux_2_${v}_aarch64"); done
  # shellcheck disable=SC2086
  timeout "$STEP_TIMEOUT" nice -n 10 python3 -m pip download -q --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 "${plats[@]}" -d "$ROOT/wheels" $PINS
  did wheels "$PINS"
}

step_venv() {
  done_with venv "$PINS" && return
  mount_root
  [ -x "$ROOT/opt/venv/bin/python" ] || in_root python3 -m venv /opt/venv
  # shellcheck disable=SC2086
  in_root pip install -q --no-index --find-links /wheels $PINS
  in_root python -c 'import torch; print("torch", torch.__version__, "on", torch.backends.cpu.get_cpu_capability())'
  did venv "$PINS"
}

# --- build and test ----------------------------------------------------------------------------------------
# the working tree as git sees it (tracked and untracked files, not ignored ones); ignored build outputs
# already in the root stay, and keep their times, so ninja rebuilds only what changed
sync_tree() {
  rsync -a --delete --filter=':- .gitignore' --exclude=/.git "$REPO/" "$ROOT/src/"
}

step_build() {
  sync_tree
  mount_root
  mount_toolchain
  local cxx=$HOST/usr/bin/$CROSS-g++ log=$ROOT/build.log rc=0
  in_root bash -c "cd /src && CC=$HOST/usr/bin/$CROSS-gcc CXX=$cxx LDSHARED='$cxx -shared' \
    PYATTN_SKIP_CUDA_BUILD=1 PYATTN_CPU_ARCH=${PYATTN_CPU_ARCH:-armv8-a} MAX_JOBS=${MAX_JOBS:-2} \
    python setup.py build_ext --inplace" > "$log" 2>&1 || rc=$?
  say "$(grep -cE '^\[[0-9]+/[0-9]+\] ' "$log") files compiled:" \
    "$(grep -oE -- '-m(arch|sve-vector-bits)=[^ ]+' "$log" | sort | uniq -c | awk '{printf "%s (%s) ", $2, $1}')"
  [ "$rc" = 0 ] || { grep -E -B2 -A8 'error' "$log" | tail -n 60; die "build failed (rc=$rc), log: $log"; }
  in_root bash -c "cd /src && python -c 'import pyattn; print(pyattn.build_info())'"
}

# which kernels a test run takes: torch's CPU capability and pyattn's build info
SHOW_CPU='import pyattn, torch
print(dict(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), **pyattn.build_info()))'

step_test() {
  [ -d "$ROOT/src/build" ] || die "nothing built in $ROOT yet: run the build step first"
  mount_root
  local cpu failed=()
  for cpu in $CPUS; do
    use_cpu "$cpu"
    write_cpuinfo
    say "tests on $cpu (QEMU_CPU=$QEMU_CPU)"
    # shellcheck disable=SC2086
    in_root bash -c "cd /src && python -c '$SHOW_CPU' && python -m pytest -q $PYTEST_ARGS" || failed+=("$cpu")
  done
  [ ${#failed[@]} = 0 ] || die "tests failed on: ${failed[*]}"
}

step_shell() {
  mount_root
  mount_toolchain
  # shellcheck disable=SC2046
  chroot "$ROOT" /usr/bin/env -i TERM="${TERM:-dumb}" $(root_env) bash
}
# a bind mount of the host's /usr/bin is on the same file system: never delete through one
step_clean() {
  unmount_all
  [ -z "$(mounts_in_root)" ] || die "still mounted under $ROOT: $(mounts_in_root)"
  rm -rf --one-file-system "$ROOT" "$ROOT.new"
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts)"
[ "$(uname -m)" = x86_64 ] || die "runs on an x86-64 host (the cross compiler is the host's)"
# one run at a time per root: the mounts and the build folder are shared
mkdir -p "$(dirname "$ROOT")"
exec 9> "$ROOT.lock"
flock -n 9 || die "another run is using $ROOT"
use_cpu "${CPUS%% *}"
[ $# -gt 0 ] || set -- setup build test
for step in $(printf '%s\n' "$@" | sed 's/^setup$/host rootfs packages wheels venv/'); do
  declare -F "step_$step" > /dev/null || die "unknown step: $step"
  say "$step ($(date +%T))"
  t0=$(date +%s)
  "step_$step"
  say "$step done in $(($(date +%s) - t0)) s"
done
