#!/usr/bin/env python3
"""The PyTorch peer of `beit-cli finetune`: the same recipe, read from the same TOML config, written
with transformers (`BeitForImageClassification`), timm (training transform, mixup, random
erasing) and torchvision, so that the two trainings can be compared seed for seed
(`scripts/studies/compare_training.py`). Only `data.source = "fashion-mnist"` (the subset embedded in
beit-data, read from its IDX files) or `fashion-mnist:DIR` (the four upstream IDX files) are
supported.

What it does, step by step (each line names the beit-rs counterpart):
- model: `[architecture]` as an HF `BeitConfig` (per-layer relative position bias, mean pooling,
  no mask token, `train.drop_path_rate`, `aug.input_size`), 10 labels (`finetune_config`);
- initialisation (`--init`): `hf` keeps transformers' own `_init_weights`; `unilm` applies unilm's
  rules (trunc normal std 0.02, zero biases, LayerNorm 1/0, LayerScale init value, zero
  relative-position tables, torch's default Conv2d init of the patch embedding, output
  projections of block l divided by sqrt(2l), head x 0.001), as `beit_model::init::init_beit` does;
- optimizer: AdamW over unilm's groups (layer id 0 for the embeddings, k+1 for block k, L+1 for
  the rest; lr scale `layer_decay^(L+1-id)`; no weight decay for 1-D tensors, `.bias`,
  `cls_token`, `position_embeddings`; the relative-position tables decayed unless
  `--no-decay-rel-pos`), per step `lr = schedule[it] * lr_scale` and `weight_decay =
  wd_schedule[it]` for decaying groups (`build_param_groups`, `AdamW::step`);
- schedule: unilm's `cosine_scheduler` (numpy linspace warm-up from 0 including both ends, then
  a half cosine to `train.min_lr`), per optimizer step (`CosineSchedule`);
- data: grey images replicated to RGB; timm `create_transform` for training (RandomResizedCrop
  with `aug.crop_scale_min`, flip, colour jitter when there is no RandAugment, RandAugment,
  random erasing), mean/std from `aug.normalize`; evaluation `squash` (resize to size x size) or
  `crop` (shorter side to size/crop_pct, centre crop); a seeded shuffling sampler, last partial
  batch dropped (`Loader`);
- loss: label smoothing cross-entropy (`train.label_smoothing`), or soft-target cross-entropy
  with timm `Mixup` when mixup/cutmix is on;
- after every optimizer step: `{"kind": "step", "step": s, "epoch": e, "loss": ..., "lr": ...}`
  in `OUTPUT/metrics.jsonl` (1-based `step`, the loss of the batch before the update and the
  peak-group lr it was updated with, as beit-rs's step records);
- after every epoch: top-1/top-5 on the test split, written to `OUTPUT/metrics.jsonl` as
  `{"kind": "eval", "epoch": e, "acc1": ..., "acc5": ..., "loss": ...}` (0-based `epoch`).

`--save-init DIR` also writes the initialised model (before any step) as a transformers
checkpoint (`save_pretrained`), which `beit-cli finetune --model DIR` loads: both programs then
start from the same weights (with `--set finetune.head_init_scale=1.0` on the beit-rs side, so
the loaded head is kept as it is). With augmentation and drop path off and one batch per epoch
(`train.batch_size` = the training set), nothing random is left and the two step-loss
sequences must agree up to float rounding: a check of the optimizer, its groups, the schedule,
the loss and the model, with no seed noise.

Config keys: both spellings are read, `train.drop_path_rate` or the older `train.drop_path`,
`train.label_smoothing` or the older `aug.smoothing`.

Usage:

    .venv/bin/python scripts/peers/train_peer.py --config configs/finetune_fashion_mnist.toml \\
        --output runs/peer-s0 --seed 0 [--epochs 8] [--set aug.reprob=0] [--init hf|unilm] \\
        [--threads 1]
"""
import argparse
import gzip
import json
import math
import os
import re
import struct
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import numpy as np
import torch
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EMBEDDED = os.path.join(ROOT, "crates", "beit-data", "data", "fashion-mnist")

