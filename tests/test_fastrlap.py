"""fastrlap.py: the simulator (determinism, layouts, walls, crashes, camera, rate limit, laps, stuck,
recovery), the pretraining data and relabelled goals, the rate-limited actor, the UTD block's wiring,
the three stages through main(), evaluation and bad input. 32-pixel images and tiny networks throughout."""

import copy
import glob
import json
import math
import os
import re

import mujoco
import numpy as np
import pytest
import torch

import fastrlap
from conftest import (assert_finite_losses, check_polyak_after_every_critic_step, check_resume_refuses_non_checkpoints, flat_adam_steps_as_torch_adam,
                      run_script, tensorboard_events)

COURSE = 3  # the shortest of seeds 0-4 (30 m): the demo lap takes ~230 steps at 1.3 m/s
TINY = dict(course_seed=COURSE, demo_speed=1.3, image_size=32, hidden_dim=32, latent_dim=8, num_qs=4, utd_ratio=2,
            batch_size=16, total_timesteps=60, learning_starts=40, log_interval=20, eval_laps=0, pretrain_courses=1,
            pretrain_drive_steps=40, pretrain_steps=4, pretrain_batch_size=8, device="cpu")


def tiny(folder, name="run", **overrides):
    return fastrlap.Args(**{**TINY, "data_dir": str(folder / "data"), "run_dir": str(folder / name), **overrides})


@pytest.fixture(scope="module")
def course():
    return fastrlap.Course(COURSE)


@pytest.fixture(scope="module")
def env(course):
    return fastrlap.RaceCar(course, fastrlap.Args(image_size=32))


def place(env, x, y, yaw):
    """Reset, then put the car at rest at (x, y) heading `yaw`; returns the observation there."""
    env.reset(seed=0)
    env.data.qpos[:7] = [x, y, 0.07, math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]
    mujoco.mj_forward(env.model, env.data)
    env.frames = [env.render_camera()] * 3
    return env.observation()


# ----------------------------------------------------------------------------- the simulator
def test_flat_adam_steps_as_torch_adam():
    flat_adam_steps_as_torch_adam(fastrlap)


def test_same_course_and_actions_give_the_same_drive(env, course):
    other = fastrlap.RaceCar(course, fastrlap.Args(image_size=32))
    actions = np.random.default_rng(0).uniform(-1, 1, (12, 2))
    runs = []
    for e in (env, other):
        obs, _ = e.reset(seed=1)
        trace = [obs]
        for a in actions:
            trace.append(e.step(a)[0])
        trace.append(e.recover())  # its random steering comes from the seeded env
        runs.append((trace, e.position()))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert np.array_equal(a["state"], b["state"]) and np.array_equal(a["pixels"], b["pixels"])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_course_seeds_change_the_layout():
    a, b, c = fastrlap.Course(0), fastrlap.Course(0), fastrlap.Course(1)
    assert a.walls == b.walls and np.array_equal(a.path, b.path) and np.array_equal(a.checkpoints, b.checkpoints)
    assert (a.lx, a.ly) != (c.lx, c.ly) and a.obstacles != c.obstacles
    assert len(a.walls) == 4 + 1 + 3 and len(a.obstacles) == 3


@pytest.mark.parametrize("seed", range(5))
def test_checkpoint_lines_hit_walls_but_the_demo_path_is_clear(seed):
    course = fastrlap.Course(seed)
    cps = course.checkpoints
    blocked = [course.blocked(cps[i], cps[(i + 1) % len(cps)], margin=fastrlap.HALF_WIDTH) for i in range(len(cps))]
    assert any(blocked)
    walls = np.array(course.walls)  # the distance of every path point to every box
    gap = np.linalg.norm(np.maximum(np.abs(course.path[:, None] - walls[None, :, :2]) - walls[None, :, 2:], 0), axis=-1)
    assert gap.min() >= 0.15
    assert not course.blocked(course.path[0], course.path[20], margin=0.15)
    spacing = np.linalg.norm(np.diff(course.path, axis=0), axis=1)
    assert spacing.max() < 0.06 and np.allclose(course.path[0], course.path[-1])  # dense, closed
    assert course.length <= spacing.sum() < 1.05 * course.length  # the centre line's length; the swerves add a little


@pytest.mark.parametrize("target", ["wall", "box"])
def test_driving_into_a_wall_or_box_is_a_crash(env, course, target):
    bx, by = course.obstacles[0][:2]
    x, y, yaw = (course.lx - 1.0, 1.0, 0.0) if target == "wall" else (bx, by - 1.0, math.pi / 2)
    place(env, x, y, yaw)
    crashes, rewards = [], []
    for _ in range(10):
        _, reward, *_, info = env.step(np.zeros(2))
        crashes.append(info["crash"])
        rewards.append(reward)
    assert not crashes[0] and crashes[-1]
    first = crashes.index(True)
    assert rewards[first] < -5 and max(rewards[:first]) > -2  # the penalty comes with the contact
    nose = (env.position()[0] + 0.2 - course.lx) if target == "wall" else (by - 0.25 - env.position()[1] - 0.2)
    assert abs(nose) < 0.1  # stopped at the wall or box


def test_the_camera_sees_the_wall_or_box_ahead(env, course):
    red = lambda img: float((img[..., 0].astype(int) - img[..., 1] > 60).mean())  # noqa: E731  (the wall's checker)
    blue = lambda img: float((img[..., 2].astype(int) - img[..., 0] > 60).mean())  # noqa: E731  (the boxes)
    facing_wall = place(env, course.lx - 0.6, 1.0, 0.0)["pixels"][-1]
    corridor = place(env, course.lx / 2 - 3, 1.0, 0.0)["pixels"][-1]  # 8 m of free corridor ahead
    bx, by = course.obstacles[0][:2]
    facing_box = place(env, bx, by - 0.8, math.pi / 2)["pixels"][-1]
    assert facing_wall.shape == (32, 32, 3) and facing_wall.dtype == np.uint8
    assert red(facing_wall) > 0.1 and red(corridor) < 0.02
    assert blue(facing_box) > 0.1 and blue(corridor) < 0.02 and blue(facing_wall) < 0.02


