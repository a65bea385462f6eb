#!/usr/bin/env python3
"""The BEiT paper's Table 4 ablations in miniature, on Fashion-MNIST, with `beit-cli`.

Variants (each pre-trained, then fine-tuned with the same budget and linear-probed on the same
labelled images, for every seed):

    beit            blockwise masking, visual-token targets (the paper's recipe)
    random-mask     random masking of the same number of patches, visual-token targets
    pixel-regress   blockwise masking, regression of the masked patches' normalised pixels
    none            no pre-training: the same classifier fine-tuned (and probed) from random init

The recipe is a demo-format TOML (`[tokenizer.*]`, `[pretrain.*]`, `[finetune.*]`, `[probe.*]`; default
`configs/demo.toml`), with `--set STAGE.KEY=VALUE` overrides (a TOML value; a bare word is a
string). The tokenizer is trained once (seed 0) and shared by the token variants; each seed
then runs `pretrain`, `finetune` and `linear-probe` per variant (`none` fine-tunes and probes,
from random init, the architecture of the `beit` pre-training of that seed). Every stage writes its config
(`OUT/configs/*.toml`), its run folder and, when it succeeded, `OUT/<run>/done.json`; a run
with a `done.json` is reused (delete the folder to run it again). Runs execute `--jobs` at a
time, each on one thread (`RAYON_NUM_THREADS=1`, `data.num_workers=1`) under `nice`.

At the end it writes `OUT/ablations.md` (mean ± sample std over seeds, and every run) and
`OUT/ablations.png` (bar chart of both metrics with error bars: the std over seeds).

Usage:

    cargo build --release -p beit-cli
    .venv/bin/python scripts/studies/ablate.py --data fashion-mnist:/usr/share/datasets/fashion-mnist \\
        --seeds 0,1,2 --jobs 2 --out runs/ablate [--set finetune.train.epochs=30]
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

VARIANTS = {
    "beit": {"masking.strategy": "blockwise", "objective.target": "visual-tokens"},
    "random-mask": {"masking.strategy": "random", "objective.target": "visual-tokens"},
    "pixel-regress": {"masking.strategy": "blockwise", "objective.target": "pixel-regression"},
    "none": None,
}
LABELS = {
    "beit": "BEiT (blockwise, visual tokens)",
    "random-mask": "random masking",
    "pixel-regress": "pixel regression",
    "none": "no pre-training",
}


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(table, prefix=""):
    """A nested dict as TOML text (scalars first, then sub-tables)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines.append(f"\n[{name}]")
            lines.append(to_toml(v, name + ".").strip("\n"))
    return "\n".join(lines) + "\n"


def parse_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(table, dotted, value):
    *path, last = dotted.split(".")
    for p in path:
        table = table.setdefault(p, {})
    table[last] = value


def load_recipe(path, overrides):
    """The recipe TOML at `path` with the `STAGE.KEY=VALUE` strings of `overrides` applied."""
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    for s in overrides:
        k, _, v = s.partition("=")
        set_key(recipe, k.strip(), parse_value(v.strip()))
    return recipe


def config_writer(out):
    """A function writing a table to `out/configs/NAME.toml` and returning that path."""
    cfg_dir = os.path.join(out, "configs")
    os.makedirs(cfg_dir, exist_ok=True)

    def write_cfg(name, table):
        p = os.path.join(cfg_dir, name + ".toml")
        with open(p, "w") as f:
            f.write(to_toml(table))
        return p

    return write_cfg


