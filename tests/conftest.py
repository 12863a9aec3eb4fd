"""Shared tiny harness: D4RL-format files from real rollouts, tiny Args, helpers."""

import copy
import functools
import glob
import http.server
import json
import math
import os
import subprocess
import sys
import threading

import gymnasium as gym
import numpy as np

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts live at the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("MUJOCO_GL", "egl")

import datasets  # noqa: E402  (tests/datasets.py)


@pytest.fixture(scope="session")
def hopper_files(tmp_path_factory):
    """Two tiny Hopper-v4 datasets (1,500 real transitions, terminals and timeouts),
    one with next_observations and one without, as older D4RL files."""
    folder = tmp_path_factory.mktemp("hopper")
    with_next, returns = datasets.hopper_dataset(str(folder / "hopper-tiny.hdf5"))
    without_next, _ = datasets.hopper_dataset(str(folder / "hopper-tiny-nonext.hdf5"), with_next_observations=False)
    return {"next": with_next, "nonext": without_next, "returns": returns}


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    """A Minari cache (MINARI_DATASETS_PATH) with two small datasets written by Minari itself:
    test/hopper/tiny-v0 (Hopper-v5, terminations and truncations, reference scores -10 / 990) and
    test/antmaze/umaze-v1 (laid out as D4RL/antmaze/umaze-v1, its eval maze turned as Minari's) and
    test/kitchen/tiny-v0 (the Hopper episodes, with FrankaKitchen-v1 as the eval env)."""
    root = str(tmp_path_factory.mktemp("minari"))
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = root
    try:
        _, hopper = datasets.hopper_minari("test/hopper/tiny-v0")
        _, antmaze = datasets.antmaze_minari("test/antmaze/umaze-v1")
        datasets.kitchen_minari("test/kitchen/tiny-v0", hopper)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if saved is None else os.environ.update(MINARI_DATASETS_PATH=saved)
    return {"root": root, "hopper": hopper, "antmaze": antmaze}


def check_minari_hopper_main(module, minari_root, tmp_path, monkeypatch, **overrides):
    """A Minari id trains and evaluates in the env the dataset records (Hopper-v5), scored with the
    dataset's own reference returns, in a run folder named without the id's slashes."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    monkeypatch.chdir(tmp_path)
    results = module.main(tiny_args(module, tmp_path, env="test/hopper/tiny-v0", run_dir=None, **overrides))
    assert results["updates"] > 0 and results["run_dir"].startswith("runs/test-hopper-tiny-v0__")
    assert_finite_losses(results)
    step, ret, _, score = results["evaluations"][-1][:4]
    assert score == pytest.approx(100 * (ret + 10) / 1000)  # the dataset's (-10, 990), not d4rl's hopper refs


def dataset_of(module, args):
    """module.load_dataset on the CPU, without an env, with the family's defaults filled in."""
    return module.load_dataset(module.with_family_defaults(args), None, torch.device("cpu"))


