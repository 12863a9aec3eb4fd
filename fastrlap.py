"""FastRLAP: racing a course from pixels after minutes of practice, with a pretrained encoder.

Stachowicz, Shah, Bhorkar, Kostrikov, Levine, "FastRLAP: A System for Learning High-Speed Driving
via Deep RL and Autonomous Practicing", CoRL 2023, arXiv:2304.09831. Official code (JAX, ROS, a
MuJoCo sim without checkpoints, laps or backing up): kylestach/fastrlap-release.

    1 pretrain: pixel IQL on slow driving of other courses, goals g relabelled (own p 0.5, later in
      the drive 0.25, own + N(0, 4 m) 0.25), r = velocity toward g; encoder f trained by the Q loss,
      V(sg f, s) by expectile, pi by AWR exp(beta (Q' - V)); then f is frozen
    2 demo: one slow scripted lap; checkpoints every ~4 m along it; its transitions are prior data
    3 practice: SAC on z = [f(o), s], r = velocity toward the current checkpoint - 10 on a crash;
      y = r + gamma m min_{k in 2 random of 10} Q'_k(z', a'), a' ~ pi (no entropy term), m = 0 on
      a crash; UTD 8; pi on the mean of the 10 Qs; half of every batch from the demo; after a crash
      or 3 s stuck the car backs up for 1 s and goes on (no resets)

Usage:
    python fastrlap.py                                   # pretrain, demo lap, 15k steps of practice
    python fastrlap.py --encoder-path runs/X/encoder.pt  # reuse a pretrained encoder
    python fastrlap.py --encoder random                  # ablations: random; none (no image)
    python fastrlap.py --resume runs/X/checkpoint.pt     # continue a run saved with --save-model

Differences from the official code that change the algorithm (docs/fastrlap.md says more):
- A MuJoCo course and car of its own; 64 x 64 images (official 128 x 128); checkpoint radius 1 m
  (3 m); a crash is a wall contact, penalty 10 (official: an IMU spike, 10 + clip(acc / 5, 0, 5)).
- Stage 1 (no code or data in the release) follows the paper; f is trained by the Q loss only
  (official: by Q and V); the pixel IQL actor is a tanh Gaussian over all of [-1, 1].
- Demo data: half of every batch (official: an update on an online batch, then one on a demo batch).
- The critic's target actions use the actor's rate-limited range (official: all of [-1, 1]).
- The target entropy is lowered from the first update on (official: from its 1024th).
- After backing up the state's previous action is (slowest, straight) (official: the raw command).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless: the camera renders through EGL
import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tyro  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm import tqdm  # noqa: E402


@dataclass
class Args:
    exp_name: str = "fastrlap"  # name of this experiment (recorded in args.json)
    seed: int = 0  # seed of python, numpy, torch (the course is --course-seed)
    course_seed: int = 0  # the target course's layout
    total_timesteps: int = 15_000  # practice steps at 10 Hz (15k: 25 min, plus 1 s per backing up)
    learning_starts: int = 500  # steps of rate-limited random actions before the first update
    utd_ratio: int = 8  # critic steps per env step: each batch is split into this many slices
    batch_size: int = 512  # transitions per UTD block (official 512: 8 critic steps of 64)
    demo: bool = True  # demo lap's transitions in half of every batch (--no-demo: online data only)
    pseudo_resets: bool = True  # back up 1 s after a crash or when stuck (no: back to the start)
    encoder: Literal["pretrained", "random", "none"] = "pretrained"
    """the frozen image encoder: pretrained by stage 1, untrained, or none (zeros: no vision)"""
    encoder_path: Optional[str] = None  # an encoder.pt written by an earlier run: skips stage 1
    eval_interval: int = 0  # steps between evaluation laps (deterministic, from the start); 0: end
    eval_laps: int = 1  # evaluation attempts per evaluation
    log_interval: int = 1000  # steps between logged losses
    actor_lr: float = 3e-4  # actor learning rate
    critic_lr: float = 3e-4  # critic learning rate
    temp_lr: float = 3e-4  # temperature learning rate
    hidden_dim: int = 256  # width of the two hidden layers of actor and critics
    latent_dim: int = 50  # Dense-LayerNorm-tanh projection of image features and of state (each)
    num_qs: int = 10  # critics in the ensemble
    num_min_qs: int = 2  # size of the random subset of target critics whose min is the backup
    init_temperature: float = 0.1  # initial entropy temperature alpha
    target_entropy: float = -3.0  # entropy target at the first update
    target_entropy_decay: float = 4e-5  # the target's drop per update (from the first; no floor)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    crash_penalty: float = 10.0  # subtracted from the reward of a step that ends in a wall contact
    # stage 1: pretraining
    pretrain_courses: int = 6  # courses (seeds course_seed + 1000 + i) driven slowly to pretrain
    pretrain_drive_steps: int = 1500  # control steps driven on each of them
    pretrain_steps: int = 3000  # gradient steps of pixel IQL
    pretrain_batch_size: int = 128  # transitions per pixel IQL step
    expectile: float = 0.9  # pixel IQL: V's expectile
    beta: float = 3.0  # pixel IQL: AWR inverse temperature ("temperature" in the official config)
    shift_pad: int = 4  # pixel IQL's random crop: edge-pad by this many pixels, crop back
    # the simulator
    image_size: int = 64  # square RGB camera images of this side (official 128 x 128 on the car)
    max_speed: float = 4.0  # top speed (m/s); the official 0.5-4.5 m/s command range scales to it
    grip: float = 0.8  # tyre friction coefficient (sets how fast a corner can be taken)
    checkpoint_spacing: float = 4.0  # metres between checkpoints along the demo lap
    checkpoint_radius: float = 1.0  # a checkpoint counts as passed within this distance
    demo_speed: float = 1.0  # the scripted demo lap's speed (m/s)
    data_dir: str = "~/.cache/fastrlap"  # where the pretraining data are cached
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # pixel IQL step and UTD block as CUDA graphs (on CUDA only)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    capture_video: bool = False  # record each evaluation lap (top view, camera) in run_dir/videos
    save_model: bool = False  # run_dir/checkpoint.pt (all --resume needs) at evaluations and end
    resume: Optional[str] = None  # checkpoint.pt to resume (outputs in its folder unless --run-dir)
    run_dir: Optional[str] = None  # new folder (default: runs/fastrlap__{encoder}__{seed}__{time})


# ----------------------------------------------------------------------------- networks
class Encoder(nn.Module):
    """4 x [Conv 32 channels, 3x3, stride 2, no padding, ReLU] on 3 stacked RGB frames (9 channels),
    flattened: 64 x 64 -> 31 -> 15 -> 7 -> 3, so 288 features."""

    def __init__(self, image_size: int, blind: bool = False):
        super().__init__()
        layers = [m for c in (9, 32, 32, 32) for m in (nn.Conv2d(c, 32, 3, stride=2), nn.ReLU())]
        self.net = nn.Sequential(*layers, nn.Flatten())
        for m in self.net[:-1:2]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.out_dim = self.net(torch.zeros(1, 9, image_size, image_size)).shape[1]
        self.blind = blind  # --encoder none: features all zero (the same shapes): vision's worth

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S, 3) uint8 -> (B, out_dim)"""
        b, k, s, _, c = pixels.shape
        if self.blind:
            return torch.zeros(b, self.out_dim, device=pixels.device)
        return self.net(pixels.permute(0, 1, 4, 2, 3).reshape(b, k * c, s, s).float() / 255.0)


