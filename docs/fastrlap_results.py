"""The practice study's table and plot from fastrlap.py run folders (laps.csv, evaluations.csv, the log).

    python docs/fastrlap_results.py runs/fastrlap_study            # folders named {variant}_s{seed}
    python docs/fastrlap_results.py runs/fastrlap_study --plot docs/fastrlap_laps.png
    python docs/fastrlap_results.py runs/fastrlap_study --frames VIDEO.mp4 docs/fastrlap_lap_camera.png

Per run: the demo lap's time (the reference), the practice minutes (the simulator's clock, backing
up included) to the first lap and to the first lap faster than the demo, the steps and minutes at
the last evaluation, the best lap, the laps done, the collisions, and that evaluation's lap. matplotlib is needed for --plot only; --frames (six camera frames of an evaluation
video, side by side) needs imageio.
"""

import argparse
import csv
import glob
import math
import os
import re
from collections import defaultdict


def read_run(folder: str) -> dict:
    """A run up to its last evaluation (a run stopped early counts up to its last checkpoint's)."""
    evals = []
    if os.path.exists(os.path.join(folder, "evaluations.csv")):
        with open(os.path.join(folder, "evaluations.csv")) as f:
            evals = [(int(r["step"]), float(r["practice_minutes"]), float(r["lap_time"])) for r in csv.DictReader(f)]
    steps = evals[-1][0] if evals else 0
    with open(os.path.join(folder, "laps.csv")) as f:
        laps = [(float(r["practice_minutes"]), float(r["lap_time"]), int(r["collisions"])) for r in csv.DictReader(f)
                if int(r["step"]) <= steps]
    log = open(folder + ".log").read() if os.path.exists(folder + ".log") else ""
    demo = re.search(r"demo lap: ([0-9.]+) s", log)
    crashes = dict(re.findall(r"practice step=(\d+) .*collisions=(\d+)", log))
    demo_time = float(demo.group(1)) if demo else math.nan
    faster = [m for m, t, _ in laps if t < demo_time]
    return {"laps": laps, "demo": demo_time, "first": laps[0][0] if laps else math.nan,
            "first_faster": faster[0] if faster else math.nan, "best": min((t for _, t, _ in laps), default=math.nan),
            "n_laps": len(laps), "collisions": int(crashes.get(str(steps), -1)), "steps": steps,
            "minutes": evals[-1][1] if evals else math.nan, "eval": evals[-1][2] if evals else math.nan}


def mean_std(values: list) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    m = sum(finite) / len(finite)
    s = (sum((v - m) ** 2 for v in finite) / len(finite)) ** 0.5
    return f"{m:.1f} +- {s:.1f}" + (f" ({len(finite)} of {len(values)})" if len(finite) < len(values) else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study")
    parser.add_argument("--plot")
    parser.add_argument("--frames", nargs=2, metavar=("VIDEO", "PNG"))
    cli = parser.parse_args()
    runs = defaultdict(dict)
    names = {"pre": "pretrained", "rand": "random"}  # the study's folder prefixes
    for folder in sorted(glob.glob(os.path.join(cli.study, "*_s[0-9]*"))):
        if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "laps.csv")):
            variant, seed = os.path.basename(folder).rsplit("_s", 1)
            runs[names.get(variant, variant)][int(seed)] = read_run(folder)
    order = ["pretrained", "random", "none"]
    runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    print("| encoder | seed | demo lap (s) | first lap (min) | first lap faster than the demo (min) | steps "
          "| practice (min) | best lap (s) | laps | collisions | eval lap (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, seeds in runs.items():
        for seed, r in sorted(seeds.items()):
            print(f"| {variant} | {seed} | {r['demo']:.1f} | {r['first']:.1f} | {r['first_faster']:.1f} | "
                  f"{r['steps']} | {r['minutes']:.1f} | {r['best']:.1f} | "
                  f"{r['n_laps']} | {r['collisions']} | {r['eval']:.1f} |")
        rs = list(seeds.values())
        print(f"| **{variant}** | mean +- std | {mean_std([r['demo'] for r in rs])} | {mean_std([r['first'] for r in rs])} | "
              f"{mean_std([r['first_faster'] for r in rs])} | - | {mean_std([r['minutes'] for r in rs])} | "
              f"{mean_std([r['best'] for r in rs])} | "
              f"{mean_std([r['n_laps'] for r in rs])} | {mean_std([r['collisions'] for r in rs])} | {mean_std([r['eval'] for r in rs])} |")
    if cli.frames:
        import imageio.v3 as iio
        import numpy as np
        video = iio.imread(cli.frames[0])  # (T, 256, 512, 3): the top view, then the camera
        picks = [video[round(k * (len(video) - 1) / 5), :, video.shape[2] // 2:] for k in range(6)]
        iio.imwrite(cli.frames[1], np.concatenate(picks, 1))
        print(f"wrote {cli.frames[1]}")
    if cli.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        colours = {}
        for variant, seeds in runs.items():
            colour = colours.setdefault(variant, f"C{len(colours)}")
            for seed, r in sorted(seeds.items()):
                if r["laps"]:
                    ax.plot([m for m, _, _ in r["laps"]], [t for _, t, _ in r["laps"]], "o-", color=colour, ms=3, alpha=0.8,
                            label=f"{variant} encoder" if seed == min(seeds) else None)
        demo = [r["demo"] for seeds in runs.values() for r in seeds.values() if math.isfinite(r["demo"])]
        if demo:
            ax.axhline(sum(demo) / len(demo), color="k", ls="--", label="demo lap (1 m/s)")
        ax.set_xlabel("practice (simulated minutes, backing up included)")
        ax.set_ylabel("lap time (s)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(cli.plot, dpi=120)
        print(f"wrote {cli.plot}")


if __name__ == "__main__":
    main()
