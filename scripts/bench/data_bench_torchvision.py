#!/usr/bin/env python3
"""torchvision side of the loader benchmark: ImageFolder + DataLoader with BEiT's two-view
pre-training transform (unilm DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4), flip, one
RandomResizedCrop box resized to 224 bicubic and 112 Lanczos, ToTensor + Normalize(0.5) and
map_pixels).

Usage: python scripts/bench/data_bench_torchvision.py FOLDER [WORKERS] [EPOCHS] [BATCH]
Last line: `torch_images_per_sec <best epoch>`.
"""
import resource
import sys
import time

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode as IM


class TwoViewCrop(T.RandomResizedCrop):
    """One RandomResizedCrop box, resized twice (as unilm's ...WithTwoPic)."""

    def __init__(self, size=224, second_size=112):
        super().__init__(size, interpolation=IM.BICUBIC)
        self.second_size = second_size

    def forward(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return (F.resized_crop(img, i, j, h, w, [self.size[0]] * 2, IM.BICUBIC),
                F.resized_crop(img, i, j, h, w, [self.second_size] * 2, IM.LANCZOS))


class BeitAug:
    def __init__(self):
        self.common = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(0.5), TwoViewCrop()])
        self.patch = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
        self.tok = T.ToTensor()

    def __call__(self, img):
        a, b = self.common(img)
        return self.patch(a), 0.8 * self.tok(b) + 0.1


def main():
    folder = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    torch.set_num_threads(1)
    ds = ImageFolder(folder, transform=BeitAug())
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=False, prefetch_factor=2 if workers else None)
    def cpu():
        # This process and its reaped children (the workers exit at the end of each epoch).
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    best, best_cpu = 0.0, float("inf")
    for epoch in range(epochs):
        start, cpu0 = time.perf_counter(), cpu()
        n = 0
        for (x, t), _ in dl:
            n += x.shape[0]
        dt = time.perf_counter() - start
        time.sleep(0.5)  # let the workers exit and be reaped, so their CPU time is counted
        ms = (cpu() - cpu0) * 1e3 / n
        best, best_cpu = max(best, n / dt), min(best_cpu, ms)
        print(f"epoch {epoch}: {n}/{len(ds)} images in {dt:.2f}s = {n / dt:.1f} images/s ({workers} workers), {ms:.2f} CPU ms per image")
    print(f"torch_images_per_sec {best:.1f}")
    print(f"torch_cpu_ms_per_image {best_cpu:.2f}")


if __name__ == "__main__":
    main()
