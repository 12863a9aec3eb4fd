"""revind.py: the world (camera, collisions, determinism), the data (waypoints, detectors, relabelled
goals and rewards, filtered BC's fragments), the graph (value -> steps, Dijkstra, path following),
the update's wiring, and a few hundred gradient steps through main()."""

import math
import os

import numpy as np
import pytest
import torch

import revind
from conftest import (assert_finite_losses, check_resume_equals_the_uninterrupted_run,
                      check_resume_refuses_non_checkpoints, tiny_args)

TINY = dict(encoder="conv", feature_dim=16, trajectories=24, trajectory_length=40, goal_max=20,
            episode_steps=40, node_spacing=2.0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("revind_data"))


def args_for(tmp_path, data_dir, **kw):
    return tiny_args(revind, tmp_path, data_dir=data_dir, **{**TINY, **kw})


@pytest.fixture(scope="module")
def world():
    return revind.World(0, (24, 32))


# ----------------------------------------------------------------------------- the world
def test_the_camera_shows_the_ground_in_front_and_the_detectors_read_it(world):
    """The image's lower middle is the ground just ahead: grass in the sunny east, shaded dirt in the west."""
    views = {"sunny grass": [30.0, 20.0, np.pi / 2], "shaded dirt": [8.0, 20.0, np.pi / 2], "sunny road": [20.0, 4.0, np.pi / 2]}
    images = np.stack([world.render(np.array(p)) for p in views.values()])
    assert images.shape == (3, 24, 32, 3) and images.dtype == np.uint8
    assert revind.detector(images, "grass").tolist() == [1.0, 0.0, 0.0]
    assert revind.detector(images, "sunny").tolist() == [1.0, 0.0, 1.0]
    assert revind.detector(images, "none").tolist() == [0.0, 0.0, 0.0]
    grass, sun = world.ground(np.array([p[:2] for p in views.values()]))
    assert grass.tolist() == [True, False, False] and sun.tolist() == [True, False, True]
    # turning the robot turns the view: facing wall A from just below it, the upper rows see the wall's colour
    facing_wall = world.render(np.array([25.0, 11.5, np.pi / 2]))
    away = world.render(np.array([25.0, 11.5, -np.pi / 2]))
    wall = (revind.TERRAIN_RGB[revind.WALL] * 255).astype(int)
    wall_pixels = lambda img: (np.abs(img.astype(int) - wall).sum(-1) < 40).sum()  # noqa: E731
    assert wall_pixels(facing_wall) > 20 * max(wall_pixels(away), 1)


def test_moves_follow_the_waypoint_and_walls_stop_the_robot(world):
    pose = np.array([20.0, 5.0, 0.0])
    moved, hit = world.move(pose, np.array([0.3, 0.0]))
    assert not hit and np.allclose(moved, [20.3, 5.0, 0.0])
    moved, hit = world.move(pose, np.array([0.0, 2.0]))  # 90 degrees left: turns by MAX_TURN, moves MAX_STEP
    assert not hit and np.isclose(moved[2], revind.MAX_TURN)
    assert np.allclose(moved[:2], [20 + 0.5 * np.cos(0.5), 5 + 0.5 * np.sin(0.5)])
    below_wall = np.array([25.0, 12.8, np.pi / 2])  # wall A at y = 13 (no gap at x = 25)
    moved, hit = world.move(below_wall, np.array([0.5, 0.0]))
    assert hit and np.allclose(moved[:2], below_wall[:2])
    through_gap = np.array([10.5, 12.8, np.pi / 2])
    moved, hit = world.move(through_gap, np.array([0.5, 0.0]))
    assert not hit and moved[1] > 13.0
    assert world.blocked(np.array([[-1.0, 5.0], [5.0, 41.0]])).all()  # off the map


