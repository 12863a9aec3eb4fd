"""ReViND: offline RL for visual navigation with user rewards and a topological graph.

Shah, Bhorkar, Leen, Kostrikov, Rhinehart, Levine, "Offline Reinforcement Learning for Visual
Navigation", CoRL 2022, arXiv:2212.08244. Official code (JAX, training only): arjunbhorkar/ReViND.

    data:   trajectories of (o_t, p_t); a_t = the next 5 waypoints in the robot's frame; goals g
            relabelled from p_{t+k}, k ~ U{1..50}, as (sin, cos, distance) in the robot's frame
    reward: r_t = -1 + lambda d(o_t) (d: a grass or sun detector on the image's lower middle);
            terminal when o_{t+1} is the goal; a collision is terminal with r = collision_reward
    IQL:    f = conv(aug(o)), trained by the Q loss only; V(sg(f), g) by expectile tau on Q' =
            Polyak(Q); pi(a | sg(f), g): AWR exp(beta (Q' - V)); Q(f, g, a) -> r + gamma m V(f', g')
    graph:  nodes = subsampled observations; edge i -> j if |p_j - p_i| <= edge_max_distance, its
            cost the steps V(o_i, g_ij) implies, n = log(1 + (1 - gamma) V) / log gamma, at least
            1, pruned above max_edge_cost; Dijkstra to the goal's node; every 4 steps the robot
            joins the graph from its current image and the policy drives to the next node

Usage:
    python revind.py --encoder conv --batch-size 256            # grass reward (a CPU-sized run)
    python revind.py --user-reward none --actor bc              # goal-conditioned BC; filtered-bc
    python revind.py --resume runs/X/checkpoint.pt --eval-only  # evaluate a checkpoint again

Differences from the official code that change the algorithm (docs/revind.md says why):
- A numpy world of its own instead of RECON; 24 x 32 images (official 48 x 64); `--encoder conv`.
- Goals k ~ U{1..50} steps ahead (its first commit); HEAD draws 10..50 plus stored `dones` frames.
- 30% of goals are any frame of the data (`--random-goal-fraction`; not in the official code).
- Collisions are terminal with r = collision_reward (-100); official r = 0, a goal's reward.
- Batch 512 (the official config; HEAD trains with batch 1).
- Filtered BC: 15-step fragments (official: random ~15-step chunks), no waypoint noise (sd 0.007).
- The graph, the planner and the closed-loop evaluation (not in the official release).
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = "revind"  # name of this experiment (recorded in args.json)
    seed: int = 0  # seed of python, numpy and torch (training and evaluation)
    world_seed: int = 0  # seed of the map's obstacles and texture and of the exploration data
    user_reward: Literal["none", "grass", "sunny"] = "grass"  # detector in r = -1 + lambda d(image)
    reward_scale: float = 0.75  # lambda: weight of the detector in the reward (official 0.75)
    collision_reward: float = -100.0  # reward of a collision, which ends the episode
    actor: Literal["awr", "bc", "filtered-bc"] = "awr"
    """the actor's loss: AWR (ReViND), goal-conditioned BC, or BC on the top 20% of fragments"""
    max_steps: int = 20_000  # gradient steps (the actor's lr decays to 0 over them)
    batch_size: int = 512  # transitions per gradient step (official config 512)
    eval_interval: int = 0  # gradient steps between evaluations; 0 = evaluate only at the end
    eval_episodes: int = 20  # far-goal episodes per evaluation and variant (0 = never evaluate)
    log_interval: int = 500  # gradient steps between logged losses
    expectile: float = 0.9  # tau of the expectile value loss (official 0.9)
    beta: float = 1.0  # inverse temperature of the AWR actor (official 1.0)
    exp_adv_max: float = 100.0  # upper clip of the AWR weight exp(beta * A)
    actor_lr: float = 3e-4  # actor learning rate (cosine-decayed to 0, as the official code)
    lr_decay_steps: Optional[int] = None  # the actor's cosine lr decay horizon (None: --max-steps)
    critic_lr: float = 3e-4  # Q (and encoder) learning rate
    value_lr: float = 3e-4  # V learning rate
    hidden_dim: int = 256  # width of the two hidden layers of the V, Q and actor heads
    feature_dim: int = 50  # size of the encoder's output z
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target Q (encoder included)
    shift_pad: int = 2  # random shift: pad by this many pixels, crop back (official 4 at 48 x 64)
    goal_min: int = 1  # relabelled goals lie goal_min..goal_max steps ahead in the same trajectory
    goal_max: int = 50  # see goal_min
    random_goal_fraction: float = 0.3  # share of goals drawn from any frame (not in official code)
    encoder: Literal["impala", "conv"] = "impala"  # IMPALA (official) or 3 conv layers, ~5x cheaper
    image_height: int = 24  # camera image height (official 48: halved for CPU time)
    image_width: int = 32  # camera image width (official 64)
    trajectories: int = 400  # exploration trajectories in the offline dataset
    trajectory_length: int = 80  # steps per exploration trajectory
    node_spacing: float = 1.5  # at most one graph node per node_spacing-m cell and heading quadrant
    edge_max_distance: float = 6.0  # graph edges join nodes at most this many metres apart
    max_edge_cost: float = 50.0  # prune edges of more value-implied steps (the relabelling horizon)
    subgoal_distance: float = 3.0  # subgoal: first path node this far on (the goal once this near)
    replan_every: int = 4  # steps between replans (sooner near the subgoal; 1 = every step)
    episode_steps: int = 300  # step limit of an evaluation episode
    goal_radius: float = 1.0  # an evaluation episode succeeds within this many metres of its goal
    data_dir: str = "~/.cache/revind"  # where the generated exploration dataset is cached
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    cuda_graph: bool = True  # capture the update as one CUDA graph (applies only on a CUDA device)
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    save_model: bool = False  # write run_dir/checkpoint.pt at each evaluation and at the end
    resume: Optional[str] = None  # resume from a checkpoint.pt (outputs: its folder, or --run-dir)
    eval_only: bool = False  # with --resume: evaluate once in a new folder (planner flags may vary)
    run_dir: Optional[str] = None
    """new output folder (default: runs/revind__{user_reward}__{actor}__{seed}__{time})"""


