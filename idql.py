"""Implicit Diffusion Q-Learning (IDQL): IQL's critic choosing among a diffusion policy's samples.

Hansen-Estruch, Kostrikov, Janner, Kuba, Levine, "IDQL: Implicit Q-Learning as an Actor-Critic
Method with Diffusion Policies", 2023, arXiv:2304.10573; official code (JAX): philippe-eecs/IDQL,
learner ddpm_iql_simple. IQL's implicit policy is pi(a|s) ~ mu(a|s) w(s, a): IDQL fits mu with a
DDPM and lets the critic choose among mu's samples. One gradient step, in the official order, on a
batch (s, a, r, s', m), m = 1 - terminal; then how it acts:

    mu:  L_mu = E_{t ~ U{0..T-1}, eps ~ N(0, I)} || eps - eps_th(a_t, s, t) ||^2,  T = 5 (VP),
         a_t = sqrt(ah_t) a + sqrt(1 - ah_t) eps;  EMA of the sampler: th' <- 0.999 th' + 0.001 th
    V:   L_V  = E[ L_tau(min_k Qtarget_k(s, a) - V(s)) ],  L_tau(u) = |tau - 1(u < 0)| u^2 (or |u|)
    Q:   L_Q  = E[ mean_k (Q_k(s, a) - (r + gamma m V(s')))^2 ]  (the new V), then Polyak on Q
    act: a_1..a_N ~ mu_th'(.|s) by DDPM (N = 64, clipped to [-1, 1] at every step), then
         argmax_i min_k Qtarget_k(s, a_i), or (--selection implicit) a_i drawn with weight
         |tau - 1(A_i < 0)| (/ |A_i| for the quantile loss), A_i = min_k Qtarget_k(s, a_i) - V(s)

Usage:
    python idql.py --env hopper-medium-v2                   # downloads the D4RL file, 3M steps
    python idql.py --env hopper-medium-v2 --dataset hopper-medium-local.hdf5 --selection implicit
    python idql.py --env D4RL/antmaze/umaze-v1              # a Minari id, evaluated in its env
    python idql.py --env hopper-medium-v2 --resume runs/X/checkpoint.pt --eval-only --num-samples 16

Data, environments and checks are iql.py's (see its docstring). Differences from the official code:
- Kept: mu's cosine lr decay runs over a fixed 3M steps (--lr-decay-steps), whatever --max-steps.
- Trains on the whole dataset; the official launcher holds out a random 5% it never uses.
- Seeds are used as given: the official launcher re-draws them (and crashes on variant['T']).
- --selection implicit is the paper's rule; the official code only takes the argmax.
- Evaluation episodes run side by side (one batched selection per env step) from a forked RNG.
"""

import json
import math
import os
import random
import shutil
import sys
import time
import urllib.request
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

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
    exp_name: str = "idql"  # name of this experiment (part of the run folder's name)
    env: str = "hopper-medium-v2"
    """a D4RL name, a Minari id (D4RL/antmaze/umaze-v1) or, with --dataset, a Gymnasium id"""
    dataset: Optional[str] = None  # path of a local D4RL-format .hdf5; skips the download
    seed: int = 42  # seed of python, numpy, torch and the evaluation envs
    max_steps: int = 3_000_000  # number of gradient steps (official: 3M)
    batch_size: int = 512  # transitions per gradient step (official launcher: 512)
    eval_interval: int = 250_000  # steps between evaluations; 0 = only at the end (official: 250k)
    eval_episodes: int = 50  # episodes per evaluation, run as one batch (official: 50); 0 = never
    log_interval: int = 1000  # gradient steps between logged losses
    expectile: Optional[float] = None  # tau of the critic's loss (default: 0.7, antmaze 0.9)
    critic_objective: Literal["expectile", "quantile"] = "expectile"
    """V's loss: expectile |tau - 1(u<0)| u^2 (official) or quantile |tau - 1(u<0)| |u| (paper)"""
    normalize_rewards: Optional[bool] = None  # r * 1000 / (max - min return); on for locomotion
    num_samples: int = 64  # N: diffusion samples per state to choose from (paper: 16 / 64 / 256)
    selection: Literal["argmax", "implicit"] = "argmax"
    """argmax of min target Q (official), or resampling by the implicit policy's weights (paper)"""
    diffusion_steps: int = 5  # T of the DDPM (official: 5, VP schedule)
    clip_sampler: bool = True  # clip the sample to [-1, 1] after each denoising step (official: on)
    actor_lr: float = 3e-4  # diffusion model learning rate (AdamW, cosine-decayed to 0)
    actor_weight_decay: float = 1e-4
    """AdamW weight decay of the diffusion model (optax.adamw's default, as the official code)"""
    lr_decay_steps: int = 3_000_000
    """horizon of the actor's cosine lr decay (official: 3M, fixed whatever --max-steps is)"""
    actor_ema: float = 0.001  # EMA rate of the sampling copy of the diffusion model
    actor_dropout: float = 0.1  # dropout in each residual block of the denoiser
    actor_hidden: int = 256  # width of the denoiser's residual stream (blocks expand it 4x)
    actor_blocks: int = 3  # residual blocks of the denoiser
    time_dim: int = 128  # size of the learnable Fourier time embedding
    critic_lr: float = 3e-4  # Q learning rate
    value_lr: float = 3e-4  # V learning rate
    hidden_dim: int = 256  # width of the two hidden layers of Q and V
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target Q
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # the update and the N-sample selection as CUDA graphs (on CUDA only)
    compile: bool = False  # torch.compile the update and the action selection
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    capture_video: bool = False  # record the first episode of each evaluation under the run folder
    save_model: bool = False  # write run_dir/checkpoint.pt at each evaluation and at the end
    keep_checkpoints: bool = False
    """with --save-model, also keep each as checkpoint_{step}.pt (to --eval-only a run's history)"""
    resume: Optional[str] = None  # continue from a checkpoint.pt (outputs: its folder or --run-dir)
    eval_only: bool = False
    """only evaluate the --resume checkpoint with this run's --num-samples, --selection and
    --eval-episodes, into a new folder (default: next to the checkpoint); no training"""
    run_dir: Optional[str] = None
    """output folder (default: runs/{env}__{exp_name}__{seed}__{time}); must not exist"""


