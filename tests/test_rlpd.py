"""rlpd.py: real UTD blocks through main() with prior data, symmetric sampling, the random
target subset, the batched ensemble, download from a mirror, bad input."""

import copy
import dataclasses
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import datasets
import rlpd
import sac_20min
from conftest import (assert_finite_losses, assert_same_training_state, check_antmaze_eval_env, check_resume_refuses_non_checkpoints,
                      check_full_replay_resumes_in_order, check_kitchen_trains_without_evaluation,
                      check_minari_antmaze_main, check_minari_errors, check_minari_hopper_main,
                      check_actor_and_temperature_steps_by_hand,
                      check_each_critic_step_reads_its_own_slice, check_polyak_after_every_critic_step,
                      check_replay_masks_termination_not_truncation, checkpoint,
                      compiled_matches_eager, run_script, tensorboard_events)  # (conftest registers Wiring-v0)

TINY = dict(env="hopper-medium-v2", total_timesteps=300, learning_starts=100, utd_ratio=2, batch_size=32,
            hidden_dim=32, num_qs=4, eval_interval=150, eval_episodes=1, log_interval=100, device="cpu")


def tiny(tmp_path, **overrides):
    return rlpd.Args(**{**TINY, "run_dir": str(tmp_path / "run"), **overrides})


# ----------------------------------------------------------------------------- main() end to end
@pytest.mark.parametrize("kind", ["next", "nonext"])
def test_main_tiny_hopper(hopper_files, tmp_path, kind):
    args = tiny(tmp_path, dataset=hopper_files[kind], save_model=True)
    results = rlpd.main(args)
    assert results["updates"] == (300 - 100) * 2 and results["env_steps"] == 300
    assert_finite_losses(results)
    assert np.isfinite(results["eval/normalized_score"]) and results["updates_per_second"] > 0
    assert [e[0] for e in results["evaluations"]] == [150, 300]
    for _, ret, _, score in results["evaluations"]:  # d4rl's hopper: random -20.272305, expert 3234.3
        assert score == pytest.approx(100 * (ret + 20.272305) / (3234.3 + 20.272305))
    assert tensorboard_events(args.run_dir)
    for name in ("checkpoint.pt", "evaluations.csv", "args.json"):
        assert os.path.isfile(os.path.join(args.run_dir, name)), name
    resumed = rlpd.main(tiny(tmp_path, dataset=hopper_files[kind], run_dir=None, total_timesteps=350,
                             resume=os.path.join(args.run_dir, "checkpoint.pt")))
    assert resumed["env_steps"] == 50 and [e[0] for e in resumed["evaluations"]] == [150, 300, 350]


def test_without_prior_data_needs_no_dataset(tmp_path):
    results = rlpd.main(tiny(tmp_path, env="Hopper-v4", offline_ratio=0.0, total_timesteps=200, eval_episodes=0))
    assert results["updates"] == 200 and np.isfinite(results["losses/critic_loss"])


def test_download_into_the_d4rl_cache(tmp_path, local_server, hopper_files, monkeypatch):
    www, url = local_server
    (www / "gym_mujoco_v2" / "hopper_medium-v2.hdf5").write_bytes(open(hopper_files["next"], "rb").read())
    monkeypatch.setenv("D4RL_BASE_URL", url)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    results = rlpd.main(tiny(tmp_path, total_timesteps=150, eval_episodes=0))
    assert os.path.isfile(tmp_path / "cache" / "hopper_medium-v2.hdf5") and results["updates"] == 100


# ----------------------------------------------------------------------------- pieces by hand
def marked_buffer(value: float, n: int = 500) -> rlpd.ReplayBuffer:
    """A buffer whose every reward is `value`, to tell where a sampled row came from."""
    buffer = rlpd.ReplayBuffer(n, 3, 1, torch.device("cpu"))
    for _ in range(n):
        buffer.add(np.zeros(3), np.zeros(1), value, 1.0, np.zeros(3))
    return buffer


@pytest.mark.parametrize("ratio, n_offline", [(0.5, 16), (0.25, 8)])
def test_symmetric_sampling_splits_every_batch(ratio, n_offline):
    obs, act, rew, mask, next_obs = rlpd.symmetric_sample(marked_buffer(-1.0), marked_buffer(1.0), 5, 32, ratio)
    assert obs.shape == (5 * 32, 3) and act.shape == (5 * 32, 1)
    for g in range(5):  # each of the G critic batches, not just the whole draw
        assert (rew[g * 32:(g + 1) * 32] == -1).sum() == n_offline


