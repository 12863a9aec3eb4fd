"""Implicit Q-Learning (IQL): offline RL with in-sample Q-learning.

Paper: Kostrikov, Nair, Levine, "Offline Reinforcement Learning with Implicit
Q-Learning", ICLR 2022, arXiv:2110.06169. Official code (JAX):
ikostrikov/implicit_q_learning.

IQL never queries Q at actions outside the dataset. One gradient step, in the
official order, on a batch (s, a, r, s', m) with m = 1 - terminal:

    V:  L_V  = E[ L2_tau( min_k Qtarget_k(s, a) - V(s) ) ],
        L2_tau(u) = |tau - 1(u < 0)| u^2                      (expectile tau)
    pi: L_pi = -E[ min(exp(beta (min_k Qtarget_k(s, a) - V(s))), 100) log pi(a|s) ]
        (advantage-weighted regression with the V just updated)
    Q:  L_Q  = E[ sum_k (Q_k(s, a) - (r + gamma m V(s')))^2 ]
    Qtarget <- (1 - lambda) Qtarget + lambda Q                   (Polyak on Q only)

Usage:
    python iql.py --env hopper-medium-v2                   # downloads the D4RL file
    python iql.py --env hopper-medium-v2 --dataset hopper-medium-local.hdf5
    python iql.py --env mujoco/hopper/medium-v0             # a Minari dataset, evaluated in Hopper-v5
    python iql.py --env D4RL/antmaze/umaze-v1               # D4RL's data from Minari, evaluated in AntMaze
    python iql.py --env Pendulum-v1 --dataset my_pendulum.hdf5   # any Gymnasium id
    python iql.py --help

The file reads top to bottom: Args, the networks, the method (losses and the update), main()
(the training loop); the plumbing (D4RL data, envs, evaluation, checkpoints, logging, the
CUDA-graph helper) comes last. `diff iql.py idql.py` shows what IDQL changes.

Per-family defaults (from the official configs; each is overridable):
    locomotion (halfcheetah/hopper/walker2d/ant, or any Gymnasium id):
        expectile 0.7, beta 3.0, rewards * 1000 / (max return - min return)
    antmaze: expectile 0.9, beta 10.0, rewards r - 1, 100 evaluation episodes
    kitchen, adroit (pen/hammer/door/relocate): expectile 0.7, beta 0.5, actor dropout 0.1

Differences from the official code:
- PyTorch instead of JAX; the twin Q is one batched module (stacked weights, bmm).
- Adam steps each network as one flat tensor (FlatAdam): torch's Adam bit for bit, in fewer kernels.
- Evaluation runs in Gymnasium's MuJoCo port (hopper-*-v2 -> Hopper-v4, D4RL's model on the
  new bindings: v4 on purpose, so its "out of date" warning is silenced) instead of gym +
  mujoco-py; the D4RL files are read with h5py, not `import d4rl`.
- ant-*-v2: D4RL's files have 111 observation dims of which 27: (contact forces) are all
  zero, and rewards without a contact cost (mujoco-py under MuJoCo 2 left the forces at
  zero). Ant-v4 fills both, so evaluation uses Ant-v4 with contact_cost_weight=0 and
  observation dims 27: zeroed, which is the env the data came from.
- If the file has `next_observations` they are used and timeout steps are kept as
  non-terminal transitions (m = 1). d4rl.qlearning_dataset, which the official code
  uses, rebuilds s' from the next row and drops every timeout step; we do that only
  for files without `next_observations`.
- The actor's cosine lr decay runs over `--max-steps`, as the official code
  (`cosine_decay_schedule(-actor_lr, max_steps)`); `--lr-decay-steps` overrides the horizon.
- D4RL's AntMaze, Kitchen and Adroit names train offline only (their envs need mujoco-py; without
  `--eval-episodes 0` the script says so). The same data from Minari (D4RL/antmaze/umaze-v1,
  D4RL/pen/human-v2, ...) evaluates in the env the dataset records (Gymnasium-Robotics):
  - AntMaze as D4RL did: `continuing_task=False`, so an episode ends at the goal with return 1, and
    d4rl's 0/1 reference scores (Minari's eval specs keep the data's continuing task, paying 1 per step
    at the goal). Minari's umaze eval maze is its data maze turned 180 degrees (Minari issue #304); it
    is turned back, which gives the data's start and goal.
  - Goal dicts are flattened as observation, achieved goal, desired goal (AntMaze: 27 + 2 + 2 = 31
    dims; D4RL's 29 had the ant's x-y but no goal, fixed per maze then).
  - FrankaKitchen-v1 does not run under MuJoCo >= 3.12 (Gymnasium-Robotics 1.4.2): Kitchen from Minari
    also needs `--eval-episodes 0`. Adroit runs the AdroitHand*-v1 envs, whose door/hammer/relocate
    dense rewards have a sign bug in 1.4.2 and whose pen episodes last 200 steps (D4RL's: 100).
- Minari data keep every step: terminations are terminals, truncations are timeouts, and each episode's
  final observation is the s' of its last step. The normalized score uses the dataset's own reference
  returns where it records them (else d4rl's for the task).
- ant-* datasets and other Gymnasium ids get the locomotion reward scaling too (the official
  code scales halfcheetah/hopper/walker2d only); `--no-normalize-rewards` turns it off.
- A Gymnasium env whose action bounds are not [-1, 1] (e.g. Pendulum) is rescaled to
  [-1, 1], and so are the dataset's actions, because the actor's mean is a tanh.
- `--cuda-graph`: the first 3 updates run eagerly (warm-up), the 4th is captured and every
  later one replays it; each counts as one step, so CPU and GPU runs take the same updates.
"""

