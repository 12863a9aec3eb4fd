"""iql.py: real gradient steps through main(), the math on hand-computed numbers,
a toy task only IQL solves, learning on Pendulum, and every bad input."""

import copy
import glob
import math
import os

import numpy as np
import pytest
import torch

import datasets
import iql
from conftest import (assert_finite_losses, check_antmaze_eval_env, check_kitchen_trains_without_evaluation,
                      check_main_feeds_update_aligned_transitions, check_minari_antmaze_main, check_minari_errors,
                      check_minari_hopper_main, check_minari_loads_as_d4rl, check_resume_equals_the_uninterrupted_run,
                      check_resume_refuses_non_checkpoints, compiled_matches_eager, graph_replays_match_eager_steps,
                      random_batch, run_script, tensorboard_events, tiny_args)


# ----------------------------------------------------------------------------- main() end to end
@pytest.mark.parametrize("kind", ["next", "nonext"])
def test_main_tiny_hopper(hopper_files, tmp_path, kind):
    args = tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files[kind], save_model=True,
                     capture_video=kind == "next")
    results = iql.main(args)
    assert results["updates"] == 300
    assert_finite_losses(results)
    assert np.isfinite(results["eval/normalized_score"]) and results["updates_per_second"] > 0
    assert [e[0] for e in results["evaluations"]] == [150, 300]
    for _, ret, _, score in results["evaluations"]:  # d4rl's hopper: random -20.272305, expert 3234.3
        assert score == pytest.approx(100 * (ret + 20.272305) / (3234.3 + 20.272305))
    assert tensorboard_events(args.run_dir)
    for name in ("checkpoint.pt", "evaluations.csv", "args.json"):
        assert os.path.isfile(os.path.join(args.run_dir, name)), name
    if args.capture_video:  # the first episode of each evaluation, rendered headless
        assert len(glob.glob(os.path.join(args.run_dir, "videos", "*.mp4"))) == 2


def test_resume_continues_the_run(hopper_files, tmp_path):
    args = tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], save_model=True,
                     max_steps=200, eval_interval=0)
    iql.main(args)
    ckpt = os.path.join(args.run_dir, "checkpoint.pt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 200 and int(saved["agent"]["num_updates"]) == 200
    resumed = iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"],
                                 save_model=True, max_steps=300, eval_interval=0, resume=ckpt, run_dir=None))
    assert resumed["updates"] == 100 and resumed["run_dir"] == args.run_dir
    assert [e[0] for e in resumed["evaluations"]] == [200, 300]  # the first part's evaluations are kept
    assert int(torch.load(ckpt, weights_only=False)["agent"]["num_updates"]) == 300


def test_resume_equals_the_uninterrupted_run(hopper_files, tmp_path):
    check_resume_equals_the_uninterrupted_run(iql, tmp_path, ("actor_opt", "critic_opt", "value_opt"),
                                              env="hopper-medium-v2", dataset=hopper_files["next"])


def test_resume_keeps_the_lr_schedule_linked(hopper_files, tmp_path):
    args = tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], save_model=True,
                     max_steps=20, eval_interval=0, eval_episodes=0)
    iql.main(args)
    state = torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=False)
    agent = iql.IQL(11, 3, iql.with_family_defaults(args), torch.device("cpu"))
    iql.restore(agent, state, torch.device("cpu"))
    assert agent.actor_opt.param_groups[0]["lr"] is agent.actor_lr  # the schedule writes into Adam's lr
    assert agent.actor_lr.item() == state["actor_opt"]["param_groups"][0]["lr"].item()


def test_a_cuda_checkpoint_resumes_on_cpu(hopper_files, tmp_path):
    """A checkpoint written on CUDA has capturable Adam param groups; CPU Adam refuses those."""
    args = tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], save_model=True,
                     max_steps=20, eval_interval=0, eval_episodes=0)
    iql.main(args)
    ckpt = os.path.join(args.run_dir, "checkpoint.pt")
    state = torch.load(ckpt, weights_only=False)
    for opt in ("actor_opt", "critic_opt", "value_opt"):
        for group in state[opt]["param_groups"]:
            group["capturable"] = True  # as saved by a run on CUDA (map_location put the tensors on the CPU)
    torch.save(state, ckpt)
    resumed = iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], save_model=True,
                                 max_steps=30, eval_interval=0, eval_episodes=0, resume=ckpt, run_dir=None))
    assert resumed["updates"] == 10
    assert_finite_losses(resumed)