def check_minari_loads_as_d4rl(module, minari_root, tmp_path, monkeypatch):
    """The same episodes from Minari and from a D4RL file load as the same tensors; the s' of a truncated
    last step is its episode's final observation; masks are 0 at terminations only."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    buffers, cpu = minari_root["hopper"], torch.device("cpu")
    path = datasets.minari_episodes_as_d4rl(str(tmp_path / "same.hdf5"), buffers)
    from_minari = dataset_of(module, tiny_args(module, tmp_path, env="test/hopper/tiny-v0", normalize_rewards=False))
    from_file = dataset_of(module, tiny_args(module, tmp_path, env="hopper-x-v2", dataset=path, normalize_rewards=False))
    for k in module.BATCH_KEYS:
        assert torch.equal(from_minari[k], from_file[k]), k
    ends = np.cumsum([len(b.rewards) for b in buffers]) - 1
    terminated = [e for e, b in zip(ends, buffers) if b.terminations[-1]]
    assert terminated and len(terminated) < len(ends)  # the fixture has both kinds of episode end
    masks = from_minari["masks"].numpy()
    assert (masks[terminated] == 0).all() and masks.sum() == len(masks) - len(terminated)
    for e, b in zip(ends, buffers):
        assert np.allclose(from_minari["next_observations"][e].numpy(), b.observations[-1])


def check_minari_antmaze_main(module, minari_root, tmp_path, monkeypatch, **overrides) -> dict:
    """AntMaze from Minari through main(): rewards r - 1, no terminals (Minari's continuing task), the
    31-dim flattened observation, D4RL's 0/1 reference scores. Returns args.json, resolved values on top."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    short = {k: v for k, v in dict(eval_episodes=2, eval_interval=50, max_steps=100).items() if k in module.Args.__dataclass_fields__}
    args = tiny_args(module, tmp_path, env="test/antmaze/umaze-v1", **{**overrides, **short})
    results = module.main(args)
    assert results["updates"] == 100 and len(results["evaluations"]) == 2
    assert_finite_losses(results)
    saved = json.load(open(os.path.join(args.run_dir, "args.json")))
    assert saved["resolved"]["ref_scores"] == [0.0, 1.0]
    if hasattr(module, "load_dataset"):  # the offline scripts' dataset (rlpd.py's prior data: its own test)
        data = dataset_of(module, args)
        assert data["observations"].shape == (200, 31) and (data["rewards"] == -1).all() and (data["masks"] == 1).all()
    return {**saved, **saved["resolved"]}


def check_minari_errors(module, tmp_path, monkeypatch, **overrides):
    """A Minari id that is neither local nor downloadable, one the server does not know, and one beside --dataset."""
    import minari.storage.hosting

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "cache"))
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, at once (otherwise ~25 s of retries)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # (read at import: an earlier test imported it)
    with pytest.raises(SystemExit, match="could not download the Minari dataset 'mujoco/hopper/medium-v0'") as e:
        module.main(tiny_args(module, tmp_path, env="mujoco/hopper/medium-v0", **overrides))
    assert str(tmp_path / "cache" / "mujoco" / "hopper" / "medium-v0") in str(e.value)
    monkeypatch.setattr(minari.storage.hosting, "list_remote_datasets", lambda **kw: {})  # the server's answer
    with pytest.raises(SystemExit, match="Minari has no dataset 'mujoco/hopper/mediocre-v0'"):
        module.main(tiny_args(module, tmp_path, env="mujoco/hopper/mediocre-v0", **overrides))
    with pytest.raises(SystemExit, match="--dataset is a D4RL-format file"):
        module.main(tiny_args(module, tmp_path, env="mujoco/hopper/medium-v0", dataset=str(tmp_path / "x.hdf5"), **overrides))