def test_the_state_reads_the_goal_in_the_car_frame(env, course):
    cp = course.checkpoints[0]
    x, y, yaw = cp[0] - 1.5, cp[1] + 0.4, 0.3
    state = place(env, x, y, yaw)["state"]
    d = cp - np.array([x, y])
    local = np.array([math.cos(yaw) * d[0] + math.sin(yaw) * d[1], -math.sin(yaw) * d[0] + math.cos(yaw) * d[1]])
    np.testing.assert_allclose(state[9:12], [*local / np.linalg.norm(local), np.linalg.norm(local)], atol=1e-3)
    np.testing.assert_array_equal(state[12:], [-1.0, 0.0])
    assert state.shape == (fastrlap.STATE_DIM,) and state.dtype == np.float32
    for _ in range(5):
        state = env.step(np.array([0.0, 0.0]))[0]["state"]  # straight ahead: velocity along the car's x
    assert state[3] > 0.3 and abs(state[4]) < 0.15 * state[3]  # (the world frame's would be sin 0.3 = 30 %)


def test_the_reward_is_the_velocity_toward_the_checkpoint_current_at_the_step_start(env, course):
    """Driving through checkpoint 1: every reward, the passing step's included, is the displacement
    toward the checkpoint held when the step began, per second; the state then points at the next."""
    cp = course.checkpoints
    d = (cp[1] - cp[0]) / np.linalg.norm(cp[1] - cp[0])
    x, y = cp[1] - 1.6 * d + 0.5 * np.array([-d[1], d[0]])  # off the line: the two checkpoints' rewards differ
    place(env, x, y, math.atan2(d[1], d[0]))
    env.checkpoint, passed = 1, False
    for _ in range(20):
        before, held = env.position(), env.checkpoint
        obs, reward, *_, info = env.step(np.array([0.5, 0.0]))
        toward = (cp[held] - before) / np.linalg.norm(cp[held] - before)
        assert info["checkpoint"] == held and not info["crash"]
        assert reward == pytest.approx(np.dot(env.position() - before, toward) / 0.1, abs=1e-4)
        if env.checkpoint != held:
            passed = True
            break
    goal = cp[2] - env.position()
    assert passed and obs["state"][11] == pytest.approx(np.linalg.norm(goal), abs=1e-4)


def test_each_frame_is_rendered_after_its_physics_step(env, course):
    """The newest frame of an observation shows the car where the step (or the backing up) left it."""
    obs = place(env, course.lx / 2 - 3, 1.0, 0.0)
    for _ in range(4):
        last = obs["pixels"]
        obs = env.step(np.array([1.0, 0.5]))[0]
        assert np.array_equal(obs["pixels"][-1], env.render_camera())
        assert np.array_equal(obs["pixels"][:2], last[1:]) and not np.array_equal(obs["pixels"][-1], last[-1])
    assert np.array_equal(env.recover()["pixels"][-1], env.render_camera())


def test_the_clock_counts_backing_up_and_runs_on_through_plain_resets(env):
    env.reset(seed=0)
    for _ in range(5):
        info = env.step(np.zeros(2))[4]
    assert info["time"] == pytest.approx(0.5)
    env.recover()  # 1 s backing up: on the clock (the laps and the practice minutes read it)
    env.reset()  # --no-pseudo-resets: back to the start, the clock runs on
    assert env.step(np.zeros(2))[4]["time"] == pytest.approx(1.6)
    env.reset(seed=0)
    assert env.step(np.zeros(2))[4]["time"] == pytest.approx(0.1)


def test_laps_are_logged_at_the_simulators_clock(tmp_path, monkeypatch):
    """laps.csv's practice minutes are the clock's (steps and backing up), not step x 0.1 s: main()'s
    practice, its 50th step reporting a 30.5 s lap at 90 s on the clock."""
    demo_lap, infos = fastrlap.demo_lap, []

    def lap_at_fifty(env, *a):
        lap, step = demo_lap(env, *a), env.step

        def practice_step(action):
            obs, reward, term, trunc, info = step(action)
            infos.append({**info, "lap_time": 30.5, "time": 90.0} if len(infos) == 49 else info)
            return obs, reward, term, trunc, infos[-1]
        env.step = practice_step
        return lap
    monkeypatch.setattr(fastrlap, "demo_lap", lap_at_fifty)
    fastrlap.main(tiny(tmp_path, encoder="random"))
    collisions = sum(info["crash"] for info in infos[:50])  # since the start: the first lap
    assert open(tmp_path / "run" / "laps.csv").read().splitlines()[1:] == [f"50,1.500,30.50,{collisions}"]


def test_the_action_is_rate_limited_and_clipped(env):
    env.reset(seed=0)
    assert np.array_equal(env.prev_action, [-1.0, 0.0])
    state = env.step(np.array([1.0, 1.0]))[0]["state"]
    np.testing.assert_allclose(env.prev_action, [-0.8, 0.2])
    np.testing.assert_allclose(state[12:], [-0.8, 0.2])
    env.step(np.array([-3.0, 5.0]))  # outside [-1, 1]: clipped first, then limited
    np.testing.assert_allclose(env.prev_action, [-1.0, 0.4])
    env.step(np.array([-3.0, 0.5]))
    np.testing.assert_allclose(env.prev_action, [-1.0, 0.5])


def test_stuck_only_after_three_seconds_pinned_then_recover_backs_up(env, course):
    place(env, course.lx - 0.25, 1.0, 0.0)  # the nose 5 cm from the outer wall
    stuck = [env.step(np.array([-1.0, 0.0]))[4]["stuck"] for _ in range(31)]
    assert stuck == [False] * 29 + [True, True]
    before, yaw = env.position(), env.yaw()
    env.checkpoint = 3
    obs = env.recover()
    moved = env.position() - before
    assert np.dot(moved, [math.cos(yaw), math.sin(yaw)]) < -0.5  # about 1 s at 1 m/s, backward
    assert env.checkpoint == 3 and np.array_equal(env.prev_action, [-1.0, 0.0])
    np.testing.assert_array_equal(obs["state"][12:], [-1.0, 0.0])
    assert not env.step(np.array([-1.0, 0.0]))[4]["stuck"]  # the stuck clock starts over


