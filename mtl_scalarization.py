"""Unitary scalarization vs specialised multi-task optimisers, supervised and RL, in one file.

Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022,
arXiv:2201.04122; official code yobibyte/unitary-scalarization-dmtl. CAGrad: Liu et al., NeurIPS
2021, arXiv:2110.14048 (official code Cranial-XIX/CAGrad).

T tasks share theta_sh (giving z) and may have heads theta_t; heads get their plain gradient (RLW:
of its weighted loss). From the task gradients g_t (of theta_sh, or of z "at z"), theta_sh gets d:
    unitary   d = sum_t g_t
    RLW       d = sum_t w_t g_t, w ~ Dirichlet(1) or softmax(N(0, I)), scaled to sum_t w_t = T
    MGDA-UB   d = sum_t a_t g_t, a = argmin_{a in simplex} |sum_t a_t g_t / (L_t |g_t|)|      (at z)
    IMTL      d = sum_t a_t g_t, sum_t a_t = 1, d.g_t / |g_t| equal for all t;
              losses e^{s_t} L_t - s_t with s learnt (IMTL-L)                               (at z)
    PCGrad    g_t <- g_t - min(g_t.g_j, 0) g_j / |g_j|^2 for j in a random order; d = sum_t g_t
    GradDrop  per coordinate only the positive (prob. P) or the negative parts,
              P = (1 + sum_t g_t / sum_t |g_t|) / 2                                         (at z)
    CAGrad    d = (g0 + c |g0| g_w / |g_w|) / (1 + c^2), g0 = mean_t g_t, g_w = sum_t w_t g_t,
              w = argmin_{w in simplex} g_w.g0 + c |g0| |g_w|

Usage (benchmarks, settings and results: docs/mtl_scalarization.md):
    python mtl_scalarization.py --mtl pcgrad                          # multi-digits, 100 epochs
    python mtl_scalarization.py --dataset multi-mnist --mtl mgda-ub   # downloads MNIST once
    python mtl_scalarization.py --env cheetah-vel-dir --mtl cagrad --total-timesteps 50000
    python mtl_scalarization.py --study --seeds 5                     # every method, the table

Differences from the official code that change the algorithm:
- IMTL-G solves (U^T D) a = U^T g_1, the correct closed form (official (D^T U) a: equal for T = 2).
- Random draws from torch's generator (official: partly Python's); RLW clamps u = 0 to 2^-64.
- Multi-MNIST pairs from --data-seed, the same for every run (official: numpy's, per --random_seed).
- CAGrad (not in the paper) acts on theta_sh's gradients; RL solves for w by SLSQP (MT10 code: SGD).
- RL: HalfCheetah tasks (Meta-World needs another MuJoCo); B transitions of every task per batch;
  the temperature loss a plain mean; no target clipping; a stable tanh log-det; 200-step episodes.
"""

import contextlib
import json
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

METHODS = ("unitary", "mgda-ub", "imtl", "pcgrad", "graddrop", "rlw-dirichlet", "rlw-normal",
           "cagrad")
ACTOR_WEIGHT_DECAY = {"unitary": 3e-4, "imtl": 3e-4, "rlw-dirichlet": 3e-4, "rlw-normal": 3e-4,
                      "pcgrad": 1e-4, "graddrop": 1e-4, "mgda-ub": 0.0, "cagrad": 3e-4}


@dataclass
class Args:
    exp_name: str = "mtl_scalarization"  # a label for this experiment, saved in args.json
    mtl: str = "unitary"
    """the method: unitary, mgda-ub, imtl, pcgrad, graddrop, rlw-dirichlet, rlw-normal, cagrad"""
    dataset: str = "multi-digits"  # multi-digits (offline, sklearn's) or multi-mnist (downloaded)
    env: Optional[str] = None  # RL benchmark instead of --dataset: cheetah-vel-dir, metaworld-mt10
    seed: int = 1  # seed of python, numpy and torch (official: --random_seed 1, then 2, 3, ...)
    cagrad_c: Optional[float] = None  # CAGrad's c (default, as its code: 0.4 supervised, 0.9 RL)

    # supervised (official scripts/mnist.sh and train_multi_task.py)
    epochs: int = 100  # training epochs
    batch_size: int = 256  # training batch size
    lr: float = 1e-2  # Adam learning rate (IMTL-L's loss scales: their own Adam, the same lr)
    lr_decay: float = 0.95  # the lr is multiplied by this after every epoch (official --decay_lr)
    weight_decay: float = 0.0  # Adam's L2 penalty (official default 0)
    dropout: bool = True
    """MultiLeNet's dropout (a channel mask per batch in the encoder, a unit mask in the heads)"""
    data_seed: int = 0  # seed of the digit pairs and the split (the same data for every run)
    digits_pairs: tuple[int, int, int] = (2_500, 1_000, 2_000)
    """multi-digits' train / val / test pairs (of 1,078 / 359 / 360 images; MNIST: 50k/10k/10k)"""
    data_dir: str = "~/.cache/mtl_scalarization"  # where MNIST is downloaded and cached

    # RL: multi-task SAC (official mtrl MT10 configuration, see docs/mtl_scalarization.md)
    tasks: tuple[str, ...] = ("vel-1.0", "vel-2.0", "forward", "backward")
    """cheetah-vel-dir tasks: vel-<target m/s>, forward, backward"""
    total_timesteps: int = 100_000  # environment steps per task (one transition per task a step)
    learning_starts: int = 1500
    """uniformly random actions, and no updates, for this many steps (mtrl: num_random_steps)"""
    episode_length: int = 200  # steps per episode (HalfCheetah tasks in meta-RL use 200)
    rl_batch_size: int = 128  # transitions per task per update (mtrl MT10: 1280 for 10 tasks)
    hidden_dim: int = 400  # width of the 3 hidden layers of actor and critics (mtrl: 3 x 400)
    actor_lr: float = 3e-4  # actor learning rate
    critic_lr: float = 3e-4  # critic learning rate
    temp_lr: float = 3e-4  # temperature learning rate
    init_temperature: float = 1.0  # initial entropy temperature alpha (mtrl: 1.0)
    gamma: float = 0.99  # discount factor
    tau: float = 0.005  # Polyak rate of the target critics
    actor_weight_decay: Optional[float] = None
    """Adam's L2 on the actor (official MT10, per method: 3e-4 unitary, IMTL, RLW, CAGrad (not in
    the paper); 1e-4 PCGrad, GradDrop; 0 MGDA)"""
    eval_interval: int = 10_000  # environment steps between evaluations; 0 = only at the end
    eval_episodes: int = 2  # deterministic episodes per task per evaluation

    # the study
    study: bool = False  # run every method in --methods over --seeds seeds, print the table
    methods: tuple[str, ...] = METHODS  # methods of the study
    seeds: int = 5  # seeds per method in the study (seed, seed + 1, ...)
    workers: int = 1  # runs of the study in parallel (one process each, torch threads divided)

    log_interval: int = 1  # epochs (supervised) or 1,000s of steps (RL) between logged losses
    device: str = "auto"  # 'auto' (cuda if available), 'cpu' or 'cuda'
    track: bool = False  # log to Weights & Biases
    wandb_project_name: str = "rl-reference"  # W&B project
    save_model: bool = False  # write checkpoint.pt every epoch or evaluation (RL) and at the end
    resume: Optional[str] = None  # continue from a checkpoint.pt (outputs: its folder or --run-dir)
    run_dir: Optional[str] = None
    """output folder (default: runs/{benchmark}__{mtl}__{seed}__{time}); must not exist"""


