"""Speed of CORL's PyTorch IQL trainer on random Hopper-sized batches, for tests/bench.py --peers.

    python tests/bench_peer_corl.py --corl-iql CORL/algorithms/offline/iql.py [--seconds 15] [--threads 2]

Runs in this project's venv. --corl-iql is algorithms/offline/iql.py of a checkout of corl-team/CORL;
its ImplicitQLearning trainer is imported from there (nothing of it is in this project) and built as
its train() builds it, at TrainConfig's defaults (Gaussian actor, beta 3, tau 0.7, batch 256, the
actor's cosine lr over max_timesteps) on the CPU. Its imports that the update never touches (d4rl,
gym, pyrallis, wandb) are stubbed. Batches are tensors on the CPU, cycled, shaped as its
ReplayBuffer.sample returns them. Prints one JSON line with "updates_per_second".
"""
import argparse
import importlib.util
import json
import sys
import time
import types

import torch


def stub(name: str, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corl-iql", required=True, help="CORL's algorithms/offline/iql.py")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    stub("d4rl")
    stub("wandb")
    stub("gym", Env=object)  # an annotation only
    stub("pyrallis", wrap=lambda *a, **k: (lambda f: f), dump=lambda *a, **k: None)
    spec = importlib.util.spec_from_file_location("corl_iql", cli.corl_iql)
    corl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corl)
    config = corl.TrainConfig(device="cpu")
    obs_dim, act_dim = 11, 3
    torch.manual_seed(0)
    q, v = corl.TwinQ(obs_dim, act_dim), corl.ValueFunction(obs_dim)
    actor = corl.GaussianPolicy(obs_dim, act_dim, 1.0, dropout=config.actor_dropout)
    trainer = corl.ImplicitQLearning(
        max_action=1.0, actor=actor, actor_optimizer=torch.optim.Adam(actor.parameters(), lr=config.actor_lr),
        q_network=q, q_optimizer=torch.optim.Adam(q.parameters(), lr=config.qf_lr), v_network=v,
        v_optimizer=torch.optim.Adam(v.parameters(), lr=config.vf_lr), discount=config.discount, tau=config.tau,
        device="cpu", beta=config.beta, iql_tau=config.iql_tau, max_steps=config.max_timesteps)
    n = config.batch_size
    batches = [[torch.randn(n, obs_dim), torch.rand(n, act_dim) * 2 - 1, torch.randn(n, 1), torch.randn(n, obs_dim),
                torch.zeros(n, 1)] for _ in range(8)]
    for i in range(3):  # warm-up
        trainer.train(batches[i])
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < cli.seconds:
        trainer.train(batches[calls % 8])
        calls += 1
    print(json.dumps({"peer": "corl-iql", "updates_per_second": round(calls / (time.perf_counter() - t0), 1),
                      "threads": cli.threads}))


if __name__ == "__main__":
    main()