def check_kitchen_trains_without_evaluation(module, minari_root, tmp_path, monkeypatch, **overrides):
    """FrankaKitchen-v1 cannot be made here (MuJoCo 4): a Kitchen id asks for --eval-episodes 0, then trains."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    assert module.family_of("test/kitchen/tiny-v0") == "kitchen"
    offline = "max_steps" in module.Args.__dataclass_fields__  # (rlpd.py runs the env online: it cannot train without it)
    with pytest.raises(SystemExit, match="the environment of test/kitchen/tiny-v0 cannot run here") as e:
        module.main(tiny_args(module, tmp_path, env="test/kitchen/tiny-v0", **{**overrides, "eval_episodes": 1}))
    assert "AssertionError" in str(e.value) and ("--eval-episodes 0" in str(e.value)) == offline
    if offline:
        results = module.main(tiny_args(module, tmp_path, env="test/kitchen/tiny-v0", **{**overrides, "eval_episodes": 0,
                                                                                         "max_steps": 50}))
        assert results["updates"] == 50


def check_antmaze_eval_env(minari_root, monkeypatch, make_env):
    """D4RL's AntMaze evaluation from a Minari dataset: the data's walls, start and goal (Minari's eval maze
    turned back), the goal-conditioned observation flattened, and an episode that ends at the goal with return 1."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_root["root"])
    env = make_env("test/antmaze/umaze-v1")
    assert env.unwrapped.maze.maze_map == datasets.UMAZE_DATA
    obs, _ = env.reset(seed=0)
    maze = env.unwrapped
    assert obs.shape == (31,) and np.allclose(obs[27:29], maze.data.qpos[:2]) and np.allclose(obs[29:], maze.goal)
    assert maze.goal[1] > 0 > obs[28]  # the data's task: start at the bottom of the U, goal at the top
    _, reward, terminated, _, _ = env.step(np.zeros(8, np.float32))
    assert reward == 0 and not terminated
    qpos, qvel = maze.data.qpos.copy(), maze.data.qvel.copy()
    qpos[:2] = maze.goal  # put the ant on the goal
    maze.ant_env.set_state(qpos, qvel)
    _, reward, terminated, _, _ = env.step(np.zeros(8, np.float32))
    assert reward == 1 and terminated


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www as a D4RL mirror."""
    www = tmp_path / "www"
    (www / "gym_mujoco_v2").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def pendulum_file(tmp_path_factory):
    """20k transitions of a noisy scripted swing-up controller on Pendulum-v1."""
    path, returns = datasets.pendulum_dataset(str(tmp_path_factory.mktemp("pendulum") / "pendulum.hdf5"))
    return path, returns


def tiny_args(module, tmp_path, **overrides):
    """The script's Args with tiny networks and a few hundred steps, writing under tmp_path."""
    fields = module.Args.__dataclass_fields__
    tiny = dict(max_steps=300, batch_size=32, hidden_dim=32, log_interval=100, eval_interval=150,
                eval_episodes=1, run_dir=str(tmp_path / "run"), device="cpu")
    tiny = {k: v for k, v in tiny.items() if k in fields}
    return module.Args(**{**tiny, **overrides})


def assert_finite_losses(results):
    losses = {k: v for k, v in results.items() if k.startswith("losses/")}
    assert losses, "no losses returned"
    for k, v in losses.items():
        assert math.isfinite(v), f"{k} = {v}"


def tensorboard_events(run_dir):
    return glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))


def run_script(script, *cli, timeout=300):
    """Run `python script cli...` from the repo root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *cli], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def compiled_matches_eager(make_agent, batch, steps=2):
    """Run agent.update eagerly and under torch.compile from the same seed on the same batch;
    the losses must agree (inductor told to draw random numbers as eager does)."""
    import torch
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    outs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        agent = make_agent()
        update = torch.compile(agent.update) if compiled else agent.update
        for _ in range(steps):
            out = update(*batch)
        outs.append({k: v.item() for k, v in out.items()})
    for k in outs[0]:
        assert abs(outs[0][k] - outs[1][k]) <= 1e-4 * max(1.0, abs(outs[0][k])), (k, outs)


def random_batch(n=64, obs_dim=11, act_dim=3, seed=1):
    """(s, a, r, m, s') with s and s' unrelated and half the transitions terminal: a wrong wiring changes the losses."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, obs_dim, generator=g), torch.rand(n, act_dim, generator=g) * 2 - 1,
            torch.randn(n, generator=g), (torch.rand(n, generator=g) < 0.5).float(), torch.randn(n, obs_dim, generator=g)]


