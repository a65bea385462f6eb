#!/usr/bin/env bash
# Check a CUDA build of beit-cli on a GPU machine in one command (docs/gpu.md, "Checking a GPU").
#
# Usage: scripts/gpu/gpu_check.sh --bin BEIT_CLI --out DIR [--device cuda[:N]|cpu] [--tiny]
#                             [--fixtures DIR] [--python PYTHON]
#   --bin       beit-cli built with `scripts/gpu/build_cuda.sh` (--features nccl,mpi for part 4)
#   --out       output folder: results.jsonl (every result, one JSON line each), one log per run
#   --device    the device under test (default cuda)
#   --tiny      tiny models instead of ViT-B/16, no PyTorch peer, no NCCL: the mode CI runs on a
#               CPU so that the script cannot rot
#   --fixtures  the repository's fixtures folder (default: the repository's fixtures/)
#   --python    the Python with torch and transformers for the peer (default python3)
# Needs: bash, awk, grep; on a GPU also nvidia-smi, and for the peer PyTorch + transformers.
# No Rust toolchain and no network.
#
# Parts (each appends JSON lines to DIR/results.jsonl; "pass" is false where a check failed):
#   1. verify  `beit-cli verify` on every parity fixture (fixtures/model, fixtures/family) on the
#      device in f32 (max abs error <= 1e-4 against the committed transformers/timm outputs) and
#      in bf16 (the top five outputs of every row equal; the max abs error reported).
#   2. train   a few steps of fine-tuning and of MIM pre-training (a tiny model, f32) on the device
#      and on the CPU; every step loss within 1e-4 relative. With --device cpu the "device" side
#      runs candle's plain ops (BEIT_FUSED_OPS=0), the code path CUDA takes.
#   3. bench   `beit-cli bench` in infer, train-cls and train-mim at batch 64 and 128, f32 and bf16,
#      alternating with scripts/bench/bench_peer.py (eager and torch.compile, `--amp bf16` for bf16):
#      images/s, the ratio beit-rs / PyTorch, peak GPU memory (nvidia-smi, sampled every 0.1 s).
#   4. nccl    scripts/gpu/gpu_nccl_check.sh (needs mpirun and a beit-cli built with nccl,mpi).
# Exits 1 when any check failed, 0 otherwise.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bin="" out="" device="cuda" tiny=0 fixtures="$repo_root/fixtures" python="python3"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --tiny) tiny=1; shift ;;
        --fixtures) fixtures="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$bin" ] && [ -x "$bin" ] || { echo "error: --bin: not an executable: '$bin'" >&2; exit 2; }
[ -n "$out" ] || { echo "error: --out DIR is required" >&2; exit 2; }
mkdir -p "$out" || exit 2
results="$out/results.jsonl"
: > "$results"
export HF_HUB_OFFLINE=1 BEIT_LOG=info

record() { echo "$1" >> "$results"; echo "$1"; }
is_gpu() { [ "$device" != cpu ]; }

# --- 1. the parity fixtures --------------------------------------------------------------------
part_verify() {
    local dtype rc
    for dtype in f32 bf16; do
        "$bin" verify --fixtures "$fixtures/model" --fixtures "$fixtures/family" --device "$device" \
            --dtype "$dtype" > "$out/verify_$dtype.jsonl" 2> "$out/verify_$dtype.log"
        rc=$?
        while read -r line; do record "$line"; done < <(grep '^{' "$out/verify_$dtype.jsonl")
        # A failed fixture fails the command too; any other error leaves a line of its own.
        if [ $rc -ne 0 ] && ! grep -q '"pass":false' "$out/verify_$dtype.jsonl"; then
            record "{\"kind\":\"verify\",\"dtype\":\"$dtype\",\"pass\":false,\"error\":\"beit-cli verify failed: see verify_$dtype.log\"}"
        fi
    done
}

# --- 2. a few training steps on the device and on the CPU --------------------------------------
write_configs() {
    cat > "$out/tok.toml" <<'EOF'
[architecture]
image_size = 28
channels = 3
vocab_size = 16
downsample = 4
n_hid = 8
n_init = 8
n_blk_per_group = 1
[data]
max_train_samples = 16
[train]
epochs = 1
batch_size = 8
warmup_steps = 1
log_every = 1
EOF
    cat > "$out/finetune.toml" <<'EOF'
[data]
source = "fashion-mnist"
max_train_samples = 32
max_val_samples = 8
num_workers = 1
[architecture]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
patch_size = 7
[train]
epochs = 1
batch_size = 8
lr = 2e-3
warmup_steps = 1
warmup_epochs = 0
drop_path_rate = 0.1
clip_grad = 5.0
seed = 5
log_every = 1
precision = "f32"
[aug]
input_size = 28
auto_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.8
cutmix = 1.0
eval_resize = "squash"
EOF
    cat > "$out/pretrain.toml" <<'EOF'
[architecture]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
image_size = 28
patch_size = 4
[data]
max_train_samples = 32
num_workers = 1
[masking]
num_masking_patches = 12
[train]
drop_path_rate = 0.1
epochs = 1
batch_size = 8
lr = 3e-3
warmup_epochs = 0
log_every = 1
precision = "f32"
EOF
}

