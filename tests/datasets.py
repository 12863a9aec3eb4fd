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


def episodes(env, policy, num_episodes, seed=0):
    """Whole episodes of policy(obs, rng) as Minari stores them: T + 1 observations (dicts stay dicts of
    arrays), T actions, rewards, terminations and truncations."""
    from minari.data_collector import EpisodeBuffer

    rng, out = np.random.default_rng(seed), []
    for i in range(num_episodes):
        obs, _ = env.reset(seed=seed + i)
        trace, actions, rewards, terms, truncs = [obs], [], [], [], []
        while not (terms and (terms[-1] or truncs[-1])):
            act = policy(obs, rng)
            obs, reward, terminated, truncated, _ = env.step(act)
            for buf, v in zip((trace, actions, rewards, terms, truncs), (obs, act, reward, terminated, truncated)):
                buf.append(v)
        stack = lambda xs: {k: stack([x[k] for x in xs]) for k in xs[0]} if isinstance(xs[0], dict) else np.array(xs)
        out.append(EpisodeBuffer(id=i, seed=seed + i, observations=stack(trace), actions=np.array(actions),
                                 rewards=np.array(rewards), terminations=np.array(terms), truncations=np.array(truncs)))
    return out


def minari_episodes_as_d4rl(path, buffers):
    """The same episodes (Minari EpisodeBuffers of vector observations) as a D4RL file with next_observations."""
    obs = [b.observations for b in buffers]
    columns = (np.concatenate([getattr(b, k) for b in buffers]) for k in ("actions", "rewards", "terminations", "truncations"))
    return write_d4rl(path, np.concatenate([o[:-1] for o in obs]), *columns, np.concatenate([o[1:] for o in obs]))


def write_minari(dataset_id, env, buffers, eval_spec=None, ref_scores=None):
    """A Minari dataset written by Minari itself (create_dataset_from_buffers: its on-disk layout and
    metadata) into MINARI_DATASETS_PATH; its data collector would need JAX."""
    import minari

    lo, hi = ref_scores or (None, None)
    return minari.create_dataset_from_buffers(
        dataset_id, buffers, env=env, eval_env=eval_spec, algorithm_name="scripted", author="tests",
        author_email="tests@localhost", code_permalink="tests/datasets.py", description="a test dataset",
        ref_min_score=lo, ref_max_score=hi)


def hopper_minari(dataset_id, num_episodes=30, max_episode_steps=60, seed=0, ref_scores=(-10.0, 990.0)):
    """Random Hopper-v5 episodes; the short time limit makes both terminations and truncations."""
    env = gym.make("Hopper-v5", max_episode_steps=max_episode_steps)
    buffers = episodes(env, lambda obs, rng: rng.uniform(-1, 1, 3).astype(np.float32), num_episodes, seed)
    return write_minari(dataset_id, env, buffers, ref_scores=ref_scores), buffers


def kitchen_minari(dataset_id, buffers):
    """A dataset whose eval spec is Gymnasium-Robotics' FrankaKitchen-v1 (with Hopper episodes as its
    data): what D4RL/kitchen/* gives the scripts, an env that fails when made under MuJoCo >= 3.12."""
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    return write_minari(dataset_id, gym.make("Hopper-v5"), buffers, eval_spec=gym.spec("FrankaKitchen-v1"))


UMAZE_DATA = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]
UMAZE_EVAL = [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]]  # Minari's, turned 180 degrees


def antmaze_minari(dataset_id, num_episodes=4, max_episode_steps=50, seed=0):
    """AntMaze_UMaze-v4 episodes of random actions, laid out as Minari's D4RL/antmaze/umaze-v1: the data
    maze with a fixed start and goal, a continuing task (no terminations), and its eval spec's maze."""
    import dataclasses
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    kwargs = dict(maze_map=UMAZE_DATA, reward_type="sparse", continuing_task=True, reset_target=False)
    env = gym.make("AntMaze_UMaze-v4", max_episode_steps=max_episode_steps, **kwargs)
    eval_spec = dataclasses.replace(env.spec, kwargs={**env.spec.kwargs, "maze_map": UMAZE_EVAL})
    buffers = episodes(env, lambda obs, rng: rng.uniform(-1, 1, 8).astype(np.float32), num_episodes, seed)
    return write_minari(dataset_id, env, buffers, eval_spec=eval_spec, ref_scores=(0.0, 300.0)), buffers


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
