#!/usr/bin/env python3
"""PyTorch + transformers peer of `beit-cli bench`: the same workloads, timed the same way.

    python scripts/bench/bench_peer.py --mode infer|train-mim|train-cls --config cfg.json \
        [--batch 8] [--image-size 224] [--iters 5] [--warmup 1] [--threads 2] \
        [--device cpu|cuda] [--amp none|bf16|fp16] [--compile] [--json]

`--config` is the HF `config.json` that `beit-cli bench --dump-config` writes, so both sides run
the same architecture (random weights). Steps:
- infer: `BeitForImageClassification` in eval mode under `torch.inference_mode()`;
- train-mim: `BeitForMaskedImageModeling` forward with `bool_masked_pos` (`--num-masked` of N per
  image) and `labels` for the masked patches (transformers computes the loss on them), backward,
  `torch.optim.AdamW` step;
- train-cls: classifier forward with labels, backward, AdamW step.
`--compile` wraps the model in `torch.compile` (default mode; compilation happens in the warm-up
steps, so give it `--warmup 2` or more). One JSON line with at least mode, batch, images_per_s and
median_s (as `beit-cli bench --json`); on CUDA also peak_mem_bytes
(`torch.cuda.max_memory_allocated` over the timed steps).
"""
import argparse
import json
import statistics
import time

import torch
from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["infer", "train-mim", "train-cls"], default="infer")
    p.add_argument("--config", required=True, help="HF config.json (from beit-cli bench --dump-config)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-masked", type=int, default=75)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="torch.autocast dtype (none = f32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    with open(a.config) as f:
        cfg_dict = json.load(f)
    cfg_dict["image_size"] = a.image_size
    cfg = BeitConfig(**cfg_dict)
    cfg._attn_implementation = "eager"

    b, s = a.batch, a.image_size
    pixels = torch.rand(b, 3, s, s, device=dev) * 2 - 1
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.amp)

    def autocast():
        if amp_dtype is None:
            return torch.autocast(dev.type, enabled=False)
        return torch.autocast(dev.type, dtype=amp_dtype)

    if a.mode == "infer":
        model = BeitForImageClassification(cfg).to(dev).eval()

        def step():
            with torch.inference_mode(), autocast():
                model(pixel_values=pixels).logits
    else:
        if a.mode == "train-mim":
            model = BeitForMaskedImageModeling(cfg).to(dev).train()
            n = (s // cfg.patch_size) ** 2
            if not 0 < a.num_masked <= n:
                raise SystemExit(f"--num-masked {a.num_masked} must be in 1..={n}")
            mask = torch.zeros(b, n, dtype=torch.bool)
            for row in mask:
                row[torch.randperm(n)[: a.num_masked]] = True
            mask = mask.to(dev)
            labels = torch.randint(0, cfg.vocab_size, (b * a.num_masked,), device=dev)
            inputs = dict(pixel_values=pixels, bool_masked_pos=mask, labels=labels)
        else:
            model = BeitForImageClassification(cfg).to(dev).train()
            labels = torch.randint(0, cfg.num_labels, (b,), device=dev)
            inputs = dict(pixel_values=pixels, labels=labels)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype is torch.float16)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(**inputs).loss
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    if a.compile:
        model = torch.compile(model)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
        sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    out = {
        "impl": "pytorch",
        "mode": a.mode,
        "batch": b,
        "image_size": s,
        "iters": a.iters,
        "device": a.device,
        "dtype": a.amp if amp_dtype is not None else "f32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "images_per_s": b / med,
        "median_s": med,
        "step_s": times,
        "compile": a.compile,
    }
    if dev.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"pytorch {a.mode} batch {b} @ {s}px on {a.device} ({out['threads']} threads, "
              f"{out['dtype']}): {b / med:.3f} images/s, median step {med:.3f} s over {a.iters} steps")


if __name__ == "__main__":
    main()
