"""CleanRL's SAC trained and evaluated as tests/parity.py needs it (one seed, one run).

    python tests/parity_peer_cleanrl.py --src CLEANRL_CHECKOUT --env Hopper-v4 --steps 30000 --seed 0 \
        --eval-interval 5000 --eval-episodes 10 --out DIR

Runs in this project's venv. --src is a checkout of vwxyzjn/cleanrl: cleanrl/sac_continuous_action.py's
Args, make_env, Actor and SoftQNetwork, and the ReplayBuffer it imports (cleanrl_utils/buffers.py),
are imported from there (nothing of them is in this project). The script's training loop sits under
`if __name__ == "__main__"`, so it is written here again, line by line, at its Args defaults:
seeding (random, np.random, torch; the action space seeded with --seed, the first reset too); one
SyncVectorEnv of make_env; the actor, the two critics and their targets built in the script's order;
Adam for the critics (q_lr 1e-3) and the actor (policy_lr 3e-4); autotune: log alpha from 0 (alpha
1), target entropy -|A|, Adam at q_lr. Then per env step (global_step from 0): learning_starts (5000)
uniformly random actions, then a ~ pi(.|s); the row (s, a, r, s', done) with s' the final observation
of a truncated episode and done = termination (handle_timeout_termination=False); from global_step
5001, one critic step on a batch of 256 (sum of the two MSEs, target min Q' - alpha log pi at s'),
every policy_frequency (2) steps that many actor steps (min of the critics) each followed by an
alpha step on a fresh log pi, and every step the Polyak update (tau 0.005) of both targets.
What this harness changes: Gymnasium 1.x's vector env runs with SAME_STEP autoreset, the behaviour of
the Gymnasium 0.29 the script was written for (its infos["final_observation"] is now "final_obs");
TensorBoard logging is left out (it changes nothing). Evaluation, made the same for both sides as
sac_20min.py does it: every --eval-interval env steps and at the end, --eval-episodes episodes of
the deterministic action (get_action's mean, tanh(mean) * scale + bias, computed without drawing
noise, so evaluating leaves the training run alone) in a separate env, the first reset with
seed + 10000 + step. Writes DIR/evaluations.csv (step, return, return_std) as sac_20min.py does.

What still differs from sac_20min.py at the pair's flags (tests/parity.py: UTD 1, no dropout or
LayerNorm, critic and temperature lr 1e-3, alpha from 1, entropy target -|A|, 5000 random steps):
- actor and temperature: CleanRL 2 steps every 2nd env step on that step's batch, ours 1 per step;
  its actor loss takes the min of the two critics (ours their mean, as DroQ), its temperature step
  a fresh log pi drawn after the actor step (ours the actor step's);
- log std: CleanRL tanh-squashed into [-5, 2], ours clipped to [-20, 2]; the tanh correction
  log(1 - tanh(u)^2 + 1e-6) (ours exact); PyTorch's default init (ours Xavier-uniform, zero bias);
- the critic loss is the sum of the two MSEs (ours their mean: the gradient is halved, which Adam
  all but ignores); the first update after 5002 env steps (ours 5001); batches drawn by np.random
  (ours by torch), a 1e6-row buffer (ours total_timesteps rows: at these lengths nothing is dropped).
"""
import argparse
import copy
import importlib.util
import os
import random
import sys
import time

import numpy as np

from parity_peer_jax import evaluate


