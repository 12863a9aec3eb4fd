"""SAC at update-to-data ratio 20 with DroQ critics ("A Walk in the Park").

Paper: Smith, Kostrikov, Levine, "A Walk in the Park: Learning to Walk in 20 Minutes
With Model-Free Reinforcement Learning", RSS 2023, arXiv:2208.07860. Official code
(JAX): ikostrikov/walk_in_the_park. Critics from DroQ (Hiraoka et al., "Dropout
Q-Functions for Doubly Efficient Reinforcement Learning", ICLR 2022, arXiv:2110.02034).

Soft actor-critic where every environment step buys G = 20 critic updates. Dropout
and LayerNorm in the critics keep that many updates from overfitting. Per env step,
after `learning_starts` uniformly random steps, one batch of G x B transitions is drawn:

    for g = 1..G, on slice g:   (a', log pi(a'|s') from the actor, dropout on in Qtarget)
        y   = r + gamma m (min_k Qtarget_k(s', a') - alpha log pi(a'|s'))
        L_Q = mean_k (Q_k(s, a) - y)^2 ;  Qtarget <- (1 - tau) Qtarget + tau Q
    on the last slice:
        L_pi    = E[alpha log pi(a~|s) - mean_k Q_k(s, a~)],  a~ = tanh(u), u ~ N(mu(s), sigma(s))
        L_alpha = alpha (H - H_target),  H = -E[log pi(a~|s)],  H_target = -|A| / 2

The default task is a quadruped: Gymnasium's Ant-v4, which is controlled at 20 Hz,
so the paper's 20 minutes are 24,000 steps. With `--validation-fraction` of the new
transitions held out (never trained on), the log compares the TD error on them with
the TD error on training data, the overfitting signal of Li et al., "Efficient Deep
Reinforcement Learning Requires Regulating Overfitting", ICLR 2023, arXiv:2304.10466.
rlpd.py is the same agent with prior data (and a LayerNorm ensemble with a random target
subset): `diff sac_20min.py rlpd.py` shows the differences.

Usage:
    python sac_20min.py                                   # Ant-v4, 24k steps (20 minutes at 20 Hz)
    python sac_20min.py --env Hopper-v4 --total-timesteps 100000
    python sac_20min.py --env Pendulum-v1 --total-timesteps 3000 --learning-starts 500
    python sac_20min.py --action-filter-cutoff 4.0        # 2nd-order Butterworth low-pass, 4 Hz
    python sac_20min.py --save-dataset ant-20min.hdf5     # the replay, D4RL layout, for iql/idql/rlpd
    python sac_20min.py --help

Differences from the official code:
- PyTorch instead of JAX; both critics are one batched module (stacked weights, bmm).
- Adam steps each network as one flat tensor (FlatAdam): torch's Adam bit for bit, in fewer kernels.
- Gymnasium MuJoCo's Ant-v4 (20 Hz, episodes of 1,000 steps) instead of the official A1 run task
  in dm_control (20 Hz, episodes of 400 steps) or the real robot; no action history, no
  clipping of joint targets around the standing pose. Ant-v4 keeps Gymnasium's defaults (27-dim
  observation without contact forces, no contact cost): this script learns from scratch, so it
  need not match D4RL's ant files (111 dims, as rlpd.py's ant-* env); its --save-dataset replay
  pairs with `--env Ant-v4` in the offline scripts. The v4 MuJoCo envs are deliberate (v4 ports the
  models of D4RL's data, which the sibling scripts evaluate on); Gymnasium's "out of date" warning
  about them is silenced.
- The Butterworth filter is written out (bilinear transform, as scipy.signal.butter) instead of
  calling scipy, filters the [-1, 1] command, and starts from zero history after each reset (the
  official one filters joint targets and starts from the standing pose).
- 5% of new transitions go to the validation buffer and are never trained on (the official
  code has no validation buffer; `--validation-fraction 0` trains on everything).
- Evaluation: 5 deterministic episodes (tanh of the mean) every 2,000 steps; the official
  launcher runs 1 episode every 1,000 steps.
"""

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "sac_20min"
    """name of this experiment (part of the run folder's name)"""
    env: str = "Ant-v4"
    """a Gymnasium id with a continuous action space"""
    seed: int = 42
    """seed of python, numpy, torch and the env (official default: 42)"""
    total_timesteps: int = 24_000
    """environment steps (20 minutes at Ant's 20 Hz)"""
    learning_starts: int = 1000
    """uniformly random actions, and no updates, for this many steps (official README command: 1000)"""
    utd_ratio: int = 20
    """critic updates per environment step (G)"""
    batch_size: int = 256
    """transitions per critic update"""
    buffer_size: Optional[int] = None
    """replay capacity (default: total_timesteps, i.e. nothing is ever dropped)"""
    eval_interval: int = 2000
    """environment steps between evaluations; 0 = evaluate only at the end"""
    eval_episodes: int = 5
    """deterministic episodes per evaluation; 0 = never evaluate"""
    log_interval: int = 1000
    """environment steps between logged losses"""
    actor_lr: float = 3e-4
    """actor learning rate"""
    critic_lr: float = 3e-4
    """critic learning rate"""
    temp_lr: float = 3e-4
    """temperature learning rate"""
    hidden_dim: int = 256
    """width of the two hidden layers of actor and critics"""
    num_qs: int = 2
    """critics in the ensemble"""
    critic_dropout: float = 0.01
    """dropout rate in the critics (DroQ); kept on in target and actor evaluations"""
    critic_layer_norm: bool = True
    """LayerNorm after each critic hidden layer's dropout (DroQ)"""
    init_temperature: float = 0.1
    """initial entropy temperature alpha"""
    target_entropy: Optional[float] = None
    """entropy target (default: -|A| / 2)"""
    backup_entropy: bool = True
    """subtract gamma * m * alpha * log pi(a'|s') in the critic target"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    action_filter_cutoff: Optional[float] = None
    """cutoff (Hz) of a 2nd-order Butterworth low-pass on the actions; default: no filter (official)"""
    validation_fraction: float = 0.05
    """fraction of new transitions held out to measure the validation TD error; 0 = none"""
    save_dataset: Optional[str] = None
    """write every transition collected, in the D4RL HDF5 layout, to this new file at the end"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'"""
    cuda_graph: bool = True
    """capture the whole UTD block as one CUDA graph (applies only on a CUDA device)"""
    compile: bool = False
    """torch.compile the UTD block"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "rl-reference"
    """W&B project"""
    capture_video: bool = False
    """record the first episode of each evaluation under the run folder"""
    save_model: bool = False
    """write run_dir/checkpoint.pt (agent, optimizers, replay) at each evaluation and at the end"""
    resume: Optional[str] = None
    """continue from a checkpoint.pt (a new episode starts; outputs go to its folder unless --run-dir)"""
    run_dir: Optional[str] = None
    """output folder (default: runs/{env}__{exp_name}__{seed}__{time}); must not exist"""


# ----------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """k independent linear layers applied as one batched matmul: (k, B, in) -> (k, B, out);
    `members` (indices) applies only those layers."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))
        for w in self.weight.data:
            nn.init.xavier_uniform_(w)  # the official default_init (flax xavier_uniform; fans of a (in, out) matrix)

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        if members is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with its own scale and shift per ensemble member."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, dim))
        self.bias = nn.Parameter(torch.zeros(k, 1, dim))

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * w + b  # flax's eps


