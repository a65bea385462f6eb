#!/usr/bin/env python3
"""Reference fixture for `beit-cli knn` (fixtures/knn/): DINO's weighted k-NN, computed by PyTorch.

The formula, restated from DINO's `eval_knn.py` (Caron et al., 2021): features are L2-normalised;
each validation feature's cosine similarity to every training feature is computed; its `k` most
similar training features vote for their label with weight `exp(sim / T)`; the classes are ranked
by their summed votes; top-1 and top-5 accuracy count the validation rows whose label is first, or
among the first five. Ties are broken towards the lower index (training row, then class), with
stable sorts, so the ranking is fully determined; the Rust side uses the same rule.

Writes, from a fixed seed:
  fixtures/knn/train.safetensors, fixtures/knn/val.safetensors  (`features` f32 (N, C),
      `labels` i64 (N)) in the layout `beit-cli embed` writes;
  fixtures/knn/expected.json  (T, and top-1/top-5 in percent for every k).

The features are drawn around per-class centres (so the accuracies are neither 0 nor 100) and
rounded to multiples of 1/64, which keeps every similarity far from a tie.

Usage: python scripts/knn_fixtures.py   (needs torch, numpy, safetensors)
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "knn")
T = 0.07
KS = [1, 5, 10, 20, 100]
NUM_CLASSES = 7
DIM = 16


def draw(rng, centres, n):
    labels = rng.integers(0, NUM_CLASSES, size=n)
    feats = centres[labels] + 1.5 * rng.standard_normal((n, DIM))
    feats = np.round(feats * 64) / 64
    return torch.tensor(feats, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def knn(train_f, train_y, val_f, val_y, k, t):
    train_f = torch.nn.functional.normalize(train_f, dim=1)
    val_f = torch.nn.functional.normalize(val_f, dim=1)
    sims = val_f @ train_f.T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    top_sims = torch.gather(sims, 1, order)
    one_hot = torch.zeros(val_f.shape[0], k, NUM_CLASSES, dtype=torch.float64)
    one_hot.scatter_(2, train_y[order].unsqueeze(-1), 1.0)
    votes = (one_hot * (top_sims.double() / t).exp().unsqueeze(-1)).sum(1)
    ranked = torch.sort(votes, dim=1, descending=True, stable=True).indices
    top1 = (ranked[:, 0] == val_y).double().mean().item() * 100
    top5 = (ranked[:, :5] == val_y.unsqueeze(1)).any(1).double().mean().item() * 100
    return top1, top5


def main():
    rng = np.random.default_rng(20211)
    centres = rng.standard_normal((NUM_CLASSES, DIM))
    train_f, train_y = draw(rng, centres, 400)
    val_f, val_y = draw(rng, centres, 150)
    os.makedirs(ROOT, exist_ok=True)
    save_file({"features": train_f, "labels": train_y}, os.path.join(ROOT, "train.safetensors"))
    save_file({"features": val_f, "labels": val_y}, os.path.join(ROOT, "val.safetensors"))
    results = []
    for k in KS:
        top1, top5 = knn(train_f, train_y, val_f, val_y, k, T)
        results.append({"k": k, "top1": top1, "top5": top5})
    expected = {"temperature": T, "num_classes": NUM_CLASSES, "results": results,
                "torch": torch.__version__}
    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
