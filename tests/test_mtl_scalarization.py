"""mtl_scalarization.py: every method's direction on hand-computed 2-3 task gradients (and against
torchjd's aggregators), the heads' plain gradient and the "at z" wiring, both benchmarks through
main(), a toy that must learn, the study and its reuse, resume, the MNIST download from a local
server, the Multi-MNIST construction, the replay's reward scaling, bad input."""

import copy
import gzip
import json
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import mtl_scalarization as mtl
from conftest import assert_finite_losses, check_resume_refuses_non_checkpoints, tensorboard_events

CPU = torch.device("cpu")
DIGITS = dict(epochs=2, digits_pairs=(600, 200, 200), device="cpu")
CHEETAH = dict(env="cheetah-vel-dir", tasks=("vel-1.0", "forward"), total_timesteps=300, learning_starts=100,
               episode_length=50, hidden_dim=32, rl_batch_size=32, eval_interval=150, eval_episodes=1, device="cpu")


def args(tmp_path, name="run", **overrides):
    return mtl.Args(**{**DIGITS, "run_dir": str(tmp_path / name), **overrides})


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- a tiny shared encoder with heads
def tiny_problem(T=3, B=5, seed=0):
    """z = tanh(W x + b) (B, 6) shared; head t: linear on z; L_t = mean squared error (> 0)."""
    torch.manual_seed(seed)
    enc = nn.Linear(4, 6)
    heads = [nn.Linear(6, 1) for _ in range(T)]
    x, y = torch.randn(B, 4), torch.randn(T, B)
    z = torch.tanh(enc(x))
    losses = torch.stack([(heads[t](z).squeeze(-1) - y[t]).pow(2).mean() for t in range(T)])
    head_params = [p for h in heads for p in h.parameters()]
    return list(enc.parameters()), head_params, z, losses


def grads(out, params):
    return [g.clone() for g in torch.autograd.grad(out, params, retain_graph=True)]


def assert_grads(params, expected, **tol):
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g, **tol)


@pytest.mark.parametrize("method", mtl.METHODS)
def test_heads_get_their_plain_gradient_for_every_method(method):
    shared, heads, z, losses = tiny_problem()
    state = {}
    if method == "imtl":  # IMTL-L: the heads' gradient is that of sum_t e^{s_t} L_t - s_t
        state = mtl.imtl_scales(3, 1e-2, CPU)
        state["s"].data = torch.tensor([0.5, -0.3, 0.2])
        scaled = state["s"].detach().exp() * losses
        expected_heads = grads(scaled.sum(), heads)
        expected_s = (state["s"].detach().exp() * losses - 1).detach()
    else:
        expected_heads = grads(losses.sum(), heads)
    expected_sum = grads(losses.sum(), shared)
    torch.manual_seed(1)
    logs = mtl.mtl_backward(method, losses, shared, heads, z, state, 0.4)
    if method.startswith("rlw"):  # weighted heads, as the official RLW (one backward of sum_t w_t L_t)
        w = logs["weights"]
        assert_grads(heads, grads_of_fresh_problem(lambda L: (w * L).sum(), "heads"))
        assert_grads(shared, grads_of_fresh_problem(lambda L: (w * L).sum(), "shared"))
        return
    assert_grads(heads, expected_heads)
    if method == "imtl":
        torch.testing.assert_close(state["s"].grad, expected_s)
    if method == "unitary":  # unitary: the shared parameters get the gradient of the summed loss
        assert_grads(shared, expected_sum)
    else:
        assert all(p.grad is not None and p.grad.isfinite().all() for p in shared)


def grads_of_fresh_problem(objective, which):
    shared, heads, z, losses = tiny_problem()
    return grads(objective(losses), shared if which == "shared" else heads)


def test_unitary_on_parameters_is_the_mean_in_rl():
    """RL (z None, no heads): the official code backpropagates the batch mean over tasks."""
    shared, _, _, losses = tiny_problem()
    expected = grads(losses.mean(), shared)
    mtl.mtl_backward("unitary", losses, shared, [], None, {}, 0.9)
    assert_grads(shared, expected)


@pytest.mark.parametrize("method", ["mgda-ub", "pcgrad"])
def test_rl_directions_on_the_parameters(method):
    """RL (z None): MGDA's direction from the l2-normalised parameter gradients; PCGrad's sum over T (the mean)."""
    T = 3 if method == "mgda-ub" else 2  # two tasks: PCGrad's order does not matter
    shared, _, _, losses = tiny_problem(T=T)
    G = torch.stack([torch.cat([g.flatten() for g in grads(losses[t], shared)]) for t in range(T)])
    if method == "mgda-ub":
        Gn = G / G.norm(dim=1, keepdim=True)
        d = mtl.min_norm_weights(Gn @ Gn.T) @ Gn
    else:
        d = mtl.pcgrad(G, torch.tensor([[0, 1], [1, 0]])) / T
    mtl.mtl_backward(method, losses, shared, [], None, {}, 0.9)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared]), d)


@pytest.mark.parametrize("method", ["pcgrad", "cagrad"])
def test_supervised_per_parameter_methods_use_the_shared_parameters_gradients(method):
    """With heads and z (supervised), PCGrad and CAGrad still act on dL_t/dtheta_sh (not at z), on the sum's
    scale: PCGrad's sum of projected gradients, CAGrad's direction times T (CAGrad's code, "to match the sum")."""
    shared, heads, z, losses = tiny_problem(T=2, seed=6)
    G = torch.stack([torch.cat([g.flatten() for g in grads(losses[t], shared)]) for t in range(2)])
    Gz = torch.stack([grads(losses[t], [z])[0].flatten() for t in range(2)])
    assert G[0] @ G[1] < 0 < Gz[0] @ Gz[1]  # PCGrad projects here on the parameters, not at z
    d = mtl.pcgrad(G, torch.tensor([[0, 1], [1, 0]])) if method == "pcgrad" else 2 * mtl.cagrad(G, 0.4)
    mtl.mtl_backward(method, losses, shared, heads, z, {}, 0.4)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared]), d)