class Critics(nn.Module):
    """k Q-functions, each Dense -> [Dropout] -> [LayerNorm] -> ReLU (x2) -> Dense(1): (k, B), or
    (len(members), B) for a subset of them."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, k: int, dropout: float = 0.0, layer_norm: bool = True):
        super().__init__()
        self.k, self.dropout = k, dropout
        self.linears = nn.ModuleList([EnsembleLinear(k, obs_dim + act_dim, hidden), EnsembleLinear(k, hidden, hidden),
                                      EnsembleLinear(k, hidden, 1)])
        self.norms = nn.ModuleList([EnsembleLayerNorm(k, hidden) for _ in range(2)]) if layer_norm else None

    def forward(self, obs: torch.Tensor, act: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(self.k if members is None else len(members), -1, -1)
        for i in range(2):
            x = self.linears[i](x, members)
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)  # DroQ: on in train mode, for the target too
            if self.norms is not None:
                x = self.norms[i](x, members)
            x = F.relu(x)
        return self.linears[2](x, members).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(mu(s), sigma(s)), log sigma clipped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)
        for layer in (*self.trunk[::2], self.mu, self.log_std):
            nn.init.xavier_uniform_(layer.weight)  # the official default_init
            nn.init.zeros_(layer.bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mu(self.trunk(obs)))  # the deterministic (evaluation) action

    def sample(self, obs: torch.Tensor) -> tuple:
        """a ~ pi(.|s) by reparameterisation, and log pi(a|s) with the tanh change of variables."""
        h = self.trunk(obs)
        mu, log_std = self.mu(h), self.log_std(h).clamp(-20.0, 2.0)
        u = mu + log_std.exp() * torch.randn_like(mu)
        log_prob = (-0.5 * ((u - mu) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log |d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob


def tie_(params: list, flat: torch.Tensor):
    """Make each of `params` a view into `flat` and its grad a view into flat.grad, in order."""
    offset = 0
    for p in params:
        p.data = flat.detach()[offset:offset + p.numel()].view_as(p)
        p.grad = flat.grad[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


class FlatAdam(torch.optim.Adam):
    """torch's Adam on one flat tensor holding all of a network's parameters, its layers' parameters and grads
    becoming views into it: the same steps bit for bit, in ~7 kernels per step instead of ~7 per layer (a
    UTD block 1.06x as fast on 2 CPU threads). zero_grad zeroes the flat grad, never drops it; a deep copy
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