def test_the_world_and_its_data_are_deterministic_per_seed():
    a, b, c = revind.World(3, (16, 20)), revind.World(3, (16, 20)), revind.World(4, (16, 20))
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.terrain, b.terrain)
    assert not np.array_equal(a.terrain, c.terrain)  # the seed moves the obstacles
    d1, d2 = revind.explore(a, 3, 20, seed=1), revind.explore(b, 3, 20, seed=1)
    for k in d1:
        assert np.array_equal(d1[k], d2[k]), k
    assert not np.array_equal(revind.explore(a, 3, 20, seed=2)["pos"], d1["pos"])


def test_a_straight_line_to_a_far_goal_meets_a_wall(world):
    """The layout's point: from the bottom band to the top band the direct line crosses a wall."""
    for start, goal in revind.far_goal_tasks(world, 10, seed=0):
        line = start[:2] + np.linspace(0, 1, 400)[:, None] * (goal - start[:2])
        assert world.blocked(line).any()
        assert start[1] < 13 and goal[1] > 26.75


# ----------------------------------------------------------------------------- data
def hand_made():
    """Two trajectories: a robot driving east 0.5 m per step along y = 2 for 6 frames (yaw 0), then one
    facing north (yaw pi / 2) whose second command collides. Commands are the next positions."""
    pos = np.array([[2 + 0.5 * i, 2.0] for i in range(6)] + [[30.0, 5.0], [30.0, 5.5], [30.0, 5.5], [30.0, 6.0]], np.float32)
    yaw = np.array([0.0] * 6 + [np.pi / 2] * 4, np.float32)
    yaw[8] += 0.4  # (turned on the spot after the collision: g' is in frame 8's heading, not 7's)
    target = np.concatenate([pos[1:], pos[-1:]])
    target[5] = [4.5, 2.0]  # the last frame of trajectory 0 has a command too (never a transition)
    target[7] = [30.0, 6.0]  # the command that collided (the robot stayed at 5.5)
    collision = np.zeros(10, bool)
    collision[7] = True
    images = np.zeros((10, 16, 16, 3), np.uint8)
    images[[1, 3], 11:, 6:11] = (60, 160, 50)  # grass in the lower middle of frames 1 and 3
    images[:, 0, 0, 0] = np.arange(10)  # each frame's number in its corner pixel
    return {"images": images, "pos": pos, "yaw": yaw, "traj": np.array([0] * 6 + [1] * 4), "target": target,
            "collision": collision}


def test_waypoints_are_the_next_five_commands_in_the_robot_frame():
    data = hand_made()
    a = revind.waypoints(data).reshape(-1, 5, 2)
    assert np.allclose(a[0], [[0.5, 0], [1.0, 0], [1.5, 0], [2.0, 0], [2.5, 0]])
    assert np.allclose(a[3], [[0.5, 0], [1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]])  # past the end: a stop
    # trajectory 1 faces north: world +y is the robot's +x; the collided command stays in the action
    assert np.allclose(a[6], [[0.5, 0], [1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]], atol=1e-6)
    assert np.allclose(a[7], [[0.5, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0.5, 0]], atol=1e-6)


def test_goal_vector_is_the_bearing_and_distance_in_the_robot_frame():
    """Facing north (yaw pi / 2) at (1, 1): a goal 2 m north is straight ahead, one 1 m west is to the left."""
    pos, yaw = torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([math.pi / 2, math.pi / 2])
    g = revind.goal_vector(pos, yaw, torch.tensor([[1.0, 3.0], [0.0, 1.0]]))
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


