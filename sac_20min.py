"""SAC at update-to-data ratio 20 with DroQ critics ("A Walk in the Park"), and AVTD.

Smith, Kostrikov, Levine, "A Walk in the Park: Learning to Walk in 20 Minutes With Model-Free
Reinforcement Learning", RSS 2023, arXiv:2208.07860; official code: ikostrikov/walk_in_the_park.
Critics from DroQ (Hiraoka et al., ICLR 2022, arXiv:2110.02034). After `learning_starts` random
steps, each env step draws G x B transitions (G = 20, m = 1 - terminal) for one UTD block:

    for g = 1..G, on slice g:  (a' ~ pi(.|s'); dropout on in Q and in Qtarget)
        y   = r + gamma m (min_k Qtarget_k(s', a') - alpha log pi(a'|s'))
        L_Q = mean_k (Q_k(s, a) - y)^2 ;   Qtarget <- (1 - tau) Qtarget + tau Q
    on the last slice:  (a~ = tanh(u), u ~ N(mu(s), sigma(s)))
        L_pi    = E[alpha log pi(a~|s) - mean_k Q_k(s, a~)]
        L_alpha = alpha (H - H_target),  H = -E[log pi(a~|s)],  H_target = -|A| / 2

AVTD (Li, Kumar, Kostrikov, Levine, ICLR 2023, arXiv:2304.10466): one agent per candidate critic
regulariser, all updated on the same batches; every `avtd_interval` steps the agent whose critics
have the lowest TD error on the held-out transitions acts (no code was released: CANDIDATES, the
interval and measuring with dropout off are this file's choices).

Usage (rlpd.py is this agent with prior data: diff the two files):
    python sac_20min.py                                 # Ant-v4, 24k steps (20 minutes at 20 Hz)
    python sac_20min.py --env Hopper-v4 --total-timesteps 100000
    python sac_20min.py --action-filter-cutoff 4.0      # 2nd-order Butterworth low-pass, 4 Hz
    python sac_20min.py --save-dataset ant-20min.hdf5   # the replay in D4RL's layout, for iql/rlpd
    python sac_20min.py --avtd droq layer_norm none     # AVTD: the lowest held-out TD error acts

Differences from the official code (docs/sac_20min.md has the environment details):
- PyTorch; both critics are one batched module (stacked weights, bmm).
- Gymnasium's Ant-v4 instead of the A1 robot (real, or dm_control's run task); no action history.
- The Butterworth filter smooths the [-1, 1] command, from zero at reset (official: joint targets).
- 5% of new transitions are held out for the validation TD error (Li et al., arXiv:2304.10466).
- Evaluation: 5 deterministic episodes every 2,000 steps (official launcher: 1 every 1,000).
"""

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

Candidate = Literal["none", "dropout", "layer_norm", "droq", "weight_decay"]


@dataclass
class Args:
    exp_name: str = "sac_20min"  # name of this experiment (part of the run folder's name)
    env: str = "Ant-v4"  # a Gymnasium id with a continuous action space
    seed: int = 42  # seed of python, numpy, torch and the env (official default: 42)
    total_timesteps: int = 24_000  # environment steps (20 minutes at Ant's 20 Hz)
    learning_starts: int = 1000  # random actions, no updates, for this many steps (official: 1000)
    utd_ratio: int = 20  # critic updates per environment step (G)
    batch_size: int = 256  # transitions per critic update
    buffer_size: Optional[int] = None  # replay capacity (default: total_timesteps, nothing dropped)
    eval_interval: int = 2000  # environment steps between evaluations; 0 = only at the end
    eval_episodes: int = 5  # deterministic episodes per evaluation; 0 = never evaluate
    log_interval: int = 1000  # environment steps between logged losses
    actor_lr: float = 3e-4  # actor learning rate
    critic_lr: float = 3e-4  # critic learning rate
    temp_lr: float = 3e-4  # temperature learning rate
    hidden_dim: int = 256  # width of the two hidden layers of actor and critics
    num_qs: int = 2  # critics in the ensemble
    critic_dropout: float = 0.01  # critics' dropout rate (DroQ); on in target and actor evaluations
    critic_layer_norm: bool = True  # LayerNorm after each critic hidden layer's dropout (DroQ)
    critic_weight_decay: float = 0.0  # decoupled critic weight decay (AdamW; 0 = Adam, as official)
    avtd: tuple[Candidate, ...] = ()  # AVTD candidates: the agent of lowest held-out TD error acts
    avtd_interval: int = 1000  # environment steps between AVTD's choices of the acting agent
    init_temperature: float = 0.1  # initial entropy temperature alpha
    target_entropy: Optional[float] = None  # entropy target (default: -|A| / 2)
    backup_entropy: bool = True  # subtract gamma * m * alpha * log pi(a'|s') in the critic target
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    action_filter_cutoff: Optional[float] = None  # Hz, a 2nd-order Butterworth low-pass on actions
    validation_fraction: float = 0.05  # fraction of new transitions held out (validation TD error)
    save_dataset: Optional[str] = None  # write every transition, in D4RL's layout, to this new file
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # capture the whole UTD block as one CUDA graph (on CUDA only)
    compile: bool = False  # torch.compile the UTD block
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    capture_video: bool = False  # record the first episode of each evaluation (run folder)
    save_model: bool = False  # checkpoint.pt (agents, optimizers, replay) at evaluations and end
    resume: Optional[str] = None
    """continue from a checkpoint.pt (a new episode starts; outputs: its folder, or --run-dir)"""
    run_dir: Optional[str] = None  # new output dir (default runs/{env}__{exp_name}__{seed}__{time})