import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "iql"
    """name of this experiment (part of the run folder's name)"""
    env: str = "hopper-medium-v2"
    """a D4RL dataset name (hopper-medium-v2, antmaze-umaze-v2, ...) or a Minari dataset id (mujoco/hopper/medium-v0,
    D4RL/antmaze/umaze-v1, ...); with --dataset also any Gymnasium id"""
    dataset: Optional[str] = None
    """path of a local D4RL-format .hdf5; skips the download"""
    seed: int = 42
    """seed of python, numpy, torch and the evaluation env (official default: 42)"""
    max_steps: int = 1_000_000
    """number of gradient steps"""
    batch_size: int = 256
    """transitions per gradient step"""
    eval_interval: int = 5000
    """gradient steps between evaluations; 0 = evaluate only at the end"""
    eval_episodes: Optional[int] = None
    """episodes per evaluation (default: 10, antmaze 100); 0 = never evaluate"""
    log_interval: int = 1000
    """gradient steps between logged losses"""
    expectile: Optional[float] = None
    """tau of the expectile value loss (default: 0.7, antmaze 0.9)"""
    beta: Optional[float] = None
    """inverse temperature of the AWR actor (default: 3.0, antmaze 10.0, kitchen/adroit 0.5)"""
    actor_dropout: Optional[float] = None
    """dropout in the actor's hidden layers (default: none, kitchen/adroit 0.1)"""
    normalize_rewards: Optional[bool] = None
    """scale rewards by 1000 / (max - min trajectory return) (default: on for locomotion)"""
    exp_adv_max: float = 100.0
    """upper clip of the AWR weight exp(beta * A)"""
    actor_lr: float = 3e-4
    """actor learning rate (cosine-decayed to 0)"""
    critic_lr: float = 3e-4
    """Q learning rate"""
    value_lr: float = 3e-4
    """V learning rate"""
    lr_decay_steps: Optional[int] = None
    """horizon of the actor's cosine lr decay (default: --max-steps, as the official code)"""
    hidden_dim: int = 256
    """width of the two hidden layers of every network"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target Q"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'"""
    cuda_graph: bool = True
    """capture the update as one CUDA graph (applies only on a CUDA device)"""
    compile: bool = False
    """torch.compile the update"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "rl-reference"
    """W&B project"""
    capture_video: bool = False
    """record the first episode of each evaluation under the run folder"""
    save_model: bool = False
    """write run_dir/checkpoint.pt at each evaluation and at the end"""
    resume: Optional[str] = None
    """continue from a checkpoint.pt (outputs go to its folder unless --run-dir)"""
    run_dir: Optional[str] = None
    """output folder (default: runs/{env}__{exp_name}__{seed}__{time}); must not exist"""


# ----------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """k independent linear layers applied as one batched matmul: (k, B, in) -> (k, B, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))
        for w in self.weight.data:
            nn.init.orthogonal_(w, gain=math.sqrt(2))  # flax orthogonal(sqrt 2), as the official MLPs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, k: int = 2):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(EnsembleLinear(k, obs_dim + act_dim, hidden), nn.ReLU(),
                                 EnsembleLinear(k, hidden, hidden), nn.ReLU(), EnsembleLinear(k, hidden, 1))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(self.k, -1, -1)
        return self.net(x).squeeze(-1)  # (k, B)


