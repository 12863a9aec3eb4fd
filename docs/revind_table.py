"""The results table of docs/revind.md from run folders: python docs/revind_table.py runs/revind_study

Each run folder's evaluations.csv (its last evaluation) is grouped by the run's user reward (with
its lambda where not the official 0.75) and actor (from args.json); per variant: mean +- sample std
(ddof 1) over seeds of success, collisions, and, over the successful episodes, path length and the
shares of steps on grass and in sun."""
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

groups = defaultdict(lambda: defaultdict(list))
root = sys.argv[1]
for name in sorted(os.listdir(root)):
    run = os.path.join(root, name)
    if not os.path.isfile(os.path.join(run, "evaluations.csv")):
        continue
    args = json.load(open(os.path.join(run, "args.json")))
    rows = list(csv.DictReader(open(os.path.join(run, "evaluations.csv"))))
    last = max(int(r["step"]) for r in rows)
    for r in rows:
        if int(r["step"]) == last:
            reward = args["user_reward"]
            if reward != "none" and args["reward_scale"] != 0.75:  # lambda other than the official
                reward += f", lambda {args['reward_scale']}"
            groups[(reward, args["actor"], last)][r["variant"]].append(r)

print("| user reward | actor | steps | variant | seeds | success | collisions | length (m), successes "
      "| on grass, successes | in sun, successes |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (reward, actor, step), variants in groups.items():
    for variant, rows in variants.items():
        def stat(k, pct=True):
            v = np.array([float(r[k]) for r in rows])
            v = v[np.isfinite(v)]
            if not len(v):
                return "-"
            sd = v.std(ddof=1) if len(v) > 1 else float("nan")
            return f"{100 * v.mean():.0f} +- {100 * sd:.0f}%" if pct else f"{v.mean():.1f} +- {sd:.1f}"
        print(f"| {reward} | {actor} | {step} | {variant} | {len(rows)} | {stat('success')} | {stat('collision')} | "
              f"{stat('length', False)} | {stat('grass')} | {stat('sun')} |")
