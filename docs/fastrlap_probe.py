"""What the frozen encoders see: linear probes of the image features on the target course.

    python docs/fastrlap_probe.py runs/X/encoder.pt [--samples 2000]

The car is put at random poses in the corridor of the target course (at most 0.6 m off the demo
path, heading within 0.6 rad of it); for each view, the 288 features of the pretrained encoder
(the file given) and of the random one the `--encoder random` runs use (torch seed 0) are
regressed (ridge with the penalty chosen on a held-out part of the fit set, fit on 75%, R^2 on
the rest) onto what a driver needs from the image: the free
distance straight ahead (to 4 m), and whether a box lies within 2 m ahead.
"""

import argparse
import math
import os
import sys

if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless, as fastrlap.py (set before the import)
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastrlap  # noqa: E402


def free_distance(course, p, yaw, walls, limit=4.0):
    d = np.array([math.cos(yaw), math.sin(yaw)])
    for r in np.arange(0.0, limit, 0.05):
        q = p + r * d
        if any(abs(q[0] - cx) < hx and abs(q[1] - cy) < hy for cx, cy, hx, hy in walls):
            return r
    return limit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--course-seed", type=int, default=0)
    cli = parser.parse_args()
    args = fastrlap.Args(course_seed=cli.course_seed)
    course = fastrlap.Course(cli.course_seed, spacing=args.checkpoint_spacing)
    env = fastrlap.make_env(course, args)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    pixels, ahead, box = [], [], []
    while len(pixels) < cli.samples:
        i = rng.integers(len(course.path))
        t = course.path[(i + 1) % len(course.path)] - course.path[i]
        if np.linalg.norm(t) < 1e-9:  # the loop's closing point repeats its first
            continue
        heading = math.atan2(t[1], t[0]) + rng.uniform(-0.6, 0.6)
        p = course.path[i] + rng.uniform(-0.6, 0.6) * np.array([-t[1], t[0]]) / np.linalg.norm(t)
        if course.blocked(p, p, fastrlap.HALF_WIDTH + 0.05):
            continue
        env.data.qpos[:7] = [p[0], p[1], 0.07, math.cos(heading / 2), 0, 0, math.sin(heading / 2)]
        env.data.qvel[:] = 0
        mujoco.mj_forward(env.model, env.data)
        frame = env.render_camera()
        pixels.append(np.stack([frame] * 3))
        ahead.append(free_distance(course, p, heading, course.walls))
        box.append(free_distance(course, p, heading, course.walls[5:], 2.0) < 2.0)
    pixels = torch.as_tensor(np.stack(pixels))
    targets = {"free distance ahead (m)": np.array(ahead), "a box within 2 m ahead": np.array(box, float)}
    torch.manual_seed(0)
    encoders = {"random": fastrlap.Encoder(args.image_size),
                "pretrained": fastrlap.load_encoder(cli.encoder, args, torch.device("cpu"))}
    n_fit = int(0.75 * len(pixels))
    print(f"{len(pixels)} views of course {cli.course_seed}; ridge regression on {n_fit}, R^2 on {len(pixels) - n_fit}")
    print("| encoder | features that vary | " + " | ".join(f"R^2: {k}" for k in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for name, enc in encoders.items():
        with torch.no_grad():
            f = torch.cat([enc(pixels[i:i + 256]) for i in range(0, len(pixels), 256)]).numpy().astype(np.float64)
        mu, sd = f[:n_fit].mean(0), f[:n_fit].std(0) + 1e-6
        x = np.c_[(f - mu) / sd, np.ones(len(f))]

        def r2(fit, test, y, penalty):
            w = np.linalg.solve(x[fit].T @ x[fit] + penalty * np.eye(x.shape[1]), x[fit].T @ y[fit])
            return 1 - ((x[test] @ w - y[test]) ** 2).sum() / ((y[test] - y[test].mean()) ** 2).sum()
        scores, inner = [], int(0.8 * n_fit)
        for y in targets.values():
            penalty = max((10.0 ** k for k in range(-1, 5)),
                          key=lambda lam: r2(slice(0, inner), slice(inner, n_fit), y, lam))
            scores.append(r2(slice(0, n_fit), slice(n_fit, None), y, penalty))
        live = int((f.std(0) > 1e-6).sum())
        print(f"| {name} | {live} of {f.shape[1]} | " + " | ".join(f"{r:.2f}" for r in scores) + " |")


if __name__ == "__main__":
    main()
