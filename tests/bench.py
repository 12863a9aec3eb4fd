"""Updates per second of each script's update step: eager, torch.compile, CUDA graph.

    python tests/bench.py                       # every script, every mode this machine has
    python tests/bench.py --scripts iql --modes eager compile --steps 300
    python tests/bench.py --peers --peer-jax-python JAXVENV/bin/python --peer-jax-src FOLDER --peer-corl CORL/iql.py \
        --peer-idql-src IDQL --peer-rlpd-src RLPD --peer-sac_20min-src WALK_IN_THE_PARK

Each script's update runs at its default sizes on random data that lives on the device,
with batch indices sampled there, exactly as in the script's training loop. Rows count
gradient steps (for UTD scripts: critic updates, 20 per block) or, for the "-env" rows,
environment steps of the whole online loop (policy sample, Hopper-v4 step, replay write,
one UTD block). Quote the ratios of one run (same machine, same moment), not absolute numbers.

--fused-adam builds every Adam with fused=True (a single Adam kernel per step where PyTorch has a fused Adam for
the device): an A/B of what a fused step would buy. It changes the last bits, so the scripts do not use it.

--peers times a script's eager update beside its peers', round after round (median of --rounds),
for every peer whose flags are given (the peers' code and the JAX venv stay outside this repository):
  iql        the official JAX learner (--peer-jax-src: a checkout of ikostrikov/implicit_q_learning), run by
             tests/bench_peer_jax.py in the JAX venv, and CORL's PyTorch trainer (--peer-corl: its
             algorithms/offline/iql.py), run by tests/bench_peer_corl.py in this venv
  idql, rlpd, sac_20min
             the official JAX learner in a checkout of philippe-eecs/IDQL, ikostrikov/rlpd or
             ikostrikov/walk_in_the_park (--peer-idql-src, --peer-rlpd-src, --peer-sac_20min-src),
             run by tests/bench_peer_jax.py in the JAX venv (--peer-jax-python; its docstring has the set-up)
"""

import argparse
import json
import os
import statistics
import subprocess
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


def speedup(fn, mode, capture):
    return torch.compile(fn) if mode == "compile" else capture(fn) if mode == "cuda-graph" else fn


def iql_step(device, mode):
    """iql.py: one IQL update (V, actor, twin Q, Polyak), batch 256, Hopper sizes."""
    import iql
    agent = iql.IQL(11, 3, iql.with_family_defaults(iql.Args()), device)
    return speedup(sampled_update(agent, iql.Args.batch_size, device), mode, iql.cuda_graph), 1, "updates"


def idql_step(device, mode):
    """idql.py: one IDQL update (diffusion BC + EMA, V, twin Q, Polyak), batch 512, Hopper sizes."""
    import idql
    agent = idql.IDQL(11, 3, idql.with_family_defaults(idql.Args()), device)
    return speedup(sampled_update(agent, idql.Args.batch_size, device), mode, idql.cuda_graph), 1, "updates"


def idql_select(device, mode):
    """idql.py: one action selection for 10 evaluation envs (N = 64 samples each, T = 5 DDPM steps)."""
    import idql
    agent = idql.IDQL(11, 3, idql.with_family_defaults(idql.Args()), device)
    obs = torch.randn(10, 11, device=device)
    return speedup(lambda: agent.select(obs), mode, idql.cuda_graph), 1, "selections"


def utd_block(module, agent_cls, device, mode, with_env=False):
    """One UTD block (20 critic updates + actor + temperature) from a 1M-row device buffer;
    with_env: the whole online step around it (policy sample, Hopper-v4 step, replay write)."""
    args = module.Args()
    agent = agent_cls(11, 3, args, device)
    buffer = module.ReplayBuffer(1_000_000, 11, 3, device)
    buffer.rows.normal_()
    buffer.size = 1_000_000
    buffer.size_t.fill_(buffer.size)
    block = speedup(lambda: agent.update(*buffer.sample(args.utd_ratio * args.batch_size)), mode, module.cuda_graph)
    if not with_env:
        return block, args.utd_ratio, "critic updates"
    env = module.make_env(module.Args(env="Hopper-v4"))
    state = {"obs": env.reset(seed=0)[0]}

    def env_step():
        with torch.no_grad():
            act = agent.actor.sample(torch.as_tensor(state["obs"], dtype=torch.float32, device=device)[None])[0][0]
        act = act.cpu().numpy()
        next_obs, rew, term, trunc, _ = env.step(act)
        buffer.add(state["obs"], act, rew, 1.0 - term, next_obs)
        state["obs"] = env.reset()[0] if term or trunc else next_obs
        return block()
    return env_step, 1, "env steps"