# ----------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """k independent linear layers as one batched matmul: (k, B, in) -> (k, B, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        init = nn.init.xavier_uniform_  # the official default_init (flax xavier_uniform)
        self.weight = nn.Parameter(torch.stack([init(torch.empty(n_in, n_out)) for _ in range(k)]))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, in) for all members, or (k, B, in)
        return torch.baddbmm(self.bias, x.expand(len(self.weight), -1, -1), self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (flax's eps) with its own scale and shift per ensemble member."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, dim))
        self.bias = nn.Parameter(torch.zeros(k, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class Critics(nn.Module):
    """k Q-functions, each Dense -> [Dropout] -> [LayerNorm] -> ReLU (x2) -> Dense(1): (k, B)."""

    def __init__(self, obs_dim, act_dim, hidden, k, dropout=0.0, layer_norm=True):
        super().__init__()
        self.dropout = dropout
        sizes = ((obs_dim + act_dim, hidden), (hidden, hidden), (hidden, 1))
        self.linears = nn.ModuleList([EnsembleLinear(k, n_in, n_out) for n_in, n_out in sizes])
        self.norms = nn.ModuleList([EnsembleLayerNorm(k, hidden) for _ in range(2 * layer_norm)])

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        for i in range(2):
            x = self.linears[i](x)
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)  # DroQ: on in train mode, target too
            x = F.relu(self.norms[i](x) if self.norms else x)
        return self.linears[2](x).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(mu(s), sigma(s)), log sigma clipped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU())
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
class SAC(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.utd, self.gamma, self.tau = args.utd_ratio, args.gamma, args.tau
        self.backup_entropy = args.backup_entropy
        self.target_entropy = -act_dim / 2 if args.target_entropy is None else args.target_entropy
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim)
        critic = (obs_dim, act_dim, args.hidden_dim, args.num_qs, args.critic_dropout,
                  args.critic_layer_norm)
        self.critic, self.critic_target = Critics(*critic), Critics(*critic)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)  # in train mode: its dropout stays on (DroQ)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        self.to(device)
        cap = device.type == "cuda"  # (CUDA graph) capturable: Adam's step count on the GPU
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), args.actor_lr, capturable=cap)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), args.critic_lr,
                                            weight_decay=args.critic_weight_decay, capturable=cap)
        self.temp_opt = torch.optim.Adam([self.log_alpha], args.temp_lr, capturable=cap)
        self.target_params, self.critic_params, self.actor_params = (  # built once, not per step
            list(m.parameters()) for m in (self.critic_target, self.critic, self.actor))

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
            with torch.no_grad():  # or autograd records every Polyak step (a graph without end)
                torch._foreach_lerp_(self.target_params, self.critic_params, self.tau)

        # actor on the last slice (s), on the mean of the critics (not their min), dropout still on
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

    @torch.no_grad()
    def td_error(self, obs, act, rew, mask, next_obs) -> torch.Tensor:
        """Mean squared TD error of the critics on a batch, as the critic loss measures it."""
        return (self.critic(obs, act) - self.critic_target_value(rew, mask, next_obs)).pow(2).mean()

    def optimizers(self) -> dict:
        return dict(actor_opt=self.actor_opt, critic_opt=self.critic_opt, temp_opt=self.temp_opt)