def mlp(n_in: int, hidden: int, n_out: int, dropout: Optional[float] = None) -> nn.Sequential:
    layers = []
    for a, b in ((n_in, hidden), (hidden, hidden)):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(hidden, n_out))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """N(tanh(mu(s)), exp(log_std)): tanh on the mean only, state-independent log-std in [-5, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, dropout: Optional[float]):
        super().__init__()
        self.mu = mlp(obs_dim, hidden, act_dim, dropout)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mu(obs))  # the deterministic evaluation action

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        log_std = self.log_std.clamp(-5.0, 2.0)
        z = (act - self(obs)) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def tie_(params: list, flat: torch.Tensor):
    """Make each of `params` a view into `flat` and its grad a view into flat.grad, in order."""
    offset = 0
    for p in params:
        p.data = flat.detach()[offset:offset + p.numel()].view_as(p)
        p.grad = flat.grad[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


class FlatAdam(torch.optim.Adam):
    """torch's Adam on one flat tensor holding all of a network's parameters, its layers' parameters and grads
    becoming views into it: the same steps bit for bit, in ~7 kernels per step instead of ~7 per layer (an
    IQL update 1.07x as fast on 2 CPU threads). zero_grad zeroes the flat grad, never drops it; a deep copy
    ties the copied layers to the copied flat tensor again."""

    def __init__(self, params, **kwargs):
        self.layers = list(params)
        flat = torch.cat([p.detach().reshape(-1) for p in self.layers]).requires_grad_()
        flat.grad = torch.zeros_like(flat)
        tie_(self.layers, flat)
        super().__init__([flat], **kwargs)

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none=False)

    def __getstate__(self):
        return {**super().__getstate__(), "layers": self.layers}

    def __setstate__(self, state: dict):
        super().__setstate__(state)
        tie_(self.layers, self.param_groups[0]["params"][0])


# ----------------------------------------------------------------------------- the method: losses and the update
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """|tau - 1(u < 0)| u^2: an asymmetric square whose minimiser is the tau-expectile."""
    weight = torch.where(diff > 0, expectile, 1 - expectile)
    return weight * diff.pow(2)


class IQL(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, expectile: float, beta: float,
                 dropout: Optional[float], device: torch.device):
        super().__init__()
        self.expectile, self.beta, self.gamma, self.tau = expectile, beta, args.gamma, args.tau
        self.exp_adv_max = args.exp_adv_max
        self.lr_decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
        self.actor = GaussianActor(obs_dim, act_dim, args.hidden_dim, dropout)
        self.critic = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.critic_target = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.value = mlp(obs_dim, args.hidden_dim, 1)
        self.to(device)
        capturable = device.type == "cuda"  # (CUDA graph) Adam keeps its step count on the GPU, replayable
        self.actor_lr = torch.tensor(args.actor_lr, device=device)  # (CUDA graph) the schedule writes a tensor
        self.actor_lr0 = args.actor_lr
        self.actor_opt = FlatAdam(self.actor.parameters(), lr=self.actor_lr, capturable=capturable)
        self.critic_opt = FlatAdam(self.critic.parameters(), lr=args.critic_lr, capturable=capturable)
        self.value_opt = FlatAdam(self.value.parameters(), lr=args.value_lr, capturable=capturable)
        # (CUDA graph) the step count is a device tensor, so the schedule is computed inside the graph
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))
        # parameter lists for the target updates (one _foreach_lerp_ each), built once instead of on every step
        self.target_params, self.online_params = list(self.critic_target.parameters()), list(self.critic.parameters())

    def update(self, obs, act, rew, mask, next_obs) -> dict:
        # 1) V: expectile regression onto the min of the target twin Q (no max over actions)
        with torch.no_grad():
            q_target = self.critic_target(obs, act).min(0).values
        value_loss = expectile_loss(q_target - self.value(obs).squeeze(-1), self.expectile).mean()
        self.value_opt.zero_grad()
        value_loss.backward()
        self.value_opt.step()

        # 2) pi: advantage-weighted regression, advantages from the V just updated
        with torch.no_grad():
            adv = q_target - self.value(obs).squeeze(-1)
            weight = torch.exp(self.beta * adv).clamp(max=self.exp_adv_max)
        actor_loss = -(weight * self.actor.log_prob(obs, act)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        progress = self.num_updates.clamp(max=self.lr_decay_steps) / self.lr_decay_steps
        self.actor_lr.copy_(self.actor_lr0 * 0.5 * (1 + torch.cos(math.pi * progress)))  # cosine decay
        self.actor_opt.step()

        # 3) Q: regress both heads onto r + gamma * m * V(s'), with the same new V
        with torch.no_grad():
            q_backup = rew + self.gamma * mask * self.value(next_obs).squeeze(-1)
        critic_loss = (self.critic(obs, act) - q_backup).pow(2).sum(0).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        # 4) Polyak average of Q only (IQL has no target V); no_grad, or autograd records every step
        with torch.no_grad():
            torch._foreach_lerp_(self.target_params, self.online_params, self.tau)
        self.num_updates += 1
        # (actor_lr is returned as a copy: torch.compile mishandles returning a buffer it mutated)
        return {"losses/value_loss": value_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "values/adv_mean": adv.mean(),
                "values/q": q_target.mean(), "values/actor_lr": self.actor_lr.clone()}

    def optimizers(self) -> dict:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "value_opt": self.value_opt}


# ----------------------------------------------------------------------------- main: the training loop
def main(args: Args) -> dict:
    hp = resolve_args(args)  # the family's expectile, beta, dropout, episodes, reward scaling; the device
    device = hp["device"]
    resume, run_dir = open_run(args, device)
    hp["ref_scores"] = reference_scores(args.env)  # after open_run: Minari's may need a download
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # data: the whole dataset lives on the device; batches are sampled there. The env gives the
    # evaluation and the action bounds; D4RL's other families have none here
    env = make_env(args.env, args.capture_video) if hp["family"] == "locomotion" or hp["eval_episodes"] > 0 else None
    buffer = load_dataset(args, hp, env, device)
    n, obs_dim, act_dim = *buffer["observations"].shape, buffer["actions"].shape[1]

    agent = IQL(obs_dim, act_dim, args, hp["expectile"], hp["beta"], hp["actor_dropout"], device)
    start, evals = 0, []
    if resume:
        load_checkpoint(agent, resume, device)
        start, evals = resume["step"], resume["evaluations"]
        print(f"resumed from {args.resume} at step {start}")

    def train_step():
        idx = torch.randint(0, n, (args.batch_size,), device=device)  # integer indices, drawn on the device
        return agent.update(*(buffer[k][idx] for k in BATCH_KEYS))

    step_fn = torch.compile(train_step) if args.compile else train_step
    if hp["cuda_graph"]:  # (of the compiled step with --compile, as LeanRL does)
        step_fn = cuda_graph(step_fn)  # its first 3 calls (eager warm-ups) are the loop's first 3 updates

    end = args.max_steps
    log = Logger(run_dir, args, hp, n, start, end)
    if hp["eval_episodes"] > 0 and args.capture_video:
        env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"),
                                       episode_trigger=lambda e: e % hp["eval_episodes"] == 0)

    def evaluate_and_log(step: int) -> dict:
        with log.paused():  # the deterministic policy tanh(mu(s)); no random draws
            returns = evaluate(agent.actor, env, hp["eval_episodes"], device, args.seed + step)
            return log.evaluation(step, returns, evals)

    results, step = {}, start
    while step < end:
        info = step_fn()  # one gradient step: V, then pi, then Q, then the target Q
        step += 1
        log.tick(step)
        last = step == end
        if step % args.log_interval == 0 or last:
            results.update(log.losses(step, info))
        if hp["eval_episodes"] > 0 and (last or (args.eval_interval > 0 and step % args.eval_interval == 0)):
            results.update(evaluate_and_log(step))
        if args.save_model and (last or (args.eval_interval > 0 and step % args.eval_interval == 0)):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, step, args, evals)
    log.close()
    if env is not None:
        env.close()
    return {"updates_per_second": float("nan"), **results, "updates": step - start, "run_dir": run_dir,
            "evaluations": evals}


# =============================================================================
# Plumbing: arguments, D4RL data, environments, evaluation, checkpoints, run folder,
# logging, the CUDA-graph helper. Nothing below changes what the algorithm does.
# =============================================================================
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"iql.py: error: {message}")


def resolve_args(args: Args) -> dict:
    """The family's defaults (FAMILY_DEFAULTS) for the flags left unset, checked, and the device."""
    family = family_of(args.env)
    d_expectile, d_beta, d_dropout, d_episodes, d_normalize = FAMILY_DEFAULTS[family]
    hp = dict(family=family, expectile=d_expectile if args.expectile is None else args.expectile,
              beta=d_beta if args.beta is None else args.beta,
              actor_dropout=d_dropout if args.actor_dropout is None else args.actor_dropout,
              eval_episodes=d_episodes if args.eval_episodes is None else args.eval_episodes,
              normalize_rewards=d_normalize if args.normalize_rewards is None else args.normalize_rewards)
    if args.dataset is not None and is_minari(args.env):
        fail(f"--dataset is a D4RL-format file, and '{args.env}' is a Minari id (read from Minari's cache); pass one of them")
    if not 0 < hp["expectile"] < 1:
        fail(f"--expectile must be in (0, 1), got {hp['expectile']}")
    if args.max_steps < 1 or args.batch_size < 1 or args.log_interval < 1:
        fail("--max-steps, --batch-size and --log-interval must be positive")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    return {**hp, "device": device, "cuda_graph": args.cuda_graph and device.type == "cuda"}


