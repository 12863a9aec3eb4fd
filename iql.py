"""Implicit Q-Learning (IQL): offline RL with in-sample Q-learning.

Kostrikov, Nair, Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022,
arXiv:2110.06169; official code (JAX): ikostrikov/implicit_q_learning. One gradient step, in the
official order, on a batch (s, a, r, s', m), m = 1 - terminal; Q never sees an unseen action:

    V:  L_V  = E[ L2_tau(min_k Qtarget_k(s, a) - V(s)) ],  L2_tau(u) = |tau - 1(u < 0)| u^2
    pi: L_pi = -E[ min(exp(beta (min_k Qtarget_k(s, a) - V(s))), 100) log pi(a|s) ]  (the new V)
    Q:  L_Q  = E[ sum_k (Q_k(s, a) - (r + gamma m V(s')))^2 ]                        (the new V)
    Qtarget <- (1 - lambda) Qtarget + lambda Q                                  (Polyak on Q only)

Usage:
    python iql.py --env hopper-medium-v2                    # downloads the D4RL file
    python iql.py --env hopper-medium-v2 --dataset hopper-medium-local.hdf5
    python iql.py --env D4RL/antmaze/umaze-v1               # a Minari id, evaluated in its env
    python iql.py --env Pendulum-v1 --dataset pendulum.hdf5 # any Gymnasium id, a D4RL-format file

Differences from the official code (docs/iql.md: each family's defaults, the environments):
- Evaluation in Gymnasium's MuJoCo v4 envs (D4RL's models); the files are read with h5py.
- Files with next_observations keep timeout steps as non-terminal transitions (m = 1);
  d4rl.qlearning_dataset drops them (we do so only for files without next_observations).
- ant-* data and other Gymnasium ids get the locomotion reward scaling too.
- An env whose action bounds are not [-1, 1] is rescaled to them, and so are the data's actions.
"""

import json
import math
import os
import random
import sys
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace
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
    exp_name: str = "iql"  # name of this experiment (part of the run folder's name)
    env: str = "hopper-medium-v2"
    """a D4RL name, a Minari id (D4RL/antmaze/umaze-v1) or, with --dataset, a Gymnasium id"""
    dataset: Optional[str] = None  # path of a local D4RL-format .hdf5; skips the download
    seed: int = 42  # seed of python, numpy, torch and the evaluation env (official default: 42)
    max_steps: int = 1_000_000  # number of gradient steps
    batch_size: int = 256  # transitions per gradient step
    eval_interval: int = 5000  # gradient steps between evaluations; 0 = evaluate only at the end
    eval_episodes: Optional[int] = None  # episodes per evaluation (10, antmaze 100); 0 = never
    log_interval: int = 1000  # gradient steps between logged losses
    expectile: Optional[float] = None  # tau of the expectile value loss (default: 0.7, antmaze 0.9)
    beta: Optional[float] = None  # AWR inverse temperature (3; antmaze 10; kitchen/adroit 0.5)
    actor_dropout: Optional[float] = None  # actor hidden-layer dropout (none; kitchen/adroit: 0.1)
    normalize_rewards: Optional[bool] = None  # r * 1000 / (max - min return); on for locomotion
    exp_adv_max: float = 100.0  # upper clip of the AWR weight exp(beta * A)
    actor_lr: float = 3e-4  # actor learning rate (cosine-decayed to 0)
    critic_lr: float = 3e-4  # Q learning rate
    value_lr: float = 3e-4  # V learning rate
    lr_decay_steps: Optional[int] = None  # actor's cosine lr decay horizon (default: --max-steps)
    hidden_dim: int = 256  # width of the two hidden layers of every network
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target Q
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # capture the update as one CUDA graph (applies only on a CUDA device)
    compile: bool = False  # torch.compile the update
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    capture_video: bool = False  # record the first episode of each evaluation under the run folder
    save_model: bool = False  # write run_dir/checkpoint.pt at each evaluation and at the end
    resume: Optional[str] = None  # continue from a checkpoint.pt (outputs: its folder or --run-dir)
    run_dir: Optional[str] = None
    """output folder (default: runs/{env}__{exp_name}__{seed}__{time}); must not exist"""