# ----------------------------------------------------------------------------- networks
class MultiLeNet(nn.Module):
    """The official MultiLeNet: a shared LeNet encoder z = relu(fc(conv(x))) in R^50, then per task
    log softmax(fc2(relu(fc1(z)))). Dropout as official: one Bernoulli(1/2) mask per channel of
    conv2, shared by the batch, and one per unit of fc1's output, neither rescaled by 1/(1-p)."""

    def __init__(self, num_tasks: int, dropout: bool = True):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
        self.fc = nn.Linear(320, 50)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10))
                                   for _ in range(num_tasks))
        self.dropout = dropout

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(F.max_pool2d(self.conv1(x), 2)))
        if self.training and self.dropout:
            h = h * torch.bernoulli(torch.full((1, h.shape[1], 1, 1), 0.5, device=h.device))
        return F.relu(self.fc(F.relu(F.max_pool2d(h, 2)).flatten(1)))

    def head(self, t: int, z: torch.Tensor) -> torch.Tensor:
        fc1, _, fc2 = self.heads[t]
        h = F.relu(fc1(z))
        if self.training and self.dropout:
            h = h * torch.bernoulli(torch.full_like(h, 0.5))
        return F.log_softmax(fc2(h), dim=-1)

    def shared_parameters(self) -> list:
        return [*self.conv1.parameters(), *self.conv2.parameters(), *self.fc.parameters()]


def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    """3 hidden ReLU layers; Xavier-uniform weights and zero biases (mtrl's init)."""
    dims = [inp] + [hidden] * 3
    net = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())],
                        nn.Linear(hidden, out))
    for layer in net[::2]:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return net


