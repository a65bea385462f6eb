#!/usr/bin/env bash
# Shard benchmark: decode + BEiT two-view augmentation from tar shards, beit-data's streaming
# loader vs webdataset + torchvision (DataLoader, same workers), on the same shards, run
# alternately; prints images/s of each. Not a test.
# Usage: scripts/bench/bench_shards.sh FOLDER [ROUNDS] [THREADS] [SHARD_SIZE]
#   FOLDER is an ImageFolder of real JPEGs (scripts/bench/bench_data.sh makes one); it is packed once
#   into FOLDER.shards/ with `beit-cli data pack`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
FOLDER=${1:?usage: scripts/bench/bench_shards.sh FOLDER [ROUNDS] [THREADS] [SHARD_SIZE]}
ROUNDS=${2:-3}
THREADS=${3:-2}
SHARD_SIZE=${4:-64MB}
OUT="${FOLDER%/}.shards"
CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build -q -p beit-cli -p beit-data --example bench_loader
BIN_DIR=${CARGO_TARGET_DIR:-target}/debug
if [ ! -d "$OUT" ]; then
  "$BIN_DIR/beit-cli" data pack --data "$FOLDER" --out "$OUT" --shard-size "$SHARD_SIZE"
fi
"$BIN_DIR/beit-cli" data inspect --data "$OUT"
last=$(ls "$OUT/train" | grep -c '\.tar$')
PATTERN="$OUT/train/shard-{000000..$(printf %06d $((last - 1)))}.tar"
for r in $(seq 1 "$ROUNDS"); do
  ro=$("$BIN_DIR/examples/bench_loader" "$PATTERN" "$THREADS" 2 64 | tee -a /dev/stderr)
  wo=$("$PY" scripts/bench/data_bench_webdataset.py "$PATTERN" "$THREADS" 2 64 | tee -a /dev/stderr)
  echo "round $r: beit-data $(awk '/^rust_images_per_sec/ {print $2}' <<<"$ro") images/s," \
    "webdataset $(awk '/^wds_images_per_sec/ {print $2}' <<<"$wo") images/s" >&2
done
