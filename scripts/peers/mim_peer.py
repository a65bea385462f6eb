"""MIM pre-training with PyTorch + transformers on the batches beit-rs trained on, step for step.

`beit-cli pretrain ... --dump-batches DUMP` writes every micro-batch it trains on
(`DUMP/batch-NNNNNN.safetensors`: `pixel_values`, `bool_masked_pos`, `token_ids`, numbered by
global micro-batch) and its initial weights (`DUMP/model`, HF layout). This peer loads those
weights into `transformers.BeitForMaskedImageModeling` (drop path and dropout off) and trains on
the same batches in the same order with the recipe of the run's resolved `config.toml`:

- loss: unilm's, cross-entropy of the masked positions' logits against their visual-token ids,
  mean over the masked positions of the batch (`beit_mim::masked_token_loss`);
- AdamW over beit-rs's parameter groups (`beit_train::build_param_groups`): no weight decay for
  tensors of rank <= 1, biases, `cls_token` and absolute position embeddings (the mask token and
  the relative-position tables are decayed, as unilm does), lr scale from the layer id when
  `train.layer_decay` is set;
- unilm's per-step cosine lr schedule with linear warm-up from 0, cosine weight decay schedule
  (`train.weight_decay` to `train.weight_decay_end`), global gradient-norm clipping
  (`train.clip_grad`).

It writes one `{"kind": "step", "step", "epoch", "loss", "lr"}` record per optimizer step to
`OUTPUT/metrics.jsonl`, as beit-rs does; `scripts/studies/compare_mim.py` compares the two.

    python scripts/peers/mim_peer.py --run runs/mim-ours --dump runs/mim-dump --output runs/mim-peer
"""

import argparse
import glob
import json
import math
import os
import re

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import BeitForMaskedImageModeling

BLOCK = re.compile(r"^(?:beit\.)?(?:encoder\.layer|layers)\.(\d+)\.")


def layer_id(name, num_layers):
    """unilm's `get_layer_id_for_vit` on transformers names (`beit_model::param_info`)."""
    rest = name[len("beit.") :] if name.startswith("beit.") else name
    if rest.startswith("embeddings."):
        return 0
    m = BLOCK.match(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def param_groups(model, num_layers, layer_decay, decay_rel_pos=True):
    """beit-rs's `build_param_groups` (unilm's `get_parameter_groups`)."""
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
        g = groups.setdefault(
            (lid, no_decay), {"params": [], "names": [], "lr_scale": scale, "decay": not no_decay}
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


def masked_token_loss(logits, mask, token_ids):
    """Cross-entropy of the masked rows (row-major over batch x patch), mean over them."""
    m = mask.bool()
    return torch.nn.functional.cross_entropy(logits[m], token_ids[m])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the beit-rs run folder (its config.toml)")
    ap.add_argument("--dump", required=True, help="the --dump-batches folder")
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with open(os.path.join(args.run, "config.toml"), "rb") as f:
        t = tomllib.load(f)["train"]
    if int(t.get("accum_steps", 1)) != 1:
        raise SystemExit("only train.accum_steps = 1 is supported")
    if float(t.get("drop_path_rate", 0.0)) != 0.0:
        raise SystemExit("set train.drop_path_rate = 0 (its draws cannot be identical)")
    files = sorted(glob.glob(os.path.join(args.dump, "batch-*.safetensors")))
    epochs = int(t["epochs"])
    steps_per_epoch = len(files) // epochs
    if steps_per_epoch * epochs != len(files):
        raise SystemExit(f"{len(files)} dumped batches are not {epochs} whole epochs")

    model, info = BeitForMaskedImageModeling.from_pretrained(
        os.path.join(args.dump, "model"),
        output_loading_info=True,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"weights do not match: {info}")
    model.train()
    num_layers = model.config.num_hidden_layers
    groups = param_groups(model, num_layers, t.get("layer_decay"))
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": 0.0, "weight_decay": 0.0} for g in groups],
        betas=(t["beta1"], t["beta2"]),
        eps=t["eps"],
    )
    lr_sched = cosine_scheduler(
        t["lr"], t["min_lr"], epochs, steps_per_epoch, t["warmup_epochs"], t.get("warmup_steps")
    )
    wd_end = t.get("weight_decay_end", t["weight_decay"])
    wd_sched = cosine_scheduler(t["weight_decay"], wd_end, epochs, steps_per_epoch, 0)

    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "metrics.jsonl"), "w") as out:
        for it, path in enumerate(files[: args.steps]):
            b = load_file(path)
            logits = model(
                pixel_values=b["pixel_values"], bool_masked_pos=b["bool_masked_pos"].bool()
            ).logits
            loss = masked_token_loss(logits, b["bool_masked_pos"], b["token_ids"])
            opt.zero_grad()
            loss.backward()
            for g, pg in zip(groups, opt.param_groups):
                pg["lr"] = lr_sched[it] * g["lr_scale"]
                pg["weight_decay"] = wd_sched[it] if g["decay"] else 0.0
            if t.get("clip_grad"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_grad"])
            opt.step()
            rec = {"kind": "step", "step": it + 1, "epoch": it // steps_per_epoch}
            rec.update(loss=loss.item(), lr=float(lr_sched[it]))
            out.write(json.dumps(rec) + "\n")
    print(f"{min(len(files), args.steps or len(files))} steps -> {args.output}/metrics.jsonl")


if __name__ == "__main__":
    main()
