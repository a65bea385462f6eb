#!/usr/bin/env python3
"""PyTorch's GEMM rate at the ViT-B/16 projection shapes, the peer of
`cargo run --release -p beit-kernels --example gemm_roof`.

    .venv/bin/python scripts/bench/gemm_peer.py [--threads 2]

For batch 8 x 197 tokens it times `x @ w.T` (forward), `g @ w` (input gradient) and `g.T @ x`
(weight gradient) for the qkv, proj, fc1 and fc2 shapes, median of 11 runs after 3 warm-ups, and
prints GFLOP/s as `gemm_roof` does.
"""
import argparse
import statistics
import time

import torch


def median_s(f):
    for _ in range(3):
        f()
    ts = []
    for _ in range(11):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    m = 8 * 197
    with torch.inference_mode():
        for k, n, what in [(768, 2304, "qkv"), (768, 768, "proj"), (768, 3072, "fc1"), (3072, 768, "fc2")]:
            x = torch.randn(m, k)
            w = torch.randn(n, k)
            g = torch.randn(m, n)
            flop = 2.0 * m * k * n / 1e9
            t_mm = median_s(lambda: x @ w.T)
            t_dx = median_s(lambda: g @ w)
            t_dw = median_s(lambda: g.T @ x)
            print(f"{what:5} {m}x{k}x{n}: torch mm {flop / t_mm:6.1f}, dx {flop / t_dx:6.1f}, "
                  f"dw {flop / t_dw:6.1f} GFLOP/s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
