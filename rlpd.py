"""RLPD: online SAC that samples half of every batch from offline data.

Ball, Smith, Kostrikov, Levine, "Efficient Online Reinforcement Learning with Offline Data",
ICML 2023, arXiv:2302.02948; official code (JAX): ikostrikov/rlpd. Plain SAC, online from step
0, no offline loss, with three changes: symmetric sampling (each batch of B: B/2 rows of the
offline data D, B/2 of the online replay R), LayerNorm critics, and a large ensemble at a high
update-to-data ratio G. After `learning_starts` random steps, each env step draws G batches
(m = 1 - terminal) for one UTD block:

    for g = 1..G, on batch g:  (Z: a fresh random subset of num_min_qs of the num_qs critics)
        y   = r + gamma m (min_{k in Z} Qtarget_k(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
        L_Q = mean_k (Q_k(s, a) - y)^2 ;   Qtarget <- (1 - tau) Qtarget + tau Q
    on the last batch:  (a~ = tanh(u), u ~ N(mu(s), sigma(s)))
        L_pi    = E[alpha log pi(a~|s) - mean_k Q_k(s, a~)]
        L_alpha = alpha (H - H_target),  H = -E[log pi(a~|s)],  H_target = -|A| / 2

Usage (sac_20min.py is this agent without prior data, with DroQ's dropout: diff the two files):
    python rlpd.py --env hopper-medium-v2                 # downloads the D4RL file, runs Hopper-v4
    python rlpd.py --env hopper-medium-v2 --dataset hopper-medium-local.hdf5
    python rlpd.py --env Hopper-v4 --offline-ratio 0      # no prior data: SAC with RLPD's critics
    python rlpd.py --env D4RL/antmaze/umaze-v1 --total-timesteps 300000   # Minari data, online

Differences from the official code (docs/rlpd.md has the environment details):
- PyTorch; the ensemble is one batched module (stacked weights, bmm).
- Evaluation in Gymnasium's MuJoCo v4 envs (D4RL's models); the files are read with h5py.
- Files with next_observations keep timeout steps as non-terminal transitions (m = 1).
- Each batch holds exactly round(B * offline_ratio) offline rows (official: one G x B/2 draw
  from each, interleaved, which works only for a ratio of 0.5).
"""

import json
import math
import os
import random
import shutil
import tempfile
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
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "rlpd"  # name of this experiment (part of the run folder's name)
    env: str = "hopper-medium-v2"
    """a D4RL locomotion or Minari dataset, its env run online; with --dataset, any Gymnasium id"""
    dataset: Optional[str] = None  # a local D4RL-format .hdf5 (the prior data); skips the download
    seed: int = 42  # seed of python, numpy, torch and the env (official default: 42)
    total_timesteps: int = 250_000  # environment steps (official locomotion runs: 250k)
    learning_starts: int = 5000  # random actions, no updates, for this many steps (official: 5000)
    utd_ratio: int = 20  # critic updates per environment step (G)
    batch_size: int = 256  # transitions per critic update
    offline_ratio: float = 0.5  # share of each batch from the offline data (symmetric: 0.5)
    buffer_size: Optional[int] = None  # online replay capacity (default: total_timesteps)
    eval_interval: int = 5000  # environment steps between evaluations; 0 = evaluate only at the end
    eval_episodes: int = 10  # deterministic episodes per evaluation; 0 = never evaluate
    log_interval: int = 1000  # environment steps between logged losses
    actor_lr: float = 3e-4  # actor learning rate
    critic_lr: float = 3e-4  # critic learning rate
    temp_lr: float = 3e-4  # temperature learning rate
    hidden_dim: int = 256  # width of the hidden layers of actor and critics
    hidden_layers: Optional[int] = None  # hidden layers per network (default 2; antmaze, adroit: 3)
    num_qs: int = 10  # critics in the ensemble
    num_min_qs: Optional[int] = None
    """size of the random subset Z of target critics whose min backs up (default 2; antmaze 1)"""
    critic_layer_norm: bool = True  # LayerNorm after each critic hidden layer
    init_temperature: float = 1.0  # initial entropy temperature alpha
    target_entropy: Optional[float] = None  # entropy target (default: -|A| / 2)
    backup_entropy: Optional[bool] = None
    """subtract gamma m alpha log pi(a'|s') in the critic's target (on; antmaze, adroit: off)"""
    reward_bias: Optional[float] = None  # added to all rewards, offline and online (0; antmaze: -1)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # capture the whole UTD block as one CUDA graph (on CUDA only)
    compile: bool = False  # torch.compile the UTD block
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    capture_video: bool = False  # record the first episode of each evaluation under the run folder
    save_model: bool = False  # checkpoint.pt (agent, optimizers, replay) at evaluations and end
    resume: Optional[str] = None
    """continue from a checkpoint.pt (a new episode starts; outputs: its folder, or --run-dir)"""
    run_dir: Optional[str] = None  # new output dir (default runs/{env}__{exp_name}__{seed}__{time})