class Critics(nn.Module):
    """Twin Q(s, a) as one module."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs, act) -> torch.Tensor:
        x = torch.cat([obs, act], -1)
        return torch.stack([self.q1(x), self.q2(x)]).squeeze(-1)


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(mu(s), sigma(s)); log sigma squashed into [-20, 2] by tanh (as mtrl)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs).chunk(2, -1)[0])  # the deterministic (evaluation) action

    def sample(self, obs: torch.Tensor) -> tuple:
        mu, log_std = self.net(obs).chunk(2, -1)
        log_std = -20 + 0.5 * (2 + 20) * (torch.tanh(log_std) + 1)
        u = mu + log_std.exp() * torch.randn_like(mu)
        normal = -0.5 * ((u - mu) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
        log_prob = normal.sum(-1) - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh's
        return torch.tanh(u), log_prob


# ----------------------------------------------------------------------------- the methods
def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """a = argmin_{a in simplex} |sum_t a_t g_t|^2 from the Gram matrix G_ij = g_i.g_j by the
    official MinNormSolver (Sener & Koltun's): the best pair in closed form, then <= 250 projected
    gradient steps, exact line search, until a moves by < 1e-5 (L1); float64 numpy, as official."""
    M = gram.detach().double().cpu().numpy()
    T = M.shape[0]

    def pair(v11, v12, v22) -> tuple:  # min_c |c x1 + (1 - c) x2|^2, c in [0.001, 0.999] (official)
        if v12 >= v11:
            return 0.999, v11
        if v12 >= v22:
            return 0.001, v22
        c = (v22 - v12) / (v11 + v22 - 2 * v12)
        return c, v22 + c * (v12 - v22)

    pairs = ((i, j) + pair(M[i, i], M[i, j], M[j, j]) for i in range(T) for j in range(i + 1, T))
    best = min(pairs, key=lambda s: s[3])
    a = np.zeros(T)
    a[best[0]], a[best[1]] = best[2], 1 - best[2]
    for _ in range(250 if T > 2 else 0):
        g = -(M @ a)
        g = g - g.mean()  # the descent direction, projected on sum(a) = const
        t1, t2 = -a[g < 0] / g[g < 0], (1 - a[g > 0]) / g[g > 0]  # steps to the simplex's faces
        t = t1[t1 > 1e-7].min() if (t1 > 1e-7).any() else 1.0
        t = min(t, t2[t2 > 1e-7].min()) if (t2 > 1e-7).any() else t
        y = a + t * g  # projected on the simplex (sort-based, as the official _projection2simplex)
        s = np.sort(y)[::-1]
        cssv = (np.cumsum(s) - 1) / np.arange(1, T + 1)
        above = np.nonzero(cssv[:-1] > s[1:])[0]
        new = np.maximum(y - (cssv[above[0]] if len(above) else (y.sum() - 1) / T), 0)
        c, _ = pair(a @ M @ a, a @ M @ new, new @ M @ new)
        step = c * a + (1 - c) * new
        if np.abs(step - a).sum() < 1e-5:
            break
        a = step
    return torch.as_tensor(a).to(gram)


def mgda_ub(G: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """MGDA-UB weights: min-norm point of the "loss+"-normalised gradients g_t / (L_t |g_t|)."""
    norm = losses.detach()[:, None] * G.norm(dim=1, keepdim=True)
    Gn = torch.where(norm > 0, G / norm, G)
    return min_norm_weights(Gn @ Gn.T)


def imtl_g(G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IMTL-G weights a (sum 1): d = sum_t a_t g_t projects equally on every u_t = g_t/|g_t|. With
    d = g_1 - D^T a_{2:T} (rows of D: g_1 - g_t) and rows of U: u_1 - u_t, U d = 0 gives
    (U D^T) a_{2:T} = U g_1 (the official code inverts its transpose; eps I as official)."""
    u = G / G.norm(dim=1, keepdim=True)
    D, U = G[:1] - G[1:], u[:1] - u[1:]
    eye = torch.eye(len(D), dtype=G.dtype, device=G.device)
    a = torch.linalg.solve(U @ D.T + eps * eye, U @ G[0])
    a = torch.cat([1 - a.sum(0, keepdim=True), a])
    return torch.nan_to_num(a, nan=0.0) * a.isfinite().all()  # a zero gradient: official a = 0


def pcgrad(G: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad: each g_i, in the random order order[i], loses its component along every original g_j
    it conflicts with (g_i.g_j < 0); the direction is the sum of the projected gradients."""
    out = G.clone()
    for i in range(len(G)):
        for j in order[i].tolist():
            if j != i:
                out[i] -= (out[i] @ G[j]).clamp(max=0) / G[j].pow(2).sum().clamp(min=1e-30) * G[j]
    return out.sum(0)


def graddrop(grads: torch.Tensor, signed: torch.Tensor, u: torch.Tensor, eps=1e-7) -> torch.Tensor:
    """GradDrop (leak 0, k = 1): with sign purity P = (1 + sum_t s_t / sum_t |s_t|) / 2 per
    coordinate (s_t: `signed`, (T, K)) and one uniform u per coordinate, task t keeps it if s_t > 0
    and P >= u, or s_t < 0 and P < u. grads (T, ..., K): masked, summed, rescaled to |sum_t g_t|."""
    P = 0.5 + signed.sum(0) / (2 * signed.abs().sum(0) + eps)
    keep_positive = (P >= u).float() - 0.5
    keep = (torch.sign(signed) * keep_positive >= 0).float()  # (T, K); a zero s_t is kept (it is 0)
    shape = (len(grads),) + (1,) * (grads.dim() - 2) + (grads.shape[-1],)
    d = (grads * keep.view(shape)).sum(0)
    return d * grads.sum(0).norm() / (d.norm() + eps)


def cagrad(G: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad: d = (g0 + c |g0| g_w / |g_w|) / (1 + c^2), g0 the mean gradient, g_w = sum_t w_t g_t,
    w = argmin_{w in simplex} w^T G G^T 1/T + c |g0| sqrt(w^T G G^T w) (SLSQP, as CAGrad's code)."""
    from scipy.optimize import minimize
    T = len(G)
    A = (G @ G.T).double().cpu().numpy()
    g0_norm = math.sqrt(A.mean() + 1e-8)
    b, scale = np.full(T, 1.0 / T), c * g0_norm + 1e-8
    res = minimize(lambda w: w @ A @ b + scale * math.sqrt(w @ A @ w + 1e-8), b,
                   bounds=[(0, 1)] * T, constraints={"type": "eq", "fun": lambda w: 1 - w.sum()})
    gw = torch.as_tensor(res.x, dtype=G.dtype, device=G.device) @ G
    return (G.mean(0) + scale / (gw.norm() + 1e-8) * gw) / (1 + c ** 2)


def rlw_weights(method: str, T: int, device) -> torch.Tensor:
    """Random loss weights summing to T: Dirichlet(1) (normalised Exp(1)) or softmax(N(0, I))."""
    w = (-torch.rand(T, device=device).clamp(min=2 ** -64).log() if method == "rlw-dirichlet"
         else F.softmax(torch.randn(T, device=device), 0))  # torch.rand can return 0
    return w * T / w.sum()


def imtl_scales(T: int, lr: float, device) -> dict:
    """IMTL-L's log loss scales s (from 0) and their Adam (the model's initial lr, as official)."""
    s = torch.zeros(T, device=device, requires_grad=True)
    return {"s": s, "s_opt": torch.optim.Adam([s], lr=lr)}


# ----------------------------------------------------------------------------- where they apply
def mtl_backward(method: str, losses: torch.Tensor, shared: list, heads: list,
                 z: Optional[torch.Tensor], state: dict, cagrad_c: float) -> dict:
    """Sets .grad of `shared` to the method's direction from the T task losses (the "at z" methods
    from dL_t/dz), of `heads` to their plain gradient; returns the task weights, where there are
    some. z None (RL): on theta_sh's gradients, as the official RL code: MGDA on l2-normalised
    gradients, unitary and PCGrad as means over tasks. `state`: IMTL-L's scales (supervised)."""
    T, rl = losses.shape[0], z is None
    if method == "imtl" and "s" in state:  # IMTL-L: e^{s_t} L_t - s_t, s learnt by their sum
        losses = state["s"].exp() * losses - state["s"]
        heads = heads + [state["s"]]
    if method == "unitary" or method.startswith("rlw"):
        dev = losses.device
        w = torch.ones(T, device=dev) if method == "unitary" else rlw_weights(method, T, dev)
        w = w / T if rl and method == "unitary" else w  # official RL: the batch mean
        assign(shared + heads, torch.autograd.grad((w * losses).sum(), shared + heads))
        return {"weights": w}
    at_z = z is not None and method in ("mgda-ub", "imtl", "graddrop")
    wrt = [z] if at_z else shared
    # G (T, N): the task gradients of z (batch x features, flattened) or of theta_sh
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        losses[t], wrt, retain_graph=True, materialize_grads=True)]) for t in range(T)])
    logs = {}
    if method == "mgda-ub" and rl:  # plain MGDA on g_t / |g_t|; the direction from those too
        G = G / G.norm(dim=1, keepdim=True).clamp(min=1e-12)
        a = min_norm_weights(G @ G.T)
        d, logs["weights"] = a @ G, a
    elif method in ("mgda-ub", "imtl"):
        a = mgda_ub(G, losses) if method == "mgda-ub" else imtl_g(G)
        d, logs["weights"] = a @ G, a
    elif method == "graddrop" and at_z:  # s_t: dL_t/dz sign(z) summed over the batch (official)
        sign_z = z.detach() / (z.detach().abs() <= 1e-7).float().add(z.detach()).abs()
        Gz = G.view(T, *z.shape)
        d = graddrop(Gz, (Gz * sign_z).sum(1), torch.rand(z.shape[-1], device=z.device)).flatten()
    elif method == "graddrop":
        d = graddrop(G, G, torch.rand(G.shape[1], device=G.device))
    elif method == "pcgrad":
        d = pcgrad(G, torch.rand(T, T, device=G.device).argsort(1)) / (T if rl else 1)
    else:  # CAGrad; supervised: times T "to match the sum loss" (its code)
        d = cagrad(G, cagrad_c) * (1 if rl else T)
    if at_z:  # back through the encoder with dL/dz := d, as backward of sum_t a_t L_t does
        assign(shared, torch.autograd.grad(z, shared, grad_outputs=d.view_as(z), retain_graph=True))
    else:
        assign(shared, d.split([p.numel() for p in shared]))
    if heads:
        assign(heads, torch.autograd.grad(losses.sum(), heads, allow_unused=True))
    return logs


def assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.view_as(p).detach()  # from autograd.grad or a slice of d


# ----------------------------------------------------------------------------- supervised
def supervised_step(model: MultiLeNet, opt, images, labels, args: Args, state: dict) -> dict:
    """One step: the T task losses (mean NLL of the batch), the method's backward, one Adam step."""
    z = model.encode(images)
    T = labels.shape[1]
    losses = torch.stack([F.nll_loss(model.head(t, z), labels[:, t]) for t in range(T)])
    opt.zero_grad(set_to_none=True)
    logs = mtl_backward(args.mtl, losses, model.shared_parameters(), list(model.heads.parameters()),
                        z, state, args.cagrad_c)
    opt.step()
    if "s_opt" in state:  # IMTL-L's scales: their own Adam
        state["s_opt"].step()
        state["s_opt"].zero_grad()
    return {"losses": losses.detach(), **logs}


@torch.no_grad()
def accuracy(model: MultiLeNet, images, labels, batch: int = 1000) -> torch.Tensor:
    """Per-task accuracy (T,) in eval mode (no dropout)."""
    model.eval()
    correct = sum((torch.stack([model.head(t, z).argmax(-1) for t in range(labels.shape[1])], 1)
                   == y).sum(0) for x, y in zip(images.split(batch), labels.split(batch))
                  for z in [model.encode(x)])
    model.train()
    return correct / len(labels)


def load_supervised(args: Args, device: torch.device) -> dict:
    """{split: (images (N, 1, 28, 28) normalised as official, labels (N, 2))}, on the device."""
    g = torch.Generator().manual_seed(args.data_seed)
    if args.dataset == "multi-mnist":
        train_x, train_y, test_x, test_y = load_mnist(os.path.expanduser(args.data_dir))
        n = len(train_y) * 5 // 6  # the first 50,000 images train, the last 10,000 validate
        pools = {"train": (train_x[:n], train_y[:n]), "validation": (train_x[n:], train_y[n:]),
                 "test": (test_x, test_y)}
        sizes = {k: len(v[1]) for k, v in pools.items()}
    else:
        from sklearn.datasets import load_digits
        digits = load_digits()  # 1,797 8x8 images in 0..16, scaled to MNIST's 0..255 and 28x28
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] * (255 / 16)
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(labels), generator=g)  # split by source image: 60% / 20% / 20%
        cut = [0, int(0.6 * len(order)), int(0.8 * len(order)), len(order)]
        pools = {k: (images[order[a:b]], labels[order[a:b]])
                 for k, a, b in zip(("train", "validation", "test"), cut, cut[1:])}
        sizes = dict(zip(("train", "validation", "test"), args.digits_pairs))
    data = {}
    for split, (x, y) in pools.items():
        left = torch.arange(sizes[split]) % len(y)  # every source image on the left in turn
        right = torch.randint(len(y), (sizes[split],), generator=g)  # a random one of the split
        images = overlay(x[left].float(), x[right].float())
        data[split] = (((images / 255 - 0.1307) / 0.3081)[:, None].to(device),
                       torch.stack([y[left], y[right]], 1).long().to(device))
    return data