def test_relabelled_goals_rewards_and_masks(monkeypatch):
    data = hand_made()
    monkeypatch.setattr(revind, "detector", lambda images, kind: (images[:, -1, 8, 1] > 100).astype(np.float32))
    args = revind.Args(goal_min=1, goal_max=3, reward_scale=0.75, collision_reward=-100.0, actor="awr", random_goal_fraction=0.0)
    buffer = revind.RelabelBuffer(data, args, torch.device("cpu"))
    assert buffer.starts.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]  # frames with a successor in their trajectory
    torch.manual_seed(0)
    image, goal, act, rew, mask, next_image, next_goal = buffer.sample(4000)
    i = image[:, 0, 0, 0].long()  # each row's frame
    assert set(i.tolist()) == {0, 1, 2, 3, 4, 6, 7, 8}
    assert torch.equal(next_image[:, 0, 0, 0].long(), i + 1)  # o' is the next frame
    assert torch.equal(act, torch.as_tensor(revind.waypoints(data))[i])
    pos, yaw = torch.as_tensor(data["pos"]), torch.as_tensor(data["yaw"])
    # the goal is a later frame of the same trajectory, 1..3 steps ahead (clipped to the end)
    dist = goal[:, 2]
    for row in range(200):
        t = int(i[row])
        last = 5 if t < 6 else 9
        candidates = [min(t + k, last) for k in (1, 2, 3)]
        expected = [revind.goal_vector(pos[t], yaw[t], pos[g]) for g in candidates]
        match = [j for j, e in enumerate(expected) if torch.allclose(goal[row], e, atol=1e-5)]
        assert match, (t, goal[row])
        g = candidates[match[0]]  # (frames 7 and 8 share a place: either may be the goal)
        assert torch.allclose(next_goal[row], revind.goal_vector(pos[t + 1], yaw[t + 1], pos[g]), atol=1e-5)
        if t == 7:  # the collision: terminal, penalised
            assert rew[row] == -100.0 and mask[row] == 0.0
        else:
            assert rew[row] == pytest.approx(-1.0 + 0.75 * (t in (1, 3)))
            assert float(mask[row]) in {float(candidates[j] != t + 1) for j in match}  # reached on this step: terminal
    assert dist.max() <= 1.5 + 1e-5  # at most 3 steps of 0.5 m


def test_random_goals_come_from_anywhere_and_never_count_as_reached():
    data = hand_made()
    args = revind.Args(goal_min=1, goal_max=3, random_goal_fraction=1.0)
    torch.manual_seed(0)
    image, goal, act, rew, mask, next_image, next_goal = revind.RelabelBuffer(data, args, torch.device("cpu")).sample(2000)
    i = image[:, 0, 0, 0].long()
    pos, yaw = torch.as_tensor(data["pos"]), torch.as_tensor(data["yaw"])
    frame = torch.stack([(revind.goal_vector(pos[i], yaw[i], pos[g].expand(len(i), 2)) - goal).abs().sum(-1) < 1e-4
                         for g in range(10)], 1)  # which frames each goal can be
    assert frame.any(1).all()
    other = (frame[:, :6].any(1) & (i >= 6)) | (frame[:, 6:].any(1) & (i < 6))
    assert other.float().mean() > 0.3  # goals in the other trajectory
    assert torch.equal(mask[other & (i != 7)], torch.ones(int((other & (i != 7)).sum())))


def test_filtered_bc_keeps_the_top_fragments():
    traj = np.array([0] * 30 + [1] * 15)
    reward = np.full(45, -1.0)
    reward[15:30] = -0.25  # trajectory 0's second fragment is all grass
    collision = np.zeros(45, bool)
    keep = revind.top_fragments(np.arange(45), traj, reward, collision, -100.0, length=15, top=0.2)
    assert keep.tolist() == [False] * 15 + [True] * 15 + [False] * 15
    collision[40] = True  # a collision sinks a fragment's score
    reward[:] = -1.0
    keep = revind.top_fragments(np.arange(45), traj, reward, collision, -100.0, length=15, top=0.7)
    assert keep.tolist() == [True] * 30 + [False] * 15


# ----------------------------------------------------------------------------- graph and planner
def test_value_maps_to_a_step_count():
    gamma = 0.99
    for n in (1, 5, 20, 50):
        v = -(1 - gamma ** n) / (1 - gamma)
        assert revind.value_to_steps(np.array([v]), gamma)[0] == pytest.approx(n)
    assert np.isinf(revind.value_to_steps(np.array([-100.0, -150.0]), gamma)).all()
    # an edge is at least one step: V above -1 (an over-estimate, no reward is positive) costs 1
    assert revind.value_to_steps(np.array([-1.0, -0.5, 0.0, 0.5, 30.0]), gamma).tolist() == [1.0] * 5


