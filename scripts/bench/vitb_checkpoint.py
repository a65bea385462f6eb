#!/usr/bin/env python3
"""Write a ViT-B/16 224 classification checkpoint in transformers' layout, with the configuration
of `microsoft/beit-base-patch16-224` (relative position bias per layer, LayerScale 0.1, mean
pooling, 1,000 classes) and seeded random weights: a stand-in for the published checkpoint on
machines that cannot reach the hub, the same size and the same compute. Used by the serving
benchmark (scripts/bench/serve_bench.py), which loads it in `beit-cli serve` and in the peer.

Usage: python scripts/bench/vitb_checkpoint.py OUT_DIR
"""
import json
import os
import sys

import torch
from transformers import BeitConfig, BeitForImageClassification


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    config = BeitConfig(
        image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, use_relative_position_bias=True, use_shared_relative_position_bias=False,
        use_absolute_position_embeddings=False, layer_scale_init_value=0.1, use_mean_pooling=True,
        num_labels=1000,
    )
    BeitForImageClassification(config).save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "BeitImageProcessor", "do_resize": True,
                   "size": {"height": 224, "width": 224}, "resample": 2, "do_center_crop": False,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
