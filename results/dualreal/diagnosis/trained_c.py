"""Does DualReal keep the subject when its condition c can tell the subject photo from the motion clip? The toy's
CLIP image stand-in is random: it gives the photo and the clip's frames nearly the same embedding (cosine 0.98), and
a linear probe reads the background from it but little of the sprite. This script trains a copy of the stand-in
(same config and seed) to name each still's colour, shape, pattern and background (linear heads on image_embeds,
thrown away), then runs dualreal.py with it in place of the shipped one.

    python results/dualreal/diagnosis/trained_c.py train out/trained_c             # ~2.5 min on one thread
    python results/dualreal/diagnosis/trained_c.py run out/trained_c --model toy --seed K --out DIR

Measured (period-8 zigzag, 288k CogVideoX, seeds 0-2, one thread): the trained copy's embeddings of the photo and the
clip have cosine 0.01 (norms ~15); a ridge probe on 256 stills reads colour 1.00, shape 0.54, pattern 0.91 (the
random stand-in 0.76, 0.17, 0.41). Full method: identity 0.096, leakage 0.549, motion 0.035 (the table's seeds 0-2:
0.099, 0.543, 0.434). Results in trained_c/seedK/metrics.json; results/dualreal/README.md, diagnosis point 5.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import dualreal  # noqa: E402
import toyworld as tw  # noqa: E402


def random_stills(n, gen):
    """n stills of sprites from the whole vocabulary (a web-trained encoder has seen every shape), with factors."""
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    concepts = [dict(colour=pick(list(tw.COLOURS)), shape=pick(tw.SHAPES), pattern=pick(tw.PATTERNS),
                     background=pick(list(tw.BACKGROUNDS))) for _ in range(n)]
    return tw.render(concepts, gen, frames=1)[:, 0], concepts


def train(folder, steps=1500, batch=64):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    torch.manual_seed(1004)  # make_assets' seed for this stand-in: the same initial weights as the shipped one
    model = CLIPVisionModelWithProjection(tw._image_encoder_configs()["clip_vision"]).train()
    processor = CLIPImageProcessor.from_pretrained(tw.ASSETS / "encoders" / "clip_vision")
    factors = {"colour": list(tw.COLOURS), "shape": tw.SHAPES, "pattern": tw.PATTERNS,
               "background": list(tw.BACKGROUNDS)}
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(model.config.projection_dim, len(v)) for k, v in factors.items()})
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images, concepts = random_stills(batch, gen)
        x = processor(images=list((images + 1) / 2), do_rescale=False, return_tensors="pt").pixel_values
        emb = model(pixel_values=x).image_embeds
        loss = sum(F.cross_entropy(head(emb), torch.tensor([factors[k].index(c[k]) for c in concepts]))
                   for k, head in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)


def run(folder, argv):
    """dualreal.py with the toy stand-in's folder replaced by `folder` (model and processor)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    shipped = tw.ASSETS / "encoders" / "clip_vision"
    for cls in (CLIPImageProcessor, CLIPVisionModelWithProjection):
        load = cls.from_pretrained
        cls.from_pretrained = lambda path, *a, _load=load, **k: _load(folder if Path(path) == shipped else path, *a, **k)
    dualreal.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        run(sys.argv[2], sys.argv[3:])