def test_shortest_paths_and_subgoals_on_a_hand_made_graph():
    """0 -> 1 -> 2 -> 3 costs 3; the shortcut 0 -> 3 costs 5; 4 is cut off; edges are directed."""
    graph = {"nodes": np.arange(5), "pos": np.array([[0, 0], [1, 0], [2, 0], [3, 0], [9, 9]], float),
             "src": np.array([0, 1, 2, 0, 3]), "dst": np.array([1, 2, 3, 3, 0]), "cost": np.array([1, 1, 1, 5, 1.0])}
    to_go, nxt = revind.shortest_paths(graph, goal=3)
    assert to_go[:4].tolist() == [3, 2, 1, 0] and np.isinf(to_go[4])
    assert nxt[:3].tolist() == [1, 2, 3] and nxt[4] == -1
    graph["cost"] = np.array([1, 1, 1, 2.5, 1.0])  # now the shortcut wins
    to_go, nxt = revind.shortest_paths(graph, goal=3)
    assert to_go[0] == 2.5 and nxt[0] == 3
    # following the first plan from (0.1, 0.2) with edges from here of its distance up to 1.5 m: the robot
    # joins at node 1 (0.92 + 2 < 0.22 + 3) and the first node on the path >= 1.5 m away is node 2
    plan = revind.shortest_paths({**graph, "cost": np.array([1, 1, 1, 5, 1.0])}, goal=3)
    here = np.linalg.norm(graph["pos"] - [0.1, 0.2], axis=1)
    here[here > 1.5] = np.inf
    assert np.allclose(revind.next_subgoal(graph, plan, np.array([0.1, 0.2]), here, lookahead=1.5), [2, 0])
    # its own edges decide where it joins: a cheap edge straight to node 3 wins over the nearest node
    cheap = np.array([5, np.inf, np.inf, 1, np.inf])
    assert np.allclose(revind.next_subgoal(graph, plan, np.array([0.1, 0.2]), cheap, lookahead=1.5), [3, 0])
    # node 4 has no path: standing on it, the robot joins elsewhere; with no edges at all there is no subgoal
    here = np.linalg.norm(graph["pos"] - [8.0, 8.0], axis=1)
    assert np.allclose(revind.next_subgoal(graph, plan, np.array([8.0, 8.0]), here, lookahead=1.5), [3, 0])
    assert revind.next_subgoal(graph, plan, np.array([8.0, 8.0]), np.full(5, np.inf), lookahead=1.5) is None