# ----------------------------------------------------------------------------- the flat optimizer
def flat_adam_steps_as_torch_adam(module, steps=30, **adam_kwargs):
    """module.FlatAdam (a network flattened into one tensor, stepped once) against torch's Adam on an
    untouched copy, layer by layer: the same parameters and moments bit for bit after every step, with
    zero_grad between steps (a dropped flat grad would freeze the network silently); then a deep copy
    of network and optimizer together goes on training as the original does."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 33), torch.nn.ReLU(),
                              torch.nn.Linear(33, 2))
    ref = copy.deepcopy(net)
    flat_opt = module.FlatAdam(net.parameters(), lr=1e-2, **adam_kwargs)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, **adam_kwargs)
    x, y, w0 = torch.randn(64, 7), torch.randn(64, 2), net[0].weight.detach().clone()

    def train(pairs, steps):
        for step in range(steps):
            for model, opt in pairs:
                opt.zero_grad()
                (model(x) - y).pow(2).mean().backward()
                opt.step()
            (a, a_opt), (b, b_opt) = pairs
            for p, q in zip(a.parameters(), b.parameters()):
                assert torch.equal(p, q), f"step {step}: parameters differ"
            flat = a_opt.param_groups[0]["params"][0]
            b_avg = torch.cat([b_opt.state[q]["exp_avg"].reshape(-1) for q in b.parameters()])
            assert torch.equal(a_opt.state[flat]["exp_avg"], b_avg), f"step {step}: moments differ"
    train([(net, flat_opt), (ref, ref_opt)], steps)
    assert (net[0].weight - w0).abs().max() > 1e-3  # the network trained
    twin, twin_opt = copy.deepcopy((net, flat_opt))
    train([(twin, twin_opt), (ref, ref_opt)], 5)
    assert not torch.equal(twin[0].weight, net[0].weight)  # the copy trained, on its own tensors


# ----------------------------------------------------------------------------- resume and CUDA-graph checks
def same(a, b) -> bool:
    """Exactly equal nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_training_state(agent, twin, out, twin_out, call):
    """Outputs, parameters and optimizer states (Adam's moments and step counts) agree."""
    for k in out:
        torch.testing.assert_close(out[k], twin_out[k], rtol=1e-4, atol=1e-5, msg=f"call {call}: {k}")
    for (name, p), q in zip(agent.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"call {call}: {name}")
    for opt, twin_opt in zip(agent.optimizers().values(), twin.optimizers().values()):
        for state, twin_state in zip(opt.state.values(), twin_opt.state.values()):
            for k in state:
                torch.testing.assert_close(state[k], twin_state[k], rtol=1e-4, atol=1e-5, msg=f"call {call}: {k}")


def graph_replays_match_eager_steps(module, agent, batch_size, steps=5, n=1000, obs_dim=11, act_dim=3):
    """The real training step (batch indices drawn on the device, agent.update) through the script's
    cuda_graph: after its eager warm-ups, capture and replay it `steps` times; a copy of the agent runs
    the same steps eagerly from the same RNG state. Outputs, parameters, optimizer state and the lr
    tensor must agree after every step."""
    device = torch.device("cuda")
    buffer = [torch.randn(n, obs_dim, device=device), torch.rand(n, act_dim, device=device) * 2 - 1,
              torch.randn(n, device=device), (torch.rand(n, device=device) < 0.9).float(), torch.randn(n, obs_dim, device=device)]

    def train_step(a):
        idx = torch.randint(0, n, (batch_size,), device=device)
        return a.update(*(x[idx] for x in buffer))
    graphed = module.cuda_graph(lambda: train_step(agent))
    for _ in range(3):  # the eager warm-ups (real updates)
        graphed()
    twin = copy.deepcopy(agent)
    close = lambda x, y: torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5)  # noqa: E731
    for i in range(steps):
        state = torch.cuda.get_rng_state()
        out = {k: v.clone() for k, v in graphed().items()}  # i = 0 captures, then replays
        torch.cuda.set_rng_state(state)
        ref = train_step(twin)
        for k in ref:
            assert close(out[k], ref[k]), (i, k)
        for (name, p), q in zip(agent.state_dict().items(), twin.state_dict().values()):
            assert close(p, q), (i, name)
        for name in ("actor_opt", "critic_opt", "value_opt"):
            opt, twin_opt = getattr(agent, name), getattr(twin, name)
            for p, q in zip(opt.param_groups[0]["params"], twin_opt.param_groups[0]["params"]):
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    assert close(opt.state[p][k], twin_opt.state[q][k]), (i, name, k)
        assert agent.actor_opt.param_groups[0]["lr"] is agent.actor_lr
        assert close(agent.actor_lr, twin.actor_lr) and close(agent.actor_lr, out["values/actor_lr"]), i
    assert int(agent.num_updates) == 3 + steps


