#!/usr/bin/env python3
"""Make the parity fixtures of `beit-model` with Hugging Face `transformers` (and timm) themselves.

Each variant is a small random-initialised model whose every parameter is perturbed (HF init leaves
biases, tables and tokens at zero, which would hide bugs), saved in the real HF layout
(`config.json` + weights) next to `expected.safetensors`: inputs and the outputs (logits, hidden
states, attentions) that the Rust tests must reproduce within 1e-4.

    .venv/bin/python scripts/model_fixtures.py            # writes fixtures/model/
    .venv/bin/python scripts/model_fixtures.py --base DIR # full-size base models (not committed)
    .venv/bin/python scripts/model_fixtures.py --check-export DIR  # transformers loads our export

Environment: python3 -m venv; pip install torch transformers timm safetensors scipy pillow.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "model")


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "relative_position_bias_table" in name or name.endswith("_token") or "position_embeddings" in name:
                p.copy_(noise * 0.5)
            elif "lambda" in name:
                p.copy_(0.1 + 0.05 * noise)
            elif p.ndim == 1 and ("layernorm" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(noise * 0.05)
    return model


def tiny_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8, vocab_size=64, drop_path_rate=0.1,
                attn_implementation="eager")
    base.update(kw)
    return BeitConfig(**base)


def outputs_dict(prefix, out, logits_name="logits"):
    d = {f"{prefix}logits": getattr(out, logits_name).detach().contiguous()}
    for i, h in enumerate(out.hidden_states or ()):
        d[f"{prefix}hidden_states.{i}"] = h.detach().contiguous()
    for i, a in enumerate(out.attentions or ()):
        d[f"{prefix}attentions.{i}"] = a.detach().contiguous()
    return d


def save_variant(name, model, tensors, max_shard_size=None):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    return out


def pixels(seed, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 3, size, size), generator=g)


def mim_shared():
    torch.manual_seed(0)
    cfg = tiny_config(use_mask_token=True, use_shared_relative_position_bias=True,
                      use_relative_position_bias=False, layer_norm_eps=1e-12)
    model = perturb(BeitForMaskedImageModeling(cfg), 1).eval()
    x = pixels(2)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand((2, 16), generator=g) < 0.4
    with torch.no_grad():
        out = model(x, bool_masked_pos=mask, output_hidden_states=True, output_attentions=True)
        hr = model(pixels(4, size=48), bool_masked_pos=torch.zeros((2, 36), dtype=torch.bool),
                   interpolate_pos_encoding=True)
    t = {"pixel_values": x, "bool_masked_pos": mask.to(torch.uint8)}
    t.update(outputs_dict("", out))
    t["hr.pixel_values"] = pixels(4, size=48)
    t["hr.logits"] = hr.logits.contiguous()
    save_variant("mim_shared", model, t)


def classifier(name="cls_per_layer", safe=True, max_shard_size=None):
    torch.manual_seed(0)
    labels = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]
    cfg = tiny_config(use_relative_position_bias=True, use_mean_pooling=True, layer_norm_eps=1e-12,
                      id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = perturb(BeitForImageClassification(cfg), 5).eval()
    x = pixels(6)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
        hr = model(pixels(7, size=48), interpolate_pos_encoding=True)
    t = {"pixel_values": x}
    t.update(outputs_dict("", out))
    t["hr.pixel_values"] = pixels(7, size=48)
    t["hr.logits"] = hr.logits.contiguous()
    out = save_variant(name, model, t, max_shard_size=max_shard_size)
    if not safe:
        # transformers >= 5 only writes safetensors: write the legacy `pytorch_model.bin` (zip-based
        # torch.save of the state dict with the hub key names, int64 index buffers included, as the
        # published .bin files have them).
        from safetensors.torch import load_file
        path = os.path.join(out, "model.safetensors")
        sd = load_file(path)
        for i in range(cfg.num_hidden_layers):
            prefix = f"beit.encoder.layer.{i}.attention.attention.relative_position_bias."
            sd[prefix + "relative_position_index"] = torch.zeros((17, 17), dtype=torch.int64)
        torch.save(sd, os.path.join(out, "pytorch_model.bin"))
        os.remove(path)


def predict_fixture():
    """`beit-cli predict` end to end: the cls_per_layer model with a hub-style preprocessor config,
    real photos (JPEG, PNG, grey, RGBA) and the probabilities of transformers' own pipeline."""
    from PIL import Image
    from transformers import BeitImageProcessorPil
    from transformers import BeitForImageClassification as Cls
    photos = os.path.join(ROOT, "..", "data")
    out = os.path.join(ROOT, "predict")
    shutil.rmtree(out, ignore_errors=True)
    model = Cls.from_pretrained(os.path.join(ROOT, "cls_per_layer")).eval()
    model.save_pretrained(out)
    proc = BeitImageProcessorPil(size={"height": 32, "width": 32}, resample=2, do_center_crop=False,
                                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc.save_pretrained(out)
    cat = Image.open(os.path.join(photos, "chelsea.png")).convert("RGB")
    rocket = Image.open(os.path.join(photos, "rocket.jpg"))
    images = {
        "rocket.jpg": None,
        "cat_gray.png": cat.convert("L").resize((150, 100), Image.BICUBIC),
        "rocket_rgba.png": rocket.convert("RGBA").resize((120, 160), Image.BICUBIC),
        "cat_small.jpg": cat.resize((90, 60), Image.BICUBIC),
    }
    for name, im in images.items():
        if im is None:
            shutil.copy(os.path.join(photos, name), os.path.join(out, name))
        else:
            im.save(os.path.join(out, name), quality=92) if name.endswith(".jpg") else im.save(os.path.join(out, name))
    expected = []
    for name in images:
        im = Image.open(os.path.join(out, name))
        pix = proc(images=im.convert("RGB"), return_tensors="pt").pixel_values
        with torch.no_grad():
            probs = model(pix).logits.softmax(-1)[0]
        top = probs.argsort(descending=True)[:3]
        expected.append({"image": name, "probabilities": probs.tolist(),
                         "top": [int(i) for i in top], "labels": [model.config.id2label[int(i)] for i in top]})
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def abs_pos_cls_pool():
    torch.manual_seed(0)
    cfg = tiny_config(use_absolute_position_embeddings=True, use_mean_pooling=False,
                      use_relative_position_bias=False, layer_scale_init_value=0.0, layer_norm_eps=1e-6,
                      id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    model = perturb(BeitForImageClassification(cfg), 8).eval()
    x = pixels(9)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
        hr = model(pixels(10, size=48), interpolate_pos_encoding=True)
    t = {"pixel_values": x}
    t.update(outputs_dict("", out))
    t["hr.pixel_values"] = pixels(10, size=48)
    t["hr.logits"] = hr.logits.contiguous()
    save_variant("abs_pos_cls_pool", model, t)


def timm_unilm():
    """A timm BEiT (unilm key names) saved as safetensors and as a unilm-style .pth {'model': ...}."""
    import timm.models.beit as tb
    torch.manual_seed(0)
    model = tb.Beit(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4,
                    mlp_ratio=2.0, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
    perturb(model, 11).eval()
    x = pixels(12)
    with torch.no_grad():
        logits = model(x)
    out = os.path.join(ROOT, "timm_unilm")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"))
    # unilm files keep the state dict under "model" and carry int64 index buffers: add them.
    pth = dict(sd)
    for i, blk in enumerate(model.blocks):
        pth[f"blocks.{i}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
    torch.save({"model": pth, "epoch": 3}, os.path.join(out, "checkpoint.pth"))
    cfg = dict(model_type="beit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, image_size=32, patch_size=8, layer_norm_eps=1e-6,
               use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
               id2label={str(i): f"class_{i}" for i in range(5)})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file({"pixel_values": x, "logits": logits.contiguous()}, os.path.join(out, "expected.safetensors"))


def geometric_resize():
    """unilm's fine-tuning resize of a relative position table, restated with scipy's bicubic
    interpolating spline (RectBivariateSpline, s=0: what interp2d(kind='cubic') fitted on a grid)."""
    from scipy.interpolate import RectBivariateSpline
    g = torch.Generator().manual_seed(13)
    heads, src_grid, dst_grid = 4, 4, 6
    src, dst = 2 * src_grid - 1, 2 * dst_grid - 1
    table = torch.randn((src * src + 3, heads), generator=g)

    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src // 2) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    xs = [-d for d in reversed(dis)] + [0] + dis
    t = dst // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    cols = []
    for h in range(heads):
        z = table[: src * src, h].view(src, src).double().numpy()
        spline = RectBivariateSpline(xs, xs, z, kx=3, ky=3, s=0)
        cols.append(torch.from_numpy(spline(dx, dx)).float().reshape(-1, 1))
    resized = torch.cat([torch.cat(cols, dim=1), table[src * src:]], dim=0)
    os.makedirs(ROOT, exist_ok=True)
    save_file({"table": table, "resized": resized.contiguous()}, os.path.join(ROOT, "geometric_resize.safetensors"))


def base_models(out_dir):
    """Full-size base configs (not committed): run the ignored Rust test with BEIT_BASE_FIXTURES=DIR."""
    global ROOT
    ROOT = out_dir
    for name, cfg, cls in [
        ("base_mim", BeitConfig(use_mask_token=True, use_shared_relative_position_bias=True,
                                attn_implementation="eager"), BeitForMaskedImageModeling),
        ("base_cls", BeitConfig(use_relative_position_bias=True, num_labels=1000,
                                attn_implementation="eager"), BeitForImageClassification),
    ]:
        torch.manual_seed(0)
        model = perturb(cls(cfg), 21).eval()
        x = pixels(22, b=1, size=224)
        kw = {}
        if cls is BeitForMaskedImageModeling:
            g = torch.Generator().manual_seed(23)
            kw["bool_masked_pos"] = torch.rand((1, 196), generator=g) < 0.4
        with torch.no_grad():
            out = model(x, output_hidden_states=True, **kw)
        t = {"pixel_values": x, "logits": out.logits.contiguous(),
             "hidden_states.12": out.hidden_states[-1].contiguous()}
        if kw:
            t["bool_masked_pos"] = kw["bool_masked_pos"].to(torch.uint8)
        save_variant(name, model, t)


def check_export(path):
    """Load a directory exported by beit-rs with transformers and compare with its expected logits."""
    from safetensors.torch import load_file
    exp = load_file(os.path.join(path, "expected.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cls = BeitForMaskedImageModeling if "BeitForMaskedImageModeling" in cfg["architectures"] else BeitForImageClassification
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        kw = {"bool_masked_pos": exp["bool_masked_pos"].bool()} if "bool_masked_pos" in exp else {}
        logits = model(exp["pixel_values"], **kw).logits
    err = (logits - exp["logits"]).abs().max().item()
    print(f"{path}: transformers loads the export; max abs logit error {err:.3e}")
    assert err <= 1e-4, err


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="write full-size base fixtures to this directory")
    ap.add_argument("--check-export", help="check an exported model directory with transformers")
    args = ap.parse_args()
    if args.check_export:
        check_export(args.check_export)
    elif args.base:
        base_models(args.base)
    else:
        mim_shared()
        classifier()
        classifier("cls_per_layer_bin", safe=False)
        classifier("cls_per_layer_sharded", max_shard_size="20KB")
        abs_pos_cls_pool()
        timm_unilm()
        geometric_resize()
        predict_fixture()
        print("fixtures written to", os.path.abspath(ROOT))