def test_resume_refuses_what_is_not_an_iql_checkpoint(hopper_files, tmp_path, monkeypatch):
    """Garbage, a truncated file, a dict of unknown origin, idql.py's checkpoint: one sentence, before a
    D4RL name's download (no server here) or a Minari id's (offline) is tried."""
    import huggingface_hub.constants
    import idql
    idql.main(tiny_args(idql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"], max_steps=1,
                        eval_episodes=0, actor_hidden=32, save_model=True, run_dir=str(tmp_path / "idql")))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for env in ("hopper-medium-v2", "mujoco/hopper/medium-v0"):
        check_resume_refuses_non_checkpoints(iql, tmp_path, lambda path: tiny_args(
            iql, tmp_path, env=env, resume=path, run_dir=str(tmp_path / "new")), tmp_path / "idql" / "checkpoint.pt")


def test_main_feeds_update_aligned_transitions(hopper_files, tmp_path, monkeypatch):
    check_main_feeds_update_aligned_transitions(iql, iql.IQL, hopper_files["next"], tmp_path, monkeypatch,
                                                eval_episodes=0)


def test_antmaze_trains_offline_without_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    path = datasets.write_d4rl(str(tmp_path / "antmaze.hdf5"), rng.normal(size=(n, 29)), rng.uniform(-1, 1, (n, 8)),
                               rng.integers(0, 2, n), np.zeros(n), np.arange(n) % 100 == 99)
    with pytest.raises(SystemExit, match="--eval-episodes 0"):
        iql.main(tiny_args(iql, tmp_path, env="antmaze-umaze-v2", dataset=path, eval_episodes=None))
    results = iql.main(tiny_args(iql, tmp_path, env="antmaze-umaze-v2", dataset=path, eval_episodes=0, max_steps=100))
    assert results["updates"] == 100 and "eval/return" not in results
    assert_finite_losses(results)


def test_ant_evaluates_in_the_env_d4rl_recorded():
    """D4RL's ant-v2 files: observation dims 27: all zero, rewards without the contact cost."""
    env = iql.make_env("ant-medium-v2")
    raw = iql.gym.make("Ant-v4", use_contact_forces=True)  # what Gymnasium gives: forces and their cost
    obs, _ = env.reset(seed=0)
    raw_obs, _ = raw.reset(seed=0)
    rng = np.random.default_rng(0)
    forces = 0.0
    for _ in range(30):
        act = rng.uniform(-1, 1, 8).astype(np.float32)
        assert obs.shape == (111,) and not obs[27:].any()
        obs, reward, _, _, info = env.step(act)
        raw_obs, *_ = raw.step(act)
        forces += np.abs(raw_obs[27:]).sum()
        # forward velocity + healthy reward - control cost (weight 0.5), and no contact cost term
        assert reward == pytest.approx(info["x_velocity"] + 1.0 - 0.5 * np.square(act).sum(), abs=1e-9)
    assert forces > 0  # the ant touched the ground: the raw env's dims 27: are not zero


# ----------------------------------------------------------------------------- Minari datasets
def test_minari_hopper_through_main(minari_root, tmp_path, monkeypatch):
    check_minari_hopper_main(iql, minari_root, tmp_path, monkeypatch)


def test_minari_loads_as_the_same_d4rl_file(minari_root, tmp_path, monkeypatch):
    check_minari_loads_as_d4rl(iql, minari_root, tmp_path, monkeypatch)


def test_minari_antmaze_through_main(minari_root, tmp_path, monkeypatch):
    """AntMaze from Minari: the family's defaults (expectile 0.9, beta 10, r - 1) and D4RL's 0/1 score."""
    resolved = check_minari_antmaze_main(iql, minari_root, tmp_path, monkeypatch)
    assert (resolved["expectile"], resolved["beta"]) == (0.9, 10.0)