# ----------------------------------------------------------------------------- the method: losses and the UTD block
class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.utd, self.gamma, self.tau, self.backup_entropy = args.utd_ratio, args.gamma, args.tau, args.backup_entropy
        self.target_entropy = -act_dim / 2 if args.target_entropy is None else args.target_entropy
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim)
        self.critic = Critics(obs_dim, act_dim, args.hidden_dim, args.num_qs, args.critic_dropout,
                              args.critic_layer_norm)
        self.critic_target = Critics(obs_dim, act_dim, args.hidden_dim, args.num_qs, args.critic_dropout,
                                     args.critic_layer_norm)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)  # in train mode: its dropout stays on (DroQ)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        self.to(device)
        capturable = device.type == "cuda"  # CUDA graphs: Adam's step count on the GPU, so a graph can replay it
        self.actor_opt = FlatAdam(self.actor.parameters(), lr=args.actor_lr, capturable=capturable)
        self.critic_opt = FlatAdam(self.critic.parameters(), lr=args.critic_lr, capturable=capturable)
        self.temp_opt = torch.optim.Adam([self.log_alpha], lr=args.temp_lr, capturable=capturable)
        self.target_params, self.online_params = list(self.critic_target.parameters()), list(self.critic.parameters())

    def critic_target_value(self, rew, mask, next_obs) -> torch.Tensor:
        """y = r + gamma m (min_k Qtarget_k(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')."""
        with torch.no_grad():
            next_act, next_log_prob = self.actor.sample(next_obs)
            next_q = self.critic_target(next_obs, next_act).min(0).values
            if self.backup_entropy:
                next_q = next_q - self.log_alpha.exp() * next_log_prob
            return rew + self.gamma * mask * next_q

    def update(self, obs, act, rew, mask, next_obs) -> dict:
        """One UTD block on G x B transitions: G critic steps, one per slice, then one actor
        and one temperature step on the last slice."""
        B = obs.shape[0] // self.utd
        for g in range(self.utd):
            s = slice(g * B, (g + 1) * B)
            target = self.critic_target_value(rew[s], mask[s], next_obs[s])
            q = self.critic(obs[s], act[s])  # dropout on: a different mask per critic and step
            critic_loss = (q - target).pow(2).mean()
            self.critic_opt.zero_grad()
            critic_loss.backward()
            self.critic_opt.step()
            with torch.no_grad():  # or autograd records every Polyak step (a graph growing without end)
                torch._foreach_lerp_(self.target_params, self.online_params, self.tau)

        # actor on the mean of the critics (not their min), dropout still on
        last = slice((self.utd - 1) * B, self.utd * B)
        alpha = self.log_alpha.exp().detach()
        new_act, log_prob = self.actor.sample(obs[last])
        actor_loss = (alpha * log_prob - self.critic(obs[last], new_act).mean(0)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward(inputs=self.actor_opt.layers)  # no gradient into the critics
        self.actor_opt.step()

        # temperature: raise alpha when the entropy is below its target
        entropy = -log_prob.detach().mean()
        temp_loss = self.log_alpha.exp() * (entropy - self.target_entropy)
        self.temp_opt.zero_grad()
        temp_loss.backward()
        self.temp_opt.step()
        return {"losses/critic_loss": critic_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/temperature_loss": temp_loss.detach(), "values/q": q.detach().mean(),
                "values/entropy": entropy, "values/alpha": alpha}

    @torch.no_grad()
    def td_error(self, obs, act, rew, mask, next_obs) -> torch.Tensor:
        """Mean squared TD error of the critics on a batch, as the critic loss measures it."""
        return (self.critic(obs, act) - self.critic_target_value(rew, mask, next_obs)).pow(2).mean()

    def optimizers(self) -> dict:
        return {"actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "temp_opt": self.temp_opt}


def td_errors(agent: SAC, buffers: dict, batch_size: int, device: torch.device) -> dict:
    """The overfitting signal: the TD error on a batch of training and of held-out transitions. Its
    draws (s', a', dropout masks) come from a forked RNG: logging leaves the training run alone."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return {f"losses/{k}_td_error": agent.td_error(*b.sample(batch_size)).item()
                for k, b in buffers.items() if b.size > 0}


# ----------------------------------------------------------------------------- main: the training loop
def main(args: Args) -> dict:
    device = check_args(args)
    resume = load_resume(args, device)
    run_dir = choose_run_dir(args, resume)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env, eval_env = make_env(args), make_env(args, render=args.capture_video)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]

    agent = SAC(obs_dim, act_dim, args, device)
    capacity = args.buffer_size or args.total_timesteps
    buffers = {"train": ReplayBuffer(capacity, obs_dim, act_dim, device),  # what the updates draw from
               "validation": ReplayBuffer(capacity, obs_dim, act_dim, device)}  # held out: never trained on
    start, evals, log = restore(resume, agent, buffers, args, device)

    def train_step():  # the UTD block: indices drawn on the device, then G critic + 1 actor + 1 temperature step
        return agent.update(*buffers["train"].sample(args.utd_ratio * args.batch_size))

    step_fn = torch.compile(train_step) if args.compile else train_step
    if args.cuda_graph and device.type == "cuda":
        step_fn = cuda_graph(step_fn)  # CUDA graphs: 3 eager warm-up calls, then replays; each call is one block
    run = Run(run_dir, args, start, evals, device, resolved=dict(
        target_entropy=agent.target_entropy, buffer_size=capacity, device=str(device),
        cuda_graph=args.cuda_graph and device.type == "cuda"))
    if args.eval_episodes > 0 and args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, os.path.join(run_dir, "videos"),
                                            episode_trigger=lambda e: e % args.eval_episodes == 0)

    info, updates = None, 0
    obs, _ = env.reset(seed=args.seed + start)
    for step in range(start + 1, args.total_timesteps + 1):
        # act: uniformly at random for the first learning_starts steps, then a ~ pi(.|s)
        if step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0][0]
            action = action.cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)

        # store (s, a, r, m, s'), m = 1 - terminated: a time-limit cut is no terminal state, its s' bootstraps
        held_out = args.validation_fraction > 0 and random.random() < args.validation_fraction
        buffers["validation" if held_out else "train"].add(obs, action, reward, 1.0 - terminated, next_obs)
        if args.save_dataset is not None:
            for k, v in zip(log, (obs, action, reward, terminated, truncated, next_obs)):
                log[k].append(v)
        run.env_step(step, reward, terminated or truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs

        # update: one UTD block per env step
        if step > args.learning_starts and buffers["train"].size > 0:
            info = step_fn()
            updates += args.utd_ratio
            run.updated(step, updates)

        last = step == args.total_timesteps
        if info is not None and (step % args.log_interval == 0 or last):
            metrics = {k: v.item() for k, v in info.items()}  # the only host sync of the update path
            run.log(step, {**metrics, **td_errors(agent, buffers, args.batch_size, device)})
        if args.eval_episodes > 0 and (last or (args.eval_interval > 0 and step % args.eval_interval == 0)):
            with run.untimed():
                returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, args.seed + 10_000 + step)
            run.evaluation(step, returns)
        if args.save_model and (last or (args.eval_interval > 0 and step % args.eval_interval == 0)):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, buffers, log, step, args, run.evals)
    run.close()
    if args.save_dataset is not None and log["observations"]:
        write_d4rl(args.save_dataset, log, env)
        print(f"wrote {len(log['observations'])} transitions to {args.save_dataset}")
    env.close()
    eval_env.close()
    return run.results(updates=updates, env_steps=args.total_timesteps - start)


# ============================================================================= plumbing
# Everything below serves the loop above: input checks, resume, the run folder and logging, the
# environment, the replay buffer, evaluation, checkpoints, the D4RL writer and the CUDA-graph helper.
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"sac_20min.py: error: {message}")


def check_args(args: Args) -> torch.device:
    """Bad flags fail here, before anything is written; returns the device to run on."""
    if min(args.total_timesteps, args.utd_ratio, args.batch_size, args.log_interval) < 1:
        fail("--total-timesteps, --utd-ratio, --batch-size and --log-interval must be positive")
    if not 0 <= args.validation_fraction < 1:
        fail(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if args.save_dataset is not None:
        if os.path.exists(args.save_dataset):
            fail(f"{args.save_dataset} already exists; choose another --save-dataset (files are never overwritten)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.save_dataset))):
            fail(f"the folder of --save-dataset {args.save_dataset} does not exist")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    return device


# ----------------------------------------------------------------------------- resume and the run folder
def load_resume(args: Args, device: torch.device) -> Optional[dict]:
    if args.resume is None:
        return None
    if not os.path.isfile(args.resume):
        fail(f"checkpoint {args.resume} does not exist")
    try:
        ck = torch.load(args.resume, map_location=device, weights_only=False)
    except Exception as e:  # garbage, a truncated file, ...
        fail(f"{args.resume} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ck, dict) or "script" not in ck:
        fail(f"{args.resume} is not a checkpoint of sac_20min.py")
    if ck["script"] != "sac_20min.py":
        fail(f"{args.resume} is a checkpoint of {ck['script']}, not of sac_20min.py")
    return ck


def choose_run_dir(args: Args, resume: Optional[dict]) -> str:
    """--run-dir, the resumed checkpoint's folder, or a new runs/{env}__{exp_name}__{seed}__{time}; never
    another run's folder."""
    run_dir = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if resume else
                               f"runs/{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if os.path.exists(run_dir) and not (resume and os.path.samefile(run_dir, os.path.dirname(args.resume) or ".")):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (runs are never overwritten)")
    return run_dir


def restore(resume: Optional[dict], agent: SAC, buffers: dict, args: Args, device: torch.device) -> tuple:
    """(first step, evaluations, transitions log): a fresh run's, or the checkpoint's with the agent,
    optimizers, replay and RNG states put back as they were when it was written."""
    log = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    if resume is None:
        return 0, [], log
    agent.load_state_dict(resume["agent"])
    for k, opt in agent.optimizers().items():
        load_optimizer(opt, resume[k], device)
    for k, b in buffers.items():
        b.load_state_dict(resume["buffers"][k])
    torch.set_rng_state(resume["rng"]["torch"].cpu())  # map_location moved it to the device
    np.random.set_state(resume["rng"]["numpy"])
    random.setstate(resume["rng"]["python"])
    if resume["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([state.cpu() for state in resume["rng"]["cuda"]])
    print(f"resumed from {args.resume} at step {resume['step']} (a new episode starts)")
    return resume["step"], resume["evaluations"], resume["log"] if args.save_dataset is not None else log


class Run:
    """A run's outputs: its folder (args.json, TensorBoard, W&B), the progress bar and stdout lines,
    evaluations.csv, updates/s (from the 50th UTD block on, after compile/capture warm-up, without the
    evaluations' time) and the results main() returns."""

    def __init__(self, run_dir: str, args: Args, start: int, evals: list, device: torch.device, resolved: dict):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**asdict(args), "resolved": resolved}, f, indent=2)
        self.writer = SummaryWriter(run_dir)
        self.writer.add_text("hyperparameters",
                             "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, config=vars(args), name=os.path.basename(run_dir),
                       dir=run_dir, sync_tensorboard=True)
        self.dir, self.args, self.evals, self.device, self.metrics = run_dir, args, evals, device, {}
        self.bar = tqdm(total=args.total_timesteps, initial=start, disable=not sys.stdout.isatty(), desc="sac_20min")
        self.episode_return, self.episode_length = 0.0, 0
        self.t0, self.n0, self.t_eval = None, 0, 0.0

    def env_step(self, step: int, reward: float, done: bool):
        self.episode_return, self.episode_length = self.episode_return + float(reward), self.episode_length + 1
        if done:
            self.writer.add_scalar("charts/episodic_return", self.episode_return, step)
            self.writer.add_scalar("charts/episodic_length", self.episode_length, step)
            self.metrics["train/episodic_return"] = self.episode_return
            self.episode_return, self.episode_length = 0.0, 0
        self.bar.update(1)

    def updated(self, step: int, updates: int):
        if self.t0 is None and updates >= 50 * self.args.utd_ratio:  # measured after compile/capture warm-up
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.t0, self.n0 = time.perf_counter(), step

    @contextlib.contextmanager
    def untimed(self):
        """Time spent inside (evaluation) does not count against updates/s."""
        te = time.perf_counter()
        yield
        if self.t0 is not None:
            self.t_eval += time.perf_counter() - te

    def log(self, step: int, metrics: dict):
        for k, v in metrics.items():
            if not math.isfinite(v):
                fail(f"{k} became {v} at step {step}; lower the learning rates")
            self.writer.add_scalar(k, v, step)
        self.metrics.update(metrics)
        if self.t0 is not None and step > self.n0:
            elapsed = time.perf_counter() - self.t0 - self.t_eval
            self.metrics["env_steps_per_second"] = (step - self.n0) / elapsed
            self.metrics["updates_per_second"] = (step - self.n0) * self.args.utd_ratio / elapsed
            self.writer.add_scalar("charts/updates_per_second", self.metrics["updates_per_second"], step)
            self.writer.add_scalar("charts/SPS", self.metrics["env_steps_per_second"], step)
        line = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if k.startswith("losses"))
        print(f"step={step} {line} ups={self.metrics.get('updates_per_second', float('nan')):.0f}", flush=True)

    def evaluation(self, step: int, returns: np.ndarray):
        self.evals.append((step, float(returns.mean()), float(returns.std())))
        self.writer.add_scalar("eval/return", returns.mean(), step)
        with open(os.path.join(self.dir, "evaluations.csv"), "w") as f:
            f.write("step,return,return_std\n")
            f.writelines(f"{s},{r:.2f},{sd:.2f}\n" for s, r, sd in self.evals)
        print(f"step={step} eval/return={returns.mean():.1f} +- {returns.std():.1f}", flush=True)
        self.metrics["eval/return"] = float(returns.mean())

    def close(self):
        self.bar.close()
        self.writer.close()

    def results(self, **counts) -> dict:
        results = {**self.metrics, **counts, "run_dir": self.dir, "evaluations": self.evals}
        results.setdefault("updates_per_second", float("nan"))
        return results


