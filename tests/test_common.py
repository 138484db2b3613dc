import argparse
import importlib
import json
import re

import pytest
import torch

import common
import toyworld as tw


def test_lossless_png_frames_round_trip(tmp_path):
    clip = tw.motion_clip()
    common.write_frames(tmp_path / "clip", clip)
    back = common.read_video(tmp_path / "clip", tw.NUM_FRAMES)
    assert (common.to_uint8(back) == common.to_uint8(clip)).all()


def test_mp4_and_gif_are_written_and_readable(tmp_path):
    clip = tw.motion_clip()
    for name in ("a.mp4", "a.gif"):
        common.write_video(tmp_path / name, clip, fps=4, upscale=2)
        assert common.read_video(tmp_path / name, tw.NUM_FRAMES).shape == (9, 3, 64, 64)


def test_read_video_samples_uniformly_and_rejects_short_clips(tmp_path):
    clip = torch.linspace(-1, 1, 17)[:, None, None, None].expand(17, 3, 4, 4)  # frame i has value ~ i
    common.write_frames(tmp_path / "ramp", clip)
    got = common.read_video(tmp_path / "ramp", 9)
    assert torch.allclose(got[:, 0, 0, 0], clip[::2, 0, 0, 0], atol=1 / 127)
    assert torch.allclose(common.read_video(tmp_path / "ramp", 3, stride=4)[:, 0, 0, 0], clip[[0, 4, 8], 0, 0, 0],
                          atol=1 / 127)
    with pytest.raises(common.InputError, match="has 17 frames, 49 are needed"):
        common.read_video(tmp_path / "ramp", 49)


def test_missing_files_give_one_clear_line(tmp_path):
    for call, words in ((lambda: common.read_image(tmp_path / "nope.png"), "cannot read image"),
                        (lambda: common.read_video(tmp_path / "no.mp4", 9), "cannot read video"),
                        (lambda: common.load_checkpoint(tmp_path / "ckpt.pt"), "no checkpoint at")):
        with pytest.raises(common.InputError) as e:
            call()
        assert str(e.value).startswith(words) and "\n" not in str(e.value), str(e.value)


def test_a_bad_input_is_an_error_to_catch_and_only_cli_ends_the_run(tmp_path, capsys):
    """A reader's bad input is an InputError that a caller in Python can catch and go on; only common.cli, the
    scripts' entry, turns it into one line on stderr and exit code 2."""
    caught = None
    try:
        common.read_video(tmp_path / "no.mp4", 9)
    except common.InputError as e:  # caught: the caller goes on, and nothing was printed
        caught = str(e)
    assert caught is not None and caught.startswith("cannot read video") and capsys.readouterr().err == ""
    with pytest.raises(common.InputError) as e:
        common.fail("a library's message\n  on two lines")
    assert str(e.value) == "a library's message on two lines"
    with pytest.raises(SystemExit) as e:
        common.cli(lambda argv: common.read_video(tmp_path / argv[0], 9), ["no.mp4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: cannot read video") and err.count("\n") == 1, err
    assert common.cli(lambda argv: argv, ["ok"]) == ["ok"]  # a run that goes well returns main's value
    with pytest.raises(ZeroDivisionError):  # a bug stays a traceback: only InputError is a one-line exit
        common.cli(lambda argv: 1 / 0)


def test_resize_crop_keeps_the_centre():
    x = torch.zeros(3, 40, 80)
    x[:, :, 20:60] = 1  # the central square
    y = common.resize_crop(x, (20, 20))
    assert y.shape == (3, 20, 20) and y[..., 1:-1].min() > 0.99  # (the outer columns blend antialiased)


def test_atomic_save_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.save_atomic({"step": 1}, path)

    def crash(obj, p):
        open(p, "wb").write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.save_atomic({"step": 2}, path, save=crash)
    assert common.load_checkpoint(path)["step"] == 1


def test_rng_state_round_trip():
    state = common.rng_state()
    a = torch.rand(3)
    common.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_check_finite_stops_with_a_message():
    common.check_finite(torch.tensor(1.0), 0)
    with pytest.raises(common.InputError, match="loss is nan at step 7"):
        common.check_finite(torch.tensor(float("nan")), 7)


@pytest.mark.parametrize("kind", ["flow", "v", "eps"])
def test_predicted_x0_inverts_the_noising_with_the_true_target(kind):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ab = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8]) if kind == "flow" else torch.tensor([10, 900])
    x_t, target = common.noisy_and_target(kind, x0, noise, t, ab)
    assert torch.allclose(common.predicted_x0(kind, x_t, target, t, ab), x0, atol=1e-5)


def test_flow_matching_formulas_by_hand():
    x0, noise, s = torch.ones(1, 2), torch.full((1, 2), 3.0), torch.tensor([0.25])
    x_t, v = common.noisy_and_target("flow", x0, noise, s)
    assert torch.allclose(x_t, torch.full((1, 2), 0.75 + 0.75)) and torch.allclose(v, torch.full((1, 2), 2.0))


