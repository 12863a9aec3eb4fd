"""idql.py: real gradient steps through main(), the diffusion schedule and sampler against
hand-computed numbers, a two-mode action distribution, critic-based selection, bad input."""

import copy
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import datasets
import idql
from conftest import (assert_finite_losses, check_antmaze_eval_env, check_kitchen_trains_without_evaluation,
                      check_main_feeds_update_aligned_transitions, check_minari_antmaze_main, check_minari_errors,
                      check_minari_hopper_main, check_minari_loads_as_d4rl, check_resume_equals_the_uninterrupted_run,
                      check_resume_refuses_non_checkpoints, compiled_matches_eager, graph_replays_match_eager_steps,
                      random_batch, run_script, tensorboard_events, tiny_args)

TINY = dict(actor_hidden=32, num_samples=8, eval_episodes=3)


def test_main_tiny_hopper(hopper_files, tmp_path):
    args = tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["nonext"], save_model=True,
                     keep_checkpoints=True, **TINY)
    results = idql.main(args)
    assert results["updates"] == 300
    assert_finite_losses(results)
    assert [e[0] for e in results["evaluations"]] == [150, 300] and np.isfinite(results["eval/normalized_score"])
    assert tensorboard_events(args.run_dir)
    for name in ("checkpoint.pt", "checkpoint_150.pt", "checkpoint_300.pt", "evaluations.csv", "args.json"):
        assert os.path.isfile(os.path.join(args.run_dir, name)), name
    resumed = idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["nonext"], run_dir=None,
                                  resume=os.path.join(args.run_dir, "checkpoint.pt"), max_steps=350, **TINY))
    assert resumed["updates"] == 50 and [e[0] for e in resumed["evaluations"]] == [150, 300, 350]

    # --eval-only: the checkpoint's RNG state makes it replay the evaluation it was saved after,
    # into a new folder; another N is a new evaluation; the training run's files are not touched
    ckpt, csv = os.path.join(args.run_dir, "checkpoint.pt"), os.path.join(args.run_dir, "evaluations.csv")
    before = open(csv).read()
    evaluate = lambda **kw: idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["nonext"],
                                                **{**TINY, "run_dir": None, "resume": ckpt, "eval_only": True, **kw}))  # noqa: E731
    same = evaluate()
    assert same["updates"] == 0 and same["evaluations"] == results["evaluations"][-1:]  # step 300
    assert os.path.dirname(same["run_dir"]) == args.run_dir and "eval__argmax_N8__" in same["run_dir"]
    assert open(os.path.join(same["run_dir"], "evaluations.csv")).read().startswith("step,return")
    more = evaluate(num_samples=32, selection="implicit", run_dir=str(tmp_path / "n32"))
    assert [e[0] for e in more["evaluations"]] == [300] and more["evaluations"] != same["evaluations"]
    assert open(csv).read() == before
    with pytest.raises(SystemExit, match="already exists"):
        evaluate(run_dir=args.run_dir)
    with pytest.raises(SystemExit, match="--eval-only evaluates a trained agent"):
        evaluate(resume=None)
    # a kept checkpoint is the run as it was then: evaluating it replays that step's evaluation
    first = evaluate(resume=os.path.join(args.run_dir, "checkpoint_150.pt"), run_dir=str(tmp_path / "at150"))
    assert first["evaluations"] == results["evaluations"][:1]


def test_evaluation_does_not_change_training(hopper_files, tmp_path):
    """Evaluation samples from the diffusion model; its noise must not shift the training RNG stream."""
    params = []
    for i, interval in enumerate((50, 0)):
        args = tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], max_steps=100,
                         eval_interval=interval, save_model=True, run_dir=str(tmp_path / f"run{i}"), **TINY)
        idql.main(args)
        params.append(torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=False)["agent"])
    for k in params[0]:
        assert torch.equal(params[0][k], params[1][k]), k


def test_resume_equals_the_uninterrupted_run(hopper_files, tmp_path):
    check_resume_equals_the_uninterrupted_run(idql, tmp_path, ("actor_opt", "critic_opt", "value_opt"),
                                              env="hopper-medium-v2", dataset=hopper_files["next"], **TINY)