# ----------------------------------------------------------------------------- environment
def make_env(args: Args, render: bool = False) -> gym.Env:
    try:
        with warnings.catch_warnings():  # v4 on purpose (D4RL's models, see the docstring): not "out of date" here
            warnings.filterwarnings("ignore", message=r".*is out of date", category=DeprecationWarning)
            env = gym.make(args.env, **({"render_mode": "rgb_array"} if render else {}))
    except gym.error.Error as e:
        fail(f"unknown env '{args.env}' ({e})")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{args.env} has a {type(env.action_space).__name__} action space; SAC needs continuous actions")
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))  # the actor acts in [-1, 1] (tanh)
    if args.action_filter_cutoff is not None:
        env = LowPassAction(env, args.action_filter_cutoff, fs=1.0 / env.unwrapped.dt)
    return env


def butterworth_lowpass(cutoff: float, fs: float) -> tuple:
    """2nd-order Butterworth low-pass by the bilinear transform (as scipy.signal.butter(2, cutoff,
    fs=fs)): y_n = b0 x_n + b1 x_{n-1} + b2 x_{n-2} - a1 y_{n-1} - a2 y_{n-2}."""
    k = math.tan(math.pi * cutoff / fs)  # pre-warped analogue frequency
    norm = 1.0 / (1.0 + math.sqrt(2) * k + k * k)
    b0 = k * k * norm
    return (b0, 2 * b0, b0), (2 * (k * k - 1) * norm, (1 - math.sqrt(2) * k + k * k) * norm)


