"""sac_20min.py: real UTD blocks through main(), the replay saved as a D4RL file, the tanh-Gaussian
log-density, the Butterworth filter against known coefficients, the temperature's direction,
a Pendulum-v1 solve, bad input."""

import copy
import math
import os

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

import iql
import rlpd
import sac_20min
from conftest import (assert_finite_losses, assert_same_training_state, check_full_replay_resumes_in_order,
                      check_resume_refuses_non_checkpoints,
                      check_actor_and_temperature_steps_by_hand,
                      check_each_critic_step_reads_its_own_slice, check_polyak_after_every_critic_step,
                      check_replay_masks_termination_not_truncation, checkpoint,
                      compiled_matches_eager, run_script, tensorboard_events)  # (conftest registers Wiring-v0)

TINY = dict(env="Pendulum-v1", total_timesteps=300, learning_starts=100, utd_ratio=2, batch_size=32, hidden_dim=32,
            eval_interval=150, eval_episodes=1, log_interval=100, device="cpu")


def tiny(tmp_path, **overrides):
    return sac_20min.Args(**{**TINY, "run_dir": str(tmp_path / "run"), **overrides})


# ----------------------------------------------------------------------------- main() end to end
def test_main_tiny_pendulum(tmp_path):
    args = tiny(tmp_path, save_model=True, save_dataset=str(tmp_path / "replay.hdf5"), validation_fraction=0.2)
    results = sac_20min.main(args)
    assert results["updates"] == (300 - 100) * 2 and results["env_steps"] == 300
    assert_finite_losses(results)
    assert "losses/validation_td_error" in results and results["updates_per_second"] > 0
    assert [e[0] for e in results["evaluations"]] == [150, 300]
    assert tensorboard_events(args.run_dir)
    for name in ("checkpoint.pt", "evaluations.csv", "args.json"):
        assert os.path.isfile(os.path.join(args.run_dir, name)), name

    # the replay as a D4RL file: every step (held-out ones too), actions back in Pendulum's [-2, 2]
    with h5py.File(args.save_dataset) as f:
        data = {k: f[k][()] for k in f}
    assert len(data["observations"]) == 300 and data["actions"].shape == (300, 1)
    assert np.abs(data["actions"]).max() > 1.05 and np.abs(data["actions"]).max() <= 2.0
    assert data["timeouts"].sum() == 300 // 200 + 1  # Pendulum truncates at 200; the run cut the last one
    np.testing.assert_allclose(data["observations"][1:200], data["next_observations"][:199])
    transitions = iql.qlearning_transitions(iql.read_d4rl(args.save_dataset))  # the offline scripts read it
    assert len(transitions["observations"]) == 300

    resumed = sac_20min.main(tiny(tmp_path, run_dir=None, resume=os.path.join(args.run_dir, "checkpoint.pt"),
                                  total_timesteps=350))
    assert resumed["env_steps"] == 50 and resumed["updates"] == 50 * 2
    assert [e[0] for e in resumed["evaluations"]] == [150, 300, 350]


def test_validation_buffer_is_held_out(tmp_path):
    args = tiny(tmp_path, total_timesteps=400, learning_starts=400, validation_fraction=0.25, save_model=True,
                eval_episodes=0)
    sac_20min.main(args)
    sizes = {k: b["size"] for k, b in torch.load(os.path.join(args.run_dir, "checkpoint.pt"),
                                                    weights_only=False)["buffers"].items()}
    assert sizes["train"] + sizes["validation"] == 400
    assert 60 <= sizes["validation"] <= 140  # Binomial(400, 0.25): mean 100, sd 8.7


