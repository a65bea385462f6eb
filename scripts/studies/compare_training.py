#!/usr/bin/env python3
"""Train the same fine-tuning recipe with beit-rs (`beit-cli finetune`, release binary) and with its
PyTorch peer (`scripts/peers/train_peer.py`) for several seeds, and print top-1 per epoch as mean ± std
over the seeds, one column per variant.

A variant is `NAME=KIND` or `NAME=KIND:EXTRA ARGS`, KIND `ours` or `peer`; the extra arguments go
to that variant's command only (e.g. `--init unilm` for the peer, `--set aug.reprob=0` for
ours). `--set` options given to this script go to every variant. Each run writes
`OUT/NAME-s{seed}/metrics.jsonl`; a run whose log already holds every epoch is reused (delete its
directory, or pass `--fresh`, to run it again). Runs are executed `--jobs` at a time, each on one
thread (`RAYON_NUM_THREADS=1` and `data.num_workers=1` for ours, `--threads 1` for the peer).

Usage:

    cargo build --release -p beit-cli
    .venv/bin/python scripts/studies/compare_training.py --config configs/finetune_fashion_mnist.toml \\
        --seeds 0,1,2 --jobs 2 --out runs/compare \\
        [--variant pytorch=peer --variant beit-rs=ours] [--set aug.reprob=0] [--markdown]

The table's std is the sample standard deviation (n - 1) over seeds; the last column flags the
epochs where the second variant's mean is below the first's by more than the first's std.
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def read_acc1(kind, run_dir):
    """Top-1 per 0-based epoch from a run's metrics.jsonl (ours logs the epochs done, 1-based)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if r.get("kind") != "eval":
                continue
            e = int(r["epoch"]) - (1 if kind == "ours" else 0)
            out[e] = float(r["acc1"])
    return out


def command(kind, args, extra, seed, run_dir):
    if kind == "ours":
        cmd = [
            args.beit_cli,
            "finetune",
            "--config",
            args.config,
            "--output",
            run_dir,
            "--seed",
            str(seed),
            "--set",
            "data.num_workers=1",
        ]
        env = dict(os.environ, RAYON_NUM_THREADS="1")
    else:
        cmd = [
            args.python,
            os.path.join(ROOT, "scripts", "peers", "train_peer.py"),
            "--config",
            args.config,
            "--output",
            run_dir,
            "--seed",
            str(seed),
            "--threads",
            "1",
        ]
        env = dict(os.environ)
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    for s in args.set:
        cmd += ["--set", s]
    return cmd + extra, env


def run_one(job):
    name, kind, extra, seed, args = job
    run_dir = os.path.join(args.out, f"{name}-s{seed}")
    want = args.epochs_expected
    if not args.fresh and len(read_acc1(kind, run_dir)) >= want:
        return name, seed, "reused", 0.0
    if os.path.exists(run_dir):
        subprocess.run(["rm", "-rf", run_dir], check=True)
    cmd, env = command(kind, args, extra, seed, run_dir)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, f"{name}-s{seed}.log")
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    status = "ok" if rc == 0 else f"exit {rc} (see {log})"
    return name, seed, status, time.time() - t0


def mean_std(xs):
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n == 1:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="override train.epochs for every run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[:ARGS]")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--beit-cli", default=os.path.join(ROOT, "target", "release", "beit-cli"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--fresh", action="store_true", help="rerun even complete runs")
    ap.add_argument("--no-run", action="store_true", help="only summarise existing runs")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", help="also write the per-seed values and summary here")
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = []
    for v in args.variant or ["pytorch=peer", "beit-rs=ours"]:
        if "=" not in v:
            sys.exit(f"--variant {v!r}: expected NAME=KIND[:ARGS]")
        name, spec = v.split("=", 1)
        kind, _, extra = spec.partition(":")
        if kind not in ("ours", "peer"):
            sys.exit(f"--variant {v!r}: KIND must be ours or peer")
        variants.append((name, kind, shlex.split(extra)))
    if args.epochs is not None:
        args.epochs_expected = args.epochs
    else:
        try:
            import tomllib
        except ImportError:
            import tomli as tomllib
        with open(args.config, "rb") as f:
            args.epochs_expected = int(tomllib.load(f).get("train", {}).get("epochs", 100))
    if not args.no_run:
        if any(k == "ours" for _, k, _ in variants) and not os.path.exists(args.beit_cli):
            sys.exit(f"{args.beit_cli} not found: cargo build --release -p beit-cli")
        jobs = [(n, k, e, s, args) for s in seeds for n, k, e in variants]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for name, seed, status, secs in pool.map(run_one, jobs):
                print(f"{name} seed {seed}: {status} ({secs:.0f} s)", file=sys.stderr, flush=True)

    per = {}
    for name, kind, _ in variants:
        per[name] = {s: read_acc1(kind, os.path.join(args.out, f"{name}-s{s}")) for s in seeds}
    epochs = args.epochs_expected
    rows = []
    for e in range(epochs):
        row = {"epoch": e}
        for name, _, _ in variants:
            xs = [per[name][s][e] for s in seeds if e in per[name][s]]
            row[name] = (*mean_std(xs), len(xs))
        rows.append(row)

    names = [n for n, _, _ in variants]
    flag = len(names) >= 2
    if args.markdown:
        head = "| epoch | " + " | ".join(f"{n} top-1 (mean ± std)" for n in names) + " |"
        if flag:
            head += f" {names[1]} within 1 std of {names[0]} or above |"
        print(head)
        print("|" + "---|" * (1 + len(names) + (1 if flag else 0)))
    else:
        print("epoch  " + "  ".join(f"{n:>22}" for n in names))
    for row in rows:
        cells = []
        for n in names:
            m, sd, k = row[n]
            cells.append(f"{m:.1f} ± {sd:.1f} (n={k})" if k else "-")
        ok = ""
        if flag:
            (m0, sd0, k0), (m1, _, k1) = row[names[0]], row[names[1]]
            ok = "?" if not (k0 and k1) else ("yes" if m1 >= m0 - (sd0 if k0 > 1 else 0) else "no")
        if args.markdown:
            print(f"| {row['epoch']} | " + " | ".join(cells) + (f" | {ok} |" if flag else " |"))
        else:
            print(f"{row['epoch']:>5}  " + "  ".join(f"{c:>22}" for c in cells) + f"  {ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": args.config,
                    "set": args.set,
                    "seeds": seeds,
                    "variants": [{"name": n, "kind": k, "args": e} for n, k, e in variants],
                    "acc1": {n: {str(s): per[n][s] for s in seeds} for n in names},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
