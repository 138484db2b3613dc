"""Which way does a toy backbone think time runs? Two one-step probes of the denoiser's clean-clip estimate x0 for
straight-motion captions ("... moving right ..."), on 8 sprites per word, no sampling loop:

1. from pure noise (the sampler's first step): the sprite's displacement from the first frame to the last along the
   word's axis, signed so that > 0 is the word's way. A backbone that knows which frame is first draws the mean
   clip (the sprite starts on the left for "right"); one that sees position only relatively cannot, and draws a
   streak with no direction (~0 px).
2. a clip moving the *opposite* way, noised to sigma (Wan's scale; the same signal-to-noise for the others): the
   share of sprites whose estimate goes the caption's way, i.e. where the caption overrules what is in the noise.

    python results/toyworld/ab/time_probe.py wan [FILE]      # or cogvideox / unet3d; FILE: an exported backbone
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import toyworld as tw  # noqa: E402

WORDS = dict(right=(0, 1), left=(0, -1), down=(1, 1), up=(1, -1))  # axis (x, y) and sign
OPPOSITE = dict(right="left", left="right", down="up", up="down")


def signed_displacement(videos, word):
    """Last-minus-first centroid of the sprite (pixels that differ from the border's colour) along the word's axis."""
    axis, sign = WORDS[word]
    c = torch.stack([tw.centroids(tw.segment(v)[1], min_area=1) for v in videos])  # (B, F, 2)
    return sign * (c[:, -1, axis] - c[:, 0, axis])


def level(family, sigma, n):
    """Timesteps for noise level sigma: Wan's own; for the DDPM families the step whose signal-to-noise ratio
    matches flow matching's ((1 - sigma) / sigma)^2. Returns (t for the noising formulas, t for the model)."""
    if family == "wan":
        return torch.full((n,), sigma), torch.full((n,), sigma * 1000)
    ac = tw.noise_schedule(family).alphas_cumprod
    snr = ((1 - sigma) / sigma) ** 2
    t = torch.full((n,), int((ac / (1 - ac) - snr).abs().argmin()))
    return t, t


def x0_estimate(family, model, vae, z, sigma, text):
    """The denoiser's one-step clean estimate at noise level sigma, decoded to pixels."""
    ac = getattr(tw.noise_schedule(family), "alphas_cumprod", None)
    t, t_in = level(family, sigma, len(z))
    with torch.no_grad():
        out = tw.backbone_forward(family, model, z, t_in, text)
        return tw.decode_latents(family, vae, common.predicted_x0(tw.FAMILIES[family]["pred"], z, out, t, ac))


def main(family, path=None):
    torch.manual_seed(0)
    f = tw.FAMILIES[family]
    model, vae = tw.load_backbone(family, path), tw.load_vae()
    tok, enc = tw.text_path(family)
    sched = tw.noise_schedule(family)
    for sigma in (1.0, 0.95, 0.9, 0.8):
        rows = []
        for word in WORDS:
            gen = torch.Generator().manual_seed(1)
            concepts = [dict(colour=c, shape=s, pattern="solid", motion=word, background="gray")
                        for c in ("red", "green", "blue", "yellow") for s in ("square", "circle")]
            text = common.encode_prompts(tok, enc, [tw.caption(c) for c in concepts], tw.MAX_TOKENS, f["zero_pad"])
            noise = torch.randn(len(concepts), vae.config.latent_channels, tw.NUM_FRAMES, 8, 8, generator=gen)
            z = noise
            if sigma < 1.0:
                opposite = tw.render([dict(c, motion=OPPOSITE[word]) for c in concepts], gen)
                clip = tw.encode_latents(family, vae, opposite)
                t = level(family, sigma, len(concepts))[0]
                z = common.noisy_and_target(f["pred"], clip, noise, t, getattr(sched, "alphas_cumprod", None))[0]
            rows.append(signed_displacement(x0_estimate(family, model, vae, z, sigma, text), word))
        d = torch.cat(rows)
        what = "pure noise" if sigma == 1.0 else f"the opposite clip at sigma {sigma}"
        print(f"{family}, {what}: the caption's way in {(d > 0).float().mean():.2f} of {len(d)}, "
              f"mean {d.nanmean():+.1f} px")


if __name__ == "__main__":
    main(*sys.argv[1:])
