"""The official JAX IQL learner trained and evaluated as tests/parity.py needs it (one seed, one run).

    JAXVENV/bin/python tests/parity_peer_jax.py --src IQL_CHECKOUT --dataset FILE.hdf5 --env hopper-medium-v2 \
        --steps 100000 --seed 0 --eval-interval 10000 --eval-episodes 10 --out DIR

Runs in a venv with JAX (not this project's): jax 0.4.38, jaxlib 0.4.38, flax 0.10.2, optax 0.2.4,
tensorflow-probability 0.25, ml_collections, h5py and this project's gymnasium[mujoco] and mujoco
versions. --src is a checkout of ikostrikov/implicit_q_learning; its `Learner` (learner.py and the
modules it imports) is imported from there, nothing of it is in this project. Patched only where
newer JAX and flax removed what it uses: jax.tree_multimap, jit's static_argnames that name no
parameter, init() returning a FrozenDict.

What train_offline.py does, written here because its imports (d4rl, gym, mujoco-py) do not install:
- the data as d4rl.qlearning_dataset gives it: s' is the next row, timeout steps and the last row
  are dropped; actions clipped to +-(1 - 1e-5);
- hopper/halfcheetah/walker2d rewards: r * 1000 / (max - min trajectory return), trajectories split
  where the next row is not s' or at a terminal;
- the learner at configs/mujoco_config.py with max_steps = --steps (the actor's cosine lr decay),
  batches of 256 drawn with np.random.randint;
- evaluation: deterministic actions (temperature 0), the return of each episode.
Two choices of this harness, made the same for both sides: np.random is seeded with --seed (the
official script leaves it unseeded), and the evaluation env is Gymnasium's (hopper-* -> Hopper-v4,
as iql.py), each evaluation's first episode reset with seed + step, as iql.py does.
Writes DIR/evaluations.csv (step, return, return_std, normalized_score) as iql.py does.
"""
import argparse
import functools
import inspect
import os
import sys
import time

import h5py
import numpy as np

LOCOMOTION = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}
REF_SCORES = {"halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
              "walker2d": (1.629008, 4592.3)}
MUJOCO_CONFIG = dict(actor_lr=3e-4, value_lr=3e-4, critic_lr=3e-4, hidden_dims=(256, 256), discount=0.99,
                     expectile=0.7, temperature=3.0, dropout_rate=None, tau=0.005)


def d4rl_transitions(path: str) -> dict:
    """d4rl.qlearning_dataset(terminate_on_end=False) on a D4RL-layout file: row i with s' = row
    i + 1, rows whose timeout is set and the last row dropped (the file's dtypes, bool terminals)."""
    with h5py.File(path, "r") as f:
        obs, act, rew = f["observations"][()], f["actions"][()], f["rewards"][()]
        terminals = f["terminals"][()].astype(bool)
        timeouts = f["timeouts"][()].astype(bool) if "timeouts" in f else np.zeros(len(obs), bool)
    keep = ~timeouts[:-1]  # rows 0..N-2 (s' is the next row); a timeout step is dropped
    return dict(observations=obs[:-1][keep], actions=act[:-1][keep], rewards=rew[:-1][keep],
                next_observations=obs[1:][keep], terminals=terminals[:-1][keep])


def qlearning_dataset(path: str) -> dict:
    """d4rl_transitions, then the official D4RLDataset's action clip and dones_float."""
    data = d4rl_transitions(path)
    data["actions"] = np.clip(data["actions"], -(1 - 1e-5), 1 - 1e-5)
    jump = np.linalg.norm(data["observations"][1:] - data["next_observations"][:-1], axis=-1) > 1e-6
    dones = np.append(jump | data["terminals"][:-1], True)
    return {**{k: v.astype(np.float32) for k, v in data.items()}, "dones": dones}


def normalize(rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """train_offline.normalize: rewards / (max - min trajectory return) * 1000."""
    starts = np.concatenate([[0], np.flatnonzero(dones[:-1]) + 1])
    returns = np.add.reduceat(rewards, starts)
    return rewards / (returns.max() - returns.min()) * 1000.0


def import_learner(src: str):
    import jax
    if not hasattr(jax, "tree_multimap"):
        jax.tree_multimap = jax.tree_util.tree_map
    jit = jax.jit

    def tolerant_jit(fun=None, **kw):  # old JAX ignored static_argnames the function lacks
        if fun is None:
            return lambda f: tolerant_jit(f, **kw)
        names = kw.get("static_argnames")
        if names:
            params = inspect.signature(fun).parameters
            names = (names,) if isinstance(names, str) else names
            kw["static_argnames"] = tuple(n for n in names if n in params)
        return jit(fun, **kw)
    jax.jit = tolerant_jit
    import flax
    flax.config.update("flax_return_frozendict", True)  # the official code indexes init()'s FrozenDict
    sys.path.insert(0, os.path.abspath(src))
    from common import Batch
    from learner import Learner
    return Batch, Learner


def evaluate(act, env, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of act(float32 observation) -> action, the first reset with seed."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs.astype(np.float32)))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.array(returns)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True, help="checkout of ikostrikov/implicit_q_learning")
    p.add_argument("--dataset", required=True)
    p.add_argument("--env", default="hopper-medium-v2")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"parity_peer_jax.py: error: {a.out} already exists")
    task = a.env.split("-")[0]
    if task not in LOCOMOTION:
        sys.exit(f"parity_peer_jax.py: error: {a.env}: the harness evaluates hopper, halfcheetah and walker2d")
    import gymnasium as gym
    Batch, Learner = import_learner(a.src)
    data = qlearning_dataset(a.dataset)
    data["rewards"] = normalize(data["rewards"], data["dones"])
    n = len(data["observations"])
    np.random.seed(a.seed)
    agent = Learner(a.seed, data["observations"][:1], data["actions"][:1], max_steps=a.steps, **MUJOCO_CONFIG)
    env = gym.make(LOCOMOTION[task])
    os.makedirs(a.out)
    evals, t0 = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = np.random.randint(n, size=a.batch_size)
        agent.update(Batch(observations=data["observations"][idx], actions=data["actions"][idx],
                           rewards=data["rewards"][idx], masks=1.0 - data["terminals"][idx],
                           next_observations=data["next_observations"][idx]))
        if step % a.eval_interval == 0 or step == a.steps:
            act = lambda obs: agent.sample_actions(obs, temperature=0.0)  # deterministic
            record(evaluate(act, env, a.eval_episodes, a.seed + step), step, task, evals, a.out, t0)


def record(returns, step: int, task: str, evals: list, out: str, t0: float):
    """One evaluation as iql.py logs it: appended to evals, out/evaluations.csv (step, return,
    return_std, normalized_score) written again, one line printed."""
    ref = REF_SCORES[task]
    score = 100 * (returns.mean() - ref[0]) / (ref[1] - ref[0])
    evals.append((step, returns.mean(), returns.std(), score))
    with open(os.path.join(out, "evaluations.csv"), "w") as f:
        f.write("step,return,return_std,normalized_score\n")
        f.writelines(f"{s},{r:.2f},{sd:.2f},{sc:.2f}\n" for s, r, sd, sc in evals)
    print(f"step={step} eval/return={returns.mean():.1f} +- {returns.std():.1f} normalized={score:.1f} "
          f"ups={step / (time.perf_counter() - t0):.0f}", flush=True)


if __name__ == "__main__":
    main()
