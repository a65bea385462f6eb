#!/usr/bin/env python3
"""Generate the numerical fixtures of the `beit-train` crate (fixtures/train/*.json).

Run with the oracle environment:

    .venv/bin/python scripts/train_fixtures.py

What it writes (fixtures/train/):
- adamw.json: torch.optim.AdamW (single-tensor path, float32) over a few steps with two
  parameter groups (different lr scale, one with weight decay, one without), a per-step lr and
  weight decay as unilm sets them (`group["lr"] = lr * lr_scale`), explicit gradients, and one step
  where a parameter has no gradient (torch skips it and its step counter stays behind).
- clip.json: torch.nn.utils.clip_grad_norm_ on three gradients, once clipping and once not.
- schedule.json: values of unilm's per-step cosine scheduler (`utils.cosine_scheduler`, restated
  here with numpy exactly as the reference describes it: np.linspace warm-up including both ends,
  then a half-cosine over the remaining steps).
- losses.json: timm's LabelSmoothingCrossEntropy / SoftTargetCrossEntropy (loss and gradient
  w.r.t. the logits), plain cross-entropy, and top-k accuracies from torch.topk.
- hf_v5_names.json: parameter names and shapes of base BEiT MIM/classifier models as the installed
  transformers (v5 layout) names them, to check that grouping also accepts that layout.
"""
import json
import math
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "train")


def tolist(t):
    return t.detach().cpu().reshape(-1).tolist()


def adamw_fixture():
    g = torch.Generator().manual_seed(1234)
    shapes = {"a.weight": (3, 4), "a.bias": (4,), "b.weight": (2, 3)}
    params = {n: torch.randn(s, generator=g, dtype=torch.float32) for n, s in shapes.items()}
    init = {n: tolist(p) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    groups = [
        {"names": ["a.weight", "a.bias"], "lr_scale": 1.0, "weight_decay": True},
        {"names": ["b.weight"], "lr_scale": 0.5, "weight_decay": False},
    ]
    betas, eps = (0.9, 0.999), 1e-8
    opt = torch.optim.AdamW(
        [
            {"params": [params[n] for n in grp["names"]], "weight_decay": 0.0, "lr": 0.0}
            for grp in groups
        ],
        betas=betas,
        eps=eps,
        foreach=False,
    )
    lrs = [1e-2, 2e-2, 1.5e-2, 5e-3, 8e-3]
    wds = [0.05, 0.05, 0.04, 0.03, 0.1]
    steps = []
    for i, (lr, wd) in enumerate(zip(lrs, wds)):
        grads = {}
        for n, p in params.items():
            if i == 2 and n == "a.bias":
                p.grad = None  # no gradient this step: torch skips the parameter
                continue
            gr = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.grad = gr.clone()
            grads[n] = tolist(gr)
        for grp, tg in zip(groups, opt.param_groups):
            tg["lr"] = lr * grp["lr_scale"]
            tg["weight_decay"] = wd if grp["weight_decay"] else 0.0
        opt.step()
        steps.append(
            {
                "lr": lr,
                "weight_decay": wd,
                "grads": grads,
                "params_after": {n: tolist(p) for n, p in params.items()},
            }
        )
    state = {}
    for n, p in params.items():
        st = opt.state[p]
        state[n] = {
            "exp_avg": tolist(st["exp_avg"]),
            "exp_avg_sq": tolist(st["exp_avg_sq"]),
            "step": int(st["step"].item()),
        }
    return {
        "betas": list(betas),
        "eps": eps,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "groups": groups,
        "init": init,
        "steps": steps,
        "final_state": state,
    }


def clip_fixture():
    g = torch.Generator().manual_seed(99)
    shapes = [(4, 5), (5,), (2, 3, 2)]
    cases = []
    for max_norm in [1.0, 100.0]:
        ps = [torch.zeros(s, requires_grad=True) for s in shapes]
        grads = [torch.randn(s, generator=g) * 0.7 for s in shapes]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        cases.append(
            {
                "max_norm": max_norm,
                "shapes": [list(s) for s in shapes],
                "grads": [tolist(gr) for gr in grads],
                "total_norm": float(total),
                "clipped": [tolist(p.grad) for p in ps],
            }
        )
    return {"cases": cases}


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0, warmup_steps=-1):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_steps > 0:
        warmup_iters = warmup_steps
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    n = len(iters)
    body = np.array([final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n))
                     for i in iters])
    sched = np.concatenate((warmup_schedule, body))
    assert len(sched) == epochs * niter_per_ep
    return sched


def schedule_fixture():
    cases = [
        dict(base_value=1.5e-3, final_value=1e-5, epochs=5, niter_per_ep=10, warmup_epochs=1),
        dict(base_value=4e-3, final_value=1e-6, epochs=4, niter_per_ep=7, warmup_epochs=2, warmup_steps=5),
        dict(base_value=1e-3, final_value=1e-6, epochs=3, niter_per_ep=5, warmup_epochs=0),
        dict(base_value=0.05, final_value=0.05, epochs=2, niter_per_ep=6, warmup_epochs=0),
        dict(base_value=0.04, final_value=0.4, epochs=3, niter_per_ep=4, warmup_epochs=0),
    ]
    out = []
    for c in cases:
        vals = cosine_scheduler(**c)
        out.append({**c, "values": vals.tolist()})
    return {"cases": out}


def hf_v5_names():
    from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling

    mim = BeitForMaskedImageModeling(
        BeitConfig(use_mask_token=True, use_shared_relative_position_bias=True,
                   use_relative_position_bias=False)
    )
    cls = BeitForImageClassification(BeitConfig(use_relative_position_bias=True, num_labels=1000))
    dump = lambda m: [[n, list(p.shape)] for n, p in m.named_parameters()]
    import transformers

    return {"transformers": transformers.__version__, "mim": dump(mim), "classifier": dump(cls)}


def losses_fixture():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(5)
    n, c = 6, 7
    logits = (torch.randn(n, c, generator=g) * 2.0).requires_grad_(True)
    targets = torch.randint(0, c, (n,), generator=g)
    ls = LabelSmoothingCrossEntropy(smoothing=0.1)(logits, targets)
    (ls_grad,) = torch.autograd.grad(ls, logits)
    soft = torch.softmax(torch.randn(n, c, generator=g), dim=-1)
    st = SoftTargetCrossEntropy()(logits, soft)
    (st_grad,) = torch.autograd.grad(st, logits)
    ce = torch.nn.functional.cross_entropy(logits, targets)
    acc = {}
    for k in (1, 3, 5):
        top = logits.topk(k, dim=-1).indices
        acc[str(k)] = float((top == targets[:, None]).any(dim=-1).float().mean())
    return {
        "n": n, "c": c,
        "logits": tolist(logits), "targets": targets.tolist(), "soft_targets": tolist(soft),
        "smoothing": 0.1,
        "label_smoothing_loss": float(ls), "label_smoothing_grad": tolist(ls_grad),
        "soft_target_loss": float(st), "soft_target_grad": tolist(st_grad),
        "cross_entropy_loss": float(ce),
        "topk_accuracy": acc,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, fn in [("adamw", adamw_fixture), ("clip", clip_fixture), ("schedule", schedule_fixture),
                     ("hf_v5_names", hf_v5_names), ("losses", losses_fixture)]:
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(fn(), f)
        print("wrote", name)


if __name__ == "__main__":
    main()
