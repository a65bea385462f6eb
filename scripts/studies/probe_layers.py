#!/usr/bin/env python3
"""Linear probe of every block of a pre-trained BEiT (paper, Appendix D: the middle blocks' features
probe best), with `beit-cli linear-probe --layer L` for L = 0 (patch embeddings) .. num_hidden_layers.

Each model is `NAME=DIR` (a folder with config.json and weights, e.g. a `pretrain` run's `model/`),
or `NAME=random:DIR` for that architecture at random init (`linear-probe --set pretrained=false`);
every layer of every model is one run in `OUT/NAME-L{L}`, reused when its `done.json` exists. Runs
execute `--jobs` at a time, one thread each, under `nice`. Writes `OUT/probe.md` (top-1 per layer)
and `OUT/probe.png` (one curve per model).

Usage:

    .venv/bin/python scripts/studies/probe_layers.py --model beit=runs/ablate/pretrain-beit-s0/model \\
        --data fashion-mnist:/usr/share/datasets/fashion-mnist --out runs/probe [--set train.epochs=20]
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def run_layer(args, name, model, layer):
    out = os.path.join(args.out, f"{name}-L{layer}")
    done = os.path.join(out, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    subprocess.run(["rm", "-rf", out], check=True)
    extra = []
    if model.startswith("random:"):
        model, extra = model[len("random:"):], ["--set", "pretrained=false"]
    cmd = ["nice", "-n", str(args.nice), args.beit_cli, "linear-probe", "--model", model, "--layer", str(layer),
           "--data", args.data, "--output", out, "--set", "data.num_workers=1"] + extra
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), BEIT_LOG="warn")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    t = time.time()
    print(time.strftime("%H:%M:%S"), "start", name, layer, flush=True)
    with open(os.path.join(args.out, "logs", f"{name}-L{layer}.log"), "w") as logf:
        logf.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        logf.flush()
        r = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{name} layer {layer} failed (exit {r.returncode})")
    evals = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "eval":
                evals.append(rec)
    result = {"seconds": time.time() - t, "acc1": evals[-1]["acc1"], "best_acc1": max(e["acc1"] for e in evals)}
    with open(done, "w") as f:
        json.dump(result, f)
    print(time.strftime("%H:%M:%S"), "done", name, layer, f"{result['acc1']:.2f}%", flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=[random:]DIR")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="to every linear-probe run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--beit-cli", default=os.path.join(ROOT, "target", "release", "beit-cli"))
    args = ap.parse_args()
    models = []
    for m in args.model:
        name, _, path = m.partition("=")
        with open(os.path.join(path.removeprefix("random:"), "config.json")) as f:
            depth = json.load(f)["num_hidden_layers"]
        models.append((name, path, depth))
    t0 = time.time()
    jobs = [(n, p, l) for n, p, d in models for l in range(d + 1)]
    with ThreadPoolExecutor(args.jobs) as pool:
        res = dict(zip([(n, l) for n, _, l in jobs], pool.map(lambda j: run_layer(args, *j), jobs)))
    wall = time.time() - t0
    depth = max(d for _, _, d in models)
    lines = ["| layer | " + " | ".join(n for n, _, _ in models) + " |", "|---" * (len(models) + 1) + "|"]
    for l in range(depth + 1):
        cells = [f"{res[(n, l)]['acc1']:.2f}" if (n, l) in res else "-" for n, _, _ in models]
        lines.append(f"| {l}{' (patch embeddings)' if l == 0 else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Wall time: {wall / 60:.1f} min ({args.jobs} runs at a time, {args.threads} thread each).")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n, _, d in models:
        ax.plot(range(d + 1), [res[(n, l)]["acc1"] for l in range(d + 1)], marker="o", label=n)
    ax.set_xlabel("block (0 = patch embeddings)")
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_xticks(range(depth + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Linear probe per block, Fashion-MNIST", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "probe.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