# The step losses of a run directory, one per line.
step_losses() {
    grep '"kind":"step"' "$1/metrics.jsonl" | grep -o '"loss":[-0-9.eE+]*' | cut -d: -f2
}

# compare NAME DEVICE_RUN CPU_RUN: one JSON line per step, and a summary line.
compare_losses() {
    local name="$1" a="$2" b="$3" lines
    lines=$(paste -d' ' <(step_losses "$a") <(step_losses "$b") | awk -v n="$name" -v d="$device" '
        { rel = ($1 - $2) / ($2 == 0 ? 1 : $2); if (rel < 0) rel = -rel; ok = (rel <= 1e-4) ? "true" : "false"
          if (rel > worst) worst = rel; bad += (ok == "false"); steps++
          printf "{\"kind\":\"train_parity\",\"recipe\":\"%s\",\"device\":\"%s\",\"step\":%d,\"device_loss\":%s,\"cpu_loss\":%s,\"rel_diff\":%.3e,\"pass\":%s}\n", n, d, NR, $1, $2, rel, ok }
        END { printf "{\"kind\":\"train_parity_summary\",\"recipe\":\"%s\",\"device\":\"%s\",\"steps\":%d,\"max_rel_diff\":%.3e,\"pass\":%s}\n", n, d, steps, worst, (bad == 0 && steps > 0) ? "true" : "false" }')
    while read -r line; do record "$line"; done <<< "$lines"
}

# run_pair NAME CMD...: the command on the device and on the CPU (--output appended).
run_pair() {
    local name="$1"; shift
    local dev_run="$out/train/$name-device" cpu_run="$out/train/$name-cpu"
    rm -rf "$dev_run" "$cpu_run"
    BEIT_FUSED_OPS=0 "$bin" "$@" --set "device=\"$device\"" --output "$dev_run" \
        > "$out/train/$name-device.log" 2>&1 || { record "{\"kind\":\"train_parity_summary\",\"recipe\":\"$name\",\"pass\":false,\"error\":\"the $device run failed: see train/$name-device.log\"}"; return; }
    "$bin" "$@" --set 'device="cpu"' --output "$cpu_run" \
        > "$out/train/$name-cpu.log" 2>&1 || { record "{\"kind\":\"train_parity_summary\",\"recipe\":\"$name\",\"pass\":false,\"error\":\"the cpu run failed: see train/$name-cpu.log\"}"; return; }
    compare_losses "$name" "$dev_run" "$cpu_run"
}

part_train() {
    mkdir -p "$out/train"
    write_configs
    rm -rf "$out/train/tokenizer"
    "$bin" tokenizer train --quiet --config "$out/tok.toml" --data fashion-mnist --steps 2 \
        --output "$out/train/tokenizer" > "$out/train/tokenizer.log" 2>&1 || {
        record '{"kind":"train_parity_summary","recipe":"tokenizer","pass":false,"error":"tokenizer train failed: see train/tokenizer.log"}'
    }
    run_pair finetune finetune --quiet --config "$out/finetune.toml"
    run_pair pretrain pretrain --quiet --config "$out/pretrain.toml" --data fashion-mnist \
        --tokenizer "$out/train/tokenizer"
}

# --- 3. throughput against PyTorch -------------------------------------------------------------
# Peak GPU memory (MiB) of the command: nvidia-smi sampled every 0.1 s while it runs.
with_peak_memory() {
    local log="$1"; shift
    if ! is_gpu || ! command -v nvidia-smi > /dev/null; then
        "$@" > "$log" 2>&1; local rc=$?; echo null; return $rc
    fi
    local idx="${device#cuda}"; idx="${idx#:}"; idx="${idx:-0}"
    nvidia-smi --id="$idx" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
        > "$log.mem" 2> /dev/null &
    local sampler=$!
    "$@" > "$log" 2>&1; local rc=$?
    kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null
    sort -n "$log.mem" | tail -1 | tr -d ' ' | grep . || echo null
    return $rc
}

images_per_s() { grep -o '"images_per_s":[-0-9.eE+]*' "$1" | tail -1 | cut -d: -f2; }

# bench_one IMPL MODE BATCH DTYPE: records one bench line with peak memory (shown on stderr);
# prints images/s (nothing when the run failed).
bench_one() {
    local impl="$1" mode="$2" batch="$3" dtype="$4" log mem rc ips
    log="$out/bench/$impl-$mode-$batch-$dtype.log"
    local peer_amp=none; [ "$dtype" = bf16 ] && peer_amp=bf16
    case "$impl" in
        beit-rs) mem=$(with_peak_memory "$log" "$bin" bench --mode "$mode" --model "$bench_model" \
                     --image-size "$size" --batch "$batch" --dtype "$dtype" --device "$device" \
                     --iters "$iters" --warmup "$warmup" --num-masked "$masked" --json); rc=$? ;;
        pytorch) mem=$(with_peak_memory "$log" "$python" "$repo_root/scripts/bench/bench_peer.py" \
                     --mode "$mode" --config "$out/bench/config-$mode.json" --image-size "$size" \
                     --batch "$batch" --amp "$peer_amp" --device "$device" --iters "$iters" \
                     --warmup "$warmup" --num-masked "$masked" --json); rc=$? ;;
        pytorch-compile) mem=$(with_peak_memory "$log" "$python" "$repo_root/scripts/bench/bench_peer.py" \
                     --mode "$mode" --config "$out/bench/config-$mode.json" --image-size "$size" \
                     --batch "$batch" --amp "$peer_amp" --device "$device" --iters "$iters" \
                     --warmup "$((warmup + 2))" --num-masked "$masked" --compile --json); rc=$? ;;
    esac
    ips=$(images_per_s "$log")
    if [ $rc -ne 0 ] || [ -z "$ips" ]; then
        record "{\"kind\":\"bench\",\"impl\":\"$impl\",\"mode\":\"$mode\",\"batch\":$batch,\"dtype\":\"$dtype\",\"device\":\"$device\",\"pass\":false,\"error\":\"failed: see bench/$(basename "$log")\"}" >&2
        return
    fi
    record "{\"kind\":\"bench\",\"impl\":\"$impl\",\"mode\":\"$mode\",\"batch\":$batch,\"dtype\":\"$dtype\",\"device\":\"$device\",\"images_per_s\":$ips,\"peak_mem_mib\":$mem,\"pass\":true}" >&2
    echo "$ips"
}

