"""Learning curves of iql.py / idql.py runs from their evaluations.csv: a markdown table (each seed's
normalized score, mean +- std over the runs) and, with --plot, a PNG of the mean +- std.

    python docs/iql_curves.py runs/iql_s0 runs/iql_s1 runs/iql_s2 --data 39.5 --plot docs/iql_hopper.png
"""

import argparse
import csv
import os

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs="+", help="run folders, each with an evaluations.csv")
parser.add_argument("--every", type=int, default=10000, help="table rows every this many steps")
parser.add_argument("--data", type=float, help="the dataset's normalized score (a line in the plot)")
parser.add_argument("--plot", help="write the figure to this PNG")
args = parser.parse_args()

runs = [list(csv.DictReader(open(os.path.join(r, "evaluations.csv")))) for r in args.runs]
steps = [int(row["step"]) for row in runs[0]]
if any([int(row["step"]) for row in r] != steps for r in runs):
    raise SystemExit("the runs were evaluated at different steps")
scores = np.array([[float(row["normalized_score"]) for row in r] for r in runs])  # (runs, evals)
print("| step | " + " / ".join(f"seed {i}" for i in range(len(runs))) + " | mean +- std |")
print("|---|---|---|")
for i, step in enumerate(steps):
    if step % args.every == 0 or step in (steps[0], steps[-1]):
        seeds = " / ".join(f"{s:.1f}" for s in scores[:, i])
        mean, std = scores[:, i].mean(), scores[:, i].std()
        print(f"| {step // 1000}k | {seeds} | **{mean:.1f} +- {std:.1f}** |")
if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    mean, std = scores.mean(0), scores.std(0)
    ax.plot(steps, mean, label=f"mean of {len(runs)} seeds")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.25, label="+- std")
    if args.data is not None:
        ax.axhline(args.data, color="gray", linestyle="--", label="the data")
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("D4RL normalized score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")