# ----------------------------------------------------------------------------- pieces by hand
def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = sac_20min.TanhGaussianActor(5, 3, 16)
    obs = torch.randn(64, 5) * 3
    torch.manual_seed(1)
    act, log_prob = actor.sample(obs)
    h = actor.trunk(obs)
    base = torch.distributions.Normal(actor.mu(h), actor.log_std(h).clamp(-20, 2).exp())
    dist = torch.distributions.TransformedDistribution(base, [torch.distributions.TanhTransform(cache_size=1)])
    torch.manual_seed(1)
    act_ref = dist.rsample()
    torch.testing.assert_close(act, act_ref)
    torch.testing.assert_close(log_prob, dist.log_prob(act_ref).sum(-1), rtol=1e-4, atol=1e-4)


def test_butterworth_coefficients_and_response():
    # scipy.signal.butter(2, 0.5) (cutoff at a quarter of the sample rate): b = [0.2929, 0.5858, 0.2929], a = [1, 0, 0.1716]
    def coefficients(cutoff):  # the wrapper's (b, a)
        env = sac_20min.LowPassAction(gym.make("Pendulum-v1"), cutoff, fs=20.0)
        return env.b, env.a

    b, a = coefficients(5.0)
    np.testing.assert_allclose(b, [0.292893, 0.585786, 0.292893], atol=1e-6)
    np.testing.assert_allclose(a, [0.0, 0.171573], atol=1e-6)
    # gain: 1 at DC, 1/sqrt(2) (-3 dB) at the cutoff, for another cutoff too
    b, a = coefficients(2.0)
    gain = lambda f: abs(np.polyval(b[::-1], np.exp(-2j * np.pi * f / 20)) /  # noqa: E731
                         np.polyval([*a[::-1], 1.0], np.exp(-2j * np.pi * f / 20)))
    assert gain(0.0) == pytest.approx(1.0) and gain(2.0) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    # the wrapper: a constant command passes, an alternating one (10 Hz, Nyquist) is removed
    seen = []

    class Record(gym.Wrapper):
        def step(self, action):
            seen.append(float(action[0]))
            return self.env.step(action)

    env = sac_20min.LowPassAction(Record(gym.make("Pendulum-v1")), cutoff=2.0, fs=20.0)
    for command in (lambda i: 0.5, lambda i: (-1) ** i * 0.5):
        env.reset(seed=0)
        seen.clear()
        for i in range(40):
            env.step(np.array([command(i)], dtype=np.float32))
        assert seen[0] == pytest.approx(b[0] * command(0))  # the history starts at zero after reset
        assert seen[-1] == pytest.approx(0.5 if command(1) > 0 else 0.0, abs=1e-3)


def make_agent(utd=2, **kw):
    return sac_20min.SAC(3, 1, sac_20min.Args(hidden_dim=32, utd_ratio=utd, **kw), torch.device("cpu"))


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g), torch.rand(n, 1, generator=g) * 2 - 1, torch.randn(n, generator=g),
            torch.ones(n), torch.randn(n, 3, generator=g)]


def test_utd_block_counts_and_target_polyak():
    torch.manual_seed(0)
    agent = make_agent(utd=5)
    before = copy.deepcopy(agent)
    agent.update(*batch(5 * 16))
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert steps(agent.critic_opt) == 5 and steps(agent.actor_opt) == 1 and steps(agent.temp_opt) == 1
    # Polyak after every critic step: the target followed the critics, a small fraction of the way
    moved = lambda a, b: sum((p - q).abs().sum().item() for p, q in zip(a.parameters(), b.parameters()))  # noqa
    assert 0 < moved(agent.critic_target, before.critic_target) < 0.1 * moved(agent.critic, before.critic)


def test_backup_target_by_hand():
    torch.manual_seed(0)
    agent = make_agent(critic_dropout=0.0)
    rew, mask, next_obs = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.randn(2, 3)
    torch.manual_seed(3)
    y = agent.critic_target_value(rew, mask, next_obs)
    torch.manual_seed(3)
    a, log_prob = agent.actor.sample(next_obs)
    q = agent.critic_target(next_obs, a)  # (2 critics, 2 states)
    alpha = 0.1  # the initial temperature
    expected = rew + 0.99 * mask * (torch.minimum(q[0], q[1]) - alpha * log_prob)
    torch.testing.assert_close(y, expected)
    assert y[1] == 2.0  # a terminal transition backs up its reward only


