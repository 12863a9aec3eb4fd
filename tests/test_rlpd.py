"""rlpd.py: real UTD blocks through main() with prior data, symmetric sampling, the random
target subset, the batched ensemble, download from a mirror, bad input."""

import copy
import os

import numpy as np
import pytest
import torch

import rlpd
from conftest import assert_finite_losses, compiled_matches_eager, run_script, tensorboard_events

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


def batch(n):
    g = torch.Generator().manual_seed(0)
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
def test_cuda_graph_replay_equals_eager_update():
    device = torch.device("cuda")
    torch.manual_seed(0)
    agent = rlpd.RLPD(11, 3, rlpd.Args(), device)
    data = [torch.randn(20 * 256, 11, device=device), torch.rand(20 * 256, 3, device=device) * 2 - 1,
            torch.randn(20 * 256, device=device), torch.ones(20 * 256, device=device),
            torch.randn(20 * 256, 11, device=device)]
    replay = rlpd.cuda_graph(lambda: agent.update(*data))
    twin = copy.deepcopy(agent)
    state = torch.cuda.get_rng_state()
    replay()
    torch.cuda.set_rng_state(state)  # the same actor noise and target subsets in both
    twin.update(*data)
    for (name, p), q in zip(agent.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-5), name


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cli, message", [
    (["--env", "NoSuchEnv-v0", "--dataset", "{hopper}"], "unknown env 'NoSuchEnv-v0'"),
    (["--env", "hopper-mediocre-v2"], "is not a D4RL locomotion dataset"),
    (["--env", "Pendulum-v1"], "pass --dataset PATH"),
    (["--env", "Pendulum-v1", "--dataset", "{hopper}"], "have 11/3 dims but Pendulum-v1 has 3/1"),
    (["--dataset", "{missing}"], "does not exist"),
    (["--env", "antmaze-umaze-v2"], "not in Gymnasium"),
    (["--offline-ratio", "1.0", "--dataset", "{hopper}"], "--offline-ratio must be in [0, 1)"),
    (["--num-min-qs", "11", "--dataset", "{hopper}"], "--num-min-qs must be between 1 and --num-qs"),
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