def import_cleanrl(src: str):
    """The module of cleanrl/sac_continuous_action.py (its main block does not run), with
    cleanrl_utils from the same checkout."""
    sys.path.insert(0, os.path.abspath(src))
    spec = importlib.util.spec_from_file_location(
        "cleanrl_sac", os.path.join(src, "cleanrl", "sac_continuous_action.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vector_env(thunk):
    """SyncVectorEnv of one env, reset in the step that ends an episode (Gymnasium 0.29's autoreset,
    which the script expects)."""
    import gymnasium as gym
    return gym.vector.SyncVectorEnv([thunk], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def env_step(envs, obs, actions) -> tuple:
    """envs.step, and the row the script stores: (the observation to act on next, (s, s', a, r,
    done, infos)), s' the final observation where an episode was truncated, done = termination."""
    next_obs, rewards, terminations, truncations, infos = envs.step(actions)
    real_next_obs = next_obs.copy()
    for idx, trunc in enumerate(truncations):
        if trunc:
            real_next_obs[idx] = infos["final_obs"][idx]
    return next_obs, (obs, real_next_obs, actions, rewards, terminations, infos)


def deterministic_action(actor, obs: np.ndarray) -> np.ndarray:
    """get_action's mean, tanh(mean) * action_scale + action_bias, for one observation, without the
    noise get_action draws (evaluating leaves the training run's RNG alone)."""
    import torch
    with torch.no_grad():
        mean, _ = actor(torch.as_tensor(obs, dtype=torch.float32)[None])
        return (torch.tanh(mean) * actor.action_scale + actor.action_bias)[0].numpy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True, help="checkout of vwxyzjn/cleanrl")
    p.add_argument("--env", default="Hopper-v4")
    p.add_argument("--steps", type=int, default=30_000, help="environment steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning-starts", type=int, default=None, help="default: Args' (5000)")
    p.add_argument("--eval-interval", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"parity_peer_cleanrl.py: error: {a.out} already exists")
    import gymnasium as gym
    import torch
    import torch.nn.functional as F
    sac = import_cleanrl(a.src)
    args = sac.Args(env_id=a.env, seed=a.seed, total_timesteps=a.steps, cuda=False)
    args.learning_starts = args.learning_starts if a.learning_starts is None else a.learning_starts

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cpu")
    envs = vector_env(sac.make_env(args.env_id, args.seed, 0, False, "parity"))
    eval_env = gym.make(args.env_id)

    actor = sac.Actor(envs).to(device)
    qf1, qf2 = sac.SoftQNetwork(envs).to(device), sac.SoftQNetwork(envs).to(device)
    qf1_target, qf2_target = sac.SoftQNetwork(envs).to(device), sac.SoftQNetwork(envs).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_optimizer = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
    actor_optimizer = torch.optim.Adam(list(actor.parameters()), lr=args.policy_lr)
    if args.autotune:
        target_entropy = -float(np.prod(envs.single_action_space.shape))
        log_alpha = torch.zeros(1, requires_grad=True, device=device)
        alpha = log_alpha.exp().item()
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr)
    else:
        alpha = args.alpha
    observation_space = copy.deepcopy(envs.single_observation_space)
    observation_space.dtype = np.float32  # as the script: the buffer holds float32 observations
    rb = sac.ReplayBuffer(args.buffer_size, observation_space, envs.single_action_space, device,
                          n_envs=1, handle_timeout_termination=False)

    os.makedirs(a.out)
    evals, t0 = [], time.perf_counter()
    obs, _ = envs.reset(seed=args.seed)
    for global_step in range(args.total_timesteps):
        if global_step < args.learning_starts:
            actions = np.array([envs.single_action_space.sample()])
        else:
            actions, _, _ = actor.get_action(torch.Tensor(obs).to(device))
            actions = actions.detach().cpu().numpy()
        obs, row = env_step(envs, obs, actions)
        rb.add(*row)

        if global_step > args.learning_starts:
            data = rb.sample(args.batch_size)
            with torch.no_grad():  # y = r + gamma (1 - done) (min Q'(s', a') - alpha log pi(a'|s'))
                next_actions, next_log_pi, _ = actor.get_action(data.next_observations)
                qf1_next = qf1_target(data.next_observations, next_actions)
                qf2_next = qf2_target(data.next_observations, next_actions)
                min_qf_next = torch.min(qf1_next, qf2_next) - alpha * next_log_pi
                next_q_value = data.rewards.flatten() + \
                    (1 - data.dones.flatten()) * args.gamma * min_qf_next.view(-1)
            qf1_a_values = qf1(data.observations, data.actions).view(-1)
            qf2_a_values = qf2(data.observations, data.actions).view(-1)
            qf_loss = F.mse_loss(qf1_a_values, next_q_value) + F.mse_loss(qf2_a_values, next_q_value)
            q_optimizer.zero_grad()
            qf_loss.backward()
            q_optimizer.step()

            if global_step % args.policy_frequency == 0:  # delayed: policy_frequency steps at once
                for _ in range(args.policy_frequency):
                    pi, log_pi, _ = actor.get_action(data.observations)
                    min_qf_pi = torch.min(qf1(data.observations, pi), qf2(data.observations, pi))
                    actor_loss = ((alpha * log_pi) - min_qf_pi).mean()
                    actor_optimizer.zero_grad()
                    actor_loss.backward()
                    actor_optimizer.step()
                    if args.autotune:
                        with torch.no_grad():
                            _, log_pi, _ = actor.get_action(data.observations)
                        alpha_loss = (-log_alpha.exp() * (log_pi + target_entropy)).mean()
                        a_optimizer.zero_grad()
                        alpha_loss.backward()
                        a_optimizer.step()
                        alpha = log_alpha.exp().item()

            if global_step % args.target_network_frequency == 0:
                for net, target in ((qf1, qf1_target), (qf2, qf2_target)):
                    for param, target_param in zip(net.parameters(), target.parameters()):
                        target_param.data.copy_(args.tau * param.data + (1 - args.tau) * target_param.data)

        step = global_step + 1  # environment steps done
        if step % a.eval_interval == 0 or step == args.total_timesteps:
            act = lambda obs: deterministic_action(actor, obs)  # noqa: E731
            returns = evaluate(act, eval_env, a.eval_episodes, a.seed + 10_000 + step)
            evals.append((step, returns.mean(), returns.std()))
            with open(os.path.join(a.out, "evaluations.csv"), "w") as f:
                f.write("step,return,return_std\n")
                f.writelines(f"{s},{r:.2f},{sd:.2f}\n" for s, r, sd in evals)
            print(f"step={step} eval/return={returns.mean():.1f} +- {returns.std():.1f} "
                  f"alpha={alpha:.3g} sps={step / (time.perf_counter() - t0):.1f}", flush=True)


if __name__ == "__main__":
    main()
