#!/usr/bin/env python3
"""Make an ImageNet-like folder of real JPEGs for the loader benchmark.

Sources: the colour photos of the scikit-image 0.26.0 wheel (astronaut, chelsea, coffee, rocket,
motorcycle_left/right, hubble_deep_field, retina, ihc; CC0 / public domain). Each output image is a
random crop of a source photo resized to ImageNet's typical size (shorter side 333..500, aspect
3:4..4:3), saved as JPEG quality 90, in OUT/<class>/<n>.JPEG.

Usage: python scripts/bench/data_bench_folder.py SKIMAGE_DATA_DIR OUT [N_CLASSES] [PER_CLASS]
"""
import os
import random
import sys

from PIL import Image

src_dir, out = sys.argv[1], sys.argv[2]
n_classes = int(sys.argv[3]) if len(sys.argv) > 3 else 10
per_class = int(sys.argv[4]) if len(sys.argv) > 4 else 100
names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
         "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]
photos = [Image.open(os.path.join(src_dir, n)).convert("RGB") for n in names if os.path.exists(os.path.join(src_dir, n))]
rng = random.Random(0)
for c in range(n_classes):
    d = os.path.join(out, f"n{c:08d}")
    os.makedirs(d, exist_ok=True)
    for i in range(per_class):
        p = photos[rng.randrange(len(photos))]
        w, h = p.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = p.crop((x, y, x + cw, y + ch))
        short = rng.randint(333, 500)
        aspect = rng.uniform(3 / 4, 4 / 3)
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        crop.resize(size, Image.BICUBIC).save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)
print(f"wrote {n_classes * per_class} JPEGs to {out} from {len(photos)} photos")