def test_encode_prompts_caches_and_keeps_order():
    tok, enc = tw.tokenizer("t5"), tw.text_encoder("umt5")
    cache = {}
    out = common.encode_prompts(tok, enc, ["a red circle", "a blue square", "a red circle"], 16, True, cache)
    assert out.shape == (3, 16, 32) and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert out[0, 4:].abs().sum() == 0  # zero_pad: 3 words + </s>, the rest zeroed as WanPipeline does
    cache["a red circle"] = torch.zeros(16, 32)  # a cached prompt is not encoded again
    assert common.encode_prompts(tok, enc, ["a red circle"], 16, True, cache).abs().sum() == 0


def test_lora_weights_train_in_fp32_over_bf16_weights():
    model = tw.build_backbone("wan").to(torch.bfloat16)
    subject = common.add_lora(model, "subject", 4, ["to_q", "to_v"])
    motion = common.add_lora(model, "motion", 4, ["to_q", "to_v"])
    assert subject and motion and all(p.dtype == torch.float32 for p in subject + motion)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora" not in n)


def test_lora_computes_in_the_activations_dtype_on_fp32_weights():
    """peft casts each LoRA input up to the fp32 LoRA weights and autograd keeps that copy (~30 of SMRABooth's 88 GB by
    bench.py --estimate): common.add_lora's LoRA computes in the bf16 activations on its fp32 weights, cast at use,
    and their gradients arrive in fp32."""
    model = common.to_dtype(tw.build_backbone("wan"), torch.bfloat16)
    params = common.add_lora(model, "subject", 4, ["to_q", "ffn.net.2"])
    for p in params:  # lora_B starts at zero: random weights, so that every LoRA weight gets a gradient
        torch.nn.init.normal_(p)
    seen = []
    for _, layer in common.lora_layers(model):
        for linear in (layer.lora_A["subject"], layer.lora_B["subject"]):
            linear.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    x = torch.randn(1, tw.LATENT_CHANNELS, 1, 8, 8, dtype=torch.bfloat16)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 16, 32, dtype=torch.bfloat16), return_dict=False)[0]
    out.float().square().mean().backward()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)


def test_lora_scales_per_layer_and_save_load(tmp_path):
    from diffusers import WanPipeline
    model = tw.build_backbone("wan")
    params = common.add_lora(model, "subject", 4, ["to_q", "to_k", "to_v", "to_out.0"])
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    layers = common.lora_layers(model)
    common.set_lora_scale(layers, "subject", 0.5, where=lambda n: n.endswith("to_q"))
    for n, m in layers:
        assert m.scaling["subject"] == (0.5 if n.endswith("to_q") else 0.0)
    for p in params:
        torch.nn.init.normal_(p)
    common.save_lora(WanPipeline, model, "subject", tmp_path / "subject_lora" / "pytorch_lora_weights.safetensors")
    fresh = tw.build_backbone("wan")
    fresh.load_lora_adapter(str(tmp_path / "subject_lora"), weight_name="pytorch_lora_weights.safetensors",
                            adapter_name="subject")
    a = dict((n.replace(".subject", ""), p) for n, p in model.named_parameters() if "lora" in n)
    b = dict((n.replace(".subject", ""), p) for n, p in fresh.named_parameters() if "lora" in n)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].float()) for k in a)


def test_side_by_side_pads_stills_and_resizes():
    still, clip = torch.zeros(1, 3, 16, 16), torch.ones(9, 3, 32, 32)
    grid = common.side_by_side([clip, still])
    assert grid.shape == (9, 3, 32, 64) and grid[:, :, :, 32:].abs().max() == 0


def test_step_log_writes_jsonl(tmp_path, capsys):
    log = common.StepLog(tmp_path / "log.jsonl", every=2)
    for step in range(1, 5):
        log(step, loss=1.0 / step)
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4] and "step 4: loss 0.25" in capsys.readouterr().out
    common.StepLog(tmp_path / "log.jsonl", every=2, append=True)(6, loss=0.1)  # a resumed run continues the file
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4, 6]
    common.StepLog(tmp_path / "log.jsonl", every=2)(2, loss=0.1)  # a new run in the same folder starts afresh
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [2]


def test_write_result_toy_metrics_are_the_mean_over_samples(tmp_path):
    images, _ = tw.subject_images()
    motion = tw.motion_clip()
    ideal = tw.render([dict(tw.SUBJECT, motion="zigzag", background="white")], torch.Generator())[0]
    blank = torch.zeros_like(ideal)  # a plain gray clip: no sprite, identity 0
    one = common.write_result(tmp_path / "a", ideal[None], images, motion, "p", 4, evaluate=tw.evaluate)
    two = common.write_result(tmp_path / "b", torch.stack([ideal, blank]), images, motion, "p", 4, evaluate=tw.evaluate)
    assert one["identity"] == 1.0 and two["identity"] == 0.5
    assert (tmp_path / "b" / "result" / "008.png").is_file()  # the first sample's frames
    grid = common.read_video(tmp_path / "b" / "result_grid.mp4", 9)
    assert grid.shape[-1] == 4 * grid.shape[-2]  # subject | motion | both samples