def overlay(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Left digit at [0:28, 0:28], right digit at [6:34, 6:34] of a 36x36 canvas, pixel max where
    they overlap, resized to 28x28 by nearest neighbour (PIL's NEAREST, as official)."""
    canvas = torch.zeros(len(left), 36, 36)
    canvas[:, :28, :28] = left
    canvas[:, 6:34, 6:34] = torch.maximum(canvas[:, 6:34, 6:34], right)
    return F.interpolate(canvas[:, None], size=(28, 28), mode="nearest-exact")[:, 0]


# ----------------------------------------------------------------------------- RL: multi-task SAC
class MultiTaskSAC(nn.Module):
    """SAC with one actor and one twin critic shared by every task (the task is a one-hot in s)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.gamma, self.tau, self.target_entropy = args.gamma, args.tau, -float(act_dim)
        self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim)
        self.critic = Critics(obs_dim, act_dim, args.hidden_dim)
        self.critic_target = Critics(obs_dim, act_dim, args.hidden_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        wd = args.actor_weight_decay
        wd = ACTOR_WEIGHT_DECAY[args.mtl] if wd is None else wd
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), args.actor_lr, weight_decay=wd)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
        self.temp_opt = torch.optim.Adam([self.log_alpha], lr=args.temp_lr)

    def update(self, obs, act, rew, mask, next_obs, args: Args) -> dict:
        """One update on a (T, B, ...) batch: the per-task critic losses through the method, then
        the per-task actor losses through the method, then the temperature and the Polyak step."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_act, next_log_prob = self.actor.sample(next_obs)
            next_q = self.critic_target(next_obs, next_act).min(0).values - alpha * next_log_prob
            target = rew + self.gamma * mask * next_q
        critic_losses = (self.critic(obs, act) - target).pow(2).mean(-1).sum(0)  # (T,), twins add
        self.critic_opt.zero_grad(set_to_none=True)
        mtl_backward(args.mtl, critic_losses, list(self.critic.parameters()), [], None, {},
                     args.cagrad_c)
        self.critic_opt.step()
        new_act, log_prob = self.actor.sample(obs)
        actor_losses = (alpha * log_prob - self.critic(obs, new_act).min(0).values).mean(-1)  # (T,)
        self.actor_opt.zero_grad(set_to_none=True)
        mtl_backward(args.mtl, actor_losses, list(self.actor.parameters()), [], None, {},
                     args.cagrad_c)
        self.actor_opt.step()
        temp_loss = self.log_alpha.exp() * (-log_prob.detach() - self.target_entropy).mean()
        self.temp_opt.zero_grad()
        temp_loss.backward()
        self.temp_opt.step()
        with torch.no_grad():
            targets, online = list(self.critic_target.parameters()), list(self.critic.parameters())
            torch._foreach_lerp_(targets, online, self.tau)
        return {"losses/critic_loss": critic_losses.detach().mean(),
                "losses/actor_loss": actor_losses.detach().mean(),
                "losses/temperature_loss": temp_loss.detach(), "values/alpha": alpha}


class CheetahTask:
    """HalfCheetah-v5 with a task reward from its forward velocity v: vel-<v_goal> -|v - v_goal| -
    0.05 |a|^2, forward / backward d v - 0.05 |a|^2 (d = +-1); observations end with a one-hot."""

    def __init__(self, name: str, t: int, args: Args):
        import gymnasium as gym
        self.velocity = name.startswith("vel-")
        if not self.velocity and name not in ("forward", "backward"):
            fail(f"unknown task '{name}'; cheetah-vel-dir tasks: vel-<m/s>, forward and backward")
        try:
            self.target = float(name[4:]) if self.velocity else 1.0 if name == "forward" else -1.0
        except ValueError:
            fail(f"bad task '{name}': write vel-<m/s>, e.g. vel-1.5")
        self.env = gym.make("HalfCheetah-v5", max_episode_steps=args.episode_length)
        self.one_hot = np.eye(len(args.tasks), dtype=np.float32)[t]
        self.obs_dim = self.env.observation_space.shape[0] + len(args.tasks)
        self.act_dim = self.env.action_space.shape[0]

    def reset(self, seed=None):
        obs, info = self.env.reset(seed=seed)
        return np.concatenate([obs, self.one_hot]), info

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        v, ctrl = info["x_velocity"], 0.05 * float(np.square(action).sum())
        reward = -abs(v - self.target) - ctrl if self.velocity else self.target * v - ctrl
        return np.concatenate([obs, self.one_hot]), reward, terminated, truncated, info


class MultiTaskReplay:
    """Per task, transitions [s, a, r, m, s'] as rows of one (T, capacity, .) device tensor (tasks
    are stepped together: one write position). Rewards are divided, when sampled, by their task's
    running std over every reward it ever added (mtrl's buffer reward normalisation)."""

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.dims = capacity, (obs_dim, act_dim, 1, 1, obs_dim)
        self.rows = torch.zeros(num_tasks, capacity, sum(self.dims), device=device)
        self.moments = np.zeros((num_tasks, 3))  # count, mean r, mean r^2 (float64)
        self.std = torch.ones(num_tasks, 1, device=device)
        self.ptr, self.size = 0, 0

    def add(self, t: int, obs, act, rew, mask, next_obs):
        row = np.concatenate([obs, act, [rew], [mask], next_obs]).astype(np.float32)
        self.rows[t, self.ptr].copy_(torch.from_numpy(row))
        n, m1, m2 = self.moments[t]
        self.moments[t] = (n + 1, m1 + (rew - m1) / (n + 1), m2 + (rew * rew - m2) / (n + 1))
        if t == len(self.rows) - 1:  # every task added this step's transition
            self.ptr = (self.ptr + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)
            self.refresh_std()

    def refresh_std(self):
        """std_t = sqrt(E[r^2] - E[r]^2 + 1e-8) per task, as mtrl (no centring of the rewards)."""
        var = self.moments[:, 2] - self.moments[:, 1] ** 2
        self.std.copy_(torch.from_numpy(np.sqrt(np.maximum(var, 0) + 1e-8)[:, None]))

    def sample(self, n: int) -> tuple:
        """(s, a, r / std, m, s') of n uniform draws per task, each (T, n, .)."""
        idx = torch.randint(0, self.size, (len(self.rows), n), device=self.rows.device)
        rows = self.rows.gather(1, idx[..., None].expand(-1, -1, self.rows.shape[-1]))
        obs, act, rew, mask, next_obs = rows.split(self.dims, dim=-1)
        return obs, act, rew.squeeze(-1) / self.std, mask.squeeze(-1), next_obs

    def state_dict(self) -> dict:
        return {"rows": self.rows[:, :self.size].cpu(), "ptr": self.ptr,
                "moments": self.moments.copy()}

    def load_state_dict(self, state: dict):
        self.size = state["rows"].shape[1]
        self.rows[:, :self.size] = state["rows"].to(self.rows.device)
        self.ptr, self.moments = state["ptr"], state["moments"]
        self.refresh_std()


@torch.no_grad()
def evaluate(actor: TanhGaussianActor, envs: list, episodes: int, device, seed: int) -> np.ndarray:
    """(T,) mean returns of the deterministic policy tanh(mu(s)) in every task."""
    returns = np.zeros((len(envs), episodes))
    for t, env in enumerate(envs):
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + 1000 * t if i == 0 else None)
            done = False
            while not done:
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)
                obs, reward, terminated, truncated, _ = env.step(actor(s[None])[0].cpu().numpy())
                returns[t, i] += reward
                done = terminated or truncated
    return returns.mean(1)


# ----------------------------------------------------------------------------- the training loops
def main(args: Args) -> dict:
    """One run: the supervised benchmark (--dataset), or multi-task SAC (--env)."""
    return train_rl(args) if args.env else train_supervised(args)