@pytest.mark.parametrize("target, direction", [(10.0, 1), (-10.0, -1)])
def test_temperature_moves_toward_the_entropy_target(target, direction):
    torch.manual_seed(0)
    agent = make_agent(target_entropy=target)
    alpha0 = agent.log_alpha.exp().item()
    for i in range(5):
        agent.update(*batch(2 * 16, seed=i))
    assert direction * (agent.log_alpha.exp().item() - alpha0) > 0


def test_compiled_update_matches_eager():
    compiled_matches_eager(lambda: make_agent(critic_dropout=0.0), batch(2 * 32))


# ----------------------------------------------------------------------------- wiring: what a right formula wired wrong breaks
def test_replay_masks_termination_not_truncation(tmp_path):
    args = tiny(tmp_path, env="Wiring-v0", total_timesteps=300, learning_starts=300, validation_fraction=0.0,
                eval_episodes=0, save_model=True)
    sac_20min.main(args)
    buffer = sac_20min.ReplayBuffer(300, 2, 1, torch.device("cpu"))
    buffer.load_state_dict(checkpoint(args.run_dir)["buffers"]["train"])
    check_replay_masks_termination_not_truncation(buffer)
    _, _, rew, _, next_obs = buffer.rows.split(buffer.dims, -1)
    torch.testing.assert_close(rew[:, 0], next_obs[:, 1])  # Wiring's reward: x after the step, the step's own


