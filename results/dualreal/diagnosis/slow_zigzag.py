"""A diagnostic, not part of the method or the world: writes the bundled task (the star, the blue striped square's
clip) with a slower zigzag, which rises and falls over two frames instead of one (y = 2.5 px x 0, +1, 0, -1, 0, ...),
to test whether DualReal's adapters miss the bundled zigzag's hop because it reverses every frame:

    python results/dualreal/diagnosis/slow_zigzag.py out/slow_zigzag
    python dualreal.py --model toy --subject out/slow_zigzag/subject --motion out/slow_zigzag/motion --seed K --out DIR
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import toyworld as tw  # noqa: E402

bundled = tw.trajectory


def trajectory(motion, n, gen, frames=tw.NUM_FRAMES):
    out = bundled(motion, n, gen, frames)
    if motion == "zigzag":
        wave = torch.tensor([math.sin(math.pi / 2 * f) for f in range(frames)]).round()  # 0, 1, 0, -1, ...
        out[..., 1] = out[:, :1, 1:2].squeeze(-1) - 2.5 + 2.5 * wave  # the bundled jitter, the new hop
    return out


tw.trajectory = trajectory

if __name__ == "__main__":
    tw.write_task(sys.argv[1])