# ----------------------------------------------------------------------------- "at z": back through the encoder
@pytest.mark.parametrize("method", ["mgda-ub", "imtl"])
def test_at_z_methods_backpropagate_sum_of_weighted_losses(method):
    shared, heads, z, losses = tiny_problem()
    state = {}
    if method == "imtl":
        state = mtl.imtl_scales(3, 1e-2, CPU)
        state["s"].data = torch.tensor([0.4, -0.2, 0.1])
        losses_used = state["s"].detach().exp() * losses - state["s"].detach()
    else:
        losses_used = losses
    Gz = torch.stack([grads(losses_used[t], [z])[0].flatten() for t in range(3)])  # dL_t/dz, not dL_t/dtheta
    expected_a = mtl.mgda_ub(Gz, losses_used) if method == "mgda-ub" else mtl.imtl_g(Gz)
    expected = grads((expected_a * losses_used).sum(), shared)  # backward of sum_t a_t L_t
    logs = mtl.mtl_backward(method, losses, shared, heads, z, state, 0.4)
    torch.testing.assert_close(logs["weights"], expected_a)
    assert abs(float(expected_a.sum()) - 1) < 1e-5
    assert_grads(shared, expected, rtol=1e-4, atol=1e-6)


def test_graddrop_at_z_backpropagates_its_direction():
    shared, heads, z, losses = tiny_problem()
    Gz = torch.stack([grads(losses[t], [z])[0] for t in range(3)])  # (T, B, K)
    signed = (Gz * torch.sign(z.detach())).sum(1)  # the official "input sign", summed over the batch
    torch.manual_seed(3)
    u = torch.rand(z.shape[-1])
    d = mtl.graddrop(Gz, signed, u)
    expected = [g.clone() for g in torch.autograd.grad(z, shared, d, retain_graph=True)]  # dL/dz := d
    torch.manual_seed(3)
    mtl.mtl_backward("graddrop", losses, shared, heads, z, {}, 0.4)
    assert_grads(shared, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- PCGrad
def test_pcgrad_two_conflicting_gradients_by_hand():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # g1.g2 = -1
    # g1 - (-1)/|g2|^2 g2 = (1, 0) + (-1, 1)/2 = (0.5, 0.5); g2 - (-1)/|g1|^2 g1 = (0, 1)
    for order in ([[0, 1], [1, 0]], [[1, 0], [0, 1]]):
        torch.testing.assert_close(mtl.pcgrad(G, torch.tensor(order)), torch.tensor([0.5, 1.5]))


def test_pcgrad_with_a_zero_task_gradient_stays_finite():
    """A task whose shared gradient is exactly 0 conflicts with nothing (no 0/0): d = (0, 0) + (1, -1)."""
    G = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(mtl.pcgrad(G, torch.tensor([[0, 1], [1, 0]])), torch.tensor([1.0, -1.0]))


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(mtl.pcgrad(G, torch.tensor([[0, 1], [1, 0]])), torch.tensor([2.0, 1.0]))


def test_pcgrad_three_tasks_in_a_fixed_order_by_hand():
    """Each g_i projected in order on the ORIGINAL g_j it conflicts with; the order matters."""
    G = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    # order 1: g1 on g2 then g3: (2,0) -> (1,1) -> (1,0); g2 on g1 then g3: (-1,1) -> (0,1) -> (0,0);
    #          g3 on g2 then g1: (0,-1) -> (-1/2,-1/2) -> (0,-1/2)          => d = (1, -1/2)
    torch.testing.assert_close(mtl.pcgrad(G, torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]])), torch.tensor([1.0, -0.5]))
    # order 2: g1 on g3 (no conflict) then g2: (1,1); g2 on g3 then g1: (-1,0) -> (0,0);
    #          g3 on g1 (no conflict) then g2: (-1/2,-1/2)                   => d = (1/2, 1/2)
    torch.testing.assert_close(mtl.pcgrad(G, torch.tensor([[2, 1, 0], [2, 0, 1], [0, 1, 2]])), torch.tensor([0.5, 0.5]))


# ----------------------------------------------------------------------------- MGDA
def test_min_norm_weights_two_vectors_closed_form():
    G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    # c = (|g2|^2 - g1.g2) / |g1 - g2|^2 = 4 / 5
    torch.testing.assert_close(mtl.min_norm_weights(G @ G.T), torch.tensor([0.8, 0.2], dtype=torch.float64))
    # g1.g2 >= |g1|^2: the min-norm point is g1, c clipped to 0.999 as official; g1.g2 >= |g2|^2: c = 0.001
    G = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(mtl.min_norm_weights(G @ G.T), torch.tensor([0.999, 0.001], dtype=torch.float64))
    G = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(mtl.min_norm_weights(G @ G.T), torch.tensor([0.001, 0.999], dtype=torch.float64))


