"""Learning curves of a script beside its official implementation: the same data, steps, seeds and evaluation.

    python tests/parity.py iql --dataset hopper-medium-local.hdf5 --steps 100000 --seeds 0 1 2 \
        --out runs/parity_iql --peer-python JAXVENV/bin/python --peer-src IQL_CHECKOUT --plot docs/iql_parity.png
    python tests/parity.py iql-corl --dataset hopper-medium-local.hdf5 --steps 30000 --eval-interval 5000 \
        --out runs/parity_iql_corl --peer-src CORL_CHECKOUT --plot docs/iql_parity_corl.png
    python tests/parity.py sac_20min --steps 15000 --utd-ratio 4 --out runs/parity_sac_20min \
        --peer-python JAXVENV/bin/python --peer-src WALK_IN_THE_PARK --plot docs/sac_20min_parity.png
    python tests/parity.py sac_20min-cleanrl --steps 20000 --eval-interval 2500 --out runs/parity_sac_20min_cleanrl \
        --peer-src CLEANRL_CHECKOUT --plot docs/sac_20min_parity_cleanrl.png
    python tests/parity.py rlpd --dataset hopper-medium-local.hdf5 --steps 15000 --utd-ratio 4 \
        --out runs/parity_rlpd --peer-python JAXVENV/bin/python --peer-src RLPD --plot docs/rlpd_parity.png

Pairs: iql        iql.py against ikostrikov/implicit_q_learning's Learner, run by
                  tests/parity_peer_jax.py in the JAX venv (its docstring has the set-up and what it
                  copies of the official train_offline.py: d4rl.qlearning_dataset's data, its reward
                  scaling and action clip); scores are D4RL-normalized, steps are gradient steps.
       iql-corl   iql.py (as in the iql pair) against corl-team/CORL's PyTorch IQL
                  (algorithms/offline/iql.py at its configs/offline/iql/ yaml for the dataset), run by
                  tests/parity_peer_corl.py in this venv (what it copies of CORL's train() is in its
                  docstring); D4RL-normalized scores, gradient steps.
       sac_20min  sac_20min.py (with no held-out transitions, as the official loop) against
                  ikostrikov/walk_in_the_park's DroQ SACLearner, run by tests/parity_peer_online.py
                  (what it copies of the official train_online.py is in its docstring) on a Gymnasium
                  env; scores are returns, steps are environment steps at --utd-ratio.
       sac_20min-cleanrl
                  sac_20min.py set to vwxyzjn/cleanrl's SAC where it has a flag (UTD 1, critics without
                  dropout or LayerNorm, critic and temperature lr 1e-3, initial temperature 1, entropy
                  target -|A|, 5000 random steps, no held-out transitions) against
                  cleanrl/sac_continuous_action.py, its loop re-written in tests/parity_peer_cleanrl.py
                  (in this venv; its docstring lists what differs still); returns, environment steps.
       rlpd       rlpd.py against ikostrikov/rlpd's SACLearner (train_finetuning.py's loop, in
                  tests/parity_peer_online.py), --dataset as the offline half of every batch, online
                  in the dataset's Gymnasium env; returns, environment steps.
The JAX peers (iql, sac_20min, rlpd) need --peer-python, the JAX venv's python, with --peer-src; the
PyTorch peers (iql-corl, sac_20min-cleanrl) run in this venv and need only --peer-src.

Each run is one process on one thread (OMP_NUM_THREADS=1; XLA without its thread pool), --jobs at a
time. Ours runs through its own main() (`python iql.py ...`) with the official defaults and only the
run length, seed and evaluation set (and sac_20min's UTD, no held-out split and, against CleanRL, the
settings above); both evaluate --eval-episodes deterministic episodes every --eval-interval steps in the
same Gymnasium env, each evaluation's first episode reset with seed + step.
Runs land in --out/{ours,peer}_s{seed}; a finished run there is reused (the study can be continued), an
unfinished one stops the harness. Without --peer-src only our side runs. Prints, per evaluation step,
the score's mean +- 95% CI (t over seeds) on each side and their difference (Welch).
"""
import argparse
import csv
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import stats