# Defaults of beit-cli's FinetuneConfig (the paper's base recipe) for the keys the peer reads.
DEFAULTS = {
    "data": {"source": "", "num_workers": 0},
    "architecture": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
        "layer_scale_init_value": 0.1,
        "layer_norm_eps": 1e-6,
    },
    "train": {
        "epochs": 100,
        "batch_size": 1024,
        "accum_steps": 1,
        "lr": 4e-3,
        "min_lr": 1e-6,
        "warmup_epochs": 20,
        "warmup_steps": None,
        "weight_decay": 0.05,
        "weight_decay_end": None,
        "layer_decay": 0.65,
        "clip_grad": None,
        "drop_path_rate": 0.1,
        "label_smoothing": 0.1,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "seed": 0,
        "eval_batch_size": None,
    },
    "aug": {
        "input_size": 224,
        "crop_scale_min": 0.08,
        "train_interpolation": "bicubic",
        "hflip": 0.5,
        "color_jitter": 0.4,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "reprob": 0.25,
        "remode": "pixel",
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "normalize": "half",
        "eval_resize": "crop",
        "eval_crop_pct": 0.875,
        "eval_interpolation": "bicubic",
    },
}

# Old spelling -> new spelling (the config schema was unified; both are accepted).
ALIASES = {
    ("train", "drop_path"): ("train", "drop_path_rate"),
    ("aug", "smoothing"): ("train", "label_smoothing"),
}