def test_critic_loss_of_a_block_by_hand():
    """Q(s, a) against r + gamma m (min_k Qtarget_k(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s'): the
    update must pass s' (not s) and m to the backup and use the target critics (not the online ones)."""
    torch.manual_seed(0)
    agent = make_agent(utd=1, critic_dropout=0.0)
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the target differs from the online critics
    obs, act, rew, _, next_obs = batch(16)
    mask = (torch.arange(16) % 3 != 0).float()  # some terminal transitions
    twin = copy.deepcopy(agent)
    torch.manual_seed(5)
    loss = agent.update(obs, act, rew, mask, next_obs)["losses/critic_loss"]
    torch.manual_seed(5)  # the same draws: a' ~ pi(.|s') is the block's first
    with torch.no_grad():
        next_act, next_log_prob = twin.actor.sample(next_obs)
        next_q = twin.critic_target(next_obs, next_act).min(0).values - 0.1 * next_log_prob
        expected = (twin.critic(obs, act) - (rew + 0.99 * mask * next_q)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_polyak_step_after_every_critic_step():
    torch.manual_seed(0)
    check_polyak_after_every_critic_step(make_agent(utd=4), [batch(4 * 16, seed=i) for i in range(3)])


def test_actor_and_temperature_steps_by_hand():
    torch.manual_seed(0)
    agent = make_agent(utd=2, critic_dropout=0.0, init_temperature=0.5)
    check_actor_and_temperature_steps_by_hand(agent, batch(2 * 16))


def test_each_critic_step_reads_its_own_slice():
    check_each_critic_step_reads_its_own_slice(make_agent(utd=3))


def test_dropout_is_on_in_every_critic_evaluation_of_the_update(monkeypatch):
    """DroQ (official: training=True in the backup, the critic loss and the actor loss): both
    dropout layers on in each of the three critic evaluations of a one-step block."""
    calls, dropout = [], torch.nn.functional.dropout
    record = lambda x, p, on: calls.append((p, on)) or dropout(x, p, on)  # noqa: E731
    monkeypatch.setattr(sac_20min.F, "dropout", record)
    make_agent(utd=1).update(*batch(16))
    assert calls == [(0.01, True)] * 6


def test_log_interval_does_not_change_the_run(tmp_path):
    """The TD-error logging draws from a forked RNG: logging every 50 steps or once gives the same run."""
    states = []
    for interval in (50, 1000):
        args = tiny(tmp_path, run_dir=str(tmp_path / f"log{interval}"), log_interval=interval, validation_fraction=0.2,
                    eval_episodes=0, save_model=True)
        sac_20min.main(args)
        states.append(checkpoint(args.run_dir)["agents"][0]["agent"])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


# ----------------------------------------------------------------------------- resume
def assert_same_agents(a, b):
    """Two checkpoints hold the same agents: weights, and the optimizers' moments and step counts."""
    assert len(a["agents"]) == len(b["agents"])
    for x, y in zip(a["agents"], b["agents"]):
        for k in x["agent"]:
            assert torch.equal(x["agent"][k], y["agent"][k]), k
        for name in ("actor_opt", "critic_opt", "temp_opt"):
            for s, t in zip(x[name]["state"].values(), y[name]["state"].values()):
                assert all(torch.equal(s[k], t[k]) for k in s), name


def test_stopped_and_resumed_run_ends_as_the_uninterrupted_run(tmp_path):
    """CPU, one process: 300 steps in one go, or 150 (a checkpoint at an episode's end, the buffer full
    at the stop's capacity) then resumed to 300: the same weights, optimizer states, replay and scores."""
    common = dict(env="WiringNoEnd-v0", eval_interval=150, save_model=True, validation_fraction=0.2, seed=3)
    whole = sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "whole"), **common))
    sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "first"), total_timesteps=150, **common))
    resumed = sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "second"), **common,
                                  resume=str(tmp_path / "first" / "checkpoint.pt")))
    assert resumed["evaluations"] == whole["evaluations"] and resumed["updates"] == 150 * 2
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "second")
    assert a["step"] == b["step"] == 300
    assert_same_agents(a, b)
    for k in ("train", "validation"):
        assert a["buffers"][k]["size"] == b["buffers"][k]["size"] and torch.equal(a["buffers"][k]["rows"],
                                                                                 b["buffers"][k]["rows"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]


def test_full_replay_resumes_in_order_into_a_larger_capacity():
    check_full_replay_resumes_in_order(sac_20min)


def test_resume_refuses_what_is_not_its_checkpoint(tmp_path):
    """Garbage, a truncated file, a foreign dict, rlpd.py's checkpoint (was: "Unexpected key(s) in state_dict")."""
    rlpd.main(rlpd.Args(env="Wiring-v0", offline_ratio=0.0, total_timesteps=20, learning_starts=10, utd_ratio=1,
                        batch_size=8, hidden_dim=8, num_qs=2, eval_episodes=0, save_model=True, device="cpu",
                        run_dir=str(tmp_path / "rlpd")))
    check_resume_refuses_non_checkpoints(sac_20min, tmp_path, lambda path: tiny(tmp_path, resume=path),
                                         sibling=tmp_path / "rlpd" / "checkpoint.pt")


def test_batch_indices_are_uniform_integers():
    """float32 rand * size reaches only 2^24 values: over 2^25 + 1 rows it would draw (almost) only even ones."""
    buffer = sac_20min.ReplayBuffer(4, 1, 1, torch.device("cpu"))
    buffer.size_t.fill_(2**25 + 1)  # as if it held that many rows
    idx = buffer.indices(20_000)
    assert idx.dtype == torch.long and 0.45 < (idx % 2).float().mean().item() < 0.55
    assert 0 <= idx.min() and idx.max() <= 2**25


def test_resume_with_a_checkpoint_from_cuda(tmp_path):
    """A checkpoint from a CUDA run (capturable Adam) resumes and trains on CPU."""
    args = tiny(tmp_path, save_model=True, eval_episodes=0)
    sac_20min.main(args)
    state = checkpoint(args.run_dir)
    for name in ("actor_opt", "critic_opt", "temp_opt"):
        for group in state["agents"][0][name]["param_groups"]:
            group["capturable"] = True
    torch.save(state, tmp_path / "from_cuda.pt")
    results = sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "resumed"), total_timesteps=350, eval_episodes=0,
                                  resume=str(tmp_path / "from_cuda.pt")))
    assert results["updates"] == 100 and np.isfinite(results["losses/critic_loss"])