part_bench() {
    mkdir -p "$out/bench"
    local modes=(infer train-cls train-mim) batches=(64 128) impls=(beit-rs pytorch pytorch-compile)
    if [ $tiny -eq 1 ]; then
        bench_model="$fixtures/model/cls_per_layer/config.json" size=32 iters=2 warmup=1 masked=6
        batches=(4) impls=(beit-rs)
    else
        bench_model=base size=224 iters=10 warmup=3 masked=75
    fi
    local mode batch dtype impl
    for mode in "${modes[@]}"; do
        "$bin" bench --mode "$mode" --model "$bench_model" --image-size "$size" --iters 1 \
            --warmup 0 --batch 1 --dump-config "$out/bench/config-$mode.json" > /dev/null 2>&1
        for batch in "${batches[@]}"; do
            for dtype in f32 bf16; do
                local -A ips=()
                # Alternate the order between configurations, so neither side always runs first.
                local order=("${impls[@]}")
                [ $(( (batch / 64 + ${#dtype}) % 2 )) -eq 1 ] && order=($(printf '%s\n' "${impls[@]}" | tac))
                for impl in "${order[@]}"; do
                    ips[$impl]=$(bench_one "$impl" "$mode" "$batch" "$dtype" 2>> "$results.bench")
                done
                summarize_bench "$mode" "$batch" "$dtype" "${ips[beit-rs]:-}" "${ips[pytorch]:-}" "${ips[pytorch-compile]:-}"
            done
        done
    done
}

# One line per configuration: images/s of each side and the ratios beit-rs / PyTorch.
summarize_bench() {
    local mode="$1" batch="$2" dtype="$3" ours="$4" eager="$5" compiled="$6"
    [ -f "$results.bench" ] && { cat "$results.bench"; rm -f "$results.bench"; }
    awk -v m="$mode" -v b="$batch" -v t="$dtype" -v d="$device" -v o="$ours" -v e="$eager" -v c="$compiled" 'BEGIN {
        r = (o != "" && e != "") ? sprintf("%.3f", o / e) : "null"
        rc = (o != "" && c != "") ? sprintf("%.3f", o / c) : "null"
        printf "{\"kind\":\"bench_ratio\",\"mode\":\"%s\",\"batch\":%d,\"dtype\":\"%s\",\"device\":\"%s\",\"beit_rs_images_per_s\":%s,\"pytorch_images_per_s\":%s,\"pytorch_compile_images_per_s\":%s,\"ratio_vs_pytorch\":%s,\"ratio_vs_compile\":%s,\"pass\":%s}\n",
            m, b, t, d, (o == "" ? "null" : o), (e == "" ? "null" : e), (c == "" ? "null" : c), r, rc, (o == "" ? "false" : "true") }' \
        | while read -r line; do record "$line"; done
}

# --- 4. NCCL -----------------------------------------------------------------------------------
part_nccl() {
    if OUT="$out" "$repo_root/scripts/gpu/gpu_nccl_check.sh" "$bin" > "$out/nccl.log" 2>&1; then
        record '{"kind":"nccl","pass":true,"log":"nccl.log"}'
    else
        record '{"kind":"nccl","pass":false,"log":"nccl.log"}'
    fi
}

part_verify
part_train
part_bench
[ $tiny -eq 1 ] || part_nccl
# Every failed check, and every command that failed, left a line with "pass":false.
failures=$(grep -c '"pass":false' "$results")
record "{\"kind\":\"gpu_check\",\"device\":\"$device\",\"tiny\":$([ $tiny -eq 1 ] && echo true || echo false),\"failures\":$failures,\"pass\":$([ $failures -eq 0 ] && echo true || echo false)}"
[ $failures -eq 0 ]
