#!/usr/bin/env python3
"""Does MIM pre-training pay off, and by how much for each label budget? One command, on the full
Fashion-MNIST, with `beit-cli`.

The recipe (default `configs/study_fashion_mnist.toml`) is a demo-format TOML (`[tokenizer]`,
`[pretrain]`, `[finetune]`, `[probe]`) plus a `[study]` table: the seeds, the label budgets
(labelled images per class) and, per budget, overrides of the `[finetune]` table
(`[study.budget.N]`, merged key by key). The stages:

    tokenizer       our dVAE on the 60,000 training images, no labels (seed 0)
    pretrain        MIM pre-training on the same images, no labels (seed 0; resumable: a
                    killed study continues the pre-training with `--resume` when run again)
    finetune        for every budget and seed: fine-tuned from the pre-training and from random
                    init (the same architecture), evaluated on the 10,000 test images
    probe           for every budget and seed: linear probes of the pre-trained and of the
                    random-init features on the same labelled and test images

The ablations of the paper's Table 4 are the same study with the pre-training changed, e.g.
`--set pretrain.masking.strategy=random` or `--set pretrain.objective.target=pixel-regression`
(no tokenizer), `--budgets 50`, `--tokenizer runs/study/tokenizer` and another `--out`.

The tokenizer and the pre-training run alone with `--threads-pretrain` threads (their wall time is
the study's pre-training budget); the fine-tunings and probes run `--jobs` at a time with
`--threads` threads each. Every stage writes its config (`OUT/configs/*.toml`), its run folder and,
when it succeeded, `OUT/<run>/done.json`; a run with a `done.json` is reused. At the end it
writes `OUT/study.md` (mean ± sample std over seeds, paired differences, every run) and
`OUT/study.png` (test top-1 against labels per class, error bars: the std over seeds).

Usage:

    cargo build --release -p beit-cli
    .venv/bin/python scripts/studies/label_budget.py \\
        --data fashion-mnist:/usr/share/datasets/fashion-mnist --out runs/study
"""
import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablate import ROOT, Runner, config_writer, load_recipe, mean_std, read_done  # noqa: E402

ARMS = [  # (run prefix, label in the table and chart, pretrained weights?)
    ("finetune-pre", "fine-tuned from MIM pre-training", True),
    ("finetune-rand", "fine-tuned from random init", False),
    ("probe-pre", "linear probe, pre-trained features", True),
    ("probe-rand", "linear probe, random-init features", False),
]
ALL = 0  # `labels_per_class = 0` in the recipe: every training label


def merge(base, over):
    """`over` merged into a copy of `base`, table by table."""
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def budget_name(b):
    return "all" if b == ALL else str(b)