def test_demo_lap_passes_checkpoints_in_order_and_times_one_lap(first_run, course):
    """main()'s demo lap, recorded step by step (pure pursuit at 1.3 m/s from the start)."""
    steps = first_run["demo_steps"]
    radius, n = fastrlap.Args.checkpoint_radius, len(course.checkpoints)
    advanced = []
    for k, (info, pos, cp_after) in enumerate(steps):
        assert not info["crash"] and not info["stuck"]
        near = np.linalg.norm(course.checkpoints[info["checkpoint"]] - pos) < radius
        assert cp_after == ((info["checkpoint"] + 1) % n if near else info["checkpoint"]), k
        if near:
            advanced.append((k, info["checkpoint"]))
    assert [cp for _, cp in advanced] == list(range(n)) + [0]  # every checkpoint once, in order, back to 0
    timed = [k for k, (info, _, _) in enumerate(steps) if info["lap_time"] is not None]
    assert timed == [len(steps) - 1] == [advanced[-1][0]]  # the first pass of checkpoint 0 reports none
    lap = steps[-1][0]["lap_time"]
    assert lap == pytest.approx((advanced[-1][0] - advanced[0][0]) * fastrlap.CONTROL_DT)
    assert lap == pytest.approx(course.length / TINY["demo_speed"], rel=0.1)
    assert first_run["results"]["demo_lap_time"] == lap


# ----------------------------------------------------------------------------- pretraining data and relabelled goals
def hand_made_drives():
    """Drive 0 (70 rows): east along y = 0 at 1 m/s (yaw 0); row 20 crashes (it moves 2 cm), row 21 is the
    state after the crash (no transition), then it goes on along y = 0.5; its own goal (100, y) is straight
    ahead. Drive 1 (30 rows): north at 2 m/s along x = 50 (yaw pi/2), its goal 4 m ahead and 3 m to the left.
    The last row of each drive has no transition. Row t's frames carry t in their first pixel."""
    n0, n1 = 70, 30
    pose = np.zeros((n0 + n1, 3), np.float32)
    pose[:21, 0] = 0.1 * np.arange(21)
    pose[21] = [2.0 + 0.02, 0.0, 0.0]
    pose[22:n0, :2] = np.stack([1.0 + 0.1 * np.arange(n0 - 22), np.full(n0 - 22, 0.5)], 1)
    pose[n0:] = np.stack([np.full(n1, 50.0), 0.2 * np.arange(n1), np.full(n1, math.pi / 2)], 1)
    goal = np.concatenate([np.stack([np.full(n0, 100.0), pose[:n0, 1]], 1), pose[n0:, :2] + [-3.0, 4.0]]).astype(np.float32)
    valid = np.ones(n0 + n1, np.float32)
    valid[[21, n0 - 1, n0 + n1 - 1]] = 0
    crash = np.zeros(n0 + n1, np.float32)
    crash[20] = 1
    pixels = np.zeros((n0 + n1, 3, 4, 4, 3), np.uint8)
    pixels[:, 0, 0, 0, 0] = np.arange(n0 + n1)
    t = np.arange(n0 + n1, dtype=np.float32)
    return {"pixels": pixels, "own": t[:, None] + 0.01 * np.arange(9, dtype=np.float32), "pose": pose,
            "prev_action": np.stack([t / 100, -t / 100], 1), "goal": goal, "action": np.stack([t / 200, -t / 300], 1),
            "crash": crash, "valid": valid, "drive": np.array([0.0] * n0 + [1.0] * n1, np.float32)}


def world_goal(pose, state):
    """The goal back in the world, from a state's car-frame unit vector and distance."""
    local = state[:, 9:11] * state[:, 11:12]
    c, s = torch.cos(pose[:, 2]), torch.sin(pose[:, 2])
    return pose[:, :2] + torch.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1]], -1)


@pytest.fixture(scope="module")
def relabelled():
    data = hand_made_drives()
    torch.manual_seed(0)
    batch = fastrlap.PretrainBuffer(data, fastrlap.Args(crash_penalty=10.0), torch.device("cpu")).sample(8000)
    return data, batch


def test_pretraining_samples_are_valid_transitions(relabelled):
    data, (pixels, state, act, rew, mask, next_pixels, next_state) = relabelled
    i = pixels[:, 0, 0, 0, 0].long()
    assert set(i.tolist()) == set(np.flatnonzero(data["valid"]).tolist())  # every valid row, no other
    assert torch.equal(next_pixels[:, 0, 0, 0, 0].long(), i + 1)
    d = {k: torch.as_tensor(v) for k, v in data.items()}
    assert torch.equal(act, d["action"][i])
    assert torch.equal(state[:, :9], d["own"][i]) and torch.equal(state[:, 12:], d["prev_action"][i])
    assert torch.equal(next_state[:, :9], d["own"][i + 1]) and torch.equal(next_state[:, 12:], d["prev_action"][i + 1])
    assert torch.equal(mask, (i != 20).float())  # 0 exactly on the crash


def test_relabelled_goals_rewards_and_frequencies(relabelled):
    data, (pixels, state, act, rew, mask, next_pixels, next_state) = relabelled
    d = {k: torch.as_tensor(v) for k, v in data.items()}
    i = pixels[:, 0, 0, 0, 0].long()
    goal = world_goal(d["pose"][i], state)
    torch.testing.assert_close(world_goal(d["pose"][i + 1], next_state), goal, atol=1e-3, rtol=0)  # the same goal in s'
    original = (goal - d["goal"][i]).norm(dim=-1) < 1e-3
    match = (goal[:, None] - d["pose"][None, :, :2]).norm(dim=-1) < 1e-3  # (samples, rows): which poses it is
    rows = torch.arange(len(d["pose"]))
    window = (rows[None] > i[:, None]) & (rows[None] <= i[:, None] + 50) & (d["drive"][None] == d["drive"][i][:, None])
    future = (match & window).any(1)
    assert not (match & ~window).any()  # never a pose of another drive, an earlier one, or > 50 rows later
    sample, row = (match & window).nonzero().T
    assert (row - i[sample]).min() == 1 and (row - i[sample]).max() >= 45  # 1 to 50 rows later
    noise = ~original & ~future
    freq = [original.float().mean().item(), future.float().mean().item(), noise.float().mean().item()]
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.25], atol=0.03)
    offset = goal[noise] - d["pose"][i[noise], :2]  # the position plus N(0, 4 m)
    assert offset.mean(0).abs().max() < 0.4 and offset.std(0).sub(4.0).abs().max() < 0.4
    # r = velocity toward the goal - 10 on the crash
    toward = (goal - d["pose"][i, :2]) / (goal - d["pose"][i, :2]).norm(dim=-1, keepdim=True)
    expected = ((d["pose"][i + 1, :2] - d["pose"][i, :2]) * toward).sum(-1) / 0.1 - 10.0 * (i == 20)
    torch.testing.assert_close(rew, expected, atol=1e-3, rtol=1e-4)
    # the drivers' own goals by hand: east at 1 m/s toward a goal ahead; the crash moved 2 cm; north at 2 m/s
    east, north = original & (i < 70) & (i != 20), original & (i >= 70)
    torch.testing.assert_close(rew[east], torch.ones(int(east.sum())))
    torch.testing.assert_close(rew[original & (i == 20)], torch.full((int((original & (i == 20)).sum()),), 0.2 - 10.0))
    torch.testing.assert_close(rew[north], torch.full((int(north.sum()),), 2.0 * 0.8))
    ahead = torch.stack([torch.ones_like(rew[east]), torch.zeros_like(rew[east]), 100 - d["pose"][i[east], 0]], 1)
    torch.testing.assert_close(state[east, 9:12], ahead)
    torch.testing.assert_close(state[north, 9:12], torch.tensor([0.8, 0.6, 5.0]).expand(int(north.sum()), 3))