class Projection(nn.Module):
    """The official PixelMultiplexer: z = [features, state] -> Dense-LayerNorm-tanh of each."""

    def __init__(self, feature_dim: int, state_dim: int, latent: int):
        super().__init__()
        self.pixels, self.state = (nn.Sequential(nn.Linear(d, latent), nn.LayerNorm(latent),
                                                 nn.Tanh()) for d in (feature_dim, state_dim))
        self.feature_dim = feature_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        f = self.feature_dim
        return torch.cat([self.pixels(z[..., :f]), self.state(z[..., f:])], -1)


class EnsembleLinear(nn.Module):
    """k linear layers as one batched matmul, (k, B, in) -> (k, B, out), or only `members`."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))
        for w in self.weight.data:
            nn.init.xavier_uniform_(w)  # the official default_init (flax's fans of (in, out))

    def forward(self, x: torch.Tensor, members=slice(None)) -> torch.Tensor:
        return torch.baddbmm(self.bias[members], x, self.weight[members])


class EnsembleLayerNorm(nn.Module):
    """LayerNorm with its own scale and shift per ensemble member."""

    def __init__(self, k: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, dim))
        self.bias = nn.Parameter(torch.zeros(k, 1, dim))

    def forward(self, x: torch.Tensor, members=slice(None)) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)  # flax's eps
        return x * self.weight[members] + self.bias[members]


class Critics(nn.Module):
    """k Q-functions (Dense-LayerNorm-ReLU x 2, Dense) on one projection of z: (k or members, B)."""

    def __init__(self, feature_dim: int, state_dim: int, act_dim: int, args: Args):
        super().__init__()
        k, hidden = args.num_qs, args.hidden_dim
        self.project = Projection(feature_dim, state_dim, args.latent_dim)
        sizes = (2 * args.latent_dim + act_dim, hidden, hidden, 1)
        self.linears = nn.ModuleList([EnsembleLinear(k, *sizes[i:i + 2]) for i in range(3)])
        self.norms = nn.ModuleList([EnsembleLayerNorm(k, hidden) for _ in range(2)])

    def forward(self, z: torch.Tensor, act: torch.Tensor, members=slice(None)) -> torch.Tensor:
        k = len(self.linears[2].bias[members])
        x = torch.cat([self.project(z), act], -1).expand(k, -1, -1)
        for i in range(2):
            x = F.relu(self.norms[i](self.linears[i](x, members), members))
        return self.linears[2](x, members).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """a = c + s tanh((u - c) / s), u ~ N(mu(z), sigma(z)), log sigma in [-20, 2], [c - s, c + s]
    the previous action (the state's last two entries) +-0.2 within [-1, 1] (official
    `output_range`: the rate limit is part of the policy); rate_limit inf: all of [-1, 1]."""

    def __init__(self, feature_dim: int, state_dim: int, act_dim: int, args: Args,
                 rate_limit: float = 0.2):
        super().__init__()
        h = args.hidden_dim
        self.project = Projection(feature_dim, state_dim, args.latent_dim)
        self.trunk = nn.Sequential(nn.Linear(2 * args.latent_dim, h), nn.ReLU(),
                                   nn.Linear(h, h), nn.ReLU())
        self.mu, self.log_std = nn.Linear(h, act_dim), nn.Linear(h, act_dim)
        for layer in (*self.trunk[::2], self.mu, self.log_std):
            nn.init.xavier_uniform_(layer.weight)  # the official default_init
            nn.init.zeros_(layer.bias)
        self.rate_limit, self.act_dim = rate_limit, act_dim

    def action_range(self, z: torch.Tensor) -> tuple:
        """(centre c, half-width s) of the allowed actions."""
        prev = z[..., -self.act_dim:]
        low, high = (prev - self.rate_limit).clamp(-1, 1), (prev + self.rate_limit).clamp(-1, 1)
        return (high + low) / 2, (high - low) / 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, s = self.action_range(z)
        mu = self.mu(self.trunk(self.project(z)))
        return c + s * torch.tanh((mu - c) / s)  # the deterministic (evaluation) action

    def distribution(self, z: torch.Tensor) -> tuple:
        h = self.trunk(self.project(z))
        return self.mu(h), self.log_std(h).clamp(-20.0, 2.0), *self.action_range(z)

    def sample(self, z: torch.Tensor) -> tuple:
        """a ~ pi(.|z) by reparameterisation, and log pi(a|z)."""
        mu, log_std, c, s = self.distribution(z)
        return self.squash(mu + log_std.exp() * torch.randn_like(mu), mu, log_std, c, s)

    def log_prob(self, z: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """log pi(a|z) of given actions (AWR), inverting the squash."""
        mu, log_std, c, s = self.distribution(z)
        u = c + s * torch.atanh(((act - c) / s).clamp(-1 + 1e-4, 1 - 1e-4))
        return self.squash(u, mu, log_std, c, s)[1]

    def squash(self, u, mu, log_std, c, s) -> tuple:
        """(c + s tanh x, log pi), x = (u - c) / s, u ~ N(mu, exp(log_std))."""
        e = (u - mu) / log_std.exp()
        log_prob = (-0.5 * e.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        x = (u - c) / s  # log |d(c + s tanh x)/du| = log(1 - tanh(x)^2) = 2 (log 2 - x - sp(-2x))
        log_prob = log_prob - 2 * (math.log(2) - x - F.softplus(-2 * x)).sum(-1)
        return c + s * torch.tanh(x), log_prob


# ----------------------------------------------------------------------------- stage 1: pixel IQL
def random_crop(pixels: torch.Tensor, pad: int) -> torch.Tensor:
    """DrQ's augmentation: pad the frames by `pad` pixels (edge values) and crop back at a random
    offset per sample (official: drawn independently for o and o')."""
    b, k, h, w, c = pixels.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), device=pixels.device)
    rows = (torch.arange(h, device=pixels.device) + dy)[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w, device=pixels.device) + dx)[:, None, :]  # (B, 1, W)
    x = pixels.permute(0, 1, 4, 2, 3).reshape(b, k * c, h, w).float()
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    x = x[torch.arange(b, device=pixels.device)[:, None, None], :, rows, cols]
    return x.reshape(b, h, w, k, c).permute(0, 3, 1, 2, 4)  # back to (B, 3, S, S, 3), float


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, **backward_kw):
    opt.zero_grad()
    loss.backward(**backward_kw)
    opt.step()