# ----------------------------------------------------------------------------- networks
GOAL_DIM, ACT_DIM = 3, 10  # goal (sin, cos, distance); action: 5 waypoints (x, y)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class Encoder(nn.Module):
    """uint8 (B, 3, H, W) -> features. IMPALA (official): 3 stacks of (conv 3x3, max-pool 3x3
    stride 2, 2 residual blocks), 16, 32, 32 channels; conv: 3 plain conv layers of 16 channels."""

    def __init__(self, kind: str, image_hw: tuple):
        super().__init__()
        layers = [nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
                  nn.ReLU(), nn.Conv2d(16, 16, 3)] if kind == "conv" else []
        for n_in, ch in ((3, 16), (16, 32), (32, 32)) if kind == "impala" else ():
            layers += [nn.Conv2d(n_in, ch, 3, padding=1), nn.MaxPool2d(3, 2, padding=1),
                       ResidualBlock(ch), ResidualBlock(ch)]
        self.trunk = nn.Sequential(*layers, nn.ReLU(), nn.Flatten())
        self.n_out = self.trunk(torch.zeros(1, 3, *image_hw)).shape[1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.trunk(image.float() / 255.0)


class EnsembleLinear(nn.Module):
    """k independent linear layers applied as one batched matmul: (k, B, in) -> (k, B, out)."""

    def __init__(self, k: int, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(k, 1, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(n_in: int, width: int, n_out: int, k: Optional[int] = None) -> nn.Sequential:
    """Two hidden ReLU layers; with k, an ensemble of k on (k, B, n_in) as batched matmuls."""
    linear = nn.Linear if k is None else lambda i, o: EnsembleLinear(k, i, o)
    layers = [linear(n_in, width), nn.ReLU(), linear(width, width), nn.ReLU(), linear(width, n_out)]
    for layer in layers[::2]:  # orthogonal weights, zero biases (official)
        for w in layer.weight.data.view(-1, *layer.weight.shape[-2:]):  # each ensemble member
            nn.init.orthogonal_(w, gain=math.sqrt(2))
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Head(nn.Module):
    """A network on s = (conv features, goal) (official per-head layout): its own Dense(50) ->
    LayerNorm -> tanh, the goal appended, an MLP (256, 256); k heads that also take the action."""

    def __init__(self, n_features: int, args: Args, n_out: int, k: Optional[int] = None):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(n_features, args.feature_dim),
                                     nn.LayerNorm(args.feature_dim), nn.Tanh())
        nn.init.orthogonal_(self.project[0].weight, gain=math.sqrt(2))
        nn.init.zeros_(self.project[0].bias)
        self.k = k
        n_in = args.feature_dim + GOAL_DIM + (ACT_DIM if k else 0)  # Q also takes the action
        self.mlp = mlp(n_in, args.hidden_dim, n_out, k)

    def forward(self, features: torch.Tensor, goal: torch.Tensor, act=None) -> torch.Tensor:
        s = torch.cat([self.project(features), goal], -1)
        if self.k is None:
            return self.mlp(s)
        return self.mlp(torch.cat([s, act], -1).expand(self.k, -1, -1)).squeeze(-1)  # (k, B)


def critic(args: Args) -> nn.ModuleDict:
    """The encoder and the twin Q head: the Q loss is the only loss that trains the encoder."""
    encoder = Encoder(args.encoder, (args.image_height, args.image_width))
    return nn.ModuleDict({"encoder": encoder, "q": Head(encoder.n_out, args, 1, k=2)})


class UnitStdActor(nn.Module):
    """N(mu(s), I) over the 5 waypoints in metres (official: std fixed at 1, no tanh), so the
    log-likelihood is -||a - mu||^2 / 2 + const and AWR is a weighted squared error."""

    def __init__(self, n_features: int, args: Args):
        super().__init__()
        self.mu = Head(n_features, args, ACT_DIM)

    def forward(self, features: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        return self.mu(features, goal)  # the evaluation action: the mean

    def log_prob(self, features: torch.Tensor, goal: torch.Tensor, act: torch.Tensor):
        return -0.5 * (act - self(features, goal)).pow(2).sum(-1) - ACT_DIM / 2 * math.log(math.tau)


# ----------------------------------------------------------------------------- the method
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """|tau - 1(u < 0)| u^2: an asymmetric square whose minimiser is the tau-expectile."""
    return torch.where(diff > 0, expectile, 1 - expectile) * diff.pow(2)


def random_shift(image: torch.Tensor, next_image: torch.Tensor, pad: int) -> tuple:
    """DrQ's shift: pad `pad` edge pixels, crop back at a random offset, the same for o and o'."""
    b, _, h, w = image.shape
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), device=image.device)
    rows = (torch.arange(h, device=image.device) + dy)[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w, device=image.device) + dx)[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=image.device)[:, None, None]
    return tuple(nn.functional.pad(x.float(), (pad,) * 4, mode="replicate")[batch, :, rows, cols]
                 .permute(0, 3, 1, 2) for x in (image, next_image))  # (B, C, H, W)