FAMILY_DEFAULTS = {  # the official README commands: locomotion (config defaults), antmaze, adroit
    "locomotion": dict(hidden_layers=2, num_min_qs=2, backup_entropy=True, reward_bias=0.0),
    "antmaze": dict(hidden_layers=3, num_min_qs=1, backup_entropy=False, reward_bias=-1.0),
    "adroit": dict(hidden_layers=3, num_min_qs=2, backup_entropy=False, reward_bias=0.0)}


def with_family_defaults(args: Args) -> Args:
    """Args with the unset (None) flags filled from FAMILY_DEFAULTS for the dataset's family."""
    defaults = FAMILY_DEFAULTS.get(family_of(args.env), FAMILY_DEFAULTS["locomotion"])
    return replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


# ----------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """k independent linear layers as one batched matmul: (k, B, in) -> (k, B, out);
    `members` (indices) applies only those layers."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        init = nn.init.xavier_uniform_  # the official default_init (flax xavier_uniform)
        self.weight = nn.Parameter(torch.stack([init(torch.empty(n_in, n_out)) for _ in range(k)]))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))

    def forward(self, x: torch.Tensor, members=slice(None)) -> torch.Tensor:
        weight = self.weight[members]  # x: (B, in) for all members, or (k, B, in)
        return torch.baddbmm(self.bias[members], x.expand(len(weight), -1, -1), weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (flax's eps) with its own scale and shift per ensemble member."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, dim))
        self.bias = nn.Parameter(torch.zeros(k, 1, dim))

    def forward(self, x: torch.Tensor, members=slice(None)) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight[members] + self.bias[members]


class Critics(nn.Module):
    """k Q-functions, each Dense -> [LayerNorm] -> ReLU (x layers) -> Dense(1): (k, B), or
    (len(members), B) for a subset of them."""

    def __init__(self, obs_dim, act_dim, hidden, k, layer_norm=True, layers=2):
        super().__init__()
        sizes = [(obs_dim + act_dim, hidden)] + [(hidden, hidden)] * (layers - 1) + [(hidden, 1)]
        self.linears = nn.ModuleList([EnsembleLinear(k, n_in, n_out) for n_in, n_out in sizes])
        norms = [EnsembleLayerNorm(k, hidden) for _ in range(layers * layer_norm)]
        self.norms = nn.ModuleList(norms)

    def forward(self, obs, act, members=slice(None)) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        for i in range(len(self.linears) - 1):  # the hidden layers

            x = self.linears[i](x, members)
            x = F.relu(self.norms[i](x, members) if self.norms else x)
        return self.linears[-1](x, members).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(mu(s), sigma(s)), log sigma clipped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int = 2):
        super().__init__()
        sizes = [obs_dim] + [hidden] * layers
        self.trunk = nn.Sequential(*(m for i in range(layers)
                                     for m in (nn.Linear(sizes[i], hidden), nn.ReLU())))
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
        gauss = -0.5 * ((u - mu) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        # log |d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable in |u|
        log_prob = gauss.sum(-1) - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob


# ----------------------------------------------------------------------------- the method
class RLPD(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        super().__init__()
        args = with_family_defaults(args)  # (main() has filled them; an Args() by hand has not)
        self.utd, self.gamma, self.tau = args.utd_ratio, args.gamma, args.tau
        self.backup_entropy, self.num_qs, self.num_min_qs = (
            args.backup_entropy, args.num_qs, args.num_min_qs)
        self.target_entropy = -act_dim / 2 if args.target_entropy is None else args.target_entropy
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim, args.hidden_layers)
        critic = (obs_dim, act_dim, args.hidden_dim, args.num_qs, args.critic_layer_norm,
                  args.hidden_layers)
        self.critic, self.critic_target = Critics(*critic), Critics(*critic)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        self.to(device)
        cap = device.type == "cuda"  # (CUDA graph) capturable: Adam's step count on the GPU
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), args.actor_lr, capturable=cap)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), args.critic_lr, capturable=cap)
        self.temp_opt = torch.optim.Adam([self.log_alpha], args.temp_lr, capturable=cap)
        self.target_params, self.critic_params, self.actor_params = (  # built once, not per step
            list(m.parameters()) for m in (self.critic_target, self.critic, self.actor))

    def critic_target_value(self, rew, mask, next_obs) -> torch.Tensor:
        """y = r + gamma m (min_{k in Z} Qtarget_k(s', a') - alpha log pi(a'|s')), Z random."""
        with torch.no_grad():
            next_act, next_log_prob = self.actor.sample(next_obs)
            subset = torch.rand(self.num_qs, device=rew.device).argsort()[:self.num_min_qs]
            next_q = self.critic_target(next_obs, next_act, members=subset).min(0).values
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
            q = self.critic(obs[s], act[s])
            critic_loss = (q - target).pow(2).mean()
            self.critic_opt.zero_grad()
            critic_loss.backward()
            self.critic_opt.step()
            with torch.no_grad():  # or autograd records every Polyak step (a graph without end)
                torch._foreach_lerp_(self.target_params, self.critic_params, self.tau)

        # actor on the last slice (s), on the mean of all critics (not their min)
        alpha = self.log_alpha.exp().detach()
        new_act, log_prob = self.actor.sample(obs[s])
        actor_loss = (alpha * log_prob - self.critic(obs[s], new_act).mean(0)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward(inputs=self.actor_params)  # no gradient into the critics
        self.actor_opt.step()

        # temperature: raise alpha when the entropy is below its target
        entropy = -log_prob.detach().mean()
        temp_loss = self.log_alpha.exp() * (entropy - self.target_entropy)
        self.temp_opt.zero_grad()
        temp_loss.backward()
        self.temp_opt.step()
        return {"losses/critic_loss": critic_loss.detach(),
                "losses/actor_loss": actor_loss.detach(),
                "losses/temperature_loss": temp_loss.detach(), "values/q": q.detach().mean(),
                "values/entropy": entropy, "values/alpha": alpha}

    def optimizers(self) -> dict:
        return dict(actor_opt=self.actor_opt, critic_opt=self.critic_opt, temp_opt=self.temp_opt)


def symmetric_sample(offline: "ReplayBuffer", online: "ReplayBuffer", utd: int, batch: int,
                     ratio: float) -> tuple:
    """G batches of B rows, each with round(B * ratio) offline rows and the rest online,
    laid end to end (G x B rows) so that slice g is batch g."""
    n_off = round(batch * ratio)
    rows_off = offline.rows[offline.indices(utd * n_off)].view(utd, n_off, -1)
    rows_on = online.rows[online.indices(utd * (batch - n_off))].view(utd, batch - n_off, -1)
    return online.split(torch.cat([rows_off, rows_on], 1).view(utd * batch, -1))


# ----------------------------------------------------------------------------- the data it sees
def qlearning_transitions(data: dict) -> dict:
    """(s, a, r, m, s') as float32 arrays, m = 1 - terminal."""
    obs, terminals = data["observations"], data["terminals"].astype(bool)
    timeouts = data["timeouts"].astype(bool)
    if "next_observations" in data:
        next_obs, keep = data["next_observations"], np.ones(len(obs), dtype=bool)
    else:  # rebuild s' from the next row; a timeout's next row is another episode's start
        next_obs = np.concatenate([obs[1:], obs[-1:]])
        keep = terminals | ~np.append(timeouts[:-1], True)
    t = dict(observations=obs[keep], actions=data["actions"][keep], rewards=data["rewards"][keep],
             masks=1.0 - terminals[keep], next_observations=next_obs[keep])
    return {k: v.astype(np.float32) for k, v in t.items()}


def load_prior_data(args: Args, env: gym.Env, device: torch.device) -> "ReplayBuffer":
    """D: the dataset's transitions, checked against the env, actions mapped to [-1, 1], rewards
    plus the family's bias, all on the device."""
    raw = read_minari(args.env) if "/" in args.env else read_d4rl(dataset_path(args))
    data = qlearning_transitions(raw)
    data["rewards"] = data["rewards"] + np.float32(args.reward_bias)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        fail(f"the dataset's observations/actions have {data['observations'].shape[1]}/"
             f"{data['actions'].shape[1]} dims but {args.env} has {obs_dim}/{act_dim}")
    space = env.unwrapped.action_space
    if np.any(data["actions"] < space.low - 1e-3) or np.any(data["actions"] > space.high + 1e-3):
        fail(f"the dataset's actions leave {args.env}'s bounds [{space.low}, {space.high}]")
    actions = 2 * (data["actions"] - space.low) / (space.high - space.low) - 1
    data["actions"] = np.clip(actions, -1 + 1e-5, 1 - 1e-5).astype(np.float32)  # official clip
    n = len(data["observations"])
    offline = ReplayBuffer(n, obs_dim, act_dim, device)  # rows [s, a, r, m, s'], the dict's order
    offline.load_state_dict({"rows": torch.as_tensor(np.concatenate(
        [v.reshape(n, -1) for v in data.values()], 1))})
    return offline


def make_env(args: Args, render: bool = False) -> gym.Env:
    """The env with actions in [-1, 1] (the actor's tanh range): D4RL's task in Gymnasium's port,
    the one a Minari dataset recorded, or a Gymnasium id."""
    env_id, kwargs = args.env, ({"render_mode": "rgb_array"} if render else {})
    task = env_id.split("-")[0]
    if task in LOCOMOTION:
        env_id = LOCOMOTION[task]
        if task == "ant":  # D4RL's ant: 111 dims, contact forces (27:) zero, no contact cost
            kwargs.update(use_contact_forces=True, contact_cost_weight=0.0)
    elif task.lower() in ("antmaze", "kitchen", *ADROIT):
        version = 1 if task == "antmaze" else 2
        fail(f"{env_id}: RLPD runs the environment online, and D4RL's {task} environment needs "
             f"mujoco-py; the same data from Minari runs in Gymnasium-Robotics (--env D4RL/{task}/"
             f"{'-'.join(env_id.split('-')[1:-1])}-v{version})")
    try:
        with warnings.catch_warnings():  # v4 on purpose (D4RL's models): not "out of date" here
            warnings.filterwarnings("ignore", r".*is out of date", DeprecationWarning)
            env = minari_env(env_id, kwargs) if "/" in env_id else gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        fail(f"unknown env '{env_id}' ({e})")
    if task == "ant":  # MuJoCo 2 (mujoco-py) left D4RL's cfrc_ext at zero
        zeroed = lambda obs: np.concatenate([obs[:27], np.zeros_like(obs[27:])])
        env = gym.wrappers.TransformObservation(env, zeroed, env.observation_space)
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{env_id} has a {type(env.action_space).__name__} action space; "
             "SAC needs continuous actions")
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))
    return env


