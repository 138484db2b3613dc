"""The commands at the top of every method file run as written, each with --dry-run: the inputs they name are
checked, the plan is printed, no model is loaded and nothing is written."""
import importlib
import shlex
from pathlib import Path

import pytest
import torch

import common
import toyworld

METHODS = ["smrabooth", "jointtuner", "dualreal", "dual_task_sdv"]

# the files a training run leaves in --out that sampling opens before any model loads
TRAINED = {"smrabooth": ["subject_lora/pytorch_lora_weights.safetensors",
                         "motion_lora/pytorch_lora_weights.safetensors"],
           "jointtuner": ["adapters.safetensors"],
           "dualreal": ["adapters.safetensors"],
           "dual_task_sdv": ["pytorch_lora_weights.safetensors", "cls_embedding.safetensors"]}


def docstring_commands(method):
    """The commands in a method file's docstring as argv lists; a trailing backslash continues the command on the
    next line (as in a shell)."""
    name, commands = method.__name__ + ".py", []
    for line in method.__doc__.replace("\\\n", " ").splitlines():
        if line.strip().startswith((f"python {name}", "torchrun")):
            commands.append(shlex.split(line.split(name, 1)[1], comments=True))
    return commands


def make_inputs(argv):
    """What a command names and the current folder lacks: subject photos, a reference clip, RAFT weights, a
    reference image, dual_task_sdv's pairs and videos (small: the methods resize them)."""
    from PIL import Image
    from torchvision.models.optical_flow import raft_large
    new = {flag: Path(value) for flag, value in zip(argv, argv[1:]) if not Path(value).exists()}
    if "--subject" in new:
        new["--subject"].mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64)).save(new["--subject"] / f"{i}.png")
    if "--motion" in new:  # longer than any method's default frame count
        common.write_video(new["--motion"], torch.zeros(60, 3, 64, 64))
    if "--raft-weights" in new:
        torch.save(raft_large(weights=None).state_dict(), new["--raft-weights"])
    if "--image" in new:
        new["--image"].parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64)).save(new["--image"])
    if "--pairs" in new:
        new["--pairs"].mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(new["--pairs"] / "a.png")
        (new["--pairs"] / "pairs.jsonl").write_text('{"ref": "a.png", "target": "a.png", "prompt": "a <cls>"}\n')
    if "--videos" in new:
        common.write_video(new["--videos"] / "0.gif", torch.zeros(9, 3, 8, 8))
        (new["--videos"] / "0.txt").write_text("a dog")


@pytest.mark.parametrize("name", METHODS)
def test_every_docstring_command_runs_with_dry_run(name, tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file
    method = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(method, "load_models", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(common, "check_pretrained", lambda *a, **k: None)  # the real models are not in this cache
    commands = docstring_commands(method)
    assert len(commands) >= 3, "the docstring shows a real run and the toy run"
    for argv in commands:
        make_inputs(argv)
        args = method.parse_args(argv)  # a trained run where the command samples from one, for its --model
        for file in TRAINED[name]:
            q = Path(getattr(args, "ckpt", None) or args.out) / file
            if q.is_relative_to(toyworld.ASSETS):  # the shipped toy run (dual_task_sdv's sample --model toy)
                continue
            q.parent.mkdir(parents=True, exist_ok=True)
            save_file({"<cls>": torch.zeros(4)}, str(q), metadata=dict(method=name, model=args.model))
        before = {q: q.stat().st_mtime_ns for q in tmp_path.rglob("*")}
        assert not method.main(argv + ["--dry-run"]), argv              # None ({} for --ablate: no rows)
        assert capsys.readouterr().out.strip(), argv                     # the plan
        assert {q: q.stat().st_mtime_ns for q in tmp_path.rglob("*")} == before, argv  # nothing written
