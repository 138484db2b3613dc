import os
import sys
from pathlib import Path

import pytest
import torch

# tests import the scripts as modules and call their main(argv) in-process (a fresh interpreter pays ~15 s of
# diffusers import); everything runs offline on the CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The toy models are tiny: a second OpenMP thread buys little, and on a 2-core machine that is also busy
    (a pretraining run beside the tests) two threads spinning against other processes made tests ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
