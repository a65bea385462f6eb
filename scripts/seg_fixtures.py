"""Oracle fixtures for semantic segmentation (`BeitForSemanticSegmentation`), made by transformers itself.

Tiny random models, every parameter perturbed and every BatchNorm given non-trivial running statistics,
saved in the hub layout (plus one copy in the unilm/mmseg layout) together with what transformers computes:
eval-mode logits of the decode and auxiliary heads, the loss with ignored pixels, and one training step's
loss, gradients of every parameter and updated running statistics. A `segment` fixture runs transformers'
whole pipeline (BeitImageProcessor + model + post_process_semantic_segmentation) on real photos.

Usage (from the repository root):
    .venv/bin/python scripts/seg_fixtures.py                    # writes fixtures/seg/
    .venv/bin/python scripts/seg_fixtures.py --check-export DIR  # transformers loads our export

Environment: python3 -m venv .venv; .venv/bin/pip install torch transformers safetensors pillow.
"""
import argparse
import copy
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from transformers import BeitConfig, BeitForSemanticSegmentation

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "seg")
PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "data")


def perturb(model, seed):
    """Move every parameter and BatchNorm buffer away from its init (deterministically)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "relative_position_bias_table" in name or name.endswith("_token"):
                p.copy_(noise * 0.5)
            elif "lambda" in name:
                p.copy_(0.1 + 0.05 * noise)
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 4:  # convolutions: keep activations O(1)
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(noise / fan_in ** 0.5)
            else:
                p.add_(noise * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return model


def tiny_config(**kw):
    base = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                image_size=32, patch_size=8, use_relative_position_bias=True, drop_path_rate=0.0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                out_indices=[1, 2, 3, 4], pool_scales=[1, 2, 3, 6], attn_implementation="eager")
    base.update(kw)
    return BeitConfig(**base)


def labels_for(seed, b, size, k):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b, size, size), generator=g)
    y[torch.rand((b, size, size), generator=g) < 0.2] = 255
    return y


def variant(name, cfg, seed, size, labels_size):
    torch.manual_seed(seed)
    model = perturb(BeitForSemanticSegmentation(cfg), seed + 1).eval()
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn((2, 3, size, size), generator=g)
    y = labels_for(seed + 3, 2, labels_size, cfg.num_labels)
    t = {"pixel_values": x, "labels": y.to(torch.uint8)}
    # transformers >= 5 does not return the auxiliary logits: catch the head's output.
    captured = {}
    if model.auxiliary_head is not None:
        model.auxiliary_head.register_forward_hook(lambda m, i, o: captured.__setitem__("aux", o))
    with torch.no_grad():
        out = model(x, labels=y)
    t["logits"] = out.logits.contiguous()
    if "aux" in captured:
        t["auxiliary_logits"] = captured["aux"].detach().contiguous()
    t["loss"] = out.loss.reshape(1)
    # One training step: batch statistics in the BatchNorms, gradients of every parameter, running
    # statistics updated with momentum 0.1. The gradients are computed in float64 (then stored as
    # float32): through a training-mode BatchNorm over few values (the 1x1 pyramid-pooling branch sees
    # one value per image) float32 rounding alone moves some gradients by ~1e-4 relative, in
    # PyTorch as in candle, so both are compared with the exact values instead.
    double = copy.deepcopy(model).double().train()
    double.zero_grad()
    double(x.double(), labels=y).loss.backward()
    model.train()
    model.zero_grad()
    out = model(x, labels=y)
    out.loss.backward()
    t["train.loss"] = out.loss.detach().reshape(1)
    t["train.logits"] = out.logits.detach().contiguous()
    for n, p in double.named_parameters():
        if p.grad is not None:
            t["grad." + n] = p.grad.float().contiguous()
    for n, b in model.named_buffers():
        if n.endswith("running_mean") or n.endswith("running_var"):
            t["after." + n] = b.detach().contiguous()
    save_file(t, os.path.join(out_dir, "expected.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{sum(1 for k in t if k.startswith('grad.'))} gradients")
    return out_dir


def mmseg_copy(src, name):
    """The same weights under unilm/mmseg names: `backbone.` prefix, fused qkv + q/v biases, timm
    block names, `conv_seg`, in a `{"state_dict": ...}` .pth as mmseg saves them."""
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    out = {}
    blk = {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
           "attention.output.dense.": "attn.proj.", "intermediate.dense.": "mlp.fc1.",
           "output.dense.": "mlp.fc2.", "lambda_1": "gamma_1", "lambda_2": "gamma_2",
           "attention.attention.relative_position_bias.relative_position_bias_table":
               "attn.relative_position_bias_table"}
    for k, v in sd.items():
        if k.startswith("beit.encoder.layer."):
            i, tail = k[len("beit.encoder.layer."):].split(".", 1)
            if tail.startswith("attention.attention.") and ("query" in tail or "key" in tail or "value" in tail):
                continue
            for a, b in blk.items():
                if tail.startswith(a):
                    out[f"backbone.blocks.{i}.{b}{tail[len(a):]}"] = v
                    break
            else:
                raise KeyError(k)
        elif k == "beit.embeddings.cls_token":
            out["backbone.cls_token"] = v
        elif k.startswith("beit.embeddings.patch_embeddings.projection."):
            out["backbone.patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("fpn"):
            out["backbone." + k] = v
        else:
            out[k.replace(".classifier.", ".conv_seg.")] = v
    for i in range(cfg["num_hidden_layers"]):
        p = f"beit.encoder.layer.{i}.attention.attention."
        out[f"backbone.blocks.{i}.attn.qkv.weight"] = torch.cat(
            [sd[p + "query.weight"], sd[p + "key.weight"], sd[p + "value.weight"]], 0)
        out[f"backbone.blocks.{i}.attn.q_bias"] = sd[p + "query.bias"]
        out[f"backbone.blocks.{i}.attn.v_bias"] = sd[p + "value.bias"]
    dst = os.path.join(ROOT, name)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    torch.save({"meta": {"note": "mmseg layout"}, "state_dict": out}, os.path.join(dst, "model.pth"))
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def segment_fixture():
    """`beit-cli segment` end to end: a random tiny model saved by transformers, an ADE-style
    preprocessor (resize to `size`, no crop), real photos (PNG, JPEG, grey, RGBA) and the label maps
    of transformers' own pipeline."""
    from PIL import Image
    from transformers import BeitImageProcessor
    out = os.path.join(ROOT, "segment")
    shutil.rmtree(out, ignore_errors=True)
    labels = ["wall", "sky", "floor", "tree", "cat", "rocket"]
    cfg = tiny_config(image_size=64, id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)}, auxiliary_channels=8)
    torch.manual_seed(11)
    model = perturb(BeitForSemanticSegmentation(cfg), 12).eval()
    model.save_pretrained(out)
    proc = BeitImageProcessor(do_resize=True, size={"height": 64, "width": 64}, resample=2,
                              do_center_crop=False, do_reduce_labels=True,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc.save_pretrained(out)
    cat = Image.open(os.path.join(PHOTOS, "chelsea.png")).convert("RGB")
    rocket = Image.open(os.path.join(PHOTOS, "rocket.jpg"))
    images = {
        "chelsea.png": cat.resize((150, 100), Image.BICUBIC),
        "rocket.jpg": rocket.resize((90, 120), Image.BICUBIC),
        "rocket_420.jpg": rocket.resize((90, 120), Image.BICUBIC),
        "cat_gray.png": cat.convert("L").resize((120, 80), Image.BICUBIC),
        "rocket_rgba.png": rocket.convert("RGBA").resize((70, 100), Image.BICUBIC),
    }
    for name, im in images.items():
        path = os.path.join(out, name)
        if name.endswith("_420.jpg"):
            im.save(path, quality=92)  # Pillow's default 4:2:0 chroma subsampling
        elif name.endswith(".jpg"):
            im.save(path, quality=92, subsampling=0)  # 4:4:4: no chroma upsampling on decode
        else:
            im.save(path)
    expected = []
    for name in images:
        im = Image.open(os.path.join(out, name))
        rgb = im.convert("RGB")
        pix = proc(images=rgb, return_tensors="pt").pixel_values
        with torch.no_grad():
            o = model(pix)
        seg = proc.post_process_semantic_segmentation(o, target_sizes=[(rgb.height, rgb.width)])[0]
        expected.append({"image": name, "height": rgb.height, "width": rgb.width,
                         "labels": seg.tolist()})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))


