#!/usr/bin/env python3
"""Parity fixtures for the other published checkpoints of the BEiT architecture, each made by its
own library: timm BEiT v2 and v1 (timm's hub layout: `config.json` with `architecture`,
`pretrained_cfg`, `model_args`, and `model.safetensors` in timm names), transformers
data2vec-vision (classifier, and a pre-trained backbone saved without prefix), and DiT (BEiT with
absolute position embeddings: MIM and a 16-class classifier).

Every model is small, random-initialised with every parameter perturbed, and saved exactly as its
library saves it. Next to it: `expected.safetensors` (inputs and outputs) and, for classifiers,
`expected_predict.json` (the probabilities of the library's own image pipeline on the photos of
`fixtures/data/jpeg`, which this script also writes: JPEG variants of `chelsea.png` at 4:2:0,
4:2:2, 4:4:4, progressive, grey and CMYK, each with Pillow's decoded pixels as a PNG).

    .venv/bin/python scripts/family_fixtures.py     # writes fixtures/family/ and fixtures/data/jpeg/

Environment: python3 -m venv .venv; .venv/bin/pip install torch transformers timm safetensors pillow.
"""
import json
import os
import shutil

import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "fixtures", "family")
DATA = os.path.join(HERE, "..", "fixtures", "data")
JPEG_DIR = os.path.join(DATA, "jpeg")


def perturb(model, seed):
    """Move every parameter away from its init (zeros/ones would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("relative_position_bias_table" in name or name.endswith("_token") or "position_embeddings" in name
                    or "pos_embed" in name):
                p.copy_(noise * 0.5)
            elif "lambda" in name or "gamma" in name:
                p.copy_(0.1 + 0.05 * noise)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(noise * 0.05)
    return model


def pixels(seed, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, 3, size, size), generator=g)


def fresh(name):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    return out


# ----------------------------------------------------------------------------------------------
# Photos: JPEG variants of chelsea.png written by Pillow, with Pillow's decode of each.

JPEG_VARIANTS = {
    # name: (mode, save kwargs)
    "chelsea_420.jpg": ("RGB", dict(quality=90, subsampling=2)),
    "chelsea_422.jpg": ("RGB", dict(quality=90, subsampling=1)),
    "chelsea_444.jpg": ("RGB", dict(quality=90, subsampling=0)),
    "chelsea_progressive.jpg": ("RGB", dict(quality=85, subsampling=2, progressive=True)),
    "chelsea_gray.jpg": ("L", dict(quality=90)),
    "chelsea_cmyk.jpg": ("CMYK", dict(quality=90)),
}


def jpeg_photos():
    shutil.rmtree(JPEG_DIR, ignore_errors=True)
    os.makedirs(JPEG_DIR)
    cat = Image.open(os.path.join(DATA, "chelsea.png")).convert("RGB")
    # Odd sizes: partial MCUs at the right and bottom edges exercise the upsampling edges.
    cat = cat.resize((157, 105), Image.BICUBIC)
    manifest = []
    for name, (mode, kw) in JPEG_VARIANTS.items():
        path = os.path.join(JPEG_DIR, name)
        cat.convert(mode).save(path, **kw)
        decoded = Image.open(path)
        decoded.convert("RGB").save(path.replace(".jpg", ".pillow.png"))
        manifest.append({"jpeg": name, "pillow_rgb": name.replace(".jpg", ".pillow.png"),
                         "mode": decoded.mode, "size": list(decoded.size)})
    # The big real photo (baseline 4:2:0 from the camera pipeline) is decoded too.
    rocket = Image.open(os.path.join(DATA, "rocket.jpg"))
    manifest.append({"jpeg": "../rocket.jpg", "pillow_rgb": "../parity/rocket_pil_decoded.png",
                     "mode": rocket.mode, "size": list(rocket.size)})
    rocket.convert("RGB").save(os.path.join(JPEG_DIR, "..", "parity", "rocket_pil_decoded.png"))
    import PIL.features
    with open(os.path.join(JPEG_DIR, "manifest.json"), "w") as f:
        json.dump({"pillow": Image.__version__, "libjpeg_turbo": PIL.features.version("jpg"),
                   "images": manifest}, f, indent=1)


def photo_paths():
    """The photos the predict fixtures are computed on (paths relative to fixtures/data)."""
    return ["rocket.jpg", "chelsea.png"] + [f"jpeg/{n}" for n in JPEG_VARIANTS]


def predict_expectations(out, probs_of):
    """`probs_of(PIL image) -> probabilities`: the library's own pipeline, on every photo."""
    expected = []
    for rel in photo_paths():
        im = Image.open(os.path.join(DATA, rel)).convert("RGB")
        with torch.no_grad():
            probs = probs_of(im)
        top = probs.argsort(descending=True)[:5]
        expected.append({"image": rel, "probabilities": [float(p) for p in probs],
                         "top5": [int(i) for i in top]})
    with open(os.path.join(out, "expected_predict.json"), "w") as f:
        json.dump(expected, f, indent=1)