def test_graph_edges_and_costs_come_from_the_value(tmp_path, data_dir, monkeypatch):
    """Edges join nodes within edge_max_distance; each costs value_to_steps(V(o_i, g_ij)), at least 1
    step; edges whose V implies more than max_edge_cost steps are pruned; distance_cost is their length."""
    args = args_for(tmp_path, data_dir, max_edge_cost=25.0)  # V: 10 steps per m - 5: edges up to 3 m of 6
    world = revind.World(args.world_seed, (args.image_height, args.image_width))
    data = revind.load_or_collect(world, args)
    agent = revind.ReViND(args, torch.device("cpu"))

    class TenStepsPerMetre(torch.nn.Module):  # V made to say 10 steps per metre - 5 (V > 0 within 0.5 m)
        def forward(self, s):
            return (-(1 - 0.99 ** (10 * s[:, -1] - 5)) / 0.01)[:, None]
    monkeypatch.setattr(agent.value, "mlp", TenStepsPerMetre())
    graph = revind.build_graph(agent, data, args, torch.device("cpu"))
    length = np.linalg.norm(graph["pos"][graph["src"]] - graph["pos"][graph["dst"]], axis=1)
    assert len(graph["src"]) > 0 and np.allclose(graph["distance_cost"], length, atol=1e-5)
    assert np.allclose(graph["cost"], np.maximum(10 * length - 5, 1), rtol=1e-4)
    assert (length < 0.5).any() and graph["cost"].min() == 1.0  # an over-estimated edge costs 1 step
    assert length.max() <= 3.0 + 1e-4  # pruned beyond 25 steps = 3 m ...
    assert length.max() > 2.5  # ... and kept up to there
    # the robot's own edges: V from its current image, the same pruning, either weighting
    crowd = np.linalg.norm(graph["pos"][:, None] - graph["pos"][None], axis=-1)
    busiest = int(np.argmax(((crowd < 3.0) & (crowd > 0)).sum(1)))  # a node with neighbours within 3 m
    pose = np.array([*(graph["pos"][busiest] + 0.2), 0.3])
    image = torch.as_tensor(world.render(pose)).permute(2, 0, 1)[None]
    gap = np.linalg.norm(graph["pos"] - pose[:2], axis=1)
    by_value = revind.edges_from_here(agent, image, pose, graph, args, "value")
    by_distance = revind.edges_from_here(agent, image, pose, graph, args, "distance")
    reach, beyond = gap <= 3.0 - 1e-3, gap > 3.0 + 1e-3
    assert reach.any() and np.allclose(by_distance[reach], gap[reach])
    assert np.allclose(by_value[reach], np.maximum(10 * gap[reach] - 5, 1), rtol=1e-4)
    assert by_value[busiest] == 1.0  # its own node, 0.28 m away: V > 0, still one step
    assert ((gap > 3.5) & (gap < 6.0)).any()  # candidates that the value prunes
    assert np.isinf(by_value[beyond]).all() and np.isinf(by_distance[beyond]).all()
    cell = np.floor(graph["pos"] / args.node_spacing)
    heading = np.floor((data["yaw"][graph["nodes"]] + np.pi) / (np.pi / 2)) % 4
    assert len(np.unique(np.c_[cell, heading], axis=0)) == len(graph["nodes"])  # one node per cell and heading


def test_summaries_count_grass_and_sun_over_successful_episodes_only():
    """A failed episode that circles on sunny grass must not raise the route's shares."""
    ep = lambda ok, grass, sun, length: dict(success=ok, collided=False, length=length, grass=grass, sun=sun)  # noqa: E731
    s = revind.summarize([ep(True, 0.2, 0.5, 40.0), ep(True, 0.4, 0.7, 50.0), ep(False, 1.0, 1.0, 90.0)])
    assert s["success"] == pytest.approx(2 / 3) and s["length"] == 45.0
    assert s["grass"] == pytest.approx(0.3) and s["sun"] == pytest.approx(0.6)
    assert np.isnan(revind.summarize([ep(False, 1.0, 1.0, 9.0)])["grass"])


