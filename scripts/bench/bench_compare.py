#!/usr/bin/env python3
"""Side-by-side throughput of `beit-cli bench` and its PyTorch peer (scripts/bench/bench_peer.py).

    python scripts/bench/bench_compare.py [--modes infer,train-mim] [--rounds 3] [--iters 3] \
        [--batch 8] [--image-size 224] [--model base] [--threads 2] [--device cpu] \
        [--dtype f32|bf16] [--bin target/release/beit-cli] [--out results.jsonl]

Both programs run ALTERNATELY (rust, torch, rust, torch, ...) in one invocation, `--rounds` times
per mode, each a fresh process with a warm-up step and `--iters` timed steps, on the same number of
threads (RAYON_NUM_THREADS / torch.set_num_threads). On a noisy machine only ratios from one such
run mean anything: the printed ratio is the median over rounds of (rust img/s / torch img/s) of
adjacent runs, next to the ratio of the medians. `--dtype bf16` compares beit-rs bf16 with
`torch.autocast("cpu", torch.bfloat16)`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"no JSON line from: {' '.join(cmd)}\n{out.stdout[-2000:]}")
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="infer,train-mim")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model", default="base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    p.add_argument("--bin", default=str(ROOT / "target" / "release" / "beit-cli"))
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", help="append every JSON result here")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                   help="also time beit-rs under extra environment variables, e.g. "
                        "'unfused:BEIT_FUSED_OPS=0' (the kernels of beit-kernels turned off), "
                        "'scalar:BEIT_KERNELS_ISA=scalar', or another binary: 'before:BIN=path'")
    a = p.parse_args()

    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    amp = {"f32": "none", "bf16": "bf16", "f16": "fp16"}[a.dtype]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            cfg = os.path.join(tmp, f"{mode}.json")
            common = ["--mode", mode, "--batch", str(a.batch), "--image-size", str(a.image_size),
                      "--iters", str(a.iters), "--device", a.device, "--json"]
            rust = [a.bin, "bench", *common, "--model", a.model, "--dtype", a.dtype,
                    "--dump-config", cfg]
            torch = [a.python, str(ROOT / "scripts" / "bench" / "bench_peer.py"), *common, "--config", cfg,
                     "--threads", str(a.threads), "--amp", amp]
            runners = [("beit-rs", rust, env)]
            for v in a.variant:
                name, _, assigns = v.partition(":")
                venv = dict(env)
                vcmd = rust
                for kv in filter(None, assigns.split(",")):
                    k, _, val = kv.partition("=")
                    if k == "BIN":
                        vcmd = [val, *rust[1:]]
                    else:
                        venv[k] = val
                runners.append((f"beit-rs[{name}]", vcmd, venv))
            results = {name: [] for name, _, _ in runners}
            pt = []
            for r in range(a.rounds):
                for name, cmd, e in runners:
                    results[name].append(run_json(cmd, e))
                pt.append(run_json(torch, env))
                line = ", ".join(
                    f"{name} {res[-1]['images_per_s']:.3f} img/s "
                    f"(x{res[-1]['images_per_s'] / pt[-1]['images_per_s']:.2f})"
                    for name, res in results.items())
                print(f"{mode} round {r + 1}: pytorch {pt[-1]['images_per_s']:.3f} img/s, {line}",
                      flush=True)
                if a.out:
                    with open(a.out, "a") as f:
                        for name, res in results.items():
                            f.write(json.dumps(dict(res[-1], runner=name)) + "\n")
                        f.write(json.dumps(pt[-1]) + "\n")
            tmed = statistics.median(x["images_per_s"] for x in pt)
            for name, rs in results.items():
                rmed = statistics.median(x["images_per_s"] for x in rs)
                paired = statistics.median(
                    x["images_per_s"] / y["images_per_s"] for x, y in zip(rs, pt))
                summary.append((mode, name, rmed, tmed, paired))
    print(f"\n{'mode':<10} {'runner':<22} {'img/s':>8} {'pytorch img/s':>14} "
          f"{'ratio (medians)':>16} {'ratio (paired)':>15}")
    for mode, name, rmed, tmed, paired in summary:
        print(f"{mode:<10} {name:<22} {rmed:>8.3f} {tmed:>14.3f} {rmed / tmed:>16.2f} {paired:>15.2f}")
    print(f"(batch {a.batch}, {a.image_size}px, {a.dtype}, {a.threads} threads, {a.device}, "
          f"{a.rounds} alternating rounds x {a.iters} timed steps)")


if __name__ == "__main__":
    main()