def test_collected_drives_are_cached_consecutive_transitions(first_run, monkeypatch):
    monkeypatch.setattr(fastrlap, "drive_slowly", lambda *a, **k: pytest.fail("collected again"))
    data = fastrlap.load_or_collect(first_run["args"])  # from the cache in data_dir
    n = TINY["pretrain_drive_steps"]
    assert n + 1 <= len(data["valid"]) and data["pixels"].shape[1:] == (3, 32, 32, 3)
    assert set(data["drive"].tolist()) == {0.0} and data["valid"][-1] == 0 and data["valid"].sum() == n
    t = np.flatnonzero(data["valid"] > 0)  # row t -> t + 1 is a transition (the next row may follow a crash)
    np.testing.assert_allclose(data["prev_action"][t + 1], data["action"][t], atol=1e-6)
    assert np.linalg.norm(data["pose"][t + 1, :2] - data["pose"][t, :2], axis=1).max() < 0.2  # slow: <= 1 m/s
    assert np.array_equal(data["pixels"][t + 1, :2], data["pixels"][t, 1:])  # the frame stack shifts by one


# ----------------------------------------------------------------------------- actor and update
def tiny_agent_args(**kw):
    return fastrlap.Args(**{**dict(hidden_dim=32, latent_dim=8, num_qs=4), **kw})


def random_z(n, feature_dim=8, seed=0, prev=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, feature_dim + fastrlap.STATE_DIM, generator=g)
    z[:, -2:] = torch.rand(n, 2, generator=g) * 2 - 1 if prev is None else torch.tensor(prev)
    return z


def test_actor_samples_stay_within_the_rate_limit():
    torch.manual_seed(0)
    actor = fastrlap.TanhGaussianActor(8, fastrlap.STATE_DIM, 2, tiny_agent_args())
    z = random_z(4000)
    z[:1000, -2:] = torch.tensor([1.0, -1.0])  # at the bounds: the range is [0.8, 1] x [-1, -0.8]
    with torch.no_grad():
        act, log_prob = actor.sample(z)
        mean = actor(z)
    prev = z[:, -2:]
    for a in (act, mean):
        assert ((a - prev).abs() <= 0.2 + 1e-6).all() and (a.abs() <= 1 + 1e-6).all()
    assert ((act - prev).abs() > 0.15).any()  # the whole range is used, not a sliver
    assert (act[:1000, 0] >= 0.8 - 1e-6).all() and (act[:1000, 1] <= -0.8 + 1e-6).all()
    inside = (((act - prev).abs() < 0.19) & (act.abs() < 0.99)).all(-1)  # atanh is ill-conditioned at the edges
    torch.testing.assert_close(actor.log_prob(z, act)[inside], log_prob[inside], atol=2e-3, rtol=1e-4)