class ReViND(nn.Module):
    def __init__(self, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.critic = critic(args)
        self.critic_target = critic(args).requires_grad_(False)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.value = Head(self.critic.encoder.n_out, args, 1)
        self.actor = UnitStdActor(self.critic.encoder.n_out, args)
        self.to(device)

        def adam(module, lr):  # (CUDA graph) capturable: the step count on the GPU; a tensor lr
            return torch.optim.Adam(module.parameters(), lr=lr, capturable=device.type == "cuda")
        self.actor_lr = torch.tensor(args.actor_lr, device=device)
        self.actor_opt = adam(self.actor, self.actor_lr)
        self.critic_opt = adam(self.critic, args.critic_lr)
        self.value_opt = adam(self.value, args.value_lr)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))

    def update(self, image, goal, act, rew, mask, next_image, next_goal) -> dict:
        args = self.args
        image, next_image = random_shift(image, next_image, args.shift_pad)
        features = self.critic.encoder(image)  # trained by the Q loss only
        features_sg = features.detach()  # V and the actor see the conv features with stop-gradient
        with torch.no_grad():
            q_target = self.critic_target.q(self.critic_target.encoder(image), goal, act).mean(0)
            next_features = self.critic.encoder(next_image)

        # 1) V: expectile regression onto the target twin Q (their mean: official reduction "mean")
        v = self.value(features_sg, goal).squeeze(-1)
        value_loss = expectile_loss(q_target - v, args.expectile).mean()
        self.value_opt.zero_grad()
        value_loss.backward()
        self.value_opt.step()

        # 2) pi: AWR with the V just updated (BC: weight 1; filtered BC is BC on the kept fragments)
        with torch.no_grad():
            adv = q_target - self.value(features_sg, goal).squeeze(-1)
            weight = (torch.exp(args.beta * adv).clamp(max=args.exp_adv_max) if args.actor == "awr"
                      else torch.ones_like(adv))
        actor_loss = -(weight * self.actor.log_prob(features_sg, goal, act)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        decay = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
        progress = self.num_updates.clamp(max=decay) / decay
        self.actor_lr.copy_(args.actor_lr * 0.5 * (1 + torch.cos(math.pi * progress)))  # cosine
        self.actor_opt.step()

        # 3) Q and the encoder: regress both heads onto r + gamma * m * V(s'), with the new V
        with torch.no_grad():
            q_backup = rew + args.gamma * mask * self.value(next_features, next_goal).squeeze(-1)
        critic_loss = (self.critic.q(features, goal, act) - q_backup).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()

        # 4) Polyak average of the whole critic, encoder included (no_grad: autograd records none)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()),
                                 list(self.critic.parameters()), args.tau)
        self.num_updates += 1
        return {"losses/value_loss": value_loss.detach(), "losses/actor_loss": actor_loss.detach(),
                "losses/critic_loss": critic_loss.detach(), "values/adv_mean": adv.mean(),
                "values/q": q_target.mean(), "values/actor_lr": self.actor_lr.clone()}