# ----------------------------------------------------------------------------- data: D4RL names, download, validation
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"  # D4RL_BASE_URL overrides it (a mirror)
LOCOMOTION = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4", "ant": "Ant-v4"}
ADROIT = ("pen", "hammer", "door", "relocate")
ANTMAZE_FILES = {  # d4rl's names for the v2 antmaze files
    "umaze": "u-maze_noisy_multistart_False_multigoal_False",
    "umaze-diverse": "u-maze_noisy_multistart_True_multigoal_True",
    "medium-play": "big-maze_noisy_multistart_True_multigoal_False",
    "medium-diverse": "big-maze_noisy_multistart_True_multigoal_True",
    "large-play": "hardest-maze_noisy_multistart_True_multigoal_False",
    "large-diverse": "hardest-maze_noisy_multistart_True_multigoal_True",
}
KITCHEN_FILES = {"complete": "mini_kitchen_microwave_kettle_light_slider", "partial": "kitchen_microwave_kettle_light_slider",
                 "mixed": "kitchen_microwave_kettle_bottomburner_light"}
REF_SCORES = {  # d4rl's (random, expert) returns for the normalized score
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3), "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7), "antmaze": (0.0, 1.0), "kitchen": (0.0, 4.0), "pen": (96.262799, 3076.8331),
    "hammer": (-274.856578, 12794.134825), "door": (-56.512833, 2880.5693), "relocate": (-6.425911, 4233.877797),
}
FAMILY_DEFAULTS = {  # expectile, beta, actor dropout, eval episodes, normalize rewards
    "locomotion": (0.7, 3.0, None, 10, True),
    "antmaze": (0.9, 10.0, None, 100, False),
    "kitchen": (0.7, 0.5, 0.1, 10, False),
    "adroit": (0.7, 0.5, 0.1, 10, False),
}


