import os
import sys
from pathlib import Path

# tests import the scripts as modules and call their main(argv) in-process (a fresh interpreter pays ~15 s of
# diffusers import); everything runs offline on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