# ----------------------------------------------------------------------------- CUDA graphs (skipped without CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_blocks():
    """The training step as main() runs it (indices drawn on the device, then one UTD block): 3 eager
    warm-up calls, the capture, 5 replays, with new transitions added before each call; a copy steps
    eagerly from the same RNG state and must match at every call."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    args = sac_20min.Args(utd_ratio=4, batch_size=64, hidden_dim=64)
    agent = sac_20min.SAC(3, 1, args, device)
    buffer = sac_20min.ReplayBuffer(1000, 3, 1, device)
    rng = np.random.default_rng(0)

    def add(buffers, n):
        for _ in range(n):
            row = rng.normal(size=3), rng.uniform(-1, 1, 1), rng.normal(), float(rng.random() > 0.1), rng.normal(size=3)
            for b in buffers:
                b.add(*row)
    add([buffer], 100)
    twin, twin_buffer = copy.deepcopy(agent), copy.deepcopy(buffer)
    step = sac_20min.cuda_graph(lambda: agent.update(*buffer.sample(args.utd_ratio * args.batch_size)))
    for call in range(1, 9):
        add([buffer, twin_buffer], 7)  # the graph must read the new rows and the new size
        state = torch.cuda.get_rng_state()
        out = {k: v.clone() for k, v in step().items()}
        torch.cuda.synchronize()
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)  # the same indices, dropout masks and actor noise
        twin_out = twin.update(*twin_buffer.sample(args.utd_ratio * args.batch_size))
        assert torch.equal(torch.cuda.get_rng_state(), after), call  # a replay advances the RNG as an eager call
        assert_same_training_state(agent, twin, out, twin_out, call)
    steps = [int(next(iter(opt.state.values()))["step"]) for opt in agent.optimizers().values()]
    assert steps == [8, 8 * 4, 8]  # every call is one real block, the warm-ups too (actor, critic, temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_run_does_the_updates_of_a_cpu_run_and_resumes_across_devices(tmp_path):
    runs = {}
    for name, device, resume in (("cpu", "cpu", None), ("cuda", "cuda", None),
                                 ("cpu_to_cuda", "cuda", "cpu"), ("cuda_to_cpu", "cpu", "cuda")):
        args = tiny(tmp_path, run_dir=str(tmp_path / name), device=device, save_model=True, eval_episodes=0,
                    **({} if resume is None else {"resume": str(tmp_path / resume / "checkpoint.pt"),
                                                  "total_timesteps": 350}))
        runs[name] = sac_20min.main(args)
        assert_finite_losses(runs[name])
        critic_steps = int(next(iter(checkpoint(args.run_dir)["agents"][0]["critic_opt"]["state"].values()))["step"])
        assert critic_steps == (300 - 100 + (0 if resume is None else 50)) * 2, name
    assert runs["cuda"]["updates"] == runs["cpu"]["updates"] == 400
    assert runs["cpu_to_cuda"]["updates"] == runs["cuda_to_cpu"]["updates"] == 100


# ----------------------------------------------------------------------------- AVTD
def constant_critic_agent(c):
    """An agent whose critics (and target critics) predict c for every input: last layer 0, bias c."""
    agent = make_agent()
    with torch.no_grad():
        for critic in (agent.critic, agent.critic_target):
            critic.linears[2].weight.zero_()
            critic.linears[2].bias.fill_(c)
    return agent


def terminal_rows(rewards):
    """A replay of terminal rows (m = 0: the TD target is r alone) with these rewards."""
    buffer = sac_20min.ReplayBuffer(len(rewards), 3, 1, torch.device("cpu"))
    for r in rewards:
        buffer.add(np.random.randn(3), np.random.uniform(-1, 1, 1), r, 0.0, np.random.randn(3))
    return buffer


def test_avtd_picks_the_lowest_held_out_td_error():
    """A critic that predicts c has TD error mean (c - r)^2 on terminal rows. Held-out rewards 1,
    training ones 3: by hand, held-out errors 4, 0.04, 4 (agent 1 acts) and training ones 0, 3.24, 16
    (the training rows would pick agent 0)."""
    torch.manual_seed(0)
    np.random.seed(0)
    agents = [constant_critic_agent(c) for c in (3.0, 1.2, -1.0)]
    buffers = {"train": terminal_rows([3.0] * 40), "validation": terminal_rows([1.0] * 10)}
    acting, train_td, val_td = sac_20min.avtd_select(agents, buffers)
    assert acting == 1
    np.testing.assert_allclose(val_td, [4.0, 0.04, 4.0], rtol=1e-5)
    np.testing.assert_allclose(train_td, [0.0, 3.24, 16.0], rtol=1e-5, atol=1e-6)


def test_avtd_measures_with_dropout_off_and_training_keeps_it_on():
    """On terminal rows the held-out TD error is deterministic unless dropout is on; after the
    measurement every module is back in training mode (DroQ's dropout in the updates)."""
    torch.manual_seed(0)
    np.random.seed(0)
    agents = [make_agent(critic_dropout=0.5), make_agent(critic_dropout=0.5, critic_layer_norm=False)]
    buffers = {"train": terminal_rows([0.5] * 40), "validation": terminal_rows([1.0] * 10)}
    assert sac_20min.avtd_select(agents, buffers)[2] == sac_20min.avtd_select(agents, buffers)[2]
    assert all(m.training for agent in agents for m in agent.modules())


def test_weight_decay_is_decoupled_and_only_in_its_candidate():
    """AdamW: with zero gradients Adam's own step is 0, so one critic step scales every critic
    parameter by 1 - lr * decay = 1 - 3e-4 * 0.1; no other candidate decays."""
    for name, decay in (("weight_decay", 0.1), ("none", 0.0), ("droq", 0.0)):
        dropout, norm, weight_decay = sac_20min.CANDIDATES[name]
        agent = make_agent(critic_dropout=dropout, critic_layer_norm=norm, critic_weight_decay=weight_decay)
        before = [q.detach().clone() for q in agent.critic.parameters()]
        for q in agent.critic.parameters():
            q.grad = torch.zeros_like(q)
        agent.critic_opt.step()
        for q, q0 in zip(agent.critic.parameters(), before):
            torch.testing.assert_close(q.detach(), q0 * (1 - 3e-4 * decay), rtol=0, atol=1e-9)


def test_avtd_agents_train_on_the_same_batches_never_on_held_out_rows(tmp_path, monkeypatch):
    """main() with four candidates: each UTD block is one batch that every agent (each with its own
    critics) updates on; no held-out row ever enters an update; a choice every 50 steps after learning
    starts, written to avtd.csv."""
    seen, update = [], sac_20min.SAC.update
    monkeypatch.setattr(sac_20min.SAC, "update", lambda self, *b: seen.append((self, b)) or update(self, *b))
    names = ("none", "layer_norm", "droq", "weight_decay")
    args = tiny(tmp_path, total_timesteps=200, avtd=names, avtd_interval=50, validation_fraction=0.2,
                eval_episodes=0, save_model=True)
    results = sac_20min.main(args)
    assert len(seen) == 4 * 100  # learning starts at 100: 100 blocks, one per agent each
    agents = [agent for agent, _ in seen[:4]]
    assert [(a.critic.dropout, len(a.critic.norms), a.critic_opt.param_groups[0]["weight_decay"])
            for a in agents] == [(0.0, 0, 0.0), (0.0, 2, 0.0), (0.01, 2, 0.0), (0.0, 0, 0.1)]
    for i in range(0, len(seen), 4):
        assert [agent for agent, _ in seen[i:i + 4]] == agents
        first = seen[i][1]
        assert all(torch.equal(x, y) for _, other in seen[i + 1:i + 4] for x, y in zip(first, other))
    state = checkpoint(args.run_dir)
    pairs = lambda rows: {tuple(r) for r in rows[:, :4].tolist()}  # noqa: E731  (s, a): 3 + 1 columns
    trained = pairs(torch.cat([torch.cat(b[:2], -1) for _, b in seen[::4]]))
    held_out = pairs(state["buffers"]["validation"]["rows"])
    assert len(held_out) > 15 and not trained & held_out
    assert trained <= pairs(state["buffers"]["train"]["rows"])
    assert [c[0] for c in results["avtd"]] == [150, 200] and state["acting"] == results["avtd"][-1][1]
    with open(os.path.join(args.run_dir, "avtd.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[:3] == ["step", "acting", "none_train_td_error"] and len(lines) == 3
    assert results["avtd/acting"] == names[state["acting"]]


def choose_last(agents, buffers):
    """avtd_select's stand-in: always the last agent (dummy errors)."""
    return len(agents) - 1, [0.0] * len(agents), [1.0] * len(agents)


def test_avtd_with_one_candidate_is_its_plain_run(tmp_path):
    """`--avtd droq` (choices every 50 steps, from a forked RNG) trains as the plain DroQ run."""
    runs = [sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / name), validation_fraction=0.2, save_model=True, **kw))
            for name, kw in (("plain", {}), ("avtd", dict(avtd=("droq",), avtd_interval=50)))]
    assert runs[0]["evaluations"] == runs[1]["evaluations"] and len(runs[1]["avtd"]) == 4
    assert_same_agents(checkpoint(tmp_path / "plain"), checkpoint(tmp_path / "avtd"))


