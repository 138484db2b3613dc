"""A diagnostic of the toy motion metric on the zigzag, not part of the method: the bundled zigzag moves right
1.5 px a frame while hopping 5 px down and up on alternate frames, and `toyworld.motion_score` (the mean cosine of
per-frame velocities against the reference's) rewards a copy that hops in the reference's phase (about +1) and
punishes one that hops in the other phase (about -0.8), as a reversed motion. This splits the score of each
sampled clip of a run into the hop's size and its phase, from the run's result_grid.mp4 (subject | motion clip |
the samples):

    python results/dualreal/diagnosis/hop.py RUN_DIR [RUN_DIR ...]

hop: mean over frame steps of s_t dy_t, where s_t = +-1 is the sign of the reference's own vertical step t, so that
> 0 is the reference's phase (the reference: 5 px);
in phase: the share of samples with hop > 1 px, out of phase: hop < -1 px; drift: mean dx per frame (the reference:
1.5 px).
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import toyworld as tw  # noqa: E402


def panels(run):
    """The motion clip and the samples of a run's result grid, each (F, 3, 32, 32) in [-1, 1]."""
    grid = common.read_video(Path(run) / "result_grid.mp4", tw.NUM_FRAMES)
    size = grid.shape[-2]
    cells = [F.interpolate(grid[..., i:i + size], size=tw.SIZE, mode="area") for i in range(0, grid.shape[-1], size)]
    return cells[1], cells[2:]


def hop_and_drift(video, pattern):
    """The mean vertical step along the reference's up/down pattern (+-1 per frame step), and the mean dx."""
    d = tw.centroids(tw.segment(video)[1]).diff(dim=0)
    return float(torch.nanmean(pattern * d[:, 1])), float(torch.nanmean(d[:, 0]))


def main(runs):
    all_hops, all_drift = [], []
    for run in runs:
        clip, samples = panels(run)
        pattern = tw.centroids(tw.segment(clip)[1]).diff(dim=0)[:, 1].sign()
        ref_hop, _ = hop_and_drift(clip, pattern)
        rows = [hop_and_drift(s, pattern) for s in samples]
        hops = torch.tensor([h for h, _ in rows])
        drift = torch.tensor([d for _, d in rows])
        print(f"{run}: hop {', '.join(f'{h:+.1f}' for h in hops.tolist())} px (reference {ref_hop:.1f}); "
              f"in phase {(hops > 1).float().mean():.2f}, out of phase {(hops < -1).float().mean():.2f}; "
              f"drift {drift.nanmean():+.1f} px/frame")
        all_hops.append(hops), all_drift.append(drift)
    hops, drift = torch.cat(all_hops), torch.cat(all_drift)
    print(f"all {len(runs)} runs, {len(hops)} samples: |hop| {hops.abs().nanmean():.1f} px, in phase "
          f"{(hops > 1).float().mean():.2f}, out of phase {(hops < -1).float().mean():.2f}, drift {drift.nanmean():+.1f} "
          f"px/frame")


if __name__ == "__main__":
    main(sys.argv[1:])
