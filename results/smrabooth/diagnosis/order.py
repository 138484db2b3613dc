"""Does a run draw the motion clip's zigzag in the clip's order? For each sample in RUN/result_grid.mp4 (subject |
motion | samples, 8x upscaled), the share of frame pairs where the sprite's vertical step reverses the step before
(the bundled zigzag: every pair, 1.0; positions in random order: about 0.5) and the toy motion score.

    python results/smrabooth/diagnosis/order.py out/smrabooth/ablations/base out/smrabooth/ablations/full
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import toyworld  # noqa: E402


def reversals(traj, least=1.5):
    """Share of consecutive vertical steps (both over `least` px) that change direction."""
    dy = [float(b[1] - a[1]) for a, b in zip(traj, traj[1:])]
    return sum(a * b < 0 and min(abs(a), abs(b)) > least for a, b in zip(dy, dy[1:])) / (len(dy) - 1)


def main(runs):
    reference = toyworld.centroids(toyworld.segment(toyworld.motion_clip())[1])
    print(f"the clip: reversals {reversals(reference):.2f}")
    for run in runs:
        rows = []
        for grid in sorted(Path(run).glob("seed*/result_grid.mp4")):
            video = F.avg_pool2d(common.read_video(grid, 9), 8)  # back to 32 px panels
            for panel in range(2, video.shape[-1] // 32):  # skip the subject and motion panels
                traj = toyworld.centroids(toyworld.segment(video[..., 32 * panel:32 * (panel + 1)])[1])
                rows.append((reversals(traj), toyworld.motion_score(traj, reference)))
        n = len(rows)
        print(f"{run}: {n} samples, reversals {sum(r for r, _ in rows) / n:.2f}, motion {sum(m for _, m in rows) / n:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
