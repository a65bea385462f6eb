#!/usr/bin/env bash
# Check the NCCL gradient all-reduce on a GPU machine (docs/distributed.md).
#
# Usage: scripts/gpu/gpu_nccl_check.sh [BEIT_CLI]
#   BEIT_CLI  a beit-cli built with `scripts/gpu/build_cuda.sh --features nccl,mpi`
#             (default target-cuda/release/beit-cli).
# Needs: an NVIDIA GPU, OpenMPI's `mpirun` (and the libmpi the binary was built against),
# python3, and the CUDA 13 + NCCL libraries (taken from PyTorch's `nvidia` wheels when present).
#
# Fine-tunes a tiny classifier from scratch on the embedded Fashion-MNIST images for 6 optimizer
# steps on cuda:0, three ways, and compares the per-step losses:
#   single  one process, no launcher: no all-reduce at all (the reference);
#   host    `mpirun -n 1`, gradients forced through the all-reduce (BEIT_DIST_FORCE_REDUCE=1)
#           over MPI on the host (BEIT_DIST_BACKEND=mpi);
#   nccl    `mpirun -n 1`, forced all-reduce through NCCL on the GPU (the log must show the NCCL
#           communicator).
# With 2 or more GPUs it also runs `mpirun -n N` (N = 2, 4 or 8 GPUs) through NCCL, one GPU per
# process, against the same reference. Fails when any loss differs from the reference by more
# than 1e-5 relative. Run directories and logs go to $OUT (when set) or a temporary directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="${1:-$repo_root/target-cuda/release/beit-cli}"
work="${OUT:-$(mktemp -d)}/nccl-check"
mkdir -p "$work"

[ -x "$bin" ] || { echo "error: $bin: not an executable (build it with scripts/gpu/build_cuda.sh --features nccl,mpi)" >&2; exit 2; }
command -v mpirun >/dev/null || { echo "error: mpirun not found: install OpenMPI (the binary is built against it)" >&2; exit 2; }

# The CUDA 13 and NCCL libraries of PyTorch's wheels (nvidia/cu13/lib, nvidia/nccl/lib).
if python3 -c 'import nvidia' 2>/dev/null; then
    wheel_libs="$(python3 -c 'import nvidia, glob, os; print(":".join(d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(p, "*", "lib")))))')"
    export LD_LIBRARY_PATH="$wheel_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "== libraries"
ldd "$bin" | grep -E 'nccl|cuda|cublas|curand|mpi|not found' || true
if ldd "$bin" | grep -q 'not found'; then
    echo "error: $bin: libraries not found (above); point LD_LIBRARY_PATH at them" >&2
    exit 2
fi
nvidia-smi -L || true
ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"

cat >"$work/ft.toml" <<'EOF'
device = "cuda"
[data]
source = "fashion-mnist"
max_train_samples = 48
max_val_samples = 32
num_workers = 1
[architecture]
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 128
patch_size = 7
[train]
epochs = 2
batch_size = 16
accum_steps = 2
lr = 3e-3
warmup_epochs = 1
drop_path_rate = 0.0
clip_grad = 1.0
seed = 3
log_every = 1
[aug]
input_size = 28
mixup = 0.0
cutmix = 0.0
reprob = 0.0
eval_resize = "squash"
EOF

export HF_HUB_OFFLINE=1 BEIT_LOG=info BEIT_DIST_TIMEOUT_S=300 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
runs=(single host nccl)

# run NAME [launcher...]: fine-tune into $work/NAME, log in $work/NAME.log.
run() {
    local name="$1"
    shift
    rm -rf "${work:?}/$name"
    echo "== $name: $* beit-cli finetune"
    if ! "$@" "$bin" finetune --config "$work/ft.toml" --output "$work/$name" >"$work/$name.log" 2>&1; then
        tail -n 30 "$work/$name.log" >&2
        echo "error: run $name failed (log: $work/$name.log)" >&2
        exit 1
    fi
}

run single env
run host env BEIT_DIST_BACKEND=mpi BEIT_DIST_FORCE_REDUCE=1 mpirun -n 1 --bind-to none
run nccl env BEIT_DIST_BACKEND=nccl BEIT_DIST_FORCE_REDUCE=1 mpirun -n 1 --bind-to none
if ! grep -q 'NCCL communicator: rank 0 of 1' "$work/nccl.log"; then
    tail -n 30 "$work/nccl.log" >&2
    echo "error: the nccl run did not create an NCCL communicator (log: $work/nccl.log)" >&2
    exit 1
fi
grep 'NCCL communicator' "$work/nccl.log"
for n in 8 4 2; do
    if [ "$ngpu" -ge "$n" ]; then
        run "nccl$n" env BEIT_DIST_BACKEND=nccl mpirun -n "$n" --bind-to none
        runs+=("nccl$n")
        break
    fi
done

python3 - "$work" "${runs[@]}" <<'EOF'
import json, sys
work, names = sys.argv[1], sys.argv[2:]
def losses(name):
    with open(f"{work}/{name}/metrics.jsonl") as f:
        recs = [json.loads(l) for l in f if l.strip()]
    return [r["loss"] for r in recs if r.get("kind") == "step"]
ref = losses(names[0])
print("step " + " ".join(f"{n:>14}" for n in names))
table = {n: losses(n) for n in names}
for i, x in enumerate(ref):
    print(f"{i + 1:>4} " + " ".join(f"{table[n][i]:>14.8f}" if i < len(table[n]) else f"{'-':>14}" for n in names))
bad = []
for n in names[1:]:
    got = table[n]
    if len(got) != len(ref) or not ref:
        bad.append(f"{n}: {len(got)} steps logged, the reference {len(ref)}")
        continue
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, got))
    print(f"{n} vs {names[0]}: largest relative difference {worst:.3e}")
    if worst > 1e-5:
        bad.append(f"{n}: relative difference {worst:.3e} > 1e-5")
if bad:
    sys.exit("FAIL: " + "; ".join(bad))
print("OK: every run's per-step losses are within 1e-5 (relative) of one process's")
EOF
