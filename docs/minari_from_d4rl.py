"""Write a D4RL-layout .hdf5 as a local Minari dataset, to check that a script's Minari path
trains exactly as its D4RL path does on real data (docs/iql.md, "Minari datasets"):

    MINARI_DATASETS_PATH=/tmp/minari python docs/minari_from_d4rl.py hopper-medium-local.hdf5 \
        local/hopper/medium-v0 Hopper-v4

The episodes are the transitions the scripts' D4RL loader keeps: all of them when the file has
next_observations; without them, a time-limit episode loses its last step (its final observation is
not in the file; d4rl's qlearning_dataset drops it too) and ends truncated one step earlier, and a
terminal step's next observation is the next row, as the loader rebuilds it (masked out of every target).
Written with Minari's own create_dataset_from_buffers (its data collector would need JAX).
"""
import sys

import gymnasium as gym
import h5py
import numpy as np
from minari import create_dataset_from_buffers
from minari.data_collector import EpisodeBuffer

REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}


def episodes_of(path: str) -> list:
    with h5py.File(path, "r") as f:
        obs, act, rew = f["observations"][()], f["actions"][()], f["rewards"][()]
        term, timeout = f["terminals"][()].astype(bool), f["timeouts"][()].astype(bool)
        next_obs = f["next_observations"][()] if "next_observations" in f else None
    n, out, start = len(obs), [], 0
    for end in np.flatnonzero(term | timeout | (np.arange(n) == n - 1)):
        if next_obs is not None:  # every step has its s': all kept, flags as they are (the last episode: neither)
            rows, final, flags = slice(start, end + 1), next_obs[end], (term[end], timeout[end])
        elif term[end]:  # keep the terminal step; s' = the next row (or itself at the file's end)
            rows, final, flags = slice(start, end + 1), obs[min(end + 1, n - 1)], (True, False)
        else:  # a time limit or the unfinished last episode: its last step has no s' in the file
            rows, final, flags = slice(start, end), obs[end], (False, True)
        T = rows.stop - rows.start
        if T > 0:
            last = np.arange(T) == T - 1
            out.append(EpisodeBuffer(id=len(out), observations=np.concatenate([obs[rows], final[None]]),
                                     actions=act[rows], rewards=rew[rows], terminations=last & flags[0],
                                     truncations=last & flags[1]))
        start = end + 1
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, dataset_id, env_id = sys.argv[1:]
    buffers = episodes_of(src)
    lo, hi = REF_SCORES.get(dataset_id.split("/")[-2], (None, None))
    create_dataset_from_buffers(dataset_id, buffers, env=gym.make(env_id), algorithm_name=f"from {src}",
                                author="rl-reference docs", author_email="none", code_permalink="docs/minari_from_d4rl.py",
                                description=f"{src} in Minari's layout", ref_min_score=lo, ref_max_score=hi)
    print(f"wrote {dataset_id}: {len(buffers)} episodes, {sum(len(b.rewards) for b in buffers)} steps")
