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
import sac_20min
from conftest import assert_finite_losses, compiled_matches_eager, run_script, tensorboard_events

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
    b, a = sac_20min.butterworth_lowpass(5.0, 20.0)
    np.testing.assert_allclose(b, [0.292893, 0.585786, 0.292893], atol=1e-6)
    np.testing.assert_allclose(a, [0.0, 0.171573], atol=1e-6)
    # gain: 1 at DC, 1/sqrt(2) (-3 dB) at the cutoff, for another cutoff too
    b, a = sac_20min.butterworth_lowpass(2.0, 20.0)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_update():
    device = torch.device("cuda")
    torch.manual_seed(0)
    agent = sac_20min.SAC(3, 1, sac_20min.Args(), device)
    buffer = sac_20min.ReplayBuffer(1000, 3, 1, device)
    for i in range(1000):
        buffer.add(np.random.randn(3), np.random.uniform(-1, 1, 1), np.random.randn(), 1.0, np.random.randn(3))
    data = [t.clone() for t in buffer.sample(20 * 256)]  # one fixed batch for both: the graph reads it
    replay = sac_20min.cuda_graph(lambda: agent.update(*data))
    twin = copy.deepcopy(agent)
    state = torch.cuda.get_rng_state()
    replay()
    torch.cuda.set_rng_state(state)  # the same dropout masks and actor noise in both
    twin.update(*data)
    for (name, p), q in zip(agent.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-5), name


# ----------------------------------------------------------------------------- learning
def test_solves_pendulum(tmp_path):
    """DroQ-style SAC at UTD 10 balances Pendulum-v1 (mean return > -250) within 2,500 steps."""
    args = sac_20min.Args(env="Pendulum-v1", total_timesteps=2500, learning_starts=500, utd_ratio=10, hidden_dim=64,
                          eval_interval=0, eval_episodes=10, log_interval=500, seed=0, device="cpu",
                          run_dir=str(tmp_path / "run"))
    results = sac_20min.main(args)
    assert results["eval/return"] > -250, results["evaluations"]


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