# AVTD's candidates: name -> the critics' (dropout rate, LayerNorm, AdamW weight decay)
CANDIDATES = {"none": (0.0, False, 0.0), "dropout": (0.01, False, 0.0),
              "layer_norm": (0.0, True, 0.0), "droq": (0.01, True, 0.0),
              "weight_decay": (0.0, False, 0.1)}


def avtd_select(agents: list, buffers: dict) -> tuple:
    """Each agent's mean squared TD error on all held-out transitions (the same rows for all) and
    on as many training ones: (the lowest held-out error's index, train errors, held-out errors)."""
    held_out = buffers["validation"]
    rows = held_out.split(held_out.rows[:held_out.size])
    train = buffers["train"].sample(held_out.size)
    errors = []
    for agent in agents:
        agent.eval()  # dropout off: the critics' prediction (dropout's noise is 2-3x the error)
        errors.append((agent.td_error(*train).item(), agent.td_error(*rows).item()))
        agent.train()
    train_td, val_td = zip(*errors)
    return min(range(len(agents)), key=val_td.__getitem__), list(train_td), list(val_td)


# ----------------------------------------------------------------------------- the data it sees
def make_env(args: Args, render: bool = False) -> gym.Env:
    """The env with actions in [-1, 1] (the actor's tanh range), optionally low-pass filtered."""
    try:
        with warnings.catch_warnings():  # v4 on purpose (D4RL's models): not "out of date" here
            warnings.filterwarnings("ignore", r".*is out of date", DeprecationWarning)
            env = gym.make(args.env, **({"render_mode": "rgb_array"} if render else {}))
    except gym.error.Error as e:
        fail(f"unknown env '{args.env}' ({e})")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{args.env} has a {type(env.action_space).__name__} action space; "
             "SAC needs continuous actions")
    if np.any(env.action_space.low != -1) or np.any(env.action_space.high != 1):
        env = gym.wrappers.RescaleAction(env, np.float32(-1), np.float32(1))
    if args.action_filter_cutoff is not None:
        env = LowPassAction(env, args.action_filter_cutoff, fs=1.0 / env.unwrapped.dt)
    return env


class LowPassAction(gym.Wrapper):
    """Each action dimension through a 2nd-order Butterworth low-pass, by the bilinear transform
    (as scipy.signal.butter(2, cutoff, fs=fs)): y_n = b0 x_n + b1 x_{n-1} + b2 x_{n-2} - a1 y_{n-1}
    - a2 y_{n-2}; zero history after each reset."""

    def __init__(self, env: gym.Env, cutoff: float, fs: float):
        super().__init__(env)
        k = math.tan(math.pi * cutoff / fs)  # pre-warped analogue frequency
        norm = 1.0 / (1.0 + math.sqrt(2) * k + k * k)
        self.b = (k * k * norm, 2 * k * k * norm, k * k * norm)
        self.a = (2 * (k * k - 1) * norm, (1 - math.sqrt(2) * k + k * k) * norm)
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


