"""An official online JAX learner trained and evaluated as tests/parity.py needs it (one seed, one run).

    JAXVENV/bin/python tests/parity_peer_online.py --system sac_20min --src WALK_IN_THE_PARK \
        --env Hopper-v4 --steps 15000 --utd-ratio 4 --seed 0 --eval-interval 1000 --eval-episodes 10 --out DIR
    JAXVENV/bin/python tests/parity_peer_online.py --system rlpd --src RLPD --dataset FILE.hdf5 \
        --env Hopper-v4 --steps 15000 --learning-starts 5000 --utd-ratio 4 --seed 0 --out DIR

Runs in the JAX venv of tests/parity_peer_jax.py. --src is a checkout of the official repository; its
learner is imported from there (nothing of it is in this project), at its config:
  sac_20min  ikostrikov/walk_in_the_park  rl.agents.SACLearner at configs/droq_config.py (DroQ: 2
                                          critics, dropout 0.01, LayerNorm, initial temperature 0.1)
  rlpd       ikostrikov/rlpd              rlpd.agents.SACLearner at configs/rlpd_config.py (10 LayerNorm
                                          critics, min over a random 2, initial temperature 1), with
                                          --dataset as its offline half (train_finetuning.py)

What the official train_online.py does, written here because its imports (gym, dm_control, wandb) do
not install beside Gymnasium: `start_training` uniformly random actions (action_space.sample(), the
space seeded with --seed), then one sampled action and one update(batch of batch_size x utd_ratio,
utd_ratio) per env step; mask = 0 only on a termination (a time-limit cut bootstraps); observations
as float32 (its SinglePrecision wrapper); the train env's first reset seeded with --seed. Its replay
buffer's uniform draw is np.random's (default_rng(--seed).integers), the same distribution.
rlpd, as train_finetuning.py: the offline data as its D4RLDataset holds it (d4rl.qlearning_dataset,
actions clipped to +-(1 - 1e-5), mask = 1 - terminal; tests/parity_peer_jax.py reads the file so),
each update's G x B rows half offline and half online, interleaved row by row (its combine()), both
drawn uniformly (its unseeded offline draw seeded here with the same generator).
Two choices of this harness, made the same for both sides: the env is Gymnasium's (Hopper-v4, whose
actions are already in [-1, 1]: the official RescaleAction and ClipAction do nothing to the actor's
tanh actions), and each evaluation (every --eval-interval steps and at the end, deterministic
actions) resets its first episode with seed + 10000 + step, as sac_20min.py does.
Writes DIR/evaluations.csv (step, return, return_std) as sac_20min.py does.
"""
import argparse
import os
import sys
import time

import numpy as np

from bench_peer_jax import SYSTEMS, Box, stub_modules
from parity_peer_jax import evaluate, qlearning_dataset


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["sac_20min", "rlpd"], default="sac_20min")
    p.add_argument("--src", required=True, help="checkout of the official repository")
    p.add_argument("--env", default="Hopper-v4")
    p.add_argument("--steps", type=int, default=15_000, help="environment steps")
    p.add_argument("--utd-ratio", type=int, default=4)
    p.add_argument("--learning-starts", type=int, default=1000, help="the official start_training")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-interval", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--dataset", default=None, help="rlpd: the D4RL-layout file of its offline half")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if (a.system == "rlpd") != (a.dataset is not None):
        sys.exit("parity_peer_online.py: error: --dataset is rlpd's offline half, and rlpd needs it")
    if os.path.exists(a.out):
        sys.exit(f"parity_peer_online.py: error: {a.out} already exists")
    import gymnasium as gym
    env, eval_env = gym.make(a.env), gym.make(a.env)
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        sys.exit(f"parity_peer_online.py: error: {a.env}'s actions are not in [-1, 1]")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    stub_modules("gym", "gym.spaces", "gym.utils", "gym.utils.seeding", "gym.wrappers",
                 "gym.wrappers.flatten_observation", "wandb", "d4rl", "dmcgym")
    sys.path.insert(0, os.path.abspath(a.src))
    import importlib
    importlib.import_module("tensorflow_probability.substrates.jax")
    package, cls, kwargs, _, _ = SYSTEMS[a.system]
    agent = getattr(__import__(package, fromlist=[cls]), cls).create(
        a.seed, Box(shape=(obs_dim,)), Box(shape=(act_dim,)), **kwargs)
    n = a.steps
    buf = dict(observations=np.zeros((n, obs_dim), np.float32), actions=np.zeros((n, act_dim), np.float32),
               rewards=np.zeros(n, np.float32), masks=np.zeros(n, np.float32), dones=np.zeros(n, np.float32),
               next_observations=np.zeros((n, obs_dim), np.float32))
    rng = np.random.default_rng(a.seed)
    if a.dataset:  # rlpd's offline half
        d = qlearning_dataset(a.dataset)
        prior = {k: d[k] for k in ("observations", "actions", "rewards", "next_observations")}
        prior.update(masks=1.0 - d["terminals"], dones=d["dones"].astype(np.float32))
    env.action_space.seed(a.seed)
    obs = env.reset(seed=a.seed)[0].astype(np.float32)
    os.makedirs(a.out)
    evals, t0 = [], time.perf_counter()
    for step in range(1, n + 1):  # the official i = step - 1
        if step <= a.learning_starts:
            action = env.action_space.sample()
        else:
            action, agent = agent.sample_actions(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        next_obs = next_obs.astype(np.float32)
        i = step - 1
        for k, v in (("observations", obs), ("actions", action), ("rewards", reward),
                     ("masks", 1.0 - terminated), ("dones", terminated or truncated), ("next_observations", next_obs)):
            buf[k][i] = v
        obs = env.reset()[0].astype(np.float32) if terminated or truncated else next_obs
        if step > a.learning_starts:
            rows = a.batch_size * a.utd_ratio
            if a.dataset:  # [offline, online, offline, online, ...] as rlpd's combine()
                idx, off = rng.integers(step, size=rows // 2), rng.integers(len(prior["rewards"]), size=rows // 2)
                batch = {k: np.empty((rows, *v.shape[1:]), np.float32) for k, v in buf.items()}
                for k in batch:
                    batch[k][0::2], batch[k][1::2] = prior[k][off], buf[k][idx]
            else:
                idx = rng.integers(step, size=rows)
                batch = {k: v[idx] for k, v in buf.items()}
            agent, _ = agent.update(batch, a.utd_ratio)
        if step % a.eval_interval == 0 or step == n:
            returns = evaluate(agent.eval_actions, eval_env, a.eval_episodes, a.seed + 10_000 + step)
            evals.append((step, returns.mean(), returns.std()))
            with open(os.path.join(a.out, "evaluations.csv"), "w") as f:
                f.write("step,return,return_std\n")
                f.writelines(f"{s},{r:.2f},{sd:.2f}\n" for s, r, sd in evals)
            print(f"step={step} eval/return={returns.mean():.1f} +- {returns.std():.1f} "
                  f"sps={step / (time.perf_counter() - t0):.1f}", flush=True)


if __name__ == "__main__":
    main()
