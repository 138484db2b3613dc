"""Does a toy backbone know which frame a token is in when the clip is pure noise (the sampler's first step)?

time_probe.py found that from pure noise CogVideoX draws the caption's direction and Wan draws no direction at all.
Both use 3D rotary embeddings, which give attention the *offset* between two tokens. Our first explanation:
CogVideoX puts its text tokens into the same self-attention as the video tokens and rotates only the video positions,
so a video query's score against a text key depends on its absolute frame; Wan's text comes in through a separate
cross-attention, which carries no position.

The probe: the frame-mean of each block's video tokens, for noise clips at sigma 1 under straight-motion captions;
a ridge regression from it to the frame index, fitted on half of the clips and scored (R^2) on the other half.
`--mask-text` (CogVideoX only) forbids the video queries to attend to the text keys: if that route were how CogVideoX
tells the frames apart, the R^2 would fall to about 0. Measured (results/toyworld/README.md): it does not (0.79-0.93
against 0.94-1.00), so CogVideoX has learned the frame from its video tokens alone, as Wan could in principle too
(the boundary frames see a different set of rotary offsets, and biased queries and keys turn that into a different
expected output). The toy Wans have not (-0.9 to 0.3; the one trained with a marked first frame up to 0.69,
still without direction).

    python results/toyworld/ab/frame_probe.py wan [FILE]
    python results/toyworld/ab/frame_probe.py cogvideox [FILE] [--mask-text]
"""
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import toyworld as tw  # noqa: E402
from time_probe import WORDS, level  # noqa: E402

N_CLIPS = 64


def mask_text_keys(sdpa, text_len):
    """scaled_dot_product_attention in which queries after the first text_len positions cannot see keys before it."""
    def masked(q, k, v, attn_mask=None, **kw):
        if attn_mask is None and q.shape[-2] == k.shape[-2] > text_len:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
            attn_mask[text_len:, :text_len] = False
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    return masked


def block_features(family, model, z, t, text):
    """Per block, the video tokens' mean over each frame: (blocks, B, F, D)."""
    feats = []

    def keep(_, __, out):
        h = out[0] if isinstance(out, tuple) else out  # CogVideoX blocks return (video, text)
        feats.append(h.reshape(z.shape[0], z.shape[2], -1, h.shape[-1]).mean(2))

    hooks = [b.register_forward_hook(keep) for b in getattr(model, "transformer_blocks", None) or model.blocks]
    with torch.no_grad():
        tw.backbone_forward(family, model, z, t, text)
    for h in hooks:
        h.remove()
    return torch.stack(feats)


def held_out_r2(x, frames, ridge=1e-2):
    """R^2 of a ridge regression x (B, F, D) -> frame index, fitted on the first half of the clips."""
    y = torch.arange(frames, dtype=torch.float).expand(x.shape[0], -1)
    half = x.shape[0] // 2
    mean, std = x[:half].mean((0, 1)), x[:half].std((0, 1)) + 1e-6
    a = torch.cat([(x - mean) / std, torch.ones(*x.shape[:2], 1)], -1)
    fit_a, fit_y = a[:half].reshape(-1, a.shape[-1]), y[:half].reshape(-1)
    w = torch.linalg.solve(fit_a.T @ fit_a + ridge * torch.eye(a.shape[-1]), fit_a.T @ fit_y)
    pred, true = a[half:] @ w, y[half:]
    return 1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum()


def main(family, *rest):
    mask = "--mask-text" in rest
    path = next((r for r in rest if not r.startswith("--")), None)
    f = tw.FAMILIES[family]
    model, vae = tw.load_backbone(family, path), tw.load_vae()
    tok, enc = tw.text_path(family)
    gen = torch.Generator().manual_seed(0)
    looks = itertools.product(("red", "green", "blue", "yellow"), ("square", "circle", "triangle", "diamond"))
    concepts = [dict(colour=c, shape=s, pattern="solid", motion=list(WORDS)[i % 4], background="gray")
                for i, (c, s) in enumerate(looks)] * (N_CLIPS // 16)
    text = common.encode_prompts(tok, enc, [tw.caption(c) for c in concepts], tw.MAX_TOKENS, f["zero_pad"])
    z = torch.randn(len(concepts), vae.config.latent_channels, tw.NUM_FRAMES, 8, 8, generator=gen)
    t = level(family, 1.0, len(concepts))[1]  # the sampler's first step
    if mask:
        F.scaled_dot_product_attention = mask_text_keys(F.scaled_dot_product_attention, text.shape[1])
    feats = block_features(family, model, z, t, text)
    r2 = [f"{held_out_r2(x, tw.NUM_FRAMES):.2f}" for x in feats]
    print(f"{family}{' (video queries cannot see the text)' if mask else ''}, pure noise: held-out R^2 of the frame "
          f"index from each block's frame-mean tokens: {', '.join(r2)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