class LowPassAction(gym.Wrapper):
    """Filters each action dimension before the env sees it (smooth commands for a real robot)."""

    def __init__(self, env: gym.Env, cutoff: float, fs: float):
        super().__init__(env)
        self.b, self.a = butterworth_lowpass(cutoff, fs)
        self.x = np.zeros((2,) + env.action_space.shape)  # last two inputs and outputs
        self.y = np.zeros((2,) + env.action_space.shape)

    def reset(self, **kwargs):
        self.x[:], self.y[:] = 0.0, 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        (b0, b1, b2), (a1, a2) = self.b, self.a
        y = b0 * action + b1 * self.x[0] + b2 * self.x[1] - a1 * self.y[0] - a2 * self.y[1]
        self.x = np.stack([action, self.x[0]])
        self.y = np.stack([y, self.y[0]])
        return self.env.step(y.astype(np.float32))


# ----------------------------------------------------------------------------- replay buffer
class ReplayBuffer:
    """Transitions as rows [s, a, r, m, s'] of one device tensor: one host-to-device copy per
    step, and batch indices drawn on the device (graph-safe: the size is a device tensor)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.dims = capacity, (obs_dim, act_dim, 1, 1, obs_dim)
        self.rows = torch.zeros(capacity, sum(self.dims), device=device)
        self.size_t = torch.zeros((), dtype=torch.long, device=device)  # CUDA graphs: the size, read on the device
        self.ptr, self.size = 0, 0

    def add(self, obs, act, rew, mask, next_obs):
        row = np.concatenate([obs, act, [rew], [mask], next_obs]).astype(np.float32)
        self.rows[self.ptr].copy_(torch.from_numpy(row))
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.size_t.fill_(self.size)  # CUDA graphs: a captured block samples from the new size

    def indices(self, n: int) -> torch.Tensor:
        """n uniform row indices (with replacement): integers mod size, as float32 `rand * size` is not
        uniform over millions of rows; the modulo's bias is below size / 2^62."""
        return torch.randint(0, 2**62, (n,), device=self.rows.device) % self.size_t

    def sample_rows(self, n: int) -> torch.Tensor:
        return self.rows[self.indices(n)]

    def split(self, rows: torch.Tensor) -> tuple:
        obs, act, rew, mask, next_obs = rows.split(self.dims, dim=-1)
        return obs, act, rew.squeeze(-1), mask.squeeze(-1), next_obs

    def sample(self, n: int) -> tuple:
        """(s, a, r, m, s') of n uniform draws."""
        return self.split(self.sample_rows(n))

    def state_dict(self) -> dict:
        """The rows oldest first, so that a run with another capacity can resume them."""
        return {"rows": torch.cat([self.rows[self.ptr:self.size], self.rows[:self.ptr]]).cpu(), "size": self.size}

    def load_state_dict(self, state: dict):
        rows = state["rows"].roll(-state.get("ptr", 0), 0)  # ("ptr": older checkpoints stored the ring as is)
        rows = rows[-self.capacity:]  # the newest rows, if this run's capacity is smaller
        self.size = len(rows)
        self.rows[:self.size] = rows.to(self.rows.device)
        self.ptr = self.size % self.capacity  # the next row goes after the newest; row 0 only when full
        self.size_t.fill_(self.size)


