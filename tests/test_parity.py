"""tests/parity.py and the official side's data handling (tests/parity_peer_jax.py): the intervals on
hand-computed numbers, d4rl.qlearning_dataset's semantics on a hand-made file, and the harness end to
end on a tiny file (our side only: the peer needs its JAX venv and checkout)."""

import json

import numpy as np
import pytest

import datasets
import parity
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
