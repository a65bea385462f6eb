#!/usr/bin/env python
"""Parity fixtures for `beit-tokenizer` (the DALL-E dVAE port), made with OpenAI's `dall_e` package.

What it writes under fixtures/tokenizer/ (all small, committed so CI needs no Python):

* `dalle_small.json`                 -- the constructor arguments of the small encoder/decoder.
* `dalle_small_encoder.safetensors`  -- a random-initialised `dall_e.Encoder` state dict, dall_e's names.
* `dalle_small_decoder.safetensors`  -- the same for `dall_e.Decoder`.
* `dalle_small_encoder.pkl`          -- the encoder pickled as a whole module with `torch.save(module)`,
                                        the way OpenAI published `encoder.pkl` (tests the pkl reader).
* `legacy_block.pkl`                 -- one tiny `dall_e` encoder block saved in the legacy (pre-1.6,
                                        non-zip) `torch.save` layout, also read by the pkl reader.
* `images/*.png`                     -- real photo crops (scikit-image, public domain): two at 112 px and
                                        one at 64 px (a non-default size: 8x8 tokens).
* `expected.safetensors`             -- encoder logits and argmax ids per image, decoder outputs for the
                                        ids of the cat crop (raw 6 channels and the reconstruction).

The small models keep dall_e's block structure (4 groups x 2 blocks, post-gain 1/64, n_init) but use
narrow widths (n_hid=16) so the files stay small; dall_e's attrs validators insist on n_hid >= 64 and
vocab >= 512, so they are switched off while building (the classes are otherwise used unchanged).
Biases are perturbed: dall_e initialises them to zero, which would hide a missing or misplaced bias.

`--full DIR` additionally builds the full-size encoder (n_hid=256, vocab 8192, 53.8M parameters),
saves it to DIR/dalle_full_encoder.safetensors with logits on one crop (not committed: 215 MB); the
ignored Rust test `full_size_encoder_matches` reads it from $BEIT_DALLE_FULL_DIR.

Usage: .venv/bin/python scripts/tokenizer_fixtures.py [--photos DIR] [--full DIR]
`--photos` is the `skimage/data` folder of the scikit-image 0.26.0 wheel; without it the wheel is
downloaded with pip into a temporary folder.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import attr
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from dall_e import Decoder, Encoder, map_pixels, unmap_pixels
from dall_e.encoder import EncoderBlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "tokenizer")

SMALL = dict(n_hid=16, n_blk_per_group=2, vocab_size=512, input_channels=3, n_init=32, output_channels=3)


def photos_dir(arg):
    if arg:
        return arg
    tmp = tempfile.mkdtemp()
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, "scikit-image==0.26.0"])
    whl = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
    with zipfile.ZipFile(os.path.join(tmp, whl)) as z:
        for name in ("astronaut.png", "chelsea.png", "coffee.png"):
            z.extract(f"skimage/data/{name}", tmp)
    return os.path.join(tmp, "skimage", "data")


def crops(photos):
    """(name, PIL image) pairs: square crops of real photos, resized with Lanczos as BEiT does."""

    def crop(file, box, size):
        im = Image.open(os.path.join(photos, file)).convert("RGB").crop(box)
        return im.resize((size, size), Image.LANCZOS)

    return [
        ("chelsea_112", crop("chelsea.png", (100, 20, 340, 260), 112)),  # the cat's face
        ("astronaut_112", crop("astronaut.png", (120, 0, 376, 256), 112)),  # face and helmet
        ("coffee_64", crop("coffee.png", (150, 60, 470, 380), 64)),  # the cup, 8x8 tokens
    ]


def to_tensor(im):
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x.unsqueeze(0).contiguous()


def perturb(module, gen):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def state(module):
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", default=None)
    ap.add_argument("--full", default=None, help="also write a full-size encoder + logits to this folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)

    attr.set_run_validators(False)  # small widths for small fixtures; the classes are dall_e's own
    enc = Encoder(n_hid=SMALL["n_hid"], n_blk_per_group=SMALL["n_blk_per_group"],
                  input_channels=SMALL["input_channels"], vocab_size=SMALL["vocab_size"],
                  use_mixed_precision=False)
    dec = Decoder(n_init=SMALL["n_init"], n_hid=SMALL["n_hid"], n_blk_per_group=SMALL["n_blk_per_group"],
                  output_channels=SMALL["output_channels"], vocab_size=SMALL["vocab_size"],
                  use_mixed_precision=False)
    attr.set_run_validators(True)
    perturb(enc, gen)
    perturb(dec, gen)
    enc.eval()
    dec.eval()

    with open(os.path.join(OUT, "dalle_small.json"), "w") as f:
        json.dump(SMALL, f, indent=2)
        f.write("\n")
    save_file(state(enc), os.path.join(OUT, "dalle_small_encoder.safetensors"))
    save_file(state(dec), os.path.join(OUT, "dalle_small_decoder.safetensors"))
    torch.save(enc, os.path.join(OUT, "dalle_small_encoder.pkl"))
    # The pre-1.6 `torch.save` layout (a sequence of pickles, then raw storages), on one tiny block.
    attr.set_run_validators(False)
    block = EncoderBlock(n_in=4, n_out=8, n_layers=2)
    attr.set_run_validators(True)
    perturb(block, gen)
    # The legacy layout records each module class's source file; keep only the path inside
    # site-packages so the fixture does not carry this machine's directories.
    import torch.serialization as ts

    real = ts.get_source_lines_and_file

    def neutral_source(obj, error_msg=None):
        lines, lineno, path = real(obj, error_msg)
        return lines, lineno, path.split("site-packages/")[-1]

    ts.get_source_lines_and_file = neutral_source
    try:
        torch.save(block, os.path.join(OUT, "legacy_block.pkl"), _use_new_zipfile_serialization=False)
    finally:
        ts.get_source_lines_and_file = real

    expected = {}
    with torch.no_grad():
        for name, im in crops(photos_dir(args.photos)):
            im.save(os.path.join(OUT, "images", f"{name}.png"))
            x = map_pixels(to_tensor(im))
            logits = enc(x)
            ids = logits.argmax(1)
            expected[f"{name}.logits"] = logits[0].contiguous()
            expected[f"{name}.ids"] = ids[0].to(torch.int64).contiguous()
            top2 = logits[0].topk(2, dim=0).values
            print(f"{name}: logits {tuple(logits.shape)}, min top1-top2 gap {(top2[0] - top2[1]).min():.3e}")
            if name == "chelsea_112":  # one image is enough for the decoder (keeps the files small)
                z = torch.nn.functional.one_hot(ids, num_classes=SMALL["vocab_size"]).permute(0, 3, 1, 2).float()
                out = dec(z)
                expected[f"{name}.decoder_out"] = out[0].contiguous()
                expected[f"{name}.recon"] = unmap_pixels(torch.sigmoid(out[:, :3]))[0].contiguous()
    for k, v in state(block).items():
        expected[f"legacy_block.{k}"] = v
    save_file(expected, os.path.join(OUT, "expected.safetensors"))

    n_enc = sum(p.numel() for p in enc.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    print(f"small encoder {n_enc} params, decoder {n_dec} params; wrote {OUT}")

    if args.full:
        os.makedirs(args.full, exist_ok=True)
        full = Encoder(use_mixed_precision=False)
        perturb(full, gen)
        full.eval()
        n = sum(p.numel() for p in full.parameters())
        print(f"full encoder: {n} params, {len(full.state_dict())} tensors")
        save_file(state(full), os.path.join(args.full, "dalle_full_encoder.safetensors"))
        im = Image.open(os.path.join(OUT, "images", "chelsea_112.png"))
        with torch.no_grad():
            logits = full(map_pixels(to_tensor(im)))
        save_file({"logits": logits[0].contiguous(), "ids": logits.argmax(1)[0].to(torch.int64).contiguous()},
                  os.path.join(args.full, "dalle_full_expected.safetensors"))
        print(f"full encoder logits {tuple(logits.shape)} written to {args.full}")


if __name__ == "__main__":
    main()