def d4rl_url(name: str) -> Optional[str]:
    """d4rl's download URL for a dataset name, or None if the name is not a D4RL dataset."""
    base = os.environ.get("D4RL_BASE_URL", D4RL_URL).rstrip("/")
    parts = name.split("-")
    task, version, level = parts[0], parts[-1], "-".join(parts[1:-1])
    levels = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
    if task in LOCOMOTION and version == "v2" and level in levels:
        return f"{base}/gym_mujoco_v2/{task}_{level.replace('-', '_')}-v2.hdf5"
    if task == "antmaze" and version == "v2" and level in ANTMAZE_FILES:
        return f"{base}/ant_maze_v2/Ant_maze_{ANTMAZE_FILES[level]}_sparse_fixed.hdf5"
    if task == "kitchen" and version == "v0" and level in KITCHEN_FILES:
        return f"{base}/kitchen/{KITCHEN_FILES[level]}-v0.hdf5"
    if task in ADROIT and version == "v1" and level in ("human", "cloned", "expert"):
        return f"{base}/hand_dapg_v1/{name}.hdf5"
    return None


def family_of(env: str) -> str:
    task = task_of(env)
    if task == "antmaze":
        return "antmaze"
    if task == "kitchen":
        return "kitchen"
    if task in ADROIT:
        return "adroit"
    return "locomotion"  # the four MuJoCo tasks and any other Gymnasium id


def task_of(env: str) -> str:
    """hopper for hopper-medium-v2, Hopper-v4 and mujoco/hopper/medium-v0; antmaze for D4RL/antmaze/umaze-v1."""
    return (env.split("/")[-2] if is_minari(env) else env.split("-")[0]).lower()


def download(url: str, path: str):
    """Stream url to a temp file beside path; rename only when complete and readable."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            size = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if size is not None and os.path.getsize(tmp) != size:
            fail(f"download of {url} stopped at {os.path.getsize(tmp)} of {size} bytes; run again")
        read_d4rl(tmp)  # refuse to cache a file that is not a D4RL dataset
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError) as e:
        fail(f"could not download {url} ({e}); with no network, download it elsewhere and put it at "
             f"{path}, or pass --dataset PATH")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def dataset_path(args: Args) -> str:
    if args.dataset is not None:
        if not os.path.isfile(args.dataset):
            fail(f"dataset file {args.dataset} does not exist")
        return args.dataset
    url = d4rl_url(args.env)
    if url is None:
        fail(f"unknown D4RL dataset '{args.env}' (e.g. hopper-medium-v2, antmaze-umaze-v2, pen-human-v1); "
             f"for a Gymnasium env pass --dataset PATH")
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    path = os.path.join(folder, url.split("/")[-1])
    if not os.path.isfile(path):
        print(f"downloading {args.env} from {url} to {path}")
        download(url, path)
    return path


def read_d4rl(path: str) -> dict:
    """The D4RL HDF5 layout: observations, actions, rewards, terminals, timeouts, [next_observations]."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in f]
            if missing:
                fail(f"{path} is not a D4RL dataset: it has no {', '.join(missing)}")
            data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                          "next_observations") if k in f}
    except OSError as e:
        fail(f"{path} is not a readable HDF5 file ({e}); delete it and download it again")
    n = len(data["observations"])
    data.setdefault("timeouts", np.zeros(n, dtype=bool))
    bad = [k for k, v in data.items() if len(v) != n]
    if n < 2 or bad:
        fail(f"{path} is corrupt: {n} observations but {bad} have other lengths")
    return data


def qlearning_transitions(data: dict) -> dict:
    """(s, a, r, s', m) as float32 arrays plus episode ends (for reward scaling)."""
    obs, terminals, timeouts = data["observations"], data["terminals"].astype(bool), data["timeouts"].astype(bool)
    n = len(obs)
    if "next_observations" in data:
        next_obs, keep = data["next_observations"], np.ones(n, dtype=bool)
        jump = np.linalg.norm(obs[1:] - next_obs[:-1], axis=-1) > 1e-6  # files without timeouts
        ends = terminals | timeouts | np.append(jump, True)
    else:  # rebuild s' from the next row; a timeout's next row is another episode's start
        next_obs = np.concatenate([obs[1:], obs[-1:]])
        keep = terminals | ~np.append(timeouts[:-1], True)
        ends = terminals | np.append(timeouts[1:], True)  # the step before a dropped timeout ends it
        ends[-1] = True
    t = dict(observations=obs[keep], actions=data["actions"][keep], rewards=data["rewards"][keep],
             masks=1.0 - terminals[keep], next_observations=next_obs[keep], ends=ends[keep])
    return {k: v.astype(bool if k == "ends" else np.float32) for k, v in t.items()}


