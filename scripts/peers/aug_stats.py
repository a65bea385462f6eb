#!/usr/bin/env python3
"""Compare the statistics of beit-rs's fine-tuning augmentation with timm's, on the same images.

The training transform is random, so the two programs cannot be compared image for image; this
draws it many times over the same source images in both and compares what a training run sees
on average: the mean image, the per-pixel spread, the brightness and contrast of the augmented
images, the share of background and of erased (noise) pixels. Differences larger than a few
standard errors point at an augmentation that is not the reference's.

beit-rs's side is `cargo run --release -p beit-recipes --example aug_dump`; timm's is the
transform of `scripts/peers/train_peer.py` (timm `create_transform` from the same TOML config).

Usage:

    .venv/bin/python scripts/peers/aug_stats.py --config configs/finetune_fashion_mnist.toml \\
        --images 200 --draws 50 [--bin target/release/examples/aug_dump] [--set KEY=VALUE ...]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_peer  # noqa: E402


def summaries(x):
    """Per-sample summaries of a (N, 3, H, W) batch of normalised images."""
    grid = (x + 1.0) * 127.5  # back to the 8-bit scale (mean = std = 0.5)
    off_grid = np.abs(grid - np.round(grid)) > 1e-3  # erased with noise
    background = np.abs(x + 1.0) < 1e-6  # exactly black
    return {
        "mean": x.mean(axis=(1, 2, 3)),
        "std": x.std(axis=(1, 2, 3)),
        "background share": background.mean(axis=(1, 2, 3)),
        "erased share": off_grid.mean(axis=(1, 2, 3)),
        "erased at all": off_grid.any(axis=(1, 2, 3)).astype(np.float64),
        "centre mean": x[:, :, 10:18, 10:18].mean(axis=(1, 2, 3)),
        "border mean": np.concatenate(
            [x[:, :, :3].reshape(len(x), -1), x[:, :, -3:].reshape(len(x), -1)], axis=1
        ).mean(axis=1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--bin", default="target/release/examples/aug_dump")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    cfg = train_peer.load_config(args.config, args.set)
    size = cfg["aug"]["input_size"]
    n, r = args.images, args.draws

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ours.f32")
        subprocess.run(
            [args.bin, args.config, str(n), str(r), out] + args.set, check=True
        )
        ours = np.fromfile(out, dtype="<f4").reshape(n * r, 3, size, size)

    torch.manual_seed(0)
    import random

    random.seed(0)
    train_tf, _ = train_peer.transforms(cfg["aug"])
    data = train_peer.fashion_mnist(cfg["data"]["source"] or "fashion-mnist")
    ds = train_peer.GreyAsRgb(*data["train"], train_tf)
    peer = np.stack([ds[i][0].numpy() for i in range(n) for _ in range(r)])

    so, sp = summaries(ours), summaries(peer)
    print(f"{n} images x {r} draws each, {args.config} {' '.join(args.set)}")
    print(f"{'statistic (mean over samples)':32} {'beit-rs':>10} {'timm':>10} {'diff / se':>10}")
    for k in so:
        a, b = so[k], sp[k]
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) + 1e-12
        print(f"{k:32} {a.mean():10.4f} {b.mean():10.4f} {(a.mean() - b.mean()) / se:10.2f}")
    # Per-pixel mean image: largest difference in units of its standard error.
    mo, mp = ours.mean(axis=0), peer.mean(axis=0)
    se = np.sqrt(ours.var(axis=0, ddof=1) / len(ours) + peer.var(axis=0, ddof=1) / len(peer))
    z = (mo - mp) / (se + 1e-12)
    print(f"mean image: max |diff| {np.abs(mo - mp).max():.4f}, "
          f"max |diff| / se {np.abs(z).max():.2f}, mean |diff| / se {np.abs(z).mean():.2f} "
          f"(about 0.8 when the two agree)")
    vo, vp = ours.std(axis=0), peer.std(axis=0)
    print(f"per-pixel std: mean beit-rs {vo.mean():.4f}, timm {vp.mean():.4f}")


if __name__ == "__main__":
    main()
