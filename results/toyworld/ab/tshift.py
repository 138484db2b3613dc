"""An A/B wrapper: does the toy UNet3D (ZeroScope's objective: epsilon, scaled_linear betas) learn to follow its
motion words when its training spends as much of its time near its noisiest step as the Wan's shift 3 does?
Runs any toyworld.py command with the UNet3D's training timesteps drawn as t = 999 s u / (1 + (s - 1) u),
u ~ U(0, 1), s = TSHIFT (default 3; TSHIFT=1 is the uniform draw toyworld.py uses). The sampler is unchanged.

    TSHIFT=3 python results/toyworld/ab/tshift.py pretrain --family unet3d --resume --bank out/bank ...

Why: the Wan drew no direction from pure noise until its training dwelt near sigma 1 (ab/shift.py). Uniform t puts
10% of the UNet3D's training at t >= 900 (where the sampler's first steps are: DDIM starts at t = 951); s = 3
puts 25% there, as the Wan's shift 3 puts 25% of its training above sigma 0.9.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import toyworld as tw  # noqa: E402

S = float(os.environ.get("TSHIFT", 3))
uniform = tw.sample_timesteps


def shifted(family, n, gen):
    if family != "unet3d":
        return uniform(family, n, gen)
    u = torch.rand(n, generator=gen)
    return (999 * S * u / (1 + (S - 1) * u)).round().long()


tw.sample_timesteps = shifted

if __name__ == "__main__":
    tw.main(sys.argv[1:])