# ----------------------------------------------------------------------------- the data it sees
def detector(images: np.ndarray, kind: str) -> np.ndarray:
    """1 when over H * W / 27 pixels of the lower middle (bottom x middle thirds) pass the official
    HSV thresholds: grass: hue 56-172 degrees, saturation >= 50/255; sunny: value >= 100/255."""
    n, h, w, _ = images.shape
    if kind == "none":
        return np.zeros(n, np.float32)
    patch = images[:, 2 * h // 3:, w // 3:2 * w // 3].astype(np.float32)
    value, low = patch.max(-1), patch.min(-1)
    if kind == "sunny":
        match = value >= 100
    else:
        saturation = np.where(value > 0, (value - low) / np.maximum(value, 1e-6) * 255, 0)
        r, g, b = patch[..., 0], patch[..., 1], patch[..., 2]
        chroma = np.maximum(value - low, 1e-6)
        hue = np.where(value == r, ((g - b) / chroma) % 6,
                       np.where(value == g, (b - r) / chroma + 2, (r - g) / chroma + 4)) * 60
        match = (hue >= 56) & (hue <= 172) & (saturation >= 50)
    return (match.sum((1, 2)) > h * w // 27).astype(np.float32)


def goal_vector(pos: torch.Tensor, yaw: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """(sin phi, cos phi, rho): the goal's bearing phi and distance rho in the robot's frame."""
    d = goal - pos
    bearing = torch.atan2(d[..., 1], d[..., 0]) - yaw
    return torch.stack([torch.sin(bearing), torch.cos(bearing), d.norm(dim=-1)], -1)


def waypoints(data: dict) -> np.ndarray:
    """a_t: the commanded positions of steps t..t+4 in the robot's frame at t, (x, y) x 5 in
    metres; past the trajectory's end the last one repeats (a stop)."""
    n, traj = len(data["pos"]), data["traj"]
    last = np.searchsorted(traj, traj, side="right") - 1  # each frame's trajectory ends here
    idx = np.minimum(np.arange(n)[:, None] + np.arange(5), last[:, None] - 1)  # last: no command
    d = data["target"][idx] - data["pos"][:, None]
    c, s = np.cos(data["yaw"])[:, None], np.sin(data["yaw"])[:, None]
    a = np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)
    return a.reshape(n, 10).astype(np.float32)


class RelabelBuffer:
    """The dataset on the device and batches drawn there (official sampler): t uniform over
    frames with a successor (filtered BC: in the kept fragments); g = p_{t+k}, k ~ U{goal_min..
    goal_max} clipped to the trajectory's end, or (random_goal_fraction) any frame;
    r = -1 + lambda d(o_t), m = 0 when o_{t+1} is g; a collision: r = collision_reward, m = 0."""

    def __init__(self, data: dict, args: Args, device: torch.device):
        t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
        traj = data["traj"]
        last = np.searchsorted(traj, traj, side="right") - 1  # each frame's trajectory ends here
        starts = np.nonzero(np.arange(len(traj)) < last)[0]
        bonus = args.reward_scale * detector(data["images"], args.user_reward)
        if args.actor == "filtered-bc":
            starts = starts[top_fragments(starts, traj, bonus - 1.0, data["collision"],
                                          args.collision_reward)]
        self.last, self.bonus, self.starts = t(last), t(bonus), t(starts)
        self.images = t(data["images"]).permute(0, 3, 1, 2)  # uint8 (N, 3, H, W)
        self.pos, self.yaw, self.collision = t(data["pos"]), t(data["yaw"]), t(data["collision"])
        self.actions, self.args = t(waypoints(data)), args

    def sample(self, batch_size: int) -> tuple:
        device, args = self.starts.device, self.args
        i = self.starts[torch.randint(0, len(self.starts), (batch_size,), device=device)]
        k = torch.randint(args.goal_min, args.goal_max + 1, (batch_size,), device=device)
        g = torch.minimum(i + k, self.last[i])  # the goal frame, in the same trajectory ...
        anywhere = torch.randint(0, len(self.pos), (batch_size,), device=device)
        random_goal = torch.rand(batch_size, device=device) < args.random_goal_fraction
        g = torch.where(random_goal, anywhere, g)  # ... or any frame
        collided = self.collision[i]
        rew = torch.where(collided, args.collision_reward, -1.0 + self.bonus[i])
        mask = (~collided & (g != i + 1)).float()
        goal = goal_vector(self.pos[i], self.yaw[i], self.pos[g])
        next_goal = goal_vector(self.pos[i + 1], self.yaw[i + 1], self.pos[g])
        return self.images[i], goal, self.actions[i], rew, mask, self.images[i + 1], next_goal


def top_fragments(starts, traj, reward, collision, collision_reward, length=15, top=0.2):
    """Filtered BC's data: 15-step fragments of one trajectory, scored by their mean reward;
    a mask over `starts` of those at or above the (1 - top) quantile."""
    r = np.where(collision[starts], collision_reward, reward[starts])
    first = np.r_[True, traj[starts][1:] != traj[starts][:-1]]  # a trajectory begins
    index = np.arange(len(starts))
    position = index - np.maximum.accumulate(np.where(first, index, 0))  # within its trajectory
    fragment = np.cumsum(first | (position % length == 0)) - 1
    score = np.bincount(fragment, r) / np.bincount(fragment)
    return score[fragment] >= np.quantile(score, 1 - top)


# ----------------------------------------------------------------------------- the world
ROAD, GRASS, DIRT, WALL = 0, 1, 2, 3
TERRAIN_RGB = np.array([[0.52, 0.52, 0.54], [0.30, 0.62, 0.22], [0.60, 0.44, 0.27],
                        [0.45, 0.08, 0.10]])
SKY_RGB = np.array([0.70, 0.80, 0.95])  # beyond the camera's far range
MAX_TURN, MAX_STEP = 0.5, 0.5  # rad and metres per control step


class World:
    """A 40 x 40 m map (cells of `res` m; x right, y up; docs/revind.md shows it) with a unicycle
    robot and an egocentric camera. The seed places six small obstacles and the texture."""

    size, res = 40.0, 0.25

    def __init__(self, seed: int = 0, image_hw: tuple = (24, 32)):
        rng = np.random.default_rng(seed)
        n = int(self.size / self.res)
        c = lambda v: int(round(v / self.res))  # noqa: E731  (metres -> cells)
        t = np.full((n, n), GRASS, np.int8)  # indexed [iy, ix]
        shade = np.zeros((n, n), bool)
        t[c(6):c(26), :c(20)] = DIRT  # the west half of the middle: dirt ...
        shade[c(13.75):c(26), :c(20)] = True  # ... under trees
        t[:c(13), c(19):c(21)] = ROAD  # a road up the bottom band, and one north from wall B's gap
        t[c(26):, c(19):c(21)] = ROAD
        t[c(33):c(35), c(4):c(36)] = ROAD  # and one across the top band
        shade[c(29):c(37), c(28):c(38)] = True  # a building's shadow in the top band
        cols = np.arange(n)
        for y0, gaps in ((13.0, ((9.0, 12.5), (31.0, 34.5))), (26.0, ((18.0, 22.0),))):
            in_gap = np.any([(c(x0) <= cols) & (cols < c(x1)) for x0, x1 in gaps], 0)
            t[c(y0):c(y0 + 0.75), ~in_gap] = WALL
        for _ in range(6):  # small obstacles (rocks, bins) away from the walls and gaps
            while True:
                x = rng.uniform(2, 38)
                y = rng.choice([rng.uniform(2, 11), rng.uniform(15.5, 24), rng.uniform(28.5, 38)])
                if not (17 < x < 23 or 8 < x < 14 or 30 < x < 36):
                    break
            t[c(y):c(y + 1.0), c(x):c(x + 1.0)] = WALL
        t[0, :] = t[-1, :] = t[:, 0] = t[:, -1] = WALL  # the map's boundary
        self.terrain, self.shade, self.n = t, shade, n
        rgb = TERRAIN_RGB[t] * np.where(shade, 0.5, 1.0)[..., None]  # shaded: half as bright
        self.rgb = np.clip(rgb * rng.uniform(0.9, 1.1, (n, n, 1)), 0, 1)  # texture: per cell
        self.camera = ground_projection(*image_hw)

    def cell(self, xy: np.ndarray) -> tuple:
        """(iy, ix): the cell under each position (x, y), clipped to the map."""
        ix, iy = np.moveaxis(np.clip((xy / self.res).astype(int), 0, self.n - 1), -1, 0)
        return iy, ix

    def inside(self, xy: np.ndarray) -> np.ndarray:
        return ((xy >= 0) & (xy < self.size)).all(-1)

    def blocked(self, xy: np.ndarray) -> np.ndarray:
        return ~self.inside(xy) | (self.terrain[self.cell(xy)] == WALL)

    def ground(self, xy: np.ndarray) -> tuple:
        """(on grass, in sun) of the ground under each position."""
        return self.terrain[self.cell(xy)] == GRASS, ~self.shade[self.cell(xy)]

    def move(self, pose: np.ndarray, waypoint: np.ndarray) -> tuple:
        """Turn toward a waypoint (x, y) in the robot's frame (at most MAX_TURN), drive its distance
        (at most MAX_STEP); a segment that touches a wall is a collision: the robot stays."""
        turn = np.clip(np.arctan2(waypoint[1], waypoint[0]), -MAX_TURN, MAX_TURN)
        dist = np.clip(np.hypot(waypoint[0], waypoint[1]), 0.0, MAX_STEP)
        theta = pose[2] + turn
        path = pose[:2] + np.linspace(0.25, 1.0, 4)[:, None] * dist * unit(theta)
        if self.blocked(path).any():
            return np.array([pose[0], pose[1], theta]), True
        return np.array([*path[-1], (theta + np.pi) % (2 * np.pi) - np.pi]), False  # wrapped

    def render(self, pose: np.ndarray) -> np.ndarray:
        """The egocentric image (H, W, 3) uint8: each pixel shows the ground point it looks at."""
        fwd, left, valid = self.camera
        c, s = np.cos(pose[2]), np.sin(pose[2])
        xy = np.stack([pose[0] + c * fwd - s * left, pose[1] + s * fwd + c * left], -1)
        img = np.where(self.inside(xy)[..., None], self.rgb[self.cell(xy)], TERRAIN_RGB[WALL])
        return (np.where(valid[..., None], img, SKY_RGB) * 255).astype(np.uint8)

    def free_pose(self, rng, region=None, clearance: float = 0.75) -> np.ndarray:
        """A random pose at least `clearance` m from any wall, inside region (x0, x1, y0, y1)."""
        x0, x1, y0, y1 = region or (0.0, self.size, 0.0, self.size)
        ring = np.vstack([[0, 0], clearance * unit(np.linspace(0, 2 * np.pi, 9))])
        while True:
            p = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
            if not self.blocked(p[None] + ring).any():
                return np.array([*p, rng.uniform(-np.pi, np.pi)])


def unit(angle) -> np.ndarray:  # (cos, sin) on the last axis
    return np.stack([np.cos(angle), np.sin(angle)], -1)


def ground_projection(h: int, w: int, height=0.6, near=0.3, far=8.0, fov=np.pi / 2):
    """The ground point each pixel of a camera `height` m up sees, (forward, left) m in the
    robot's frame, from above `far` (top row: sky) down to `near` m ahead, `fov` wide."""
    below = np.linspace(np.arctan2(height, far) - 0.15, np.arctan2(height, near), h)  # (horizon)
    fwd = height / np.tan(np.clip(below, 1e-3, None))[:, None] * np.ones((1, w))
    left = fwd * np.tan(np.linspace(fov / 2, -fov / 2, w))[None, :]
    return fwd, left, (below[:, None] > 0) & (fwd <= far)


def explore(world: World, trajectories: int, length: int, seed: int) -> dict:
    """RECON-like reward-agnostic data: from free poses, a random walk of the heading at a random
    speed, turning on the spot for 6 steps after a collision; per frame: command and collision."""
    rng, rows = np.random.default_rng(seed), []
    for i in range(trajectories):
        pose, speed, turn, spin = world.free_pose(rng), rng.uniform(0.2, MAX_STEP), 0.0, 0
        for t in range(length + 1):
            turn = np.clip(0.7 * turn + rng.normal(0.0, 0.2), -MAX_TURN, MAX_TURN)  # smooth walk
            cmd_turn, cmd_dist = (np.sign(turn) * MAX_TURN, 0.05) if spin > 0 else (turn, speed)
            new_pose, hit = world.move(pose, cmd_dist * unit(cmd_turn))
            target = pose[:2] + cmd_dist * unit(pose[2] + cmd_turn)
            rows.append((world.render(pose), pose[:2], pose[2], i, target, hit and t < length))
            spin = 6 if hit else spin - 1  # bounce: turn on the spot, then walk on
            pose = new_pose
    return {k: np.asarray(col, np.float32 if k in ("pos", "yaw", "target") else None)
            for k, col in zip(("images", "pos", "yaw", "traj", "target", "collision"), zip(*rows))}


def load_or_collect(world: World, args: Args) -> dict:
    """The exploration dataset, collected once into data_dir (keyed by its settings)."""
    name = (f"explore_w{args.world_seed}_n{args.trajectories}_l{args.trajectory_length}_"
            f"{args.image_height}x{args.image_width}.npz")
    path = os.path.join(os.path.expanduser(args.data_dir), name)
    if not os.path.exists(path):
        print(f"collecting {args.trajectories} exploration trajectories into {path}")
        data = explore(world, args.trajectories, args.trajectory_length, args.world_seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **data)
        os.replace(path + ".tmp.npz", path)  # atomic: an interrupted collection leaves no half file
    data = dict(np.load(path))
    if data["images"].shape[1:] != (args.image_height, args.image_width, 3):
        fail(f"{path} holds {data['images'].shape[1:3]} images, not "
             f"{args.image_height}x{args.image_width}; delete it")
    return data


# ----------------------------------------------------------------------------- the training loop
def main(args: Args) -> dict:
    device = check_args(args)
    here = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None  # its folder
    # --eval-only: a new folder per evaluation, the training run's outputs are never touched
    run_dir = args.run_dir or (os.path.join(here, f"eval__{int(time.time())}") if args.eval_only
                               else here or f"runs/revind__{args.user_reward}__{args.actor}__"
                               f"{args.seed}__{int(time.time())}")
    if os.path.exists(run_dir) and (args.eval_only or not here
                                    or not os.path.samefile(run_dir, here)):
        fail(f"{run_dir} already exists; choose another --run-dir (runs are never overwritten)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    agent = ReViND(args, device)
    start, evals = load_checkpoint(args.resume, agent, device) if args.resume else (0, [])
    evals = [] if args.eval_only else evals
    world = World(args.world_seed, (args.image_height, args.image_width))
    data = load_or_collect(world, args)  # reward-agnostic: the user's reward is read off the images
    buffer = RelabelBuffer(data, args, device)
    if args.resume:
        print(f"{'evaluating' if args.eval_only else 'resumed from'} {args.resume} at step {start}")
    train_step = lambda: agent.update(*buffer.sample(args.batch_size))  # noqa: E731  (relabelled)
    step_fn = cuda_graph(train_step) if device.type == "cuda" and args.cuda_graph else train_step
    writer = SummaryWriter(run_dir)  # (makes the folder)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        resolved = {"device": str(device), "transitions": len(buffer.starts)}
        json.dump({**asdict(args), "resolved": resolved}, f, indent=2)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, config=vars(args), dir=run_dir,
                   name=os.path.basename(run_dir), sync_tensorboard=True)
    end = start if args.eval_only else args.max_steps  # --eval-only: no update, one evaluation
    warmup = min(start + 20, end)  # updates/s is measured after the capture warm-up ...
    results, t0, t_eval = {}, None, 0.0

    def evaluate_and_log(step: int):  # far goals, each variant on the same episodes
        nonlocal t_eval
        t = time.perf_counter()
        graph = build_graph(agent, data, args, device)
        episodes = {v: [] for v in VARIANTS}
        for origin, goal in far_goal_tasks(world, args.eval_episodes, args.seed + step):
            goal_node = int(np.argmin(np.linalg.norm(graph["pos"] - goal, axis=1)))
            for variant, runs in episodes.items():
                weights = "distance" if variant == "distance-graph" else "value"
                g = {**graph, "cost": graph["distance_cost"]} if weights == "distance" else graph
                plan = shortest_paths(g, goal_node) if variant != "policy" else None
                runs.append(drive(agent, world, g, plan, origin, goal, args, device, weights))
        for variant, eps in episodes.items():
            s = summarize(eps)
            evals.append((step, variant, *s.values()))
            results.update({f"eval/{variant}/{k}": v for k, v in s.items()})
            print(f"step={step} eval {variant}: success={s['success']:.2f} collision="
                  f"{s['collision']:.2f} length={s['length']:.1f} grass={s['grass']:.2f} "
                  f"sun={s['sun']:.2f}", flush=True)
        results.update({"graph/nodes": len(graph["nodes"]), "graph/edges": len(graph["src"])})
        for k, v in results.items():
            if k.startswith(("eval/", "graph/")):  # this evaluation's numbers
                writer.add_scalar(k, v, step)
        with open(os.path.join(run_dir, "evaluations.csv"), "w") as f:
            f.write("step,variant,success,collision,length,grass,sun\n")
            f.writelines(f"{s},{v},{a:.3f},{b:.3f},{c:.2f},{d:.3f},{e:.3f}\n"
                         for s, v, a, b, c, d, e in evals)
        plot_routes(world, episodes, graph, os.path.join(run_dir, f"routes_{step}.png"),
                    f"user reward: {args.user_reward}, actor: {args.actor}, step {step}")
        t_eval += time.perf_counter() - t if t0 is not None else 0.0  # ... without evaluations

    if args.eval_only:
        evaluate_and_log(start)
    for step in tqdm(range(start + 1, end + 1), initial=start, total=end, desc="revind",
                     disable=not sys.stdout.isatty()):
        info = step_fn()  # one gradient step: V, then pi, then Q and the encoder, then the target
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if step % args.log_interval == 0 or step == end:
            metrics = {k: v.item() for k, v in info.items()}  # the only host sync of the loop
            for k, v in metrics.items():
                if not math.isfinite(v):
                    fail(f"{k} became {v} at step {step}; lower the learning rates")
                writer.add_scalar(k, v, step)
            if t0 is not None and step > warmup:
                ups = (step - warmup) / (time.perf_counter() - t0 - t_eval)
                metrics["updates_per_second"] = ups
                writer.add_scalar("charts/updates_per_second", ups, step)
            results.update(metrics)
            losses = " ".join(f"{k[7:]}={v:.4g}" for k, v in metrics.items() if k[:7] == "losses/")
            ups = metrics.get("updates_per_second", math.nan)
            print(f"step={step} {losses} ups={ups:.1f}", flush=True)
        checkpoint = step == end or (args.eval_interval > 0 and step % args.eval_interval == 0)
        if args.eval_episodes > 0 and checkpoint:
            evaluate_and_log(step)
        if args.save_model and checkpoint:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, step, args, evals)
    writer.close()
    return {"updates_per_second": math.nan, **results, "updates": end - start, "run_dir": run_dir,
            "evaluations": evals}


# ----------------------------------------------------------------------------- evaluation
VARIANTS = ("graph", "policy", "distance-graph")  # ReViND; the policy alone; ViNG-like weights


@torch.no_grad()
def build_graph(agent: ReViND, data: dict, args: Args, device: torch.device) -> dict:
    """Nodes: frames, at most one per node_spacing cell and heading quadrant; edges i -> j within
    edge_max_distance cost value_to_steps(V(o_i, g_ij)) (pruned above max_edge_cost), or metres."""
    pos, yaw = data["pos"], data["yaw"]
    heading = np.floor((yaw + np.pi) / (np.pi / 2)).astype(np.int64) % 4
    keys = np.c_[np.floor(pos / args.node_spacing).astype(np.int64), heading]
    nodes = np.sort(np.unique(keys, axis=0, return_index=True)[1])
    npos = torch.as_tensor(pos[nodes], device=device)
    near = (torch.cdist(npos, npos) <= args.edge_max_distance).fill_diagonal_(False)
    src, dst = near.nonzero(as_tuple=True)
    goals = goal_vector(npos[src], torch.as_tensor(yaw[nodes], device=device)[src], npos[dst])
    images = torch.as_tensor(data["images"][nodes], device=device).permute(0, 3, 1, 2)
    # V's projection once per node, its MLP once per edge
    z = torch.cat([agent.value.project(agent.critic.encoder(x)) for x in images.split(1024)])
    values = torch.cat([agent.value.mlp(torch.cat([z[s], g], -1)).squeeze(-1)
                        for s, g in zip(src.split(65536), goals.split(65536))])
    cost = value_to_steps(values.cpu().numpy(), args.gamma)
    keep = cost <= args.max_edge_cost
    src, dst, cost = src.cpu().numpy()[keep], dst.cpu().numpy()[keep], cost[keep]
    return {"nodes": nodes, "pos": pos[nodes], "src": src, "dst": dst, "cost": cost,
            "distance_cost": np.linalg.norm(pos[nodes][src] - pos[nodes][dst], axis=1)}


def value_to_steps(value: np.ndarray, gamma: float) -> np.ndarray:
    """n with -(1 - gamma^n) / (1 - gamma) = V (inf at or below -1 / (1 - gamma), never
    arriving); at least one step: V above -1 (an over-estimate) counts as one, never 0 or less."""
    inside = 1 + (1 - gamma) * np.minimum(np.asarray(value, np.float64), -1.0)
    return np.where(inside > 0, np.log(np.clip(inside, 1e-300, None)) / np.log(gamma), np.inf)


def shortest_paths(graph: dict, goal: int) -> tuple:
    """Dijkstra from the goal over reversed edges: (cost to go, next node), inf and -1: no path."""
    from scipy.sparse import csgraph, csr_matrix
    n = len(graph["nodes"])
    reverse = csr_matrix((graph["cost"], (graph["dst"], graph["src"])), shape=(n, n))
    to_go, previous = csgraph.dijkstra(reverse, indices=goal, return_predecessors=True)
    return to_go, np.where(previous < 0, -1, previous)  # previous when reversed: next toward goal


@torch.no_grad()
def edges_from_here(agent, image, pose, graph, args, weights: str) -> np.ndarray:
    """The robot's own edges, as the graph's: to the nodes within edge_max_distance, the steps
    V(o_t, g) implies, pruned above max_edge_cost, weighted by them or by metres; inf: no edge."""
    gap = np.linalg.norm(graph["pos"] - pose[:2], axis=1)
    near = np.nonzero(gap <= args.edge_max_distance)[0]
    t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=image.device)  # noqa: E731
    goals = goal_vector(t(pose[:2]), t(pose[2]), t(graph["pos"][near]))
    features = agent.critic.encoder(image).expand(len(near), -1)  # the image's features once
    steps = value_to_steps(agent.value(features, goals).squeeze(-1).cpu().numpy(), args.gamma)
    weight = steps if weights == "value" else gap[near]
    cost = np.full(len(gap), np.inf)
    cost[near] = np.where(steps <= args.max_edge_cost, weight, np.inf)
    return cost


