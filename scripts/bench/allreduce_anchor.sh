#!/usr/bin/env bash
# Gradient all-reduce against MPI's own: the engine's `all_reduce_grads` (the `allreduce_bench`
# example) and a plain in-place `MPI_Allreduce` of the same number of f32 (a C program built here
# with `mpicc`), run alternately on NP ranks, ROUNDS rounds of five repetitions each. Not a test.
# Usage: scripts/bench/allreduce_anchor.sh [MILLIONS] [ROUNDS] [NP]
set -euo pipefail
cd "$(dirname "$0")/../.."
MILLIONS=${1:-86}
ROUNDS=${2:-3}
NP=${3:-2}
cargo build -q --release -p beit-train --features mpi --example allreduce_bench
BENCH=${CARGO_TARGET_DIR:-target}/release/examples/allreduce_bench
ANCHOR=${CARGO_TARGET_DIR:-target}/allreduce_anchor
cat > "$ANCHOR.c" <<'C'
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  size_t n = (size_t)(atof(argv[1]) * 1e6);
  float *buf = calloc(n, sizeof(float));
  for (int rep = 0; rep < 5; rep++) {
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    double dt = MPI_Wtime() - t0;
    if (rank == 0)
      printf("rep %d: %d ranks, %.1f M f32 (%.0f MB): %.3f s (MPI in place)\n", rep, size,
             n / 1e6, n * 4 / 1e6, dt);
  }
  free(buf);
  MPI_Finalize();
  return 0;
}
C
mpicc -O2 -o "$ANCHOR" "$ANCHOR.c"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  mpirun -n "$NP" "$ANCHOR" "$MILLIONS"
  mpirun -n "$NP" "$BENCH" "$MILLIONS"
done
