#!/usr/bin/env bash
# Loader benchmark: decode + BEiT two-view augmentation, beit-data vs torchvision (ImageFolder +
# DataLoader, 2 workers) on the same folder of real JPEGs, run alternately; prints the ratio.
# Not a test. Usage: scripts/bench/bench_data.sh [FOLDER] [ROUNDS] [THREADS]
#   FOLDER defaults to /tmp/beit_bench_jpegs, made from the scikit-image wheel's photos if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
FOLDER=${1:-/tmp/beit_bench_jpegs}
ROUNDS=${2:-3}
THREADS=${3:-2}
if [ ! -d "$FOLDER" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --no-deps -q -d "$tmp" scikit-image==0.26.0
  (cd "$tmp" && unzip -q -o scikit_image-*.whl 'skimage/data/*')
  "$PY" scripts/bench/data_bench_folder.py "$tmp/skimage/data" "$FOLDER" 10 100
fi
# The dev profile already builds dependencies at opt-level 3; raise our crate to 3 as well (the
# release profile would give the same code but rebuild every dependency).
CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build -q -p beit-data --example bench_loader
BIN=${CARGO_TARGET_DIR:-target}/debug/examples/bench_loader
rust=(); torch=(); rcpu=(); tcpu=()
for r in $(seq 1 "$ROUNDS"); do
  ro=$("$BIN" "$FOLDER" "$THREADS" 2 64 | tee -a /dev/stderr)
  to=$("$PY" scripts/bench/data_bench_torchvision.py "$FOLDER" "$THREADS" 2 64 | tee -a /dev/stderr)
  rr=$(awk '/^rust_images_per_sec/ {print $2}' <<<"$ro"); tt=$(awk '/^torch_images_per_sec/ {print $2}' <<<"$to")
  rust+=("$rr"); torch+=("$tt")
  rcpu+=("$(awk '/^rust_cpu_ms_per_image/ {print $2}' <<<"$ro")"); tcpu+=("$(awk '/^torch_cpu_ms_per_image/ {print $2}' <<<"$to")")
  echo "round $r: beit-data $rr images/s, torchvision $tt images/s" >&2
done
"$PY" - "${rust[*]}" "${torch[*]}" "${rcpu[*]}" "${tcpu[*]}" <<'PYEOF'
import statistics, sys
rust, torch, rcpu, tcpu = ([float(x) for x in a.split()] for a in sys.argv[1:5])
r, t = statistics.median(rust), statistics.median(torch)
paired = statistics.median(a / b for a, b in zip(rust, torch))
print(f"beit-data    median {r:.1f} images/s  (runs: {rust})")
print(f"torchvision  median {t:.1f} images/s  (runs: {torch})")
print(f"ratio beit-data / torchvision: {paired:.2f}x median of per-round ratios, {r / t:.2f}x of medians (goal >= 1.5x)")
if rcpu and tcpu:
    rc, tc = statistics.median(rcpu), statistics.median(tcpu)
    print(f"CPU time per image: beit-data {rc:.2f} ms, torchvision {tc:.2f} ms (main process + workers): {tc / rc:.2f}x less CPU")
PYEOF