def train_supervised(args: Args) -> dict:
    device, ckpt, run_dir = setup(args)
    data = load_supervised(args, device)  # {split: (images (N, 1, 28, 28), labels (N, T))}
    x, y = data["train"]
    T = y.shape[1]
    model = MultiLeNet(T, args.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state = imtl_scales(T, args.lr, device) if args.mtl == "imtl" else {}
    run = Run(run_dir, args, device)
    saved = {"model": model, "opt": opt, **state}  # what a checkpoint holds
    for epoch in range(load_checkpoint(ckpt, run, saved), args.epochs):
        for group in opt.param_groups:  # ExponentialLR stepped after each epoch
            group["lr"] = args.lr * args.lr_decay ** epoch
        for idx in torch.randperm(len(y), device=device).split(args.batch_size):
            info = supervised_step(model, opt, x[idx], y[idx], args, state)
            run.updated()
        with run.untimed():  # test accuracy at the best mean validation accuracy (>=, as official)
            val = accuracy(model, *data["validation"])
            if val.mean().item() >= run.best.get("validation", -1.0):
                run.best = {"validation": val.mean().item(), "epoch": epoch + 1,
                            "test": accuracy(model, *data["test"]).tolist()}
        if (epoch + 1) % args.log_interval == 0 or epoch + 1 == args.epochs:
            losses, weights = info["losses"].tolist(), info.get("weights", torch.ones(T)).tolist()
            run.log(epoch + 1, {**{f"losses/task_{t}": v for t, v in enumerate(losses)},
                                **{f"weights/task_{t}": v for t, v in enumerate(weights)},
                                **{f"val/accuracy_task_{t}": v for t, v in enumerate(val.tolist())},
                                "val/accuracy": val.mean().item()})
        if args.save_model:
            save_checkpoint(run, epoch + 1, saved)
    test = run.best["test"]
    return run.finish({f"test/accuracy_task_{t}": a for t, a in enumerate(test)} |
                      {"test/accuracy": float(np.mean(test)), "best_epoch": run.best["epoch"]})


def train_rl(args: Args) -> dict:
    device, ckpt, run_dir = setup(args)
    envs = [CheetahTask(name, t, args) for t, name in enumerate(args.tasks)]
    eval_envs = [CheetahTask(name, t, args) for t, name in enumerate(args.tasks)]
    T, obs_dim, act_dim = len(envs), envs[0].obs_dim, envs[0].act_dim
    agent = MultiTaskSAC(obs_dim, act_dim, args).to(device)
    buffer = MultiTaskReplay(T, args.total_timesteps, obs_dim, act_dim, device)
    saved = {"agent": agent, "actor_opt": agent.actor_opt, "critic_opt": agent.critic_opt,
             "temp_opt": agent.temp_opt, "buffer": buffer}  # what a checkpoint holds
    run = Run(run_dir, args, device)
    start = load_checkpoint(ckpt, run, saved)
    obs = np.stack([env.reset(seed=args.seed + 1000 * t + start)[0] for t, env in enumerate(envs)])
    info = None
    for step in range(start + 1, args.total_timesteps + 1):
        if step <= args.learning_starts:  # uniformly random actions (numpy's seeded, saved RNG)
            actions = np.random.uniform(-1, 1, (T, act_dim))
        else:  # a ~ pi(.|s)
            with torch.no_grad():
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)
                actions = agent.actor.sample(s)[0].cpu().numpy()
        for t, env in enumerate(envs):
            next_obs, reward, terminated, truncated, _ = env.step(actions[t])
            mask = 1.0 - terminated  # a time limit is no terminal
            buffer.add(t, obs[t], actions[t], reward, mask, next_obs)
            run.episode_returns[t] += reward
            if terminated or truncated:
                run.writer.add_scalar(f"charts/episodic_return_{args.tasks[t]}",
                                      run.episode_returns[t], step)
                run.episode_returns[t] = 0.0
            obs[t] = env.reset()[0] if terminated or truncated else next_obs
        if step >= args.learning_starts:  # one update a step; learning_starts in a row first (mtrl)
            for _ in range(args.learning_starts if step == args.learning_starts else 1):
                info = agent.update(*buffer.sample(args.rl_batch_size), args)
                run.updated()
        last = step == args.total_timesteps
        if info is not None and (step % (1000 * args.log_interval) == 0 or last):
            run.log(step, {k: v.item() for k, v in info.items()})
        due = args.eval_interval > 0 and step % args.eval_interval == 0
        if args.eval_episodes > 0 and (last or due):
            with run.untimed():
                means = evaluate(agent.actor, eval_envs, args.eval_episodes, device,
                                 args.seed + 10_000 + step)
            run.evals.append((step, means.tolist()))
            for name, r in zip(args.tasks, means):
                run.writer.add_scalar(f"eval/return_{name}", r, step)
            run.writer.add_scalar("eval/return", means.mean(), step)
            with open(os.path.join(run.dir, "evaluations.csv"), "w") as f:
                f.write("step," + ",".join(args.tasks) + ",mean\n")
                f.writelines(f"{s}," + ",".join(f"{r:.2f}" for r in rs) + f",{np.mean(rs):.2f}\n"
                             for s, rs in run.evals)
            print(f"step={step} eval/return={means.mean():.1f} " +
                  " ".join(f"{n}={r:.1f}" for n, r in zip(args.tasks, means)), flush=True)
            if args.save_model:
                save_checkpoint(run, step, saved)
    for env in envs + eval_envs:
        env.env.close()
    final = run.evals[-1][1] if run.evals else []
    return run.finish({f"eval/return_{name}": r for name, r in zip(args.tasks, final)} |
                      ({"eval/return": float(np.mean(final))} if len(final) else {}))


# ----------------------------------------------------------------------------- the study
def study(args: Args) -> dict:
    """Runs args.methods x args.seeds (one process each, args.workers at a time), then writes and
    prints study_table. In an existing study folder, finished runs (results.json) are read back."""
    import concurrent.futures
    import multiprocessing
    for m in args.methods:
        if m not in METHODS:
            fail(f"unknown method '{m}' in --methods; choose from {', '.join(METHODS)}")
    folder = args.run_dir or f"runs/study__{args.env or args.dataset}__{int(time.time())}"
    os.makedirs(folder, exist_ok=True)
    jobs = [replace(args, mtl=m, seed=s, study=False, run_dir=os.path.join(folder, f"{m}__{s}"),
                    save_model=False)
            for m in args.methods for s in range(args.seed, args.seed + args.seeds)]
    todo = [j for j in jobs if not os.path.exists(os.path.join(j.run_dir, "results.json"))]
    stale = [j.run_dir for j in todo if os.path.exists(j.run_dir)]
    if stale:
        fail(f"{stale[0]} exists without results.json (an interrupted run); remove it to rerun it")
    threads = max(1, torch.get_num_threads() // args.workers)
    print(f"study in {folder}: {len(jobs)} runs, {len(jobs) - len(todo)} already done, "
          f"{args.workers} at a time")
    spawn = multiprocessing.get_context("spawn")  # a fresh process per run: its own peak memory
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn,
                                                max_tasks_per_child=1) as pool:
        for j, _ in zip(todo, pool.map(study_run, todo, [threads] * len(todo))):
            print(f"done: {j.mtl} seed {j.seed}", flush=True)
    results = [json.load(open(os.path.join(j.run_dir, "results.json"))) for j in jobs]
    table = study_table(args, results)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot_study(args, results, os.path.join(folder, "study.png"))
    return {"folder": folder, "table": table, "runs": results}