def mmseg_scores(preds, labels, k, ignore=255):
    """mmseg's metric: per-class intersection/union/areas summed over the dataset."""
    inter = np.zeros(k); area_p = np.zeros(k); area_l = np.zeros(k)
    for p, l in zip(preds, labels):
        m = l != ignore
        p, l = p[m], l[m]
        i = p[p == l]
        inter += np.histogram(i, bins=k, range=(0, k - 1))[0]
        area_p += np.histogram(p, bins=k, range=(0, k - 1))[0]
        area_l += np.histogram(l, bins=k, range=(0, k - 1))[0]
    union = area_p + area_l - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_l
    return {"aAcc": float(100 * inter.sum() / area_l.sum()), "mIoU": float(100 * np.nanmean(iou)),
            "mAcc": float(100 * np.nanmean(acc)),
            "iou": [None if np.isnan(v) else float(100 * v) for v in iou]}


def eval_fixture():
    """`beit-cli eval-seg` end to end: the `segment` model and photos in the ADE20K layout with
    annotations derived from the photos (grey level bands 1..6, 0 = "other" for near-black pixels),
    reduced as ADE20K (do_reduce_labels), and the mmseg metric of transformers' predictions."""
    from PIL import Image
    from transformers import BeitImageProcessor
    src = os.path.join(ROOT, "segment")
    root = os.path.join(ROOT, "eval", "ADEChallengeData2016")
    shutil.rmtree(os.path.join(ROOT, "eval"), ignore_errors=True)
    os.makedirs(os.path.join(root, "images", "validation"))
    os.makedirs(os.path.join(root, "annotations", "validation"))
    model = BeitForSemanticSegmentation.from_pretrained(src).eval()
    proc = BeitImageProcessor.from_pretrained(src)
    preds, labels = [], []
    for name in ["chelsea.png", "rocket.jpg", "cat_gray.png"]:
        stem = name.rsplit(".", 1)[0]
        im = Image.open(os.path.join(src, name)).convert("RGB")
        im.save(os.path.join(root, "images", "validation", stem + ".png"))
        grey = np.asarray(im.convert("L")).astype(np.int64)
        ann = np.where(grey < 20, 0, 1 + grey * 6 // 256).astype(np.uint8)
        Image.fromarray(ann, mode="L").save(os.path.join(root, "annotations", "validation", stem + ".png"))
        reduced = ann.astype(np.int64)
        reduced[reduced == 0] = 256
        reduced = reduced - 1
        reduced[reduced == 255] = 255
        pix = proc(images=im, return_tensors="pt").pixel_values
        with torch.no_grad():
            o = model(pix)
        seg = proc.post_process_semantic_segmentation(o, target_sizes=[(im.height, im.width)])[0].numpy()
        preds.append(seg)
        labels.append(reduced)
    scores = mmseg_scores(preds, labels, model.config.num_labels)
    with open(os.path.join(ROOT, "eval", "expected.json"), "w") as f:
        json.dump(scores, f, indent=1)
    print("eval:", scores)


def check_export(path):
    """Load a directory exported by beit-rs with transformers and compare with its expected logits."""
    exp = load_file(os.path.join(path, "expected.safetensors"))
    model = BeitForSemanticSegmentation.from_pretrained(path).eval()
    captured = {}
    if model.auxiliary_head is not None:
        model.auxiliary_head.register_forward_hook(lambda m, i, o: captured.__setitem__("aux", o))
    with torch.no_grad():
        out = model(exp["pixel_values"])
    err = (out.logits - exp["logits"]).abs().max().item()
    msg = f"{path}: transformers loads the export; max abs logit error {err:.3e}"
    if "auxiliary_logits" in exp:
        aux = (captured["aux"] - exp["auxiliary_logits"]).abs().max().item()
        msg += f", auxiliary {aux:.3e}"
        assert aux <= 1e-4, aux
    print(msg)
    assert err <= 1e-4, err


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", help="check an exported model directory with transformers")
    args = ap.parse_args()
    if args.check_export:
        check_export(args.check_export)
    else:
        labels5 = {i: f"class{i}" for i in range(5)}
        aux = variant("aux", tiny_config(id2label=labels5, label2id={v: k for k, v in labels5.items()},
                                         auxiliary_channels=8, auxiliary_num_convs=2,
                                         auxiliary_concat_input=True), seed=0, size=32, labels_size=32)
        labels4 = {i: f"class{i}" for i in range(4)}
        variant("noaux", tiny_config(image_size=48, num_hidden_layers=5, out_indices=[2, 3, 4, 5], use_auxiliary_head=False,
                                     use_mean_pooling=False, layer_scale_init_value=0.0,
                                     id2label=labels4, label2id={v: k for k, v in labels4.items()}),
                seed=20, size=48, labels_size=40)
        mmseg_copy(aux, "aux_mmseg")
        segment_fixture()
        eval_fixture()
        print("fixtures written to", os.path.abspath(ROOT))