class PixelIQL(nn.Module):
    """Stage 1. The encoder lives in the critic and is trained by the Q loss; V and pi read its
    features with stop-gradient. The target critic's heads are a Polyak copy; it reads the online
    encoder's features (official: the value net's encoder, shared into it every step)."""

    def __init__(self, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.encoder = Encoder(args.image_size)
        features = self.encoder.out_dim
        self.critic, self.critic_target = (Critics(features, STATE_DIM, 2, args) for _ in (0, 1))
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        h, ln = args.hidden_dim, lambda: nn.LayerNorm(args.hidden_dim, eps=1e-6)  # value_layer_norm
        self.value = nn.Sequential(Projection(features, STATE_DIM, args.latent_dim),
                                   nn.Linear(2 * args.latent_dim, h), ln(), nn.ReLU(),
                                   nn.Linear(h, h), ln(), nn.ReLU(), nn.Linear(h, 1))
        self.actor = TanhGaussianActor(features, STATE_DIM, 2, args, rate_limit=math.inf)
        self.to(device)
        capturable = device.type == "cuda"  # CUDA graphs: Adam's step count on the GPU
        self.critic_opt = FlatAdam([*self.encoder.parameters(), *self.critic.parameters()],
                                   lr=args.critic_lr, capturable=capturable)
        self.value_opt = FlatAdam(self.value.parameters(), lr=args.critic_lr, capturable=capturable)
        self.actor_opt = FlatAdam(self.actor.parameters(), lr=args.actor_lr, capturable=capturable)

    def update(self, pixels, state, act, rew, mask, next_pixels, next_state) -> dict:
        a = self.args
        pixels, next_pixels = (random_crop(x, a.shift_pad) for x in (pixels, next_pixels))
        f = self.encoder(pixels)
        z = torch.cat([f.detach(), state], -1)  # V and pi read the features with stop-gradient
        with torch.no_grad():  # V(s') before V's step (official target_value); min of 2 random Qs
            next_v = self.value(torch.cat([self.encoder(next_pixels), next_state], -1)).squeeze(-1)
            subset = torch.rand(a.num_qs, device=rew.device).argsort()[:a.num_min_qs]
            q_target = self.critic_target(z, act, members=subset).min(0).values

        # V: expectile regression toward Q
        v = self.value(z).squeeze(-1)
        diff = q_target - v
        value_loss = (torch.abs(a.expectile - (diff < 0).float()) * diff.pow(2)).mean()
        descend(self.value_opt, value_loss)

        # pi: advantage-weighted regression, weights exp(beta A) capped at 100, A from the new V
        with torch.no_grad():
            weights = torch.exp(a.beta * (q_target - self.value(z).squeeze(-1))).clamp(max=100.0)
        actor_loss = -(weights * self.actor.log_prob(z, act)).mean()
        descend(self.actor_opt, actor_loss)

        # Q (and the encoder): r + gamma m V(s')
        q = self.critic(torch.cat([f, state], -1), act)
        critic_loss = (q - (rew + a.gamma * mask * next_v)).pow(2).sum(0).mean()  # sum over heads
        descend(self.critic_opt, critic_loss)
        polyak_(self.critic_target, self.critic, a.tau)
        out = {"value_loss": value_loss, "actor_loss": actor_loss, "critic_loss": critic_loss,
               "v": v.mean()}
        return {f"pretrain/{k}": x.detach() for k, x in out.items()}


def polyak_(target: nn.Module, online: nn.Module, tau: float):
    with torch.no_grad():  # or autograd records every Polyak step (a graph growing without end)
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


# ----------------------------------------------------------------------------- stage 3: SAC, UTD 8
class FastRLAP(nn.Module):
    OPTIMIZERS = ("actor_opt", "critic_opt", "temp_opt")

    def __init__(self, feature_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.actor = TanhGaussianActor(feature_dim, STATE_DIM, 2, args)
        self.critic, self.critic_target = (Critics(feature_dim, STATE_DIM, 2, args) for _ in (0, 1))
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        target = torch.tensor(args.target_entropy)
        self.target_entropy = nn.Parameter(target, requires_grad=False)  # annealed in place
        self.to(device)
        capturable = device.type == "cuda"  # CUDA graphs: Adam's step count on the GPU
        self.actor_opt = FlatAdam(self.actor.parameters(), lr=args.actor_lr, capturable=capturable)
        self.critic_opt = FlatAdam(self.critic.parameters(), lr=args.critic_lr,
                                   capturable=capturable)
        self.temp_opt = torch.optim.Adam([self.log_alpha], lr=args.temp_lr, capturable=capturable)

    def critic_target_value(self, rew, mask, next_z) -> torch.Tensor:
        """y = r + gamma m min_{k in Z} Q'_k(z', a'), a' ~ pi(.|z'), Z a random subset."""
        with torch.no_grad():
            next_act, _ = self.actor.sample(next_z)
            a = self.args
            subset = torch.rand(a.num_qs, device=rew.device).argsort()[:a.num_min_qs]
            next_q = self.critic_target(next_z, next_act, members=subset).min(0).values
            return rew + a.gamma * mask * next_q

    def update(self, z, act, rew, mask, next_z) -> dict:
        """One UTD block: G critic steps, one per slice of the batch, then one actor and one
        temperature step on the last slice, then the entropy target is lowered."""
        B = len(z) // self.args.utd_ratio
        for s in (slice(g * B, (g + 1) * B) for g in range(self.args.utd_ratio)):
            target = self.critic_target_value(rew[s], mask[s], next_z[s])
            q = self.critic(z[s], act[s])
            critic_loss = (q - target).pow(2).mean()
            descend(self.critic_opt, critic_loss)
            polyak_(self.critic_target, self.critic, self.args.tau)

        # actor on the mean of all critics (the last slice)
        alpha = self.log_alpha.exp().detach()
        new_act, log_prob = self.actor.sample(z[s])
        actor_loss = (alpha * log_prob - self.critic(z[s], new_act).mean(0)).mean()
        descend(self.actor_opt, actor_loss, inputs=self.actor_opt.layers)  # not into the critics

        # temperature: raise alpha when the entropy is below its target; then lower the target
        entropy = -log_prob.detach().mean()
        temp_loss = self.log_alpha.exp() * (entropy - self.target_entropy)
        descend(self.temp_opt, temp_loss)
        with torch.no_grad():
            self.target_entropy.sub_(self.args.target_entropy_decay)  # in place: graph-safe
        return {"losses/critic_loss": critic_loss.detach(),
                "losses/actor_loss": actor_loss.detach(),
                "losses/temperature_loss": temp_loss.detach(), "values/q": q.detach().mean(),
                "values/entropy": entropy, "values/alpha": alpha,
                "values/target_entropy": self.target_entropy.detach().clone()}


class ReplayBuffer:
    """Transitions as rows [z, a, r, m, z'] of one device tensor (z = [f(o), state]: embeddings,
    not images); batch indices drawn on the device (graph-safe: the size is a device tensor)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.dims = capacity, (obs_dim, act_dim, 1, 1, obs_dim)
        self.rows = torch.zeros(capacity, sum(self.dims), device=device)
        self.size_t = torch.zeros((), dtype=torch.long, device=device)  # the size, on the device
        self.ptr, self.size = 0, 0

    def add(self, z: torch.Tensor, act: np.ndarray, rew: float, mask: float, next_z: torch.Tensor):
        extra = torch.tensor([*act, rew, mask], dtype=torch.float32, device=z.device)
        self.rows[self.ptr].copy_(torch.cat([z, extra, next_z]))
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.size_t.fill_(self.size)  # CUDA graphs: a captured block samples from the new size

    def sample_rows(self, n: int) -> torch.Tensor:
        return self.rows[torch.randint(0, 2**62, (n,), device=self.rows.device) % self.size_t]

    def split(self, rows: torch.Tensor) -> tuple:
        z, act, rew, mask, next_z = rows.split(self.dims, dim=-1)
        return z, act, rew.squeeze(-1), mask.squeeze(-1), next_z

    def state_dict(self) -> dict:
        """The rows oldest first, so that a run with a larger capacity can resume them."""
        return {"rows": torch.cat([self.rows[self.ptr:self.size], self.rows[:self.ptr]]).cpu()}

    def load_state_dict(self, state: dict):
        self.size = len(state["rows"])
        self.rows[:self.size] = state["rows"].to(self.rows.device)
        self.ptr = self.size % self.capacity  # the next row goes after the newest
        self.size_t.fill_(self.size)


def half_demo_sample(demo: ReplayBuffer, online: ReplayBuffer, utd: int, batch: int) -> tuple:
    """G slices of B/G rows, each half from the demo lap and half online, laid end to end."""
    n = batch // utd
    rows_demo = demo.sample_rows(utd * (n // 2)).view(utd, n // 2, -1)
    rows_on = online.sample_rows(utd * (n - n // 2)).view(utd, n - n // 2, -1)
    return online.split(torch.cat([rows_demo, rows_on], 1).view(utd * n, -1))


# ----------------------------------------------------------------------------- the simulator
CONTROL_DT, SUBSTEPS = 0.1, 20  # 10 Hz control over 200 Hz physics
WHEEL_RADIUS, HALF_WIDTH = 0.05, 0.12  # the car: 0.4 x 0.24 m body, wheelbase 0.3 m
OBSTACLE_HALF, WALL_HEIGHT = 0.25, 0.3
STATE_DIM = 14  # acceleration, velocity, angular velocity (car frame), goal 3, previous action 2


class Course:
    """A closed course from a seed: outer walls [0, lx] x [0, ly] around an inner block, a corridor
    `width` m wide between them, three boxes in it; the demo path (counter-clockwise from the bottom
    straight's middle) swerves round them; checkpoints on it every ~`spacing` m."""

    def __init__(self, seed: int, width: float = 2.0, spacing: float = 4.0):
        rng = np.random.default_rng(seed)
        self.lx, self.ly = float(rng.uniform(11.0, 15.0)), float(rng.uniform(7.0, 10.0))
        w, h = width, width / 2
        loop = np.array([[self.lx / 2, h], [self.lx - h, h], [self.lx - h, self.ly - h],
                         [h, self.ly - h], [h, h], [self.lx / 2, h]])
        s_loop = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(loop, axis=0), axis=1))])
        fine = np.linspace(0, s_loop[-1], int(s_loop[-1] / 0.05) + 1)
        centre = np.stack([np.interp(fine, s_loop, loop[:, i]) for i in range(2)], 1)
        tangent = np.gradient(centre, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)  # left of the way: inward
        # boxes: >= 1.5 m from corners and the start, >= 3 m apart, on a random side
        self.obstacles, offset = [], np.zeros(len(fine))
        while len(self.obstacles) < 3:
            s = rng.uniform(1.5, fine[-1] - 1.5)
            if min(abs(s - s_loop[1:-1])) < 1.5 or any(abs(s - o[2]) < 3.0 for o in self.obstacles):
                continue
            side = rng.choice([-1.0, 1.0])
            i = int(s / 0.05)
            self.obstacles.append((*(centre[i] + side * 0.25 * normal[i]), s))
            bump = np.clip(1 - np.abs(fine - s) / 1.5, 0, 1)  # the demo swerves over +-1.5 m
            offset -= side * 0.55 * (0.5 - 0.5 * np.cos(np.pi * bump))
        self.path = centre + offset[:, None] * normal
        self.length = float(fine[-1])
        n_cp = max(3, int(round(self.length / spacing)))
        self.checkpoints = self.path[(np.arange(n_cp) * len(fine) // n_cp)]
        t, cx, cy = 0.1, self.lx / 2, self.ly / 2  # wall thickness; boxes (cx, cy, half x, half y)
        self.walls = [(cx, -t, cx + 2 * t, t), (cx, self.ly + t, cx + 2 * t, t), (-t, cy, t, cy),
                      (self.lx + t, cy, t, cy), (cx, cy, cx - w, cy - w)]  # the last: inner block
        self.walls += [(x, y, OBSTACLE_HALF, OBSTACLE_HALF) for x, y, _ in self.obstacles]

    def start_pose(self) -> tuple:
        """(x, y, yaw) 0.5 m before the first checkpoint, along the path."""
        i = len(self.path) - 10
        d = self.path[1] - self.path[0]
        return float(self.path[i, 0]), float(self.path[i, 1]), math.atan2(d[1], d[0])

    def blocked(self, a: np.ndarray, b: np.ndarray, margin: float = 0.0) -> bool:
        """Does the segment a-b pass within `margin` of a wall or box (inside the outer walls)?"""
        for t in np.linspace(0, 1, int(np.linalg.norm(b - a) / 0.05) + 2):
            p = a + t * (b - a)
            for cx, cy, hx, hy in self.walls:
                if abs(p[0] - cx) < hx + margin and abs(p[1] - cy) < hy + margin:
                    return True
        return False

    def xml(self, image_size: int, grip: float) -> str:
        """The MJCF: ground, walls, boxes and the car (steered front wheels, velocity-driven rear
        wheels, tyre friction `grip`, a forward camera)."""
        z = WALL_HEIGHT / 2
        walls = "\n".join(f'<geom name="wall{i}" type="box" pos="{cx:.3f} {cy:.3f} {z}" '
                          f'size="{hx:.3f} {hy:.3f} {z}" material="{"box" if i >= 5 else "wall"}"/>'
                          for i, (cx, cy, hx, hy) in enumerate(self.walls))
        x, y, yaw = self.start_pose()
        friction = f'friction="{grip} 0.005 0.0001"'
        wheel = (f'<geom type="cylinder" size="{WHEEL_RADIUS} 0.02" euler="90 0 0" mass="0.05" '
                 f'{friction} condim="3" contype="2" conaffinity="1" rgba=".1 .1 .1 1"/>')
        rear = '<joint name="rear_{}" type="hinge" axis="0 1 0" armature="0.0005"/>' + wheel
        front = ('<joint name="steer_{}" type="hinge" axis="0 0 1" range="-0.5 0.5"/><inertial '
                 'pos="0 0 0" mass="0.02" diaginertia="1e-5 1e-5 1e-5"/><body><joint type="hinge" '
                 f'axis="0 1 0" armature="0.0005"/>{wheel}</body>')  # the knuckle, then the spin
        wheels = "\n".join(f'<body pos="{px} {py} -0.02">{joint.format(side)}</body>'
                           for px, joint in ((-0.15, rear), (0.15, front))
                           for side, py in (("left", HALF_WIDTH), ("right", -HALF_WIDTH)))
        top = max(self.lx, self.ly) / 2 / math.tan(math.radians(30)) * 1.1  # sees the course
        motors = "".join([f'<velocity joint="rear_{side}" kv="0.08" forcerange="-0.25 0.25"/>'
                          for side in ("left", "right")] +  # ctrl: the rear wheels, then steering
                         [f'<position joint="steer_{side}" kp="8" kv="0.1" forcerange="-3 3"/>'
                          for side in ("left", "right")])
        checker = 'type="2d" builtin="checker" width="64" height="64"'
        return f"""<mujoco model="fastrlap">
  <option timestep="{CONTROL_DT / SUBSTEPS}" integrator="implicitfast"/>
  <visual><global offwidth="{max(image_size, 640)}" offheight="{max(image_size, 480)}"/>
    <quality shadowsize="0"/></visual>
  <asset><texture name="ground" {checker} rgb1=".55 .5 .4" rgb2=".45 .42 .35"/>
    <material name="ground" texture="ground" texrepeat="{self.lx:.1f} {self.ly:.1f}"/>
    <texture name="wall" {checker} rgb1=".85 .85 .85" rgb2=".7 .1 .1"/>
    <material name="wall" texture="wall" texrepeat="8 1"/><material name="box" rgba=".1 .3 .8 1"/>
  </asset>
  <worldbody><light directional="true" pos="0 0 10" dir="0.3 0.2 -1"/>
    <geom name="floor" type="plane" pos="{self.lx / 2:.3f} {self.ly / 2:.3f} 0"
      size="{self.lx:.1f} {self.ly:.1f} 0.1" material="ground" {friction}/>
    <camera name="top" pos="{self.lx / 2:.2f} {self.ly / 2:.2f} {top:.2f}" xyaxes="1 0 0 0 1 0"
      fovy="60"/>
    {walls}
    <body name="car" pos="{x:.3f} {y:.3f} 0.07" euler="0 0 {math.degrees(yaw):.2f}"><freejoint/>
      <geom name="chassis" type="box" size="0.2 0.1 0.03" mass="1.5" contype="2" conaffinity="1"
        rgba=".9 .6 .1 1"/>
      <camera name="front" pos="0.21 0 0.1" xyaxes="0 -1 0 0.17 0 0.98" fovy="90"/>
      {wheels}
    </body>
  </worldbody>
  <actuator>{motors}</actuator>
</mujoco>"""


class RaceCar(gym.Env):
    """The course as a Gymnasium env at 10 Hz: {"pixels": the last 3 frames, "state"}; actions
    (speed, steer) in [-1, 1]^2, rate-limited to +-0.2 per step. It never ends an episode: info
    reports `crash`, `stuck` (3 s pinned), the lap time and the clock; the practice loop decides
    what follows (`recover()` or `reset()`)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    STATE = ("prev_action", "acceleration", "checkpoint", "time", "lap_start")  # with get_state

    def __init__(self, course: Course, args: Args, video_size: int = 0):
        self.course, self.args, self.speed_scale = course, args, args.max_speed / 4.5
        self.time = 0.0  # seconds driven (forward and backing up): lap timer and practice clock
        self.model = mujoco.MjModel.from_xml_string(course.xml(args.image_size, args.grip))
        self.data = mujoco.MjData(self.model)
        self.camera = mujoco.Renderer(self.model, args.image_size, args.image_size)
        self.video = mujoco.Renderer(self.model, video_size, video_size) if video_size else None
        self.car = self.model.body("car").id
        self.is_wall = np.array([self.model.geom(i).name.startswith("wall")
                                 for i in range(self.model.ngeom)])
        self.is_car = self.model.body_rootid[self.model.geom_bodyid] == self.car
        s = args.image_size
        self.observation_space = gym.spaces.Dict(
            pixels=gym.spaces.Box(0, 255, (3, s, s, 3), np.uint8),
            state=gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None) -> tuple:
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)  # the start pose is the model's default
        mujoco.mj_forward(self.model, self.data)
        self.prev_action, self.acceleration = np.array([-1.0, 0.0]), np.zeros(3)
        self.checkpoint, self.lap_start, self.history = 0, None, []
        self.time = 0.0 if seed is not None else self.time  # seeded: a new clock; else it runs on
        self.frames = [self.render_camera()] * 3
        return self.observation(), {}

    def step(self, action: np.ndarray) -> tuple:
        """The reward: the velocity toward the checkpoint held at the step's start, minus the
        penalty on a crash; the next checkpoint is held once this one is within the radius."""
        a = np.clip(np.clip(action, -1.0, 1.0), self.prev_action - 0.2, self.prev_action + 0.2)
        speed, steer = self.speed_scale * (2.5 + 2.0 * a[0]), 0.5 * a[1]  # 0.5-4.5 m/s, +-0.5 rad
        goal, before = self.course.checkpoints[self.checkpoint], self.position()
        crash = self.drive(speed, steer)
        self.prev_action, after = a, self.position()
        toward = (goal - before) / max(np.linalg.norm(goal - before), 1e-6)
        reward = (float(np.dot(after - before, toward) / CONTROL_DT)
                  - self.args.crash_penalty * crash)
        info = {"crash": crash, "lap_time": None, "checkpoint": self.checkpoint, "time": self.time}
        if np.linalg.norm(goal - after) < self.args.checkpoint_radius:
            if self.checkpoint == 0:  # a lap runs from one pass of checkpoint 0 to the next
                if self.lap_start is not None:
                    info["lap_time"] = self.time - self.lap_start
                self.lap_start = self.time
            self.checkpoint = (self.checkpoint + 1) % len(self.course.checkpoints)
        self.history = (self.history + [after])[-30:]  # stuck: 3 s within 0.3 m
        info["stuck"] = len(self.history) == 30 and bool(
            np.linalg.norm(np.array(self.history) - after, axis=1).max() < 0.3)
        return self.observation(), reward, False, False, info

    def recover(self) -> dict:
        """The pseudo-reset after a crash or being stuck (official): drive backward at 1 m/s with a
        random steering angle for 1 s; the checkpoint and the clock run on."""
        steer = 0.5 * self.np_random.uniform(-1, 1)
        for _ in range(10):
            self.drive(-1.0, steer)
        self.prev_action, self.history = np.array([-1.0, 0.0]), []
        return self.observation()

    def drive(self, speed: float, steer: float) -> bool:
        """One control period at a speed target and steering angle; True on a car-wall contact."""
        v0, crash = self.data.qvel[:3].copy(), False
        self.data.ctrl[:] = [speed / WHEEL_RADIUS, speed / WHEEL_RADIUS, steer, steer]
        for _ in range(SUBSTEPS):
            mujoco.mj_step(self.model, self.data)
            g = self.data.contact.geom[:self.data.ncon]
            wall, car = self.is_wall[g], self.is_car[g]
            crash |= bool(((wall[:, 0] & car[:, 1]) | (wall[:, 1] & car[:, 0])).any())
        self.time += CONTROL_DT
        self.acceleration = (self.data.qvel[:3] - v0) / CONTROL_DT
        self.frames = self.frames[1:] + [self.render_camera()]
        return crash

    def position(self) -> np.ndarray:
        return self.data.xpos[self.car, :2].copy()

    def yaw(self) -> float:
        r = self.data.xmat[self.car].reshape(3, 3)
        return math.atan2(r[1, 0], r[0, 0])

    def render_camera(self, camera: str = "front") -> np.ndarray:
        renderer = self.camera if camera == "front" else self.video
        renderer.update_scene(self.data, camera=camera)
        return renderer.render().copy()

    def render(self) -> np.ndarray:
        return self.render_camera("top")  # a top view of the course (for videos)

    def observation(self) -> dict:
        r = self.data.xmat[self.car].reshape(3, 3)  # body -> world
        to_goal = self.course.checkpoints[self.checkpoint] - self.position()
        c, s = math.cos(self.yaw()), math.sin(self.yaw())
        goal = np.array([c * to_goal[0] + s * to_goal[1], -s * to_goal[0] + c * to_goal[1]])
        dist = np.linalg.norm(goal)
        v, unit = self.data.qvel, goal / max(dist, 1e-6)
        state = np.concatenate([r.T @ self.acceleration, r.T @ v[:3], v[3:6], unit, [dist],
                                self.prev_action])
        return {"pixels": np.stack(self.frames), "state": state.astype(np.float32)}

    def get_state(self) -> dict:
        """What the next steps depend on: MuJoCo's state, the frames, the clocks and the RNG."""
        physics = np.empty(mujoco.mj_stateSize(self.model, mujoco.mjtState.mjSTATE_INTEGRATION))
        mujoco.mj_getState(self.model, self.data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
        return {"physics": physics, "xpos": self.data.xpos.copy(), "xmat": self.data.xmat.copy(),
                "frames": np.stack(self.frames), **{k: getattr(self, k) for k in self.STATE},
                "history": list(self.history), "rng": self.np_random.bit_generator.state}

    def set_state(self, state: dict):
        mujoco.mj_setState(self.model, self.data, state["physics"],
                           mujoco.mjtState.mjSTATE_INTEGRATION)
        # the poses as mj_step left them (before its last integration, as the observation read them)
        self.data.xpos[:], self.data.xmat[:] = state["xpos"], state["xmat"]
        self.frames, self.history = list(state["frames"]), list(state["history"])
        for k in self.STATE:
            setattr(self, k, state[k])
        self.np_random.bit_generator.state = state["rng"]


make_env = RaceCar  # the env factory (the tests wrap it)


# ----------------------------------------------------------------------------- the pretraining data
def pursuit(env: RaceCar, course: Course, speed: float, offset: float = 0.0) -> np.ndarray:
    """Pure pursuit: the action that steers toward the point 1 m ahead on the demo path (shifted
    `offset` m to its left) at `speed` m/s."""
    p, path = env.position(), course.path
    j = (int(np.argmin(np.linalg.norm(path - p, axis=1))) + 20) % len(path)  # 20 x 5 cm ahead
    tangent = path[(j + 1) % len(path)] - path[j]
    left = np.array([-tangent[1], tangent[0]]) / max(np.linalg.norm(tangent), 1e-9)
    target = path[j] + offset * left
    alpha = math.atan2(target[1] - p[1], target[0] - p[0]) - env.yaw()
    steer = math.atan2(2 * 0.3 * math.sin(alpha), 1.0)  # wheelbase 0.3 m, lookahead 1 m
    return np.array([(speed / env.speed_scale - 2.5) / 2.0, steer / 0.5]).clip(-1, 1)


def load_or_collect(args: Args) -> dict:
    """The pretraining data, driven once and cached in data_dir (keyed by its settings)."""
    name = (f"drive_c{args.course_seed}_n{args.pretrain_courses}_l{args.pretrain_drive_steps}_"
            f"s{args.image_size}_g{args.grip}_v{args.max_speed}_cs{args.checkpoint_spacing}_"
            f"r{args.checkpoint_radius}.npz")
    path = os.path.join(os.path.expanduser(args.data_dir), name)
    if not os.path.exists(path):
        print(f"driving {args.pretrain_courses} courses slowly for the pretraining data: {path}",
              flush=True)
        parts = [drive_slowly(Course(args.course_seed + 1000 + i, spacing=args.checkpoint_spacing),
                              args, seed=i) for i in range(args.pretrain_courses)]
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **data)
        os.replace(path + ".tmp.npz", path)  # atomic: an interrupted collection leaves no half file
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def drive_slowly(course: Course, args: Args, seed: int) -> dict:
    """One course's slow, noisy pure pursuit. Row t: the frames, the car's own numbers (the first 9
    of the state), pose (x, y, yaw), previous action, its checkpoint (its goal), the action, crash,
    whether t -> t+1 is a transition (not into a pseudo-reset), the drive's id."""
    env, rng = make_env(course, args), np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)

    def here(obs) -> list:  # what a row records of the car before its action
        return [obs["pixels"], obs["state"][:9], [*env.position(), env.yaw()], env.prev_action,
                course.checkpoints[env.checkpoint]]

    rows, speed, offset = [], 0.75, 0.0
    for t in range(args.pretrain_drive_steps):
        if t % 20 == 0:  # a new speed and a new line every 2 s
            speed, offset = rng.uniform(0.5, 1.0), rng.choice([0.0, rng.uniform(-0.6, 0.6)])
        row = here(obs)
        action = pursuit(env, course, speed, offset=offset) + rng.normal(0, [0.05, 0.3])
        obs, _, _, _, event = env.step(action)
        rows.append(row + [env.prev_action, event["crash"], True, seed])
        if event["crash"] or event["stuck"]:  # the row after the crash ends this stretch; back up
            rows.append(here(obs) + [np.zeros(2), False, False, seed])
            obs = env.recover()
    rows.append(here(obs) + [np.zeros(2), False, False, seed])  # the last row: no transition
    keys = ("pixels", "own", "pose", "prev_action", "goal", "action", "crash", "valid", "drive")
    return {k: np.array([r[i] for r in rows], dtype=np.uint8 if k == "pixels" else np.float32)
            for i, k in enumerate(keys)}


class PretrainBuffer:
    """The pretraining data on the device, sampled with relabelled goals: the driver's own (p 0.5),
    the position 1-50 steps later in the same drive (0.25), the position plus N(0, 4 m) (0.25)."""

    def __init__(self, data: dict, args: Args, device: torch.device):
        self.d = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
        self.valid = torch.nonzero(self.d["valid"] > 0).squeeze(-1)
        if len(self.valid) < 2:
            fail("the pretraining data hold fewer than 2 transitions; raise --pretrain-drive-steps")
        end = np.searchsorted(data["drive"], data["drive"], side="right") - 1  # drives: in order
        self.drive_end = torch.as_tensor(end, device=device)  # future goals stay in the drive
        self.crash_penalty = args.crash_penalty

    def sample(self, n: int) -> tuple:
        """(o, s, a, r, m, o', s') with s = [own numbers, goal (unit x, unit y, distance) in the
        car's frame, previous action] and r = velocity toward the goal - penalty on a crash."""
        d = self.d
        i = self.valid[torch.randint(0, len(self.valid), (n,), device=self.valid.device)]
        j = torch.minimum(i + torch.randint(1, 51, (n,), device=i.device), self.drive_end[i])
        u = torch.rand(n, 1, device=i.device)
        noisy = d["pose"][i, :2] + 4.0 * torch.randn(n, 2, device=i.device)
        goal = torch.where(u < 0.5, d["goal"][i], torch.where(u < 0.75, d["pose"][j, :2], noisy))
        toward = goal - d["pose"][i, :2]
        toward = toward / toward.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        crash = d["crash"][i]
        moved = d["pose"][i + 1, :2] - d["pose"][i, :2]
        reward = (moved * toward).sum(-1) / CONTROL_DT - self.crash_penalty * crash
        return (d["pixels"][i], self.state(i, goal), d["action"][i], reward, 1.0 - crash,
                d["pixels"][i + 1], self.state(i + 1, goal))

    def state(self, i: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        pose = self.d["pose"][i]
        dx, dy = goal[:, 0] - pose[:, 0], goal[:, 1] - pose[:, 1]
        c, s = torch.cos(pose[:, 2]), torch.sin(pose[:, 2])
        local = torch.stack([c * dx + s * dy, -s * dx + c * dy], -1)
        dist = local.norm(dim=-1, keepdim=True)
        unit = local / dist.clamp(min=1e-6)
        return torch.cat([self.d["own"][i], unit, dist, self.d["prev_action"][i]], -1)


# ----------------------------------------------------------------------------- main: three stages
def main(args: Args) -> dict:
    device = check_args(args)
    resume = load_checkpoint(args, device)
    here = os.path.dirname(os.path.abspath(args.resume)) if resume else None  # resumed: its folder
    new = f"runs/fastrlap__{args.encoder}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or here or new
    if os.path.exists(run_dir) and not (here and os.path.samefile(run_dir, here)):
        fail(f"run folder {run_dir} already exists; choose another --run-dir "
             "(runs are never overwritten)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    course = Course(args.course_seed, spacing=args.checkpoint_spacing)

    # the outputs: args.json, TensorBoard (and W&B), stdout, laps.csv, evaluations.csv, the results
    writer = SummaryWriter(run_dir)
    resolved = {**asdict(args), "resolved": {"device": str(device)}}
    Path(run_dir, "args.json").write_text(json.dumps(resolved, indent=2))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, config=vars(args), dir=run_dir,
                   name=os.path.basename(run_dir), sync_tensorboard=True)
    # the practice so far (laps: step, practice minutes, lap time, collisions since the last lap)
    run = resume["run"] if resume else dict(laps=[], evals=[], crashes=0, stucks=0, lap_crashes=0,
                                            metrics={})
    results = run["metrics"]
    laps_csv = Path(run_dir, "laps.csv")  # on --resume, later rows go
    laps_csv.write_text("step,practice_minutes,lap_time,collisions\n" +
                        "".join(f"{s},{m:.3f},{t:.2f},{c}\n" for s, m, t, c in run["laps"]))

    def log(stage: str, step: int, info: dict) -> str:  # the only host sync of the update path
        metrics = {k: v.item() for k, v in info.items()}
        for k, v in metrics.items():
            if not math.isfinite(v):
                fail(f"{k} became {v} at {stage} step {step}; lower the learning rates")
            writer.add_scalar(k, v, step)
        results.update(metrics)
        losses = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items() if "loss" in k)
        return f"{stage} step={step} {losses}"

    # stage 1: the frozen encoder f
    encoder = (load_encoder(resume["encoder"], args, device) if resume else
               stage1_encoder(args, device, run_dir, log))
    encoder.requires_grad_(False)

    def embed(obs: dict) -> torch.Tensor:  # z = [f(o), state]: once per frame, stored in the replay
        with torch.no_grad():
            pixels = torch.as_tensor(obs["pixels"], device=device)[None]
            return torch.cat([encoder(pixels)[0], torch.as_tensor(obs["state"], device=device)])

    # stage 2: the demo lap (its time is the reference; its transitions, half of every batch)
    env = make_env(course, args)
    z_dim = encoder.out_dim + STATE_DIM
    demo = ReplayBuffer(4000, z_dim, 2, device)
    if resume:
        demo.load_state_dict(resume["demo"])
    demo_time = resume["demo_lap_time"] if resume else demo_lap(env, course, embed, demo, args)
    results["demo_lap_time"] = demo_time
    writer.add_scalar("charts/demo_lap_time", demo_time, 0)
    print(f"demo lap: {demo_time:.1f} s, {demo.size} transitions", flush=True)

    # stage 3: practice
    agent = FastRLAP(encoder.out_dim, args, device)
    online = ReplayBuffer(args.total_timesteps, z_dim, 2, device)

    def train_step():  # the UTD block: indices drawn on the device, G critic, 1 actor, 1 temp. step
        if args.demo:
            return agent.update(*half_demo_sample(demo, online, args.utd_ratio, args.batch_size))
        return agent.update(*online.split(online.sample_rows(args.batch_size)))

    step_fn = cuda_graph(train_step) if args.cuda_graph and device.type == "cuda" else train_step
    obs, _ = env.reset(seed=args.seed)
    start = resume["step"] if resume else 0
    if resume:  # where the agent, its optimizers, the replay, the car and every RNG were
        agent.load_state_dict(resume["agent"])
        for k, state in resume["optimizers"].items():
            getattr(agent, k).load_state_dict(state)
        online.load_state_dict(resume["online"])
        env.set_state(resume["env"])
        random.setstate(resume["rng"]["python"])
        np.random.set_state(resume["rng"]["numpy"])
        torch.set_rng_state(resume["rng"]["torch"].cpu())
        if resume["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in resume["rng"]["cuda"]])
        print(f"resumed from {args.resume} at step {start}", flush=True)
    z = embed(env.observation())
    info, updates, t0, n0, t_eval = None, 0, None, 0, 0.0  # updates/s: from t0, without evaluations
    for step in tqdm(range(start + 1, args.total_timesteps + 1), initial=start,
                     total=args.total_timesteps, disable=not sys.stdout.isatty(), desc="practice"):
        if step <= args.learning_starts:  # uniformly random within the rate limit
            action = np.clip(env.prev_action + np.random.uniform(-0.2, 0.2, 2), -1, 1)
        else:
            with torch.no_grad():
                action = agent.actor.sample(z[None])[0][0].cpu().numpy()
        next_obs, reward, _, _, event = env.step(action)
        next_z = embed(next_obs)
        # a crash ends the attempt for the critic (m = 0); being stuck only cuts it (m = 1)
        online.add(z, env.prev_action, reward, 0.0 if event["crash"] else 1.0, next_z)
        run["crashes"] += event["crash"]
        run["stucks"] += event["stuck"]
        run["lap_crashes"] += event["crash"]
        if event["lap_time"] is not None:
            lap, minutes = event["lap_time"], event["time"] / 60  # the clock: backing up counts
            run["laps"].append((step, minutes, lap, run["lap_crashes"]))
            with open(laps_csv, "a") as f:
                f.write(f"{step},{minutes:.3f},{lap:.2f},{run['lap_crashes']}\n")
            writer.add_scalar("charts/lap_time", lap, step)
            print(f"step={step} lap {len(run['laps'])}: {lap:.1f} s after {minutes:.1f} min of "
                  f"practice ({run['lap_crashes']} collisions)", flush=True)
            run["lap_crashes"] = 0
        if step % 100 == 0:
            writer.add_scalar("charts/collisions", run["crashes"], step)
            writer.add_scalar("charts/stuck", run["stucks"], step)
        if event["crash"] or event["stuck"]:  # pseudo-reset: back up and go on, or start over
            next_z = embed(env.recover() if args.pseudo_resets else env.reset()[0])
        z = next_z

        if step > args.learning_starts:
            info = step_fn()
            updates += args.utd_ratio
            if t0 is None and updates >= 50 * args.utd_ratio:  # after the capture warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, n0 = time.perf_counter(), step
        last = step == args.total_timesteps
        if info is not None and (step % args.log_interval == 0 or last):
            line = log("practice", step, info)
            if t0 is not None and step > n0:
                ups = (step - n0) * args.utd_ratio / (time.perf_counter() - t0 - t_eval)
                results["updates_per_second"] = ups
                writer.add_scalar("charts/updates_per_second", ups, step)
            best = min((lap[2] for lap in run["laps"]), default=float("nan"))
            print(f"{line} laps={len(run['laps'])} best={best:.1f} collisions={run['crashes']} "
                  f"ups={results.get('updates_per_second', float('nan')):.0f}", flush=True)
        checkpoint = last or (args.eval_interval > 0 and step % args.eval_interval == 0)
        if args.eval_laps > 0 and checkpoint:
            t_start = time.perf_counter()
            laps = evaluate(agent.actor, embed, course, args, step, run_dir)
            t_eval += time.perf_counter() - t_start if t0 is not None else 0.0
            times = [t for t, _ in laps if t is not None]
            lap, finished = min(times) if times else float("nan"), len(times) / len(laps)
            crashes = float(np.mean([c for _, c in laps]))
            run["evals"].append((step, env.time / 60, lap, finished, crashes))
            writer.add_scalar("eval/lap_time", lap, step)
            Path(run_dir, "evaluations.csv").write_text(
                "step,practice_minutes,lap_time,finished,collisions\n" +
                "".join(f"{s},{m:.3f},{t:.2f},{d:.2f},{c:.1f}\n" for s, m, t, d, c in run["evals"]))
            print(f"step={step} eval lap_time={lap:.1f} finished={len(times)}/{len(laps)}",
                  flush=True)
            results.update({"eval/lap_time": lap, "eval/finished": finished})
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), step, args, encoder, demo_time,
                            agent, demo, online, env, run)
    writer.close()
    lap_times = [lap[2] for lap in run["laps"]]
    return {"updates_per_second": float("nan"), **results, "updates": updates,
            "env_steps": args.total_timesteps - start, "run_dir": run_dir, "laps": run["laps"],
            "evaluations": run["evals"], "collisions": run["crashes"], "stuck": run["stucks"],
            "best_lap_time": min(lap_times, default=float("nan")),
            "first_lap_minutes": run["laps"][0][1] if run["laps"] else float("nan")}


