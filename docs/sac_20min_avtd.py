"""AVTD beside each of its candidates run alone: the runs, a table and a figure for docs/sac_20min.md.

    python docs/sac_20min_avtd.py --env Pendulum-v1 --total-timesteps 4000 --utd-ratio 4 \\
        --eval-interval 500 --avtd-interval 500 --out runs/avtd_pendulum --plot docs/avtd_pendulum.png

For each seed: one run per candidate alone (`--avtd NAME`: one agent, the same held-out split and
the same TD-error log as AVTD's) and one AVTD run over all of them, each through sac_20min.py with
one thread, --jobs at a time. A run folder that already holds its last evaluation is reused. Prints
the mean +- sample std over seeds of each arm's evaluation return at each step, the candidate AVTD
chose at each choice per seed, and the seconds per run; the figure has the return curves, the
held-out TD error of each candidate inside AVTD, and AVTD's choice over time."""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--env", default="Pendulum-v1")
p.add_argument("--candidates", nargs="+", default=["droq", "layer_norm", "none"])
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--total-timesteps", type=int, default=4000)
p.add_argument("--utd-ratio", type=int, default=4)
p.add_argument("--eval-interval", type=int, default=500)
p.add_argument("--eval-episodes", type=int, default=10)
p.add_argument("--avtd-interval", type=int, default=500)
p.add_argument("--jobs", type=int, default=2)
p.add_argument("--out", required=True, help="folder of the run folders")
p.add_argument("--plot", default=None, help="write the figure to this PNG")
a = p.parse_args()

arms = {name: [name] for name in a.candidates} | {"AVTD": a.candidates}
runs = {(arm, seed): os.path.join(a.out, f"{arm}__{seed}") for arm in arms for seed in a.seeds}


def done(run_dir):
    path = os.path.join(run_dir, "evaluations.csv")
    return os.path.isfile(path) and f"{a.total_timesteps}," in open(path).read()


todo = sorted((key for key, run_dir in runs.items() if not done(run_dir)),
              key=lambda key: -len(arms[key[0]]))  # the longest (AVTD) first
for key in todo:
    if os.path.exists(runs[key]):
        sys.exit(f"{runs[key]} exists but did not finish; remove it to run it again")
os.makedirs(a.out, exist_ok=True)
running, seconds = {}, {}
env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
while todo or running:
    while todo and len(running) < a.jobs:
        arm, seed = key = todo.pop(0)
        cmd = [sys.executable, os.path.join(ROOT, "sac_20min.py"), "--env", a.env, "--seed", str(seed),
               "--total-timesteps", str(a.total_timesteps), "--utd-ratio", str(a.utd_ratio),
               "--eval-interval", str(a.eval_interval), "--eval-episodes", str(a.eval_episodes),
               "--avtd-interval", str(a.avtd_interval), "--run-dir", runs[key], "--avtd", *arms[arm]]
        log = open(runs[key] + ".log", "w")
        running[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time())
        print("started", " ".join(cmd[1:]), flush=True)
    time.sleep(2)
    for key, (proc, t0) in list(running.items()):
        if proc.poll() is not None:
            del running[key]
            seconds[key] = time.time() - t0
            if proc.returncode:
                sys.exit(f"{runs[key]} failed (exit {proc.returncode}); see {runs[key]}.log")

returns, choices, td = {}, {}, {}
for (arm, seed), run_dir in runs.items():
    rows = list(csv.DictReader(open(os.path.join(run_dir, "evaluations.csv"))))
    returns[arm, seed] = {int(r["step"]): float(r["return"]) for r in rows}
    rows = list(csv.DictReader(open(os.path.join(run_dir, "avtd.csv"))))
    choices[arm, seed] = [(int(r["step"]), arms[arm][int(r["acting"])]) for r in rows]
    td[arm, seed] = {n: [(int(r["step"]), float(r[f"{n}_validation_td_error"])) for r in rows]
                     for n in arms[arm]}
    assert json.load(open(os.path.join(run_dir, "args.json")))["avtd"] == arms[arm]

steps = sorted(returns[next(iter(runs))])
print(f"\n{a.env}, {a.total_timesteps} steps, UTD {a.utd_ratio}, seeds {a.seeds}: evaluation return "
      f"({a.eval_episodes} episodes), mean +- std over seeds\n")
print("| step | " + " | ".join(arms) + " |")
print("|---" * (len(arms) + 1) + "|")
for step in steps:
    cells = [np.array([returns[arm, s][step] for s in a.seeds]) for arm in arms]
    print(f"| {step} | " + " | ".join(f"{c.mean():.1f} +- {c.std(ddof=1) if len(c) > 1 else 0:.1f}"
                                      for c in cells) + " |")
print("\nAVTD's choices (step: candidate):")
for seed in a.seeds:
    print(f"  seed {seed}: " + ", ".join(f"{s}: {n}" for s, n in choices["AVTD", seed]))
if seconds:
    print("\nseconds per run (one thread): " + ", ".join(
        f"{arm} {np.mean([t for (r, _), t in seconds.items() if r == arm]):.0f}"
        for arm in arms if any(r == arm for r, _ in seconds)))

if a.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for arm in arms:
        curve = np.array([[returns[arm, s][t] for t in steps] for s in a.seeds])
        ax[0].plot(steps, curve.mean(0), label=arm, lw=2.5 if arm == "AVTD" else 1.5)
        ax[0].fill_between(steps, curve.min(0), curve.max(0), alpha=0.15)
    ax[0].set(title=f"{a.env}: evaluation return (mean, min-max over seeds)", xlabel="env steps")
    for i, name in enumerate(a.candidates):
        for seed in a.seeds:
            s, v = zip(*td["AVTD", seed][name])
            ax[1].plot(s, v, color=f"C{i}", alpha=0.7, label=name if seed == a.seeds[0] else None)
        alone = np.array([[v for _, v in td[name, seed][name]] for seed in a.seeds]).mean(0)
        ax[1].plot([t for t, _ in td[name, a.seeds[0]][name]], alone, color=f"C{i}", ls="--",
                   label=f"{name} alone (mean)")
    ax[1].set(title="held-out TD error: in AVTD (solid, per seed), alone (dashed)", xlabel="env steps",
              yscale="log")
    for j, seed in enumerate(a.seeds):
        s, n = zip(*choices["AVTD", seed])
        ax[2].step(s, [a.candidates.index(x) + 0.08 * (j - 1) for x in n], where="post",
                   label=f"seed {seed}")
    ax[2].set(title="AVTD's acting candidate", xlabel="env steps",
              yticks=range(len(a.candidates)), yticklabels=a.candidates)
    for x in ax:
        x.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=110)
    print(f"wrote {a.plot}")
