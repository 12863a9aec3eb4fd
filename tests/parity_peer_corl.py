"""CORL's PyTorch IQL trained and evaluated as tests/parity.py needs it (one seed, one run).

    python tests/parity_peer_corl.py --src CORL_CHECKOUT --dataset FILE.hdf5 --env hopper-medium-v2 \
        --steps 100000 --seed 0 --eval-interval 10000 --eval-episodes 10 --out DIR

Runs in this project's venv. --src is a checkout of corl-team/CORL; algorithms/offline/iql.py is
imported from there (TrainConfig, modify_reward, compute_mean_std, normalize_states, ReplayBuffer,
set_seed, TwinQ, ValueFunction, the policies, ImplicitQLearning: nothing of it is in this project),
with d4rl, gym, pyrallis and wandb stubbed (train() needs them only for the env and logging). The
config is CORL's own for the dataset, configs/offline/iql/<task>/<level>_v2.yaml from --src (hopper
medium: deterministic actor, tau 0.001, states and rewards normalized), with max_timesteps = --steps
(the actor's cosine lr spans the run) and device cpu.

What train() does, written here because d4rl and gym do not install (each step in train()'s order):
- the data as d4rl.qlearning_dataset gives it: s' is the next row, timeout steps and the last row
  are dropped; the actions are not clipped (CORL does not clip them);
- modify_reward: r * 1000 / (max - min return), episodes split at a terminal or after 1000 rows (so
  an episode cut by a timeout, 999 rows once its timeout row is dropped, runs on into the next);
- compute_mean_std(eps=1e-3) of the states, normalize_states on s and s';
- its ReplayBuffer (sized to the data: CORL's 10M rows only hold zeros never drawn), batches of 256
  from np.random.randint; set_seed(--seed) (np, random, torch) after loading, then TwinQ,
  ValueFunction and the actor (DeterministicPolicy when iql_deterministic) built in train()'s order,
  one Adam each, ImplicitQLearning, and trainer.train(batch) once per step;
- evaluation: the env's observations normalized with the data's mean and std (its wrap_env),
  actor.act in eval mode (the deterministic action), the return of each episode.
Two choices of this harness, made the same for both sides: the evaluation env is Gymnasium's
(hopper-* -> Hopper-v4, as iql.py; CORL's gym v2 env needs mujoco-py), and each evaluation's first
episode is reset with seed + step (CORL resets every evaluation with seed).
Writes DIR/evaluations.csv (step, return, return_std, normalized_score) as iql.py does.

What differs from iql.py (the official JAX code's settings) at this config: the deterministic actor
(AWR-weighted squared error to the data's action; iql.py: a Gaussian's log-likelihood), tau 0.001
(0.005), normalized states (none), no action clip (+-(1 - 1e-5)), timeout steps dropped (iql.py keeps
them where the file has next_observations), the reward scale's episodes (iql.py splits at timeouts),
V(s') and the advantages from V before its step (iql.py: after), PyTorch's default init (orthogonal).
"""
import argparse
import dataclasses
import importlib.util
import os
import sys
import time
import types

import numpy as np

from parity_peer_jax import LOCOMOTION, d4rl_transitions, evaluate, record


def qlearning_dataset(path: str) -> dict:
    """d4rl.qlearning_dataset's transitions as float32 arrays (bool terminals), the actions not
    clipped (CORL does not clip them)."""
    return {k: v if k == "terminals" else v.astype(np.float32) for k, v in d4rl_transitions(path).items()}


def stub(name: str, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_corl(src: str):
    """CORL's algorithms/offline/iql.py as a module; the imports it uses only for envs and logging
    are stubbed."""
    for name in ("d4rl", "wandb"):
        stub(name)
    stub("gym", Env=object)  # an annotation only
    stub("pyrallis", wrap=lambda *a, **k: (lambda f: f), dump=lambda *a, **k: None)
    spec = importlib.util.spec_from_file_location(
        "corl_iql", os.path.join(src, "algorithms", "offline", "iql.py"))
    corl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corl)
    return corl


def load_config(corl, src: str, env: str, steps: int, seed: int):
    """CORL's TrainConfig at its yaml for the D4RL name (hopper-medium-v2 ->
    configs/offline/iql/hopper/medium_v2.yaml), with max_timesteps = steps and seed, on the CPU."""
    import yaml
    task, version = env.split("-")[0], env.split("-")[-1]
    level = "_".join(env.split("-")[1:-1])
    path = os.path.join(src, "configs", "offline", "iql", task, f"{level}_{version}.yaml")
    if not os.path.isfile(path):
        sys.exit(f"parity_peer_corl.py: error: CORL has no IQL config for {env} ({path})")
    with open(path) as f:
        fields = yaml.safe_load(f)
    kinds = {f.name: f.type for f in dataclasses.fields(corl.TrainConfig)}
    fields = {k: kinds[k](v) if kinds[k] in (int, float) else v  # as pyrallis: 3e-4 is a str to yaml
              for k, v in fields.items()}
    return corl.TrainConfig(**{**fields, "max_timesteps": steps, "seed": seed, "device": "cpu"})


