"""tests/parity.py and the official side's data handling (tests/parity_peer_jax.py): the intervals on
hand-computed numbers, d4rl.qlearning_dataset's semantics on a hand-made file, and the harness end to
end on a tiny file (our side only: the peer needs its JAX venv and checkout)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import datasets
import parity
import parity_peer_cleanrl
import parity_peer_corl
import parity_peer_jax


def test_intervals_by_hand():
    mean, half = parity.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.3027
    assert mean == 2.0 and half == pytest.approx(4.3027 / np.sqrt(3), abs=1e-4)
    # Welch: a = [1, 2, 3], b = [4, 5, 6]: se^2 = 1/3 + 1/3, df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, t = 2.7764
    diff, half = parity.difference_ci([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert diff == -3.0 and half == pytest.approx(2.7764 * np.sqrt(2 / 3), abs=1e-4)


def test_peer_data_follows_d4rl_qlearning_dataset(tmp_path):
    """s' is the next row; a timeout step and the last row are dropped; actions clipped 1e-5 inside
    [-1, 1]; trajectories end at a terminal or where the next row is not s'; rewards scaled by
    1000 / (max - min trajectory return)."""
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    act = np.array([[1.0], [-1.0], [0.5], [0.0], [0.2], [1.0], [0.3], [0.1]], np.float32)
    rew = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32)
    terminals = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)  # episode 0-1 ends by termination
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)  # episode 2-4 is cut at row 4
    path = datasets.write_d4rl(str(tmp_path / "d.hdf5"), obs, act, rew, terminals, timeouts)
    data = parity_peer_jax.qlearning_dataset(path)
    kept = [0, 1, 2, 3, 5, 6]  # row 4 (a timeout) and row 7 (the last) are dropped
    assert np.array_equal(data["observations"][:, 0], np.array(kept, np.float32))
    assert np.array_equal(data["next_observations"][:, 0], np.array(kept, np.float32) + 1)
    assert np.array_equal(data["actions"][:, 0], np.clip(act[kept, 0], -1 + 1e-5, 1 - 1e-5))
    assert np.array_equal(data["terminals"], [0, 1, 0, 0, 0, 0])
    assert np.array_equal(data["dones"], [0, 1, 0, 1, 0, 1])  # terminal; s' 4 is not row 5; the end
    # trajectory returns 1 + 2, 3 + 4, 6 + 7: scale 1000 / (13 - 3)
    assert np.allclose(parity_peer_jax.normalize(data["rewards"], data["dones"]),
                       np.array([1, 2, 3, 4, 6, 7]) * 100.0)


def test_harness_runs_our_side_and_prints_the_table(hopper_files, tmp_path, capsys):
    out = tmp_path / "study"
    common = ["iql", "--dataset", hopper_files["next"], "--steps", "100", "--seeds", "0", "1",
              "--eval-interval", "50", "--eval-episodes", "1", "--out", str(out)]
    result = parity.main(common)
    lines = result.splitlines()
    assert lines[0] == "| step | iql.py |" and [l.split(" |")[0] for l in lines[2:]] == ["| 50", "| 100"]
    ours = [parity.read_scores(str(out / f"ours_s{s}")) for s in (0, 1)]
    assert all(sorted(r) == [50, 100] for r in ours) and ours[0] != ours[1]  # two real seeds
    m, half = parity.mean_ci([r[100] for r in ours])
    assert f"| 100 | {m:.1f} +- {half:.1f} |" in result
    assert "reused" not in capsys.readouterr().out
    assert parity.main(common) == result  # finished runs are reused, not run again
    assert "reused" in capsys.readouterr().out
    (out / "ours_s0" / "evaluations.csv").write_text("step,return,return_std,normalized_score\n50,1,0,1\n")
    with pytest.raises(SystemExit, match="holds an unfinished run"):
        parity.main(common)
    with pytest.raises(SystemExit, match="--peer-src and --peer-python go together"):
        parity.main(common + ["--peer-src", str(tmp_path)])


def test_online_pair_runs_our_side_with_the_official_loops_data(tmp_path):
    """sac_20min: environment steps, returns, the UTD set, and no held-out transitions (the official
    loop trains on all of them)."""
    out = tmp_path / "online"
    result = parity.main(["sac_20min", "--steps", "40", "--utd-ratio", "2", "--seeds", "0", "--eval-interval", "20",
                          "--eval-episodes", "1", "--out", str(out)])
    assert result.splitlines()[0] == "| step | sac_20min.py |"
    assert sorted(parity.read_scores(str(out / "ours_s0"), "return")) == [20, 40]
    args = json.load(open(out / "ours_s0" / "args.json"))
    assert (args["env"], args["total_timesteps"], args["utd_ratio"], args["validation_fraction"]) == \
        ("Hopper-v4", 40, 2, 0.0)
    with pytest.raises(SystemExit, match="trains online; it takes no --dataset"):
        parity.main(["sac_20min", "--dataset", str(tmp_path), "--out", str(out)])


def test_rlpd_pair_gives_both_sides_the_dataset_and_the_official_start(hopper_files, tmp_path):
    out = tmp_path / "rlpd"
    result = parity.main(["rlpd", "--dataset", hopper_files["next"], "--steps", "30", "--seeds", "0",
                          "--eval-interval", "15", "--eval-episodes", "1", "--out", str(out)])
    assert result.splitlines()[0] == "| step | rlpd.py |"
    args = json.load(open(out / "ours_s0" / "args.json"))
    assert (args["dataset"], args["total_timesteps"], args["utd_ratio"], args["learning_starts"]) == \
        (hopper_files["next"], 30, 4, 5000)
    cli = type("Cli", (), dict(pair="rlpd", peer_python="py", peer_src="src", env="hopper-medium-v2", steps=30,
                               eval_interval=15, eval_episodes=1, dataset=hopper_files["next"], utd_ratio=4))
    peer = parity.peer_command(cli, 0, "out")
    assert peer[peer.index("--env") + 1] == "Hopper-v4" and peer[peer.index("--dataset") + 1] == hopper_files["next"]
    assert peer[peer.index("--learning-starts") + 1] == "5000" and peer[peer.index("--system") + 1] == "rlpd"
    with pytest.raises(SystemExit, match="rlpd needs --dataset"):
        parity.main(["rlpd", "--out", str(out)])


# ----------------------------------------------------------------------------- the PyTorch peers
# They run in this venv; tests that import the peer's code need its checkout, named by CORL_SRC (a
# folder with algorithms/offline/iql.py and configs/) or CLEANRL_SRC (cleanrl/ and cleanrl_utils/),
# and are skipped without it.
CORL_SRC, CLEANRL_SRC = os.environ.get("CORL_SRC"), os.environ.get("CLEANRL_SRC")
needs_corl = pytest.mark.skipif(not (CORL_SRC and os.path.isdir(CORL_SRC)), reason="set CORL_SRC to a CORL checkout")
needs_cleanrl = pytest.mark.skipif(not (CLEANRL_SRC and os.path.isdir(CLEANRL_SRC)),
                                   reason="set CLEANRL_SRC to a CleanRL checkout")


def cli_of(pair, **kw):
    fields = dict(pair=pair, peer_python=sys.executable, peer_src="src", env=parity.PAIRS[pair]["env"], steps=30,
                  eval_interval=15, eval_episodes=1, dataset="d.hdf5", utd_ratio=parity.PAIRS[pair].get("utd_ratio"))
    return type("Cli", (), {**fields, **kw})


def test_corl_pair_trains_our_side_as_the_iql_pair_and_its_peer_in_this_venv(hopper_files, tmp_path):
    assert parity.ours_command(cli_of("iql-corl"), 0, "o") == parity.ours_command(cli_of("iql"), 0, "o")
    peer = parity.peer_command(cli_of("iql-corl"), 0, "o")
    assert peer[:2] == [sys.executable, os.path.join(parity.ROOT, "tests", "parity_peer_corl.py")]
    assert peer[peer.index("--env") + 1] == "hopper-medium-v2" and peer[peer.index("--dataset") + 1] == "d.hdf5"
    # --peer-src alone is enough for the PyTorch peers (it gets as far as the runs, here unfinished
    # ones, so nothing runs); the JAX pairs still need their venv's python
    for side in ("ours_s0", "peer_s0"):
        (tmp_path / "o" / side).mkdir(parents=True)
    for pair, message in (("iql-corl", "holds an unfinished run"), ("iql", "--peer-src and --peer-python go together")):
        with pytest.raises(SystemExit, match=message):
            parity.main([pair, "--dataset", hopper_files["next"], "--seeds", "0", "--peer-src", str(tmp_path),
                         "--out", str(tmp_path / "o")])


def test_cleanrl_pair_sets_sac_20min_to_cleanrls_settings(tmp_path):
    """UTD 1, plain critics (no dropout, no LayerNorm), CleanRL's learning rates, initial temperature,
    entropy target -|A| (Hopper: -3), 5000 random steps, no held-out transitions."""
    out = tmp_path / "cleanrl"
    result = parity.main(["sac_20min-cleanrl", "--steps", "40", "--seeds", "0", "--eval-interval", "20",
                          "--eval-episodes", "1", "--out", str(out)])
    assert result.splitlines()[0] == "| step | sac_20min.py |"
    args = json.load(open(out / "ours_s0" / "args.json"))
    assert {k: args[k] for k in ("env", "total_timesteps", "utd_ratio", "critic_dropout", "critic_layer_norm",
                                 "critic_lr", "actor_lr", "temp_lr", "init_temperature", "target_entropy",
                                 "learning_starts", "validation_fraction", "batch_size", "gamma", "tau")} == \
        dict(env="Hopper-v4", total_timesteps=40, utd_ratio=1, critic_dropout=0.0, critic_layer_norm=False,
             critic_lr=1e-3, actor_lr=3e-4, temp_lr=1e-3, init_temperature=1.0, target_entropy=-3.0,
             learning_starts=5000, validation_fraction=0.0, batch_size=256, gamma=0.99, tau=0.005)
    peer = parity.peer_command(cli_of("sac_20min-cleanrl", dataset=None), 0, "o")
    assert peer[1].endswith("parity_peer_cleanrl.py") and peer[peer.index("--env") + 1] == "Hopper-v4"
    with pytest.raises(SystemExit, match="runs at UTD 1"):
        parity.main(["sac_20min-cleanrl", "--utd-ratio", "4", "--out", str(out)])


def test_corl_data_is_d4rls_without_an_action_clip(tmp_path):
    """d4rl.qlearning_dataset: s' is the next row, a timeout step and the last row are dropped;
    CORL does not clip the actions (the JAX code does)."""
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    act = np.array([[1.0], [-1.0], [0.5], [0.0], [0.2], [1.0], [0.3], [0.1]], np.float32)
    rew = np.arange(1, 9, dtype=np.float32)
    terminals = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    data = parity_peer_corl.qlearning_dataset(datasets.write_d4rl(str(tmp_path / "d.hdf5"), obs, act, rew,
                                                                  terminals, timeouts))
    assert np.array_equal(data["observations"][:, 0], [0, 1, 2, 3, 5, 6])
    assert np.array_equal(data["next_observations"][:, 0], [1, 2, 3, 4, 6, 7])
    assert np.array_equal(data["actions"][:, 0], np.float32([1.0, -1.0, 0.5, 0.0, 1.0, 0.3]))  # +-1 stay +-1
    assert np.array_equal(data["rewards"], [1, 2, 3, 4, 6, 7]) and np.array_equal(data["terminals"], [0, 1, 0, 0, 0, 0])


def test_corl_evaluation_env_normalizes_states_with_the_datas_statistics():
    import gymnasium as gym
    mean, std = np.linspace(-1, 1, 11).astype(np.float32), np.linspace(0.5, 2, 11).astype(np.float32)
    raw = gym.make("Hopper-v4").reset(seed=3)[0]
    env = parity_peer_corl.normalized_env(gym.make("Hopper-v4"), mean, std)
    assert np.allclose(env.reset(seed=3)[0], (raw - mean) / std)


def corl_file(path) -> str:
    """Episodes A (1000 rows, cut by a timeout, reward 1), B (3 rows, terminal, reward 2), C (5 rows,
    terminal, reward 10), D (2 rows, unfinished); state 0 is 1 in A and 3 elsewhere, state 1 the row."""
    lengths, rewards = (1000, 3, 5, 2), (1.0, 2.0, 10.0, 0.5)
    n = sum(lengths)
    rew = np.concatenate([np.full(k, r, np.float32) for k, r in zip(lengths, rewards)])
    obs = np.stack([np.where(np.arange(n) < 1000, 1.0, 3.0), np.arange(n)], 1).astype(np.float32)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    timeouts[999], terminals[1002], terminals[1007] = True, True, True
    return datasets.write_d4rl(str(path), obs, np.zeros((n, 3), np.float32), rew, terminals, timeouts)


@needs_corl
def test_corl_train_data_as_its_config_gives_it(tmp_path):
    """hopper-medium-v2's config (tau 0.001, deterministic actor, states and rewards normalized);
    modify_reward's episodes end at a terminal or after 1000 rows, so A's 999 rows (its timeout row
    dropped) run on into B's first: returns 999 + 2, 4 and 50, scale 1000 / (1001 - 4); states by
    mean and std + 1e-3."""
    corl = parity_peer_corl.import_corl(CORL_SRC)
    config = parity_peer_corl.load_config(corl, CORL_SRC, "hopper-medium-v2", 1234, 5)
    assert (config.tau, config.iql_deterministic, config.normalize, config.normalize_reward) == (0.001, True, True, True)
    assert (config.max_timesteps, config.seed, config.actor_lr, config.batch_size) == (1234, 5, 3e-4, 256)
    data, mean, std = parity_peer_corl.prepare(corl, config, corl_file(tmp_path / "d.hdf5"))
    kept = np.r_[0:999, 1000:1009]  # A without its timeout row, B, C, D without the file's last row
    raw_rewards = np.r_[np.ones(999), [2.0] * 3, [10.0] * 5, [0.5]]
    assert np.allclose(data["rewards"], raw_rewards * 1000 / 997, rtol=1e-6)
    x = np.where(kept < 1000, 1.0, 3.0)
    m0, s0 = (999 + 9 * 3) / 1008, np.sqrt((999 + 9 * 9) / 1008 - ((999 + 9 * 3) / 1008) ** 2) + 1e-3
    assert np.allclose(data["observations"][:, 0], (x - m0) / s0, rtol=1e-5)
    m1 = kept.mean()
    s1 = np.sqrt(((kept - m1) ** 2).mean()) + 1e-3
    assert np.allclose(data["observations"][:, 1], (kept - m1) / s1, rtol=1e-5, atol=1e-5)
    assert np.allclose(data["next_observations"][:, 1], (kept + 1 - m1) / s1, rtol=1e-5, atol=1e-5)
    assert np.allclose([mean, std], [[m0, m1], [s0, s1]], rtol=1e-5)
    trainer = parity_peer_corl.build_trainer(corl, config, 2, 3, 1.0)
    assert isinstance(trainer.actor, corl.DeterministicPolicy) and trainer.tau == 0.001
    assert trainer.actor_lr_schedule.T_max == 1234


@needs_corl
def test_corl_runner_end_to_end(tmp_path, hopper_files):
    out = tmp_path / "peer"
    subprocess.run([sys.executable, os.path.join(parity.ROOT, "tests", "parity_peer_corl.py"), "--src", CORL_SRC,
                    "--dataset", hopper_files["next"], "--steps", "40", "--eval-interval", "20", "--eval-episodes",
                    "1", "--out", str(out)], check=True, capture_output=True)
    assert sorted(parity.read_scores(str(out))) == [20, 40]


def test_cleanrl_replay_rows_keep_truncations_bootstrapping():
    """The row stored at a time-limit cut has done 0 and s' = the episode's last observation (not
    the next episode's first, which the loop acts on); at a termination, done 1."""
    import gymnasium as gym
    plain = gym.make("Hopper-v4", max_episode_steps=4)
    plain.reset(seed=0)
    last = [plain.step(np.zeros(3, np.float32))[0] for _ in range(4)][-1]
    envs = parity_peer_cleanrl.vector_env(lambda: gym.make("Hopper-v4", max_episode_steps=4))
    obs, _ = envs.reset(seed=0)
    for t in range(4):
        next_obs, (s, s_next, a, r, done, _) = parity_peer_cleanrl.env_step(envs, obs, np.zeros((1, 3), np.float32))
        assert np.array_equal(s, obs) and not done[0]
        obs = next_obs
    assert np.allclose(s_next[0], last) and not np.allclose(next_obs[0], last)
    envs = parity_peer_cleanrl.vector_env(lambda: gym.make("Hopper-v4"))  # -1 on every joint falls at step 6
    obs, _ = envs.reset(seed=0)
    dones = []
    for t in range(6):
        obs, row = parity_peer_cleanrl.env_step(envs, obs, -np.ones((1, 3), np.float32))
        dones.append(bool(row[4][0]))
    assert dones == [False] * 5 + [True]


@needs_cleanrl
def test_cleanrl_evaluation_action_is_get_actions_mean_and_draws_nothing():
    import gymnasium as gym
    import torch
    sac = parity_peer_cleanrl.import_cleanrl(CLEANRL_SRC)
    envs = parity_peer_cleanrl.vector_env(lambda: gym.make("Hopper-v4"))
    torch.manual_seed(0)
    actor = sac.Actor(envs)
    obs = envs.reset(seed=0)[0][0].astype(np.float32)
    state = torch.get_rng_state()
    action = parity_peer_cleanrl.deterministic_action(actor, obs)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        mean, log_std = actor(torch.as_tensor(obs)[None])
    assert np.allclose(action, torch.tanh(mean)[0].numpy())  # Hopper: scale 1, bias 0
    assert np.allclose(action, actor.get_action(torch.as_tensor(obs)[None])[2][0].detach().numpy())


@needs_cleanrl
def test_cleanrl_runner_end_to_end(tmp_path):
    out = tmp_path / "peer"
    subprocess.run([sys.executable, os.path.join(parity.ROOT, "tests", "parity_peer_cleanrl.py"), "--src",
                    CLEANRL_SRC, "--steps", "120", "--learning-starts", "60", "--eval-interval", "60",
                    "--eval-episodes", "1", "--out", str(out)], check=True, capture_output=True)
    assert sorted(parity.read_scores(str(out), "return")) == [60, 120]