def minari_env(dataset_id: str, kwargs: dict) -> gym.Env:
    """The dataset's evaluation env as Minari recorded it, its dict observation flattened as the
    data's. AntMaze is evaluated as in D4RL: the episode ends at the goal."""
    dataset = minari_dataset(dataset_id)
    try:
        with warnings.catch_warnings():  # Minari's AntMaze data are recorded in the -v4 envs
            warnings.filterwarnings("ignore", ".*is out of date")
            env = dataset.recover_environment(eval_env=True, **kwargs)
            if family_of(dataset_id) == "antmaze":
                fixes = antmaze_eval_kwargs(env.spec, dataset.env_spec)
                env.close()
                env = dataset.recover_environment(eval_env=True, **kwargs, **fixes)
        env.reset(seed=0)  # FrankaKitchen-v1 fails when made under MuJoCo >= 3.12
    except Exception as e:
        fail(f"the environment of {dataset_id} cannot run here ({type(e).__name__}: {e}), and RLPD "
             "needs it online")
    if isinstance(env.observation_space, gym.spaces.Dict):
        dim = flat_observation(env.observation_space.sample()).shape
        space = gym.spaces.Box(-np.inf, np.inf, dim, np.float32)
        env = gym.wrappers.TransformObservation(env, flat_observation, space)
    return env