def test_actor_squash_is_the_official_output_range_bijector():
    """a = c + s tanh((u - c) / s), u ~ N(mu, sigma) (the release's TanhTransformedDistribution with
    low, high), log pi = log N(u) - log(1 - tanh((u - c) / s)^2), by hand with mu, sigma set."""
    actor = fastrlap.TanhGaussianActor(8, fastrlap.STATE_DIM, 2, tiny_agent_args())
    z = random_z(4)
    z[:, -2:] = torch.tensor([[0.3, -0.5], [1.0, -1.0], [0.0, 0.9], [-0.7, 0.1]])
    c = torch.tensor([[0.3, -0.5], [0.9, -0.9], [0.0, 0.85], [-0.7, 0.1]])
    s = torch.tensor([[0.2, 0.2], [0.1, 0.1], [0.2, 0.15], [0.2, 0.2]])
    with torch.no_grad():
        for layer, bias in ((actor.mu, [0.35, -0.6]), (actor.log_std, [-3.0, -2.5])):
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor(bias))
        torch.manual_seed(1)
        act, log_prob = actor.sample(z)
        torch.manual_seed(1)
        mu, std = torch.tensor([0.35, -0.6]), torch.tensor([-3.0, -2.5]).exp()
        u = mu + std * torch.randn(4, 2)
        x = (u - c) / s
        jacobian = 1 - torch.tanh(x.double()) ** 2  # float64: one entry is far into the tail
        expected = torch.distributions.Normal(mu, std).log_prob(u) - torch.log(jacobian).float()
        torch.testing.assert_close(act, c + s * torch.tanh(x))
        torch.testing.assert_close(log_prob, expected.sum(-1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(actor(z), c + s * torch.tanh((mu - c) / s))


def test_actor_density_integrates_to_one_over_its_range():
    torch.manual_seed(0)
    actor = fastrlap.TanhGaussianActor(8, fastrlap.STATE_DIM, 2, tiny_agent_args())
    k = 400
    for prev in ([0.9, -0.3], [0.0, 0.0]):
        lo, hi = np.clip(np.array(prev) - 0.2, -1, 1), np.clip(np.array(prev) + 0.2, -1, 1)
        ax = [torch.tensor(lo[d] + (hi[d] - lo[d]) * (np.arange(k) + 0.5) / k, dtype=torch.float32) for d in range(2)]
        grid = torch.stack(torch.meshgrid(*ax, indexing="ij"), -1).view(-1, 2)
        z = random_z(1, prev=prev).expand(len(grid), -1)
        with torch.no_grad():  # u ~ N(c + 0.05, 0.1): unsaturated, a midpoint grid integrates it
            for layer, bias in ((actor.mu, (hi + lo) / 2 + 0.05), (actor.log_std, [-2.3, -2.3])):
                layer.weight.zero_()
                layer.bias.copy_(torch.as_tensor(bias))
            mass = actor.log_prob(z, grid).exp().sum() * np.prod((hi - lo) / k)
        assert mass.item() == pytest.approx(1.0, abs=0.03), prev


def make_agent(utd=2, **kw):
    return fastrlap.FastRLAP(8, tiny_agent_args(utd_ratio=utd, **kw), torch.device("cpu"))


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_z(n, seed=seed), torch.rand(n, 2, generator=g) * 2 - 1, torch.randn(n, generator=g),
            (torch.rand(n, generator=g) < 0.7).float(), random_z(n, seed=seed + 100)]


def test_target_entropy_drops_by_the_decay_per_block_whatever_the_utd():
    for utd in (1, 4):
        torch.manual_seed(0)
        agent = make_agent(utd, target_entropy_decay=0.25)
        for call in range(1, 4):
            out = agent.update(*batch(4 * 8, seed=call))
            assert out["values/target_entropy"].item() == pytest.approx(-3.0 - 0.25 * call), (utd, call)
        steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
        assert (steps(agent.critic_opt), steps(agent.actor_opt), steps(agent.temp_opt)) == (3 * utd, 3, 3)


def test_polyak_step_after_every_critic_step():
    torch.manual_seed(0)
    check_polyak_after_every_critic_step(make_agent(utd=4), [batch(4 * 8, seed=i) for i in range(3)])


def test_pixel_iql_losses_by_hand():
    """One pixel-IQL update against its formulas computed here (no crop, the min over all 4 heads):
    V by expectile 0.9 toward min_k Qtarget_k(f(o), s, a), f the online encoder (official: the value
    net's); pi by AWR exp(3 A), A from the V just updated; Q toward r + gamma m V(s'), V before its
    step (official target_value), summed over the heads; then a Polyak step of the target heads."""
    torch.manual_seed(0)
    args = fastrlap.Args(**{**TINY, "shift_pad": 0, "num_min_qs": 4, "critic_lr": 1e-2})
    iql = fastrlap.PixelIQL(args, torch.device("cpu"))
    with torch.no_grad():  # the target heads apart from the online ones
        for p in iql.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    o, o2 = (torch.randint(0, 256, (8, 3, 32, 32, 3), generator=g).byte() for _ in range(2))
    s, s2 = (torch.randn(8, fastrlap.STATE_DIM, generator=g) for _ in range(2))
    act, rew = torch.rand(8, 2, generator=g) * 2 - 1, torch.randn(8, generator=g)
    mask = torch.ones(8)
    mask[[2, 5]] = 0.0
    old = copy.deepcopy(iql)
    out = iql.update(o, s, act, rew, mask, o2, s2)
    with torch.no_grad():
        z, z2 = torch.cat([old.encoder(o), s], -1), torch.cat([old.encoder(o2), s2], -1)
        q = old.critic_target(z, act).min(0).values
        diff = q - old.value(z).squeeze(-1)
        value_loss = (torch.where(diff < 0, 0.1, 0.9) * diff ** 2).mean()
        weights = torch.exp(3.0 * (q - iql.value(z).squeeze(-1))).clamp(max=100.0)
        actor_loss = -(weights * old.actor.log_prob(z, act)).mean()
        y = rew + 0.99 * mask * old.value(z2).squeeze(-1)
        critic_loss = (old.critic(z, act) - y).pow(2).sum(0).mean()
    for k, v in (("value", value_loss), ("actor", actor_loss), ("critic", critic_loss)):
        torch.testing.assert_close(out[f"pretrain/{k}_loss"], v, rtol=1e-5, atol=1e-6, msg=k)
    nets = (iql.critic_target, old.critic_target, iql.critic)
    for t, b, p in zip(*(m.parameters() for m in nets)):
        torch.testing.assert_close(t, b + 0.005 * (p.detach() - b), rtol=0, atol=1e-6)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in iql.value) == 2  # value_layer_norm=True