FAMILY_DEFAULTS = {  # expectile, normalize rewards (official launcher: 0.9 for antmaze, else 0.7)
    "locomotion": (0.7, True), "antmaze": (0.9, False), "kitchen": (0.7, False),
    "adroit": (0.7, False)}


def with_family_defaults(args: Args) -> Args:
    """Args with the flags left unset (None) filled from the dataset family's official config."""
    fields = ("expectile", "normalize_rewards")
    defaults = zip(fields, FAMILY_DEFAULTS[family_of(args.env)])
    return replace(args, **{k: v for k, v in defaults if getattr(args, k) is None})


# ----------------------------------------------------------------------------- networks
def xavier(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)  # jaxrl5's default_init
    nn.init.zeros_(layer.bias)
    return layer


def lecun(layer: nn.Linear) -> nn.Linear:
    std = math.sqrt(1.0 / layer.in_features) / 0.87962566103423978  # flax lecun_normal: truncated
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


class EnsembleLinear(nn.Module):
    """k independent linear layers applied as one batched matmul: (k, B, in) -> (k, B, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))
        for w in self.weight.data:
            nn.init.xavier_uniform_(w)

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


def value_net(obs_dim: int, hidden: int) -> nn.Sequential:
    """V(s): a LayerNorm on the input, then a 2-layer ReLU MLP (jaxrl5 MLP with use_layer_norm)."""
    return nn.Sequential(nn.LayerNorm(obs_dim, eps=1e-6), xavier(nn.Linear(obs_dim, hidden)),
                         nn.ReLU(), xavier(nn.Linear(hidden, hidden)), nn.ReLU(),
                         xavier(nn.Linear(hidden, 1)))


class FourierFeatures(nn.Module):
    """Learnable Fourier embedding of the integer step t: [cos 2 pi t W, sin 2 pi t W]."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(0.2 * torch.randn(dim // 2, 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t[:, None].float() @ self.weight.T
        return torch.cat([f.cos(), f.sin()], -1)


class ResidualBlock(nn.Module):
    """x + Dense(swish(Dense_4h(LayerNorm(Dropout(x)))))"""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.LayerNorm(hidden, eps=1e-6),
                                 lecun(nn.Linear(hidden, 4 * hidden)), nn.SiLU(),
                                 lecun(nn.Linear(4 * hidden, hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Denoiser(nn.Module):
    """eps_th(a_t, s, t): an MLP-ResNet on [a_t, s, MLP(Fourier(t))] (the official LN_Resnet)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        hidden, d = args.actor_hidden, args.time_dim
        self.time = nn.Sequential(FourierFeatures(d), xavier(nn.Linear(d, 2 * d)), nn.SiLU(),
                                  xavier(nn.Linear(2 * d, 2 * d)))
        self.net = nn.Sequential(xavier(nn.Linear(act_dim + obs_dim + 2 * d, hidden)),
                                 *[ResidualBlock(hidden, args.actor_dropout)
                                   for _ in range(args.actor_blocks)],
                                 nn.SiLU(), xavier(nn.Linear(hidden, act_dim)))

    def forward(self, a_t: torch.Tensor, obs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a_t, obs, self.time(t)], -1))


# ----------------------------------------------------------------------------- the method
def vp_beta_schedule(T: int) -> torch.Tensor:
    """The official VP schedule: beta_t = 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2T^2))."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    b_min, b_max = 0.1, 10.0
    return 1 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T ** 2)