def next_subgoal(graph: dict, plan: tuple, position, cost_from_here, lookahead: float):
    """Join the graph at the node minimising (cost from here + cost to go), then follow the
    path to the first node `lookahead` m away: the policy's next goal (None: no path)."""
    to_go, nxt = plan
    total = cost_from_here + to_go
    if not np.isfinite(total).any():
        return None
    node = int(np.argmin(total))
    while nxt[node] >= 0 and np.linalg.norm(graph["pos"][node] - position) < lookahead:
        node = nxt[node]
    return graph["pos"][node]


def far_goal_tasks(world: World, episodes: int, seed: int) -> list:
    """Starts in the bottom band's middle, goals in the top band beyond two walls' offset gaps."""
    rng = np.random.default_rng(seed)
    return [(world.free_pose(rng, (14.0, 26.0, 1.5, 7.0)),
             world.free_pose(rng, (6.0, 34.0, 29.0, 38.0))[:2]) for _ in range(episodes)]


def mean_or_nan(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


@torch.no_grad()
def drive(agent, world, graph, plan, start, goal, args, device, weights="value") -> dict:
    """One episode: every replan_every steps (or at the subgoal) the robot joins the graph from its
    image for the next subgoal (the goal if near or with no plan) and drives the first waypoint."""
    pose, route, target, since = start.copy(), [start[:2].copy()], None, 0
    success = collided = False
    for _ in range(args.episode_steps):
        image = torch.as_tensor(world.render(pose), device=device).permute(2, 0, 1)[None]
        if plan is None or np.linalg.norm(goal - pose[:2]) < args.subgoal_distance:
            target = goal
        elif (target is None or since >= args.replan_every
              or np.linalg.norm(target - pose[:2]) < args.goal_radius):
            here = edges_from_here(agent, image, pose, graph, args, weights)
            target, since = next_subgoal(graph, plan, pose[:2], here, args.subgoal_distance), 0
            if target is None:
                break  # no path from here on the graph
        since += 1
        position = torch.as_tensor(pose[:2], device=device)  # (float64, as the pose)
        yaw = torch.tensor(float(pose[2]), device=device)
        g = goal_vector(position, yaw, torch.as_tensor(target, dtype=torch.float32, device=device))
        waypoint = agent.actor(agent.critic.encoder(image), g[None].float())[0, :2].cpu().numpy()
        pose, collided = world.move(pose, waypoint)
        if collided:
            break
        route.append(pose[:2].copy())
        success = bool(np.linalg.norm(goal - pose[:2]) < args.goal_radius)
        if success:
            break
    route = np.array(route)
    length = sum(float(np.linalg.norm(b - a)) for a, b in zip(route[:-1], route[1:]))
    grass, sun = world.ground(route[1:])  # the ground under the robot after each step
    return {"success": success, "collided": collided, "length": length, "grass": mean_or_nan(grass),
            "sun": mean_or_nan(sun), "route": route, "start": start, "goal": goal}


def summarize(episodes: list) -> dict:
    """Success and collision rates; length, grass and sun over the successful episodes only."""
    ok = [e for e in episodes if e["success"]]
    return {"success": mean_or_nan([e["success"] for e in episodes]),
            "collision": mean_or_nan([e["collided"] for e in episodes]),
            **{k: mean_or_nan([e[k] for e in ok]) for k in ("length", "grass", "sun")}}


def plot_routes(world: World, episodes: dict, graph: dict, path: str, title: str):
    """The map with each variant's routes (matplotlib)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, nothing to close
    fig = Figure(figsize=(4.2 * len(episodes), 4.4))
    colours = colormaps["tab10"](np.arange(10))
    for ax, (variant, eps) in zip(np.atleast_1d(fig.subplots(1, len(episodes))), episodes.items()):
        ax.imshow(world.rgb, origin="lower", extent=(0, world.size, 0, world.size))
        ax.scatter(graph["pos"][:, 0], graph["pos"][:, 1], s=1, c="k", alpha=0.15)
        for i, e in enumerate(eps):
            r, colour = e["route"], colours[i % 10]
            ax.plot(r[:, 0], r[:, 1], color=colour, lw=1.2, ls="-" if e["success"] else ":")
            ax.plot(*e["start"][:2], "o", color=colour, ms=3)
            ax.plot(*e["goal"], "*", color=colour, ms=7)
        s = summarize(eps)
        ax.set_title(f"{variant}: success {s['success']:.0%}, grass {s['grass']:.0%}, "
                     f"sun {s['sun']:.0%}", fontsize=9)
        ax.set(xticks=[], yticks=[])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# =============================================================================
# Plumbing: argument checks, checkpoints, the CUDA-graph helper.
# Nothing below changes what the algorithm does.
# =============================================================================
OPTIMIZERS = ("actor_opt", "critic_opt", "value_opt")  # ReViND's, by attribute name


def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"revind.py: error: {message}")


def check_args(args: Args) -> torch.device:
    if not 0 < args.expectile < 1:
        fail(f"--expectile must be in (0, 1), got {args.expectile}")
    if min(args.max_steps, args.batch_size, args.log_interval, args.trajectories) < 1:
        fail("--max-steps, --batch-size, --log-interval and --trajectories must be positive")
    if not 1 <= args.goal_min <= args.goal_max or args.goal_min >= args.trajectory_length:
        fail(f"need 1 <= --goal-min <= --goal-max and --goal-min < --trajectory-length, got "
             f"{args.goal_min}, {args.goal_max} and {args.trajectory_length}")
    if args.eval_only and (args.resume is None or args.eval_episodes < 1):
        fail("--eval-only needs --resume CHECKPOINT and --eval-episodes >= 1")
    if args.image_height < 16 or args.image_width < 16:
        fail(f"images must be at least 16 x 16, got {args.image_height} x {args.image_width}")
    if args.resume is not None and not os.path.isfile(args.resume):
        fail(f"checkpoint {args.resume} does not exist")
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    return device


def save_checkpoint(path: str, agent: ReViND, step: int, args: Args, evals: list):
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    state = {"script": "revind.py", "agent": agent.state_dict(), "step": step, "args": asdict(args),
             "evaluations": evals, **{k: getattr(agent, k).state_dict() for k in OPTIMIZERS}}
    torch.save({**state, "rng": rng}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(path: str, agent: ReViND, device: torch.device) -> tuple:
    """Agent, optimizers and RNG from a checkpoint of this script: (step, evaluations)."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # garbage, a truncated file, ...
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    script = state.get("script") if isinstance(state, dict) else None
    if script != "revind.py":
        fail(f"{path} is {f'a checkpoint of {script}, not' if script else 'not a checkpoint'} "
             "of revind.py")
    agent.load_state_dict(state["agent"])
    for k in OPTIMIZERS:
        for group in state[k]["param_groups"]:  # capturable Adam on CUDA only (CPU Adam refuses it)
            group["capturable"] = device.type == "cuda"
        getattr(agent, k).load_state_dict(state[k])
    # Adam now holds the checkpoint's lr tensor: relink the schedule's one (with the saved value)
    agent.actor_lr.copy_(torch.as_tensor(agent.actor_opt.param_groups[0]["lr"]))
    agent.actor_opt.param_groups[0]["lr"] = agent.actor_lr
    torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved it to the device
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return state["step"], state["evaluations"]


def cuda_graph(fn, warmup: int = 3):
    """fn() (no inputs: it reads static tensors) as a CUDA graph: `warmup` eager calls on a side
    stream, then one capture, then replays; each call is one call of fn, as without the graph."""
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