# ----------------------------------------------------------------------------------------------
# timm

TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)


def timm_model(name, arch, seed, crop_pct):
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf
    torch.manual_seed(0)
    # The pretrained_cfg keeps the published pipeline (interpolation, mean/std) at the tiny size.
    model = timm.create_model(arch, pretrained=False, **TINY_TIMM,
                              pretrained_cfg_overlay=dict(input_size=(3, 32, 32), crop_pct=crop_pct,
                                                          num_classes=5))
    perturb(model, seed).eval()
    out = fresh(name)
    save_for_hf(model, out, model_args=dict(TINY_TIMM), safe_serialization=True)
    x = pixels(seed + 1)
    with torch.no_grad():
        logits = model(x)
    save_file({"pixel_values": x, "logits": logits.contiguous()}, os.path.join(out, "expected.safetensors"))
    # timm's own eval pipeline on the saved files, loaded as a user loads a hub checkpoint.
    reloaded = timm.create_model(f"local-dir:{os.path.abspath(out)}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), logits), "timm reloads its export"
    data_cfg = resolve_data_config({}, model=reloaded)
    transform = create_transform(**data_cfg, is_training=False)
    print(name, data_cfg, transform)
    predict_expectations(out, lambda im: reloaded(transform(im).unsqueeze(0)).softmax(-1)[0])
    with open(os.path.join(out, "timm_data_config.json"), "w") as f:
        json.dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()}, f, indent=1)


# ----------------------------------------------------------------------------------------------
# transformers: data2vec-vision and DiT

def tiny_hf(cls_config, **kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8, drop_path_rate=0.1, attn_implementation="eager")
    base.update(kw)
    return cls_config(**base)


def outputs(out, attr, key="logits"):
    d = {key: getattr(out, attr).detach().contiguous()}
    for i, h in enumerate(out.hidden_states or ()):
        d[f"hidden_states.{i}"] = h.detach().contiguous()
    return d


def hf_predict(out, model, processor):
    processor.save_pretrained(out)
    predict_expectations(out, lambda im: model(processor(images=im, return_tensors="pt").pixel_values)
                         .logits.softmax(-1)[0])


def pil_processor(**kw):
    try:
        from transformers import BeitImageProcessorPil as Proc
    except ImportError:  # transformers < 5
        from transformers import BeitImageProcessor as Proc
    return Proc(**kw)


def data2vec_classifier():
    from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification
    torch.manual_seed(0)
    labels = ["tabby", "rocket", "tench", "goldfish", "daisy"]
    cfg = tiny_hf(Data2VecVisionConfig, use_relative_position_bias=True, use_mean_pooling=True,
                  layer_norm_eps=1e-12, id2label=dict(enumerate(labels)),
                  label2id={l: i for i, l in enumerate(labels)})
    model = perturb(Data2VecVisionForImageClassification(cfg), 31).eval()
    out = fresh("d2v_cls")
    model.save_pretrained(out)
    x = pixels(32)
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
    save_file({"pixel_values": x, **outputs(o, "logits")}, os.path.join(out, "expected.safetensors"))
    hf_predict(out, model, pil_processor(size={"height": 32, "width": 32}, resample=2, do_center_crop=False,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3))


def data2vec_pretrained():
    """A pre-trained-only backbone: shared relative bias, CLS pooling (final layernorm), saved
    by `Data2VecVisionModel.save_pretrained` (no prefix, no pooler)."""
    from transformers import Data2VecVisionConfig, Data2VecVisionModel
    torch.manual_seed(0)
    cfg = tiny_hf(Data2VecVisionConfig, use_shared_relative_position_bias=True, use_relative_position_bias=False,
                  use_mean_pooling=False, layer_norm_eps=1e-12, architectures=["Data2VecVisionModel"])
    model = perturb(Data2VecVisionModel(cfg, add_pooling_layer=False), 33).eval()
    out = fresh("d2v_pt")
    model.save_pretrained(out)
    x = pixels(34)
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
    save_file({"pixel_values": x, **outputs(o, "last_hidden_state", "last_hidden_state")}, os.path.join(out, "expected.safetensors"))


