#!/usr/bin/env python3
"""Reference outputs of Pillow / torchvision for the deterministic parts of beit-data.

Inputs (committed in fixtures/data/): chelsea.png (451x300, CC0, from the scikit-image 0.26.0 wheel)
and rocket.jpg (640x427, public domain, SpaceX, same wheel). For each case, the 8-bit result of
Pillow/torchvision is written as a PNG next to a manifest (fixtures/data/parity/manifest.json) that the
Rust test `crates/beit-data/tests/parity.rs` replays and compares pixel by pixel.

Also checked here (printed, not stored): that torchvision's Normalize and the Hugging Face
BeitImageProcessor equal `(u8 / 255 - mean) / std` of these 8-bit images, so that comparing the 8-bit
images is enough.

Usage: .venv/bin/python scripts/data_parity.py
"""
import json
import os

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode as IM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "data")
OUT = os.path.join(ROOT, "parity")
os.makedirs(OUT, exist_ok=True)

chelsea = Image.open(os.path.join(ROOT, "chelsea.png")).convert("RGB")
rocket = Image.open(os.path.join(ROOT, "rocket.jpg")).convert("RGB")
# Pillow's decode of the JPEG, stored losslessly: resize cases on it do not depend on JPEG decoders,
# and the Rust test measures the decoder difference separately.
rocket.save(os.path.join(OUT, "rocket_pil_decoded.png"))

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
               "nearest": Image.NEAREST, "box": Image.BOX, "hamming": Image.HAMMING}
TV = {"bilinear": IM.BILINEAR, "bicubic": IM.BICUBIC, "lanczos": IM.LANCZOS}

cases = []


def add(name, input_name, op, out_img, **params):
    fn = f"{name}.png"
    out_img.save(os.path.join(OUT, fn))
    cases.append({"name": name, "input": input_name, "op": op, "output": fn, **params})


inputs = {"chelsea.png": chelsea, "parity/rocket_pil_decoded.png": rocket}

# 1. Plain resizes (Pillow Image.resize), down and up, every filter we expose.
for input_name, img in inputs.items():
    stem = input_name.split("/")[-1].split(".")[0].split("_")[0]
    for filt, size in [("bicubic", (224, 224)), ("bilinear", (224, 224)), ("lanczos", (112, 112)),
                       ("bicubic", (173, 97)), ("nearest", (100, 75)), ("box", (150, 100)),
                       ("hamming", (150, 100))]:
        add(f"{stem}_resize_{filt}_{size[0]}x{size[1]}", input_name, "resize",
            img.resize(size, PIL_FILTERS[filt]), width=size[0], height=size[1], filter=filt)
# Upsampling a region (RandomResizedCrop with a small box): torchvision resized_crop.
for filt, size in [("bicubic", 224), ("lanczos", 112)]:
    box = dict(left=100, top=50, width=120, height=90)
    out = F.resized_crop(chelsea, box["top"], box["left"], box["height"], box["width"], [size, size], TV[filt])
    add(f"chelsea_resized_crop_{filt}_{size}", "chelsea.png", "resized_crop", out,
        size=size, filter=filt, **box)

# 2. Evaluation transforms.
# unilm: Resize(int(256/224*224)=256, bicubic) + CenterCrop(224).
ev = T.Compose([T.Resize(256, interpolation=IM.BICUBIC), T.CenterCrop(224)])
for input_name, img in inputs.items():
    stem = input_name.split("/")[-1].split(".")[0].split("_")[0]
    add(f"{stem}_eval_unilm_224", input_name, "eval_unilm", ev(img), size=224)
    # timm crop_pct 0.9 at 384 upsamples: Resize(floor(384/0.9)=426) + CenterCrop(384).
    ev2 = T.Compose([T.Resize(426, interpolation=IM.BICUBIC), T.CenterCrop(384)])
    add(f"{stem}_eval_timm_384", input_name, "eval_crop_pct", ev2(img), size=384, crop_pct=0.9)

# 3. BEiT two-view geometry for fixed crops (with and without flip): hflip, then one box resized
# to 224 bicubic and to 112 Lanczos (unilm RandomResizedCropAndInterpolationWithTwoPic).
for flip, box in [(False, (37, 12, 301, 260)), (True, (150, 40, 200, 180)), (False, (0, 0, 451, 300))]:
    left, top, w, h = box
    src = F.hflip(chelsea) if flip else chelsea
    v1 = F.resized_crop(src, top, left, h, w, [224, 224], IM.BICUBIC)
    v2 = F.resized_crop(src, top, left, h, w, [112, 112], IM.LANCZOS)
    tag = f"chelsea_twoview_{left}_{top}_{w}_{h}{'_flip' if flip else ''}"
    add(tag + "_patch224", "chelsea.png", "two_view_first", v1, left=left, top=top, width=w, height=h, flip=flip)
    add(tag + "_tok112", "chelsea.png", "two_view_second", v2, left=left, top=top, width=w, height=h, flip=flip)

# 4. ColorJitter with fixed factors and order, on the PIL image as timm's and unilm's transforms
# run it (Pillow's ImageEnhance: 8-bit blends truncated after each step, contrast mean over the
# whole image). Hue is the exception: beit-data rotates it in f32 HSV and rounds, as torchvision
# does on tensors (Pillow's 8-bit HSV round trip differs), so the hue case is made that way.
small = chelsea.resize((160, 106), Image.BICUBIC)
small.save(os.path.join(OUT, "chelsea_small.png"))
inputs["parity/chelsea_small.png"] = small
ADJ = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
       "saturation": F.adjust_saturation}
