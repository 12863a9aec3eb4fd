"""How the graph variant plans and replans, from trained checkpoints (runs made with --save-model):

    python docs/revind_replan_check.py RUN_DIR [RUN_DIR ...]

On 20 far-goal tasks (a fresh set, not the run's own evaluation) per run:
- floor edges: the share of the graph's edges whose value V >= -1 (more than one step's reward can
  give) puts them at value_to_steps' minimum cost, one step; the planned route's cost to go from the
  start and its length in metres, and the share of its edges at that floor;
- replans: entry-node flips (the robot enters the graph at the node it left two replans before) and
  reversals (the entry node's cost to go rises by more than half a step), per replan;
- walls: the share of replans whose subgoal lies behind a wall (the straight segment crosses one), over
  the successful episodes and over the last 10 replans of the failed ones.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import revind  # noqa: E402
from revind_graph_check import load_run  # noqa: E402  (docs/, this script's folder)

FLOOR = 1.0 + 1e-9  # value_to_steps' minimum edge cost: one step
print("| run | user reward | floor edges | planned route: cost / metres / floor edges | success | flips, reversals "
      "per replan | subgoal behind a wall: successes / failures' last 10 replans |")
print("|---|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    args, world, data, state, agent = load_run(run)
    graph = revind.build_graph(agent, data, args, torch.device("cpu"))
    cost_of = dict(zip(zip(graph["src"], graph["dst"]), graph["cost"]))
    walled = lambda a, b: bool(world.blocked(a + np.linspace(0, 1, 25)[:, None] * (b - a)).any())  # noqa: E731

    replans, plain_next_subgoal = [], revind.next_subgoal

    def recording_next_subgoal(g, plan, position, cost_from_here, lookahead):
        subgoal = plain_next_subgoal(g, plan, position, cost_from_here, lookahead)
        total = cost_from_here + plan[0]
        if subgoal is not None:
            node = int(np.argmin(total))
            replans[-1].append((node, plan[0][node], walled(np.asarray(position, float), np.asarray(subgoal, float))))
        return subgoal

    revind.next_subgoal = recording_next_subgoal
    routes, success, flips, reversals, n_replans, wall_ok, wall_fail = [], [], 0, 0, 0, [], []
    for start, goal in revind.far_goal_tasks(world, 20, args.seed + 10_000 + state["step"]):
        plan = revind.shortest_paths(graph, int(np.argmin(np.linalg.norm(graph["pos"] - goal, axis=1))))
        path = [int(np.argmin(np.linalg.norm(graph["pos"] - start[:2], axis=1)))]
        while plan[1][path[-1]] >= 0 and len(path) < len(graph["pos"]):
            path.append(int(plan[1][path[-1]]))
        edges = list(zip(path[:-1], path[1:]))
        routes.append((plan[0][path[0]], sum(np.linalg.norm(graph["pos"][b] - graph["pos"][a]) for a, b in edges),
                       np.mean([cost_of[e] <= FLOOR for e in edges]) if edges else np.nan))
        replans.append([])
        episode = revind.drive(agent, world, graph, plan, start, goal, args, torch.device("cpu"))
        nodes, to_go, behind = zip(*replans[-1]) if replans[-1] else ((), (), ())
        flips += sum(nodes[i] == nodes[i - 2] != nodes[i - 1] for i in range(2, len(nodes)))
        reversals += int(np.sum(np.diff(to_go) > 0.5))
        n_replans += len(nodes)
        success.append(episode["success"])
        (wall_ok if episode["success"] else wall_fail).extend(behind if episode["success"] else behind[-10:])
    revind.next_subgoal = plain_next_subgoal
    cost, metres, floor = np.nanmedian(np.array(routes, float), axis=0)
    print(f"| {os.path.basename(run.rstrip('/'))} | {args.user_reward} | {np.mean(graph['cost'] <= FLOOR):.1%} | "
          f"{cost:.2f} / {metres:.1f} m / {floor:.0%} | {np.mean(success):.0%} | {flips / max(n_replans, 1):.2f}, "
          f"{reversals / max(n_replans, 1):.2f} | {np.mean(wall_ok) if wall_ok else np.nan:.0%} / "
          f"{np.mean(wall_fail) if wall_fail else np.nan:.0%} |", flush=True)