FAMILY_DEFAULTS = {  # expectile, beta, actor dropout, eval episodes, normalize rewards (official)
    "locomotion": (0.7, 3.0, None, 10, True), "antmaze": (0.9, 10.0, None, 100, False),
    "kitchen": (0.7, 0.5, 0.1, 10, False), "adroit": (0.7, 0.5, 0.1, 10, False)}


def with_family_defaults(args: Args) -> Args:
    """Args with the flags left unset (None) filled from the dataset family's official config."""
    fields = ("expectile", "beta", "actor_dropout", "eval_episodes", "normalize_rewards")
    defaults = zip(fields, FAMILY_DEFAULTS[family_of(args.env)])
    return replace(args, **{k: v for k, v in defaults if getattr(args, k) is None})


# ----------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """k independent linear layers applied as one batched matmul: (k, B, in) -> (k, B, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))
        for w in self.weight.data:
            nn.init.orthogonal_(w, gain=math.sqrt(2))  # flax orthogonal(sqrt 2), as the official

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, k: int = 2):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(EnsembleLinear(k, obs_dim + act_dim, hidden), nn.ReLU(),
                                 EnsembleLinear(k, hidden, hidden), nn.ReLU(),
                                 EnsembleLinear(k, hidden, 1))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(self.k, -1, -1)
        return self.net(x).squeeze(-1)  # (k, B)


def mlp(n_in: int, hidden: int, n_out: int, dropout: Optional[float] = None) -> nn.Sequential:
    layers = []
    for a, b in ((n_in, hidden), (hidden, hidden)):
        layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    layers.append(nn.Linear(hidden, n_out))
    for layer in (m for m in layers if isinstance(m, nn.Linear)):
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


# ----------------------------------------------------------------------------- the method
class IQL(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args, self.lr_decay_steps = args, args.lr_decay_steps or args.max_steps
        self.actor = GaussianActor(obs_dim, act_dim, args.hidden_dim, args.actor_dropout)
        self.critic = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.critic_target = TwinQ(obs_dim, act_dim, args.hidden_dim).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.value = mlp(obs_dim, args.hidden_dim, 1)
        self.to(device)
        # (CUDA graph) capturable: Adam's step count on the GPU; the lr and update count tensors
        adam = dict(fused=True, capturable=device.type == "cuda")
        self.actor_lr = torch.tensor(args.actor_lr, device=device)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.actor_lr, **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, **adam)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=args.value_lr, **adam)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))

    def update(self, obs, act, rew, mask, next_obs) -> dict:
        a = self.args
        # 1) V: expectile regression onto the min of the target twin Q (no max over actions):
        # |tau - 1(u < 0)| u^2, an asymmetric square whose minimiser is the tau-expectile
        with torch.no_grad():
            q_target = self.critic_target(obs, act).min(0).values
        u = q_target - self.value(obs).squeeze(-1)
        value_loss = (torch.where(u > 0, a.expectile, 1 - a.expectile) * u.pow(2)).mean()
        self.value_opt.zero_grad()
        value_loss.backward()
        self.value_opt.step()

        # 2) pi: advantage-weighted regression, advantages from the V just updated
        with torch.no_grad():
            adv = q_target - self.value(obs).squeeze(-1)
            weight = torch.exp(a.beta * adv).clamp(max=a.exp_adv_max)
        actor_loss = -(weight * self.actor.log_prob(obs, act)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        progress = self.num_updates.clamp(max=self.lr_decay_steps) / self.lr_decay_steps
        self.actor_lr.copy_(a.actor_lr * 0.5 * (1 + torch.cos(math.pi * progress)))  # cosine
        self.actor_opt.step()

        # 3) Q: regress both heads onto r + gamma * m * V(s'), with the same new V
        with torch.no_grad():
            q_backup = rew + a.gamma * mask * self.value(next_obs).squeeze(-1)
        critic_loss = (self.critic(obs, act) - q_backup).pow(2).sum(0).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        # 4) Polyak average of Q only (no target V); no_grad, or autograd records every step
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()),
                                 list(self.critic.parameters()), a.tau)
        self.num_updates += 1
        # (actor_lr as a copy: torch.compile mishandles returning a buffer it mutated)
        return {"losses/value_loss": value_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "values/adv_mean": adv.mean(),
                "values/q": q_target.mean(), "values/actor_lr": self.actor_lr.clone()}