def antmaze_eval_kwargs(eval_spec, data_spec) -> dict:
    """D4RL's AntMaze: the episode ends at the goal (continuing_task=False), so the return is 1 on
    success, else 0. Minari's umaze eval maze is the data's turned 180 degrees (Minari #304):
    turned back, it is the data's task."""
    kwargs = {"continuing_task": False}
    maze, data_maze = eval_spec.kwargs.get("maze_map"), (
        data_spec.kwargs.get("maze_map") if data_spec else None)
    walls = lambda m: [[cell == 1 for cell in row] for row in m]
    if maze and data_maze and walls(maze) != walls(data_maze):
        turned = [row[::-1] for row in maze[::-1]]
        if walls(turned) != walls(data_maze):
            fail(f"the eval maze of the dataset ({maze}) has other walls than its data's maze "
                 f"({data_maze})")
        kwargs["maze_map"] = turned
    return kwargs


def flat_observation(obs, first=("observation", "achieved_goal", "desired_goal")) -> np.ndarray:
    """A goal-conditioned dict observation as one vector, `first` in order (then the others and
    nested dicts, sorted). AntMaze: the ant's 27 body dims, its x-y, the goal's x-y."""
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    keys = [k for k in first if k in obs] + sorted(set(obs) - set(first))
    return np.concatenate([flat_observation(obs[k]) for k in keys], axis=-1)


