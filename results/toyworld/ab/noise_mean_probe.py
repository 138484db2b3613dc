"""Does a toy backbone take a sample's colour and background from the caption or from the starting noise's mean?
A noise schedule whose last step keeps some signal (ZeroScope's scaled_linear betas: sqrt(alpha_bar_999) = 0.07)
trains the denoiser to read the clip's global colour from what is left of it in the noise; from pure noise that
reading is the noise's own per-channel mean (Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are
Flawed", WACV 2024). On a toy latent of 8 x 8 x F per channel that mean is large (std 1 / (8 sqrt F)).

For 32 held-out prompts: samples from noise as drawn, from the same noise with each channel's mean replaced by that
of another draw, from the same noise made zero-mean per channel, and from independent noise. Printed: how often
colour / background follow the caption in each, and how often the first agrees with the second (differing only in
the mean) and with the last (differing in everything). Where the caption decides, both pairs agree; where the
noise's mean decides, the first pairs agree about as rarely as the last.

    python results/toyworld/ab/noise_mean_probe.py unet3d [FILE] [--frames 1]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import toyworld as tw  # noqa: E402


ALT = "another draw's mean"


def main(family, path=None, frames=tw.NUM_FRAMES, n=32):
    f = tw.FAMILIES[family]
    model, vae = tw.load_backbone(family, path), tw.load_vae()
    tok, enc = tw.text_path(family)
    concepts = tw.random_concepts(n, torch.Generator().manual_seed(0), heldout=True)
    if frames == 1:
        concepts = [dict(c, motion="still") for c in concepts]
    text = common.encode_prompts(tok, enc, [tw.caption(c, image=frames == 1) for c in concepts], tw.MAX_TOKENS,
                                 f["zero_pad"])
    uncond = common.encode_prompts(tok, enc, [""], tw.MAX_TOKENS, f["zero_pad"])
    gen = torch.Generator().manual_seed(1)
    shape = (n, vae.config.latent_channels, frames, 8, 8)
    noise, other = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    mean = lambda z: z.mean((2, 3, 4), keepdim=True)
    starts = {"as drawn": noise, ALT: noise - mean(noise) + mean(other),
              "zero mean": noise - mean(noise), "another draw": other}
    got = {}
    for name, z in starts.items():
        videos = tw.sample(family, model, vae, text, uncond, z=z)
        got[name] = [tw.recognise(v) for v in videos]
        hits = [tw.prompt_following(v, c) for v, c in zip(videos, concepts)]
        print(f"{family}, {frames} frames, noise {name}: colour {sum(h['colour'] for h in hits) / n:.2f}, "
              f"background {sum(h['background'] for h in hits) / n:.2f}", flush=True)

    def majority(rec, k):
        rec = [r[k] for r in rec if r]
        return max(set(rec), key=rec.count) if rec else None
    for k in ("colour", "background"):
        same = lambda other: sum(majority(a, k) == majority(b, k) for a, b in zip(got["as drawn"], got[other])) / n
        print(f"  {k}: the same in {same(ALT):.2f} of pairs that differ only in the noise's mean, "
              f"{same('another draw'):.2f} of pairs from independent noise")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("family"), ap.add_argument("file", nargs="?")
    ap.add_argument("--frames", type=int, default=tw.NUM_FRAMES)
    a = ap.parse_args()
    main(a.family, a.file, a.frames)