def check_resume_equals_the_uninterrupted_run(module, tmp_path, optimizers, **overrides):
    """Stopped at step 100 and resumed to 200 = 200 in one go (offline scripts): losses, evaluations,
    parameters, optimizer states. The lr decays to 0 at step 150, so a schedule frozen at resume shows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU results are reproducible per thread count
    try:
        def run(name, **kw):
            return module.main(tiny_args(module, tmp_path, save_model=True, eval_interval=100, lr_decay_steps=150,
                                         run_dir=str(tmp_path / name), **{**overrides, **kw}))
        whole = run("whole", max_steps=200)
        run("part", max_steps=100)
        resumed = run("part", max_steps=200, resume=str(tmp_path / "part" / "checkpoint.pt"))
    finally:
        torch.set_num_threads(threads)
    assert resumed["updates"] == 100
    for k, v in whole.items():
        if k.startswith(("losses/", "values/", "eval/")) or k == "evaluations":
            assert resumed[k] == v, k
    assert whole["values/actor_lr"] == 0.0  # the schedule ran out at step 150
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False) for name in ("whole", "part"))
    for k in a["agent"]:
        assert torch.equal(a["agent"][k], b["agent"][k]), k
    for opt in optimizers:
        assert same(a[opt], b[opt]), opt  # moments, step counts and the lr


def check_resume_refuses_non_checkpoints(module, tmp_path, args_for, sibling=None):
    """--resume with a file that is not this script's checkpoint stops with one sentence naming the file,
    before a run folder is made or data loaded: garbage bytes, a truncated checkpoint, a dict of unknown
    origin, and (sibling: a real checkpoint of another script, as a path) another script's checkpoint.
    args_for(resume_path) returns the script's Args."""
    name = module.__name__ + ".py"
    other = tmp_path / "other.pt"
    torch.save({"step": 10, "agent": {"w": torch.zeros(3)}}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint\n" * 64)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(other.read_bytes()[: os.path.getsize(other) // 2])
    cases = {garbage: "not a readable checkpoint", truncated: "not a readable checkpoint",
             other: f"not a checkpoint of {name}"}
    if sibling is not None:
        script = torch.load(sibling, weights_only=False)["script"]
        cases[sibling] = f"a checkpoint of {script}, not of {name}"
    for path, why in cases.items():
        args = args_for(str(path))
        with pytest.raises(SystemExit) as err:
            module.main(args)
        message = str(err.value)
        assert message.startswith(f"{name}: error: ") and str(path) in message and why in message, message
        assert message.count("\n") == 0, message
        assert not os.path.exists(args.run_dir), "a run folder was made for a bad checkpoint"


# ----------------------------------------------------------------------------- online scripts (sac_20min, rlpd)
def check_actor_and_temperature_steps_by_hand(agent, batch, critic_step_draws=lambda: None):
    """On the last slice, after the G = 2 critic steps of a 2 x 16 block: L_pi = E[alpha log pi(a~|s)
    - mean_k Q_k(s, a~)] with the updated online critics (not their min, not the target), L_alpha =
    alpha (H - H_target), H_target = -|A| / 2 = -0.5; each takes Adam's first step, -lr g / (|g| + eps).
    agent: 3-d states, 1-d actions, alpha 0.5, lr 3e-4; critic_step_draws: the block's own random
    draws per critic step after a' ~ pi(.|s') (rlpd's target subset)."""
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(0.3 * torch.randn_like(p))  # the target differs from the online critics
    obs, act, rew, mask, next_obs = batch
    twin = copy.deepcopy(agent)
    torch.manual_seed(5)
    out = agent.update(obs, act, rew, mask, next_obs)
    torch.manual_seed(5)  # the block's draws in order: per critic step, then a~ ~ pi(.|s)
    for g in range(2):
        twin.actor.sample(next_obs[16 * g:16 * (g + 1)]), critic_step_draws()
    new_act, log_prob = twin.actor.sample(obs[16:])
    actor_loss = (0.5 * log_prob - agent.critic(obs[16:], new_act).mean(0)).mean()
    temp_loss = 0.5 * (-log_prob.mean().item() + 0.5)
    torch.testing.assert_close(out["losses/actor_loss"], actor_loss.detach())
    assert out["losses/temperature_loss"].item() == pytest.approx(temp_loss, rel=1e-5)
    grads = torch.autograd.grad(actor_loss, list(twin.actor.parameters()))
    for p, q, g in zip(agent.actor.parameters(), twin.actor.parameters(), grads):
        torch.testing.assert_close(p, q - 3e-4 * g / (g.abs() + 1e-8), rtol=0, atol=1e-7)
    step = 3e-4 * math.copysign(1, temp_loss)  # d L_alpha / d log alpha = L_alpha
    assert agent.log_alpha.item() == pytest.approx(math.log(0.5) - step, abs=1e-7)
    assert agent.target_entropy == -0.5


def check_each_critic_step_reads_its_own_slice(agent):
    """Critic step g of a G = 3 block backs up (r, s') of slice g and fits Q(s, a) on the same rows;
    the actor reads the last slice (agent: 3-d states, 1-d actions)."""
    rows = torch.arange(24.0)  # row i: s = i, r = i, s' = -i
    seen, target_value = [], agent.critic_target_value

    def recording_target_value(r, m, s):
        seen.append(("y", r.tolist(), (-s[:, 0]).tolist()))
        return target_value(r, m, s)
    agent.critic_target_value = recording_target_value
    agent.critic.register_forward_pre_hook(lambda _, x: seen.append(("Q", x[0][:, 0].tolist())))
    states = rows[:, None].repeat(1, 3)
    agent.update(states, torch.zeros(24, 1), rows, torch.ones(24), -states)
    slices = [rows[8 * g:8 * g + 8].tolist() for g in range(3)]
    assert seen == [x for s in slices for x in (("y", s, s), ("Q", s))] + [("Q", slices[2])]


def check_polyak_after_every_critic_step(agent, batches, tau=0.005):
    """Qtarget <- (1 - tau) Qtarget + tau Q after each of the G critic steps, and never recorded by autograd."""
    with torch.no_grad():
        for p in agent.critic_target.parameters():
            p.add_(torch.randn_like(p))
    expected = [p.detach().clone() for p in agent.critic_target.parameters()]
    critic_step = agent.critic_opt.step

    def step_and_follow(*a, **kw):  # the target the Polyak rule gives from the critics after this step
        critic_step(*a, **kw)
        for t, p in zip(expected, agent.critic.parameters()):
            t.add_(tau * (p.detach() - t))
    agent.critic_opt.step = step_and_follow
    for b in batches:
        agent.update(*b)
    for t, p in zip(expected, agent.critic_target.parameters()):
        torch.testing.assert_close(p, t, rtol=0, atol=1e-6)
        assert p.grad_fn is None  # lerp_ under no_grad: no autograd graph growing with every step


class WiringEnv(gym.Env):
    """A walk x <- x + a from x = 0, obs (t / 10, x), reward x: terminates when |x| > bound, truncated by a
    TimeLimit at 10 steps. Reset draws nothing, so episodes of a run resumed at an episode end replay exactly."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, bound: float = 1.5):
        self.bound = bound

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.x = 0, 0.0
        return np.array([0.0, 0.0], dtype=np.float32), {}

    def step(self, action):
        self.t, self.x = self.t + 1, self.x + float(action[0])
        return np.array([self.t / 10, self.x], dtype=np.float32), self.x, abs(self.x) > self.bound, False, {}


gym.register("Wiring-v0", entry_point=WiringEnv, max_episode_steps=10)
gym.register("WiringNoEnd-v0", entry_point=WiringEnv, max_episode_steps=10, kwargs={"bound": math.inf})


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def check_replay_masks_termination_not_truncation(buffer):
    """A replay filled by main() on Wiring-v0: m = 0 exactly on terminal transitions; a time-limit cut keeps
    m = 1 and its true s'."""
    obs, act, _, mask, next_obs = buffer.rows.split(buffer.dims, -1)
    terminal = next_obs[:, 1].abs() > 1.5
    cut = (next_obs[:, 0] == 1.0) & ~terminal  # the 10th step of an episode that did not end by itself
    assert terminal.sum() > 5 and cut.sum() > 5
    torch.testing.assert_close(mask[:, 0], (~terminal).float())
    torch.testing.assert_close(next_obs[:, 1], obs[:, 1] + act[:, 0])  # s' is the step's own, never a reset's


def check_full_replay_resumes_in_order(module):
    """A ring that has wrapped is saved oldest first and resumes into a larger, the same and a smaller capacity
    with ptr = size % capacity (the module's ReplayBuffer: sac_20min's and rlpd's are the same class)."""
    def filled(capacity, n):  # rewards 1..n mark the order of the rows
        buffer = module.ReplayBuffer(capacity, 1, 1, torch.device("cpu"))
        for i in range(1, n + 1):
            buffer.add(np.zeros(1), np.zeros(1), float(i), 1.0, np.zeros(1))
        return buffer
    state = filled(10, 25).state_dict()  # a full ring: rows 21..25 then 16..20 in memory
    assert state["rows"][:, 2].tolist() == list(range(16, 26))  # saved oldest first
    bigger = module.ReplayBuffer(20, 1, 1, torch.device("cpu"))
    bigger.load_state_dict(state)
    assert (bigger.size, bigger.ptr, int(bigger.size_t)) == (10, 10, 10)
    assert bigger.rows[:10, 2].tolist() == list(range(16, 26))
    assert set(bigger.sample(2000)[2].tolist()) == set(range(16, 26))  # no all-zero row is ever drawn
    bigger.add(np.zeros(1), np.zeros(1), 26.0, 1.0, np.zeros(1))
    assert bigger.rows[10, 2] == 26  # after the newest, not over row 0
    same = module.ReplayBuffer(10, 1, 1, torch.device("cpu"))
    same.load_state_dict(state)
    same.add(np.zeros(1), np.zeros(1), 26.0, 1.0, np.zeros(1))
    assert same.rows[:, 2].tolist() == [26.0] + list(range(17, 26))  # full: the oldest row goes first
    smaller = module.ReplayBuffer(4, 1, 1, torch.device("cpu"))
    smaller.load_state_dict(state)
    assert smaller.rows[:, 2].tolist() == [22, 23, 24, 25] and smaller.ptr == 0


def check_main_feeds_update_aligned_transitions(module, agent_cls, dataset, tmp_path, monkeypatch, **overrides):
    """Every row main() hands to update() is one transition of the file: s, a, r, m, s' of the same row."""
    seen, update = [], agent_cls.update
    monkeypatch.setattr(agent_cls, "update", lambda self, *batch: seen.append(batch) or update(self, *batch))
    module.main(tiny_args(module, tmp_path, env="hopper-medium-v2", dataset=dataset, max_steps=3,
                          normalize_rewards=False, **overrides))
    t = {k: torch.as_tensor(v) for k, v in module.qlearning_transitions(module.read_d4rl(dataset)).items()}
    assert len(seen) == 3
    for obs, act, rew, mask, next_obs in seen:
        rows = (obs[:, None] == t["observations"][None]).all(-1).float().argmax(1)  # each state's row in the file
        assert torch.equal(t["observations"][rows], obs)
        assert torch.allclose(t["actions"][rows].clamp(-1 + 1e-5, 1 - 1e-5), act, atol=1e-6)  # Hopper's bounds are [-1, 1]
        assert torch.equal(t["rewards"][rows], rew) and torch.equal(t["masks"][rows], mask)
        assert torch.equal(t["next_observations"][rows], next_obs)