def test_an_edge_is_costed_from_its_source_image_with_the_goal_in_its_frame(tmp_path, data_dir,
                                                                             monkeypatch):
    """Each frame's number is written into its image; V made to say 1 + (frame % 7)
    + 2 (1 - cos phi) + rho steps, phi and rho the bearing and distance of the edge's end seen from
    its start (numpy, by hand)."""
    args = args_for(tmp_path, data_dir)
    world = revind.World(args.world_seed, (args.image_height, args.image_width))
    data = dict(revind.load_or_collect(world, args))
    data["images"] = data["images"].copy()
    frame = np.arange(len(data["images"]))
    data["images"][:, 0, 0, 0], data["images"][:, 0, 0, 1] = frame // 256, frame % 256
    agent = revind.ReViND(args, torch.device("cpu"))

    class FrameNumber(torch.nn.Module):
        def forward(self, x):
            return (256 * x[:, 0, 0, 0].float() + x[:, 1, 0, 0].float())[:, None]  # (B, C, H, W)

    class Steps(torch.nn.Module):
        def forward(self, s):
            n = 1 + torch.remainder(s[:, 0], 7) + 2 * (1 - s[:, 2]) + s[:, 3]
            return (-(1 - 0.99 ** n) / 0.01)[:, None]
    monkeypatch.setattr(agent.critic, "encoder", FrameNumber())
    monkeypatch.setattr(agent.value, "project", torch.nn.Identity())
    monkeypatch.setattr(agent.value, "mlp", Steps())
    graph = revind.build_graph(agent, data, args, torch.device("cpu"))
    src = graph["nodes"][graph["src"]]  # the frames at the edges' two ends
    d = data["pos"][graph["nodes"][graph["dst"]]] - data["pos"][src]
    phi = np.arctan2(d[:, 1], d[:, 0]) - data["yaw"][src]
    by_hand = 1 + src % 7 + 2 * (1 - np.cos(phi)) + np.hypot(*d.T)
    assert len(src) > 100 and np.allclose(graph["cost"], by_hand, rtol=1e-4)
    # the robot's own edges: from its own image (frame 12's number) and its heading
    pose = np.array([*graph["pos"][0] + 0.4, 2.5])
    image = torch.as_tensor(data["images"][12]).permute(2, 0, 1)[None]
    cost = revind.edges_from_here(agent, image, pose, graph, args, "value")
    near = np.isfinite(cost)
    d = graph["pos"][near] - pose[:2]
    phi = np.arctan2(d[:, 1], d[:, 0]) - pose[2]
    by_hand = 1 + 12 % 7 + 2 * (1 - np.cos(phi)) + np.hypot(*d.T)
    assert near.sum() > 3 and np.allclose(cost[near], by_hand, rtol=1e-4)


# ----------------------------------------------------------------------------- the update's wiring
def batch_from(buffer, n=16, seed=0):
    torch.manual_seed(seed)
    return buffer.sample(n)