# ----------------------------------------------------------------------------- the training loop
def main(args: Args) -> dict:
    args = with_family_defaults(args)  # the dataset family's official settings for unset flags
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    run_dir = check_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = gym.wrappers.RecordEpisodeStatistics(make_env(args))
    eval_env = make_env(args, render=args.capture_video)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = RLPD(obs_dim, act_dim, args, device)
    online = ReplayBuffer(args.buffer_size or args.total_timesteps, obs_dim, act_dim, device)  # R
    # where the checkpoint left off (checked before any data is read)
    start, evals = load_checkpoint(args.resume, agent, online, device) if args.resume else (0, [])
    offline = load_prior_data(args, env, device) if args.offline_ratio > 0 else None  # D

    def train_step():  # the UTD block: indices drawn on the device, G critic + actor + temperature
        if offline is None:
            return agent.update(*online.sample(args.utd_ratio * args.batch_size))
        return agent.update(*symmetric_sample(offline, online, args.utd_ratio, args.batch_size,
                                              args.offline_ratio))

    step_fn = torch.compile(train_step) if args.compile else train_step
    if args.cuda_graph and device.type == "cuda":
        step_fn = cuda_graph(step_fn)  # (CUDA graph) 3 eager warm-ups, then replays; each a block
    ref_scores = reference_scores(args.env)
    resolved = dict(target_entropy=agent.target_entropy, device=str(device),
                    cuda_graph=args.cuda_graph and device.type == "cuda",
                    offline_transitions=offline.size if offline else 0, ref_scores=ref_scores)
    writer, eval_env = open_run(args, run_dir, eval_env, resolved)
    results, info, updates, t0, t_eval = {}, None, 0, None, 0.0
    warmup = max(start, args.learning_starts) + 50  # updates/s after compile/capture warm-up
    obs, _ = env.reset(seed=args.seed + start)
    for step in tqdm(range(start + 1, args.total_timesteps + 1), initial=start, desc="rlpd",
                     total=args.total_timesteps, disable=None):  # None: off when not a terminal
        # act: uniformly at random for the first learning_starts steps, then a ~ pi(.|s)
        if step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                action = agent.actor.sample(s)[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, ep = env.step(action)
        # store (s, a, r, m, s'), m = 1 - terminated: a time-limit cut is no terminal, s' bootstraps
        online.add(obs, action, reward + args.reward_bias, 1.0 - terminated, next_obs)
        obs = env.reset()[0] if terminated or truncated else next_obs
        if "episode" in ep:
            results["train/episodic_return"] = float(ep["episode"]["r"])
            writer.add_scalar("charts/episodic_return", ep["episode"]["r"], step)
            writer.add_scalar("charts/episodic_length", ep["episode"]["l"], step)

        # update: one UTD block per env step
        if step > args.learning_starts:
            info = step_fn()
            updates += args.utd_ratio
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()

        last = step == args.total_timesteps
        if info is not None and (step % args.log_interval == 0 or last):
            metrics = {k: v.item() for k, v in info.items()}  # the update path's only host sync
            for k, v in metrics.items():
                if not math.isfinite(v):
                    fail(f"{k} became {v} at step {step}; lower the learning rates")
                writer.add_scalar(k, v, step)
            results.update(metrics)
            if t0 is not None and step > warmup:
                sps = (step - warmup) / (time.perf_counter() - t0 - t_eval)
                results.update(env_steps_per_second=sps, updates_per_second=sps * args.utd_ratio)
                writer.add_scalar("charts/updates_per_second", sps * args.utd_ratio, step)
                writer.add_scalar("charts/SPS", sps, step)
            losses = " ".join(f"{k[7:]}={v:.4g}" for k, v in metrics.items() if k[:7] == "losses/")
            ups = results.get("updates_per_second", math.nan)
            print(f"step={step} {losses} ups={ups:.0f}", flush=True)
        checkpoint = last or (args.eval_interval > 0 and step % args.eval_interval == 0)
        if args.eval_episodes > 0 and checkpoint:
            t = time.perf_counter()
            seed = args.seed + 10_000 + step
            returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, seed)

            t_eval += time.perf_counter() - t if t0 is not None else 0.0  # not in updates/s
            ret, std = float(returns.mean()), float(returns.std())
            score = math.nan if ref_scores is None else (  # 100 (R - random) / (expert - random)
                100 * (ret - ref_scores[0]) / (ref_scores[1] - ref_scores[0]))
            evals.append((step, ret, std, score))
            writer.add_scalar("eval/return", ret, step)
            writer.add_scalar("eval/normalized_score", score, step)
            with open(os.path.join(run_dir, "evaluations.csv"), "w") as f:
                f.write("step,return,return_std,normalized_score\n")
                f.writelines(f"{s},{r:.2f},{sd:.2f},{sc:.2f}\n" for s, r, sd, sc in evals)
            normalized = f" normalized={score:.1f}" if math.isfinite(score) else ""
            print(f"step={step} eval/return={ret:.1f} +- {std:.1f}{normalized}", flush=True)
            results.update({"eval/return": ret, "eval/normalized_score": score})
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, online, step, args,
                            evals)
    writer.close()
    env.close()
    eval_env.close()
    return {"updates_per_second": math.nan, **results, "updates": updates, "run_dir": run_dir,
            "env_steps": args.total_timesteps - start, "evaluations": evals}