# ----------------------------------------------------------------------------- the data it sees
BATCH_KEYS = ("observations", "actions", "rewards", "masks", "next_observations")


def qlearning_transitions(data: dict) -> dict:
    """(s, a, r, s', m) as float32 arrays plus episode ends (for reward scaling)."""
    obs, terminals = data["observations"], data["terminals"].astype(bool)
    timeouts = data["timeouts"].astype(bool)
    if "next_observations" in data:
        next_obs, keep = data["next_observations"], np.ones(len(obs), dtype=bool)
        jump = np.linalg.norm(obs[1:] - next_obs[:-1], axis=-1) > 1e-6  # files without timeouts
        ends = terminals | timeouts | np.append(jump, True)
    else:  # rebuild s' from the next row; a timeout's next row is another episode's start
        next_obs = np.concatenate([obs[1:], obs[-1:]])
        keep = terminals | ~np.append(timeouts[:-1], True)
        ends = terminals | np.append(timeouts[1:], True)  # the step before a dropped timeout
        ends[-1] = True
    t = dict(observations=obs[keep], actions=data["actions"][keep], rewards=data["rewards"][keep],
             masks=1.0 - terminals[keep], next_observations=next_obs[keep], ends=ends[keep])
    return {k: v.astype(bool if k == "ends" else np.float32) for k, v in t.items()}