def stage1_encoder(args: Args, device: torch.device, run_dir: str, log) -> Encoder:
    """The encoder: loaded (--encoder-path), untrained (--encoder random/none), or pretrained here
    by goal-conditioned pixel IQL on slow driving of other courses, then saved to encoder.pt."""
    if args.encoder_path is not None:
        return load_encoder(args.encoder_path, args, device)
    if args.encoder != "pretrained":
        return Encoder(args.image_size, blind=args.encoder == "none").to(device)
    buffer = PretrainBuffer(load_or_collect(args), args, device)
    iql = PixelIQL(args, device)
    step_fn = lambda: iql.update(*buffer.sample(args.pretrain_batch_size))  # noqa: E731
    step_fn = cuda_graph(step_fn) if args.cuda_graph and device.type == "cuda" else step_fn
    for step in tqdm(range(1, args.pretrain_steps + 1), disable=not sys.stdout.isatty(),
                     desc="pretrain"):
        info = step_fn()
        if step % args.log_interval == 0 or step == args.pretrain_steps:
            print(log("pretrain", step, info), flush=True)
    torch.save({"encoder": iql.encoder.state_dict(), "image_size": args.image_size},
               os.path.join(run_dir, "encoder.pt"))
    return iql.encoder


def demo_lap(env: RaceCar, course: Course, embed, demo: ReplayBuffer, args: Args) -> float:
    """Stage 2: the scripted driver laps the course once at --demo-speed from the start (until its
    second pass of the lap line); its transitions go to `demo`. Returns its lap time (s)."""
    obs, _ = env.reset(seed=args.seed)
    z = embed(obs)
    for _ in range(int(4 * course.length / (args.demo_speed * CONTROL_DT))):
        obs, reward, _, _, event = env.step(pursuit(env, course, args.demo_speed))
        next_z = embed(obs)
        demo.add(z, env.prev_action, reward, 0.0 if event["crash"] else 1.0, next_z)
        if event["crash"] or event["stuck"]:
            fail("the scripted demo lap crashed: the course or --demo-speed/--grip is not drivable")
        if event["lap_time"] is not None:
            return event["lap_time"]
        z = next_z
    fail("the scripted demo lap did not finish")