def normalize_rewards(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Locomotion reward scale: r * 1000 / (max - min trajectory return), as the official code."""
    starts = np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1])
    returns = np.add.reduceat(rewards, starts)
    if returns.max() - returns.min() < 1e-8:
        fail("reward normalization needs trajectories with different returns; pass --no-normalize-rewards")
    return rewards * (1000.0 / (returns.max() - returns.min()))


BATCH_KEYS = ("observations", "actions", "rewards", "masks", "next_observations")  # update()'s arguments


def load_dataset(args: Args, hp: dict, env: Optional[gym.Env], device: torch.device) -> dict:
    """The dataset (a D4RL file or a Minari id) as (s, a, r, m, s') tensors on the device: checked against
    the env's spaces, actions scaled to [-1, 1], rewards transformed as the family's official config does."""
    data = qlearning_transitions(read_minari(args.env) if is_minari(args.env) else read_d4rl(dataset_path(args)))
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    if env is not None:
        space = env.unwrapped.action_space
        if env.observation_space.shape != (obs_dim,) or space.shape != (act_dim,):
            fail(f"the dataset's observations/actions have {obs_dim}/{act_dim} dims but {args.env} has "
                 f"{env.observation_space.shape}/{space.shape}")
        if np.any(data["actions"] < space.low - 1e-3) or np.any(data["actions"] > space.high + 1e-3):
            fail(f"the dataset's actions leave {args.env}'s bounds [{space.low}, {space.high}]")
        data["actions"] = (2 * (data["actions"] - space.low) / (space.high - space.low) - 1).astype(np.float32)
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)  # as the official code's D4RL loader
    if hp["family"] == "antmaze":
        data["rewards"] = data["rewards"] - 1.0
    if hp["normalize_rewards"]:
        data["rewards"] = normalize_rewards(data["rewards"], data["ends"])
    return {k: torch.as_tensor(data[k], device=device) for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- data: Minari datasets
GOAL_KEYS = ("observation", "achieved_goal", "desired_goal")  # a goal-conditioned observation, flattened in this order


def is_minari(env: str) -> bool:
    """Minari ids are paths (mujoco/hopper/medium-v0, D4RL/antmaze/umaze-v1); D4RL names and Gymnasium ids are not."""
    return "/" in env


def minari_dataset(dataset_id: str):
    """The Minari dataset, downloaded on first use (with Minari's own progress) to its cache folder."""
    try:
        import minari
        from minari.storage.datasets_root_dir import get_dataset_path
    except ImportError:
        fail(f"'{dataset_id}' is a Minari dataset id, which needs minari: pip install 'minari[hdf5]'")
    path = get_dataset_path(dataset_id)
    if os.path.isdir(os.path.join(path, "data")):
        try:
            return minari.load_dataset(dataset_id)
        except Exception as e:
            fail(f"the Minari dataset at {path} is unreadable ({type(e).__name__}: {e}); delete it and run again")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ValueError as e:  # Minari's answer for an id or version its server does not have
        fail(f"Minari has no dataset '{dataset_id}': {e}")
    except Exception as e:  # no network: huggingface_hub's connection errors
        fail(f"could not download the Minari dataset '{dataset_id}' ({type(e).__name__}: {e}); with no network, "
             f"run `minari download {dataset_id}` elsewhere and copy the folder to {path} "
             f"(MINARI_DATASETS_PATH moves Minari's cache)")


def flat_observation(obs) -> np.ndarray:
    """A goal-conditioned dict observation as one vector, keys in GOAL_KEYS' order (then any others, and
    nested dicts such as Kitchen's per-task goals, sorted). AntMaze: the ant's 27 body dims, its x-y, the
    goal's x-y (D4RL's 29 dims were the x-y and the body: its goal was fixed per maze, so left out)."""
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    keys = [k for k in GOAL_KEYS if k in obs] + sorted(set(obs) - set(GOAL_KEYS))
    return np.concatenate([flat_observation(obs[k]) for k in keys], axis=-1)


def read_minari(dataset_id: str) -> dict:
    """The episodes in D4RL's layout, next_observations included: Minari stores each episode's last
    observation, so every step, a truncated last one too, keeps its true s'. Terminations are terminals,
    truncations are timeouts."""
    dataset = minari_dataset(dataset_id)
    if not isinstance(dataset.action_space, gym.spaces.Box):
        fail(f"{dataset_id} has a {type(dataset.action_space).__name__} action space; the policy needs continuous actions")
    columns = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for episode in dataset.iterate_episodes():
        obs = flat_observation(episode.observations)  # T + 1 rows: s_0 .. s_T
        if obs.ndim != 2:
            fail(f"{dataset_id} has observations of shape {obs.shape[1:]}; these networks take vectors")
        for k, v in zip(columns, (obs[:-1], episode.actions, episode.rewards, episode.terminations,
                                  episode.truncations, obs[1:])):
            columns[k].append(np.asarray(v))
    if not columns["observations"]:
        fail(f"the Minari dataset {dataset_id} has no episodes")
    return {k: np.concatenate(v) for k, v in columns.items()}


# ----------------------------------------------------------------------------- environments
def make_env(env_id: str, render: bool = False) -> gym.Env:
    kwargs = {"render_mode": "rgb_array"} if render else {}
    if is_minari(env_id):
        return minari_env(env_id, kwargs)
    task = env_id.split("-")[0]
    if task in LOCOMOTION:
        env_id = LOCOMOTION[task]
        if task == "ant":  # D4RL's ant: 111 dims with the contact forces (27:) all zero, no contact cost
            kwargs.update(use_contact_forces=True, contact_cost_weight=0.0)
    elif family_of(env_id) != "locomotion":
        task, level = env_id.split("-")[0], "-".join(env_id.split("-")[1:-1])
        fail(f"{env_id}: D4RL's {task} environment needs mujoco-py; train on the same data from Minari to evaluate "
             f"in Gymnasium-Robotics (--env D4RL/{task}/{level}-v{1 if task == 'antmaze' else 2}), or pass "
             f"--eval-episodes 0 to train without evaluation")
    try:
        with warnings.catch_warnings():  # v4 is deliberate (D4RL's models; v5 changed them): no "out of date" warning
            warnings.filterwarnings("ignore", ".*The environment .*-v4 is out of date")
            env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        fail(f"unknown env '{env_id}' ({e})")
    env = continuous_actions(env, env_id)
    if task == "ant":
        env = ZeroContactForces(env)
    return env


def continuous_actions(env: gym.Env, name: str) -> gym.Env:
    """The env with its actions in [-1, 1] (rescaled if its bounds differ), or a clear error if they are not continuous."""
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{name} has a {type(env.action_space).__name__} action space; the policy needs continuous actions")
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))  # the policy acts in [-1, 1]; float32 bounds, as the spaces
    return env


def minari_env(dataset_id: str, kwargs: dict) -> gym.Env:
    """The dataset's evaluation env as Minari recorded it (the data's own env if it names none), its dict
    observation flattened as the data's. AntMaze is evaluated as in D4RL: the episode ends at the goal."""
    dataset = minari_dataset(dataset_id)
    try:
        with warnings.catch_warnings():  # Minari's AntMaze data are recorded in the -v4 envs: no "out of date" warning
            warnings.filterwarnings("ignore", ".*is out of date")
            env = dataset.recover_environment(eval_env=True, **kwargs)
            if family_of(dataset_id) == "antmaze":
                fixes = antmaze_eval_kwargs(env.spec, dataset.env_spec)
                env.close()
                env = dataset.recover_environment(eval_env=True, **kwargs, **fixes)
        env.reset(seed=0)  # FrankaKitchen-v1 fails when made under MuJoCo >= 3.12; others would fail here
    except Exception as e:
        fail(f"the environment of {dataset_id} cannot run here ({type(e).__name__}: {e}); pass --eval-episodes 0 "
             f"to train without evaluation")
    if isinstance(env.observation_space, gym.spaces.Dict):
        dim = flat_observation(env.observation_space.sample()).shape
        env = gym.wrappers.TransformObservation(env, flat_observation, gym.spaces.Box(-np.inf, np.inf, dim, np.float32))
    return continuous_actions(env, dataset_id)


def antmaze_eval_kwargs(eval_spec, data_spec) -> dict:
    """D4RL's AntMaze evaluation in Gymnasium-Robotics: the episode ends at the goal (continuing_task=False),
    so the return is 1 on success, else 0; Minari's eval specs keep the data's continuing task, which pays 1
    per step spent at the goal. Minari's umaze eval maze is the data's maze turned 180 degrees (Minari
    issue #304: walls, start, goal and world coordinates all flipped); turned back, it is the data's task."""
    kwargs = {"continuing_task": False}
    maze, data_maze = eval_spec.kwargs.get("maze_map"), (data_spec.kwargs.get("maze_map") if data_spec else None)
    walls = lambda m: [[cell == 1 for cell in row] for row in m]
    if maze and data_maze and walls(maze) != walls(data_maze):
        turned = [row[::-1] for row in maze[::-1]]
        if walls(turned) != walls(data_maze):
            fail(f"the eval maze of the dataset ({maze}) has other walls than its data's maze ({data_maze})")
        kwargs["maze_map"] = turned
    return kwargs


class ZeroContactForces(gym.ObservationWrapper):
    """Ant-v4's observation with dims 27: (external contact forces) zeroed, as in D4RL's ant-v2 files:
    mujoco-py with MuJoCo 2 left cfrc_ext at zero when they were collected."""

    def observation(self, obs: np.ndarray) -> np.ndarray:
        obs = obs.copy()
        obs[27:] = 0.0
        return obs


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(actor: GaussianActor, env: gym.Env, episodes: int, device: torch.device, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy tanh(mu(s))."""
    actor.eval()
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        done, total = False, 0.0
        while not done:
            act = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(act)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    actor.train()
    return np.array(returns)


def reference_scores(env: str) -> Optional[tuple]:
    """(random, expert) returns of the normalized score: a Minari dataset's own where it records them
    (not for AntMaze: Minari's are returns of its continuing task), else d4rl's for the task, else None."""
    if is_minari(env) and family_of(env) != "antmaze":
        meta = minari_dataset(env).storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    return REF_SCORES.get(task_of(env))


def normalized_score(ref: Optional[tuple], ret: float) -> float:
    """100 (R - random) / (expert - random), as d4rl; NaN without reference returns."""
    return float("nan") if ref is None else 100 * (ret - ref[0]) / (ref[1] - ref[0])


# ----------------------------------------------------------------------------- checkpoint and run folder
def open_run(args: Args, device: torch.device) -> tuple:
    """The --resume checkpoint (or None) and the run folder, which must not exist (or be the resumed run's)."""
    resume = None
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            fail(f"checkpoint {args.resume} does not exist")
        try:
            resume = torch.load(args.resume, map_location=device, weights_only=False)
        except Exception as e:  # garbage, a truncated file, a pickle of something else
            fail(f"{args.resume} is not a readable checkpoint ({type(e).__name__})")
        if not isinstance(resume, dict) or "script" not in resume:
            fail(f"{args.resume} is not a checkpoint of iql.py")
        if resume["script"] != "iql.py":
            fail(f"{args.resume} is a checkpoint of {resume['script']}, not of iql.py")
    run_dir = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if resume else
                               f"runs/{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if os.path.exists(run_dir) and not (resume and os.path.samefile(run_dir, os.path.dirname(args.resume) or ".")):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (runs are never overwritten)")
    return resume, run_dir


def save_checkpoint(path: str, agent: IQL, step: int, args: Args, evals: list):
    state = {"script": "iql.py", "agent": agent.state_dict(), "step": step, "args": asdict(args),
             "evaluations": evals, **{k: opt.state_dict() for k, opt in agent.optimizers().items()},
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(agent: IQL, state: dict, device: torch.device):
    """Agent, optimizers and RNG as saved, on this run's device (the checkpoint may come from another)."""
    agent.load_state_dict(state["agent"])
    for k, opt in agent.optimizers().items():
        for group in state[k]["param_groups"]:  # capturable Adam on CUDA only (CPU Adam refuses it)
            group["capturable"] = device.type == "cuda"
        opt.load_state_dict(state[k])
    # load_state_dict put the checkpoint's lr tensor into the actor's param group: link the agent's
    # lr tensor back in (with the saved value), or the cosine schedule no longer reaches Adam
    agent.actor_lr.copy_(torch.as_tensor(agent.actor_opt.param_groups[0]["lr"]))
    agent.actor_opt.param_groups[0]["lr"] = agent.actor_lr
    torch.set_rng_state(state["rng"]["torch"].cpu())
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])


# ----------------------------------------------------------------------------- logging
class Logger:
    """The run's outputs: args.json, TensorBoard (and W&B with --track), one stdout line per log,
    evaluations.csv; updates/s measured after the compile/capture warm-up, evaluations excluded."""

    def __init__(self, run_dir: str, args: Args, hp: dict, transitions: int, start: int, end: int):
        os.makedirs(run_dir, exist_ok=True)
        resolved = {**{k: v for k, v in hp.items() if k != "family"}, "device": str(hp["device"]),
                    "dataset_transitions": transitions}
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**asdict(args), "resolved": resolved}, f, indent=2)
        self.run_dir, self.ref_scores, self.device = run_dir, hp["ref_scores"], hp["device"]
        self.writer = SummaryWriter(run_dir)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, config=vars(args), name=os.path.basename(run_dir),
                       dir=run_dir, sync_tensorboard=True)
        self.warmup = min(start + 50, end)  # updates/s is measured after compile/capture warm-up
        self.t0, self.n0, self.t_eval = None, 0, 0.0
        self.bar = tqdm(total=end, initial=start, disable=not sys.stdout.isatty(), desc="iql")

    def tick(self, step: int):
        self.bar.update(1)
        if step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0, self.n0 = time.perf_counter(), step

    def losses(self, step: int, info: dict) -> dict:
        metrics = {k: v.item() for k, v in info.items()}  # the only host sync of the loop
        for k, v in metrics.items():
            if not math.isfinite(v):
                fail(f"{k} became {v} at step {step}; lower the learning rates or check the dataset")
            self.writer.add_scalar(k, v, step)
        line = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k.startswith("losses"))
        if self.t0 is not None and step > self.n0:
            metrics["updates_per_second"] = (step - self.n0) / (time.perf_counter() - self.t0 - self.t_eval)
            self.writer.add_scalar("charts/updates_per_second", metrics["updates_per_second"], step)
        print(f"step={step} {line} ups={metrics.get('updates_per_second', float('nan')):.0f}", flush=True)
        return metrics

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation) is not counted in updates/s."""
        t = time.perf_counter()
        yield
        if self.t0 is not None:
            self.t_eval += time.perf_counter() - t

    def evaluation(self, step: int, returns: np.ndarray, evals: list) -> dict:
        ret, score = float(returns.mean()), normalized_score(self.ref_scores, float(returns.mean()))
        evals.append((step, ret, float(returns.std()), score))
        self.writer.add_scalar("eval/return", ret, step)
        self.writer.add_scalar("eval/normalized_score", score, step)
        with open(os.path.join(self.run_dir, "evaluations.csv"), "w") as f:
            f.write("step,return,return_std,normalized_score\n")
            f.writelines(f"{s},{r:.2f},{sd:.2f},{sc:.2f}\n" for s, r, sd, sc in evals)
        normalized = f" normalized={score:.1f}" if math.isfinite(score) else ""  # D4RL tasks only
        print(f"step={step} eval/return={ret:.1f} +- {returns.std():.1f}{normalized}", flush=True)
        return {"eval/return": ret, "eval/normalized_score": score}

    def close(self):
        self.bar.close()
        self.writer.close()


# ----------------------------------------------------------------------------- CUDA graph
def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph. The first `warmup` calls run fn
    eagerly on a side stream (they allocate optimizer state, autograd buffers, cuBLAS workspaces),
    the next one captures fn and replays it, every later one replays it. Each call is exactly one
    call of fn, so a run does the same updates with or without the graph."""
    graph, out, calls = None, None, 0

    def call():
        nonlocal graph, out, calls
        calls += 1
        if calls <= warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                result = fn()
            torch.cuda.current_stream().wait_stream(stream)
            return result
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records fn's kernels without running them
                out = fn()
        graph.replay()
        return out
    return call


if __name__ == "__main__":
    main(tyro.cli(Args))