# =============================================================================
# Plumbing: the replay buffer, checks, the run folder, evaluation, D4RL and Minari files,
# checkpoints, the CUDA-graph helper.
# =============================================================================
class ReplayBuffer:
    """Transitions as rows [s, a, r, m, s'] of one device tensor, batch indices drawn on the device
    (n uniform integers mod size: float32 `rand * size` is not uniform over millions of rows)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.dims = capacity, (obs_dim, act_dim, 1, 1, obs_dim)
        self.rows = torch.zeros(capacity, sum(self.dims), device=device)
        self.size_t = torch.zeros((), dtype=torch.long, device=device)  # (CUDA graph) the size
        self.ptr, self.size = 0, 0

    def add(self, obs, act, rew, mask, next_obs):
        row = np.concatenate([obs, act, [rew], [mask], next_obs]).astype(np.float32)
        self.rows[self.ptr].copy_(torch.from_numpy(row))
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.size_t.fill_(self.size)  # (CUDA graph) a captured block samples from the new size

    def indices(self, n: int) -> torch.Tensor:  # the modulo's bias is below size / 2^62
        return torch.randint(0, 2**62, (n,), device=self.rows.device) % self.size_t

    def split(self, rows: torch.Tensor) -> tuple:
        obs, act, rew, mask, next_obs = rows.split(self.dims, dim=-1)
        return obs, act, rew.squeeze(-1), mask.squeeze(-1), next_obs

    def sample(self, n: int) -> tuple:  # (s, a, r, m, s') of n uniform draws
        return self.split(self.rows[self.indices(n)])

    def state_dict(self) -> dict:
        """The rows oldest first, so that a run with another capacity can resume them."""
        rows = torch.cat([self.rows[self.ptr:self.size], self.rows[:self.ptr]])
        return {"rows": rows.cpu(), "size": self.size}

    def load_state_dict(self, state: dict):
        rows = state["rows"][-self.capacity:]  # the newest rows, if this run's capacity is smaller
        self.size = len(rows)
        self.rows[:self.size] = rows.to(self.rows.device)
        self.ptr = self.size % self.capacity  # the next row goes after the newest; row 0 when full
        self.size_t.fill_(self.size)


def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"rlpd.py: error: {message}")


def check_args(args: Args, device: torch.device) -> str:
    """Bad input stops here, before anything is made or read; returns the run folder."""
    if min(args.total_timesteps, args.utd_ratio, args.batch_size, args.log_interval) < 1:
        fail("--total-timesteps, --utd-ratio, --batch-size and --log-interval must be positive")
    if args.dataset is not None and "/" in args.env:
        fail(f"--dataset is a D4RL-format file, and '{args.env}' is a Minari id (read from "
             "Minari's cache); pass one of them")
    if args.hidden_layers < 1:
        fail(f"--hidden-layers must be positive, got {args.hidden_layers}")
    if not 0 <= args.offline_ratio < 1:
        fail(f"--offline-ratio must be in [0, 1), got {args.offline_ratio}")
    if not 1 <= args.num_min_qs <= args.num_qs:
        fail(f"--num-min-qs must be between 1 and --num-qs ({args.num_qs}), got {args.num_min_qs}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"checkpoint {args.resume} does not exist")
    here = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None  # its folder
    new = f"runs/{args.env.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or here or new
    if os.path.exists(run_dir) and not (here and os.path.samefile(run_dir, here)):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (never overwritten)")
    return run_dir


def open_run(args: Args, run_dir: str, eval_env: gym.Env, resolved: dict) -> tuple:
    """The run folder with args.json, TensorBoard (and W&B), and the evaluation videos' recorder."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({**asdict(args), "resolved": resolved}, f, indent=2)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, config=vars(args), dir=run_dir,
                   name=os.path.basename(run_dir), sync_tensorboard=True)
    if args.eval_episodes > 0 and args.capture_video:
        eval_env = gym.wrappers.RecordVideo(eval_env, os.path.join(run_dir, "videos"),
                                            episode_trigger=lambda e: e % args.eval_episodes == 0)
    return writer, eval_env


