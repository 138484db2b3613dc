"""Does the direction word reach the toy backbone's motion at all? The same starting noise sampled under "... moving
left ..." and "... moving right ..." (and "up" / "down"): the mean signed displacement along the word's axis of each
sample, and how often the pair goes opposite ways. A backbone that only ties the word to the axis gives ~0 px and
pairs that go the same way as often as not; one that ties it to the sign gives > 0 px and opposite pairs.

    python results/toyworld/ab/word_swap.py wan [FILE]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import toyworld as tw  # noqa: E402
from time_probe import signed_displacement  # noqa: E402


def main(family, path=None, n=16):
    f = tw.FAMILIES[family]
    model, vae = tw.load_backbone(family, path), tw.load_vae()
    tok, enc = tw.text_path(family)
    uncond = common.encode_prompts(tok, enc, [""], tw.MAX_TOKENS, f["zero_pad"])
    concepts = [dict(colour=c, shape=s, pattern="solid", background="gray")
                for c in ("red", "green", "blue", "yellow") for s in ("square", "circle", "triangle", "cross")][:n]
    for a, b in (("right", "left"), ("down", "up")):
        d = {}
        for word in (a, b):
            text = common.encode_prompts(tok, enc, [tw.caption(dict(c, motion=word)) for c in concepts],
                                         tw.MAX_TOKENS, f["zero_pad"])
            videos = tw.sample(family, model, vae, text, uncond, gen=torch.Generator().manual_seed(0))
            d[word] = signed_displacement(videos, a)  # both along a's axis, > 0 = a's way
        diff = d[a] - d[b]
        print(f"{family}, the same noise under '{a}' and '{b}': {a} {d[a].nanmean():+.1f} px, {b} "
              f"{d[b].nanmean():+.1f} px ({a}'s way); '{a}' further {a}'s way in {(diff > 0).float().mean():.2f} "
              f"of {n} pairs, by {diff.nanmean():+.1f} px", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