def test_crash_target_has_no_bootstrap_and_no_entropy_term():
    torch.manual_seed(0)
    agent = make_agent(utd=1)
    rew, next_z = torch.randn(16), random_z(16, seed=3)
    torch.testing.assert_close(agent.critic_target_value(rew, torch.zeros(16), next_z), rew, rtol=0, atol=0)
    assert not torch.allclose(agent.critic_target_value(rew, torch.ones(16), next_z), rew)
    # the block's critic loss by hand: Q(z, a) against r + gamma m min_{k in Z} Qtarget_k(z', a'), a' ~ pi(.|z')
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z, act, rew, mask, next_z = batch(16, seed=4)
    twin = copy.deepcopy(agent)
    torch.manual_seed(5)
    loss = agent.update(z, act, rew, mask, next_z)["losses/critic_loss"]
    torch.manual_seed(5)
    with torch.no_grad():
        next_act, _ = twin.actor.sample(next_z)
        subset = torch.rand(4).argsort()[:2]
        next_q = twin.critic_target(next_z, next_act)[subset].min(0).values
        expected = (twin.critic(z, act) - (rew + 0.99 * mask * next_q)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_actor_and_temperature_losses_by_hand():
    """The block's last slice: actor loss alpha log pi(a|z) - mean_k Q_k(z, a) with the online critics
    just stepped, a ~ pi(.|z); temperature loss alpha (H - target), H = -mean log pi (alpha rises when
    the entropy is below its target)."""
    torch.manual_seed(0)
    agent = make_agent(utd=1, init_temperature=0.5)
    with torch.no_grad():  # the target critics apart from the online ones
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z, act, rew, mask, next_z = batch(16, seed=4)
    twin = copy.deepcopy(agent)
    torch.manual_seed(5)
    out = agent.update(z, act, rew, mask, next_z)
    torch.manual_seed(5)
    with torch.no_grad():
        torch.randn(16, 2), torch.rand(4)  # the critic step's draws: a' ~ pi(.|z'), the subset
        new_act, log_prob = twin.actor.sample(z)
        q = agent.critic(z, new_act).mean(0)
        torch.testing.assert_close(out["losses/actor_loss"], (0.5 * log_prob - q).mean())
        temp_loss = 0.5 * (-log_prob.mean() + 3.0)
        torch.testing.assert_close(out["losses/temperature_loss"], temp_loss)
    alpha = agent.log_alpha.exp().item()
    assert (alpha > 0.5) == (-log_prob.mean().item() < -3.0) and alpha != 0.5


def marked_buffer(value, n=200):
    """A buffer whose every reward is `value`, to tell where a sampled row came from."""
    buffer = fastrlap.ReplayBuffer(n, 3, 2, torch.device("cpu"))
    for _ in range(n):
        buffer.add(torch.zeros(3), np.zeros(2), value, 1.0, torch.zeros(3))
    return buffer


@pytest.mark.parametrize("utd, batch_size", [(4, 32), (2, 10), (8, 48)])
def test_half_of_every_critic_slice_is_demo(utd, batch_size):
    torch.manual_seed(0)
    z, act, rew, mask, next_z = fastrlap.half_demo_sample(marked_buffer(-1.0), marked_buffer(1.0), utd, batch_size)
    assert z.shape == (batch_size, 3) and act.shape == (batch_size, 2) and rew.shape == mask.shape == (batch_size,)
    n = batch_size // utd
    assert [(s == -1).sum().item() for s in rew.view(utd, n)] == [n // 2] * utd


# ----------------------------------------------------------------------------- main(): both stages, then practice
class Recorder:
    """Wraps main()'s demo lap: records its steps (info, position, checkpoint after), then on the practice
    env turns the 10th step into a crash and the 20th into being stuck, records each step's (obs, reward,
    applied action, info) and counts recover() and reset() calls (with what they return); records replay
    adds and the demo-half batches. The
    evaluation's env (the one with a video renderer) reports a 12.3 s lap at its 5th step, to keep it short."""

    def __init__(self, monkeypatch):
        self.demo_steps, self.practice_events, self.recovers, self.resets, self.adds = [], [], 0, 0, []
        self.practice_steps, self.restarts, self.demo_batches = [], {}, 0
        demo_lap, add, make_env = fastrlap.demo_lap, fastrlap.ReplayBuffer.add, fastrlap.make_env
        half_demo_sample = fastrlap.half_demo_sample

        def recording_demo_lap(env, *a):
            step, recover, reset = env.step, env.recover, env.reset

            def demo_step(action):
                out = step(action)
                self.demo_steps.append((out[4], env.position(), env.checkpoint))
                return out
            env.step = demo_step
            lap = demo_lap(env, *a)

            def practice_step(action):
                obs, reward, term, trunc, info = step(action)
                if len(self.practice_events) == 9:
                    info = {**info, "crash": True}
                if len(self.practice_events) == 19:
                    info = {**info, "stuck": True}
                self.practice_events.append(info)
                self.practice_steps.append((obs, reward, env.prev_action.copy(), info))
                return obs, reward, term, trunc, info

            def restart(how, *a, **kw):  # recover() or reset(): what the next step starts from
                obs = how(*a, **kw)
                self.restarts[len(self.practice_events)] = obs if isinstance(obs, dict) else obs[0]
                return obs
            env.step = practice_step
            env.recover = lambda: setattr(self, "recovers", self.recovers + 1) or restart(recover)
            env.reset = lambda **kw: setattr(self, "resets", self.resets + 1) or restart(reset, **kw)
            return lap
        def short_evaluation_env(course, args, video_size=0):
            env = make_env(course, args, video_size)
            if video_size:
                step, calls = env.step, []

                def lap_at_five(action):
                    obs, reward, term, trunc, info = step(action)
                    calls.append(action)
                    return obs, reward, term, trunc, {**info, "lap_time": 12.3} if len(calls) == 5 else info
                env.step = lap_at_five
            return env
        monkeypatch.setattr(fastrlap, "demo_lap", recording_demo_lap)
        monkeypatch.setattr(fastrlap, "make_env", short_evaluation_env)
        monkeypatch.setattr(fastrlap.ReplayBuffer, "add",
                            lambda buffer, *row: self.adds.append((buffer, row[3], row)) or add(buffer, *row))
        monkeypatch.setattr(fastrlap, "half_demo_sample",
                            lambda *a: setattr(self, "demo_batches", self.demo_batches + 1) or half_demo_sample(*a))

    def online_masks(self, capacity):
        return np.array([m for b, m, _ in self.adds if b.capacity == capacity])

    def online_rows(self, capacity):
        return [[np.asarray(torch.as_tensor(x), dtype=np.float32) for x in row] for b, _, row in self.adds
                if b.capacity == capacity]

    def events(self):
        return sum(bool(e["crash"] or e["stuck"]) for e in self.practice_events)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Stage 1 on one tiny collected drive (200 pixel-IQL steps), the demo lap, 60 steps of practice (20
    UTD blocks of 8 critic steps), one evaluation lap with video."""
    folder = tmp_path_factory.mktemp("fastrlap")
    args = tiny(folder, eval_laps=1, capture_video=True, pretrain_steps=200, utd_ratio=8, batch_size=32)  # 200 + 160 steps
    with pytest.MonkeyPatch.context() as mp:
        recorder = Recorder(mp)
        results = fastrlap.main(args)
    return {"args": args, "folder": folder, "results": results, "demo_steps": recorder.demo_steps, "recorder": recorder}


def test_main_pretrains_drives_the_demo_and_practises(first_run):
    args, results, recorder = first_run["args"], first_run["results"], first_run["recorder"]
    assert results["updates"] == (60 - 40) * 8
    assert_finite_losses(results)
    assert all(math.isfinite(results[k]) for k in ("pretrain/critic_loss", "pretrain/value_loss", "pretrain/actor_loss"))
    assert math.isfinite(results["demo_lap_time"]) and results["evaluations"][0][0] == 60
    assert results["values/target_entropy"] == pytest.approx(-3.0 - 20 * 4e-5, abs=1e-5)  # one decay per block
    for name in ("args.json", "encoder.pt", "laps.csv", "evaluations.csv"):
        assert os.path.isfile(os.path.join(args.run_dir, name)), name
    assert glob.glob(os.path.join(args.run_dir, "videos", "*.mp4")) and tensorboard_events(args.run_dir)
    laps = open(os.path.join(args.run_dir, "laps.csv")).read().splitlines()
    assert laps[0] == "step,practice_minutes,lap_time,collisions" and len(laps) == 1 + len(results["laps"])
    minutes = (60 + 10 * recorder.recovers) * 0.1 / 60  # the clock counts each 1 s backing up
    evaluations = open(os.path.join(args.run_dir, "evaluations.csv")).read().splitlines()
    assert evaluations[1:] == [f"60,{minutes:.3f},12.30,1.00,0.0"]
    assert results["eval/lap_time"] == 12.3 and results["eval/finished"] == 1.0
    assert json.load(open(os.path.join(args.run_dir, "args.json")))["resolved"]["device"] == "cpu"
    saved = torch.load(os.path.join(args.run_dir, "encoder.pt"), weights_only=True)
    assert saved["image_size"] == 32 and set(saved["encoder"]) == set(fastrlap.Encoder(32).state_dict())
    assert glob.glob(os.path.join(args.data_dir, "*.npz"))  # the drive was cached in data_dir
    # the injected crash: m = 0 in the replay, one pseudo-reset per crash or stuck step, no reset
    masks = recorder.online_masks(args.total_timesteps)
    assert len(masks) == 60 and (masks == 0).sum() == results["collisions"] >= 1
    assert len(recorder.practice_events) == 60 and recorder.recovers == recorder.events() >= 1
    assert recorder.resets == 1  # only the start of practice


def test_main_stores_aligned_transitions_and_restarts_after_crash_or_stuck(first_run):
    """Row t of the replay is (z_t, the applied action, r_t, m_t, z') with z' the embedding of the
    observation step t returned (not z_t, not the state after backing up); the next row starts from z'
    unless step t crashed or got stuck, then from what recover() returned. m = 0 on a crash only."""
    recorder, args = first_run["recorder"], first_run["args"]
    rows, steps = recorder.online_rows(args.total_timesteps), recorder.practice_steps
    encoder = fastrlap.load_encoder(os.path.join(args.run_dir, "encoder.pt"), args, torch.device("cpu"))
    assert len(rows) == len(steps) == 60 and recorder.demo_batches == 20  # one demo-half batch per UTD block
    for t, ((z, act, rew, mask, next_z), (obs, reward, applied, info)) in enumerate(zip(rows, steps)):
        np.testing.assert_allclose(next_z[-fastrlap.STATE_DIM:], obs["state"], atol=1e-6)
        with torch.no_grad():  # and its image features: f of this step's frames, not the previous step's
            f = encoder(torch.as_tensor(obs["pixels"])[None])[0].numpy()
        np.testing.assert_allclose(next_z[:-fastrlap.STATE_DIM], f, atol=1e-5)
        np.testing.assert_allclose(act, applied, atol=1e-6)
        assert rew == pytest.approx(reward, abs=1e-5) and mask == (0.0 if info["crash"] else 1.0)
        if t + 1 < len(rows):
            start = rows[t + 1][0]
            if info["crash"] or info["stuck"]:
                np.testing.assert_allclose(start[-fastrlap.STATE_DIM:], recorder.restarts[t + 1]["state"], atol=1e-6)
                assert not np.allclose(start, next_z)
            else:
                np.testing.assert_array_equal(start, next_z)
    assert steps[19][3]["stuck"] and rows[19][3] == 1.0  # stuck only cuts: it bootstraps


def test_a_saved_encoder_skips_stage_one(first_run, monkeypatch):
    monkeypatch.setattr(fastrlap, "load_or_collect", lambda *a: pytest.fail("stage 1 ran"))
    monkeypatch.setattr(fastrlap, "PixelIQL", lambda *a: pytest.fail("stage 1 ran"))
    loaded, load = [], fastrlap.load_encoder
    monkeypatch.setattr(fastrlap, "load_encoder", lambda *a: loaded.append(load(*a)) or loaded[-1])
    path = os.path.join(first_run["args"].run_dir, "encoder.pt")
    args = tiny(first_run["folder"], "reuse", encoder="pretrained", encoder_path=path)
    results = fastrlap.main(args)
    assert results["updates"] == 40 and not os.path.exists(os.path.join(args.run_dir, "encoder.pt"))
    saved = torch.load(path, weights_only=True)["encoder"]
    assert all(torch.equal(v, saved[k]) for k, v in loaded[0].state_dict().items())
    assert results["demo_lap_time"] == first_run["results"]["demo_lap_time"]  # the sim is deterministic


def test_random_encoder_without_pseudo_resets(first_run, monkeypatch):
    monkeypatch.setattr(fastrlap, "load_or_collect", lambda *a: pytest.fail("stage 1 ran"))
    recorder = Recorder(monkeypatch)
    args = tiny(first_run["folder"], "random", encoder="random", pseudo_resets=False)
    results = fastrlap.main(args)
    assert results["updates"] == 40 and not os.path.exists(os.path.join(args.run_dir, "encoder.pt"))
    assert_finite_losses(results)
    assert recorder.recovers == 0 and recorder.resets == 1 + recorder.events() >= 2  # back to the start instead


def test_no_encoder_feeds_zero_image_features(first_run, monkeypatch):
    recorder = Recorder(monkeypatch)
    args = tiny(first_run["folder"], "blind", encoder="none")
    results = fastrlap.main(args)
    rows = recorder.online_rows(args.total_timesteps)
    features = fastrlap.Encoder(32).out_dim
    assert results["updates"] == 40 and len(rows) == 60
    assert all(not z[:features].any() and not next_z[:features].any() and next_z[features:].any()
               for z, _, _, _, next_z in rows)


def test_evaluation_backs_up_after_a_crash_and_times_the_lap(first_run, course, monkeypatch):
    """A pure-pursuit "policy" at the demo speed, its 3rd step turned into a crash: one pseudo-reset, then
    the lap, slower than the demo lap by the backing up."""
    envs, recovers, make_env = [], [], fastrlap.make_env

    def crash_at_three(*a, **kw):
        env = make_env(*a, **kw)
        step, recover, calls = env.step, env.recover, []

        def crashing_step(action):
            obs, reward, term, trunc, info = step(action)
            calls.append(action)
            return obs, reward, term, trunc, {**info, "crash": True} if len(calls) == 3 else info
        env.step, env.recover = crashing_step, lambda: recovers.append(len(calls)) or recover()
        envs.append(env)
        return env
    monkeypatch.setattr(fastrlap, "make_env", crash_at_three)
    actor = lambda z: torch.as_tensor(fastrlap.pursuit(envs[-1], course, TINY["demo_speed"]))[None]  # noqa: E731
    (lap, crashes), = fastrlap.evaluate(actor, lambda obs: torch.as_tensor(obs["state"]), course,
                                        fastrlap.Args(**{**TINY, "eval_laps": 1}), 0, "unused")
    demo = first_run["results"]["demo_lap_time"]
    assert crashes == 1 and recovers == [3] and demo + 0.5 < lap < demo + 6.0


@pytest.mark.parametrize("learning_starts", [40, 20])  # stopped among the random actions / after updates began
def test_stopped_and_resumed_run_ends_as_the_uninterrupted_run(tmp_path, learning_starts):
    """60 steps straight, against 30 steps, then --resume to 60: the same laps, collisions, losses,
    replay and parameters (the car's state, the replay, the optimizers and every RNG are in the checkpoint)."""
    kw = dict(encoder="random", total_timesteps=60, learning_starts=learning_starts, eval_laps=0, eval_interval=30,
              save_model=True)
    whole = fastrlap.main(tiny(tmp_path, "whole", **kw))
    fastrlap.main(tiny(tmp_path, "part", **{**kw, "total_timesteps": 30}))
    resumed = fastrlap.main(tiny(tmp_path, "ignored", **{**kw, "run_dir": None,
                                                         "resume": str(tmp_path / "part" / "checkpoint.pt")}))
    assert resumed["run_dir"] == str(tmp_path / "part") and resumed["env_steps"] == 30
    for k in ("laps", "collisions", "stuck", "losses/critic_loss", "losses/actor_loss", "values/target_entropy"):
        assert resumed[k] == whole[k], k
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("whole", "part"))
    assert b["step"] == 60 and all(torch.equal(v, b["agent"][k]) for k, v in a["agent"].items())
    assert torch.equal(a["online"]["rows"], b["online"]["rows"]) and np.array_equal(a["env"]["physics"], b["env"]["physics"])
    assert open(tmp_path / "whole" / "laps.csv").read() == open(tmp_path / "part" / "laps.csv").read()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=30), "--image-size must be at least 31"),
    (dict(encoder_path="{folder}/missing.pt"), "does not exist"),
    (dict(encoder_path="{folder}/enc64.pt"), "was trained on 64-pixel images, not --image-size 32"),
    (dict(batch_size=15), "must split into --utd-ratio"),
    (dict(num_min_qs=5), "--num-min-qs must be between 1 and --num-qs"),
    (dict(encoder="none", encoder_path="{folder}/enc64.pt"), "--encoder none and --encoder-path exclude each other"),
    (dict(resume="{folder}/missing.pt"), "missing.pt does not exist"),
])
def test_bad_input(tmp_path, overrides, message):
    torch.save({"encoder": fastrlap.Encoder(64).state_dict(), "image_size": 64}, tmp_path / "enc64.pt")
    overrides = {k: v.format(folder=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(SystemExit, match="fastrlap.py: error: .*" + re.escape(message)):
        fastrlap.main(tiny(tmp_path, **overrides))
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_resume_refuses_files_that_are_not_its_checkpoints(tmp_path):
    foreign = tmp_path / "revind.pt"
    torch.save({"script": "revind.py", "step": 10}, foreign)
    check_resume_refuses_non_checkpoints(fastrlap, tmp_path, lambda path: tiny(tmp_path, resume=path), sibling=foreign)


def test_cli_bad_flag_fails_in_one_line(tmp_path):
    proc = run_script("fastrlap.py", "--image-size", "30", "--run-dir", str(tmp_path / "run"), "--device", "cpu")
    assert proc.returncode == 1 and "fastrlap.py: error: --image-size must be at least 31" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("old run")
    with pytest.raises(SystemExit, match="already exists"):
        fastrlap.main(tiny(tmp_path))
    assert os.listdir(tmp_path / "run") == ["keep.txt"]


# ----------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_blocks():
    """main()'s training step (half demo, half online rows drawn on the device, one UTD block): 3 eager
    warm-ups, the capture, 4 replays, with online rows added before each call; a copy steps eagerly
    from the same RNG state and must match at every call, the annealed entropy target included."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    agent = fastrlap.FastRLAP(8, tiny_agent_args(utd_ratio=4, batch_size=64, target_entropy_decay=0.01), device)
    z_dim = 8 + fastrlap.STATE_DIM
    demo, online = fastrlap.ReplayBuffer(300, z_dim, 2, device), fastrlap.ReplayBuffer(1000, z_dim, 2, device)
    rng = np.random.default_rng(0)

    def add(buffers, n):
        for _ in range(n):
            z, next_z = random_z(2, seed=int(rng.integers(1 << 30))).to(device)
            row = z, rng.uniform(-1, 1, 2), float(rng.normal()), float(rng.random() > 0.1), next_z
            for b in buffers:
                b.add(*row)
    add([demo], 300)
    add([online], 50)
    twin, twin_online = copy.deepcopy(agent), copy.deepcopy(online)
    step = fastrlap.cuda_graph(lambda: agent.update(*fastrlap.half_demo_sample(demo, online, 4, 64)))
    close = dict(rtol=1e-4, atol=1e-5)
    for call in range(1, 9):
        add([online, twin_online], 5)  # the graph must read the new rows and the new size
        state = torch.cuda.get_rng_state()
        out = {k: v.clone() for k, v in step().items()}
        torch.cuda.synchronize()
        after = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)  # the same rows, target subsets and actor noise
        ref = twin.update(*fastrlap.half_demo_sample(demo, twin_online, 4, 64))
        assert torch.equal(torch.cuda.get_rng_state(), after), call
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], **close, msg=f"call {call}: {k}")
        for (name, p), q in zip(agent.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(p, q, **close, msg=f"call {call}: {name}")
        for name in ("actor_opt", "critic_opt", "temp_opt"):
            for s, t in zip(getattr(agent, name).state.values(), getattr(twin, name).state.values()):
                for k in s:
                    torch.testing.assert_close(s[k], t[k], **close, msg=f"call {call}: {name} {k}")
        assert agent.target_entropy.item() == pytest.approx(-3.0 - 0.01 * call, abs=1e-5)
    steps = [int(next(iter(getattr(agent, n).state.values()))["step"]) for n in ("actor_opt", "critic_opt", "temp_opt")]
    assert steps == [8, 8 * 4, 8]  # every call is one real block, the warm-ups too