def test_resume_keeps_the_lr_schedule_linked_and_takes_a_cuda_checkpoint(hopper_files, tmp_path):
    args = tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], save_model=True,
                     max_steps=20, eval_interval=0, **{**TINY, "eval_episodes": 0})
    idql.main(args)
    ckpt = os.path.join(args.run_dir, "checkpoint.pt")
    state = torch.load(ckpt, weights_only=False)
    agent = idql.IDQL(11, 3, idql.with_family_defaults(args), torch.device("cpu"))
    idql.restore(agent, state, torch.device("cpu"))
    assert agent.actor_opt.param_groups[0]["lr"] is agent.actor_lr  # the schedule writes into AdamW's lr
    assert agent.actor_lr.item() == state["actor_opt"]["param_groups"][0]["lr"].item()
    for opt in ("actor_opt", "critic_opt", "value_opt"):  # as a run on CUDA saves them; CPU Adam refuses those
        for group in state[opt]["param_groups"]:
            group["capturable"] = True
    torch.save(state, ckpt)
    resumed = idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], max_steps=30,
                                  eval_interval=0, resume=ckpt, run_dir=None, **{**TINY, "eval_episodes": 0}))
    assert resumed["updates"] == 10
    assert_finite_losses(resumed)


def test_resume_refuses_what_is_not_an_idql_checkpoint(hopper_files, tmp_path, monkeypatch):
    """Garbage, a truncated file, a dict of unknown origin, iql.py's checkpoint (which once started a D4RL
    download): one sentence, before a D4RL name's download (no server here) or a Minari id's is tried."""
    import huggingface_hub.constants
    import iql
    iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], max_steps=1,
                       eval_episodes=0, save_model=True, run_dir=str(tmp_path / "iql")))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for env, eval_only in (("hopper-medium-v2", False), ("mujoco/hopper/medium-v0", True)):
        check_resume_refuses_non_checkpoints(idql, tmp_path, lambda path: tiny_args(
            idql, tmp_path, env=env, resume=path, eval_only=eval_only, run_dir=str(tmp_path / "new"), **TINY),
            tmp_path / "iql" / "checkpoint.pt")


def test_resume_refuses_a_flat_adam_checkpoint(tmp_path):
    """Older idql.py files kept each network's Adam state as one flat tensor (FlatAdam)."""
    path = str(tmp_path / "checkpoint.pt")
    torch.save({"script": "idql.py", "value_opt": {"state": {}, "param_groups": [{"params": [0]}]}}, path)
    with pytest.raises(SystemExit, match="older idql.py's optimizer state"):
        idql.load_checkpoint(path, torch.device("cpu"))


def test_ant_evaluates_in_the_env_d4rl_recorded():
    """D4RL's ant-v2 files: observation dims 27: all zero, rewards without the contact cost."""
    env = idql.make_env("ant-medium-v2")
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        act = rng.uniform(-1, 1, 8).astype(np.float32)
        assert obs.shape == (111,) and not obs[27:].any()
        obs, reward, _, _, info = env.step(act)
        assert reward == pytest.approx(info["x_velocity"] + 1.0 - 0.5 * np.square(act).sum(), abs=1e-9)


# ----------------------------------------------------------------------------- Minari datasets
def test_minari_hopper_through_main(minari_root, tmp_path, monkeypatch):
    check_minari_hopper_main(idql, minari_root, tmp_path, monkeypatch, **TINY)


def test_minari_loads_as_the_same_d4rl_file(minari_root, tmp_path, monkeypatch):
    check_minari_loads_as_d4rl(idql, minari_root, tmp_path, monkeypatch)


def test_minari_antmaze_through_main(minari_root, tmp_path, monkeypatch):
    """AntMaze from Minari: the family's expectile 0.9, r - 1, D4RL's 0/1 score, episodes in parallel envs."""
    assert check_minari_antmaze_main(idql, minari_root, tmp_path, monkeypatch, **TINY)["expectile"] == 0.9


def test_antmaze_evaluates_as_d4rl(minari_root, monkeypatch):
    check_antmaze_eval_env(minari_root, monkeypatch, idql.make_env)