def test_minari_ids_name_their_family():
    for env, family in (("D4RL/pen/human-v2", "adroit"), ("D4RL/antmaze/large-play-v1", "antmaze"), ("D4RL/kitchen/mixed-v2", "kitchen"),
                        ("mujoco/walker2d/expert-v0", "locomotion"), ("antmaze-umaze-v2", "antmaze"), ("Hopper-v4", "locomotion")):
        assert iql.family_of(env) == family, env


def test_antmaze_evaluates_as_d4rl(minari_root, monkeypatch):
    check_antmaze_eval_env(minari_root, monkeypatch, iql.make_env)


def test_minari_kitchen_trains_without_evaluation(minari_root, tmp_path, monkeypatch):
    check_kitchen_trains_without_evaluation(iql, minari_root, tmp_path, monkeypatch)


def test_minari_image_observations_are_refused(tmp_path, monkeypatch):
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    images = iql.gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    episode = EpisodeBuffer(observations=np.zeros((4, 8, 8, 3), np.uint8), actions=np.zeros((3, 2), np.float32),
                            rewards=np.zeros(3), terminations=np.array([0, 0, 1], bool), truncations=np.zeros(3, bool))
    minari.create_dataset_from_buffers("test/pixels/tiny-v0", [episode], observation_space=images,
                                       action_space=iql.gym.spaces.Box(-1, 1, (2,)), algorithm_name="none", author="tests",
                                       author_email="none", code_permalink="none", description="images")
    with pytest.raises(SystemExit, match=r"test/pixels/tiny-v0 has observations of shape \(8, 8, 3\); these networks take vectors"):
        iql.read_minari("test/pixels/tiny-v0")


