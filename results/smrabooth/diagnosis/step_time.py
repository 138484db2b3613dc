"""Where a toy motion step's time goes: the three parts of one SMRABooth motion step at the toy preset (batch 4,
9 frames of 32x32), each forward and backward, timed alone (bench.timed: the median of 5 runs after one) with
torch's default threads (2 on a 2-core CPU).

    python results/smrabooth/diagnosis/step_time.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import bench  # noqa: E402
import smrabooth  # noqa: E402
import toyworld  # noqa: E402


def main():
    torch.manual_seed(0)
    transformer = toyworld.load_backbone("wan")
    smrabooth.add_loras(transformer, smrabooth.parse_args(["--model", "toy"]))
    transformer.set_adapters(["motion"])  # as in the motion stage: its LoRA alone
    vae = toyworld.load_vae()
    z = torch.randn(4, 8, 9, 8, 8, requires_grad=True)  # 4 clips of 9 latent frames, 8x8
    text = torch.randn(4, 16, transformer.config.text_dim)
    a, b = (torch.rand(32, 3, 32, 32) * 2 - 1).requires_grad_(), torch.rand(32, 3, 32, 32) * 2 - 1
    parts = {"transformer (LoRA on, batch 4)": lambda: transformer(z, torch.rand(4) * 1000, text,
                                                                   return_dict=False)[0].square().mean().backward(),
             "MoRA's VAE decode (36 frames)": lambda: vae.decode(z).sample.square().mean().backward(),
             "toy flow network (32 frame pairs)": lambda: toyworld.toy_flow(a, b).abs().mean().backward()}
    for name, step in parts.items():
        seconds = bench.timed(step, 5, 1, "cpu")
        print(f"{name}, forward and backward: {seconds:.2f} s  ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
