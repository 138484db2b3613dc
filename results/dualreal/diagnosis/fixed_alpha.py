"""A diagnostic, not part of the method: run dualreal.py with the StageBlender Controller's output replaced by a
fixed alpha (env ALPHA, default 0.05; beta = s - alpha), e.g. to sample a trained run with the motion adapters at
the weight they had on their own training steps:

    ALPHA=0.05 python results/dualreal/diagnosis/fixed_alpha.py --model toy --sample-only --seed K --out COPY_OF_RUN

Why: on the 288k toy CogVideoX the controller gives the motion adapters beta 0.14-0.16 on motion steps but only
0.04-0.10 while sampling a video (results/dualreal/README.md), and the full method's sprites do not zigzag.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import common  # noqa: E402
import dualreal  # noqa: E402

ALPHA = float(os.environ.get("ALPHA", 0.05))


def fixed(self, temb, pooled):
    alpha = torch.full((temb.shape[0], self.mlp[-1].out_features), ALPHA, device=temb.device)
    return alpha, self.s - alpha


dualreal.StageBlender.forward = fixed

if __name__ == "__main__":
    common.cli(dualreal.main)