@pytest.mark.parametrize("actor", ["awr", "bc"])
def test_v_regresses_on_the_target_q_and_q_on_the_new_v_at_the_next_observation(tmp_path, data_dir,
                                                                                 actor):
    """V: tau (u > 0) or 1 - tau times u^2, u = mean of the target critic's heads - V(s).
    pi: AWR weights min(exp(beta (Q' - V)), max) from the target Q and the V after its step (BC: 1)
    on the unit-std log-likelihood. Q: both heads onto r + gamma m V(s') with o', g' and the new V.
    All by hand."""
    args = args_for(tmp_path, data_dir, shift_pad=0, actor=actor, beta=3.0, exp_adv_max=1.0)
    world = revind.World(0, (args.image_height, args.image_width))
    buffer = revind.RelabelBuffer(revind.load_or_collect(world, args), args, torch.device("cpu"))
    agent = revind.ReViND(args, torch.device("cpu"))
    with torch.no_grad():  # a target critic unlike the online one
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image, goal, act, rew, mask, next_image, next_goal = batch_from(buffer, 64)
    with torch.no_grad():
        features = agent.critic.encoder(image.float())
        q_target = agent.critic_target.q(agent.critic_target.encoder(image.float()), goal, act).mean(0)
        v = agent.value(features, goal).squeeze(-1)
        agent.value.mlp[-1].bias += (q_target - v).median()  # advantages of both signs
        u = q_target - agent.value(features, goal).squeeze(-1)
        value_loss = torch.where(u > 0, 0.9 * u ** 2, 0.1 * u ** 2).mean()
    seen = {}
    value_step = agent.value_opt.step

    def after_value_step(*a, **kw):  # the V the actor and the Q loss will see
        value_step(*a, **kw)
        with torch.no_grad():
            adv = q_target - agent.value(features, goal).squeeze(-1)
            seen["clipped"] = (adv > 0).float().mean()
            weight = torch.exp(3.0 * adv).clamp(max=1.0) if actor == "awr" else torch.ones(64)
            mu = agent.actor(features, goal)
            log_pi = -0.5 * (act - mu).pow(2).sum(-1) - 5 * math.log(2 * math.pi)
            seen["actor"] = -(weight * log_pi).mean()
            v_next = agent.value(agent.critic.encoder(next_image.float()), next_goal).squeeze(-1)
            seen["backup"] = rew + 0.99 * mask * v_next
            seen["q"] = agent.critic.q(features, goal, act)
    agent.value_opt.step = after_value_step
    out = agent.update(image, goal, act, rew, mask, next_image, next_goal)
    assert out["losses/value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-5)
    assert out["losses/actor_loss"].item() == pytest.approx(seen["actor"].item(), rel=1e-5)
    assert 0.1 < seen["clipped"] < 0.9  # weights on both sides of the clip
    expected = (seen["q"] - seen["backup"]).pow(2).mean()
    assert out["losses/critic_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert mask.min() == 0.0 and mask.max() == 1.0  # terminal and non-terminal rows were both in the batch
    assert (u > 0).any() and (u < 0).any()  # both sides of the expectile


def test_only_the_q_loss_trains_the_encoder_and_the_target_follows_by_polyak(tmp_path, data_dir):
    args = args_for(tmp_path, data_dir)
    world = revind.World(0, (args.image_height, args.image_width))
    buffer = revind.RelabelBuffer(revind.load_or_collect(world, args), args, torch.device("cpu"))
    frozen = revind.ReViND(revind.Args(**{**vars(args), "critic_lr": 0.0}), torch.device("cpu"))
    before = [p.detach().clone() for p in frozen.critic.encoder.parameters()]
    frozen.update(*batch_from(buffer))
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.critic.encoder.parameters()))  # V and pi: no gradient
    agent = revind.ReViND(args, torch.device("cpu"))
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(torch.randn_like(p))
    target0 = [p.detach().clone() for p in agent.critic_target.parameters()]
    agent.update(*batch_from(buffer))
    for t0, t, p in zip(target0, agent.critic_target.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(t, t0 + 0.005 * (p - t0), rtol=0, atol=1e-6)
        assert t.grad_fn is None
    assert not all(torch.equal(a, b) for a, b in zip(before, agent.critic.encoder.parameters()))


def test_the_actor_loss_is_awr_or_bc():
    """AWR: -mean(min(exp(beta A), 100) log pi); BC: weights 1. The unit-std policy's log-likelihood."""
    actor = revind.UnitStdActor(8, revind.Args(feature_dim=4, hidden_dim=8))
    f, g, a = torch.randn(5, 8), torch.randn(5, 3), torch.randn(5, 10)
    lp = actor.log_prob(f, g, a)
    assert torch.allclose(lp, -0.5 * (a - actor(f, g)).pow(2).sum(-1) - 5 * math.log(2 * math.pi))


def test_random_shift_moves_o_and_next_o_together():
    torch.manual_seed(0)
    image = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    a, b = revind.random_shift(image, image + 1000, pad=2)
    assert torch.equal(b, a + 1000)  # the same offset for o and o'
    assert a.shape == image.shape and not torch.equal(a, image)  # (offset 2, 2 would be no shift)
    for x in a:  # each sample is its image moved by whole pixels: rows and columns still step by 8 and 1
        inner = x[:, 2:-2, 2:-2]
        assert torch.all(inner[:, 1:] - inner[:, :-1] == 8) and torch.all(inner[:, :, 1:] - inner[:, :, :-1] == 1)


# ----------------------------------------------------------------------------- main()
def test_main_trains_evaluates_and_writes_outputs(tmp_path, data_dir):
    out = revind.main(args_for(tmp_path, data_dir, max_steps=200, eval_interval=100, eval_episodes=2, save_model=True))
    assert out["updates"] == 200
    assert_finite_losses(out)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and (run / "args.json").exists()
    rows = (run / "evaluations.csv").read_text().splitlines()
    assert rows[0] == "step,variant,success,collision,length,grass,sun" and len(rows) == 1 + 2 * 3
    assert {r.split(",")[1] for r in rows[1:]} == set(revind.VARIANTS)
    assert out["graph/nodes"] > 10 and out["graph/edges"] > 0
    assert sorted(p.name for p in run.glob("routes_*.png")) == ["routes_100.png", "routes_200.png"]
    for v in revind.VARIANTS:
        assert 0 <= out[f"eval/{v}/success"] <= 1
    # --eval-only: the checkpoint evaluated again, in a new folder, with no update
    again = revind.main(args_for(tmp_path, data_dir, eval_only=True, eval_episodes=2, resume=str(run / "checkpoint.pt"),
                                 run_dir=str(tmp_path / "again")))
    assert again["updates"] == 0 and len(again["evaluations"]) == 3
    np.testing.assert_equal([e[1:] for e in again["evaluations"]], [e[1:] for e in out["evaluations"][-3:]])  # same episodes


def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path, data_dir):
    check_resume_equals_the_uninterrupted_run(revind, tmp_path, ["actor_opt", "critic_opt", "value_opt"],
                                              data_dir=data_dir, eval_episodes=0, **TINY)


