"""A diagnostic, not part of the world: can an adapter trained on one clip learn a zigzag whose up-and-down is slow
enough for the backbone's sense of time? The world's first zigzag reversed every frame (a period of 2 frames, pi
radians per frame), while the fastest rotary frequency of time in the toy Wan and CogVideoX is 1 radian per frame (a
period of 6.3 frames). `write P OUT` writes the bundled task (the star; the blue striped square going left to right,
1.5 px per frame) with a zigzag of period P frames: P = 2 is the first bundled clip (5 px hops); P = 4 rises and falls
over two frames (0, +2.5, 0, -2.5, ...: DualReal's diagnosis, point 6); P = 8 is a triangle wave of
2.5 px steps (0, 2.5, 5, 2.5, 0, -2.5, -5, -2.5, 0), the world's zigzag since this experiment; an optional STEP
scales the offsets (default 2.5 px; P = 4 with STEP 5 has P = 8's 10 px from top to bottom). `score TASK RUN...`
reads each run's samples (RUN/seed*/result_grid.mp4 or RUN/result_grid.mp4) and prints the motion score against
TASK's clip and the same score of the vertical steps alone (1: every up/down step the clip's way, 0: none or drift
alone, -1: opposite phase).

    python results/toyworld/ab/zigzag_period.py write 8 out/zigzag8      # write P OUT [STEP]
    python dualreal.py --model toy --subject out/zigzag8/subject --motion out/zigzag8/motion --seed K --out DIR
    python results/toyworld/ab/zigzag_period.py score out/zigzag8 DIR...
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import toyworld as tw  # noqa: E402

WAVES = {2: [1, -1], 4: [0, 1, 0, -1], 8: [0, 1, 2, 1, 0, -1, -2, -1]}  # vertical offsets in units of STEP px


def write(period, out, step=2.5):
    bundled = tw.trajectory

    def trajectory(motion, n, gen, frames=tw.NUM_FRAMES):
        traj = bundled(motion, n, gen, frames)
        if motion == "zigzag":  # the bundled jitter and drift, this period's up-and-down
            wave = step * torch.tensor([WAVES[period][f % period] for f in range(frames)], dtype=torch.float32)
            traj[..., 1] = traj[:, :1, 1:2].squeeze(-1) + wave  # the world's zigzag starts at its wave's 0
        return traj

    tw.trajectory = trajectory
    tw.write_task(out)


def vertical(traj):
    """The trajectory's up-and-down alone (x held at 0), so that motion_score ignores the drift."""
    return torch.stack([torch.zeros_like(traj[:, 1]), traj[:, 1]], -1)


def score(task, runs):
    clip = common.read_video(Path(task) / "motion", tw.NUM_FRAMES)
    ref = tw.centroids(tw.segment(clip)[1])
    print(f"{task}: clip centres y {[round(float(y), 1) for y in ref[:, 1]]}")
    for run in runs:
        rows = []
        for grid in sorted(Path(run).glob("**/result_grid.mp4")):
            video = F.avg_pool2d(common.read_video(grid, tw.NUM_FRAMES), 8)  # back to 32 px panels
            for panel in range(2, video.shape[-1] // tw.SIZE):  # skip the subject and motion panels
                traj = tw.centroids(tw.segment(video[..., tw.SIZE * panel:tw.SIZE * (panel + 1)])[1])
                rows.append((tw.motion_score(traj, ref), tw.motion_score(vertical(traj), vertical(ref))))
        n = len(rows)
        motion, up_down = (sum(r[k] for r in rows) / n for k in (0, 1))
        print(f"{run}: {n} samples, motion {motion:.3f}, vertical {up_down:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(int(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:]))
    else:
        score(sys.argv[2], sys.argv[3:])
