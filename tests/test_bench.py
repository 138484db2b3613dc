"""bench.py on the CPU: the --tiny run writes every promised field, no GPU means a message and no crash, and the
analytic Wan FLOP count matches performance.md's 129 TFLOP forward at 49x480x832."""
import json
import math

import pytest
import torch

import bench

FIELDS = {"method", "setting", "grad_ckpt", "step_s", "peak_mem", "tflops", "sample_step_s", "sample_s", "pipeline_s",
          "pipeline_ratio"}


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_runs_every_method(tmp_path):
    rows = bench.main(["--tiny", "--json", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and saved["gpu"] and saved["date"]
    assert {r["method"] for r in rows} == {"smrabooth", "jointtuner", "dualreal"}
    for r in rows:
        assert set(r) == FIELDS
        assert r["peak_mem"] in (None, "n/a")  # no CUDA memory on the CPU
        assert all(positive(r[k]) for k in ("sample_step_s", "sample_s", "pipeline_s", "pipeline_ratio"))
        if r["step_s"] == "n/a":  # diffusers' UNet3D has no gradient checkpointing
            assert r["method"] == "jointtuner" and r["grad_ckpt"]
        else:
            assert positive(r["step_s"]) and positive(r["tflops"])
    assert sum(r["step_s"] != "n/a" for r in rows) == 7  # 2 SMRABooth settings x 2, JointTuner 1, DualReal 2


def test_methods_flag_selects(tmp_path):
    rows = bench.main(["--tiny", "--methods", "dualreal"])
    assert {r["method"] for r in rows} == {"dualreal"}
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--methods", "nosuch"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_no_gpu_exits_cleanly(capsys):
    assert bench.main([]) is None
    assert "no CUDA device is available" in capsys.readouterr().out


def test_wan_flops_match_spec():
    assert bench.wan_forward_flops(49, 480, 832) == pytest.approx(129e12, rel=0.05)
    assert bench.wan_forward_flops(81, 480, 832) == pytest.approx(283e12, rel=0.05)