def three_vectors(seed, dim=5, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, dim, generator=g, dtype=torch.float64) + shift * torch.randn(dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(6))
def test_min_norm_weights_three_vectors_kkt(seed):
    G = three_vectors(seed, shift=[0.0, 1.0, 2.0][seed % 3])
    a = mtl.min_norm_weights(G @ G.T)
    assert (a >= 0).all() and abs(float(a.sum()) - 1) < 1e-9
    d = a @ G
    tol = 1e-3 * float((G * G).sum(1).max())
    proj = G @ d  # the min-norm point d: g_t.d >= |d|^2 for every t, with equality where a_t > 0
    assert (proj >= d @ d - tol).all(), (proj, d @ d)
    assert ((proj - d @ d).abs()[a > 1e-3] <= tol).all(), (a, proj, d @ d)


@pytest.mark.parametrize("seed", range(7))
def test_min_norm_weights_match_torchjd_mgda(seed):
    """torchjd's Frank-Wolfe (slow on an edge of the simplex: 2,000 steps reach ~1e-3 on these seeds)."""
    from torchjd.aggregation import MGDA, MGDAWeighting
    G = three_vectors(seed + 10, dim=8, shift=1.0)
    a = mtl.min_norm_weights(G @ G.T)
    ref = MGDAWeighting(epsilon=1e-9, max_iters=2000)(G @ G.T)
    torch.testing.assert_close(a, ref, atol=1e-3, rtol=0)
    d, d_ref = a @ G, MGDA(epsilon=1e-9, max_iters=2000)(G)
    assert float((d - d_ref).norm()) <= 1e-3 * float(G.norm(dim=1).sum())  # |da @ G| <= max|da| sum_t |g_t|
    assert d @ d <= (d_ref @ d_ref) * (1 + 1e-6)  # the official solver's point is at least as short


def test_mgda_ub_normalises_by_loss_times_norm():
    G = three_vectors(3, shift=1.0) * torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)
    L = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    Gn = G / (L[:, None] * G.norm(dim=1, keepdim=True))  # "loss+": g_t / (L_t |g_t|)
    a = mtl.mgda_ub(G, L)
    torch.testing.assert_close(a, mtl.min_norm_weights(Gn @ Gn.T))
    assert (a - mtl.min_norm_weights(G @ G.T)).abs().max() > 0.05  # the normalisation changes the weights


# ----------------------------------------------------------------------------- IMTL-G
def official_imtl(G, eps=1e-6):
    """The official optimizers/imtl.py written out: a_{2:T} = (D^T U + eps I)^-1 U^T g_1, with D, U
    of columns g_1 - g_t and u_1 - u_t (here rows, so D^T U is D @ U.T)."""
    u = G / G.norm(dim=1, keepdim=True)
    D, U = G[:1] - G[1:], u[:1] - u[1:]
    a = torch.linalg.inv(D @ U.T + eps * torch.eye(len(D), dtype=G.dtype)) @ (U @ G[0])
    return torch.cat([1 - a.sum(0, keepdim=True), a])


def cosines(a, G):
    d = a @ G
    return G @ d / (G.norm(dim=1) * d.norm())


