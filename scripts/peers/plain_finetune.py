#!/usr/bin/env python3
"""A plain transformers + torchvision fine-tuning of the small Fashion-MNIST recipe: the training
loop a PyTorch user would write by hand for `configs/finetune_fashion_mnist.toml`, with none of
timm's or unilm's helpers. It is the yardstick for the beit-rs recipe's accuracy: where the two
differ by more than seed noise, the knobs below bisect which detail costs the points.

What it does (the headline recipe of the TOML file, hard-wired):
- model: `BeitForImageClassification` from a `BeitConfig` of the file's `[architecture]`
  (per-layer relative position bias, mean pooling, drop path 0.1), transformers' own init;
- optimizer: AdamW (lr 2e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.05) over layer-decay
  groups (0.75; id 0 = embeddings, k + 1 = block k, L + 1 = the rest), no weight decay for 1-D
  tensors, biases, the cls token and every position table, the relative-position bias tables
  included;
- schedule: per step, linear warm-up from 0 over the first epoch, then a half cosine to 1e-5;
- data: the 6,000/1,000-image subset embedded in beit-data, grey replicated to RGB;
  torchvision RandomResizedCrop(28, scale 0.5-1), horizontal flip, ColorJitter(brightness 0.4),
  ToTensor, Normalize(0.5, 0.5), RandomErasing(p 0.1, per-pixel noise); batches of 128 from a
  seeded shuffle, the last partial batch dropped (46 steps per epoch); 8 epochs;
- loss: cross-entropy with label smoothing 0.1;
- after each epoch: top-1 on the 1,000 test images, as `{"kind": "eval", "epoch", "acc1"}` lines
  in `OUTPUT/metrics.jsonl` (the format of beit-cli's records, so `compare_training.py` reads it).

Knobs that move it towards the beit-rs recipe, one at a time:
  --jitter full          brightness, contrast and saturation 0.4 (timm's / beit-rs's jitter)
  --jitter none          no colour jitter
  --decay-rel-pos        weight decay on the relative-position tables (beit-rs's grouping)
  --smoothing X          label smoothing (0.1)
  --drop-path X          stochastic depth of the last block (0.1)
  --layer-decay X        layer decay (0.75)
  --erase X              random-erasing probability (0.1)

Usage:

    .venv/bin/python scripts/peers/plain_finetune.py --output runs/plain-s0 --seed 0 [--threads 2]
"""
import argparse
import gzip
import json
import math
import os
import random
import struct
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EMBEDDED = os.path.join(ROOT, "crates", "beit-data", "data", "fashion-mnist")


def idx_file(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


class Split(torch.utils.data.Dataset):
    def __init__(self, prefix, transform):
        self.x = idx_file(os.path.join(EMBEDDED, f"{prefix}-images-idx3-ubyte.gz"))
        self.y = idx_file(os.path.join(EMBEDDED, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        image = Image.fromarray(self.x[i], mode="L").convert("RGB")
        return self.transform(image), int(self.y[i])


def train_transform(args):
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(28, scale=(0.5, 1.0)), T.RandomHorizontalFlip()]
    if args.jitter == "brightness":
        steps.append(T.ColorJitter(0.4))
    elif args.jitter == "full":
        steps.append(T.ColorJitter(0.4, 0.4, 0.4))
    steps += [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    if args.erase > 0:
        steps.append(T.RandomErasing(p=args.erase, value="random"))
    return T.Compose(steps)


def eval_transform():
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])


def model(args):
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=384,
        patch_size=4,
        image_size=28,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
        use_relative_position_bias=True,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        drop_path_rate=args.drop_path,
        num_labels=10,
    )
    return BeitForImageClassification(config)


def groups(net, layers, args):
    """AdamW groups: (layer id, decayed?) with unilm's layer-decay lr scale."""
    out = {}
    for name, p in net.named_parameters():
        if ".encoder.layer." in name:
            lid = int(name.split(".encoder.layer.")[1].split(".")[0]) + 1
        elif ".embeddings." in name:
            lid = 0
        else:
            lid = layers + 1
        position = "position" in name and (args.decay_rel_pos is False or "relative" not in name)
        decayed = p.ndim > 1 and not name.endswith(".bias") and "cls_token" not in name
        decayed = decayed and not position
        g = out.setdefault((lid, decayed), {"params": [], "decayed": decayed})
        g["params"].append(p)
        g["scale"] = args.layer_decay ** (layers + 1 - lid)
    return list(out.values())


def lr_at(step, total, warmup, peak, floor):
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def top1(net, loader):
    net.eval()
    hits = n = 0
    for x, y in loader:
        hits += (net(pixel_values=x).logits.argmax(1) == y).sum().item()
        n += len(y)
    net.train()
    return 100.0 * hits / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jitter", choices=["brightness", "full", "none"], default="brightness")
    ap.add_argument("--decay-rel-pos", action="store_true")
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--drop-path", type=float, default=0.1)
    ap.add_argument("--layer-decay", type=float, default=0.75)
    ap.add_argument("--erase", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    train = Split("train", train_transform(args))
    test = Split("t10k", eval_transform())
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=128, shuffle=True, drop_last=True, generator=gen
    )
    test_loader = torch.utils.data.DataLoader(test, batch_size=250)
    net = model(args)
    net.train()
    param_groups = groups(net, 4, args)
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": 0.0, "weight_decay": 0.0} for g in param_groups],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    per_epoch = len(loader)
    total = per_epoch * args.epochs
    os.makedirs(args.output, exist_ok=True)
    log = open(os.path.join(args.output, "metrics.jsonl"), "w")
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        for x, y in loader:
            lr = lr_at(step, total, per_epoch, 2e-3, 1e-5)
            for g, pg in zip(param_groups, opt.param_groups):
                pg["lr"] = lr * g["scale"]
                pg["weight_decay"] = 0.05 if g["decayed"] else 0.0
            logits = net(pixel_values=x).logits
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=args.smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            log.write(json.dumps({"kind": "step", "step": step, "loss": loss.item(), "lr": lr}) + "\n")
        acc = top1(net, test_loader)
        log.write(json.dumps({"kind": "eval", "epoch": epoch, "step": step, "acc1": acc}) + "\n")
        log.flush()
        print(f"epoch {epoch}: top-1 {acc:.2f}% ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