class Runner:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.times = {}

    def log(self, msg):
        with self.lock:
            print(time.strftime("%H:%M:%S"), msg, flush=True)

    def run(self, name, argv, threads=None, resumable=False):
        """Run one stage into OUT/name unless it is done; returns its done.json.

        An unfinished run is started again, or, when `resumable` and it left a checkpoint,
        continued with `--resume` (its `seconds` then count only this part)."""
        out = os.path.join(self.args.out, name)
        done = os.path.join(out, "done.json")
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        resume = resumable and any(d.startswith("checkpoint-") for d in listdir(out))
        if os.path.exists(out) and not resume:
            subprocess.run(["rm", "-rf", out], check=True)
        threads = threads or self.args.threads
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), BEIT_LOG="warn")
        cmd = ["nice", "-n", str(self.args.nice), self.args.beit_cli] + argv + ["--output", out]
        cmd += ["--resume"] if resume else []
        self.log(f"{'resume' if resume else 'start'} {name}")
        t = time.time()
        os.makedirs(os.path.join(self.args.out, "logs"), exist_ok=True)
        with open(os.path.join(self.args.out, "logs", name + ".log"), "a" if resume else "w") as logf:
            logf.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
            logf.flush()
            r = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        secs = time.time() - t
        if r.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {r.returncode}); see logs/{name}.log")
        result = {"seconds": secs}
        metrics = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics):
            evals = [r for r in read_jsonl(metrics) if r.get("kind") == "eval"]
            if evals:
                result["eval"] = evals[-1]
            steps = [r for r in read_jsonl(metrics) if r.get("kind") == "step"]
            if steps:
                result["first_step"], result["last_step"] = steps[0], steps[-1]
        with open(done, "w") as f:
            json.dump(result, f, indent=1)
        self.log(f"done  {name} in {secs:.0f} s {summary(result)}")
        return result


def listdir(path):
    return os.listdir(path) if os.path.isdir(path) else []


def read_jsonl(path):
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def summary(result):
    e = result.get("eval")
    return f"(top-1 {e['acc1']:.2f}%)" if e and "acc1" in e else ""


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "configs", "demo.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    ap.add_argument("--data", default="fashion-mnist", help="as beit-cli's --data")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--beit-cli", default=os.path.join(ROOT, "target", "release", "beit-cli"))
    ap.add_argument("--report-only", action="store_true", help="write the table and chart from the finished runs")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    recipe = load_recipe(args.recipe, args.set)
    for stage in ("tokenizer", "pretrain", "finetune"):
        recipe.setdefault(stage, {}).setdefault("data", {})["num_workers"] = 1
    write_cfg = config_writer(args.out)

    if args.report_only:
        results = {}
        for v in variants:
            for s in seeds:
                r = read_done(args.out, f"finetune-{v}-s{s}")
                if r:
                    results[(v, s)] = r
        write_report(args, variants, seeds, results, None)
        return 0
    runner = Runner(args)
    t0 = time.time()
    tok_cfg = write_cfg("tokenizer", recipe["tokenizer"])
    runner.run("tokenizer", ["tokenizer", "train", "--config", tok_cfg, "--data", args.data, "--quiet"])
    tok_dir = os.path.join(args.out, "tokenizer")

    pre_cfgs = {}
    for v in variants:
        if VARIANTS[v] is None:
            continue
        table = json.loads(json.dumps(recipe["pretrain"]))
        for k, val in VARIANTS[v].items():
            set_key(table, k, val)
        pre_cfgs[v] = write_cfg(f"pretrain-{v}", table)
    ft_cfg = write_cfg("finetune", recipe["finetune"])
    probe = json.loads(json.dumps(recipe.get("probe", {})))
    probe["data"] = json.loads(json.dumps(recipe["finetune"].get("data", {})))
    probe_cfg = write_cfg("probe", probe)

    def chain(v, seed):
        base = "beit" if VARIANTS[v] is None else v
        pre = f"pretrain-{base}-s{seed}"
        if base not in pre_cfgs:
            table = json.loads(json.dumps(recipe["pretrain"]))
            for k, val in VARIANTS[base].items():
                set_key(table, k, val)
            pre_cfgs[base] = write_cfg(f"pretrain-{base}", table)
        argv = ["pretrain", "--config", pre_cfgs[base], "--data", args.data, "--seed", str(seed), "--quiet"]
        if VARIANTS[base]["objective.target"] != "pixel-regression":
            argv += ["--tokenizer", tok_dir]
        with pre_lock(pre):
            runner.run(pre, argv)
        model = os.path.join(args.out, pre, "model")
        pretrained = f"pretrained={'false' if VARIANTS[v] is None else 'true'}"
        ft = runner.run(
            f"finetune-{v}-s{seed}",
            ["finetune", "--config", ft_cfg, "--data", args.data, "--model", model, "--seed", str(seed),
             "--set", pretrained],
        )
        runner.run(
            f"probe-{v}-s{seed}",
            ["linear-probe", "--config", probe_cfg, "--data", args.data, "--model", model, "--seed", str(seed),
             "--quiet", "--set", pretrained],
        )
        return ft

    locks = {}

    def pre_lock(name):
        with runner.lock:
            return locks.setdefault(name, threading.Lock())

    # Pre-trained variants first, `none` last (it reuses the `beit` pre-training's architecture).
    jobs = [(v, s) for s in seeds for v in variants if VARIANTS[v] is not None]
    jobs += [(v, s) for s in seeds for v in variants if VARIANTS[v] is None]
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = {(v, s): pool.submit(chain, v, s) for v, s in jobs}
        failed = []
        for key, fut in futs.items():
            try:
                results[key] = fut.result()
            except Exception as e:  # report every failure, keep the others
                failed.append(f"{key}: {e}")
    wall = time.time() - t0
    for f in failed:
        print("FAILED", f, file=sys.stderr)
    write_report(args, variants, seeds, results, wall)
    return 1 if failed else 0