def test_avtd_the_chosen_agent_acts_and_is_evaluated(tmp_path, monkeypatch):
    """Choices fixed to the last agent: agent 0 acts from step 101 (learning starts) to 150, the
    first choice; then only the chosen one acts, and the evaluations (at 150 and 300) are its own."""
    monkeypatch.setattr(sac_20min, "avtd_select", choose_last)
    acts, evaluated = [], []
    sample, forward = sac_20min.TanhGaussianActor.sample, sac_20min.TanhGaussianActor.forward
    monkeypatch.setattr(sac_20min.TanhGaussianActor, "sample",
                        lambda self, s: (len(s) == 1 and acts.append(self)) or sample(self, s))  # env steps
    monkeypatch.setattr(sac_20min.TanhGaussianActor, "forward", lambda self, s: evaluated.append(self) or forward(self, s))
    seen, update = [], sac_20min.SAC.update
    monkeypatch.setattr(sac_20min.SAC, "update", lambda self, *b: seen.append(self) or update(self, *b))
    sac_20min.main(tiny(tmp_path, avtd=("none", "droq"), avtd_interval=50, validation_fraction=0.2))
    first, chosen = seen[0].actor, seen[1].actor
    assert acts == [first] * 50 + [chosen] * 150
    assert len(evaluated) == 2 * 200 and set(evaluated) == {chosen}  # 2 episodes of 200 steps