@pytest.mark.parametrize("T", [3, 4, 5])
def test_imtl_g_equal_cosines_and_torchjd(T):
    from torchjd.aggregation import IMTLGWeighting
    G = torch.randn(T, 8, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    a = mtl.imtl_g(G)
    assert abs(float(a.sum()) - 1) < 1e-9
    c = cosines(a, G)
    assert float(c.max() - c.min()) < 1e-5, c
    torch.testing.assert_close(a, IMTLGWeighting()(G @ G.T), atol=1e-5, rtol=1e-4)


def test_official_imtl_inverse_is_wrong_for_three_tasks_right_for_two():
    G = torch.randn(3, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = cosines(official_imtl(G), G)
    assert float(c.max() - c.min()) > 0.05, c  # (D^T U)^-1: unequal cosines
    c = cosines(mtl.imtl_g(G), G)
    assert float(c.max() - c.min()) < 1e-5
    G2 = G[:2]
    torch.testing.assert_close(mtl.imtl_g(G2), official_imtl(G2))
    c = cosines(mtl.imtl_g(G2), G2)
    assert float(c.max() - c.min()) < 1e-6


# ----------------------------------------------------------------------------- GradDrop
def test_graddrop_sign_rule_by_hand():
    G = torch.tensor([[1.0, 2.0, -3.0], [2.0, -1.0, 1.0]])
    # purity P = (1 + sum g / sum |g|) / 2 per coordinate: (1, 2/3, 1/4); coordinate 0 agrees (always kept)
    total = G.sum(0).norm()  # |(3, 1, -2)| = sqrt(14)
    for u, kept in [((0.5, 0.5, 0.5), (3.0, 2.0, -3.0)),    # 2/3 >= u: positive part; 1/4 < u: negative part
                    ((0.9, 0.9, 0.1), (3.0, -1.0, 1.0)),    # 2/3 < u: negative part; 1/4 >= u: positive part
                    ((0.99, 0.2, 0.2), (3.0, 2.0, 1.0))]:
        kept = torch.tensor(kept)
        d = mtl.graddrop(G, G, torch.tensor(u))
        torch.testing.assert_close(d, kept * total / kept.norm())
        assert abs(float(d.norm()) - math.sqrt(14)) < 1e-5
    # two negative gradients agree: both kept whatever u
    G = torch.tensor([[-1.0], [-2.0]])
    for u in (0.01, 0.5, 0.99):
        torch.testing.assert_close(mtl.graddrop(G, G, torch.tensor([u])), torch.tensor([-3.0]))


def test_graddrop_matches_torchjd_up_to_rescale():
    from torchjd.aggregation import GradDrop
    G = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    ref = GradDrop()(G)  # draws torch.rand(P.shape) once
    torch.manual_seed(5)
    d = mtl.graddrop(G, G, torch.rand(G.shape[1]))
    assert cos(d, ref) > 1 - 1e-6
    assert abs(float(d.norm() - G.sum(0).norm())) < 1e-4


# ----------------------------------------------------------------------------- CAGrad
def test_cagrad_orthogonal_equal_norm_by_hand():
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    c = 0.4
    # w = (1/2, 1/2) by symmetry, g_w = g0 = (1/2, 1/2): d = g0 (1 + c) / (1 + c^2)
    torch.testing.assert_close(mtl.cagrad(G, c), torch.tensor([0.5, 0.5], dtype=torch.float64) * 1.4 / 1.16,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed,c", [(0, 0.4), (1, 0.4), (2, 0.9), (3, 0.9)])
def test_cagrad_maximises_the_worst_task_in_the_ball(seed, c):
    G = three_vectors(seed, dim=4, shift=0.5)
    g0 = G.mean(0)
    d = mtl.cagrad(G, c) * (1 + c ** 2)  # undo CAGrad's rescale
    radius = c * float(g0.norm())
    assert float((d - g0).norm()) <= radius * (1 + 1e-4)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(4000, 4, generator=gen, dtype=torch.float64)
    r = torch.rand(4000, 1, generator=gen, dtype=torch.float64) ** (1 / 4)
    points = g0 + radius * r * v / v.norm(dim=1, keepdim=True)
    best_random = float((points @ G.T).min(1).values.max())
    assert float((G @ d).min()) >= best_random - 1e-4 * float(G.norm()), (float((G @ d).min()), best_random)


# ----------------------------------------------------------------------------- RLW
def test_rlw_weights_sum_to_T_and_dirichlet_is_uniform_on_the_simplex():
    torch.manual_seed(0)
    for method in ("rlw-dirichlet", "rlw-normal"):
        W = torch.stack([mtl.rlw_weights(method, 3, CPU) for _ in range(3000)])
        assert (W > 0).all()
        torch.testing.assert_close(W.sum(1), torch.full((3000,), 3.0))
        assert (W.mean(0) - 1).abs().max() < 0.06, W.mean(0)  # E[w_t] = 1 by symmetry
    # Dirichlet(1, 1): w_1 / 2 ~ Uniform(0, 1), so P(w_1 / 2 < 0.1) = 0.1 (softmax of N(0, I): 0.06)
    w = torch.stack([mtl.rlw_weights("rlw-dirichlet", 2, CPU) for _ in range(5000)])[:, 0] / 2
    assert abs(float((w < 0.1).float().mean()) - 0.1) < 0.015
    assert abs(float((w < 0.5).float().mean()) - 0.5) < 0.03


def test_rlw_dirichlet_is_finite_when_rand_returns_zero(monkeypatch):
    """torch.rand can return exactly 0 (2^-24 per draw on the CPU): -log 0 = inf gave NaN weights.
    The zero is clamped to 2^-64: w = 2 (64 ln 2, ln 2) / (65 ln 2) = (128/65, 2/65)."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(mtl.rlw_weights("rlw-dirichlet", 2, CPU), torch.tensor([128 / 65, 2 / 65]))


# ----------------------------------------------------------------------------- main() end to end
@pytest.mark.parametrize("method", ["unitary", "mgda-ub", "pcgrad"])  # sum, at z, on the parameters
def test_main_tiny_multi_digits(tmp_path, method):
    a = args(tmp_path, mtl=method)
    results = mtl.main(a)
    assert_finite_losses(results)
    assert set(results) >= {"test/accuracy", "test/accuracy_task_0", "test/accuracy_task_1", "best_epoch"}
    assert 0 <= results["test/accuracy"] <= 1 and results["best_epoch"] in (1, 2)
    assert results["updates"] == 2 * math.ceil(600 / 256)
    saved = json.load(open(os.path.join(a.run_dir, "results.json")))
    assert saved["test/accuracy"] == results["test/accuracy"] and saved["mtl"] == method
    assert os.path.isfile(os.path.join(a.run_dir, "args.json")) and tensorboard_events(a.run_dir)
    if method == "mgda-ub":
        assert abs(results["weights/task_0"] + results["weights/task_1"] - 1) < 1e-5


def test_main_tiny_cheetah(tmp_path):
    a = mtl.Args(**CHEETAH, mtl="pcgrad", run_dir=str(tmp_path / "run"))
    results = mtl.main(a)
    assert_finite_losses(results)
    assert results["updates"] == 300  # learning_starts updates at step 100, then one per step
    assert [e[0] for e in results["evaluations"]] == [150, 300]
    assert all(math.isfinite(results[k]) for k in ("eval/return", "eval/return_vel-1.0", "eval/return_forward"))
    lines = open(os.path.join(a.run_dir, "evaluations.csv")).read().splitlines()
    assert lines[0] == "step,vel-1.0,forward,mean" and [x.split(",")[0] for x in lines[1:]] == ["150", "300"]
    assert os.path.isfile(os.path.join(a.run_dir, "results.json"))


def test_rl_run_is_reproducible_from_its_seed(tmp_path):
    """Two RL runs with the same seed (same process, same threads) fill the same replay (the random
    warm-up actions too) and end with the same losses and returns."""
    out = []
    for name in ("a", "b"):
        a = mtl.Args(**{**CHEETAH, "total_timesteps": 120, "eval_interval": 0}, save_model=True,
                     run_dir=str(tmp_path / name))
        r = mtl.main(a)
        out.append((torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["buffer"]["rows"],
                    {k: v for k, v in r.items() if k.startswith(("losses", "eval"))}))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]


def test_cheetah_replay_holds_aligned_transitions(tmp_path):
    """The replay main() filled (read from its checkpoint): per task, s' of a step is s of the next step
    inside an episode and not across a reset, the one-hot names the task, and a time-limit end (the
    only way HalfCheetah episodes end) is stored as no terminal (m = 1)."""
    a = mtl.Args(**{**CHEETAH, "total_timesteps": 120, "learning_starts": 100, "eval_interval": 0}, mtl="unitary",
                 save_model=True, run_dir=str(tmp_path / "run"))
    mtl.main(a)
    rows = torch.load(os.path.join(a.run_dir, "checkpoint.pt"), weights_only=False)["buffer"]["rows"]
    obs_dim = 17 + 2
    obs, mask, next_obs = rows[..., :obs_dim], rows[..., obs_dim + 6 + 1], rows[..., -obs_dim:]
    assert rows.shape[:2] == (2, 120) and (mask == 1).all()
    for t in range(2):
        assert (obs[t, :, 17:] == torch.eye(2)[t]).all() and (next_obs[t, :, 17:] == torch.eye(2)[t]).all()
        inside = [i for i in range(119) if (i + 1) % a.episode_length != 0]
        torch.testing.assert_close(next_obs[t, inside], obs[t, [i + 1 for i in inside]])
        ends = [i for i in range(119) if (i + 1) % a.episode_length == 0]  # steps 50 and 100 end episodes
        assert ends and all(not torch.allclose(next_obs[t, i], obs[t, i + 1]) for i in ends)
    assert not torch.allclose(obs[0, :, :17], obs[1, :, :17])  # each task its own env


def test_multi_digits_unitary_learns(tmp_path):
    """Chance is 10% per digit; after 4 epochs seeds 1-8 measured 0.43-0.66 mean test accuracy on 1 thread,
    0.45-0.70 on 2, no task below 0.38: thresholds far below any of them."""
    results = mtl.main(args(tmp_path, epochs=4, digits_pairs=(2000, 300, 300), batch_size=64))
    assert results["test/accuracy"] > 0.3, results["test/accuracy"]
    assert min(results["test/accuracy_task_0"], results["test/accuracy_task_1"]) > 0.2


def test_test_accuracy_is_taken_at_the_best_validation_epoch(tmp_path, monkeypatch):
    """Validation accuracies are scripted (the best, ties to the later epoch as official, is epoch 4);
    the test accuracy reported must be the one measured at that epoch, not at the last."""
    real, vals, n_val = mtl.accuracy, iter([0.5, 0.9, 0.3, 0.9, 0.2]), []

    def scripted(model, images, labels, batch=1000):
        real(model, images, labels)
        if len(labels) == 100:  # validation
            n_val.append(1)
            v = next(vals)
            return torch.tensor([v, v])
        assert len(labels) == 80  # test
        return torch.tensor([len(n_val) / 10, len(n_val) / 100])  # encodes the epoch it was taken at
    monkeypatch.setattr(mtl, "accuracy", scripted)
    results = mtl.main(args(tmp_path, epochs=5, digits_pairs=(200, 100, 80)))
    assert results["best_epoch"] == 4
    assert results["test/accuracy_task_0"] == pytest.approx(0.4) and results["test/accuracy_task_1"] == pytest.approx(0.04)


# ----------------------------------------------------------------------------- the study
def test_study_writes_the_table_and_reuses_finished_runs(tmp_path):
    a = args(tmp_path, name="study", study=True, methods=("unitary", "pcgrad"), seeds=2, epochs=1,
             digits_pairs=(200, 100, 100), batch_size=64)
    out = mtl.study(a)
    table = open(tmp_path / "study" / "table.md").read()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "unitary", "pcgrad"}
    assert "average" in rows["method"] and "time / update" in rows["method"]
    assert rows["unitary"].count("+-") == 3  # left, right, average with CI
    assert rows["pcgrad"].count("+-") == 4  # and its average minus unitary's, paired by seed
    acc = {(r["mtl"], r["seed"]): 100 * r["test/accuracy"] for r in out["runs"]}
    paired = np.mean([acc["pcgrad", s] - acc["unitary", s] for s in (1, 2)])
    assert rows["pcgrad"].split("|")[5].strip().startswith(f"{paired:+.2f} +- ")
    assert "2 seeds (1-2)" in table and "95% CI" in table
    done = sorted(p for p in os.listdir(tmp_path / "study") if "__" in p)
    assert done == ["pcgrad__1", "pcgrad__2", "unitary__1", "unitary__2"]
    stamps = {p: os.path.getmtime(tmp_path / "study" / p / "results.json") for p in done}
    t = time.perf_counter()
    again = mtl.study(a)
    assert time.perf_counter() - t < 5
    assert stamps == {p: os.path.getmtime(tmp_path / "study" / p / "results.json") for p in done}
    assert again["table"] == out["table"]
    os.remove(tmp_path / "study" / "pcgrad__2" / "results.json")  # an interrupted run is not silently rerun
    with pytest.raises(SystemExit, match="without results.json"):
        mtl.study(a)


# ----------------------------------------------------------------------------- resume
def test_resume_equals_the_uninterrupted_run(tmp_path):
    common = dict(digits_pairs=(400, 100, 100), batch_size=128, lr_decay=0.5, save_model=True)
    full = mtl.main(args(tmp_path, name="full", epochs=2, **common))
    mtl.main(args(tmp_path, name="half", epochs=1, **common))
    ckpt = str(tmp_path / "half" / "checkpoint.pt")
    resumed = mtl.main(args(tmp_path, epochs=2, resume=ckpt, run_dir=None, **common))
    assert resumed["run_dir"] == os.path.dirname(ckpt)
    assert resumed["test/accuracy"] == full["test/accuracy"] and resumed["best_epoch"] == full["best_epoch"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["progress"] == b["progress"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the lr decays once per epoch: after 2 epochs it is lr * decay^1
    for ck in (a, b):
        assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.5)


def test_resume_refuses_what_is_not_its_checkpoint(tmp_path):
    foreign = tmp_path / "iql_checkpoint.pt"
    torch.save({"script": "iql.py", "progress": 1}, foreign)
    check_resume_refuses_non_checkpoints(mtl, tmp_path, lambda path: args(tmp_path, resume=path), sibling=foreign)


def test_supervised_logs_every_log_interval_epochs(tmp_path, capsys):
    """--log-interval 2 over 3 epochs: logged lines at epochs 2 and 3 (the last), not 1."""
    mtl.main(args(tmp_path, epochs=3, digits_pairs=(100, 50, 50), log_interval=2))
    epochs = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch=")]
    assert epochs == ["epoch=2", "epoch=3"], epochs


def test_lr_decays_every_epoch(tmp_path):
    mtl.main(args(tmp_path, epochs=3, digits_pairs=(100, 50, 50), lr_decay=0.9, save_model=True))
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.9 ** 2)


# ----------------------------------------------------------------------------- RL replay
def test_replay_divides_rewards_by_each_tasks_running_std():
    buf = mtl.MultiTaskReplay(2, 8, 1, 1, CPU)
    rewards = [[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 10.0, 0.0]]
    for i in range(4):
        for t in range(2):
            buf.add(t, np.array([float(i)]), np.array([0.1 * t]), rewards[t][i], 1.0, np.array([i + 1.0]))
    torch.manual_seed(0)
    obs, act, rew, mask, next_obs = buf.sample(64)
    std = [math.sqrt(1.25), 5.0]  # population std of each task's rewards
    idx = obs[..., 0].long()
    for t in range(2):
        expected = torch.tensor(rewards[t])[idx[t]] / std[t]
        torch.testing.assert_close(rew[t], expected)
        torch.testing.assert_close(next_obs[t, :, 0], idx[t].float() + 1)
        torch.testing.assert_close(act[t, :, 0], torch.full((64,), 0.1 * t))
    assert set(idx.flatten().tolist()) == {0, 1, 2, 3} and (mask == 1).all()
    twin = mtl.MultiTaskReplay(2, 8, 1, 1, CPU)
    twin.load_state_dict(buf.state_dict())
    torch.testing.assert_close(twin.std, buf.std)


# ----------------------------------------------------------------------------- data
def test_overlay_matches_a_pil_construction():
    from PIL import Image
    g = np.random.default_rng(0)
    left, right = g.integers(0, 256, (3, 28, 28)).astype(np.uint8), g.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    out = mtl.overlay(torch.tensor(left, dtype=torch.float32), torch.tensor(right, dtype=torch.float32))
    for i in range(3):
        canvas = np.zeros((36, 36), np.uint8)
        canvas[0:28, 0:28] = left[i]
        canvas[6:34, 6:34] = np.maximum(canvas[6:34, 6:34], right[i])
        expected = np.asarray(Image.fromarray(canvas).resize((28, 28), Image.NEAREST))
        np.testing.assert_array_equal(out[i].numpy(), expected.astype(np.float32))
    # pixel max: constant images; output pixel i samples canvas pixel floor((i + 1/2) 36/28):
    # (0, 0) <- (0, 0) left only, (25, 25) <- (32, 32) right only, (14, 14) <- (18, 18) both, (27, 27) <- (35, 35) empty
    for lv, rv in [(100.0, 50.0), (50.0, 100.0)]:
        out = mtl.overlay(torch.full((1, 28, 28), lv), torch.full((1, 28, 28), rv))[0]
        assert (out[0, 0], out[25, 25], out[14, 14], out[27, 27]) == (lv, rv, max(lv, rv), 0.0)


def test_multi_digits_splits_share_no_source_image(tmp_path, monkeypatch):
    seen = []
    real = mtl.overlay
    monkeypatch.setattr(mtl, "overlay", lambda l, r: seen.append((l, r)) or real(l, r))
    data = mtl.load_supervised(args(tmp_path, digits_pairs=(1200, 400, 400)), CPU)
    assert [len(data[k][1]) for k in ("train", "validation", "test")] == [1200, 400, 400]
    assert data["train"][0].shape == (1200, 1, 28, 28)

    def keys(x):
        return {bytes(img.numpy().tobytes()) for img in x}
    splits = [(keys(l), keys(l) | keys(r)) for l, r in seen]
    assert [len(lefts) for lefts, _ in splits] == [1078, 359, 360]  # every source image on the left once
    for i in range(3):
        for j in range(i + 1, 3):
            assert not splits[i][1] & splits[j][1], (i, j)
    assert len(splits[0][1] | splits[1][1] | splits[2][1]) == 1797  # the 1,797 distinct digits, each in one split


def idx_gz(array, magic_dim):
    header = bytes([0, 0, 8, magic_dim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, n_train=60, n_test=20):
    g = np.random.default_rng(0)
    arrays = [g.integers(0, 256, (n_train, 28, 28)), g.integers(0, 10, n_train),
              g.integers(0, 256, (n_test, 28, 28)), g.integers(0, 10, n_test)]
    for name, a in zip(mtl.MNIST_FILES, arrays):
        (folder / name).write_bytes(idx_gz(a, a.ndim))
    return arrays


def test_mnist_download_from_a_mirror(local_server, tmp_path, monkeypatch):
    www, url = local_server
    arrays = fake_mnist(www)
    monkeypatch.setenv("MNIST_BASE_URL", url)
    data_dir = tmp_path / "data"
    out = mtl.load_mnist(str(data_dir))
    for got, want in zip(out, arrays):
        assert got.dtype == torch.uint8 and torch.equal(got, torch.tensor(want, dtype=torch.uint8))
    assert sorted(os.listdir(data_dir)) == sorted(mtl.MNIST_FILES)  # cached, no .tmp left
    for name in mtl.MNIST_FILES:
        (www / name).unlink()
    assert all(torch.equal(a, b) for a, b in zip(mtl.load_mnist(str(data_dir)), out))  # read from the cache
    (data_dir / mtl.MNIST_FILES[2]).write_bytes(b"not a gzip file")
    with pytest.raises(SystemExit, match="is corrupt; delete it"):
        mtl.load_mnist(str(data_dir))
    short = gzip.decompress(idx_gz(arrays[2], 3))[:-5]  # a valid gzip whose payload is shorter than its header says
    (data_dir / mtl.MNIST_FILES[2]).write_bytes(gzip.compress(short))
    with pytest.raises(SystemExit, match="does not match its header"):
        mtl.load_mnist(str(data_dir))


def test_multi_mnist_through_main_from_a_mirror(local_server, tmp_path, monkeypatch):
    www, url = local_server
    fake_mnist(www, n_train=60, n_test=20)  # 5/6 of the training file to train, 1/6 to validate, as 50k / 10k
    monkeypatch.setenv("MNIST_BASE_URL", url)
    a = args(tmp_path, dataset="multi-mnist", data_dir=str(tmp_path / "data"), epochs=1, batch_size=16)
    results = mtl.main(a)
    assert sorted(os.listdir(tmp_path / "data")) == sorted(mtl.MNIST_FILES)
    assert_finite_losses(results)
    assert results["updates"] == math.ceil(50 / 16) and 0 <= results["test/accuracy"] <= 1


def test_mnist_bad_mirror_fails_clearly(local_server, tmp_path, monkeypatch):
    www, url = local_server
    fake_mnist(www)
    (www / mtl.MNIST_FILES[1]).write_bytes(b"<html>not found</html>")  # an HTML answer is not kept
    monkeypatch.setenv("MNIST_BASE_URL", url)
    with pytest.raises(SystemExit, match="could not download MNIST's train-labels"):
        mtl.load_mnist(str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data" / mtl.MNIST_FILES[1])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,message", [
    (dict(mtl="sgd"), "unknown method 'sgd'"),
    (dict(dataset="cifar"), "unknown dataset 'cifar'"),
    (dict(env="ant"), "unknown env 'ant'"),
    (dict(env="cheetah-vel-dir", tasks=("vel-1.0", "sideways")), "unknown task 'sideways'"),
    (dict(env="cheetah-vel-dir", tasks=("vel-fast", "forward")), "bad task 'vel-fast'"),
    (dict(env="metaworld-mt10"), "metaworld-mt10 does not run with this project's MuJoCo"),
    (dict(resume="missing/checkpoint.pt"), "checkpoint missing/checkpoint.pt does not exist"),
    pytest.param(dict(device="cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input(tmp_path, overrides, message):
    with pytest.raises(SystemExit) as e:
        mtl.main(args(tmp_path, **overrides))
    text = str(e.value)
    assert text.startswith("mtl_scalarization.py: error: ") and message in text and "\n" not in text, text
    assert not os.path.exists(tmp_path / "run")


def test_existing_run_dir_and_unknown_study_method(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="run folder .* already exists"):
        mtl.main(args(tmp_path))
    with pytest.raises(SystemExit, match="unknown method 'sgd' in --methods"):
        mtl.study(args(tmp_path, name="study", methods=("unitary", "sgd")))


def test_study_table_of_runs_without_evaluation():
    """RL runs timed with --eval-episodes 0 have no returns: the table shows NaN there and still the cost."""
    a = mtl.Args(**CHEETAH, methods=("unitary", "pcgrad"))
    runs = [{"mtl": m, "seed": 1, "seconds_per_update": t, "peak_memory_mb": 10.0} for m, t in (("unitary", 0.01),
                                                                                               ("pcgrad", 0.03))]
    rows = {line.split("|")[1].strip(): line for line in mtl.study_table(a, runs).splitlines() if line.startswith("| ")}
    assert "nan +- nan" in rows["unitary"] and "3.00x (30.0 ms)" in rows["pcgrad"]


def test_rl_update_bootstraps_from_the_target_critics_and_polyak_averages_them():
    """The TD target comes from the target critics (made constant C here, alpha ~ 0: y = r + gamma m C), and
    after the update each target parameter is (1 - tau) old + tau new online. Red on the online critics in
    the target, and on a skipped or reversed Polyak step."""
    torch.manual_seed(0)
    a = mtl.Args(**CHEETAH, init_temperature=1e-8)
    agent = mtl.MultiTaskSAC(5, 2, a)
    C = 3.0
    with torch.no_grad():
        for net in (agent.critic_target.q1, agent.critic_target.q2):
            net[-1].weight.zero_()
            net[-1].bias.fill_(C)
    T, B = 2, 16
    obs, act, next_obs = torch.randn(T, B, 5), torch.rand(T, B, 2) * 2 - 1, torch.randn(T, B, 5)
    rew, mask = torch.randn(T, B), torch.ones(T, B)
    with torch.no_grad():
        expected = (agent.critic(obs, act) - (rew + a.gamma * mask * C)).pow(2).mean(-1).sum(0).mean()
    old_target = [p.clone() for p in agent.critic_target.parameters()]
    info = agent.update(obs, act, rew, mask, next_obs, a)
    torch.testing.assert_close(info["losses/critic_loss"], expected, rtol=1e-4, atol=1e-4)
    for old, new, online in zip(old_target, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(new, (1 - a.tau) * old + a.tau * online)


def test_rl_td_target_bootstraps_from_next_states():
    """y = r + gamma m (min_k Qtarget_k(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s') with the update's own
    first draw (same seed): red on s in place of s'."""
    torch.manual_seed(0)
    a = mtl.Args(**CHEETAH)
    agent = mtl.MultiTaskSAC(5, 2, a)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the target critics differ from the online ones
    T, B = 2, 16
    obs, act, next_obs = torch.randn(T, B, 5), torch.rand(T, B, 2) * 2 - 1, torch.randn(T, B, 5)
    rew, mask = torch.randn(T, B), (torch.rand(T, B) > 0.2).float()
    torch.manual_seed(7)
    with torch.no_grad():
        next_act, next_logp = agent.actor.sample(next_obs)
        alpha = agent.log_alpha.exp()
        y = rew + a.gamma * mask * (agent.critic_target(next_obs, next_act).min(0).values - alpha * next_logp)
        expected = (agent.critic(obs, act) - y).pow(2).mean(-1).sum(0).mean()
    torch.manual_seed(7)
    info = agent.update(obs, act, rew, mask, next_obs, a)
    torch.testing.assert_close(info["losses/critic_loss"], expected, rtol=1e-4, atol=1e-4)


def test_tanh_gaussian_log_prob_by_torch_distributions():
    """log pi(a|s) = log N(u; mu, sigma) - sum log(1 - tanh(u)^2), log sigma = -20 + 11 (tanh(raw) + 1)."""
    torch.manual_seed(0)
    actor = mtl.TanhGaussianActor(5, 2, 16)
    obs = torch.randn(7, 5)
    torch.manual_seed(3)
    act, logp = actor.sample(obs)
    mu, raw = actor.net(obs).chunk(2, -1)
    std = (-20 + 11 * (torch.tanh(raw) + 1)).exp()
    torch.manual_seed(3)
    u = mu + std * torch.randn_like(mu)
    expected = torch.distributions.Normal(mu, std).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u) ** 2).sum(-1)
    torch.testing.assert_close(act, torch.tanh(u))
    torch.testing.assert_close(logp, expected, rtol=1e-4, atol=1e-4)


def test_rl_actor_critic_and_temperature_steps_by_hand():
    """One update: the actor loss is mean(alpha log pi(a|s) - min(Q1, Q2)(s, a)), a ~ pi(.|s) the update's
    second draw, with the critics after their step; the temperature loss alpha (-log pi - target entropy)
    with target entropy -|A|. Each step goes downhill: the critic loss on the same targets, the actor loss
    on the same noise; log alpha moves by -lr sign(its gradient) (Adam's first step). Red on a flipped sign
    of any term or gradient, on the mean of the twins in place of their min, on +|A| as target entropy."""
    torch.manual_seed(0)
    a = mtl.Args(**CHEETAH, init_temperature=0.5, actor_weight_decay=0.0)
    agent = mtl.MultiTaskSAC(5, 2, a)
    T, B = 2, 16
    obs, act, next_obs = torch.randn(T, B, 5), torch.rand(T, B, 2) * 2 - 1, torch.randn(T, B, 5)
    rew, mask = torch.randn(T, B), torch.ones(T, B)
    actor0, target0, log_alpha0 = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic_target), agent.log_alpha.item()
    alpha = math.exp(log_alpha0)

    def critic_loss(critic, y):
        return float((critic(obs, act) - y).pow(2).mean(-1).sum(0).mean())

    def actor_loss(actor):  # on the update's own draws: a' ~ pi(.|s') first, then a ~ pi(.|s)
        torch.manual_seed(7)
        actor.sample(next_obs)
        new_act, logp = actor.sample(obs)
        x = torch.cat([obs, new_act], -1)
        q = torch.minimum(agent.critic.q1(x), agent.critic.q2(x)).squeeze(-1)
        return float((alpha * logp - q).mean()), logp

    with torch.no_grad():
        torch.manual_seed(7)
        next_act, next_logp = actor0.sample(next_obs)
        y = rew + a.gamma * mask * (target0(next_obs, next_act).min(0).values - alpha * next_logp)
        before = critic_loss(agent.critic, y)
    torch.manual_seed(7)
    info = agent.update(obs, act, rew, mask, next_obs, a)
    with torch.no_grad():
        assert critic_loss(agent.critic, y) < before
        expected_actor, logp = actor_loss(actor0)
        assert actor_loss(agent.actor)[0] < expected_actor
    assert float(info["losses/actor_loss"]) == pytest.approx(expected_actor, rel=1e-4, abs=1e-5)
    expected_temp = alpha * float((-logp - (-2.0)).mean())  # also d(temp loss)/d(log alpha)
    assert float(info["losses/temperature_loss"]) == pytest.approx(expected_temp, rel=1e-4, abs=1e-6)
    assert agent.log_alpha.item() == pytest.approx(log_alpha0 - a.temp_lr * math.copysign(1, expected_temp), rel=1e-5)