def normalize_rewards(rewards: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Locomotion reward scale: r * 1000 / (max - min trajectory return), as the official code."""
    returns = np.add.reduceat(rewards, np.concatenate([[0], np.flatnonzero(ends[:-1]) + 1]))
    if returns.max() - returns.min() < 1e-8:
        fail("reward normalization needs trajectories with different returns; "
             "pass --normalize-rewards False")
    return rewards * (1000.0 / (returns.max() - returns.min()))


def load_dataset(args: Args, env: Optional[gym.Env], device: torch.device) -> dict:
    """The dataset (a D4RL file or a Minari id) as (s, a, r, m, s') tensors on the device: checked
    against the env's spaces, actions scaled to [-1, 1], rewards as the family's config has them."""
    raw = read_minari(args.env) if is_minari(args.env) else read_d4rl(dataset_path(args))
    data = qlearning_transitions(raw)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    if env is not None:
        space = env.unwrapped.action_space
        if env.observation_space.shape != (obs_dim,) or space.shape != (act_dim,):
            fail(f"the dataset's observations/actions have {obs_dim}/{act_dim} dims but {args.env} "
                 f"has {env.observation_space.shape}/{space.shape}")
        low, high = space.low - 1e-3, space.high + 1e-3
        if np.any(data["actions"] < low) or np.any(data["actions"] > high):
            fail(f"the dataset's actions leave {args.env}'s bounds [{space.low}, {space.high}]")
        scaled = 2 * (data["actions"] - space.low) / (space.high - space.low) - 1
        data["actions"] = scaled.astype(np.float32)
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)  # as the official loader
    if family_of(args.env) == "antmaze":
        data["rewards"] = data["rewards"] - 1.0
    if args.normalize_rewards:
        data["rewards"] = normalize_rewards(data["rewards"], data["ends"])
    return {k: torch.as_tensor(data[k], device=device) for k in BATCH_KEYS}


# ----------------------------------------------------------------------------- the training loop
def main(args: Args) -> dict:
    args = with_family_defaults(args)  # the dataset family's settings for the flags left unset
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    check_args(args, device)
    resume = load_checkpoint(args.resume, device) if args.resume else None
    resume_dir = os.path.dirname(os.path.abspath(args.resume)) if resume else None
    run_dir = args.run_dir or resume_dir or (
        f"runs/{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if os.path.exists(run_dir) and not (resume and os.path.samefile(run_dir, resume_dir)):
        fail(f"run folder {run_dir} already exists; choose another --run-dir "
             "(runs are never overwritten)")
    ref = reference_scores(args.env)  # (random, expert) returns for the normalized score
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # the whole dataset lives on the device; the env gives the action bounds and the evaluation
    evaluating = args.eval_episodes > 0
    locomotion = family_of(args.env) == "locomotion"
    env = make_env(args.env, args.capture_video) if evaluating or locomotion else None
    buffer = load_dataset(args, env, device)
    n, obs_dim, act_dim = *buffer["observations"].shape, buffer["actions"].shape[1]
    agent = IQL(obs_dim, act_dim, args, device)
    start, evals = restore(agent, resume, device) if resume else (0, [])
    if resume:
        print(f"resumed from {args.resume} at step {start}")

    def train_step():
        idx = torch.randint(0, n, (args.batch_size,), device=device)  # drawn on the device
        return agent.update(*(buffer[k][idx] for k in BATCH_KEYS))

    step_fn = torch.compile(train_step) if args.compile else train_step
    if args.cuda_graph and device.type == "cuda":
        step_fn = cuda_graph(step_fn)  # its 3 eager warm-ups are the loop's first 3 updates
    writer = SummaryWriter(run_dir)  # makes the run folder
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, config=vars(args), dir=run_dir,
                   name=os.path.basename(run_dir), sync_tensorboard=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        resolved = dict(device=str(device), ref_scores=ref, dataset_transitions=n)
        json.dump({**asdict(args), "resolved": resolved}, f, indent=2)
    if evaluating and args.capture_video:
        env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"),
                                       episode_trigger=lambda e: e % args.eval_episodes == 0)

    results, end, t_eval, t0 = {}, args.max_steps, 0.0, None
    warmup = min(start + 50, end)  # updates/s is measured after compile/capture warm-up
    for step in tqdm(range(start + 1, end + 1), disable=not sys.stdout.isatty(), desc="iql"):
        info = step_fn()  # one gradient step: V, then pi, then Q, then the target Q
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if step % args.log_interval == 0 or step == end:
            for k, v in info.items():  # the loop's only host sync; a NaN or inf stops the run
                results[k] = v.item()
                if not math.isfinite(results[k]):
                    fail(f"{k} became {results[k]} at step {step}; lower the learning rates or "
                         "check the dataset")
                writer.add_scalar(k, results[k], step)
            if t0 is not None and step > warmup:
                ups = (step - warmup) / (time.perf_counter() - t0 - t_eval)
                results["updates_per_second"] = ups
                writer.add_scalar("charts/updates_per_second", ups, step)
            losses = " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in results.items()
                              if k.startswith("losses"))
            print(f"step={step} {losses} ups={results.get('updates_per_second', math.nan):.0f}",
                  flush=True)
        checkpoint = step == end or (args.eval_interval > 0 and step % args.eval_interval == 0)
        if evaluating and checkpoint:
            t = time.perf_counter()
            returns = evaluate(agent.actor, env, args.eval_episodes, device, args.seed + step)
            ret, std = float(returns.mean()), float(returns.std())
            score = 100 * (ret - ref[0]) / (ref[1] - ref[0]) if ref else math.nan  # as d4rl's
            evals.append((step, ret, std, score))
            writer.add_scalar("eval/return", ret, step)
            writer.add_scalar("eval/normalized_score", score, step)
            with open(os.path.join(run_dir, "evaluations.csv"), "w") as f:
                f.write("step,return,return_std,normalized_score\n")
                f.writelines(f"{s},{r:.2f},{sd:.2f},{sc:.2f}\n" for s, r, sd, sc in evals)
            normalized = f" normalized={score:.1f}" if math.isfinite(score) else ""
            print(f"step={step} eval/return={ret:.1f} +- {std:.1f}{normalized}", flush=True)
            results.update({"eval/return": ret, "eval/normalized_score": score})
            t_eval += time.perf_counter() - t if t0 is not None else 0.0
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, step, args, evals)
    writer.close()
    if env is not None:
        env.close()
    return {"updates_per_second": math.nan, **results, "updates": max(end - start, 0),
            "run_dir": run_dir, "evaluations": evals}


# =============================================================================
# Plumbing: checks, D4RL and Minari data, environments, evaluation, checkpoints, the CUDA-graph
# helper. Nothing below changes what the method is given.
# =============================================================================
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"iql.py: error: {message}")


def check_args(args: Args, device: torch.device):
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    if args.dataset is not None and is_minari(args.env):
        fail(f"--dataset is a D4RL-format file, and '{args.env}' is a Minari id (read from "
             "Minari's cache); pass one of them")
    if not 0 < args.expectile < 1:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if min(args.max_steps, args.batch_size, args.log_interval) < 1:
        fail("--max-steps, --batch-size and --log-interval must be positive")


# ----------------------------------------------------------------------------- D4RL files
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"  # D4RL_BASE_URL: a mirror
LOCOMOTION = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4",
              "ant": "Ant-v4"}
ADROIT = ("pen", "hammer", "door", "relocate")
ANTMAZE_FILES = {  # d4rl's v2 antmaze files: level -> (maze, multistart, multigoal)
    "umaze": ("u-maze", False, False), "umaze-diverse": ("u-maze", True, True),
    "medium-play": ("big-maze", True, False), "medium-diverse": ("big-maze", True, True),
    "large-play": ("hardest-maze", True, False), "large-diverse": ("hardest-maze", True, True)}
KITCHEN_FILES = {"complete": "mini_kitchen_microwave_kettle_light_slider",
                 "partial": "kitchen_microwave_kettle_light_slider",
                 "mixed": "kitchen_microwave_kettle_bottomburner_light"}
REF_SCORES = {  # d4rl's (random, expert) returns for the normalized score
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7), "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0), "pen": (96.262799, 3076.8331), "hammer": (-274.856578, 12794.134825),
    "door": (-56.512833, 2880.5693), "relocate": (-6.425911, 4233.877797),
}


def d4rl_url(name: str) -> Optional[str]:
    """d4rl's download URL for a dataset name, or None if the name is not a D4RL dataset."""
    base = os.environ.get("D4RL_BASE_URL", D4RL_URL).rstrip("/")
    task, _, rest = name.partition("-")
    level, _, version = rest.rpartition("-")
    levels = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
    if task in LOCOMOTION and version == "v2" and level in levels:
        return f"{base}/gym_mujoco_v2/{task}_{level.replace('-', '_')}-v2.hdf5"
    if task == "antmaze" and version == "v2" and level in ANTMAZE_FILES:
        file = "Ant_maze_{}_noisy_multistart_{}_multigoal_{}_sparse_fixed.hdf5"
        return f"{base}/ant_maze_v2/" + file.format(*ANTMAZE_FILES[level])
    if task == "kitchen" and version == "v0" and level in KITCHEN_FILES:
        return f"{base}/kitchen/{KITCHEN_FILES[level]}-v0.hdf5"
    if task in ADROIT and version == "v1" and level in ("human", "cloned", "expert"):
        return f"{base}/hand_dapg_v1/{name}.hdf5"
    return None


def task_of(env: str) -> str:
    """hopper for hopper-medium-v2, Hopper-v4 and mujoco/hopper/medium-v0."""
    return (env.split("/")[-2] if is_minari(env) else env.split("-")[0]).lower()


def family_of(env: str) -> str:
    task = task_of(env)
    return "adroit" if task in ADROIT else task if task in ("antmaze", "kitchen") else "locomotion"


def dataset_path(args: Args) -> str:
    """--dataset, or the D4RL file in its cache folder, downloaded (to a .part file) if missing."""
    if args.dataset is not None:
        if not os.path.isfile(args.dataset):
            fail(f"dataset file {args.dataset} does not exist")
        return args.dataset
    url = d4rl_url(args.env)
    if url is None:
        fail(f"unknown D4RL dataset '{args.env}' (e.g. hopper-medium-v2, antmaze-umaze-v2, "
             "pen-human-v1); for a Gymnasium env pass --dataset PATH")
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    path = os.path.join(folder, url.split("/")[-1])
    if os.path.isfile(path):
        return path
    print(f"downloading {args.env} from {url} to {path}")
    os.makedirs(folder, exist_ok=True)
    try:  # (urllib's errors are OSErrors)
        with urllib.request.urlopen(url, timeout=60) as response, open(path + ".part", "wb") as out:
            size = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    bar.update(out.write(chunk))
        if size is not None and os.path.getsize(path + ".part") != size:
            fail(f"download of {url} stopped at {os.path.getsize(path + '.part')} of {size} "
                 "bytes; run again")
        read_d4rl(path + ".part")  # refuse to cache a file that is not a D4RL dataset
        os.replace(path + ".part", path)
    except OSError as e:
        fail(f"could not download {url} ({e}); with no network, download it elsewhere and put it "
             f"at {path}, or pass --dataset PATH")
    finally:
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
    return path


def read_d4rl(path: str) -> dict:
    """The D4RL HDF5 layout: observations, actions, rewards, terminals, timeouts, [next_obs...]."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    try:
        with h5py.File(path, "r") as f:
            if missing := [k for k in keys[:4] if k not in f]:
                fail(f"{path} is not a D4RL dataset: it has no {', '.join(missing)}")
            data = {k: f[k][()] for k in keys if k in f}
    except OSError as e:
        fail(f"{path} is not a readable HDF5 file ({e}); delete it and download it again")
    n = len(data["observations"])
    data.setdefault("timeouts", np.zeros(n, dtype=bool))
    bad = [k for k, v in data.items() if len(v) != n]
    if n < 2 or bad:
        fail(f"{path} is corrupt: {n} observations but {bad} have other lengths")
    return data


# ----------------------------------------------------------------------------- Minari datasets
def is_minari(env: str) -> bool:
    """Minari ids are paths (mujoco/hopper/medium-v0); D4RL names and Gymnasium ids are not."""
    return "/" in env


def minari_dataset(dataset_id: str):
    """The Minari dataset, downloaded on first use to Minari's cache folder."""
    try:
        import minari
        from minari.storage.datasets_root_dir import get_dataset_path
    except ImportError:
        fail(f"'{dataset_id}' is a Minari id, which needs minari: pip install 'minari[hdf5]'")
    path = get_dataset_path(dataset_id)
    try:  # the local copy, else a download
        return minari.load_dataset(dataset_id, download=not os.path.isdir(f"{path}/data"))
    except ValueError as e:  # Minari's answer for an id or version its server does not have
        fail(f"Minari has no dataset '{dataset_id}': {e}")
    except Exception as e:  # a broken local copy, or no network (huggingface_hub's errors)
        if os.path.isdir(f"{path}/data"):
            fail(f"the Minari dataset at {path} is unreadable ({type(e).__name__}: {e}); "
                 "delete it and run again")
        fail(f"could not download the Minari dataset '{dataset_id}' ({type(e).__name__}: {e}); "
             f"with no network, run `minari download {dataset_id}` elsewhere and copy the folder "
             f"to {path} (MINARI_DATASETS_PATH moves Minari's cache)")


def flat_observation(obs) -> np.ndarray:
    """A dict observation as one vector: goal keys first, then any others (nested too), sorted."""
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    goal = ("observation", "achieved_goal", "desired_goal")  # flattened in this order
    keys = [k for k in goal if k in obs] + sorted(set(obs) - set(goal))
    return np.concatenate([flat_observation(obs[k]) for k in keys], axis=-1)


def read_minari(dataset_id: str) -> dict:
    """The episodes in D4RL's layout, next_observations included (each episode's last observation
    is the s' of its last step); terminations are terminals, truncations timeouts."""
    episodes = list(minari_dataset(dataset_id).iterate_episodes())
    if not episodes:
        fail(f"the Minari dataset {dataset_id} has no episodes")
    obs = [flat_observation(e.observations) for e in episodes]  # T + 1 rows: s_0 .. s_T
    if obs[0].ndim != 2:
        fail(f"{dataset_id} has observations of shape {obs[0].shape[1:]}; "
             "these networks take vectors")
    column = lambda k: np.concatenate([np.asarray(getattr(e, k)) for e in episodes])  # noqa: E731
    return dict(observations=np.concatenate([o[:-1] for o in obs]), actions=column("actions"),
                rewards=column("rewards"), terminals=column("terminations"),
                timeouts=column("truncations"),
                next_observations=np.concatenate([o[1:] for o in obs]))


# ----------------------------------------------------------------------------- environments
def make_env(env_id: str, render: bool = False) -> gym.Env:
    """The evaluation env (a D4RL name's v4 env, a Minari id's recorded env, or a Gymnasium id),
    its actions in [-1, 1]: rescaled if its bounds differ."""
    kwargs = {"render_mode": "rgb_array"} if render else {}
    task = env_id.split("-")[0]
    if is_minari(env_id):  # as Minari recorded it; AntMaze as D4RL scored it (ends at the goal)
        dataset = minari_dataset(env_id)
        try:
            with warnings.catch_warnings():  # Minari's AntMaze data use the -v4 envs
                warnings.filterwarnings("ignore", ".*is out of date")
                env = dataset.recover_environment(eval_env=True, **kwargs)
                if family_of(env_id) == "antmaze":
                    fixes = antmaze_eval_kwargs(env.spec, dataset.env_spec)
                    env.close()
                    env = dataset.recover_environment(eval_env=True, **kwargs, **fixes)
            env.reset(seed=0)  # FrankaKitchen-v1 fails under MuJoCo >= 3.12: here, not mid-run
        except Exception as e:
            fail(f"the environment of {env_id} cannot run here ({type(e).__name__}: {e}); "
                 "pass --eval-episodes 0 to train without evaluation")
        if isinstance(env.observation_space, gym.spaces.Dict):  # flattened as the data's
            dim = flat_observation(env.observation_space.sample()).shape
            box = gym.spaces.Box(-np.inf, np.inf, dim, np.float32)
            env = gym.wrappers.TransformObservation(env, flat_observation, box)
    elif family_of(env_id) != "locomotion":
        level, v = "-".join(env_id.split("-")[1:-1]), 1 if task == "antmaze" else 2
        fail(f"{env_id}: D4RL's {task} environment needs mujoco-py; train on the same data from "
             f"Minari to evaluate in Gymnasium-Robotics (--env D4RL/{task}/{level}-v{v}), or "
             "pass --eval-episodes 0 to train without evaluation")
    else:
        if task == "ant":  # D4RL's ant: 111 dims with the contact forces all zero, no contact cost
            kwargs.update(use_contact_forces=True, contact_cost_weight=0.0)
        try:
            with warnings.catch_warnings():  # v4 on purpose (D4RL's models): no "out of date"
                warnings.filterwarnings("ignore", ".*The environment .*-v4 is out of date")
                env = gym.make(LOCOMOTION.get(task, env_id), **kwargs)
        except gym.error.Error as e:
            fail(f"unknown env '{env_id}' ({e})")
    if task == "ant":  # dims 27: zeroed, as mujoco-py under MuJoCo 2 left them in D4RL's files
        env = gym.wrappers.TransformObservation(
            env, lambda o: np.concatenate([o[:27], np.zeros_like(o[27:])]), env.observation_space)
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{env_id} has a {type(env.action_space).__name__} action space; "
             "the policy needs continuous actions")
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))  # the actor's range
    return env


