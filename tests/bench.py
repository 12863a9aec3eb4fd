"""Updates per second of each script's update step: eager, torch.compile, CUDA graph.

    python tests/bench.py                       # every script, every mode this machine has
    python tests/bench.py --scripts iql --modes eager compile --steps 300

Each script's update runs at its default sizes on random data that lives on the device,
with batch indices sampled there, exactly as in the script's training loop. Quote the
ratios of one run (same machine, same moment), not absolute numbers.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sampled_update(agent, batch_size, device, obs_dim=11, act_dim=3, n=1_000_000):
    """agent.update on batches drawn on the device from a random 1M-row buffer, as in main()."""
    buffer = [torch.randn(n, obs_dim, device=device), torch.rand(n, act_dim, device=device) * 2 - 1,
              torch.randn(n, device=device), torch.ones(n, device=device), torch.randn(n, obs_dim, device=device)]

    def step():
        idx = torch.randint(0, n, (batch_size,), device=device)
        return agent.update(*(x[idx] for x in buffer))
    return step


def iql_step(device):
    """iql.py: one IQL update (V, actor, twin Q, Polyak), batch 256, Hopper sizes."""
    import iql
    agent = iql.IQL(11, 3, iql.Args(), expectile=0.7, beta=3.0, dropout=None, device=device)
    return sampled_update(agent, iql.Args.batch_size, device), iql.cuda_graph


def idql_step(device):
    """idql.py: one IDQL update (diffusion BC + EMA, V, twin Q, Polyak), batch 512, Hopper sizes."""
    import idql
    agent = idql.IDQL(11, 3, idql.Args(), expectile=0.7, device=device)
    return sampled_update(agent, idql.Args.batch_size, device), idql.cuda_graph


def idql_select(device):
    """idql.py: one action selection for 10 evaluation envs (N = 64 samples each, T = 5 DDPM steps)."""
    import idql
    agent = idql.IDQL(11, 3, idql.Args(), expectile=0.7, device=device)
    obs = torch.randn(10, 11, device=device)
    return (lambda: agent.select(obs)), idql.cuda_graph


SCRIPTS = {"iql": iql_step, "idql": idql_step, "idql-select": idql_select}


def measure(step, steps, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(max(steps // 10, 5)):  # warm-up: compilation, allocator, cuBLAS workspaces
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "cuda-graph"])
    parser.add_argument("--steps", type=int, default=500)
    cli = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in cli.modes if m != "cuda-graph" or device.type == "cuda"]
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| script | " + " | ".join(f"{m} (updates/s)" for m in modes) + " | " +
          " | ".join(f"{m} / eager" for m in modes[1:]) + " |")
    print("|---" * (1 + 2 * len(modes) - 1) + "|")
    for name in cli.scripts:
        rates = {}
        for mode in modes:
            torch.manual_seed(0)
            step, capture = SCRIPTS[name](device)
            if mode == "compile":
                step = torch.compile(step)
            elif mode == "cuda-graph":
                step = capture(step)
            rates[mode] = measure(step, cli.steps, device)
        print(f"| {name} | " + " | ".join(f"{rates[m]:.0f}" for m in modes) + " | " +
              " | ".join(f"{rates[m] / rates['eager']:.2f}x" for m in modes[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
