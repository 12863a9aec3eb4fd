"""What the learned value does to revind.py's graph, read off trained checkpoints (runs made with --save-model):

    python docs/revind_graph_check.py RUN_DIR [RUN_DIR ...]

Per run, the graph is built as the evaluation builds it and compared with the world's ground truth:
- pruning: of the candidate edges whose straight segment crosses a wall, the share the value prunes
  (cost above --max-edge-cost), against the share of free edges it prunes;
- calibration: the median cost per metre of free edges and of edges through walls (a robot covers
  about 0.27 m per step of the data, so about 3.7 steps per metre of driving, 0.9 on grass with the
  grass reward; more per metre of straight line where the data's way there winds);
- the fork: from the node nearest the bottom band's middle (20, 4) to the node nearest wall B's gap
  (20, 28), the cheapest route crossing wall A near its near gap (x 7-14.5; shaded dirt beyond) and
  near its far gap (x 29-36.5; sunny grass), with the value's costs and with metres."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import revind  # noqa: E402


def route_cost(graph, cost, start, goal, keep):
    """Dijkstra to goal over the edges whose two ends satisfy keep (a node mask)."""
    ok = keep[graph["src"]] & keep[graph["dst"]]
    return revind.shortest_paths({**graph, "src": graph["src"][ok], "dst": graph["dst"][ok], "cost": cost[ok]}, goal)[0][start]


def load_run(run: str) -> tuple:
    """A saved run's Args, world, data, checkpoint and trained agent (eval mode), on the CPU."""
    saved = json.load(open(os.path.join(run, "args.json")))
    args = revind.Args(**{k: v for k, v in saved.items() if k in revind.Args.__dataclass_fields__})
    world = revind.World(args.world_seed, (args.image_height, args.image_width))
    state = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)
    agent = revind.ReViND(args, torch.device("cpu"))
    agent.load_state_dict(state["agent"])
    return args, world, revind.load_or_collect(world, args), state, agent.eval()


if __name__ == "__main__":
    print("| run | user reward | steps | through-wall edges pruned | free edges pruned | cost per metre: free / through walls "
          "| fork, value cost: near / far gap | fork, metres: near / far gap |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        args, world, data, state, agent = load_run(run)
        every = revind.build_graph(agent, data, revind.Args(**{**vars(args), "max_edge_cost": float("inf")}), torch.device("cpu"))
        pos, src, dst = every["pos"], every["src"], every["dst"]
        segment = pos[src][:, None] + np.linspace(0, 1, 25)[None, :, None] * (pos[dst] - pos[src])[:, None]
        walled = world.blocked(segment).any(1)
        pruned = every["cost"] > args.max_edge_cost
        per_metre = every["cost"] / np.maximum(every["distance_cost"], 0.1)
        graph = revind.build_graph(agent, data, args, torch.device("cpu"))
        start = int(np.argmin(np.linalg.norm(graph["pos"] - [20.0, 4.0], axis=1)))
        goal = int(np.argmin(np.linalg.norm(graph["pos"] - [20.0, 28.0], axis=1)))
        band = (graph["pos"][:, 1] > 9.0) & (graph["pos"][:, 1] < 17.0)  # around wall A, wider than an edge is long
        x = graph["pos"][:, 0]
        near, far = ~band | ((x > 7.0) & (x < 14.5)), ~band | ((x > 29.0) & (x < 36.5))  # around each gap
        value = [route_cost(graph, graph["cost"], start, goal, m) for m in (near, far)]
        metres = [route_cost(graph, graph["distance_cost"], start, goal, m) for m in (near, far)]
        print(f"| {os.path.basename(run.rstrip('/'))} | {args.user_reward} | {state['step']} | {pruned[walled].mean():.0%} | "
              f"{pruned[~walled].mean():.0%} | {np.median(per_metre[~walled]):.2f} / {np.median(per_metre[walled]):.2f} | "
              f"{value[0]:.1f} / {value[1]:.1f} | {metres[0]:.1f} / {metres[1]:.1f} |", flush=True)