def antmaze_eval_kwargs(eval_spec, data_spec) -> dict:
    """continuing_task=False (Minari's eval specs pay 1 per step at the goal), and Minari's umaze
    eval maze, the data's turned 180 degrees (Minari issue #304), turned back."""
    kwargs = {"continuing_task": False}
    maze = eval_spec.kwargs.get("maze_map")
    data_maze = data_spec.kwargs.get("maze_map") if data_spec else None
    walls = lambda m: [[cell == 1 for cell in row] for row in m]  # noqa: E731
    if maze and data_maze and walls(maze) != walls(data_maze):
        turned = [row[::-1] for row in maze[::-1]]
        if walls(turned) != walls(data_maze):
            fail(f"the eval maze of the dataset ({maze}) has other walls than its data's "
                 f"({data_maze})")
        kwargs["maze_map"] = turned
    return kwargs


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(actor: GaussianActor, env: gym.Env, episodes: int, device, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy tanh(mu(s))."""
    actor.eval()
    returns = np.zeros(episodes)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        done = False
        while not done:
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            obs, reward, terminated, truncated, _ = env.step(actor(obs_t)[0].cpu().numpy())
            returns[i] += float(reward)
            done = terminated or truncated
    actor.train()
    return returns


def reference_scores(env: str) -> Optional[tuple]:
    """(random, expert) returns: a Minari dataset's own where it has them (not AntMaze's, which
    score its continuing task), else d4rl's for the task, else None."""
    if is_minari(env) and family_of(env) != "antmaze":
        meta = minari_dataset(env).storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    return REF_SCORES.get(task_of(env))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, agent: IQL, step: int, args: Args, evals: list):
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    opts = {k: getattr(agent, k).state_dict() for k in ("actor_opt", "critic_opt", "value_opt")}
    torch.save({"script": "iql.py", "agent": agent.state_dict(), "step": step, "rng": rng,
                "args": asdict(args), "evaluations": evals, **opts}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(path: str, device: torch.device) -> dict:
    """The checkpoint at path, or one sentence saying why it is not one of this script's."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # garbage, a truncated file, a pickle of something else
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or "script" not in state:
        fail(f"{path} is not a checkpoint of iql.py")
    if state["script"] != "iql.py":
        fail(f"{path} is a checkpoint of {state['script']}, not of iql.py")
    return state


def restore(agent: IQL, state: dict, device: torch.device) -> tuple:
    """Agent, optimizers and RNG as saved, on this run's device; returns (step, evaluations)."""
    agent.load_state_dict(state["agent"])
    for k in ("actor_opt", "critic_opt", "value_opt"):
        for group in state[k]["param_groups"]:  # capturable Adam on CUDA only
            group["capturable"] = device.type == "cuda"
        getattr(agent, k).load_state_dict(state[k])
    # load_state_dict put the saved lr tensor into Adam: link the agent's back in (with its value)
    agent.actor_lr.copy_(torch.as_tensor(agent.actor_opt.param_groups[0]["lr"]))
    agent.actor_opt.param_groups[0]["lr"] = agent.actor_lr
    torch.set_rng_state(state["rng"]["torch"].cpu())
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["step"], state["evaluations"]


def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph: `warmup` eager calls on a side
    stream (they allocate optimizer state and workspaces), then one capture, then replays. Each
    call is one call of fn, so a run does the same updates with or without the graph."""
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
