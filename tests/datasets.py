"""Small D4RL-format datasets made from real Gymnasium rollouts (no download needed).

Used by the test harness (tests/conftest.py) and by hand, to try a script offline:

    python tests/datasets.py pendulum pendulum-scripted.hdf5     # 20k transitions, ~2 s
    python iql.py --env Pendulum-v1 --dataset pendulum-scripted.hdf5 --max-steps 20000
"""

import argparse
import os
import sys

import gymnasium as gym
import h5py
import numpy as np


def write_d4rl(path, observations, actions, rewards, terminals, timeouts, next_observations=None):
    """Write arrays in the D4RL HDF5 layout (next_observations is optional, as in older files)."""
    with h5py.File(path, "w") as f:
        f["observations"] = np.asarray(observations, dtype=np.float32)
        f["actions"] = np.asarray(actions, dtype=np.float32)
        f["rewards"] = np.asarray(rewards, dtype=np.float32)
        f["terminals"] = np.asarray(terminals, dtype=bool)
        f["timeouts"] = np.asarray(timeouts, dtype=bool)
        if next_observations is not None:
            f["next_observations"] = np.asarray(next_observations, dtype=np.float32)
    return path


def rollouts(env, policy, num_steps, seed=0):
    """num_steps transitions of policy(obs, rng) in env, with D4RL's terminal/timeout flags.
    The last episode is cut unfinished (neither flag), as in D4RL."""
    rng = np.random.default_rng(seed)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    data = {k: [] for k in keys}
    obs, _ = env.reset(seed=seed)
    episode_returns, ret = [], 0.0
    for _ in range(num_steps):
        act = policy(obs, rng)
        next_obs, reward, terminated, truncated, _ = env.step(act)
        for k, v in zip(keys, (obs, act, reward, terminated, truncated and not terminated, next_obs)):
            data[k].append(v)
        ret += reward
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(ret)
            obs, ret = env.reset()[0], 0.0
    data = {k: np.array(v) for k, v in data.items()}
    return data, np.array(episode_returns)


def pendulum_controller(noise):
    """Energy-pumping swing-up plus a PD balancer (return about -150 noiseless), with
    Gaussian action noise of std `noise` (about -880 at noise 2)."""
    def policy(obs, rng):
        cos, sin, dth = obs
        if cos > 0.85:  # near upright: PD on the angle
            u = -10.0 * np.arctan2(sin, cos) - 2.0 * dth
        else:  # pump energy E = dth^2 / 2 + g (cos - 1) towards 0 (the top)
            energy = 0.5 * dth ** 2 + 10.0 * (cos - 1.0)
            u = -2.0 * np.sign(dth * energy) if abs(dth) > 1e-3 else 2.0
        return np.clip([u + noise * rng.standard_normal()], -2.0, 2.0).astype(np.float32)
    return policy


def pendulum_dataset(path, num_steps=20_000, noise=2.0, seed=0):
    data, returns = rollouts(gym.make("Pendulum-v1"), pendulum_controller(noise), num_steps, seed)
    write_d4rl(path, **data)
    return path, returns


def hopper_dataset(path, num_steps=1500, max_episode_steps=60, with_next_observations=True, seed=0):
    """Random-ish Hopper-v4 rollouts; a short time limit makes both terminals and timeouts."""
    env = gym.make("Hopper-v4", max_episode_steps=max_episode_steps)
    data, returns = rollouts(env, lambda obs, rng: rng.uniform(-1, 1, 3).astype(np.float32), num_steps, seed)
    if not with_next_observations:
        del data["next_observations"]
    write_d4rl(path, **data)
    return path, returns


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["pendulum", "hopper"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=None)
    cli = parser.parse_args()
    if os.path.exists(cli.out):
        sys.exit(f"datasets.py: error: {cli.out} already exists")
    make = pendulum_dataset if cli.kind == "pendulum" else hopper_dataset
    _, rets = make(cli.out, **({"num_steps": cli.steps} if cli.steps else {}))
    print(f"wrote {cli.out}: {len(rets)} complete episodes, mean return {rets.mean():.1f} +- {rets.std():.1f}")