def critic_loss_fn(u: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """|tau - 1(u < 0)| u^2 (expectile) or |tau - 1(u < 0)| |u| (quantile), u = Q - V."""
    weight = torch.where(u > 0, tau, 1 - tau)
    return weight * (u.pow(2) if objective == "expectile" else u.abs())


def implicit_weights(adv: torch.Tensor, tau: float, objective: str) -> torch.Tensor:
    """w(s, a) of IQL's implicit policy: |tau - 1(A<0)| (expectile) or that / |A| (quantile)."""
    weight = torch.where(adv > 0, tau, 1 - tau)
    return weight if objective == "expectile" else weight / adv.abs().clamp(min=1e-6)


class IDQL(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args, self.act_dim = args, act_dim
        self.actor = Denoiser(obs_dim, act_dim, args)
        self.actor_ema = Denoiser(obs_dim, act_dim, args)
        self.actor_ema.load_state_dict(self.actor.state_dict())
        self.actor_ema.requires_grad_(False).eval()  # samples come from the EMA copy, dropout off
        self.critic = TwinQ(obs_dim, act_dim, args.hidden_dim)
        self.critic_target = TwinQ(obs_dim, act_dim, args.hidden_dim).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.value = value_net(obs_dim, args.hidden_dim)
        betas = vp_beta_schedule(args.diffusion_steps)
        self.betas, self.alphas = betas.tolist(), (1 - betas).tolist()
        self.alpha_hats = torch.cumprod(1 - betas, 0).tolist()
        self.register_buffer("sqrt_ah", torch.tensor(self.alpha_hats).sqrt().float())
        self.register_buffer("sqrt_1m_ah", (1 - torch.tensor(self.alpha_hats)).sqrt().float())
        self.to(device)
        # (CUDA graph) capturable: Adam's step count on the GPU; the lr and update count tensors.
        # Not fused: the fused kernel rounds differently, and docs/idql.md's numbers are unfused
        adam = dict(capturable=device.type == "cuda")
        self.actor_lr = torch.tensor(args.actor_lr, device=device)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.actor_lr,
                                          weight_decay=args.actor_weight_decay,
                                          decoupled_weight_decay=True, **adam)  # AdamW
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, **adam)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=args.value_lr, **adam)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))

    def update(self, obs, act, rew, mask, next_obs) -> dict:
        a = self.args
        # 1) mu: DDPM noise prediction on the dataset's actions at a random step t
        t = torch.randint(0, a.diffusion_steps, (obs.shape[0],), device=obs.device)
        eps = torch.randn_like(act)
        a_t = self.sqrt_ah[t, None] * act + self.sqrt_1m_ah[t, None] * eps
        actor_loss = (self.actor(a_t, obs, t) - eps).pow(2).sum(-1).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        progress = self.num_updates.clamp(max=a.lr_decay_steps) / a.lr_decay_steps
        self.actor_lr.copy_(a.actor_lr * 0.5 * (1 + torch.cos(math.pi * progress)))  # cosine
        self.actor_opt.step()

        # 2) V: expectile (or quantile) regression onto the min of the target twin Q
        with torch.no_grad():
            q_target = self.critic_target(obs, act).min(0).values
        u = q_target - self.value(obs).squeeze(-1)
        value_loss = critic_loss_fn(u, a.expectile, a.critic_objective).mean()
        self.value_opt.zero_grad()
        value_loss.backward()
        self.value_opt.step()

        # 3) Q: regress both heads onto r + gamma * m * V(s'), with the V just updated
        with torch.no_grad():
            q_backup = rew + a.gamma * mask * self.value(next_obs).squeeze(-1)
        critic_loss = (self.critic(obs, act) - q_backup).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        # 4) EMA of mu (the sampler's copy), Polyak of Q; no_grad, or autograd records every step
        with torch.no_grad():
            torch._foreach_lerp_(list(self.actor_ema.parameters()),
                                 list(self.actor.parameters()), a.actor_ema)
            torch._foreach_lerp_(list(self.critic_target.parameters()),
                                 list(self.critic.parameters()), a.tau)
        self.num_updates += 1
        # (actor_lr as a copy: torch.compile mishandles returning a buffer it mutated)
        return {"losses/actor_loss": actor_loss.detach(), "losses/value_loss": value_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "values/q": q_target.mean(),
                "values/actor_lr": self.actor_lr.clone()}

    @torch.no_grad()
    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """DDPM ancestral sampling from the EMA model: a_T ~ N(0, I), then for t = T-1 .. 0
        a <- (a - beta_t / sqrt(1 - ah_t) eps(a, s, t)) / sqrt(alpha_t) + [t > 0] sqrt(beta_t) z."""
        a = torch.randn(obs.shape[0], self.act_dim, device=obs.device)
        for t in reversed(range(self.args.diffusion_steps)):
            eps = self.actor_ema(a, obs, torch.full((obs.shape[0],), t, device=obs.device))
            step = self.betas[t] / math.sqrt(1 - self.alpha_hats[t])
            a = (a - step * eps) / math.sqrt(self.alphas[t])
            if t > 0:
                a = a + math.sqrt(self.betas[t]) * torch.randn_like(a)
            if self.args.clip_sampler:
                a = a.clamp(-1, 1)
        return a.clamp(-1, 1)

    @torch.no_grad()
    def select(self, obs: torch.Tensor) -> torch.Tensor:
        """One action per state out of N samples of mu, chosen by the critic."""
        a, B = self.args, obs.shape[0]
        obs_n = obs.repeat_interleave(a.num_samples, 0)
        actions = self.sample(obs_n)
        q = self.critic_target(obs_n, actions).min(0).values.view(B, a.num_samples)
        if a.selection == "argmax":
            idx = q.argmax(1)
        else:  # a ~ Categorical(w): Gumbel-max, no host sync
            w = implicit_weights(q - self.value(obs), a.expectile, a.critic_objective)
            idx = (w.log() - torch.log(-torch.log(torch.rand_like(w)))).argmax(1)
        return actions.view(B, a.num_samples, -1)[torch.arange(B, device=obs.device), idx]


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
    if args.eval_only:  # a new folder per evaluation: the training run's files stay as they are
        run_dir = args.run_dir or os.path.join(resume_dir, f"eval__{args.selection}_"
                                               f"N{args.num_samples}__{int(time.time())}")
    else:
        run_dir = args.run_dir or resume_dir or (
            f"runs/{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    if os.path.exists(run_dir) and (args.eval_only or not (resume and os.path.samefile(
            run_dir, resume_dir))):
        fail(f"run folder {run_dir} already exists; choose another --run-dir "
             "(runs are never overwritten)")
    ref = reference_scores(args.env)  # (random, expert) returns for the normalized score
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # the whole dataset lives on the device; the envs give the action bounds and the evaluation
    evaluating = args.eval_episodes > 0
    locomotion = family_of(args.env) == "locomotion"
    envs = [make_env(args.env, args.capture_video and i == 0)
            for i in range(max(args.eval_episodes, 1))] if evaluating or locomotion else []
    buffer = load_dataset(args, envs[0] if envs else None, device)
    n, obs_dim, act_dim = *buffer["observations"].shape, buffer["actions"].shape[1]
    agent = IDQL(obs_dim, act_dim, args, device)
    start, evals = restore(agent, resume, device) if resume else (0, [])
    if resume:
        evals = [] if args.eval_only else evals
        print(f"{'evaluating' if args.eval_only else 'resumed from'} {args.resume} at step {start}")

    def train_step():
        idx = torch.randint(0, n, (args.batch_size,), device=device)  # drawn on the device
        return agent.update(*(buffer[k][idx] for k in BATCH_KEYS))

    graphs = args.cuda_graph and device.type == "cuda"
    step_fn = torch.compile(train_step) if args.compile else train_step
    if graphs and not args.eval_only:
        step_fn = cuda_graph(step_fn)  # its 3 eager warm-ups are the loop's first 3 updates
    obs_buf = torch.zeros(max(args.eval_episodes, 1), obs_dim, device=device)  # (CUDA graph) input
    select_fn = torch.compile(agent.select) if args.compile else agent.select
    select = lambda: select_fn(obs_buf)  # noqa: E731
    if graphs and evaluating:
        select = cuda_graph(select)  # T denoising steps of N x episodes samples: one replay
        with forked_rng(device):  # warm up and capture now, off training's RNG stream
            for _ in range(4):
                select()
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
        envs[0] = gym.wrappers.RecordVideo(envs[0], os.path.join(run_dir, "videos"),
                                           episode_trigger=lambda e: True)

    def evaluate_and_log(step: int) -> dict:
        with forked_rng(device):  # the sampler's noise never shifts training's RNG stream
            returns = evaluate(select, obs_buf, envs, args.seed + step)
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
        return {"eval/return": ret, "eval/normalized_score": score}

    results, end, t_eval, t0 = {}, start if args.eval_only else args.max_steps, 0.0, None
    if args.eval_only:  # no update: one evaluation of the checkpoint
        results.update(evaluate_and_log(start))
    warmup = min(start + 50, end)  # updates/s is measured after compile/capture warm-up
    for step in tqdm(range(start + 1, end + 1), disable=not sys.stdout.isatty(), desc="idql"):
        info = step_fn()  # one gradient step: mu (and its EMA), then V, then Q, then the target Q
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
            results.update(evaluate_and_log(step))
            t_eval += time.perf_counter() - t if t0 is not None else 0.0
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, step, args, evals)
            if args.keep_checkpoints:
                shutil.copyfile(os.path.join(run_dir, "checkpoint.pt"),
                                os.path.join(run_dir, f"checkpoint_{step}.pt"))
    writer.close()
    for env in envs:
        env.close()
    return {"updates_per_second": math.nan, **results, "updates": max(end - start, 0),
            "run_dir": run_dir, "evaluations": evals}


