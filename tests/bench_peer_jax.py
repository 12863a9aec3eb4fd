"""Speed of an official JAX learner on random Hopper-sized batches, for tests/bench.py --peers.

    JAXVENV/bin/python tests/bench_peer_jax.py --system rlpd --src RLPD_CHECKOUT [--seconds 15]

Runs in a venv that has JAX (not this project's): jax 0.4.38, flax 0.10.2, optax 0.2.4,
tensorflow-probability 0.25, ml_collections (newer JAX breaks tfp's JAX substrate). --src is a
checkout of the official repository (its Python package is imported from there; nothing of it
is in this project):

  iql        ikostrikov/implicit_q_learning  Learner at configs/mujoco_config.py, batch 256 (shimmed
                                         for newer JAX as tests/parity_peer_jax.py trains it)
  idql       philippe-eecs/IDQL          DDPMIQLLearner at its launcher's settings (T 5, ResNet
                                         actor of 3 blocks, dropout 0.1), batch 512; one update
                                         is actor + V + Q, as idql.py's
  rlpd       ikostrikov/rlpd             SACLearner at configs/rlpd_config.py (10 LayerNorm
                                         critics, min over 2), one UTD block of 20 x 256
  sac_20min  ikostrikov/walk_in_the_park SACLearner at configs/droq_config.py (2 critics, dropout
                                         0.01, LayerNorm), one UTD block of 20 x 256

Batches are host arrays, cycled, as the official loops hand them over. gym is replaced by a stub:
the learners only read the spaces' shapes and samples. Prints one JSON line with
"updates_per_second" (for the UTD learners: critic updates, 20 per block, as bench.py counts).
"""
import argparse
import importlib
import json
import sys
import time
import types

import numpy as np

SYSTEMS = {  # package, learner, create() kwargs, batch rows per update call, critic updates per call
    "idql": ("jaxrl5.agents", "DDPMIQLLearner",
             dict(actor_dropout_rate=0.1, actor_num_blocks=3, decay_steps=int(3e6), T=5, N=64, M=0,
                  actor_layer_norm=True, value_layer_norm=True, actor_tau=0.001, beta_schedule="vp"), 512, 1),
    "rlpd": ("rlpd.agents", "SACLearner",
             dict(num_qs=10, num_min_qs=2, critic_layer_norm=True, init_temperature=1.0, backup_entropy=True), 256 * 20, 20),
    "sac_20min": ("rl.agents", "SACLearner",
                  dict(num_qs=2, critic_dropout_rate=0.01, critic_layer_norm=True, init_temperature=0.1), 256 * 20, 20),
}


class Box:
    """The part of gym.spaces.Box the learners read."""

    def __init__(self, low=-1.0, high=1.0, shape=None, dtype=np.float32):
        self.shape = shape

    def sample(self):
        return np.zeros(self.shape, np.float32)


def stub_modules(*names):
    """Empty modules whose every attribute is a placeholder class: imported by the official packages
    (gym wrappers, wandb, d4rl), never used by the update."""
    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: type(attr, (), {})
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    sys.modules["gym"].Space = sys.modules["gym.spaces"].Box = sys.modules["gym.spaces"].Space = Box


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=["iql", *SYSTEMS], required=True)  # iql: a class, time_iql
    p.add_argument("--src", required=True, help="checkout of the official repository")
    p.add_argument("--seconds", type=float, default=15.0)
    cli = p.parse_args()
    if cli.system == "iql":
        return time_iql(cli)
    stub_modules("gym", "gym.spaces", "gym.utils", "gym.utils.seeding", "gym.wrappers",
                 "gym.wrappers.flatten_observation", "wandb", "d4rl", "dmcgym")
    sys.path.insert(0, cli.src)
    import jax
    importlib.import_module("tensorflow_probability.substrates.jax")  # the learners reach it as an attribute
    package, cls, kwargs, rows, per_call = SYSTEMS[cli.system]
    learner = getattr(__import__(package, fromlist=[cls]), cls).create(0, Box(shape=(11,)), Box(shape=(3,)), **kwargs)
    update = (lambda agent, b: agent.update(b)) if per_call == 1 else (lambda agent, b: agent.update(b, per_call))

    rng = np.random.default_rng(0)
    batches = [dict(observations=rng.standard_normal((rows, 11), dtype=np.float32),
                    actions=rng.uniform(-1, 1, (rows, 3)).astype(np.float32),
                    rewards=rng.standard_normal(rows, dtype=np.float32), masks=np.ones(rows, np.float32),
                    dones=np.zeros(rows, np.float32), next_observations=rng.standard_normal((rows, 11), dtype=np.float32))
               for _ in range(8)]
    for i in range(3):  # jit compilation
        learner, _ = update(learner, batches[i])
    jax.block_until_ready(learner)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < cli.seconds:
        learner, _ = update(learner, batches[calls % 8])
        jax.block_until_ready(learner)
        calls += 1
    rate = calls * per_call / (time.perf_counter() - t0)
    print(json.dumps({"peer": f"official-jax-{cli.system}", "updates_per_second": round(rate, 1),
                      "backend": jax.default_backend()}))


def time_iql(cli):
    """The official IQL Learner (a class that updates itself), imported and shimmed as
    tests/parity_peer_jax.py trains it, at configs/mujoco_config.py, on random batches of 256."""
    import jax
    from parity_peer_jax import MUJOCO_CONFIG, import_learner
    Batch, Learner = import_learner(cli.src)
    rng = np.random.default_rng(0)
    learner = Learner(0, np.zeros((1, 11), np.float32), np.zeros((1, 3), np.float32), max_steps=1_000_000,
                      **MUJOCO_CONFIG)
    batches = [Batch(observations=rng.standard_normal((256, 11), dtype=np.float32),
                     actions=rng.uniform(-1, 1, (256, 3)).astype(np.float32),
                     rewards=rng.standard_normal(256, dtype=np.float32), masks=np.ones(256, np.float32),
                     next_observations=rng.standard_normal((256, 11), dtype=np.float32)) for _ in range(8)]
    for i in range(3):  # jit compilation
        learner.update(batches[i])
    jax.block_until_ready(learner.critic.params)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < cli.seconds:
        learner.update(batches[calls % 8])
        jax.block_until_ready(learner.critic.params)
        calls += 1
    print(json.dumps({"peer": "official-jax-iql", "updates_per_second": round(calls / (time.perf_counter() - t0), 1),
                      "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