def sac_20min_block(device, mode, with_env=False):
    """sac_20min.py: one UTD block of DroQ-SAC (2 critics with dropout + LayerNorm), batch 256."""
    import sac_20min
    return utd_block(sac_20min, sac_20min.SAC, device, mode, with_env)


def rlpd_block(device, mode, with_env=False):
    """rlpd.py: one UTD block of RLPD (10 LayerNorm critics, target on a random pair), batch 256."""
    import rlpd
    return utd_block(rlpd, rlpd.RLPD, device, mode, with_env)


def revind_step(device, mode):
    """revind.py: one pixel-IQL update (shift augmentation, V, actor, Q with the IMPALA encoder, Polyak) at the
    defaults (24 x 32 images, batch 512) from 20k random frames with relabelled goals drawn on the device."""
    import numpy as np
    import revind
    args = revind.Args()
    rng, n = np.random.default_rng(0), 20_000
    data = {"images": rng.integers(0, 256, (n, args.image_height, args.image_width, 3), dtype=np.uint8),
            "pos": rng.uniform(0, 40, (n, 2)).astype(np.float32), "yaw": rng.uniform(-3, 3, n).astype(np.float32),
            "traj": np.repeat(np.arange(n // 80), 80), "target": rng.uniform(0, 40, (n, 2)).astype(np.float32),
            "collision": rng.random(n) < 0.05}
    buffer = revind.RelabelBuffer(data, args, device)
    agent = revind.ReViND(args, device)
    return speedup(lambda: agent.update(*buffer.sample(args.batch_size)), mode, revind.cuda_graph), 1, "updates"


def fastrlap_block(device, mode):
    """fastrlap.py: one practice UTD block (10 LayerNorm critics on the frozen 288 image features + 14 state
    numbers, batch 512 split into 8 critic steps, then actor and temperature), half of it from the demo; no
    compile row (the script has no --compile)."""
    if mode == "compile":
        return None
    import fastrlap
    args = fastrlap.Args()
    agent = fastrlap.FastRLAP(288, args, device)
    demo, online = (fastrlap.ReplayBuffer(n, 288 + fastrlap.STATE_DIM, 2, device) for n in (400, 15_000))
    for buffer in (demo, online):
        buffer.rows.uniform_(-1, 1)
        buffer.size = buffer.capacity
        buffer.size_t.fill_(buffer.capacity)
    step = speedup(lambda: agent.update(*fastrlap.half_demo_sample(demo, online, args.utd_ratio, args.batch_size)),
                   mode, fastrlap.cuda_graph)
    return step, args.utd_ratio, "critic updates"


def fastrlap_pretrain(device, mode):
    """fastrlap.py: one pixel-IQL pretraining step (random crop, V, actor, 10 Q heads with the conv encoder,
    Polyak) on 64 x 64 frame stacks with relabelled goals drawn on the device, batch 128; no compile row."""
    if mode == "compile":
        return None
    import numpy as np
    import fastrlap
    args, rng, n = fastrlap.Args(), np.random.default_rng(0), 4000
    data = {"pixels": rng.integers(0, 256, (n, 3, 64, 64, 3), dtype=np.uint8),
            "own": rng.normal(size=(n, 9)), "pose": rng.uniform(0, 10, (n, 3)), "prev_action": rng.uniform(-1, 1, (n, 2)),
            "goal": rng.uniform(0, 10, (n, 2)), "action": rng.uniform(-1, 1, (n, 2)), "crash": rng.random(n) < 0.02,
            "valid": np.arange(n) % 500 != 499, "drive": np.arange(n) // 500}
    buffer = fastrlap.PretrainBuffer({k: np.asarray(v, np.uint8 if k == "pixels" else np.float32) for k, v in data.items()},
                                     args, device)
    iql = fastrlap.PixelIQL(args, device)
    return speedup(lambda: iql.update(*buffer.sample(args.pretrain_batch_size)), mode, fastrlap.cuda_graph), 1, "updates"


def ddpo_step(device, mode):
    """ddpo.py: one DDPO_IS backward pass (one timestep of a train batch of 4, with guidance: 8 UNet rows)
    and an AdamW step, on the tiny model (16x16 pixels) with its LoRA; no CUDA graph (not used by the script)."""
    if mode == "cuda-graph":
        return None
    import ddpo
    args = ddpo.Args(model="tiny")
    unet, text_encoder, tokenizer, scheduler, _ = ddpo.build_tiny(pretrain_steps=0)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.to(device)
    scheduler.set_timesteps(args.sample_num_steps)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate)
    embeds, neg = torch.randn(4, 77, 32, device=device), torch.randn(4, 77, 32, device=device)
    x_t, x_prev, t = torch.randn(4, 3, 16, 16, device=device), torch.randn(4, 3, 16, 16, device=device), torch.full((4,), 501)

    def loss_fn():
        eps = ddpo.guided_eps(unet, x_t, t.to(device), embeds, neg, args.guidance_scale)
        log_prob = ddpo.ddim_step_with_logprob(scheduler, eps, t, x_t, args.sample_eta, prev_sample=x_prev)[1]
        return ddpo.ddpo_loss(log_prob, log_prob.detach(), torch.randn(4, device=device), args)[0]
    loss_fn = torch.compile(loss_fn) if mode == "compile" else loss_fn

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
    return step, 1, "backward passes"


def mtl_step(method):
    def make(device, mode):
        """mtl_scalarization.py: one MultiLeNet step (batch 256, 2 tasks) with the method's backward pass and
        Adam; eager only (per-task backward passes and host-side solvers: the cost the study compares)."""
        if mode != "eager":
            return None
        import mtl_scalarization as mtl
        args = mtl.Args(mtl=method, cagrad_c=0.4)
        model = mtl.MultiLeNet(2).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        state = mtl.imtl_scales(2, args.lr, device) if method == "imtl" else {}
        x, y = torch.randn(5000, 1, 28, 28, device=device), torch.randint(0, 10, (5000, 2), device=device)

        def step():
            idx = torch.randint(0, 5000, (args.batch_size,), device=device)
            return mtl.supervised_step(model, opt, x[idx], y[idx], args, state)
        return step, 1, "updates"
    return make


MTL_METHODS = ("unitary", "mgda-ub", "imtl", "pcgrad", "graddrop", "rlw-dirichlet", "rlw-normal", "cagrad")
SCRIPTS = {"iql": iql_step, "idql": idql_step, "idql-select": idql_select,
           "sac_20min": sac_20min_block, "sac_20min-env": lambda d, m: sac_20min_block(d, m, with_env=True),
           "rlpd": rlpd_block, "rlpd-env": lambda d, m: rlpd_block(d, m, with_env=True), "ddpo": ddpo_step, "revind": revind_step,
           "fastrlap": fastrlap_block, "fastrlap-pretrain": fastrlap_pretrain,
           **{f"mtl-{m}": mtl_step(m) for m in MTL_METHODS}}


def use_fused_adam():
    """Every Adam the scripts build (torch's, and fastrlap.py's FlatAdam on top of it) with fused=True."""
    init = torch.optim.Adam.__init__
    torch.optim.Adam.__init__ = lambda self, params, *a, **kw: init(self, params, *a, **{"fused": True, **kw})


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


def peers_of(cli) -> dict:
    """{script: {peer: command}} for every peer whose flags were given."""
    here = os.path.dirname(os.path.abspath(__file__))
    peers = {"iql": {}, "idql": {}, "rlpd": {}, "sac_20min": {}}
    if cli.peer_jax_src:
        peers["iql"]["official JAX"] = [cli.peer_jax_python, os.path.join(here, "bench_peer_jax.py"), "--system", "iql",
                                        "--src", cli.peer_jax_src, "--seconds", str(cli.peer_seconds)]
    if cli.peer_corl:
        peers["iql"]["CORL"] = [sys.executable, os.path.join(here, "bench_peer_corl.py"), "--corl-iql", cli.peer_corl,
                                "--seconds", str(cli.peer_seconds), "--threads", str(torch.get_num_threads())]
    for name in ("idql", "rlpd", "sac_20min"):
        src = getattr(cli, f"peer_{name}_src")
        if src:
            peers[name]["official JAX"] = [cli.peer_jax_python, os.path.join(here, "bench_peer_jax.py"), "--system", name,
                                           "--src", src, "--seconds", str(cli.peer_seconds)]
    return {name: p for name, p in peers.items() if p}


def peer_rounds(name: str, peers: dict, cli, device):
    """The script's eager update vs its peers, back to back in each round; prints each round and the medians."""
    ours = f"{name}.py"
    names = [ours, *peers]
    print(f"\n{name}: {SCRIPTS[name].__doc__.strip().splitlines()[0]}")
    print("| round | " + " | ".join(f"{n} (updates/s)" for n in names) + " | " +
          " | ".join(f"{ours} / {n}" for n in peers) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    rates = {n: [] for n in names}
    for r in range(cli.rounds):
        torch.manual_seed(0)
        step, per_call, _ = SCRIPTS[name](device, "eager")
        rates[ours].append(per_call * measure(step, max(cli.steps // per_call, 10), device))
        for peer, cmd in peers.items():
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"bench.py: error: the {peer} peer of {name} failed:\n{run.stderr[-2000:]}")
            rates[peer].append(json.loads(run.stdout.strip().splitlines()[-1])["updates_per_second"])
        row = {n: v[-1] for n, v in rates.items()}
        print(f"| {r + 1} | " + " | ".join(f"{row[n]:.0f}" for n in names) + " | " +
              " | ".join(f"{row[ours] / row[n]:.2f}x" for n in peers) + " |", flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    ratios = {n: statistics.median(a / b for a, b in zip(rates[ours], rates[n])) for n in peers}
    print("| median | " + " | ".join(f"{med[n]:.0f}" for n in names) + " | " +
          " | ".join(f"**{ratios[n]:.2f}x**" for n in peers) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=None, choices=list(SCRIPTS), help="default: all (with --peers: all that have a peer)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "cuda-graph"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fused-adam", action="store_true", help="every Adam with fused=True (see above)")
    parser.add_argument("--peers", action="store_true", help="iql.py's update beside the peers' (see above)")
    parser.add_argument("--peer-jax-python", default=sys.executable, help="python of the venv that has JAX")
    parser.add_argument("--peer-jax-src", default=None, help="checkout of ikostrikov/implicit_q_learning")
    parser.add_argument("--peer-corl", default=None, help="CORL's algorithms/offline/iql.py")
    parser.add_argument("--peer-idql-src", default=None, help="checkout of philippe-eecs/IDQL")
    parser.add_argument("--peer-rlpd-src", default=None, help="checkout of ikostrikov/rlpd")
    parser.add_argument("--peer-sac_20min-src", dest="peer_sac_20min_src", default=None,
                        help="checkout of ikostrikov/walk_in_the_park")
    parser.add_argument("--peer-seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    cli = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cli.peers:  # the peers' scripts time the CPU
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
        peers = peers_of(cli)
        if not peers:
            sys.exit("bench.py: error: --peers needs at least one peer: --peer-jax-src (with --peer-jax-python), "
                     "--peer-corl, --peer-idql-src, --peer-rlpd-src or --peer-sac_20min-src")
        for name in [n for n in cli.scripts if n in peers] if cli.scripts else peers:
            peer_rounds(name, peers[name], cli, torch.device("cpu"))
        return
    if cli.fused_adam:
        use_fused_adam()
    modes = [m for m in cli.modes if m != "cuda-graph" or device.type == "cuda"]
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}" + (", fused Adam" if cli.fused_adam else ""))
    columns = ["script", "per second", *modes, *(f"{m} / eager" for m in modes[1:])]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for name in cli.scripts or SCRIPTS:
        rates = {}
        for mode in modes:
            torch.manual_seed(0)
            made = SCRIPTS[name](device, mode)
            if made is None:  # a mode the script does not use
                rates[mode] = float("nan")
                continue
            step, per_call, unit = made
            rates[mode] = per_call * measure(step, cli.steps, device)
        cells = [name, unit, *(f"{rates[m]:.0f}" for m in modes), *(f"{rates[m] / rates['eager']:.2f}x" for m in modes[1:])]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