# =============================================================================
# Plumbing: checks, D4RL and Minari data, environments, evaluation, checkpoints, the CUDA-graph
# helper. Nothing below changes what the method is given.
# =============================================================================
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"idql.py: error: {message}")


def check_args(args: Args, device: torch.device):
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    if args.dataset is not None and is_minari(args.env):
        fail(f"--dataset is a D4RL-format file, and '{args.env}' is a Minari id (read from "
             "Minari's cache); pass one of them")
    if not 0 < args.expectile < 1:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if min(args.max_steps, args.batch_size, args.log_interval, args.num_samples,
           args.diffusion_steps) < 1:
        fail("--max-steps, --batch-size, --log-interval, --num-samples and --diffusion-steps "
             "must be positive")
    if args.eval_only and (args.resume is None or args.eval_episodes < 1):
        fail("--eval-only evaluates a trained agent: give it --resume PATH/checkpoint.pt and "
             "--eval-episodes >= 1")
    if args.keep_checkpoints and not args.save_model:
        fail("--keep-checkpoints keeps the checkpoints that --save-model writes; add --save-model")


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
def evaluate(select, obs_buf: torch.Tensor, envs: list, seed: int) -> np.ndarray:
    """One episode in each env, side by side: each step, one batched select() over all envs
    (finished ones keep their last observation so the batch shape stays static)."""
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    alive, returns = np.ones(len(envs), dtype=bool), np.zeros(len(envs))
    while alive.any():
        obs_buf.copy_(torch.as_tensor(obs, dtype=torch.float32))
        actions = select().cpu().numpy()
        for i in np.flatnonzero(alive):
            obs[i], reward, terminated, truncated, _ = envs[i].step(actions[i])
            returns[i] += reward
            alive[i] = not (terminated or truncated)
    return returns


def forked_rng(device: torch.device):
    """torch's RNG (CPU and this CUDA device) forked: draws inside leave the training stream."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()
            ] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def reference_scores(env: str) -> Optional[tuple]:
    """(random, expert) returns: a Minari dataset's own where it has them (not AntMaze's, which
    score its continuing task), else d4rl's for the task, else None."""
    if is_minari(env) and family_of(env) != "antmaze":
        meta = minari_dataset(env).storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    return REF_SCORES.get(task_of(env))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, agent: IDQL, step: int, args: Args, evals: list):
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    opts = {k: getattr(agent, k).state_dict() for k in ("actor_opt", "critic_opt", "value_opt")}
    torch.save({"script": "idql.py", "agent": agent.state_dict(), "step": step, "rng": rng,
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
        fail(f"{path} is not a checkpoint of idql.py")
    if state["script"] != "idql.py":
        fail(f"{path} is a checkpoint of {state['script']}, not of idql.py")
    if len(state["value_opt"]["param_groups"][0]["params"]) == 1:  # FlatAdam's one flat tensor
        fail(f"{path} has an older idql.py's optimizer state (FlatAdam); resume it with that one")
    return state


def restore(agent: IDQL, state: dict, device: torch.device) -> tuple:
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