from parity_peer_jax import LOCOMOTION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {  # the defaults of each pair's flags, and what its table reads; jax: the peer needs a JAX venv
    "iql": dict(script="iql.py", peer="parity_peer_jax.py", official="ikostrikov/implicit_q_learning",
                env="hopper-medium-v2", steps=100_000, eval_interval=10_000, metric="normalized_score",
                x="gradient steps", data=True, jax=True),
    "iql-corl": dict(script="iql.py", peer="parity_peer_corl.py", official="corl-team/CORL",
                     env="hopper-medium-v2", steps=100_000, eval_interval=10_000, metric="normalized_score",
                     x="gradient steps", data=True, jax=False),
    "sac_20min": dict(script="sac_20min.py", peer="parity_peer_online.py", official="ikostrikov/walk_in_the_park",
                      env="Hopper-v4", steps=15_000, eval_interval=1000, metric="return", x="environment steps",
                      data=False, jax=True, utd_ratio=4, learning_starts=1000),
    "sac_20min-cleanrl": dict(script="sac_20min.py", peer="parity_peer_cleanrl.py", official="vwxyzjn/cleanrl",
                              env="Hopper-v4", steps=30_000, eval_interval=5000, metric="return",
                              x="environment steps", data=False, jax=False, utd_ratio=1, learning_starts=5000),
    "rlpd": dict(script="rlpd.py", peer="parity_peer_online.py", official="ikostrikov/rlpd", env="hopper-medium-v2",
                 steps=15_000, eval_interval=1000, metric="return", x="environment steps", data=True, jax=True,
                 utd_ratio=4, learning_starts=5000),
}
CLEANRL_SETTINGS = ["--critic-dropout", "0", "--no-critic-layer-norm", "--critic-lr", "1e-3", "--temp-lr", "1e-3",
                    "--init-temperature", "1.0"]  # sac_20min's flags set to CleanRL's Args (and plain SAC critics)


def ours_command(cli, seed: int, out: str) -> list:
    common = ["--env", cli.env, "--seed", str(seed), "--eval-interval", str(cli.eval_interval),
              "--eval-episodes", str(cli.eval_episodes), "--log-interval", str(cli.eval_interval),
              "--device", "cpu", "--run-dir", out]
    script = [sys.executable, os.path.join(ROOT, PAIRS[cli.pair]["script"])]
    if cli.pair in ("iql", "iql-corl"):
        return script + common + ["--dataset", cli.dataset, "--max-steps", str(cli.steps)]
    online = ["--total-timesteps", str(cli.steps), "--utd-ratio", str(cli.utd_ratio)]
    if cli.pair == "rlpd":
        return script + common + online + ["--dataset", cli.dataset]
    if cli.pair == "sac_20min-cleanrl":  # CleanRL's start, its -|A| entropy target (the env's |A|)
        import gymnasium as gym
        act_dim = gym.make(cli.env).action_space.shape[0]
        online += CLEANRL_SETTINGS + ["--learning-starts", str(PAIRS[cli.pair]["learning_starts"]),
                                      "--target-entropy", str(-float(act_dim))]
    return script + common + online + ["--validation-fraction", "0"]


def peer_command(cli, seed: int, out: str) -> list:
    pair = PAIRS[cli.pair]
    env = LOCOMOTION[cli.env.split("-")[0]] if cli.pair == "rlpd" else cli.env  # D4RL name -> Gymnasium id
    command = [cli.peer_python, os.path.join(ROOT, "tests", pair["peer"]), "--src", cli.peer_src,
               "--env", env, "--steps", str(cli.steps), "--seed", str(seed), "--eval-interval",
               str(cli.eval_interval), "--eval-episodes", str(cli.eval_episodes), "--out", out]
    command += ["--dataset", cli.dataset] if pair["data"] else []
    if cli.pair in ("iql", "iql-corl", "sac_20min-cleanrl"):  # the CleanRL runner has its Args' start
        return command
    return command + ["--system", cli.pair, "--utd-ratio", str(cli.utd_ratio),
                      "--learning-starts", str(pair["learning_starts"])]