@torch.no_grad()
def evaluate(actor: TanhGaussianActor, embed, course: Course, args: Args, step: int,
             run_dir: str) -> list:
    """--eval-laps attempts with the deterministic policy, each from the start on a fresh copy of
    the course, backing up after crashes: (lap time or None, collisions) per attempt. An attempt
    gives up after 3 demo laps' time. --capture-video: top view and camera, run_dir/videos/."""
    env, results = make_env(course, args, video_size=256 if args.capture_video else 0), []
    for attempt in range(args.eval_laps):
        obs, _ = env.reset(seed=args.seed + 10_000 + attempt)
        frames, lap, crashes = [], None, 0
        for _ in range(int(3 * course.length / (args.demo_speed * CONTROL_DT))):
            obs, _, _, _, event = env.step(actor(embed(obs)[None])[0].cpu().numpy())
            if args.capture_video:  # the camera beside the top view, resized to 256 x 256
                rows = np.arange(256) * args.image_size // 256
                frames.append(np.concatenate([env.render(), obs["pixels"][-1][rows][:, rows]], 1))
            crashes += event["crash"]
            if event["lap_time"] is not None:
                lap = event["lap_time"]
                break
            if event["crash"] or event["stuck"]:
                obs = env.recover()
        results.append((lap, crashes))
        if args.capture_video and frames:
            from gymnasium.utils.save_video import save_video
            save_video(frames, os.path.join(run_dir, "videos"), fps=10,
                       name_prefix=f"step{step}_lap{attempt}")
    return results