def test_avtd_resume_restores_the_acting_agent(tmp_path, monkeypatch):
    """Stopped at step 150 (an episode's end) right after a choice, then resumed: the run in one go. The
    choice is fixed to the last agent, so a resume that forgot it would act with agent 0 until the
    next choice at 200. A checkpoint of other candidates, or of one agent before AVTD, is refused."""
    monkeypatch.setattr(sac_20min, "avtd_select", choose_last)
    common = dict(env="WiringNoEnd-v0", avtd=("none", "droq"), avtd_interval=50, validation_fraction=0.2,
                  save_model=True, seed=3)
    whole = sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "whole"), **common))
    sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "first"), total_timesteps=150, **common))
    assert checkpoint(tmp_path / "first")["acting"] == 1
    resumed = sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "second"), **common,
                                  resume=str(tmp_path / "first" / "checkpoint.pt")))
    assert resumed["evaluations"] == whole["evaluations"] and resumed["avtd"] == whole["avtd"]
    assert_same_agents(checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "second"))
    with pytest.raises(SystemExit, match="is not a checkpoint of a run with --avtd droq none"):
        sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "third"), **{**common, "avtd": ("droq", "none")},
                            resume=str(tmp_path / "first" / "checkpoint.pt")))
    state = checkpoint(tmp_path / "first")
    state["agent"] = state.pop("agents")[0]["agent"]  # as a checkpoint of one agent before AVTD
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="is a checkpoint of an earlier sac_20min.py"):
        sac_20min.main(tiny(tmp_path, run_dir=str(tmp_path / "fourth"), **common, resume=str(tmp_path / "old.pt")))


