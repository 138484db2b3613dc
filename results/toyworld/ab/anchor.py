"""A diagnostic, not a recipe: does the toy Wan learn which way a motion word goes once its latents mark the first
frame? Runs any toyworld.py command with Wan's latents given a fixed marker on frame 0 (added after the latent
normalisation, removed before decoding), so a denoiser that sees some signal can tell the first frame from the last.

    python results/toyworld/ab/anchor.py pretrain --family wan --resume --bank out/bank ...   # any toyworld command
    python results/toyworld/ab/anchor.py eval-base --family wan --ckpt FILE --n 64
    python results/toyworld/ab/anchor.py probe FILE                                            # time_probe.py

Why: the toy Wan's only positional signal is rotary self-attention, which sees differences of position, so nothing
tells it which frame is first; the toy VAE encodes frames alike. The real Wan's VAE is causal and encodes its first
frame alone, so the real latents do mark the first frame. If the marked Wan ties the sign of a motion word and the
unmarked one (the same run continued without it) does not, the toy's missing anchor is the cause. Measured
(results/toyworld/README.md): it does not, after 48k samples; the mark is as hidden as the clip near sigma 1, where
the sampler picks the direction.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import toyworld as tw  # noqa: E402

# one fixed +-1 per latent channel on every position of frame 0 (normalised Wan latents have unit std)
MARK = (torch.randint(0, 2, (tw.LATENT_CHANNELS,), generator=torch.Generator().manual_seed(0)) * 2 - 1).float()
normalise, decode = tw.normalise_latents, tw.decode_latents


def marked(family, vae, z):
    z = normalise(family, vae, z)
    if family == "wan":
        z = z.clone()
        z[:, :, 0] += MARK.view(1, -1, 1, 1).to(z)
    return z


def unmarked(family, vae, z):
    if family == "wan":
        z = z.clone()
        z[:, :, 0] -= MARK.view(1, -1, 1, 1).to(z)
    return decode(family, vae, z)


tw.normalise_latents, tw.decode_latents = marked, unmarked

if __name__ == "__main__":
    if sys.argv[1] == "probe":
        import time_probe
        time_probe.tw = tw
        time_probe.main("wan", sys.argv[2])
    else:
        tw.main(sys.argv[1:])