def test_bf16_only_where_the_gpu_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or a T4
    assert common.device_and_dtype() == (torch.device("cuda"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert common.device_and_dtype()[1] == torch.bfloat16
    assert common.device_and_dtype("float32")[1] == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.device_and_dtype() == (torch.device("cpu"), torch.float32)
    assert common.device_and_dtype("bfloat16")[1] == torch.bfloat16  # the CPU bf16 test path


@pytest.mark.parametrize("major, want", [(7, torch.float32), (8, torch.bfloat16)])
def test_bf16_emulation_does_not_count(monkeypatch, major, want):
    """torch.cuda.is_bf16_supported() itself, on a pre-Ampere GPU (a V100 is 7.0, a T4 7.5) that emulates bf16: by
    default it says True there (it makes a bf16 tensor); the frozen weights must still be fp32."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert torch.cuda.is_bf16_supported()  # what the default counts
    assert common.device_and_dtype() == (torch.device("cuda"), want)


def test_images_of_any_mode_and_bit_depth_become_8_bit_rgb(tmp_path):
    from PIL import Image
    import numpy as np
    grey16 = np.full((4, 6), 0xAAAA, dtype=np.uint16)  # 16-bit grey 43690 is 8-bit 170
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((4, 6, 2), (170, 30), dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.full((4, 6), 170, dtype=np.uint8)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.full((4, 6, 4), (170, 170, 170, 0), dtype=np.uint8)).save(tmp_path / "rgba.png")
    for name in ("grey16", "la", "palette", "rgba"):
        x = common.read_image(tmp_path / f"{name}.png")
        assert x.shape == (3, 4, 6), name
        assert torch.allclose(x, torch.full_like(x, 170 / 127.5 - 1), atol=1e-6), name


def test_library_messages_are_cut_to_their_first_meaningful_line():
    banner = "ffmpeg version 6.1 Copyright (c) 2000-2023\n  built with gcc 12\n  configuration: --enable-gpl\n" * 20
    e = RuntimeError(banner + "[mov,mp4 @ 0x1] moov atom not found\nclip.mp4: Invalid data found when processing input")
    assert common.first_line(e) == "clip.mp4: Invalid data found when processing input"
    assert common.first_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("flags", [dict(steps=0), dict(steps=-5), dict(lr=float("nan")), dict(lr=0.0),
                                   dict(lr=float("inf")), dict(p=1.5), dict(seed=-1), dict(seed=2 ** 32),
                                   dict(warmup=-1)])
def test_numeric_flags_out_of_range_end_with_one_line(flags):
    args = argparse.Namespace(**{**dict(steps=10, lr=1e-4, p=0.5, seed=0, warmup=0), **flags})
    with pytest.raises(common.InputError) as e:
        common.check_numbers(args, at_least_one=["steps"], at_least_zero=["warmup"], positive=["lr"], unit=["p"])
    assert str(e.value).startswith(f"--{next(iter(flags))} must be") and "\n" not in str(e.value)
    common.check_numbers(argparse.Namespace(steps=1, lr=1e-4, p=1.0, seed=0, warmup=0), at_least_one=["steps"],
                         at_least_zero=["warmup"], positive=["lr"], unit=["p"])  # the edges pass


def test_out_holding_a_run_is_only_reused_on_purpose(tmp_path):
    common.check_out(tmp_path / "new")  # nothing there: fine
    (tmp_path / "empty").mkdir()
    common.check_out(tmp_path / "empty")
    file = tmp_path / "file"
    file.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    for out, flags, words in [(file, {}, "is a file"), (file, dict(overwrite=True), "is a file"),
                              (run, {}, "holds an earlier run (config.json)")]:
        with pytest.raises(common.InputError, match=re.escape(words)):
            common.check_out(out, **flags)
    for flag in ("resume", "sample_only", "overwrite"):
        common.check_out(run, **{flag: True})


SHARED_FLAGS = ["--sample-only", "--resume", "--overwrite", "--dry-run", "--num-samples", "--out", "--seed", "--dtype",
                "--grad-ckpt", "--ablate", "--seeds", "--ablation-seeds", "--lr", "--log-every", "--save-every",
                "--sample-every"]


def test_the_method_files_share_their_flags(capsys):
    """The same name for the same thing in every method file (issue 21), read from each file's --help."""
    missing = {}
    for name in ("smrabooth", "jointtuner", "dualreal", "dual_task_sdv"):
        with pytest.raises(SystemExit):
            importlib.import_module(name).parse_args(["--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]  # "usage: X.py [-h] [--flag VALUE] ...": every flag once
        flags = set(re.findall(r"\[(--[a-z0-9-]+)", usage))
        missing[name] = [f for f in SHARED_FLAGS if f not in flags]
    assert missing == dict.fromkeys(missing, []), missing