# ----------------------------------------------------------------------------- evaluation, checkpoints, the D4RL writer
@torch.no_grad()
def evaluate(actor: TanhGaussianActor, env: gym.Env, episodes: int, device: torch.device, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy tanh(mu(s))."""
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
    return np.array(returns)


def write_d4rl(path: str, log: dict, env: gym.Env):
    """The collected transitions in D4RL's layout, actions in the env's own units."""
    space = env.unwrapped.action_space
    actions = space.low + (np.array(log["actions"]) + 1) * (space.high - space.low) / 2
    timeouts = np.array(log["timeouts"])
    timeouts[-1] = not log["terminals"][-1]  # the last episode was cut off by the end of the run
    with h5py.File(path, "w") as f:
        for k, v in (("observations", log["observations"]), ("next_observations", log["next_observations"]),
                     ("rewards", log["rewards"])):
            f[k] = np.array(v, dtype=np.float32)
        f["actions"] = actions.astype(np.float32)
        f["terminals"], f["timeouts"] = np.array(log["terminals"]), timeouts


def load_optimizer(opt: torch.optim.Optimizer, state: dict, device: torch.device):
    """Optimizer state from a checkpoint, with Adam's `capturable` set for this run's device: the saved
    flag is the saving run's (True from CUDA fails on CPU; False fails inside a CUDA graph)."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["capturable"] = device.type == "cuda"


def save_checkpoint(path: str, agent: SAC, buffers: dict, log: dict, step: int, args: Args, evals: list):
    state = {"script": "sac_20min.py", "agent": agent.state_dict(), "step": step,
             "args": asdict(args), "evaluations": evals, "log": log,
             "buffers": {k: b.state_dict() for k, b in buffers.items()},
             **{k: opt.state_dict() for k, opt in agent.optimizers().items()},
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old checkpoint intact


# ----------------------------------------------------------------------------- CUDA graphs
def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph. The first `warmup` calls run fn
    eagerly on a side stream (they allocate optimizer state, autograd buffers, cuBLAS workspaces),
    the next one captures and replays it; every call is one real call of fn, so a GPU run does
    exactly the updates of a CPU run (the capture itself runs nothing)."""
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
            with torch.cuda.graph(graph):
                out = fn()
        graph.replay()
        return out
    return call


if __name__ == "__main__":
    main(tyro.cli(Args))
