"""Compare the per-step losses of two `metrics.jsonl` files (beit-rs and `scripts/peers/mim_peer.py`).

    python scripts/studies/compare_mim.py runs/mim-ours/metrics.jsonl runs/mim-peer/metrics.jsonl \
        [--every 10] [--tolerance 1e-5]

Prints the steps (every `--every`-th, the first and the worst), the largest relative difference
|a - b| / |b| over the common steps, and exits 1 when it exceeds `--tolerance`.
"""

import argparse
import json


def step_losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "step":
                out[int(r["step"])] = (float(r["loss"]), float(r.get("lr", "nan")))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("peer")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    args = ap.parse_args()
    a, b = step_losses(args.ours), step_losses(args.peer)
    steps = sorted(set(a) & set(b))
    rel = {s: abs(a[s][0] - b[s][0]) / max(abs(b[s][0]), 1e-12) for s in steps}
    worst = max(steps, key=rel.get)
    print("| step | lr | PyTorch loss | beit-rs loss | relative difference |")
    print("|---|---|---|---|---|")
    for s in steps:
        if s == 1 or s % args.every == 0 or s == worst:
            print(f"| {s} | {b[s][1]:.3e} | {b[s][0]:.6f} | {a[s][0]:.6f} | {rel[s]:.1e} |")
    print(f"\n{len(steps)} steps, max relative difference {rel[worst]:.2e} at step {worst}")
    raise SystemExit(0 if rel[worst] <= args.tolerance else 1)


if __name__ == "__main__":
    main()