def test_minari_errors(tmp_path, monkeypatch):
    check_minari_errors(iql, tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- wiring of one update
def test_one_update_is_wired_as_the_paper():
    torch.manual_seed(0)
    args = iql.Args(hidden_dim=32, tau=0.1, lr_decay_steps=100)
    agent = iql.IQL(11, 3, iql.with_family_defaults(args), torch.device("cpu"))
    with torch.no_grad():  # the online Q moves away from the target Q, as after some training
        for p in agent.critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
        agent.actor.log_std.fill_(-0.5)  # away from 0, where log N's -log_std term vanishes
    agent.num_updates.fill_(50)  # halfway through the cosine schedule: lr = lr0 / 2
    before = copy.deepcopy(agent)
    obs, act, rew, mask, next_obs = batch = random_batch()
    out = agent.update(*batch)
    with torch.no_grad():
        q_target = before.critic_target(obs, act).min(0).values  # the target twin Q, not the online one
        u = q_target - before.value(obs).squeeze(-1)
        value_loss = (torch.where(u < 0, 0.3, 0.7) * u ** 2).mean()  # |tau - 1(u<0)| u^2, tau 0.7
        assert out["losses/value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)
        # AWR weights from the V just updated; log N(a; tanh(mu(s)), exp(log_std)^2), the old actor
        weight = torch.exp(3.0 * (q_target - agent.value(obs).squeeze(-1))).clamp(max=100.0)
        normal = torch.distributions.Normal(before.actor(obs), before.actor.log_std.exp())
        actor_loss = -(weight * normal.log_prob(act).sum(-1)).mean()
        assert out["losses/actor_loss"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
        # Q's backup: r + gamma * m * V(s') with the new V (not V(s), not without the terminal mask)
        backup = rew + 0.99 * mask * agent.value(next_obs).squeeze(-1)
        critic_loss = (before.critic(obs, act) - backup).pow(2).sum(0).mean()
        assert out["losses/critic_loss"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    # Polyak: target <- target + tau (Q_new - target), once per update
    for new, old, online in zip(agent.critic_target.parameters(), before.critic_target.parameters(),
                                agent.critic.parameters()):
        assert torch.allclose(new, old + 0.1 * (online - old), atol=1e-6)
    # the actor's step used the scheduled lr: Adam's first step moves a weight by at most lr, the
    # ones with clear gradients by lr itself
    lr = 3e-4 * 0.5 * (1 + math.cos(math.pi * 50 / 100))
    assert agent.actor_opt.param_groups[0]["lr"].item() == pytest.approx(lr, rel=1e-6)
    moved = max((p - q).abs().max().item() for p, q in zip(agent.actor.parameters(), before.actor.parameters()))
    assert moved == pytest.approx(lr, rel=1e-3)
    assert out["values/actor_lr"].item() == pytest.approx(lr, rel=1e-6)


def test_target_updates_record_no_autograd():
    """A Polyak step recorded by autograd chains every target tensor to all past steps (memory grows)."""
    agent = iql.IQL(11, 3, iql.with_family_defaults(iql.Args(hidden_dim=32)), torch.device("cpu"))
    for _ in range(3):
        agent.update(*random_batch())
    assert all(p.grad_fn is None for p in agent.critic_target.parameters())


# ----------------------------------------------------------------------------- the math by hand
def test_reward_scaling_two_trajectories():
    rewards = np.array([1.0, 2.0, 3.0, 0.5, 0.5], dtype=np.float32)  # returns 6 and 1
    ends = np.array([False, False, True, False, True])
    assert np.allclose(iql.normalize_rewards(rewards, ends), rewards * 1000 / 5)
    with pytest.raises(SystemExit, match="different returns"):
        iql.normalize_rewards(np.ones(4, np.float32), np.array([False, True, False, True]))


def _episodes():
    """Two episodes: rows 0-2 end by a timeout (row 2), rows 3-4 by a terminal (row 4)."""
    obs = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    return dict(observations=obs, actions=np.zeros((5, 1), np.float32), rewards=np.arange(5, dtype=np.float32),
                terminals=np.array([0, 0, 0, 0, 1], bool), timeouts=np.array([0, 0, 1, 0, 0], bool))


def test_timeouts_are_not_terminal():
    data = _episodes()
    data["next_observations"] = np.array([1, 2, 2.5, 4, 4.5], np.float32)[:, None] * np.ones((1, 2), np.float32)
    t = iql.qlearning_transitions(data)
    assert len(t["observations"]) == 5  # with next_observations the timeout step is kept...
    assert t["masks"].tolist() == [1, 1, 1, 1, 0]  # ...and bootstraps (m = 1); only the terminal stops
    assert t["ends"].tolist() == [False, False, True, False, True]


def test_next_observation_rebuild():
    t = iql.qlearning_transitions(_episodes())
    # row 2 (timeout) is dropped: its next row starts another episode. Row 4 is terminal: kept, m = 0.
    assert t["rewards"].tolist() == [0, 1, 3, 4]
    assert t["next_observations"][:, 0].tolist() == [1, 2, 4, 4]
    assert t["masks"].tolist() == [1, 1, 1, 0]
    assert t["ends"].tolist() == [False, True, False, True]


def test_d4rl_names_and_urls():
    base = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    assert iql.d4rl_url("hopper-medium-v2") == f"{base}/gym_mujoco_v2/hopper_medium-v2.hdf5"
    assert iql.d4rl_url("halfcheetah-medium-expert-v2") == f"{base}/gym_mujoco_v2/halfcheetah_medium_expert-v2.hdf5"
    assert iql.d4rl_url("antmaze-large-diverse-v2").endswith(
        "ant_maze_v2/Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse_fixed.hdf5")
    assert iql.d4rl_url("pen-human-v1") == f"{base}/hand_dapg_v1/pen-human-v1.hdf5"
    assert iql.d4rl_url("hopper-medium-v9") is None and iql.d4rl_url("Pendulum-v1") is None
    assert [iql.family_of(e) for e in ("hopper-medium-v2", "antmaze-umaze-v2", "kitchen-mixed-v0", "door-human-v1",
                                       "Pendulum-v1")] == ["locomotion", "antmaze", "kitchen", "adroit", "locomotion"]
    assert iql.reference_scores("hopper-medium-v2") == iql.reference_scores("Hopper-v4") == (-20.272305, 3234.3)
    assert iql.reference_scores("Pendulum-v1") is None  # main() scores NaN


# ----------------------------------------------------------------------------- a toy only IQL solves
def _train_toy(beta, expectile, steps, seed=0):
    """One-step task: action +0.8 earns 1 but is 20% of the data; action -0.5 earns 0 and is 80%."""
    torch.manual_seed(seed)
    n = 2000
    good = torch.rand(n) < 0.2
    obs = torch.randn(n, 2)
    act = torch.where(good, 0.8, -0.5)[:, None]
    rew, mask = good.float(), torch.zeros(n)  # every step ends the episode: Q(s, a) = r
    args = iql.Args(hidden_dim=64, lr_decay_steps=steps, expectile=expectile, beta=beta)
    agent = iql.IQL(2, 1, args, torch.device("cpu"))
    for _ in range(steps):
        i = torch.randint(0, n, (256,))
        agent.update(obs[i], act[i], rew[i], mask[i], obs[i])
    with torch.no_grad():
        test_obs = torch.randn(256, 2)
        v = agent.value(test_obs).mean().item()
        return agent.actor(test_obs).mean().item(), v, good.float().mean().item()


def test_iql_picks_the_rare_good_action_where_bc_does_not():
    action_iql, v_iql, p = _train_toy(beta=10.0, expectile=0.7, steps=1000)
    action_bc, *_ = _train_toy(beta=0.0, expectile=0.7, steps=400)  # beta = 0: weights 1, plain BC
    assert action_iql > 0.7, action_iql  # the good action, +0.8 (0.796-0.799 on seeds 0-5)
    assert action_bc < 0.0, action_bc  # BC averages the modes: 0.2 * 0.8 + 0.8 * (-0.5) = -0.24
    # V: the 0.7-expectile of Q over the data's actions, p good: 0.7 p (1 - v) = 0.3 (1 - p) v,
    # v = 0.368 at p = 0.2 (0.5-expectile: 0.2; 0.3: 0.097). Seeds 0-5 land within 0.03 of it
    assert v_iql == pytest.approx(0.7 * p / (0.7 * p + 0.3 * (1 - p)), abs=0.06)


def test_pendulum_iql_beats_the_data(pendulum_file, tmp_path):
    """The learnt policy swings up and holds the pendulum from some starts, not from others (about
    -120 or -1000 an episode): the mean of 50 episodes, with a margin outside the seeds' spread."""
    path, data_returns = pendulum_file
    args = tiny_args(iql, tmp_path, env="Pendulum-v1", dataset=path, hidden_dim=64, batch_size=256,
                     beta=10.0, max_steps=10_000, log_interval=2000, eval_interval=0,
                     eval_episodes=50, seed=0)
    results = iql.main(args)
    print(f"pendulum: data {data_returns.mean():.1f}, IQL {results['eval/return']:.1f}")
    # 50 episodes, 1 thread: data -838; IQL -444 (seed 0), -477, -679, -457 (seeds 1-3).
    # Untrained or broken: about -1200
    assert results["eval/return"] > data_returns.mean() + 50


# ----------------------------------------------------------------------------- bad input
def test_unknown_env(tmp_path, hopper_files):
    with pytest.raises(SystemExit, match="unknown D4RL dataset 'hopper-mediocre-v2'"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-mediocre-v2"))
    with pytest.raises(SystemExit, match="unknown env 'NoSuchEnv-v0'"):
        iql.main(tiny_args(iql, tmp_path, env="NoSuchEnv-v0", dataset=hopper_files["next"]))


def test_missing_and_corrupt_dataset(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=str(tmp_path / "nope.hdf5")))
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(SystemExit, match="not a readable HDF5 file"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=str(corrupt)))
    no_actions = tmp_path / "no_actions.hdf5"
    import h5py
    with h5py.File(no_actions, "w") as f:
        f["observations"] = np.zeros((10, 11), np.float32)
    with pytest.raises(SystemExit, match="has no actions, rewards, terminals"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=str(no_actions)))


def test_dataset_that_does_not_match_the_env(tmp_path, hopper_files):
    with pytest.raises(SystemExit, match="11/3 dims but walker2d-medium-v2 has"):
        iql.main(tiny_args(iql, tmp_path, env="walker2d-medium-v2", dataset=hopper_files["next"]))
    n = 50
    wide = datasets.write_d4rl(str(tmp_path / "wide.hdf5"), np.zeros((n, 11)), np.full((n, 3), 3.0), np.ones(n),
                               np.zeros(n), np.arange(n) % 10 == 9)
    with pytest.raises(SystemExit, match="actions leave"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=wide))


def test_existing_run_folder_is_never_overwritten(tmp_path, hopper_files):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("old run")
    proc = run_script("iql.py", "--env", "hopper-medium-v2", "--dataset", hopper_files["next"],
                      "--run-dir", str(tmp_path / "run"), "--max-steps", "10")
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "old run"



@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_sentence(tmp_path, hopper_files):
    proc = run_script("iql.py", "--env", "hopper-medium-v2", "--dataset", hopper_files["next"],
                      "--run-dir", str(tmp_path / "run"), "--device", "cuda")
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()

def test_nan_in_a_loss_stops_and_names_it(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    rewards = rng.normal(size=n)
    rewards[5] = np.nan
    path = datasets.write_d4rl(str(tmp_path / "nan.hdf5"), rng.normal(size=(n, 11)), rng.uniform(-1, 1, (n, 3)),
                               rewards, np.zeros(n), np.arange(n) % 20 == 19)
    with pytest.raises(SystemExit, match=r"losses/\w+_loss became nan at step 100"):
        iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=path, normalize_rewards=False))