def read_scores(folder: str, metric: str = "normalized_score") -> dict:
    """{step: metric} of a run's evaluations.csv ({} when it has none)."""
    path = os.path.join(folder, "evaluations.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(r["step"]): float(r[metric]) for r in csv.DictReader(f)}


def run(command: list, out: str, steps: int, metric: str) -> str:
    """Runs command unless out already holds a finished run; the log goes to out + '.log'."""
    if os.path.exists(out):
        if steps in read_scores(out, metric):
            return f"reused {out}"
        raise SystemExit(f"parity.py: error: {out} holds an unfinished run; remove it to run it again")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    with open(out + ".log", "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or steps not in read_scores(out, metric):
        raise SystemExit(f"parity.py: error: {' '.join(command[:2])} failed (exit {proc.returncode}); see {out}.log")
    return f"ran {out}"


def mean_ci(values) -> tuple:
    """Mean and the half-width of its 95% t interval (nan for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def difference_ci(a, b) -> tuple:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else math.inf
    return float(a.mean() - b.mean()), float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))


def common_steps(runs: list) -> list:
    """The evaluation steps every run has."""
    return sorted(set.intersection(*(set(r) for r in runs)))


def table(ours: list, peer: list, script: str, official: str) -> str:
    """Markdown: per evaluation step, each side's mean +- 95% CI over seeds and the difference."""
    steps = common_steps(ours + peer)
    head = f"| step | {script} | {official} | difference |\n|---|---|---|---|\n" if peer else \
        f"| step | {script} |\n|---|---|\n"
    rows = []
    for s in steps:
        cells = ["%.1f +- %.1f" % mean_ci([r[s] for r in ours])]
        if peer:
            cells.append("%.1f +- %.1f" % mean_ci([r[s] for r in peer]))
            cells.append("%+.1f +- %.1f" % difference_ci([r[s] for r in ours], [r[s] for r in peer]))
        label = f"{s // 1000}k" if s % 1000 == 0 else str(s)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def plot(path: str, ours: list, peer: list, script: str, official: str, title: str, x: str, y: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for runs, label in ((ours, script), (peer, official)):
        if not runs:
            continue
        steps = common_steps(runs)
        m, ci = np.array([mean_ci([r[s] for r in runs]) for s in steps]).T
        ax.plot(steps, m, marker="o", label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(steps, m - np.nan_to_num(ci), m + np.nan_to_num(ci), alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pair", choices=sorted(PAIRS))
    p.add_argument("--dataset", default=None, help="iql, iql-corl, rlpd: a D4RL-layout .hdf5 both sides "
                   "train on")
    p.add_argument("--env", default=None, help="iql, iql-corl, rlpd: the dataset's D4RL name (its env "
                   "evaluates); sac_20min, sac_20min-cleanrl: a Gymnasium id (default: the pair's)")
    p.add_argument("--steps", type=int, default=None, help="run length (default: the pair's)")
    p.add_argument("--utd-ratio", type=int, default=None, help="sac_20min, rlpd: updates per environment step "
                   "(default 4; sac_20min-cleanrl: 1, CleanRL's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-interval", type=int, default=None, help="default: the pair's")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True, help="folder of the runs")
    p.add_argument("--peer-python", default=None, help="python of the JAX venv (iql, sac_20min, rlpd); the "
                   "PyTorch peers (iql-corl, sac_20min-cleanrl) run in this one, sys.executable, by default")
    p.add_argument("--peer-src", default=None, help="checkout of the official repository")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--plot", default=None, help="write the curves to this PNG (needs matplotlib)")
    cli = p.parse_args(argv)
    pair = PAIRS[cli.pair]
    for k in ("env", "steps", "eval_interval", "utd_ratio"):
        setattr(cli, k, getattr(cli, k) or pair.get(k))
    if pair["data"] and (cli.dataset is None or not os.path.isfile(cli.dataset)):
        raise SystemExit(f"parity.py: error: {cli.pair} needs --dataset, an existing file (got {cli.dataset})")
    if not pair["data"] and cli.dataset is not None:
        raise SystemExit(f"parity.py: error: {cli.pair} trains online; it takes no --dataset")
    if pair["jax"] and (cli.peer_src is None) != (cli.peer_python is None):
        raise SystemExit(f"parity.py: error: --peer-src and --peer-python go together ({cli.pair}'s peer runs in "
                         "a JAX venv)")
    cli.peer_python = cli.peer_python or sys.executable  # the PyTorch peers: this venv
    if cli.pair == "sac_20min-cleanrl" and cli.utd_ratio != 1:
        raise SystemExit("parity.py: error: sac_20min-cleanrl runs at UTD 1 (CleanRL updates once per step)")
    cli.dataset = cli.dataset and os.path.abspath(cli.dataset)
    out = os.path.abspath(cli.out)
    os.makedirs(out, exist_ok=True)
    jobs = [(ours_command(cli, s, f"{out}/ours_s{s}"), f"{out}/ours_s{s}") for s in cli.seeds]
    if cli.peer_src:
        jobs += [(peer_command(cli, s, f"{out}/peer_s{s}"), f"{out}/peer_s{s}") for s in cli.seeds]
    with ThreadPoolExecutor(cli.jobs) as pool:
        for message in pool.map(lambda job: run(*job, cli.steps, pair["metric"]), jobs):
            print(message, flush=True)
    ours = [read_scores(f"{out}/ours_s{s}", pair["metric"]) for s in cli.seeds]
    peer = [read_scores(f"{out}/peer_s{s}", pair["metric"]) for s in cli.seeds] if cli.peer_src else []
    result = table(ours, peer, pair["script"], pair["official"])
    y = pair["metric"].replace("_", " ")
    where = f"{cli.env} ({os.path.basename(cli.dataset)})" if cli.dataset else cli.env
    where += f", UTD {cli.utd_ratio}" if cli.utd_ratio else ""
    print(f"\n{y}, mean +- 95% CI over seeds {cli.seeds}, {where}\n")
    print(result)
    if cli.plot:
        plot(cli.plot, ours, peer, pair["script"], pair["official"], where, pair["x"], y)
    return result


if __name__ == "__main__":
    main()
