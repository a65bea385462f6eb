#!/usr/bin/env python3
"""Reference fixtures for beit-mim: masking statistics and MIM loss values (fixtures/mim/).

The BEiT authors' generator (microsoft/unilm, beit/masking_generator.py) is restated below from its
description of unilm's masking_generator.py, in plain Python with the standard `random` module, exactly as
the original draws its numbers: `random.uniform` for the block area and the log aspect ratio,
`round` (banker's rounding) for the block sides, `random.randint` (inclusive) for the corner.

For each configuration the script draws many masks and writes summary statistics (means and
standard deviations of per-mask quantities, plus the per-cell masking frequency). The Rust tests in
crates/beit-mim/tests/masking_stats.rs draw as many masks from the Rust generator and compare each
statistic with a two-sample z-test, so CI needs no Python.

fixtures/mim/exact_masks.json holds masks drawn from known `random.Random(seed)` streams: the Rust
generator fed the same Mersenne-Twister words must reproduce them exactly.

It also writes fixtures/mim/loss_reference.json: a tiny batch (features, mask, visual-token ids,
images, head weights) with the losses and feature gradients PyTorch computes for the three Table 4
targets, the way `transformers`' BeitForMaskedImageModeling scores MIM (cross-entropy of
`logits[bool_masked_pos]`), so the Rust loss code is checked against torch, gradients included.

Usage: .venv/bin/python scripts/mim_fixtures.py [--draws 200000] [--only masking|loss|exact]
"""

import argparse
import json
import math
import os
import random
import statistics
import sys


def draw_blockwise(height, width, target, min_block, max_block, log_aspect, rng):
    """One mask as a list of rows of 0/1, following the reference algorithm step by step."""
    grid = [[0] * width for _ in range(height)]
    count = 0
    while count < target:
        budget = min(target - count, max_block)
        added = 0
        for _attempt in range(10):
            # uniform(a, b) = a + (b - a) * random(); also fine when budget < min_block.
            area = rng.uniform(min_block, budget)
            ratio = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if bh < height and bw < width:
                top = rng.randint(0, height - bh)
                left = rng.randint(0, width - bw)
                already = sum(grid[r][c] for r in range(top, top + bh) for c in range(left, left + bw))
                fresh = bh * bw - already
                if 0 < fresh <= budget:
                    for r in range(top, top + bh):
                        for c in range(left, left + bw):
                            if grid[r][c] == 0:
                                grid[r][c] = 1
                                added += 1
            # Only an attempt that changed something ends the retry loop.
            if added > 0:
                break
        if added == 0:
            break  # ten failed attempts: give up below the target
        count += added
    return grid


def components(grid):
    """Number of 4-connected groups of masked cells."""
    height, width = len(grid), len(grid[0])
    seen = [[False] * width for _ in range(height)]
    n = 0
    for r0 in range(height):
        for c0 in range(width):
            if grid[r0][c0] and not seen[r0][c0]:
                n += 1
                stack = [(r0, c0)]
                seen[r0][c0] = True
                while stack:
                    r, c = stack.pop()
                    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < height and 0 <= cc < width and grid[rr][cc] and not seen[rr][cc]:
                            seen[rr][cc] = True
                            stack.append((rr, cc))
    return n


def summarise(values):
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def run_config(cfg, draws, seed):
    height, width = cfg["input_size"]
    target = cfg["num_masking_patches"]
    min_block = cfg["min_num_patches"]
    max_block = cfg["max_num_patches"] if cfg["max_num_patches"] is not None else target
    min_aspect = cfg["min_aspect"]
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    rng = random.Random(seed)

    border = [(r, c) for r in range(height) for c in range(width) if r in (0, height - 1) or c in (0, width - 1)]
    inner = [(r, c) for r in range(1, height - 1) for c in range(1, width - 1)]
    counts, exact, comps, border_frac, inner_frac = [], [], [], [], []
    cell_hits = [0] * (height * width)
    for _ in range(draws):
        grid = draw_blockwise(height, width, target, min_block, max_block, log_aspect, rng)
        n = sum(map(sum, grid))
        counts.append(n)
        exact.append(1.0 if n == target else 0.0)
        comps.append(components(grid))
        border_frac.append(sum(grid[r][c] for r, c in border) / len(border))
        inner_frac.append(sum(grid[r][c] for r, c in inner) / len(inner))
        for r in range(height):
            for c in range(width):
                cell_hits[r * width + c] += grid[r][c]
    return {
        "config": cfg,
        "draws": draws,
        "count": summarise(counts),
        "count_min": min(counts),
        "count_max": max(counts),
        "exact_share": summarise(exact),
        "components": summarise(comps),
        "border_fraction": summarise(border_frac),
        "inner_fraction": summarise(inner_frac),
        "cell_frequency": [round(h / draws, 6) for h in cell_hits],
    }


CONFIGS = [
    # BEiT pre-training at 224 px / patch 16: 75 of 196 patches, blocks of at least 16.
    {"name": "beit-224", "input_size": [14, 14], "num_masking_patches": 75, "min_num_patches": 16,
     "max_num_patches": None, "min_aspect": 0.3},
    # Small images (28 px, patch 4) as in the Fashion-MNIST demo: 20 of 49, blocks of at least 4.
    {"name": "tiny-7x7", "input_size": [7, 7], "num_masking_patches": 20, "min_num_patches": 4,
     "max_num_patches": None, "min_aspect": 0.3},
    # 384 px / patch 16: 230 of 576 (40%).
    {"name": "beit-384", "input_size": [24, 24], "num_masking_patches": 230, "min_num_patches": 16,
     "max_num_patches": None, "min_aspect": 0.3},
    # A capped block size and a narrower aspect range, to exercise the optional parameters.
    {"name": "capped-14x14", "input_size": [14, 14], "num_masking_patches": 75, "min_num_patches": 16,
     "max_num_patches": 30, "min_aspect": 0.5},
]