def fmt_mean_std(xs):
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"**{m:.2f}{'' if math.isnan(sd) else f' ± {sd:.2f}'}**"


def write_report(args, variants, seeds, results, wall):
    rows, bars = [], []
    for v in variants:
        accs = [results[(v, s)]["eval"]["acc1"] for s in seeds if (v, s) in results and "eval" in results[(v, s)]]
        if not accs:
            continue
        m, sd = mean_std(accs)
        probes = [
            r["eval"]["acc1"] for r in (read_done(args.out, f"probe-{v}-s{s}") for s in seeds) if "eval" in r
        ]
        pre_secs = [
            read_done(args.out, f"pretrain-{v}-s{s}")["seconds"] for s in seeds
            if read_done(args.out, f"pretrain-{v}-s{s}")
        ] if VARIANTS[v] is not None else []
        ft_secs = [results[(v, s)]["seconds"] for s in seeds if (v, s) in results]
        rows.append((v, m, sd, accs, pre_secs, ft_secs, probes))
        bars.append((LABELS[v], m, sd))
    lines = [
        "| variant | fine-tuned top-1 % (mean ± std) | n | per seed | linear probe top-1 % (mean ± std) | "
        "per seed | pre-train s/run | fine-tune s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, m, sd, accs, pre, ft, probes in rows:
        pre_t = f"{sum(pre) / len(pre):.0f}" if pre else "-"
        lines.append(
            f"| {LABELS[v]} | {fmt_mean_std(accs)} | {len(accs)} | {', '.join(f'{a:.2f}' for a in accs)} | "
            f"{fmt_mean_std(probes)} | {', '.join(f'{a:.2f}' for a in probes)} | {pre_t} | {sum(ft) / len(ft):.0f} |"
        )
    lines.append("")
    if wall is not None:
        lines.append(f"Total wall time: {wall / 60:.1f} min ({args.jobs} runs at a time, {args.threads} thread each).")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ablations.md"), "w") as f:
        f.write(text)
    print(text)
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    names = [b[0] for b in bars]
    width = 0.38
    for j, (label, color, pick) in enumerate(
        [("fine-tuned", "#3b6ea5", lambda r: r[3]), ("linear probe", "#a5c8a0", lambda r: r[6])]
    ):
        xs, ms, sds = [], [], []
        for i, r in enumerate(rows):
            vals = pick(r)
            if not vals:
                continue
            m, sd = mean_std(vals)
            x = i + (j - 0.5) * width
            xs.append(x), ms.append(m), sds.append(0.0 if math.isnan(sd) else sd)
            ax.scatter([x] * len(vals), vals, color="black", s=8, zorder=3)
        ax.bar(xs, ms, width, yerr=sds, capsize=4, color=color, label=label)
    ax.set_xticks(range(len(bars)), names, rotation=10, fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    every = [a for r in rows for a in r[3] + r[6]]
    ax.set_ylim(max(0, min(every) - 5), min(100, max(every) + 3))
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Table 4 in miniature: Fashion-MNIST, mean ± std over seeds (dots: runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ablations.png"), dpi=120)


def read_done(out, name):
    p = os.path.join(out, name, "done.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


if __name__ == "__main__":
    sys.exit(main())