def constant_critics(num_qs: int, num_min_qs: int, **kw) -> rlpd.RLPD:
    """An agent whose target critic k outputs exactly k, so the backup shows which members it used."""
    agent = rlpd.RLPD(3, 1, rlpd.Args(hidden_dim=8, num_qs=num_qs, num_min_qs=num_min_qs, gamma=1.0,
                                      backup_entropy=False, **kw), torch.device("cpu"))
    last = agent.critic_target.linears[2]
    last.weight.data.zero_()
    last.bias.data.copy_(torch.arange(num_qs, dtype=torch.float32).view(num_qs, 1, 1))
    return agent


def test_target_is_the_min_over_a_random_subset():
    torch.manual_seed(0)
    agent = constant_critics(10, 2)
    zeros = torch.zeros(4)
    mins = np.array([agent.critic_target_value(zeros, torch.ones(4), torch.zeros(4, 3))[0].item()
                     for _ in range(4000)])
    # min of 2 distinct members out of 10: P(min = j) = (9 - j) / 45
    freq = np.bincount(mins.astype(int), minlength=10) / len(mins)
    np.testing.assert_allclose(freq, (9 - np.arange(10)) / 45, atol=0.025)
    assert constant_critics(10, 10).critic_target_value(zeros, torch.ones(4), torch.zeros(4, 3))[0] == 0


def test_ensemble_members_match_the_full_forward():
    torch.manual_seed(0)
    critics = rlpd.Critics(3, 1, 16, k=10, layer_norm=True)
    obs, act = torch.randn(7, 3), torch.randn(7, 1)
    members = torch.tensor([7, 2])
    torch.testing.assert_close(critics(obs, act, members=members), critics(obs, act)[members])
    assert sum(p.numel() for p in critics.parameters()) == 10 * ((4 * 16 + 16) + (16 * 16 + 16) + (16 + 1) + 4 * 16)


def make_agent(utd=2):
    return rlpd.RLPD(3, 1, rlpd.Args(hidden_dim=32, num_qs=4, utd_ratio=utd), torch.device("cpu"))


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, generator=g), torch.rand(n, 1, generator=g) * 2 - 1, torch.randn(n, generator=g),
            torch.ones(n), torch.randn(n, 3, generator=g)]


def test_utd_block_step_counts():
    agent = make_agent(utd=4)
    agent.update(*batch(4 * 16))
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert steps(agent.critic_opt) == 4 and steps(agent.actor_opt) == 1 and steps(agent.temp_opt) == 1


