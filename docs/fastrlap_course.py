"""The figure of the target course in docs/fastrlap.md: walls, boxes, the demo path, its checkpoints
(with the straight lines between them that clip a wall in red) and the camera's view from the start.

    MUJOCO_GL=egl python docs/fastrlap_course.py docs/fastrlap_course.png [--course-seed 0]
"""

import argparse
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastrlap  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--course-seed", type=int, default=0)
    cli = parser.parse_args()
    args = fastrlap.Args(course_seed=cli.course_seed)
    course = fastrlap.Course(cli.course_seed, spacing=args.checkpoint_spacing)
    env = fastrlap.make_env(course, args)
    obs, _ = env.reset()
    fig, (ax, cam) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, (cx, cy, hx, hy) in enumerate(course.walls):
        ax.add_patch(plt.Rectangle((cx - hx, cy - hy), 2 * hx, 2 * hy, color="tab:blue" if i >= 5 else "0.35"))
    ax.plot(*course.path.T, color="tab:green", lw=1, label="demo path")
    cps = course.checkpoints
    for i in range(len(cps)):
        a, b = cps[i], cps[(i + 1) % len(cps)]
        clipped = course.blocked(a, b, fastrlap.HALF_WIDTH)
        ax.plot(*np.stack([a, b]).T, color="tab:red" if clipped else "0.7", lw=1.2, ls="--" if clipped else ":")
    ax.scatter(*cps.T, color="k", s=18, zorder=3, label="checkpoints")
    for i, c in enumerate(cps):
        ax.add_patch(plt.Circle(c, args.checkpoint_radius, fill=False, color="k", lw=0.4))
        ax.annotate(str(i), c, xytext=(3, 3), textcoords="offset points", fontsize=7)
    x, y, yaw = course.start_pose()
    ax.arrow(x, y, 0.6 * np.cos(yaw), 0.6 * np.sin(yaw), width=0.08, color="tab:orange", label="start")
    ax.set_aspect("equal")
    ax.set_xlim(-0.5, course.lx + 0.5)
    ax.set_ylim(-0.5, course.ly + 0.5)
    ax.set_title(f"course {cli.course_seed}: {course.length:.1f} m lap; red: checkpoint-to-checkpoint lines that clip a wall")
    ax.legend(loc="center", fontsize=8)
    cam.imshow(obs["pixels"][-1])
    cam.set_title(f"camera at the start ({args.image_size} x {args.image_size})")
    cam.axis("off")
    fig.tight_layout()
    fig.savefig(cli.out, dpi=110)
    print(f"wrote {cli.out}")


if __name__ == "__main__":
    main()