@torch.no_grad()
def evaluate(actor: TanhGaussianActor, env: gym.Env, episodes: int, device, seed: int):
    """Returns of `episodes` episodes of the deterministic policy tanh(mu(s))."""
    returns = np.zeros(episodes)
    for i in range(episodes):
        obs, done = env.reset(seed=seed if i == 0 else None)[0], False
        while not done:
            s = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            obs, reward, terminated, truncated, _ = env.step(actor(s)[0].cpu().numpy())
            returns[i] += reward
            done = terminated or truncated
    return returns


def reference_scores(env: str) -> Optional[tuple]:
    """(random, expert) returns of the normalized score: a Minari dataset's own where it has them
    (not AntMaze's: returns of its continuing task), else d4rl's for the task, else None."""
    if "/" in env and family_of(env) != "antmaze":
        meta = minari_dataset(env).storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    return REF_SCORES.get(task_of(env))


D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"  # D4RL_BASE_URL: a mirror
LOCOMOTION = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4",
              "ant": "Ant-v4"}
LEVELS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
REF_SCORES = {  # d4rl's (random, expert) returns for the normalized score
    "halfcheetah": (-280.178953, 12135.0), "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7), "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0), "pen": (96.262799, 3076.8331), "hammer": (-274.856578, 12794.134825),
    "door": (-56.512833, 2880.5693), "relocate": (-6.425911, 4233.877797)}
ADROIT = ("pen", "hammer", "door", "relocate")


def task_of(env: str) -> str:
    """hopper for hopper-medium-v2, Hopper-v4 and mujoco/hopper/medium-v0 (Minari ids are paths)."""
    return (env.split("/")[-2] if "/" in env else env.split("-")[0]).lower()


def family_of(env: str) -> str:
    task = task_of(env)
    return task if task in ("antmaze", "kitchen") else "adroit" if task in ADROIT else "locomotion"


