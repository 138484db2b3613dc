"""A deeper toy Wan that starts as the shipped one: a new transformer block after each old one, its three output
projections (self-attention, cross-attention, feed-forward) zeroed so that each new block passes its input through
unchanged. Continue it with `toyworld.py pretrain --resume --out FILE` (the file carries its config and record).

    python results/toyworld/ab/deepen.py assets/toy_wan.safetensors out/ab/deep8.safetensors

Why: the toy Wan's only sense of position is rotary attention, which is relative, so from pure noise it cannot tell
the first frame from the last (results/toyworld/README.md, "Wan's motion words"). A position can still be read off
the clip's ends (a frame with no later frame attends differently), one frame per layer; depth gives it more hops.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import toyworld  # noqa: E402


def main(src, dst):
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    old = toyworld.build_backbone("wan", json.loads(meta["config"]))
    old.load_state_dict(load_file(src))
    config = dict(old.config, num_layers=2 * old.config.num_layers)
    new = toyworld.build_backbone("wan", {k: v for k, v in config.items() if not k.startswith("_")})
    state = new.state_dict()
    for k, v in old.state_dict().items():  # old block i -> block 2i; everything outside the blocks as it was
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            k = f"blocks.{2 * int(i)}.{rest}"
        state[k] = v
    for k in state:  # new blocks 2i+1: outputs zeroed, so the deeper model computes what the shipped one does
        if k.startswith("blocks.") and int(k.split(".")[1]) % 2 and any(
                p in k for p in ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")):
            state[k] = torch.zeros_like(state[k])
    new.load_state_dict(state)
    z, t, text = torch.randn(2, 8, 9, 8, 8), torch.tensor([500.0, 900.0]), torch.randn(2, 16, 32)
    assert torch.allclose(old(z, t, text).sample, new(z, t, text).sample, atol=1e-5)
    meta["config"] = json.dumps({k: v for k, v in new.config.items() if not k.startswith("_")})
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new.state_dict().items()}, dst, metadata=meta)
    print(f"wrote {dst}: {config['num_layers']} layers, the same outputs as {src}")


if __name__ == "__main__":
    main(*sys.argv[1:])