# ----------------------------------------------------------------------------- download
def test_download_into_the_d4rl_cache(tmp_path, local_server, hopper_files, monkeypatch):
    www, url = local_server
    (www / "gym_mujoco_v2" / "hopper_medium-v2.hdf5").write_bytes(open(hopper_files["next"], "rb").read())
    cache = tmp_path / "cache"
    monkeypatch.setenv("D4RL_BASE_URL", url)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    results = iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", max_steps=20, eval_episodes=0))
    assert results["updates"] == 20
    assert os.listdir(cache) == ["hopper_medium-v2.hdf5"]  # renamed from its temp file, nothing left over


def test_download_failure_names_the_file_and_where_to_put_it(tmp_path, local_server, monkeypatch):
    _, url = local_server  # the mirror has no file: 404
    monkeypatch.setenv("D4RL_BASE_URL", url)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    expected = str(tmp_path / "cache" / "walker2d_medium-v2.hdf5")
    with pytest.raises(SystemExit, match="could not download") as e:
        iql.main(tiny_args(iql, tmp_path, env="walker2d-medium-v2"))
    assert expected in str(e.value) and "--dataset" in str(e.value)
    assert os.listdir(tmp_path / "cache") == []  # no partial file left behind
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no network
    with pytest.raises(SystemExit, match="could not download"):
        iql.main(tiny_args(iql, tmp_path, env="walker2d-medium-v2"))