def dataset_path(args: Args) -> str:
    """--dataset, or the D4RL file in its cache, downloaded on first use: streamed to a temp file
    beside it, renamed only when complete and readable."""
    if args.dataset is not None:
        if not os.path.isfile(args.dataset):
            fail(f"dataset file {args.dataset} does not exist")
        return args.dataset
    parts = args.env.split("-")
    task, level = parts[0], "-".join(parts[1:-1])
    if task not in LOCOMOTION or parts[-1] != "v2" or level not in LEVELS:
        fail(f"'{args.env}' is not a D4RL locomotion dataset (e.g. hopper-medium-v2); for a "
             "Gymnasium env pass --dataset PATH")
    base = os.environ.get("D4RL_BASE_URL", D4RL_URL).rstrip("/")
    url = f"{base}/gym_mujoco_v2/{task}_{level.replace('-', '_')}-v2.hdf5"
    folder = os.environ.get("D4RL_DATASET_DIR", os.path.expanduser("~/.d4rl/datasets"))
    path = os.path.join(folder, url.split("/")[-1])
    if os.path.isfile(path):
        return path
    print(f"downloading {args.env} from {url} to {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            size = int(response.headers.get("Content-Length", 0)) or None
            with tqdm.wrapattr(out, "write", size, desc=os.path.basename(path)) as bar:
                shutil.copyfileobj(response, bar, 1 << 20)
        if size is not None and os.path.getsize(tmp) != size:
            fail(f"download of {url} stopped at {os.path.getsize(tmp)} of {size} bytes; run again")
        read_d4rl(tmp)  # refuse to cache a file that is not a D4RL dataset
        os.replace(tmp, path)
    except OSError as e:  # urllib's URLError too
        fail(f"could not download {url} ({e}); with no network, download it elsewhere and put it "
             f"at {path}, or pass --dataset PATH")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_d4rl(path: str) -> dict:
    """The D4RL HDF5 layout: observations, actions, rewards, terminals, timeouts, [next_obs...]."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys[:4] if k not in f]
            if missing:
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


def minari_dataset(dataset_id: str):
    """The Minari dataset, downloaded on first use (with Minari's own progress) to its cache."""
    try:
        import minari
        from minari.storage.datasets_root_dir import get_dataset_path
    except ImportError:
        fail(f"'{dataset_id}' is a Minari dataset id, which needs minari: "
             "pip install 'minari[hdf5]'")
    path = get_dataset_path(dataset_id)
    if os.path.isdir(os.path.join(path, "data")):
        try:
            return minari.load_dataset(dataset_id)
        except Exception as e:
            fail(f"the Minari dataset at {path} is unreadable ({type(e).__name__}: {e}); "
                 "delete it and run again")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ValueError as e:  # Minari's answer for an id or version its server does not have
        fail(f"Minari has no dataset '{dataset_id}': {e}")
    except Exception as e:  # no network: huggingface_hub's connection errors
        fail(f"could not download the Minari dataset '{dataset_id}' ({type(e).__name__}: {e}); "
             f"with no network, run `minari download {dataset_id}` elsewhere and copy the folder "
             f"to {path} (MINARI_DATASETS_PATH moves Minari's cache)")


def read_minari(dataset_id: str) -> dict:
    """The episodes in D4RL's layout, next_observations included (Minari stores each episode's
    last observation); terminations are terminals, truncations are timeouts."""
    dataset = minari_dataset(dataset_id)  # (make_env has checked its continuous actions)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    columns = {k: [] for k in keys}
    for episode in dataset.iterate_episodes():
        obs = flat_observation(episode.observations)  # T + 1 rows: s_0 .. s_T
        if obs.ndim != 2:
            fail(f"{dataset_id} has observations of shape {obs.shape[1:]}; these networks take "
                 "vectors")
        for k, v in zip(keys, (obs[:-1], episode.actions, episode.rewards, episode.terminations,
                               episode.truncations, obs[1:])):
            columns[k].append(np.asarray(v))
    if not columns["observations"]:
        fail(f"the Minari dataset {dataset_id} has no episodes")
    return {k: np.concatenate(v) for k, v in columns.items()}


def save_checkpoint(path: str, agent: RLPD, online: ReplayBuffer, step: int, args, evals: list):
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save({"script": "rlpd.py", "agent": agent.state_dict(), "step": step, "rng": rng,
                "args": asdict(args), "evaluations": evals, "online": online.state_dict(),
                **{k: opt.state_dict() for k, opt in agent.optimizers().items()}}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(path: str, agent: RLPD, online: ReplayBuffer, device: torch.device) -> tuple:
    """Agent, optimizers, online replay and RNG from a checkpoint of this script: (step, evals)."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # garbage, a truncated file, ...
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    script = state.get("script") if isinstance(state, dict) else None
    if script != "rlpd.py":
        what = f"a checkpoint of {script}, not of" if script else "not a checkpoint of"
        fail(f"{path} is {what} rlpd.py")
    try:
        agent.load_state_dict(state["agent"])
        for k, opt in agent.optimizers().items():
            for group in state[k]["param_groups"]:  # (CUDA graph) capturable Adam on CUDA only
                group["capturable"] = device.type == "cuda"
            opt.load_state_dict(state[k])
    except (RuntimeError, ValueError) as e:  # other sizes, or an older rlpd.py's flat Adam
        fail(f"{path} does not fit this run ({str(e).splitlines()[0]})")
    online.load_state_dict(state["online"])
    torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved it to the device
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    print(f"resumed from {path} at step {state['step']} (a new episode starts)", flush=True)
    return state["step"], state["evaluations"]


def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph: `warmup` eager calls on a side
    stream (they allocate optimizer state and workspaces), then one capture, then replays. Each
    call is one call of fn, so a GPU run does exactly the updates of a CPU run."""
    graph, out, calls = torch.cuda.CUDAGraph(), None, 0

    def call():
        nonlocal out, calls
        calls += 1
        if calls <= warmup:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                result = fn()
            torch.cuda.current_stream().wait_stream(stream)
            return result
        if calls == warmup + 1:
            with torch.cuda.graph(graph):  # records fn's kernels without running them
                out = fn()
        graph.replay()
        return out
    return call


if __name__ == "__main__":
    main(tyro.cli(Args))