def test_filtered_bc_and_bc_run_through_main(tmp_path, data_dir):
    for actor in ("bc", "filtered-bc"):
        out = revind.main(args_for(tmp_path, data_dir, actor=actor, user_reward="grass", max_steps=20, eval_episodes=0,
                                   run_dir=str(tmp_path / actor)))
        assert out["updates"] == 20
        assert_finite_losses(out)


@pytest.mark.parametrize("bad, message", [
    (dict(goal_min=0), "goal-min"),
    (dict(expectile=1.0), "expectile"),
    (dict(image_height=8), "16 x 16"),
    (dict(resume="/nonexistent/checkpoint.pt"), "does not exist"),
    (dict(eval_only=True), "--eval-only needs --resume"),
])
def test_bad_input_is_one_clear_error(tmp_path, data_dir, bad, message):
    with pytest.raises(SystemExit, match=message):
        revind.main(args_for(tmp_path, data_dir, **bad))


def test_resume_refuses_what_is_not_a_checkpoint_of_revind(tmp_path, data_dir):
    sibling = tmp_path / "fastrlap_checkpoint.pt"
    torch.save({"script": "fastrlap.py", "step": 3}, sibling)
    check_resume_refuses_non_checkpoints(revind, tmp_path, lambda path: args_for(
        tmp_path, data_dir, resume=path, run_dir=str(tmp_path / "never")), sibling=sibling)


def test_an_existing_run_folder_is_never_overwritten(tmp_path, data_dir):
    os.makedirs(tmp_path / "run")
    with pytest.raises(SystemExit, match="already exists"):
        revind.main(args_for(tmp_path, data_dir))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_eager_steps(tmp_path, data_dir):
    """The captured train step (sampling, augmentation, V, pi, Q, Polyak) replays the eager steps."""
    args = args_for(tmp_path, data_dir, device="cuda")
    world = revind.World(0, (args.image_height, args.image_width))
    buffer = revind.RelabelBuffer(revind.load_or_collect(world, args), args, torch.device("cuda"))
    torch.manual_seed(0)
    agent, twin = revind.ReViND(args, torch.device("cuda")), None
    twin = revind.ReViND(args, torch.device("cuda"))
    twin.load_state_dict(agent.state_dict())
    graphed = revind.cuda_graph(lambda: agent.update(*buffer.sample(32)))
    torch.manual_seed(1)
    outs = [{k: v.clone() for k, v in graphed().items()} for _ in range(6)]
    torch.manual_seed(1)
    eager = [twin.update(*buffer.sample(32)) for _ in range(6)]
    for o, e in zip(outs, eager):
        for k in e:
            torch.testing.assert_close(o[k], e[k], rtol=1e-4, atol=1e-5)
    for p, q in zip(agent.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
