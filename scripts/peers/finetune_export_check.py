"""Check that a `beit-cli finetune` export loads in Hugging Face transformers and predicts what
`beit-cli predict` predicts.

    cargo run -p beit-cli -- finetune --config configs/finetune_fashion_mnist.toml --output runs/ft
    .venv/bin/python scripts/peers/finetune_export_check.py runs/ft/best_model IMAGE...

Loads the directory with `BeitForImageClassification.from_pretrained` (every weight must be
used; none may be missing) and `BeitImageProcessor.from_pretrained`, runs each image, runs
`beit-cli predict --json` on the same images, and compares the top-5 classes and
probabilities (atol 1e-4: Pillow and our resampler may differ by one grey level on photos).
Exits non-zero on any mismatch.
"""

import json
import os
import subprocess
import sys

import torch
from PIL import Image
from transformers import BeitForImageClassification, BeitImageProcessor


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    model_dir, images = sys.argv[1], sys.argv[2:]
    model, info = BeitForImageClassification.from_pretrained(model_dir, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        print(f"loading problems: {problems}")
        return 1
    processor = BeitImageProcessor.from_pretrained(model_dir)
    exe = os.environ.get("BEIT_CLI", "beit-cli")
    ours = json.loads(
        subprocess.run(
            [exe, "predict", "--json", "--top-k", "5", "--model", model_dir, *images],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    ok = True
    for path, mine in zip(images, ours):
        x = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            probs = torch.softmax(model(x).logits[0], -1)
        top = torch.topk(probs, min(5, probs.numel()))
        theirs = [(int(i), float(p)) for p, i in zip(top.values, top.indices)]
        mine_pairs = [(p["index"], p["probability"]) for p in mine["predictions"]]
        same = [a[0] for a in theirs] == [b[0] for b in mine_pairs] and all(
            abs(a[1] - b[1]) < 1e-4 for a, b in zip(theirs, mine_pairs)
        )
        ok &= same
        print(f"{'ok ' if same else 'BAD'} {path}: transformers {theirs[:3]} / beit-cli {mine_pairs[:3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