# ----------------------------------------------------------------------------- learning
def test_solves_pendulum(tmp_path):
    """DroQ-style SAC at UTD 10 balances Pendulum-v1 within 2,500 steps: the mean of 20 episodes is
    above -300 (untrained: about -1,450). Seeds 0-7 give -120 to -168 (docs/sac_20min.md); at
    1,500 steps one of the 8 was still at -682, so a shorter run is not a promise on another CPU."""
    args = sac_20min.Args(env="Pendulum-v1", total_timesteps=2500, learning_starts=500,
                          utd_ratio=10, hidden_dim=64, eval_interval=0, eval_episodes=20,
                          log_interval=500, seed=0, device="cpu", run_dir=str(tmp_path / "run"))
    results = sac_20min.main(args)
    assert results["eval/return"] > -300, results["evaluations"]


# ----------------------------------------------------------------------------- bad input
class NanRewardEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(2, dtype=np.float32), float("nan"), False, False, {}


def test_nan_in_a_loss_stops_and_names_it(tmp_path):
    gym.register("NanReward-v0", entry_point=NanRewardEnv, max_episode_steps=50)
    with pytest.raises(SystemExit, match=r"losses/critic_loss became nan at step 200"):
        sac_20min.main(tiny(tmp_path, env="NanReward-v0", eval_episodes=0))


@pytest.mark.parametrize("cli, message", [
    (["--env", "NoSuchEnv-v0"], "unknown env 'NoSuchEnv-v0'"),
    (["--env", "CartPole-v1"], "needs continuous actions"),
    (["--validation-fraction", "1.5"], "--validation-fraction must be in [0, 1)"),
    (["--utd-ratio", "0"], "must be positive"),
    (["--avtd-interval", "0"], "must be positive"),
    (["--avtd", "none", "--validation-fraction", "0"], "--avtd needs distinct candidates and held-out"),
    (["--avtd", "none", "droq", "none"], "--avtd needs distinct candidates"),
    (["--avtd", "l2"], "l2"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input(tmp_path, cli, message):
    proc = run_script("sac_20min.py", "--run-dir", str(tmp_path / "run"), "--total-timesteps", "10", *cli)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_existing_outputs_are_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("old run")
    (tmp_path / "data.hdf5").write_text("old data")
    for cli in (["--run-dir", str(tmp_path / "run")],
                ["--run-dir", str(tmp_path / "new"), "--save-dataset", str(tmp_path / "data.hdf5")]):
        proc = run_script("sac_20min.py", "--env", "Pendulum-v1", "--total-timesteps", "10", *cli)
        assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "old run"
    assert (tmp_path / "data.hdf5").read_text() == "old data"