# ----------------------------------------------------------------------------- the training loop
def main(args: Args) -> dict:
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    args = replace(args, device=str(device), cuda_graph=args.cuda_graph and device.type == "cuda",
                   buffer_size=args.buffer_size or args.total_timesteps)
    run_dir = check_args(args, device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = gym.wrappers.RecordEpisodeStatistics(make_env(args))
    eval_env = make_env(args, render=args.capture_video)
    env.action_space.seed(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agents = [SAC(obs_dim, act_dim, replace(args, critic_dropout=p, critic_layer_norm=norm,
                                            critic_weight_decay=decay), device)
              for p, norm, decay in map(CANDIDATES.get, args.avtd)]  # AVTD: one per candidate
    agents = agents or [SAC(obs_dim, act_dim, args, device)]
    args = replace(args, target_entropy=agents[0].target_entropy)
    buffers = {"train": ReplayBuffer(args.buffer_size, obs_dim, act_dim, device),  # trained on
               "validation": ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)}  # held out
    start, evals, log, acting, choices = (load_checkpoint(args.resume, agents, buffers, args)
                                          if args.resume else (0, [], [], 0, []))
    log = log if args.save_dataset else []  # every transition, for --save-dataset

    def train_step():  # the UTD block: indices drawn on the device, G critic + actor + temperature
        batch = buffers["train"].sample(args.utd_ratio * args.batch_size)
        return [agent.update(*batch) for agent in agents]  # AVTD: every agent, the same batch

    step_fn = torch.compile(train_step) if args.compile else train_step
    if args.cuda_graph:
        step_fn = cuda_graph(step_fn)  # (CUDA graph) 3 eager warm-ups, then replays; each a block
    writer, eval_env = open_run(args, run_dir, eval_env)
    results, info, updates, t0, t_eval = {}, None, 0, None, 0.0
    warmup = max(start, args.learning_starts) + 50  # updates/s after compile/capture warm-up
    obs, _ = env.reset(seed=args.seed + start)
    for step in tqdm(range(start + 1, args.total_timesteps + 1), initial=start, desc="sac_20min",
                     total=args.total_timesteps, disable=None):  # None: off when not a terminal
        # act: uniformly at random for the first learning_starts steps, then a ~ pi(.|s)
        if step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                action = agents[acting].actor.sample(s)[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, ep = env.step(action)
        # store (s, a, r, m, s'), m = 1 - terminated: a time-limit cut is no terminal, s' bootstraps
        held_out = args.validation_fraction > 0 and random.random() < args.validation_fraction
        buffer = buffers["validation" if held_out else "train"]
        buffer.add(obs, action, reward, 1.0 - terminated, next_obs)
        if args.save_dataset:
            log.append((obs, action, reward, terminated, truncated, next_obs))
        obs = env.reset()[0] if terminated or truncated else next_obs
        if "episode" in ep:
            results["train/episodic_return"] = float(ep["episode"]["r"])
            writer.add_scalar("charts/episodic_return", ep["episode"]["r"], step)
            writer.add_scalar("charts/episodic_length", ep["episode"]["l"], step)

        # update: one UTD block per env step
        if step > args.learning_starts and buffers["train"].size > 0:
            info = step_fn()
            updates += args.utd_ratio
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()

        if args.avtd and step > args.learning_starts and step % args.avtd_interval == 0 and \
                buffers["validation"].size > 0:  # AVTD: the lowest held-out TD error acts from now
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                acting, train_td, val_td = avtd_select(agents, buffers)
            choices.append((step, acting, *train_td, *val_td))
            for name, train_error, val_error in zip(args.avtd, train_td, val_td):
                writer.add_scalar(f"avtd/{name}_train_td_error", train_error, step)
                writer.add_scalar(f"avtd/{name}_validation_td_error", val_error, step)
            writer.add_scalar("avtd/acting", acting, step)
            with open(os.path.join(run_dir, "avtd.csv"), "w") as f:
                f.write(",".join(["step", "acting", *(f"{n}_train_td_error" for n in args.avtd),
                                  *(f"{n}_validation_td_error" for n in args.avtd)]) + "\n")
                f.writelines(",".join(f"{x:.6g}" for x in row) + "\n" for row in choices)
            results["avtd/acting"] = args.avtd[acting]
            print(f"step={step} avtd: {args.avtd[acting]} acts (held-out TD error "
                  + " ".join(f"{n}={v:.4g}" for n, v in zip(args.avtd, val_td)) + ")", flush=True)

        last = step == args.total_timesteps
        if info is not None and (step % args.log_interval == 0 or last):
            metrics = {k: v.item() for k, v in info[acting].items()}  # the updates' only host sync
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                metrics.update({f"losses/{k}_td_error": agents[acting].td_error(  # overfitting
                    *b.sample(args.batch_size)).item() for k, b in buffers.items() if b.size > 0})
            for k, v in metrics.items():  # (the forked RNG: logging leaves the training run alone)

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
            returns = evaluate(agents[acting].actor, eval_env, args.eval_episodes, device, seed)
            t_eval += time.perf_counter() - t if t0 is not None else 0.0  # not in updates/s
            evals.append((step, float(returns.mean()), float(returns.std())))
            results["eval/return"] = evals[-1][1]
            writer.add_scalar("eval/return", evals[-1][1], step)
            with open(os.path.join(run_dir, "evaluations.csv"), "w") as f:
                f.write("step,return,return_std\n")
                f.writelines(f"{s},{r:.2f},{sd:.2f}\n" for s, r, sd in evals)
            print(f"step={step} eval/return={evals[-1][1]:.1f} +- {evals[-1][2]:.1f}", flush=True)
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agents, buffers, log, step,
                            args, evals, acting, choices)
    writer.close()
    if log:
        write_d4rl(args.save_dataset, log, env)
    env.close()
    eval_env.close()
    return {"updates_per_second": math.nan, **results, "updates": updates, "run_dir": run_dir,
            "env_steps": args.total_timesteps - start, "evaluations": evals, "avtd": choices}


# =============================================================================
# Plumbing: the replay buffer, checks, the run folder, evaluation, the D4RL writer, checkpoints,
# the CUDA-graph helper.
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
    raise SystemExit(f"sac_20min.py: error: {message}")


def check_args(args: Args, device: torch.device) -> str:
    """Bad input stops here, before anything is made or read; returns the run folder."""
    if min(args.total_timesteps, args.utd_ratio, args.batch_size, args.log_interval,
           args.avtd_interval) < 1:
        fail("--total-timesteps, --utd-ratio, --batch-size, --log-interval and --avtd-interval "
             "must be positive")
    if args.avtd and (args.validation_fraction == 0 or len(set(args.avtd)) < len(args.avtd)):
        fail("--avtd needs distinct candidates and held-out transitions (--validation-fraction>0)")
    if not 0 <= args.validation_fraction < 1:
        fail(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    if args.save_dataset and os.path.exists(args.save_dataset):
        fail(f"{args.save_dataset} already exists; choose another --save-dataset (no overwrite)")
    if args.save_dataset and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_dataset))):
        fail(f"the folder of --save-dataset {args.save_dataset} does not exist")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    if args.resume and not os.path.isfile(args.resume):
        fail(f"checkpoint {args.resume} does not exist")
    here = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None  # its folder
    new = f"runs/{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or here or new
    if os.path.exists(run_dir) and not (here and os.path.samefile(run_dir, here)):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (never overwritten)")
    return run_dir