def parse_value(text):
    """A `--set` value as TOML (a bare word is a string), as beit-cli does."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path, sets):
    raw = {}
    if path:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    for s in sets:
        if "=" not in s:
            sys.exit(f"--set {s!r}: expected KEY=VALUE")
        key, value = s.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parse_value(value.strip())
    cfg = {k: dict(v) for k, v in DEFAULTS.items()}
    for (sec, old), (new_sec, new) in ALIASES.items():
        if old in raw.get(sec, {}):
            if new in raw.get(new_sec, {}):
                sys.exit(f"both {sec}.{old} and {new_sec}.{new} are set; keep one")
            raw.setdefault(new_sec, {})[new] = raw[sec].pop(old)
    for sec, table in raw.items():
        if not isinstance(table, dict):
            continue  # top-level scalars (output, device, model)
        if sec not in cfg:
            continue  # sections the peer does not need
        for k, v in table.items():
            cfg[sec][k] = v
    cfg["model"] = raw.get("model", "")
    return cfg


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = struct.unpack(">I", data[:4])[0] & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def fashion_mnist(source):
    if source == "fashion-mnist":
        root = EMBEDDED
    elif source.startswith("fashion-mnist:"):
        root = source.split(":", 1)[1]
    else:
        sys.exit(f"data.source {source!r}: the peer supports fashion-mnist[:DIR] only")
    out = {}
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
        out[split] = (x, y.astype(np.int64))
    return out


class GreyAsRgb(torch.utils.data.Dataset):
    """28x28 grey images replicated on three channels (as beit-data's `MnistSplit::rgb`)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        return self.transform(img), int(self.labels[i])


def mean_std(name):
    if name == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if name == "imagenet":
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    sys.exit(f"aug.normalize {name!r} is not half or imagenet")


def transforms(aug):
    from timm.data import create_transform
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    mean, std = mean_std(aug["normalize"])
    aa = aug["auto_augment"].strip()
    train = create_transform(
        input_size=aug["input_size"],
        is_training=True,
        scale=(aug["crop_scale_min"], 1.0),
        hflip=aug["hflip"],
        color_jitter=aug["color_jitter"] if aug["color_jitter"] > 0 else None,
        auto_augment=None if aa in ("", "none") else aa,
        interpolation=aug["train_interpolation"],
        mean=mean,
        std=std,
        re_prob=aug["reprob"],
        re_mode=aug["remode"],
        re_count=1,
    )
    interp = {
        "bilinear": InterpolationMode.BILINEAR,
        "bicubic": InterpolationMode.BICUBIC,
        "nearest": InterpolationMode.NEAREST,
    }[aug["eval_interpolation"]]
    size = aug["input_size"]
    if aug["eval_resize"] == "squash":
        resize = [T.Resize((size, size), interpolation=interp)]
    else:
        resize = [
            T.Resize(int(math.floor(size / aug["eval_crop_pct"])), interpolation=interp),
            T.CenterCrop(size),
        ]
    evalt = T.Compose(resize + [T.ToTensor(), T.Normalize(mean, std)])
    return train, evalt


# ------------------------------------------------------------------------------------------------
# Model, initialisation, parameter groups
# ------------------------------------------------------------------------------------------------


def build_model(cfg, num_labels):
    from transformers import BeitConfig, BeitForImageClassification

    a = cfg["architecture"]
    bc = BeitConfig(
        hidden_size=a["hidden_size"],
        num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"],
        intermediate_size=a["intermediate_size"],
        patch_size=a["patch_size"],
        image_size=cfg["aug"]["input_size"],
        num_channels=3,
        layer_scale_init_value=a["layer_scale_init_value"],
        layer_norm_eps=a["layer_norm_eps"],
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=False,
        use_mean_pooling=True,
        use_mask_token=False,
        drop_path_rate=cfg["train"]["drop_path_rate"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BeitForImageClassification(bc)


BLOCK = re.compile(r"^(?:beit\.)?(?:encoder\.layer|layers)\.(\d+)\.")


def block_index(name):
    m = BLOCK.match(name)
    return int(m.group(1)) if m else None


def layer_id(name, num_layers):
    rest = name[len("beit.") :] if name.startswith("beit.") else name
    if rest.startswith("embeddings."):
        return 0
    k = block_index(name)
    return k + 1 if k is not None else num_layers + 1


def is_block_output(name):
    """The output projections unilm's `fix_init_weight` rescales (both transformers layouts)."""
    if block_index(name) is None or not name.endswith(".weight"):
        return False
    return (
        name.endswith(".attention.output.dense.weight")
        or name.endswith(".attention.o_proj.weight")
        or name.endswith(".mlp.fc2.weight")
        or (name.endswith(".output.dense.weight") and ".attention." not in name)
    )


@torch.no_grad()
def unilm_init(model, layer_scale_init, head_init_scale=0.001):
    """unilm's fine-tuning initialisation (the rules of `beit_model::init::init_beit`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, torch.nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()  # torch's default: uniform within 1/sqrt(fan_in)
    for name, p in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if last in ("cls_token", "mask_token", "position_embeddings"):
            torch.nn.init.trunc_normal_(p, std=0.02)
        elif name.endswith("relative_position_bias_table"):
            p.zero_()
        elif last.startswith("lambda_"):
            p.fill_(layer_scale_init)
        if is_block_output(name):
            p.div_(math.sqrt(2.0 * (block_index(name) + 1)))
        if name in ("classifier.weight", "classifier.bias"):
            p.mul_(head_init_scale)


def param_groups(model, num_layers, layer_decay, decay_rel_pos):
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rest = name[len("beit.") :] if name.startswith("beit.") else name
        no_decay = (
            p.ndim <= 1
            or name.endswith(".bias")
            or rest in ("embeddings.cls_token", "embeddings.position_embeddings")
            or (not decay_rel_pos and name.endswith("relative_position_bias_table"))
        )
        lid = layer_id(name, num_layers)
        scale = 1.0 if layer_decay in (None, 1.0) else layer_decay ** (num_layers + 1 - lid)
        key = (lid, no_decay)
        g = groups.setdefault(
            key,
            {"params": [], "names": [], "lr_scale": scale, "decay": not no_decay},
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def cosine_scheduler(base, final, epochs, steps_per_epoch, warmup_epochs, warmup_steps=None):
    """unilm `utils.cosine_scheduler` (start_warmup_value 0)."""
    warmup = 0
    if warmup_epochs > 0:
        warmup = warmup_steps if warmup_steps else warmup_epochs * steps_per_epoch
    warm = np.linspace(0.0, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    n = correct1 = correct5 = 0
    loss = 0.0
    for x, y in loader:
        logits = model(pixel_values=x).logits
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    model.train()
    return 100.0 * correct1 / n, 100.0 * correct5 / n, loss / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--init", choices=["hf", "unilm"], default="hf")
    ap.add_argument("--no-decay-rel-pos", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-init", metavar="DIR", help="write the initialised model here")
    ap.add_argument(
        "--order-file",
        metavar="JSON",
        help="train in these sample orders (a list of per-epoch index lists, e.g. beit-rs's from "
        "`cargo run -p beit-data --example epoch_orders`) instead of shuffling",
    )
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    t, aug = cfg["train"], cfg["aug"]
    if args.seed is not None:
        t["seed"] = args.seed
    if args.epochs is not None:
        t["epochs"] = args.epochs
    if cfg["model"]:
        sys.exit("the peer trains from scratch only (config `model` must be empty)")
    torch.set_num_threads(args.threads)
    seed = int(t["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random

    random.seed(seed)

    data = fashion_mnist(cfg["data"]["source"] or "fashion-mnist")
    train_tf, eval_tf = transforms(aug)
    train_ds = GreyAsRgb(*data["train"], train_tf)
    test_ds = GreyAsRgb(*data["test"], eval_tf)
    accum = int(t["accum_steps"])
    micro = int(t["batch_size"]) // accum
    gen = torch.Generator().manual_seed(seed)
    if args.order_file:
        with open(args.order_file) as f:
            orders = json.load(f)
        if len(orders) < int(t["epochs"]):
            sys.exit(f"{args.order_file}: {len(orders)} epoch orders for {t['epochs']} epochs")

        class FixedOrder(torch.utils.data.Sampler):
            """The given order of each epoch, one epoch per `iter`."""

            def __init__(self):
                self.epoch = 0

            def __len__(self):
                return len(train_ds)

            def __iter__(self):
                order = orders[self.epoch]
                self.epoch += 1
                return iter(order)

        sampler = FixedOrder()
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=gen)
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_size=micro, sampler=sampler, drop_last=True, num_workers=0
    )
    eval_bs = t["eval_batch_size"] or (micro * 3 + 1) // 2
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=eval_bs, shuffle=False)

    model = build_model(cfg, num_labels=10)
    L = cfg["architecture"]["num_hidden_layers"]
    if args.init == "unilm":
        unilm_init(model, cfg["architecture"]["layer_scale_init_value"])
    model.train()
    if args.save_init:
        model.save_pretrained(args.save_init)

    groups = param_groups(model, L, t["layer_decay"], not args.no_decay_rel_pos)
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": 0.0, "weight_decay": 0.0} for g in groups],
        betas=(t["beta1"], t["beta2"]),
        eps=t["eps"],
    )
    steps_per_epoch = len(train_loader) // accum
    epochs = int(t["epochs"])
    lr_sched = cosine_scheduler(
        t["lr"], t["min_lr"], epochs, steps_per_epoch, t["warmup_epochs"], t["warmup_steps"]
    )
    wd_end = t["weight_decay"] if t["weight_decay_end"] is None else t["weight_decay_end"]
    wd_sched = cosine_scheduler(t["weight_decay"], wd_end, epochs, steps_per_epoch, 0)

    mixup_fn = None
    if aug["mixup"] > 0 or aug["cutmix"] > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(
            mixup_alpha=aug["mixup"],
            cutmix_alpha=aug["cutmix"],
            prob=aug["mixup_prob"],
            switch_prob=aug["mixup_switch_prob"],
            label_smoothing=t["label_smoothing"],
            num_classes=10,
        )

    def loss_fn(logits, y):
        if mixup_fn is not None:
            return torch.sum(-y * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=t["label_smoothing"])

    os.makedirs(args.output, exist_ok=True)
    metrics = open(os.path.join(args.output, "metrics.jsonl"), "w")
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump({"resolved": cfg, "init": args.init, "seed": seed}, f, indent=1, default=str)
    it = 0
    start = time.time()
    for epoch in range(epochs):
        opt.zero_grad()
        for i, (x, y) in enumerate(train_loader):
            if i >= steps_per_epoch * accum:
                break
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            logits = model(pixel_values=x).logits
            loss = loss_fn(logits, y) / accum
            loss.backward()
            if (i + 1) % accum:
                continue
            for g, pg in zip(groups, opt.param_groups):
                pg["lr"] = lr_sched[it] * g["lr_scale"]
                pg["weight_decay"] = wd_sched[it] if g["decay"] else 0.0
            if t["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_grad"])
            opt.step()
            opt.zero_grad()
            it += 1
            rec = {"kind": "step", "step": it, "epoch": epoch, "loss": loss.item() * accum}
            rec["lr"] = float(lr_sched[it - 1])
            metrics.write(json.dumps(rec) + "\n")
        acc1, acc5, vloss = evaluate(model, test_loader)
        rec = {"kind": "eval", "epoch": epoch, "step": it, "acc1": acc1, "acc5": acc5}
        rec["loss"] = vloss
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        print(
            f"epoch {epoch}: val acc1 {acc1:.2f}% acc5 {acc5:.2f}% loss {vloss:.4f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )
    metrics.close()


if __name__ == "__main__":
    main()