def finetune_table(recipe, budget):
    table = merge(recipe["finetune"], recipe["study"].get("budget", {}).get(budget_name(budget), {}))
    data = table.setdefault("data", {})
    if budget == ALL:
        data.pop("train_per_class", None)
    else:
        data["train_per_class"] = budget
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "configs", "study_fashion_mnist.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    ap.add_argument("--data", default="fashion-mnist:/usr/share/datasets/fashion-mnist", help="as beit-cli's --data")
    ap.add_argument("--seeds", help="override [study].seeds, e.g. 0,1,2")
    ap.add_argument("--budgets", help="override [study].labels_per_class, e.g. 10,50 (0: all labels)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--threads-pretrain", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--beit-cli", default=os.path.join(ROOT, "target", "release", "beit-cli"))
    ap.add_argument("--tokenizer", help="a trained tokenizer to use instead of training one (e.g. another study's)")
    ap.add_argument("--pretrain-only", action="store_true", help="stop after the pre-training")
    ap.add_argument("--report-only", action="store_true", help="write the table and chart from the finished runs")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    study = recipe["study"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else study["seeds"]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else study["labels_per_class"]
    if args.report_only:
        write_report(args, budgets, seeds, None)
        return 0

    write_cfg = config_writer(args.out)
    runner = Runner(args)
    t0 = time.time()
    pre_argv = ["pretrain", "--config", write_cfg("pretrain", recipe["pretrain"]), "--data", args.data, "--quiet"]
    if recipe["pretrain"].get("objective", {}).get("target", "visual-tokens") != "pixel-regression":
        tokenizer = args.tokenizer or os.path.join(args.out, "tokenizer")
        if not args.tokenizer:
            tok = write_cfg("tokenizer", recipe["tokenizer"])
            runner.run("tokenizer", ["tokenizer", "train", "--config", tok, "--data", args.data, "--quiet"],
                       threads=args.threads_pretrain)
        pre_argv += ["--tokenizer", tokenizer]
    runner.run("pretrain", pre_argv, threads=args.threads_pretrain, resumable=True)
    if args.pretrain_only:
        return 0
    model = os.path.join(args.out, "pretrain", "model")

    def job(budget, seed, prefix, pretrained):
        b = budget_name(budget)
        kind = "finetune" if prefix.startswith("finetune") else "probe"
        if kind == "finetune":
            cfg = write_cfg(f"finetune-{b}", finetune_table(recipe, budget))
            argv = ["finetune", "--config", cfg]
        else:
            table = merge(recipe.get("probe", {}), {"data": finetune_table(recipe, budget)["data"]})
            argv = ["linear-probe", "--config", write_cfg(f"probe-{b}", table)]
        argv += ["--data", args.data, "--model", model, "--seed", str(seed), "--quiet",
                 "--set", f"pretrained={'true' if pretrained else 'false'}"]
        return runner.run(f"{prefix}-{b}-s{seed}", argv)

    # The long runs (large budgets) first, so that the pool ends with the short ones.
    jobs = [(b, s, p, w) for b in sorted(budgets, key=lambda b: -(b or 10**9)) for s in seeds for p, _, w in ARMS]
    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = {j: pool.submit(job, *j) for j in jobs}
        for j, fut in futs.items():
            try:
                fut.result()
            except Exception as e:  # report every failure, keep the others
                failed.append(f"{j}: {e}")
    for f in failed:
        print("FAILED", f, file=sys.stderr)
    write_report(args, budgets, seeds, time.time() - t0)
    return 1 if failed else 0


def accuracies(out, prefix, budget, seeds):
    """{seed: test top-1} of the finished runs of one arm and budget."""
    res = {}
    for s in seeds:
        r = read_done(out, f"{prefix}-{budget_name(budget)}-s{s}")
        if "eval" in r:
            res[s] = r["eval"]["acc1"]
    return res


def cell(xs):
    if not xs:
        return "-"
    m, sd = mean_std(xs)
    return f"**{m:.1f}**" if math.isnan(sd) else f"**{m:.1f} ± {sd:.1f}**"


def write_report(args, budgets, seeds, wall):
    acc = {(p, b): accuracies(args.out, p, b, seeds) for b in budgets for p, _, _ in ARMS}
    lines = [
        "| labels per class | " + " | ".join(label for _, label, _ in ARMS) + " | difference (paired) | per seed: pre / random |",
        "|---|" + "---|" * (len(ARMS) + 2),
    ]
    for b in budgets:
        pre, rand = acc[("finetune-pre", b)], acc[("finetune-rand", b)]
        diffs = [pre[s] - rand[s] for s in seeds if s in pre and s in rand]
        per_seed = ", ".join(f"{pre[s]:.1f} / {rand[s]:.1f}" for s in seeds if s in pre and s in rand)
        diff = "-" if not diffs else cell(diffs).replace("**", "") + " (" + ", ".join(f"{d:+.1f}" for d in diffs) + ")"
        lines.append(f"| {'all (6,000)' if b == ALL else b} | "
                     + " | ".join(cell(list(acc[(p, b)].values())) for p, _, _ in ARMS)
                     + f" | {diff} | {per_seed} |")
    lines.append("")
    times = {n: read_done(args.out, n).get("seconds") for n in ("tokenizer", "pretrain")}
    lines.append("Pre-training wall time: " + ", ".join(
        f"{n} {t / 60:.1f} min" if t else f"{n} -" for n, t in times.items()) + ".")
    if wall is not None:
        lines.append(f"Total wall time: {wall / 60:.1f} min ({args.jobs} fine-tunings at a time, "
                     f"{args.threads} thread each).")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(text)
    print(text)
    plot(args, budgets, acc)


def plot(args, budgets, acc):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    xs_all = {b: 6000 if b == ALL else b for b in budgets}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"finetune-pre": ("#1f5fa5", "-", "o"), "finetune-rand": ("#c0504d", "-", "s"),
              "probe-pre": ("#1f5fa5", "--", "o"), "probe-rand": ("#c0504d", "--", "s")}
    for prefix, label, _ in ARMS:
        pts = [(xs_all[b], *mean_std(list(acc[(prefix, b)].values()))) for b in budgets if acc[(prefix, b)]]
        if not pts:
            continue
        pts.sort()
        color, ls, marker = styles[prefix]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                    color=color, linestyle=ls, marker=marker, capsize=4, label=label)
    ax.set_xscale("log")
    ax.set_xticks([xs_all[b] for b in budgets], [("all\n6000" if b == ALL else str(b)) for b in budgets])
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test top-1 (%), 10,000 images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.52))
    ax.set_title("Fashion-MNIST: MIM pre-training vs random init (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "study.png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