for i, (ops, box) in enumerate([
    ([("brightness", 1.3), ("contrast", 0.7), ("saturation", 1.4)], None),
    ([("saturation", 0.6), ("brightness", 0.8), ("contrast", 1.35)], (30, 20, 90, 70)),
    ([("contrast", 1.2), ("brightness", 1.1), ("saturation", 1.25)], (5, 50, 150, 40)),
    ([("hue", -0.23)], (5, 50, 150, 40)),
]):
    if ops[0][0] == "hue":
        x = F.adjust_hue(F.pil_to_tensor(small).float() / 255, ops[0][1])
        out = (x * 255 + 0.5).floor().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        out = Image.fromarray(out)
    else:
        out = small
        for name, f in ops:
            out = ADJ[name](out, f)
    if box is not None:
        out = out.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
    add(f"chelsea_small_jitter_{i}", "parity/chelsea_small.png", "jitter", out,
        ops=[[n, f] for n, f in ops], box=list(box) if box else None)

# 5. RandAugment operations with explicit arguments, as timm calls Pillow (geometric ones with
# BILINEAR resampling, which is what beit-data implements).
from PIL import ImageEnhance, ImageOps

FILL = (128, 128, 128)


def solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


RA = [
    ("AutoContrast", 0, lambda im, a: ImageOps.autocontrast(im)),
    ("Equalize", 0, lambda im, a: ImageOps.equalize(im)),
    ("Invert", 0, lambda im, a: ImageOps.invert(im)),
    ("PosterizeIncreasing", 2, lambda im, a: ImageOps.posterize(im, int(a))),
    ("SolarizeIncreasing", 100, lambda im, a: ImageOps.solarize(im, int(a))),
    ("SolarizeAdd", 99, lambda im, a: solarize_add(im, int(a))),
    ("ColorIncreasing", 1.7, lambda im, a: ImageEnhance.Color(im).enhance(a)),
    ("ContrastIncreasing", 0.4, lambda im, a: ImageEnhance.Contrast(im).enhance(a)),
    ("BrightnessIncreasing", 1.5, lambda im, a: ImageEnhance.Brightness(im).enhance(a)),
    ("SharpnessIncreasing", 1.8, lambda im, a: ImageEnhance.Sharpness(im).enhance(a)),
    ("SharpnessIncreasing", 0.3, lambda im, a: ImageEnhance.Sharpness(im).enhance(a)),
    ("Rotate", 17.0, lambda im, a: im.rotate(a, resample=Image.BILINEAR, fillcolor=FILL)),
    ("ShearX", 0.2, lambda im, a: im.transform(im.size, Image.AFFINE, (1, a, 0, 0, 1, 0), Image.BILINEAR, fillcolor=FILL)),
    ("ShearY", -0.25, lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, a, 1, 0), Image.BILINEAR, fillcolor=FILL)),
    ("TranslateXRel", 30.5, lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, a, 0, 1, 0), Image.BILINEAR, fillcolor=FILL)),
    ("TranslateYRel", -20.0, lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, a), Image.BILINEAR, fillcolor=FILL)),
]
for name, arg, fn in RA:
    add(f"chelsea_small_ra_{name}_{arg}", "parity/chelsea_small.png", "rand_augment_op", fn(small, arg),
        aug=name, arg=arg, fill=list(FILL), interpolation="bilinear")
# timm passes the training interpolation (bicubic for BEiT) to the geometric operations.
for name, arg, fn in [
    ("Rotate", -23.0, lambda im, a: im.rotate(a, resample=Image.BICUBIC, fillcolor=FILL)),
    ("ShearX", -0.15, lambda im, a: im.transform(im.size, Image.AFFINE, (1, a, 0, 0, 1, 0), Image.BICUBIC, fillcolor=FILL)),
    ("TranslateYRel", 12.3, lambda im, a: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, a), Image.BICUBIC, fillcolor=FILL)),
    ("Rotate", 9.0, lambda im, a: im.rotate(a, resample=Image.NEAREST, fillcolor=FILL)),
]:
    interp = "nearest" if name == "Rotate" and arg == 9.0 else "bicubic"
    add(f"chelsea_small_ra_{name}_{arg}_{interp}", "parity/chelsea_small.png", "rand_augment_op",
        fn(small, arg), aug=name, arg=arg, fill=list(FILL), interpolation=interp)

with open(os.path.join(OUT, "manifest.json"), "w") as f:
    json.dump({"pillow": PIL.__version__, "torchvision": torchvision.__version__, "cases": cases}, f, indent=1)

# 6. Checks printed only: the float pipelines are the 8-bit image through (x/255 - mean)/std.
u8 = ev(chelsea)
t = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])(u8)
ref = (torch.from_numpy(np.array(u8)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
print("torchvision Normalize vs (u8/255-0.5)/0.5: max diff", float((t - ref).abs().max()))
try:
    from transformers import BeitImageProcessor
    proc = BeitImageProcessor(do_resize=True, size={"height": 224, "width": 224}, resample=Image.BILINEAR,
                              do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pv = proc(chelsea, return_tensors="pt")["pixel_values"][0]
    u8 = chelsea.resize((224, 224), Image.BILINEAR)
    ref = (torch.from_numpy(np.array(u8)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    print("HF BeitImageProcessor vs PIL bilinear squash + normalise: max diff", float((pv - ref).abs().max()))
except Exception as e:  # transformers missing or API change: report, the fixtures are still valid
    print("HF processor check skipped:", e)
print(f"wrote {len(cases)} cases to {OUT} (Pillow {PIL.__version__}, torchvision {torchvision.__version__})")