def open_run(args: Args, run_dir: str, eval_env: gym.Env) -> tuple:
    """The run folder with args.json, TensorBoard (and W&B), and the evaluation videos' recorder."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
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


def write_d4rl(path: str, log: list, env: gym.Env):
    """The transitions (s, a, r, terminal, timeout, s') in D4RL's layout, in the env's units."""
    obs, act, rew, terminals, timeouts, next_obs = (np.array(column) for column in zip(*log))
    space = env.unwrapped.action_space
    timeouts[-1] = not terminals[-1]  # the last episode was cut off by the end of the run
    with h5py.File(path, "w") as f:
        f["observations"] = obs.astype(np.float32)
        f["next_observations"] = next_obs.astype(np.float32)
        f["actions"] = (space.low + (act + 1) * (space.high - space.low) / 2).astype(np.float32)
        f["rewards"], f["terminals"], f["timeouts"] = rew.astype(np.float32), terminals, timeouts
    print(f"wrote {len(log)} transitions to {path}", flush=True)


def save_checkpoint(path: str, agents: list, buffers: dict, log: list, step: int, args,
                    evals: list, acting: int, choices: list):
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.save({"script": "sac_20min.py", "step": step, "rng": rng, "args": asdict(args),

                "agents": [{"agent": agent.state_dict(), **{k: opt.state_dict() for k, opt in
                                                            agent.optimizers().items()}}
                           for agent in agents],
                "acting": acting, "avtd": choices, "evaluations": evals, "log": log,
                "buffers": {k: b.state_dict() for k, b in buffers.items()}}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(path: str, agents: list, buffers: dict, args: Args) -> tuple:
    """Agents, optimizers, replay and RNG from a checkpoint of this script:
    (step, evals, log, acting agent, AVTD's choices)."""
    device = torch.device(args.device)
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # garbage, a truncated file, ...
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    script = state.get("script") if isinstance(state, dict) else None
    if script != "sac_20min.py":
        what = f"a checkpoint of {script}, not of" if script else "not a checkpoint of"
        fail(f"{path} is {what} sac_20min.py")
    if "agents" not in state:  # one agent under other keys
        fail(f"{path} is a checkpoint of an earlier sac_20min.py (before AVTD); start a new run")
    if tuple(state["args"]["avtd"]) != args.avtd:
        fail(f"{path} is not a checkpoint of a run with --avtd {' '.join(args.avtd) or '(none)'}")
    try:
        for agent, saved in zip(agents, state["agents"]):
            agent.load_state_dict(saved["agent"])
            for k, opt in agent.optimizers().items():
                for group in saved[k]["param_groups"]:  # (CUDA graph) capturable Adam on CUDA only
                    group["capturable"] = device.type == "cuda"
                opt.load_state_dict(saved[k])
    except (RuntimeError, ValueError) as e:  # other sizes, or an older sac_20min.py's flat Adam
        fail(f"{path} does not fit this run ({str(e).splitlines()[0]})")
    for k, b in buffers.items():
        b.load_state_dict(state["buffers"][k])
    torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved it to the device
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])

    print(f"resumed from {path} at step {state['step']} (a new episode starts)", flush=True)
    return state["step"], state["evaluations"], state["log"], state["acting"], state["avtd"]


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