def test_minari_kitchen_trains_without_evaluation(minari_root, tmp_path, monkeypatch):
    check_kitchen_trains_without_evaluation(idql, minari_root, tmp_path, monkeypatch, **TINY)


def test_minari_errors(tmp_path, monkeypatch):
    check_minari_errors(idql, tmp_path, monkeypatch)


def test_timeouts_are_not_terminal():
    """A time-limit step bootstraps (m = 1); without next_observations it is dropped, not made terminal."""
    obs = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    data = dict(observations=obs, actions=np.zeros((5, 1), np.float32), rewards=np.arange(5, dtype=np.float32),
                terminals=np.array([0, 0, 0, 0, 1], bool), timeouts=np.array([0, 0, 1, 0, 0], bool))
    assert idql.qlearning_transitions(data)["masks"].tolist() == [1, 1, 1, 0]  # row 2 dropped
    data["next_observations"] = obs + 1
    assert idql.qlearning_transitions(data)["masks"].tolist() == [1, 1, 1, 1, 0]


# ----------------------------------------------------------------------------- wiring of one update
def test_one_update_is_wired_as_the_paper():
    torch.manual_seed(0)
    agent = _agent(11, 3, tau=0.1, actor_ema=0.05, lr_decay_steps=100)
    with torch.no_grad():  # online Q and mu move away from their target / EMA copies, as after some training
        for p in [*agent.critic.parameters(), *agent.actor.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    agent.num_updates.fill_(50)  # halfway through the cosine schedule: lr = lr0 / 2
    before = copy.deepcopy(agent)
    obs, act, rew, mask, next_obs = batch = random_batch()
    torch.manual_seed(5)
    out = agent.update(*batch)
    torch.manual_seed(5)  # the same t, eps and dropout masks, in the update's order
    t = torch.randint(0, 5, (64,))
    eps = torch.randn_like(act)
    ah = torch.cumprod(1 - idql.vp_beta_schedule(5), 0).float()[t, None]
    with torch.no_grad():
        actor_loss = (before.actor(ah.sqrt() * act + (1 - ah).sqrt() * eps, obs, t) - eps).pow(2).sum(-1).mean()
        assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
        q_target = before.critic_target(obs, act).min(0).values  # the target twin Q, not the online one
        u = q_target - before.value(obs).squeeze(-1)
        value_loss = (torch.where(u < 0, 0.3, 0.7) * u ** 2).mean()  # |tau - 1(u<0)| u^2, tau 0.7
        assert out["losses/value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)
        # Q's backup: r + gamma * m * V(s') with the new V (not V(s), not without the terminal mask)
        backup = rew + 0.99 * mask * agent.value(next_obs).squeeze(-1)
        critic_loss = (before.critic(obs, act) - backup).pow(2).mean()
        assert out["losses/critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    # Polyak of Q and EMA of mu: target <- target + rate (new - target), once per update
    for target, online, rate in ((agent.critic_target, agent.critic, 0.1), (agent.actor_ema, agent.actor, 0.05)):
        old_target = dict(before.named_parameters())
        for (name, new), now in zip(target.named_parameters(), online.parameters()):
            old = old_target[("critic_target." if target is agent.critic_target else "actor_ema.") + name]
            assert torch.allclose(new, old + rate * (now - old), atol=1e-6), name
    # the actor's step used the scheduled lr: AdamW's first step moves a weight by about lr (+ lr * wd * w)
    lr = 3e-4 * 0.5 * (1 + math.cos(math.pi * 50 / 100))
    assert agent.actor_opt.param_groups[0]["lr"].item() == pytest.approx(lr, rel=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(agent.actor.parameters(), before.actor.parameters()))
    assert moved == pytest.approx(lr, rel=2e-3)


def test_target_and_ema_updates_record_no_autograd():
    """A Polyak/EMA step recorded by autograd chains every copy's tensor to all past steps (memory grows)."""
    agent = _agent(11, 3)
    for _ in range(3):
        agent.update(*random_batch())
    assert all(p.grad_fn is None for p in [*agent.critic_target.parameters(), *agent.actor_ema.parameters()])


def test_main_feeds_update_aligned_transitions(hopper_files, tmp_path, monkeypatch):
    check_main_feeds_update_aligned_transitions(idql, idql.IDQL, hopper_files["next"], tmp_path, monkeypatch,
                                                **{**TINY, "eval_episodes": 0})


def test_vp_schedule_by_hand():
    betas = idql.vp_beta_schedule(5)
    # beta_1 = 1 - exp(-0.1/5 - 0.5 * 9.9 * 1/25) = 1 - exp(-0.218)
    assert betas[0].item() == pytest.approx(1 - np.exp(-0.218), abs=1e-9)
    assert betas.numpy() == pytest.approx([0.19587, 0.45882, 0.63578, 0.75488, 0.83503], abs=1e-5)
    assert torch.cumprod(1 - betas, 0)[-1].item() == pytest.approx(0.00641, abs=1e-5)  # a_T is almost pure noise


class MixtureOracle(torch.nn.Module):
    """The exact noise predictor of a 1-d mixture of point masses: eps = (a_t - sqrt(ah_t) E[a0 | a_t]) / sqrt(1 - ah_t)."""

    def __init__(self, modes, weights, alpha_hats):
        super().__init__()
        self.modes, self.log_w, self.ah = torch.tensor(modes), torch.tensor(weights).log(), torch.tensor(alpha_hats)

    def forward(self, a_t, obs, t):
        ah = self.ah[t][:, None]
        posterior = (self.log_w - (a_t - ah.sqrt() * self.modes) ** 2 / (2 * (1 - ah))).softmax(-1)
        return (a_t - ah.sqrt() * (posterior * self.modes).sum(-1, keepdim=True)) / (1 - ah).sqrt()


def _agent(obs_dim=2, act_dim=1, **overrides):
    args = idql.with_family_defaults(idql.Args(hidden_dim=64, actor_hidden=64, **overrides))
    return idql.IDQL(obs_dim, act_dim, args, torch.device("cpu"))


def test_sampler_recovers_a_point_mass_with_the_exact_denoiser():
    agent = _agent()
    agent.actor_ema = MixtureOracle([0.3], [1.0], agent.alpha_hats)
    # with the exact eps, the last DDPM step lands on a0 whatever the noise before it
    assert torch.allclose(agent.sample(torch.zeros(100, 2)), torch.full((100, 1), 0.3), atol=1e-5)


class AffineEps(torch.nn.Module):
    """A stand-in noise predictor with a known output: eps = 0.7 a_t / sqrt(1 - ah_t) + 0.1 s_0 - 0.05 t."""

    def __init__(self, alpha_hats):
        super().__init__()
        self.ah = torch.tensor(alpha_hats)

    def forward(self, a_t, obs, t):
        return 0.7 * a_t / (1 - self.ah[t, None]).sqrt() + 0.1 * obs[:, :1] - 0.05 * t[:, None].float()


def test_sampler_is_ddpm_algorithm_2_by_hand():
    """Ho et al. 2020, Algorithm 2 with sigma_t^2 = beta_t, computed here in float64 from the same noise:
    a_{t-1} = (a_t - (1 - alpha_t) / sqrt(1 - ah_t) eps(a_t, s, t)) / sqrt(alpha_t) + [t > 0] sqrt(beta_t) z."""
    agent = _agent(clip_sampler=False)
    agent.actor_ema = AffineEps(agent.alpha_hats)
    obs = torch.randn(200, 2)
    torch.manual_seed(3)
    sampled = agent.sample(obs)
    betas = idql.vp_beta_schedule(5)
    alphas, ah = 1 - betas, torch.cumprod(1 - betas, 0)
    torch.manual_seed(3)
    a = torch.randn(200, 1).double()
    for t in reversed(range(5)):
        eps = 0.7 * a / (1 - ah[t]).sqrt() + 0.1 * obs[:, :1].double() - 0.05 * t
        a = (a - (1 - alphas[t]) / (1 - ah[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            a = a + betas[t].sqrt() * torch.randn(200, 1).double()
    assert (a.abs() < 1).float().mean() > 0.9  # the final clip to [-1, 1] leaves most samples as they are
    assert torch.allclose(sampled, a.clamp(-1, 1).float(), atol=1e-5)


def test_training_noise_matches_the_schedule():
    agent = _agent()
    t = torch.arange(5)
    assert torch.allclose(agent.sqrt_ah[t] ** 2 + agent.sqrt_1m_ah[t] ** 2, torch.ones(5))  # variance preserving
    assert torch.allclose(agent.sqrt_ah ** 2, torch.cumprod(1 - idql.vp_beta_schedule(5), 0).float())


def _train_two_modes(steps=1500, seed=0, **overrides):
    """Actions -0.6 (70%, reward 0) and +0.6 (30%, reward 1), one-step episodes, random states."""
    torch.manual_seed(seed)
    n = 4000
    good = torch.rand(n) < 0.3
    obs = torch.randn(n, 2)
    act = (torch.where(good, 0.6, -0.6) + 0.03 * torch.randn(n))[:, None]
    agent = _agent(**{"lr_decay_steps": steps, **overrides})
    for _ in range(steps):
        i = torch.randint(0, n, (256,))
        agent.update(obs[i], act[i], good[i].float(), torch.zeros(256), obs[i])
    return agent


@pytest.fixture(scope="module")
def two_mode_agent():
    return _train_two_modes(actor_ema=0.01)  # a faster EMA: 1,500 steps instead of the official 3M


def _regions(a):
    """Fractions of samples near +0.6, near -0.6, and in the gap around 0."""
    return [((a - 0.6).abs() < 0.2).float().mean().item(), ((a + 0.6).abs() < 0.2).float().mean().item(),
            (a.abs() < 0.2).float().mean().item()]


def test_diffusion_learns_both_modes_in_proportion(two_mode_agent):
    torch.manual_seed(1)
    learned = _regions(two_mode_agent.sample(torch.randn(4000, 2)).squeeze(-1))
    # the exact denoiser of the data through the same 5-step sampler: what a perfect fit gives
    # (5 coarse DDPM steps leave a thin bridge between the modes, the official sampler too)
    exact = copy.copy(two_mode_agent)
    exact.actor_ema = MixtureOracle([0.6, -0.6], [0.3, 0.7], two_mode_agent.alpha_hats)
    ideal = _regions(exact.sample(torch.randn(4000, 2)).squeeze(-1))
    assert learned == pytest.approx(ideal, abs=0.08), (learned, ideal)  # seeds 0-4: within 0.04
    good, bad, gap = learned
    # the data's 30 / 70 split, as the exact denoiser gives it through this sampler (0.27; seeds 0-4:
    # 0.24-0.29)
    assert good / (good + bad) == pytest.approx(ideal[0] / (ideal[0] + ideal[1]), abs=0.07)
    # bimodal: more density at the rare mode than in the gap (seeds 0-4: 0.18-0.21 vs 0.11-0.12);
    # a Gaussian fit, N(-0.24, 0.55^2), has 0.09 near +0.6 and 0.27 in the gap
    assert good > gap


def test_selection_picks_the_mode_the_critic_prefers(two_mode_agent):
    agent = copy.copy(two_mode_agent)
    torch.manual_seed(2)
    obs = torch.randn(1000, 2)
    agent.args = replace(agent.args, selection="argmax")
    assert _regions(agent.select(obs).squeeze(-1))[0] > 0.95  # reward 1 at +0.6, 0 at -0.6
    # implicit policy mu * w, w = |tau - 1(A<0)|: P(A > 0) = p tau / (p tau + (1 - p)(1 - tau)), p = mu(A > 0)
    agent.args = replace(agent.args, selection="implicit", expectile=0.9)
    adv = lambda a: agent.critic_target(obs, a).min(0).values - agent.value(obs).squeeze(-1)  # noqa: E731
    with torch.no_grad():
        p = (adv(agent.sample(obs)) > 0).float().mean().item()
        chosen = (adv(agent.select(obs)) > 0).float().mean().item()
    assert 0.1 < p < 0.6
    assert chosen == pytest.approx(p * 0.9 / (p * 0.9 + (1 - p) * 0.1), abs=0.05)


class TableQ(torch.nn.Module):
    """A stand-in twin Q over 1-d actions: head k's value at the i-th candidate is table[k][i]."""

    def __init__(self, candidates, table):
        super().__init__()
        self.candidates, self.table = torch.tensor(candidates), torch.tensor(table)

    def forward(self, obs, act):
        return self.table[:, (act - self.candidates).abs().argmin(-1)]  # (2, B)


class ConstV(torch.nn.Module):
    def forward(self, obs):
        return torch.full((obs.shape[0], 1), 0.5)


def test_selection_reads_the_min_of_the_target_twins():
    """argmax_i min_k Qtarget_k(s, a_i), as the official eval_actions (compute_q: target, min);
    'implicit' draws a_i with probability w_i / sum_j w_j, A_i = min_k Qtarget_k(s, a_i) - V(s)."""
    candidates, B = [-0.9, -0.3, 0.3, 0.9], 20_000
    agent = _agent(num_samples=4)
    order = torch.stack([torch.tensor(candidates).roll(b) for b in range(4)]).repeat(B // 4, 1)
    agent.sample = lambda obs_n: order.reshape(-1, 1)  # state b's 4 samples, in an order of its own
    # the min picks 0.3; the mean, the max and head 0 pick 0.9, head 1 picks -0.3, the online Q -0.9
    agent.critic_target = TableQ(candidates, [[0.0, 1.0, 2.0, 10.0], [0.0, 1.5, 1.2, -5.0]])
    agent.critic, agent.value = TableQ(candidates, [[5.0, 0.0, 0.0, 0.0]] * 2), ConstV()
    assert torch.equal(agent.select(torch.zeros(B, 2)), torch.full((B, 1), 0.3))
    # A = min Q - 0.5 = (-0.5, 0.5, 0.7, -5.5); tau = 0.9: w = (0.1, 0.9, 0.9, 0.1) / (that / |A|)
    weights = {"expectile": [0.1, 0.9, 0.9, 0.1], "quantile": [0.2, 1.8, 0.9 / 0.7, 0.1 / 5.5]}
    for objective, w in weights.items():
        agent.args = replace(agent.args, selection="implicit", expectile=0.9, critic_objective=objective)
        torch.manual_seed(0)
        chosen = agent.select(torch.zeros(B, 2))
        freq = [(chosen == c).float().mean().item() for c in candidates]
        assert freq == pytest.approx([x / sum(w) for x in w], abs=0.015), (objective, freq)


def test_quantile_objective_and_weights_by_hand():
    u = torch.tensor([2.0, -0.5])
    assert torch.allclose(idql.critic_loss_fn(u, 0.7, "expectile"), torch.tensor([0.7 * 4, 0.3 * 0.25]))
    assert torch.allclose(idql.critic_loss_fn(u, 0.7, "quantile"), torch.tensor([0.7 * 2, 0.3 * 0.5]))
    assert torch.allclose(idql.implicit_weights(u, 0.7, "expectile"), torch.tensor([0.7, 0.3]))
    assert torch.allclose(idql.implicit_weights(u, 0.7, "quantile"), torch.tensor([0.7 / 2, 0.3 / 0.5]))


def test_select_is_batched_over_states():
    agent = _agent(obs_dim=11, act_dim=3, num_samples=16)
    actions = agent.select(torch.randn(7, 11))
    assert actions.shape == (7, 3) and actions.abs().max() <= 1


# ----------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path, hopper_files):
    with pytest.raises(SystemExit, match="unknown D4RL dataset"):
        idql.main(tiny_args(idql, tmp_path, env="hopper-mediocre-v2", **TINY))
    with pytest.raises(SystemExit, match="does not exist"):
        idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=str(tmp_path / "no.hdf5"), **TINY))
    with pytest.raises(SystemExit, match="11/3 dims but halfcheetah-medium-v2 has"):
        idql.main(tiny_args(idql, tmp_path, env="halfcheetah-medium-v2", dataset=hopper_files["next"], **TINY))
    with pytest.raises(SystemExit, match="needs mujoco-py; train on the same data from Minari .*--env D4RL/antmaze/umaze-v1"):
        n = 100
        path = datasets.write_d4rl(str(tmp_path / "am.hdf5"), np.zeros((n, 29)), np.zeros((n, 8)), np.zeros(n),
                                   np.zeros(n), np.arange(n) % 10 == 9)
        idql.main(tiny_args(idql, tmp_path, env="antmaze-umaze-v2", dataset=path, **TINY))
    with pytest.raises(SystemExit, match="add --save-model"):
        idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], keep_checkpoints=True, **TINY))
    (tmp_path / "run").mkdir()
    proc = run_script("idql.py", "--env", "hopper-medium-v2", "--dataset", hopper_files["next"],
                      "--run-dir", str(tmp_path / "run"))
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_sentence(tmp_path, hopper_files):
    proc = run_script("idql.py", "--env", "hopper-medium-v2", "--dataset", hopper_files["next"],
                      "--run-dir", str(tmp_path / "run"), "--device", "cuda")
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()

def test_compiled_update_matches_eager():
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(64, 11, generator=g), torch.rand(64, 3, generator=g) * 2 - 1, torch.randn(64, generator=g),
             torch.ones(64), torch.randn(64, 11, generator=g)]
    args = idql.with_family_defaults(idql.Args(hidden_dim=32, actor_hidden=32))
    compiled_matches_eager(lambda: idql.IDQL(11, 3, args, torch.device("cpu")), batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_steps():
    torch.manual_seed(0)
    args = idql.Args(lr_decay_steps=6)  # the lr changes at every step and reaches 0 within the test
    agent = idql.IDQL(11, 3, idql.with_family_defaults(args), torch.device("cuda"))
    graph_replays_match_eager_steps(idql, agent, batch_size=512)  # t, eps and dropout from the same RNG state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_then_capture_keeps_the_lr_schedule(hopper_files, tmp_path):
    """Resumed on CUDA, then captured: the schedule must still reach the optimizer the graph steps."""
    run = lambda **kw: idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"],  # noqa: E731
                                           device="cuda", save_model=True, eval_interval=0, lr_decay_steps=40,
                                           **{**TINY, "eval_episodes": 0, **kw}))
    run(max_steps=10)
    ckpt = os.path.join(str(tmp_path / "run"), "checkpoint.pt")
    resumed = run(max_steps=30, resume=ckpt)
    assert resumed["updates"] == 20
    lr = torch.load(ckpt, weights_only=False)["actor_opt"]["param_groups"][0]["lr"]  # what AdamW used last
    assert lr.item() == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 29 / 40)), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selection_graph_leaves_training_alone_and_eval_only_replays(hopper_files, tmp_path):
    """The N-sample selection graph is warmed up and captured under a forked RNG: N does not change
    the training run, and --eval-only (which captures again) replays the run's own evaluation."""
    runs = {}
    for n in (8, 16):
        args = tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], device="cuda",
                         max_steps=40, eval_interval=20, save_model=True, run_dir=str(tmp_path / f"n{n}"),
                         **{**TINY, "num_samples": n})
        runs[n] = (idql.main(args), torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=False))
    for k, v in runs[8][1]["agent"].items():
        assert torch.allclose(v.float(), runs[16][1]["agent"][k].float(), atol=1e-6), k
    again = idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], device="cuda",
                                resume=str(tmp_path / "n16" / "checkpoint.pt"), eval_only=True, run_dir=str(tmp_path / "again"),
                                **{**TINY, "num_samples": 16}))
    assert again["evaluations"] == runs[16][0]["evaluations"][-1:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selection", ["argmax", "implicit"])
def test_cuda_graph_selection_equals_eager(selection):
    """The N-sample selection (T denoising steps + the critic's choice) replayed as one graph."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    agent = idql.IDQL(11, 3, idql.with_family_defaults(idql.Args(selection=selection)), device)
    obs_buf = torch.zeros(10, 11, device=device)
    replay = idql.cuda_graph(lambda: agent.select(obs_buf))
    for _ in range(2):  # a new state each time: the graph reads the static buffer
        obs_buf.copy_(torch.randn(10, 11, device=device))
        state = torch.cuda.get_rng_state()
        graphed = replay().clone()
        torch.cuda.set_rng_state(state)
        assert torch.allclose(graphed, agent.select(obs_buf), atol=1e-5)