def dit_mim():
    from transformers import BeitConfig, BeitForMaskedImageModeling
    torch.manual_seed(0)
    # microsoft/dit-base: absolute position embeddings, no relative bias, mask token, MIM head.
    cfg = tiny_hf(BeitConfig, use_absolute_position_embeddings=True, use_relative_position_bias=False,
                  use_shared_relative_position_bias=False, use_mask_token=True, use_mean_pooling=True,
                  vocab_size=64, layer_norm_eps=1e-12)
    model = perturb(BeitForMaskedImageModeling(cfg), 35).eval()
    out = fresh("dit_mim")
    model.save_pretrained(out)
    x = pixels(36)
    g = torch.Generator().manual_seed(37)
    mask = torch.rand((2, 16), generator=g) < 0.4
    with torch.no_grad():
        o = model(x, bool_masked_pos=mask, output_hidden_states=True)
    save_file({"pixel_values": x, "bool_masked_pos": mask.to(torch.uint8), **outputs(o, "logits")},
              os.path.join(out, "expected.safetensors"))


def dit_classifier():
    from transformers import BeitConfig, BeitForImageClassification
    torch.manual_seed(0)
    # microsoft/dit-*-finetuned-rvlcdip: the 16 RVL-CDIP document classes, mean pooling.
    labels = ["letter", "form", "email", "handwritten", "advertisement", "scientific report",
              "scientific publication", "specification", "file folder", "news article", "budget",
              "invoice", "presentation", "questionnaire", "resume", "memo"]
    cfg = tiny_hf(BeitConfig, use_absolute_position_embeddings=True, use_relative_position_bias=False,
                  use_mean_pooling=True, layer_norm_eps=1e-12, id2label=dict(enumerate(labels)),
                  label2id={l: i for i, l in enumerate(labels)})
    model = perturb(BeitForImageClassification(cfg), 38).eval()
    out = fresh("dit_cls")
    model.save_pretrained(out)
    x = pixels(39)
    with torch.no_grad():
        o = model(x, output_hidden_states=True)
    save_file({"pixel_values": x, **outputs(o, "logits")}, os.path.join(out, "expected.safetensors"))
    # Shorter side then a centre crop (odd margins on these photos): transformers' rounding.
    hf_predict(out, model, pil_processor(size={"shortest_edge": 37}, resample=3, do_center_crop=True,
                                         crop_size={"height": 32, "width": 32},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3))


def fuzz_seeds():
    """Small, valid files the fuzz tests mutate: a torch.save'd state dict (zip layout) and a bare
    pickle of the same dict (protocol 2, the legacy layout's opcodes)."""
    out = os.path.join(ROOT, "fuzz_seeds")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    g = torch.Generator().manual_seed(41)
    sd = {"embeddings.cls_token": torch.randn((1, 1, 4), generator=g),
          "classifier.weight": torch.randn((3, 4), generator=g),
          "classifier.bias": torch.randn(3, generator=g).half(),
          "encoder.layer.0.attention.attention.relative_position_index": torch.arange(6).view(2, 3)}
    torch.save(sd, os.path.join(out, "state_dict.bin"))
    import pickle
    with open(os.path.join(out, "data.pkl"), "wb") as f:
        import zipfile
        with zipfile.ZipFile(os.path.join(out, "state_dict.bin")) as z:
            f.write(z.read([n for n in z.namelist() if n.endswith("data.pkl")][0]))
    with open(os.path.join(out, "plain_protocol2.pkl"), "wb") as f:
        pickle.dump({"a": [1, 2.5, "x"], "b": (None, True)}, f, protocol=2)


if __name__ == "__main__":
    os.makedirs(ROOT, exist_ok=True)
    jpeg_photos()
    timm_model("timm_beitv2", "beitv2_base_patch16_224", 21, crop_pct=0.95)
    timm_model("timm_beit", "beit_base_patch16_224", 23, crop_pct=0.9)
    data2vec_classifier()
    data2vec_pretrained()
    dit_mim()
    dit_classifier()
    fuzz_seeds()
    print("fixtures written to", os.path.abspath(ROOT), "and", os.path.abspath(JPEG_DIR))
