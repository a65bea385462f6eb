#!/usr/bin/env python3
"""Build the embedded Fashion-MNIST subset compiled into `beit-data`.

Takes the first N_TRAIN/10 images of every class from the training split and the
first N_TEST/10 of every class from the test split (original order kept, so the
subset is reproducible), and writes them as gzipped IDX files (mtime 0, so the
bytes are deterministic) into crates/beit-data/data/fashion-mnist/.

Source: Debian `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist).
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence.

Usage: python3 scripts/data_fashion_subset.py [SRC_DIR] [N_TRAIN] [N_TEST]
"""
import gzip
import os
import struct
import sys

import numpy as np

SRC = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
N_TRAIN = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
N_TEST = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "beit-data", "data", "fashion-mnist")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def write_idx(path, arr):
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
            f.write(header + arr.astype(np.uint8).tobytes())


def subset(images, labels, n):
    per_class = n // 10
    idx = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(10)])
    idx.sort()  # keep the original order, classes interleaved
    return images[idx], labels[idx]


os.makedirs(OUT, exist_ok=True)
for split, prefix, n in [("train", "train", N_TRAIN), ("test", "t10k", N_TEST)]:
    images = read_idx(os.path.join(SRC, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(SRC, f"{prefix}-labels-idx1-ubyte.gz"))
    xi, yl = subset(images, labels, n)
    write_idx(os.path.join(OUT, f"{prefix}-images-idx3-ubyte.gz"), xi)
    write_idx(os.path.join(OUT, f"{prefix}-labels-idx1-ubyte.gz"), yl)
    print(split, xi.shape, np.bincount(yl, minlength=10).tolist(), "checksum", int(xi.astype(np.int64).sum()))
