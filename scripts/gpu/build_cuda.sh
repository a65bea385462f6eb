#!/usr/bin/env bash
# Build `beit-cli` with candle's CUDA backend on a machine that has no GPU and
# no system CUDA toolkit, using NVIDIA's CUDA wheels from PyPI.
#
# Usage: scripts/gpu/build_cuda.sh [extra cargo args...]
#        scripts/gpu/build_cuda.sh --features nccl,mpi   # data-parallel over NCCL (docs/distributed.md)
#
# Environment (all optional):
#   CUDA_VENV             venv that holds the CUDA wheels (default .cuda-venv in the repository, git-ignored);
#                         created and filled on first use.
#   CUDA_TOOLKIT_VERSION  version of PyPI's `cuda-toolkit` meta-package (default 13.0.2).
#                         Keep its major.minor at or below the CUDA version of the
#                         driver on the GPU machine (13.0, driver 580, on the H100/H200
#                         machines): PTX from a newer nvcc is refused by an older driver.
#   NCCL_WHEEL_VERSION    version of PyPI's `nvidia-nccl-cu13` (default 2.30.7, the NCCL that
#                         cudarc's bindings describe), installed only when an argument names
#                         the `nccl` feature.
#   CUDA_COMPUTE_CAP      GPU architecture to compile the kernels for (default 90 =
#                         Hopper, which cudaforge turns into sm_90a).
#   CARGO_TARGET_DIR      cargo's target dir (default target-cuda in the repository).
#   CARGO_BUILD_JOBS      rustc jobs (default 1: the build machine is shared).
#
# The binary lands in $CARGO_TARGET_DIR/release/beit-cli. See docs/gpu.md for
# carrying it to a GPU machine and running it there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CUDA_VENV="${CUDA_VENV:-$repo_root/.cuda-venv}"
CUDA_TOOLKIT_VERSION="${CUDA_TOOLKIT_VERSION:-13.0.2}"
cuda_major="${CUDA_TOOLKIT_VERSION%%.*}"
cuda_major_minor="$(echo "$CUDA_TOOLKIT_VERSION" | cut -d. -f1,2)"

# 1. The toolkit: nvcc (+ its crt headers and cicc/nvvm), the CUDA headers and
#    CCCL, and the shared libraries the binary links against (cudart from
#    candle-kernels; cublas, cublasLt, curand, nvrtc from cudarc).
if [ ! -x "$CUDA_VENV/bin/python" ]; then
    python3 -m venv "$CUDA_VENV"
fi
wheel_root="$("$CUDA_VENV/bin/python" - "$cuda_major" <<'EOF'
import pathlib, site, sys
for sp in site.getsitepackages():
    p = pathlib.Path(sp) / "nvidia" / f"cu{sys.argv[1]}"
    if (p / "bin" / "nvcc").exists():
        print(p)
        break
EOF
)"
if [ -z "$wheel_root" ] || ! "$wheel_root/bin/nvcc" --version | grep -q "release ${cuda_major_minor},"; then
    "$CUDA_VENV/bin/pip" install --quiet \
        "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==${CUDA_TOOLKIT_VERSION}"
    wheel_root="$("$CUDA_VENV/bin/python" -c "import pathlib, site; print(next(str(pathlib.Path(s) / 'nvidia' / 'cu${cuda_major}') for s in site.getsitepackages() if (pathlib.Path(s) / 'nvidia' / 'cu${cuda_major}' / 'bin' / 'nvcc').exists()))")"
fi
echo "CUDA wheels: $wheel_root ($("$wheel_root/bin/nvcc" --version | grep release))"

# 2. A CUDA root laid out like a system install. The wheels (CUDA 13 layout,
#    nvidia/cu13/{bin,include,lib,nvvm}) ship only versioned sonames
#    (libcublas.so.13), but the linker's `-lcublas` needs `libcublas.so`; and no
#    wheel ships the driver library libcuda.so, which cudarc (feature
#    `dynamic-linking`) links against.
cuda_root="$CUDA_VENV/cuda-root"
mkdir -p "$cuda_root/lib64/stubs"
for d in bin include nvvm; do
    ln -sfn "$wheel_root/$d" "$cuda_root/$d"
done
for lib in "$wheel_root"/lib/lib*.so.*; do
    name="$(basename "$lib")"
    ln -sfn "$lib" "$cuda_root/lib64/$name"
    ln -sfn "$lib" "$cuda_root/lib64/${name%%.so.*}.so"
done
# NCCL, when the features name it: cudarc (candle's `nccl` feature) links `-lnccl`; NVIDIA's
# nvidia-nccl-cu13 wheel ships libnccl.so.2 (in nvidia/nccl/lib, beside the CUDA wheels).
if [[ " $* " == *nccl* ]]; then
    NCCL_WHEEL_VERSION="${NCCL_WHEEL_VERSION:-2.30.7}"
    nccl_pkg="nvidia-nccl-cu${cuda_major}"
    if [ "$("$CUDA_VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$nccl_pkg'))" 2>/dev/null)" != "$NCCL_WHEEL_VERSION" ]; then
        "$CUDA_VENV/bin/pip" install --quiet "${nccl_pkg}==${NCCL_WHEEL_VERSION}"
    fi
    nccl_lib="$("$CUDA_VENV/bin/python" -c "import nvidia, pathlib; print(next(p for d in nvidia.__path__ for p in pathlib.Path(d, 'nccl', 'lib').glob('libnccl.so.*')))")"
    ln -sfn "$nccl_lib" "$cuda_root/lib64/libnccl.so.2"
    ln -sfn "$nccl_lib" "$cuda_root/lib64/libnccl.so"
    echo "NCCL: $nccl_lib ($NCCL_WHEEL_VERSION)"
fi
# Link-time stand-in for the driver: one empty function per `cu*` name that
# cuda.h declares (legacy `_v2` names included), soname libcuda.so.1 so that the
# binary asks for the real driver library at run time. It is never loaded: it
# sits in lib64/stubs, which only the linker searches.
stub="$cuda_root/lib64/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$wheel_root/include/cuda.h" -nt "$stub" ]; then
    gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$wheel_root/include" "$wheel_root/include/cuda.h" |
        grep -oP '\bcu[A-Z]\w*(?=\s*\()' | sort -u |
        sed 's/.*/void &(void) {}/' >"$cuda_root/lib64/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$cuda_root/lib64/stubs/libcuda_stub.c"
fi

# 3. Variables the build scripts read.
# nvcc on PATH: cudaforge (candle-kernels' build script) and cudarc's
# `cuda-version-from-build-system` both run `nvcc`; cudaforge takes the
# include dir from nvcc's location (<root>/bin/nvcc -> <root>/include).
export PATH="$cuda_root/bin:$PATH"
# cudarc's build script adds <root>/lib64 and <root>/lib64/stubs of CUDA_ROOT
# (also CUDA_HOME/CUDA_PATH) to the linker search path; candle-kernels' `-lcudart`
# is found there too.
export CUDA_ROOT="$cuda_root" CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root"
# No GPU here, so nvidia-smi cannot tell the architecture: name it.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# nvcc kernels compile one at a time (cudaforge otherwise uses every core).
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-1}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo_root/target-cuda}"

cd "$repo_root"
nice -n 19 cargo build --release --locked -p beit-cli --features cuda "$@"
echo "built: $CARGO_TARGET_DIR/release/beit-cli"
