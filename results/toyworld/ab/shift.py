"""An A/B wrapper: does the toy Wan learn which frame is first (and so the sign of a motion word) when its training
spends as much of its time near pure noise as CogVideoX's does? (Measured: yes, below; shift 3 has since become the
Wan's recipe in toyworld.FAMILIES, so SHIFT=1 now gives the control arm.) Runs any toyworld.py command with Wan's
flow shift (training noise levels and sampler alike) set to SHIFT (default 3).

    SHIFT=1 python results/toyworld/ab/shift.py pretrain --family wan --resume --bank out/bank ...
    SHIFT=1 python results/toyworld/ab/shift.py eval-base --family wan --ckpt FILE --n 64

Why: frame_probe.py finds that from pure noise CogVideoX's blocks know each token's frame (held-out R^2 0.94-1.00)
and Wan's do not (-0.8 to 0.3), though both see frames only through rotary offsets. CogVideoX's zero-terminal-SNR
schedule puts 26% of its training at noise levels above flow sigma 0.9; Wan's uniform sigma (shift 1) puts 10%
there, shift 3 puts 25%. The real Wan 2.1 pipeline samples 480p video with flow shift 3.
Measured: the 4-head patch-(1, 2, 2) Wan continued from 144k to 224k with shift 3 reads motion words in 0.84 of
prompts, with shift 1 in 0.41 (results/toyworld/README.md).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import toyworld as tw  # noqa: E402

tw.FAMILIES["wan"]["shift"] = float(os.environ.get("SHIFT", 3))

if __name__ == "__main__":
    tw.main(sys.argv[1:])