def study_run(args: Args, threads: int):
    torch.set_num_threads(threads)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        main(args)


def study_table(args: Args, results: list) -> str:
    """The markdown table: per method, task metrics and their average (mean +- 95% CI), the
    average minus unitary's paired by seed (same data and initial network), the cost."""
    names = list(args.tasks) if args.env else ["left", "right"]
    key = "eval/return_{}" if args.env else "test/accuracy_task_{}"
    average, scale = ("eval/return", 1.0) if args.env else ("test/accuracy", 100.0)  # in %
    by_method = {m: sorted([r for r in results if r["mtl"] == m], key=lambda r: r["seed"])
                 for m in args.methods}
    cost = {m: (np.mean([r["seconds_per_update"] for r in rs]),
                np.mean([r["peak_memory_mb"] for r in rs])) for m, rs in by_method.items()}
    base = cost.get("unitary", (float("nan"), float("nan")))
    unitary = {r["seed"]: r.get(average, math.nan) * scale for r in by_method.get("unitary", [])}
    header = ["method", *names, "average", "average - unitary (paired)", "time / update", "memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, rs in by_method.items():
        cols = [m]
        for k in [key.format(name if args.env else i) for i, name in enumerate(names)] + [average]:
            v = np.array([r.get(k, math.nan) for r in rs]) * scale  # NaN: a run without evaluation
            cols.append(f"{v.mean():.2f} +- {ci95(v):.2f}")
        diff = np.array([r.get(average, math.nan) * scale - unitary[r["seed"]] for r in rs
                         if r["seed"] in unitary])
        cols.append("" if m == "unitary" or len(diff) == 0 else
                    f"{diff.mean():+.2f} +- {ci95(diff):.2f}")
        memory = f"{cost[m][1]:.0f} MiB"
        cols += [f"{cost[m][0] / base[0]:.2f}x ({1000 * cost[m][0]:.1f} ms)",
                 f"{cost[m][1] / base[1]:.2f}x ({memory})" if base[1] > 0 else memory]
        lines.append("| " + " | ".join(cols) + " |")
    seeds = sorted({r["seed"] for r in results})
    return "\n".join(lines) + (f"\n\n{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}); +- is the 95% CI "
                               "of the mean (Student t); time and memory are means over the runs.")


def ci95(v: np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t with n - 1 dof)."""
    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
            9: 2.262, 10: 2.228}
    n = len(v)
    return float(t975.get(n - 1, 1.96) * v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def plot_study(args: Args, results: list, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no study.png (pip install matplotlib)")
        return
    key, scale = ("eval/return", 1.0) if args.env else ("test/accuracy", 100.0)
    vals = [np.array([r.get(key, math.nan) for r in results if r["mtl"] == m]) * scale
            for m in args.methods]
    if not all(np.isfinite(v).all() for v in vals):
        print("runs without evaluations: no study.png")
        return
    fig, ax = plt.subplots(figsize=(1.1 * len(vals) + 2, 3.2))
    ax.bar(range(len(vals)), [v.mean() for v in vals], yerr=[ci95(v) for v in vals], capsize=4,
           color="tab:blue")
    for i, v in enumerate(vals):
        ax.scatter(np.full(len(v), i), v, color="k", s=8, zorder=3)
    lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    ax.set_xticks(range(len(vals)), args.methods, rotation=30)
    ax.set_ylabel("mean return over tasks" if args.env else "mean test accuracy (%)")
    ax.set_title(f"{args.env or args.dataset}: {len(vals[0])} seeds, 95% CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ============================================================================= Plumbing
# Below: input checks and the run folder, logging, the MNIST download, checkpoints.
def fail(message: str):
    """Bad input: one clear sentence on stderr and exit status 1."""
    raise SystemExit(f"mtl_scalarization.py: error: {message}")


def setup(args: Args) -> tuple:
    """Checks the input, fills --cagrad-c, reads --resume's checkpoint, seeds python, numpy and
    torch; returns (device, checkpoint or None, run folder)."""
    if args.mtl not in METHODS:
        fail(f"unknown method '{args.mtl}'; choose from {', '.join(METHODS)}")
    if args.env is None and args.dataset not in ("multi-digits", "multi-mnist"):
        fail(f"unknown dataset '{args.dataset}'; choose multi-digits or multi-mnist")
    if args.env == "metaworld-mt10":
        fail("metaworld-mt10 does not run with this project's MuJoCo: metaworld 3.1.1 pins mujoco "
             "3.3.0, and on mujoco 4.0.0 its Sawyer envs fail while building (see docs/"
             "mtl_scalarization.md); use --env cheetah-vel-dir")
    if args.env not in (None, "cheetah-vel-dir"):
        fail(f"unknown env '{args.env}'; choose cheetah-vel-dir or metaworld-mt10")
    if min(args.epochs, args.batch_size, args.total_timesteps, args.rl_batch_size,
           args.log_interval) < 1:
        fail("--epochs, --batch-size, --total-timesteps, --rl-batch-size and --log-interval "
             "must be positive")
    if args.env and len(args.tasks) < 2:
        fail("multi-task learning needs at least two --tasks")
    args.cagrad_c = (0.9 if args.env else 0.4) if args.cagrad_c is None else args.cagrad_c
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available")
    ckpt = None
    if args.resume is not None:
        if not os.path.isfile(args.resume):
            fail(f"checkpoint {args.resume} does not exist")
        try:
            ckpt = torch.load(args.resume, map_location=device, weights_only=False)
        except Exception as e:
            fail(f"{args.resume} is not a readable checkpoint ({type(e).__name__})")
        if not isinstance(ckpt, dict) or "script" not in ckpt:
            fail(f"{args.resume} is not a checkpoint of mtl_scalarization.py")
        if ckpt["script"] != "mtl_scalarization.py":
            fail(f"{args.resume} is a checkpoint of {ckpt['script']}, not of mtl_scalarization.py")
        free = ("resume", "run_dir", "epochs", "total_timesteps", "save_model")
        changed = [k for k, v in ckpt["args"].items() if k not in free and
                   getattr(args, k) != (tuple(v) if isinstance(v, list) else v)]
        if changed:
            fail(f"--resume: the checkpoint was written with other settings ({', '.join(changed)})")
    name = f"runs/{args.env or args.dataset}__{args.mtl}__{args.seed}__{int(time.time())}"
    run_dir = args.run_dir or (os.path.dirname(os.path.abspath(args.resume)) if ckpt else name)
    if os.path.exists(run_dir) and not (
            ckpt and os.path.samefile(run_dir, os.path.dirname(args.resume) or ".")):
        fail(f"run folder {run_dir} already exists; choose another --run-dir (runs are never "
             "overwritten)")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return device, ckpt, run_dir


class Run:
    """A run's outputs (args.json, TensorBoard, W&B with --track, stdout, results.json), records a
    checkpoint keeps, the time per update (from the 20th on, evaluations excluded), peak memory."""

    def __init__(self, run_dir: str, args: Args, device: torch.device):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        self.writer = SummaryWriter(run_dir)
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, config=vars(args),
                       name=os.path.basename(run_dir), dir=run_dir, sync_tensorboard=True)
        self.dir, self.args, self.cuda = run_dir, args, device.type == "cuda"
        self.metrics = {"mtl": args.mtl, "seed": args.seed}  # results.json
        self.evals, self.best, self.updates, self.t0, self.t_eval = [], {}, 0, None, 0.0
        self.episode_returns = np.zeros(len(args.tasks)) if args.env else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.memory0 = 0.0 if self.cuda else self.peak_memory()

    def peak_memory(self) -> float:  # MiB; CPU: the process's peak resident memory (a stand-in)
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def updated(self):
        self.updates += 1
        if self.updates == 20:  # timing starts after warm-up
            self.t0, self.t_eval = self.clock(), 0.0

    @contextlib.contextmanager
    def untimed(self):
        start = time.perf_counter()
        yield
        self.t_eval += time.perf_counter() - start

    def seconds_per_update(self) -> float:
        n = self.updates - 20
        return math.nan if self.t0 is None or n <= 0 else (self.clock() - self.t0 - self.t_eval) / n

    def log(self, step: int, metrics: dict):
        """TensorBoard, results.json's metrics and one stdout line; stops on a NaN or an inf."""
        unit = "step" if self.args.env else "epoch"
        for k, v in metrics.items():
            if not math.isfinite(v):
                fail(f"{k} became {v} at {unit} {step}; lower the learning rate")
            self.writer.add_scalar(k, v, step)
        ups = 1.0 / self.seconds_per_update()
        self.metrics.update(metrics, updates_per_second=ups)
        self.writer.add_scalar("charts/updates_per_second", ups, step)
        shown = " ".join(f"{k.split('/')[-1].replace('accuracy', 'val_acc')}={v:.4g}"
                         for k, v in metrics.items() if k.startswith(("losses", "val")))
        print(f"{unit}={step} {shown} ups={ups:.1f}", flush=True)

    def finish(self, final: dict) -> dict:
        """Writes results.json and prints the final metrics; returns them with the run's folder."""
        spu = self.seconds_per_update()
        self.metrics.update(final, updates=self.updates, seconds_per_update=spu,
                            peak_memory_mb=self.peak_memory() - self.memory0)
        self.metrics["updates_per_second"] = 1.0 / spu
        with open(os.path.join(self.dir, "results.json"), "w") as f:
            json.dump(self.metrics, f, indent=2)
        print(" ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)),
              flush=True)
        self.writer.close()
        return {**self.metrics, "run_dir": self.dir, "evaluations": self.evals}


MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def load_mnist(folder: str) -> tuple:
    """MNIST's four idx files, downloaded once into `folder` (MNIST_BASE_URL: another mirror)."""
    import gzip
    import urllib.request
    os.makedirs(folder, exist_ok=True)
    bases = (os.environ["MNIST_BASE_URL"],) if "MNIST_BASE_URL" in os.environ else MNIST_URLS
    arrays = []
    for name in MNIST_FILES:
        path = os.path.join(folder, name)
        for url in [] if os.path.exists(path) else [f"{b.rstrip('/')}/{name}" for b in bases]:
            try:
                print(f"downloading {url}")
                with urllib.request.urlopen(url, timeout=30) as r:
                    blob = r.read()
                gzip.decompress(blob)  # a truncated or HTML answer fails here, before it is kept
                with open(path + ".tmp", "wb") as f:
                    f.write(blob)
                os.replace(path + ".tmp", path)
                break
            except (OSError, EOFError) as e:
                print(f"  failed: {e}")
        if not os.path.exists(path):
            fail(f"could not download MNIST's {name}; put it in {folder} or set MNIST_BASE_URL "
                 "to a mirror")
        try:
            raw = gzip.decompress(open(path, "rb").read())
        except (OSError, EOFError):
            fail(f"{path} is corrupt; delete it to download it again")
        ndim = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        if len(raw) != 4 + 4 * ndim + math.prod(shape):
            fail(f"{path} is corrupt (its size does not match its header); delete it to download "
                 "it again")
        pixels = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
        arrays.append(pixels.view(shape))
    return tuple(arrays)


def save_checkpoint(run: Run, progress: int, objects: dict):
    """run_dir/checkpoint.pt: the objects' states, the run's records and every RNG state."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v.detach().cpu()
             for k, v in objects.items()}
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    state.update(script="mtl_scalarization.py", progress=progress, args=asdict(run.args),
                 evals=run.evals, best=run.best, updates=run.updates,
                 episode_returns=run.episode_returns, rng=rng)
    path = os.path.join(run.dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old checkpoint intact


def load_checkpoint(ckpt: Optional[dict], run: Run, objects: dict) -> int:
    """setup()'s checkpoint back into objects, the run's records, RNGs; returns its epoch/step."""
    if ckpt is None:
        return 0
    for k, v in objects.items():
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(ckpt[k])
        else:
            with torch.no_grad():
                v.copy_(ckpt[k])
    run.evals, run.best, run.updates = ckpt["evals"], ckpt["best"], ckpt["updates"]
    run.episode_returns, rng = ckpt["episode_returns"], ckpt["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    print(f"resumed from {run.args.resume} at {ckpt['progress']}")
    return ckpt["progress"]


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    study(cli_args) if cli_args.study else main(cli_args)