def test_compiled_update_matches_eager():
    compiled_matches_eager(make_agent, batch(2 * 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_blocks():
    """The training step as main() runs it (half offline, half online rows drawn on the device, then one
    UTD block): 3 eager warm-up calls, the capture, 5 replays, with new online transitions added before
    each call; a copy steps eagerly from the same RNG state and must match at every call."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    args = rlpd.Args(utd_ratio=4, batch_size=64, hidden_dim=64)
    agent = rlpd.RLPD(3, 1, args, device)
    offline, online = rlpd.ReplayBuffer(500, 3, 1, device), rlpd.ReplayBuffer(1000, 3, 1, device)
    rng = np.random.default_rng(0)

    def add(buffers, n):
        for _ in range(n):
            row = rng.normal(size=3), rng.uniform(-1, 1, 1), rng.normal(), float(rng.random() > 0.1), rng.normal(size=3)
            for b in buffers:
                b.add(*row)
    add([offline], 500)
    add([online], 100)
    twin, twin_online = copy.deepcopy(agent), copy.deepcopy(online)
    step = rlpd.cuda_graph(lambda: agent.update(*rlpd.symmetric_sample(offline, online, 4, 64, 0.5)))
    for call in range(1, 9):
        add([online, twin_online], 7)  # the graph must read the new rows and the new size
        state = torch.cuda.get_rng_state()
        out = {k: v.clone() for k, v in step().items()}
        torch.cuda.synchronize()
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)  # the same indices, target subsets and actor noise
        twin_out = twin.update(*rlpd.symmetric_sample(offline, twin_online, 4, 64, 0.5))
        assert torch.equal(torch.cuda.get_rng_state(), after), call  # a replay advances the RNG as an eager call
        assert_same_training_state(agent, twin, out, twin_out, call)
    steps = [int(next(iter(opt.state.values()))["step"]) for opt in agent.optimizers().values()]
    assert steps == [8, 8 * 4, 8]  # every call is one real block, the warm-ups too (actor, critic, temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_run_does_the_updates_of_a_cpu_run_and_resumes_across_devices(tmp_path, hopper_files):
    runs = {}
    for name, device, resume in (("cpu", "cpu", None), ("cuda", "cuda", None),
                                 ("cpu_to_cuda", "cuda", "cpu"), ("cuda_to_cpu", "cpu", "cuda")):
        args = tiny(tmp_path, dataset=hopper_files["next"], run_dir=str(tmp_path / name), device=device,
                    save_model=True, eval_episodes=0,
                    **({} if resume is None else {"resume": str(tmp_path / resume / "checkpoint.pt"),
                                                  "total_timesteps": 350}))
        runs[name] = rlpd.main(args)
        assert_finite_losses(runs[name])
        critic_steps = int(next(iter(checkpoint(args.run_dir)["critic_opt"]["state"].values()))["step"])
        assert critic_steps == (300 - 100 + (0 if resume is None else 50)) * 2, name
    assert runs["cuda"]["updates"] == runs["cpu"]["updates"] == 400
    assert runs["cpu_to_cuda"]["updates"] == runs["cuda_to_cpu"]["updates"] == 100


# ----------------------------------------------------------------------------- wiring: what a right formula wired wrong breaks
@pytest.fixture
def marked_wiring_data(tmp_path):
    """Prior data for Wiring-v0 (2-dim observations, 1-dim actions) whose every reward is 123."""
    rng = np.random.default_rng(0)
    n = 500
    return datasets.write_d4rl(str(tmp_path / "marked.hdf5"), rng.normal(size=(n, 2)), rng.uniform(-0.9, 0.9, (n, 1)),
                               np.full(n, 123.0), np.zeros(n, bool), np.arange(n) % 10 == 9, rng.normal(size=(n, 2)))


def test_every_batch_in_main_holds_its_offline_half(tmp_path, marked_wiring_data, monkeypatch):
    blocks, update = [], rlpd.RLPD.update

    def recording_update(self, obs, act, rew, mask, next_obs):
        blocks.append(rew.clone())
        return update(self, obs, act, rew, mask, next_obs)
    monkeypatch.setattr(rlpd.RLPD, "update", recording_update)
    rlpd.main(tiny(tmp_path, env="Wiring-v0", dataset=marked_wiring_data, total_timesteps=120, eval_episodes=0,
                   batch_size=16, offline_ratio=0.25))
    assert len(blocks) == 20
    for rew in blocks:  # G = 2 critic batches of 16 per block, each with 4 offline rows (reward 123)
        assert [(b == 123).sum().item() for b in rew.view(2, 16)] == [4, 4]


def test_replay_masks_termination_not_truncation(tmp_path):
    args = tiny(tmp_path, env="Wiring-v0", offline_ratio=0.0, total_timesteps=300, learning_starts=300,
                eval_episodes=0, save_model=True)
    rlpd.main(args)
    buffer = rlpd.ReplayBuffer(300, 2, 1, torch.device("cpu"))
    buffer.load_state_dict(checkpoint(args.run_dir)["online"])
    check_replay_masks_termination_not_truncation(buffer)
    _, _, rew, _, next_obs = buffer.split(buffer.rows)
    torch.testing.assert_close(rew, next_obs[:, 1])  # Wiring's reward: x after the step, the step's own


def test_critic_loss_of_a_block_by_hand():
    """Q(s, a) against r + gamma m (min_{k in Z} Qtarget_k(s', a') - alpha log pi(a'|s')): the update must
    pass s' (not s) and m to the backup, and use the target critics' random subset Z."""
    torch.manual_seed(0)
    agent = rlpd.RLPD(3, 1, rlpd.Args(hidden_dim=32, num_qs=6, num_min_qs=2, utd_ratio=1), torch.device("cpu"))
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the target differs from the online critics
    obs, act, rew, _, next_obs = batch(16)
    mask = (torch.arange(16) % 3 != 0).float()  # some terminal transitions
    twin = copy.deepcopy(agent)
    torch.manual_seed(5)
    loss = agent.update(obs, act, rew, mask, next_obs)["losses/critic_loss"]
    torch.manual_seed(5)  # the same draws in the same order: a' ~ pi(.|s'), then Z
    with torch.no_grad():
        next_act, next_log_prob = twin.actor.sample(next_obs)
        subset = torch.rand(6).argsort()[:2]
        next_q = twin.critic_target(next_obs, next_act)[subset].min(0).values - 1.0 * next_log_prob
        expected = (twin.critic(obs, act) - (rew + 0.99 * mask * next_q)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_polyak_step_after_every_critic_step():
    torch.manual_seed(0)
    check_polyak_after_every_critic_step(make_agent(utd=4), [batch(4 * 16, seed=i) for i in range(3)])


def test_actor_and_temperature_steps_by_hand():
    torch.manual_seed(0)
    agent = rlpd.RLPD(3, 1, rlpd.Args(hidden_dim=32, num_qs=4, utd_ratio=2, init_temperature=0.5),
                      torch.device("cpu"))
    check_actor_and_temperature_steps_by_hand(agent, batch(2 * 16), lambda: torch.rand(4))


def test_each_critic_step_reads_its_own_slice():
    check_each_critic_step_reads_its_own_slice(make_agent(utd=3))


def test_batch_indices_are_uniform_integers():
    """float32 rand * size reaches only 2^24 values: over 2^25 + 1 rows it would draw (almost) only even ones."""
    buffer = rlpd.ReplayBuffer(4, 1, 1, torch.device("cpu"))
    buffer.size_t.fill_(2**25 + 1)  # as if it held that many rows
    idx = buffer.indices(20_000)
    assert idx.dtype == torch.long and 0.45 < (idx % 2).float().mean().item() < 0.55
    assert 0 <= idx.min() and idx.max() <= 2**25


# ----------------------------------------------------------------------------- Minari datasets
MINARI_TINY = {k: v for k, v in TINY.items() if k != "env"}


def test_minari_hopper_through_main(minari_root, tmp_path, monkeypatch):
    check_minari_hopper_main(rlpd, minari_root, tmp_path, monkeypatch, **MINARI_TINY)


def test_prior_actions_are_mapped_from_the_env_bounds_to_the_actors_range(tmp_path):
    """Pendulum's torque is in [-2, 2]: the offline rows hold a / 2 (the actor's tanh range), clipped
    1e-5 inside it as the official loader; actions outside the bounds are refused."""
    n, act = 40, np.linspace(-2, 2, 40)[:, None]
    path = datasets.write_d4rl(str(tmp_path / "p.hdf5"), np.zeros((n, 3)), act, np.ones(n), np.zeros(n),
                               np.arange(n) % 10 == 9, np.zeros((n, 3)))
    args = rlpd.with_family_defaults(tiny(tmp_path, env="Pendulum-v1", dataset=path))
    offline = rlpd.load_prior_data(args, rlpd.make_env(args), torch.device("cpu"))
    expected = np.clip(act[:, 0] / 2, -1 + 1e-5, 1 - 1e-5)
    assert np.allclose(offline.rows[:, 3].numpy(), expected, atol=1e-6) and offline.rows[:, 3].abs().max() < 1
    wide = datasets.write_d4rl(str(tmp_path / "w.hdf5"), np.zeros((n, 3)), 1.5 * act, np.ones(n), np.zeros(n),
                               np.arange(n) % 10 == 9, np.zeros((n, 3)))
    with pytest.raises(SystemExit, match="actions leave Pendulum-v1's bounds"):
        rlpd.load_prior_data(dataclasses.replace(args, dataset=wide), rlpd.make_env(args), torch.device("cpu"))


def test_minari_prior_data_equals_the_d4rl_file(minari_root, tmp_path, monkeypatch):
    """The same episodes from Minari and from a D4RL file fill the same offline rows (s, a, r, m, s')."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    buffers, cpu = minari_root["hopper"], torch.device("cpu")
    path = datasets.minari_episodes_as_d4rl(str(tmp_path / "same.hdf5"), buffers)
    minari_args = rlpd.with_family_defaults(tiny(tmp_path, env="test/hopper/tiny-v0"))
    file_args = rlpd.with_family_defaults(tiny(tmp_path, env="Hopper-v5", dataset=path))
    from_minari = rlpd.load_prior_data(minari_args, rlpd.make_env(minari_args), cpu)
    from_file = rlpd.load_prior_data(file_args, rlpd.make_env(file_args), cpu)
    assert from_minari.size == len(np.concatenate([b.rewards for b in buffers])) and torch.equal(from_minari.rows, from_file.rows)


def test_minari_antmaze_online_with_the_official_settings(minari_root, tmp_path, monkeypatch):
    """AntMaze runs online now (Gymnasium-Robotics): the official command's settings are its family's defaults,
    and the reward bias -1 reaches the offline and the online rows alike."""
    saved = check_minari_antmaze_main(rlpd, minari_root, tmp_path, monkeypatch, **{**MINARI_TINY, "total_timesteps": 100,
                                      "learning_starts": 50, "save_model": True})
    assert (saved["hidden_layers"], saved["num_min_qs"], saved["backup_entropy"], saved["reward_bias"]) == (3, 1, False, -1.0)
    state = checkpoint(saved["run_dir"])
    assert len([k for k in state["agent"] if k.startswith("critic.linears.") and k.endswith(".weight")]) == 4
    online_rewards = state["online"]["rows"][:, 31 + 8]  # rows [s (31), a (8), r, m, s']
    assert state["online"]["size"] == 100 and (online_rewards == -1).all()  # random actions never reach the goal
    args = rlpd.with_family_defaults(tiny(tmp_path, env="test/antmaze/umaze-v1"))
    offline = rlpd.load_prior_data(args, rlpd.make_env(args), torch.device("cpu"))
    assert (offline.split(offline.rows[:offline.size])[2] == -1).all()


def test_minari_families_take_the_official_settings():
    for env, family, layers, backup in (("D4RL/pen/human-v2", "adroit", 3, False), ("D4RL/antmaze/large-play-v1", "antmaze", 3, False),
                                        ("mujoco/hopper/medium-v0", "locomotion", 2, True), ("hopper-medium-v2", "locomotion", 2, True)):
        args = rlpd.with_family_defaults(rlpd.Args(env=env))
        assert (rlpd.family_of(env), args.hidden_layers, args.backup_entropy) == (family, layers, backup), env
    assert rlpd.with_family_defaults(rlpd.Args(env="D4RL/antmaze/umaze-v1", num_min_qs=2)).num_min_qs == 2  # flags win


def test_antmaze_runs_as_d4rl(minari_root, monkeypatch):
    check_antmaze_eval_env(minari_root, monkeypatch, lambda env_id: rlpd.make_env(rlpd.Args(env=env_id)))


def test_minari_kitchen_trains_without_evaluation(minari_root, tmp_path, monkeypatch):
    check_kitchen_trains_without_evaluation(rlpd, minari_root, tmp_path, monkeypatch, **MINARI_TINY)


def test_minari_errors(tmp_path, monkeypatch):
    check_minari_errors(rlpd, tmp_path, monkeypatch, **MINARI_TINY)


def test_ant_matches_d4rl_ant_data():
    """ant-*: D4RL's 111-dim observation with the contact forces (27:) at zero, and no contact cost, i.e.
    Gymnasium's Ant-v4 without contact forces, zero-padded, step for step."""
    env, plain = rlpd.make_env(rlpd.Args(env="ant-medium-v2")), gym.make("Ant-v4")
    obs, plain_obs = env.reset(seed=0)[0], plain.reset(seed=0)[0]
    assert obs.shape == (111,) == env.observation_space.shape
    rng = np.random.default_rng(0)
    for _ in range(100):
        np.testing.assert_array_equal(obs, np.concatenate([plain_obs, np.zeros(84)]))
        act = rng.uniform(-1, 1, 8).astype(np.float32)
        (obs, rew, term, trunc, _), (plain_obs, plain_rew, *_) = env.step(act), plain.step(act)
        assert rew == plain_rew
        if term or trunc:
            break


# ----------------------------------------------------------------------------- resume
def test_stopped_and_resumed_run_ends_as_the_uninterrupted_run(tmp_path, marked_wiring_data):
    """CPU, one process: 300 steps in one go, or 150 (a checkpoint at an episode's end, the replay full at
    the stop's capacity) then resumed to 300: the same weights, optimizer states, replay and scores."""
    common = dict(env="WiringNoEnd-v0", dataset=marked_wiring_data, eval_interval=150, save_model=True, seed=3)
    whole = rlpd.main(tiny(tmp_path, run_dir=str(tmp_path / "whole"), **common))
    rlpd.main(tiny(tmp_path, run_dir=str(tmp_path / "first"), total_timesteps=150, **common))
    resumed = rlpd.main(tiny(tmp_path, run_dir=str(tmp_path / "second"), **common,
                             resume=str(tmp_path / "first" / "checkpoint.pt")))
    assert [e[:3] for e in resumed["evaluations"]] == [e[:3] for e in whole["evaluations"]]  # (no normalized score)
    assert resumed["updates"] == 150 * 2
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "second")
    assert a["step"] == b["step"] == 300
    for k in a["agent"]:
        assert torch.equal(a["agent"][k], b["agent"][k]), k
    for name in ("actor_opt", "critic_opt", "temp_opt"):
        for s, t in zip(a[name]["state"].values(), b[name]["state"].values()):
            assert all(torch.equal(s[k], t[k]) for k in s), name
    assert a["online"]["size"] == b["online"]["size"] and torch.equal(a["online"]["rows"], b["online"]["rows"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]


def test_full_replay_resumes_in_order_into_a_larger_capacity():
    check_full_replay_resumes_in_order(rlpd)


def test_resume_refuses_what_is_not_its_checkpoint(tmp_path):
    """Garbage, a truncated file, a foreign dict, sac_20min.py's checkpoint: one sentence, before the download."""
    sac_20min.main(sac_20min.Args(env="Pendulum-v1", total_timesteps=20, learning_starts=10, utd_ratio=1,
                                  batch_size=8, hidden_dim=8, eval_episodes=0, save_model=True, device="cpu",
                                  run_dir=str(tmp_path / "sac")))
    check_resume_refuses_non_checkpoints(rlpd, tmp_path, lambda path: tiny(tmp_path, resume=path),
                                         sibling=tmp_path / "sac" / "checkpoint.pt")


def test_resume_with_a_checkpoint_from_cuda(tmp_path, marked_wiring_data):
    """A checkpoint from a CUDA run (capturable Adam) resumes and trains on CPU."""
    args = tiny(tmp_path, env="Wiring-v0", dataset=marked_wiring_data, save_model=True, eval_episodes=0)
    rlpd.main(args)
    state = checkpoint(args.run_dir)
    for name in ("actor_opt", "critic_opt", "temp_opt"):
        for group in state[name]["param_groups"]:
            group["capturable"] = True
    torch.save(state, tmp_path / "from_cuda.pt")
    results = rlpd.main(tiny(tmp_path, env="Wiring-v0", dataset=marked_wiring_data, run_dir=str(tmp_path / "resumed"),
                             total_timesteps=350, eval_episodes=0, resume=str(tmp_path / "from_cuda.pt")))
    assert results["updates"] == 100 and np.isfinite(results["losses/critic_loss"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cli, message", [
    (["--env", "NoSuchEnv-v0", "--dataset", "{hopper}"], "unknown env 'NoSuchEnv-v0'"),
    (["--env", "hopper-mediocre-v2"], "is not a D4RL locomotion dataset"),
    (["--env", "Pendulum-v1"], "pass --dataset PATH"),
    (["--env", "Pendulum-v1", "--dataset", "{hopper}"], "have 11/3 dims but Pendulum-v1 has 3/1"),
    (["--dataset", "{missing}"], "does not exist"),
    (["--env", "antmaze-umaze-v2"], "needs mujoco-py; the same data from Minari runs"),
    (["--offline-ratio", "1.0", "--dataset", "{hopper}"], "--offline-ratio must be in [0, 1)"),
    (["--num-min-qs", "11", "--dataset", "{hopper}"], "--num-min-qs must be between 1 and --num-qs"),
    pytest.param(["--device", "cuda", "--dataset", "{hopper}"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input(tmp_path, hopper_files, cli, message):
    cli = [c.format(hopper=hopper_files["next"], missing=tmp_path / "no.hdf5") for c in cli]
    proc = run_script("rlpd.py", "--run-dir", str(tmp_path / "run"), "--total-timesteps", "10", *cli)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path, hopper_files):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("old run")
    proc = run_script("rlpd.py", "--dataset", hopper_files["next"], "--run-dir", str(tmp_path / "run"),
                      "--total-timesteps", "10")
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "old run"
