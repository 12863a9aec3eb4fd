"""Shared tiny harness: D4RL-format files from real rollouts, tiny Args, helpers."""

import functools
import glob
import http.server
import math
import os
import subprocess
import sys
import threading

import pytest

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
