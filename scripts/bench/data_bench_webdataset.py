#!/usr/bin/env python3
"""webdataset side of the shard benchmark: tar shards read by webdataset (shard shuffle, a
1000-sample shuffle buffer, split by worker) into torchvision's BEiT two-view pre-training
transform (the same `BeitAug` as scripts/bench/data_bench_torchvision.py), through a DataLoader.

Usage: python scripts/bench/data_bench_webdataset.py 'SHARDS/train/shard-{000000..000123}.tar' \
           [WORKERS] [EPOCHS] [BATCH]
Last lines: `wds_images_per_sec <best epoch>`, `wds_cpu_ms_per_image <best epoch>`.
"""
import os
import resource
import sys
import time

import torch
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_bench_torchvision import BeitAug  # noqa: E402


def main():
    shards = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    torch.set_num_threads(1)
    aug = BeitAug()
    ds = (
        wds.WebDataset(shards, shardshuffle=True, nodesplitter=wds.split_by_node,
                       workersplitter=wds.split_by_worker)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;jpeg;png;webp", "cls")
        .map_tuple(aug, int)
        .batched(batch, partial=True)
    )
    dl = wds.WebLoader(ds, batch_size=None, num_workers=workers,
                       prefetch_factor=2 if workers else None)

    def cpu():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    best, best_cpu = 0.0, float("inf")
    for epoch in range(epochs):
        start, cpu0 = time.perf_counter(), cpu()
        n = 0
        for (x, _t), _labels in dl:
            n += x.shape[0]
        dt = time.perf_counter() - start
        time.sleep(0.5)  # let the workers exit and be reaped, so their CPU time is counted
        ms = (cpu() - cpu0) * 1e3 / max(n, 1)
        best, best_cpu = max(best, n / dt), min(best_cpu, ms)
        print(f"epoch {epoch}: {n} images in {dt:.2f}s = {n / dt:.1f} images/s ({workers} workers), {ms:.2f} CPU ms per image")
    print(f"wds_images_per_sec {best:.1f}")
    print(f"wds_cpu_ms_per_image {best_cpu:.2f}")


if __name__ == "__main__":
    main()