def loss_reference(path):
    """Losses and gradients of the three MIM targets on a small random batch, computed by torch."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    b, grid, c, vocab, patch = 2, 3, 6, 10, 2
    n = grid * grid
    features = torch.randn(b, n, c, dtype=torch.float64)
    lm_w = torch.randn(vocab, c, dtype=torch.float64) * 0.5
    lm_b = torch.randn(vocab, dtype=torch.float64) * 0.1
    px_w = torch.randn(patch * patch * 3, c, dtype=torch.float64) * 0.3
    px_b = torch.randn(patch * patch * 3, dtype=torch.float64) * 0.1
    pixels = torch.randn(b, 3, grid * patch, grid * patch, dtype=torch.float64)
    ids = torch.randint(0, vocab, (b, n))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, [0, 1, 4, 7]] = True
    mask[1, [2, 3, 8]] = True

    def run(target):
        x = features.clone().requires_grad_(True)
        if target == "visual-tokens":
            logits = x @ lm_w.T + lm_b
            loss = F.cross_entropy(logits[mask], ids[mask])
        elif target == "all-tokens":
            logits = x @ lm_w.T + lm_b
            loss = F.cross_entropy(logits.reshape(b * n, vocab), ids.reshape(-1))
        else:
            # Patches flattened as (row, column, channel), each normalised (unbiased var, eps 1e-6).
            p = pixels.reshape(b, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1)
            p = p.reshape(b, n, patch * patch * 3)
            p = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = x @ px_w.T + px_b
            loss = F.mse_loss(pred[mask], p[mask])
        loss.backward()
        out = {"loss": loss.item(), "features_grad": x.grad.reshape(-1).tolist()}
        if target != "pixel-regression":
            logits = (features @ lm_w.T + lm_b)[mask]
            out["mlm_acc"] = (logits.argmax(-1) == ids[mask]).double().mean().item()
        return out

    doc = {
        "generator": "scripts/mim_fixtures.py (torch %s, float64)" % torch.__version__,
        "batch": b, "grid": grid, "hidden": c, "vocab": vocab, "patch": patch,
        "features": features.reshape(-1).tolist(),
        "mask": mask.to(torch.uint8).reshape(-1).tolist(),
        "token_ids": ids.reshape(-1).tolist(),
        "pixels": pixels.reshape(-1).tolist(),
        "lm_head": {"weight": lm_w.reshape(-1).tolist(), "bias": lm_b.tolist()},
        "pixel_head": {"weight": px_w.reshape(-1).tolist(), "bias": px_b.tolist()},
        "targets": {t: run(t) for t in ("visual-tokens", "all-tokens", "pixel-regression")},
    }
    with open(path, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    for t, r in doc["targets"].items():
        print(f"{t}: loss {r['loss']:.6f}", file=sys.stderr)


def exact_masks(path, seed, count):
    """Masks drawn from known Python `random` streams, for the bit-exact test of the Rust generator
    driven by a Mersenne Twister (crates/beit-mim/tests/python_stream.rs)."""
    check = random.Random(seed)
    doc = {
        "generator": "scripts/mim_fixtures.py, Python %s random.Random(seed + config index)" % sys.version.split()[0],
        "seed": seed,
        "first_words": [check.getrandbits(32) for _ in range(4)],
        # random() as the exact 53-bit integer (JSON floats may not round-trip).
        "first_random_bits": int(random.Random(seed).random() * 2**53),
        "configs": [],
    }
    for i, cfg in enumerate(CONFIGS):
        height, width = cfg["input_size"]
        target = cfg["num_masking_patches"]
        max_block = cfg["max_num_patches"] if cfg["max_num_patches"] is not None else target
        log_aspect = (math.log(cfg["min_aspect"]), math.log(1.0 / cfg["min_aspect"]))
        rng = random.Random(seed + i)
        n = count if height * width <= 196 else count // 4
        masks = []
        for _ in range(n):
            grid = draw_blockwise(height, width, target, cfg["min_num_patches"], max_block, log_aspect, rng)
            masks.append("".join(str(v) for row in grid for v in row))
        doc["configs"].append({"config": cfg, "seed": seed + i, "masks": masks})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200000)
    parser.add_argument("--seed", type=int, default=20211)
    parser.add_argument("--out-dir", default=os.path.join(here, "..", "fixtures", "mim"))
    parser.add_argument("--only", choices=["masking", "loss", "exact"])
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.only in (None, "exact"):
        exact_masks(os.path.join(args.out_dir, "exact_masks.json"), 12345, 200)
    if args.only in (None, "loss"):
        loss_reference(os.path.join(args.out_dir, "loss_reference.json"))
    if args.only not in (None, "masking"):
        return

    results = []
    for i, cfg in enumerate(CONFIGS):
        res = run_config(cfg, args.draws, args.seed + i)
        results.append(res)
        print(
            f"{cfg['name']}: count {res['count']['mean']:.3f}±{res['count']['std']:.3f} "
            f"[{res['count_min']}, {res['count_max']}], exact {res['exact_share']['mean']:.4f}, "
            f"components {res['components']['mean']:.3f}, border {res['border_fraction']['mean']:.4f}, "
            f"inner {res['inner_fraction']['mean']:.4f}",
            file=sys.stderr,
        )
    doc = {
        "generator": "Python restatement of unilm beit/masking_generator.py (scripts/mim_fixtures.py)",
        "python": sys.version.split()[0],
        "seed": args.seed,
        "results": results,
    }
    with open(os.path.join(args.out_dir, "masking_stats.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