# =============================================================================
# Plumbing: input checks, the encoder file, checkpoints, the flat Adam, the CUDA-graph helper.
# Nothing below changes what the algorithm does.
# =============================================================================
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"fastrlap.py: error: {message}")


def check_args(args: Args) -> torch.device:
    """Bad flags fail here, before anything is written; returns the device to run on."""
    if min(args.total_timesteps, args.utd_ratio, args.batch_size, args.log_interval,
           args.pretrain_steps, args.pretrain_batch_size, args.pretrain_courses,
           args.pretrain_drive_steps) < 1:
        fail("--total-timesteps, --utd-ratio, --batch-size, --log-interval and the --pretrain-* "
             "sizes must be positive")
    if args.batch_size % args.utd_ratio or args.batch_size // args.utd_ratio < 2:
        fail(f"--batch-size ({args.batch_size}) must split into --utd-ratio ({args.utd_ratio}) "
             "slices of 2 or more")
    if not 1 <= args.num_min_qs <= args.num_qs:
        fail(f"--num-min-qs must be between 1 and --num-qs ({args.num_qs}), got {args.num_min_qs}")
    if args.image_size < 31:
        fail("--image-size must be at least 31 (four stride-2 convolutions), got "
             f"{args.image_size}")
    if args.encoder_path is not None and args.encoder != "pretrained":
        fail(f"--encoder {args.encoder} and --encoder-path exclude each other")
    if args.encoder_path is not None and not os.path.isfile(args.encoder_path):
        fail(f"encoder {args.encoder_path} does not exist")
    size = args.encoder_path and torch.load(args.encoder_path, "cpu", weights_only=True).get(
        "image_size")
    if args.encoder_path is not None and size != args.image_size:
        fail(f"{args.encoder_path} was trained on {size}-pixel images, not --image-size "
             f"{args.image_size}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device.replace("auto", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    return device


def load_encoder(path, args: Args, device: torch.device) -> Encoder:
    """An encoder from its file or a checkpoint's copy of it (its image size: see check_args)."""
    state = path if isinstance(path, dict) else torch.load(path, device, weights_only=True)
    encoder = Encoder(args.image_size, blind=args.encoder == "none").to(device)
    encoder.load_state_dict(state["encoder"])
    return encoder


def save_checkpoint(path: str, step: int, args: Args, encoder: Encoder, demo_time: float,
                    agent: FastRLAP, demo: ReplayBuffer, online: ReplayBuffer, env: RaceCar,
                    run: dict):
    """All the practice's next steps depend on (the car's state and every RNG included)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"script": "fastrlap.py", "step": step, "args": asdict(args),
                "encoder": {"encoder": encoder.state_dict(), "image_size": args.image_size},
                "demo_lap_time": demo_time, "agent": agent.state_dict(),
                "optimizers": {k: getattr(agent, k).state_dict() for k in agent.OPTIMIZERS},
                "demo": demo.state_dict(), "online": online.state_dict(), "env": env.get_state(),
                "run": run, "rng": rng}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: an interrupted write leaves the previous checkpoint


def load_checkpoint(args: Args, device: torch.device) -> Optional[dict]:
    """--resume's checkpoint, checked before anything is written; main() puts its parts back."""
    if args.resume is None:
        return None
    if not os.path.isfile(args.resume):
        fail(f"checkpoint {args.resume} does not exist")
    try:
        state = torch.load(args.resume, map_location=device, weights_only=False)
    except Exception as e:
        fail(f"{args.resume} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or "script" not in state:
        fail(f"{args.resume} is not a checkpoint of fastrlap.py")
    if state["script"] != "fastrlap.py":
        fail(f"{args.resume} is a checkpoint of {state['script']}, not of fastrlap.py")
    if state["step"] >= args.total_timesteps:
        fail(f"{args.resume} is at step {state['step']}; --total-timesteps "
             f"({args.total_timesteps}) must be larger")
    return state


class FlatAdam(torch.optim.Adam):
    """torch's Adam on one flat tensor of all a network's parameters (the layers' parameters and
    grads are views into it): the same steps bit for bit, in ~7 kernels instead of ~7 per layer.
    zero_grad never drops the flat grad; a deep copy ties the copied layers to the copied tensor."""

    def __init__(self, params, **kwargs):
        self.layers = list(params)
        flat = torch.cat([p.detach().reshape(-1) for p in self.layers]).requires_grad_()
        flat.grad = torch.zeros_like(flat)
        self.tie(flat)
        super().__init__([flat], **kwargs)

    def tie(self, flat: torch.Tensor):
        """Make each layer's parameter a view into `flat` and its grad a view into flat.grad."""
        offset = 0
        for p in self.layers:
            p.data = flat.detach()[offset:offset + p.numel()].view_as(p)
            p.grad = flat.grad[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none=False)

    def __getstate__(self):
        return {**super().__getstate__(), "layers": self.layers}

    def __setstate__(self, state: dict):
        super().__setstate__(state)
        self.tie(self.param_groups[0]["params"][0])


def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph: `warmup` eager calls on a side
    stream (they allocate optimizer state and workspaces), then one capture, then replays; each
    call is one real call of fn."""
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