def prepare(corl, config, path: str) -> tuple:
    """train()'s data: the d4rl dataset, its rewards modified and its states normalized as the
    config says; returns (dataset, state_mean, state_std)."""
    dataset = qlearning_dataset(path)
    if config.normalize_reward:
        corl.modify_reward(dataset, config.env)
    if config.normalize:
        state_mean, state_std = corl.compute_mean_std(dataset["observations"], eps=1e-3)
    else:
        state_mean, state_std = 0, 1
    dataset["observations"] = corl.normalize_states(dataset["observations"], state_mean, state_std)
    dataset["next_observations"] = corl.normalize_states(
        dataset["next_observations"], state_mean, state_std)
    return dataset, state_mean, state_std


def normalized_env(env, state_mean, state_std):
    """wrap_env's observation transform, on a Gymnasium env."""
    import gymnasium as gym
    return gym.wrappers.TransformObservation(
        env, lambda s: (s - state_mean) / state_std, env.observation_space)


def build_trainer(corl, config, state_dim: int, action_dim: int, max_action: float):
    """set_seed, the networks, their optimizers and the trainer, as train() builds them."""
    corl.set_seed(config.seed)
    q_network = corl.TwinQ(state_dim, action_dim).to(config.device)
    v_network = corl.ValueFunction(state_dim).to(config.device)
    policy = corl.DeterministicPolicy if config.iql_deterministic else corl.GaussianPolicy
    actor = policy(state_dim, action_dim, max_action, dropout=config.actor_dropout)
    actor = actor.to(config.device)
    v_optimizer = corl.torch.optim.Adam(v_network.parameters(), lr=config.vf_lr)
    q_optimizer = corl.torch.optim.Adam(q_network.parameters(), lr=config.qf_lr)
    actor_optimizer = corl.torch.optim.Adam(actor.parameters(), lr=config.actor_lr)
    return corl.ImplicitQLearning(
        max_action=max_action, actor=actor, actor_optimizer=actor_optimizer, q_network=q_network,
        q_optimizer=q_optimizer, v_network=v_network, v_optimizer=v_optimizer,
        discount=config.discount, tau=config.tau, device=config.device, beta=config.beta,
        iql_tau=config.iql_tau, max_steps=config.max_timesteps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True, help="checkout of corl-team/CORL")
    p.add_argument("--dataset", required=True)
    p.add_argument("--env", default="hopper-medium-v2", help="the dataset's D4RL name")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-interval", type=int, default=10_000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="change fields of CORL's config after loading it (normalize=false tau=0.005)")
    a = p.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"parity_peer_corl.py: error: {a.out} already exists")
    task = a.env.split("-")[0]
    if task not in LOCOMOTION:
        sys.exit(f"parity_peer_corl.py: error: {a.env}: the harness evaluates hopper, halfcheetah "
                 "and walker2d")
    import gymnasium as gym
    corl = import_corl(a.src)
    config = load_config(corl, a.src, a.env, a.steps, a.seed)
    for field, value in (kv.split("=", 1) for kv in a.set):  # to measure one setting's effect
        setattr(config, field, value.lower() == "true" if value.lower() in ("true", "false")
                else float(value))
    dataset, state_mean, state_std = prepare(corl, config, a.dataset)
    env = normalized_env(gym.make(LOCOMOTION[task]), state_mean, state_std)
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if dataset["observations"].shape[1] != state_dim or dataset["actions"].shape[1] != action_dim:
        sys.exit(f"parity_peer_corl.py: error: the dataset does not match {LOCOMOTION[task]}")
    replay_buffer = corl.ReplayBuffer(state_dim, action_dim, len(dataset["rewards"]), config.device)
    replay_buffer.load_d4rl_dataset(dataset)
    max_action = float(env.action_space.high[0])
    trainer = build_trainer(corl, config, state_dim, action_dim, max_action)
    actor = trainer.actor

    def act(state):  # eval_actor: eval mode, actor.act (the deterministic action)
        actor.eval()
        action = actor.act(state, config.device)
        actor.train()
        return action

    os.makedirs(a.out)
    evals, t0 = [], time.perf_counter()
    for step in range(1, a.steps + 1):  # CORL's t = step - 1
        batch = replay_buffer.sample(config.batch_size)
        trainer.train([b.to(config.device) for b in batch])
        if step % a.eval_interval == 0 or step == a.steps:
            record(evaluate(act, env, a.eval_episodes, a.seed + step), step, task, evals, a.out, t0)


if __name__ == "__main__":
    main()