# ----------------------------------------------------------------------------- speed paths
def test_compiled_update_matches_eager():
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(64, 11, generator=g), torch.rand(64, 3, generator=g) * 2 - 1, torch.randn(64, generator=g),
             torch.ones(64), torch.randn(64, 11, generator=g)]
    compiled_matches_eager(lambda: iql.IQL(11, 3, iql.with_family_defaults(iql.Args(hidden_dim=32)), torch.device("cpu")), batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_steps():
    torch.manual_seed(0)
    args = iql.Args(lr_decay_steps=6)  # the lr changes at every step and reaches 0 within the test
    agent = iql.IQL(11, 3, iql.with_family_defaults(args), torch.device("cuda"))
    graph_replays_match_eager_steps(iql, agent, batch_size=256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_then_capture_keeps_the_lr_schedule(hopper_files, tmp_path):
    """Resumed on CUDA, then captured: the schedule must still reach the optimizer the graph steps."""
    run = lambda **kw: iql.main(tiny_args(iql, tmp_path, env="hopper-medium-v2", dataset=hopper_files["next"],  # noqa: E731
                                          device="cuda", save_model=True, eval_interval=0, eval_episodes=0,
                                          lr_decay_steps=40, **kw))
    run(max_steps=10)
    ckpt = os.path.join(str(tmp_path / "run"), "checkpoint.pt")
    resumed = run(max_steps=30, resume=ckpt)
    assert resumed["updates"] == 20
    lr = torch.load(ckpt, weights_only=False)["actor_opt"]["param_groups"][0]["lr"]  # what Adam used last
    assert lr.item() == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 29 / 40)), rel=1e-5)
