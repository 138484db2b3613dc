import json

import pytest
import torch
import torch.nn.functional as F

import common
import smrabooth as sm
import toyworld as tw
from helpers import (MOT, SUBJ, check_bad_input, copy_of, earlier_run, empty_dir, error_line, png, put_file,
                     with_ckpt)

C = tw.LATENT_CHANNELS  # the toy VAE's latent channels


def token_grid(model):
    """The toy Wan's token grid on an 8x8 latent frame (one token per patch) and its width."""
    cfg = model.config
    return (8 // cfg.patch_size[1], 8 // cfg.patch_size[2]), cfg.num_attention_heads * cfg.attention_head_dim


FAST = ["--model", "toy", "--subject-steps", "4", "--motion-steps", "4", "--steps", "3", "--batch", "2",
        "--log-every", "2"]


def test_sura_loss_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])           # (B=1, N=2, dim=2)
    target = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])
    identity = torch.nn.Identity()
    # cos = [1/sqrt(2), -1] -> L = -(0.7071 - 1) / 2
    assert torch.isclose(sm.sura_loss(tokens, identity, target), torch.tensor(-(2 ** -0.5 - 1) / 2))


def test_hook_takes_the_output_of_block_0():
    model = tw.build_backbone("wan")
    seen, store = {}, {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("in1", i[0]))
    sm.block0_hook(model, store)
    model(torch.randn(1, C, 1, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32))
    (h, w), width = token_grid(model)
    assert store["h"].shape == (1, h * w, width) and torch.equal(store["h"], seen["out"])
    assert torch.equal(store["h"], seen["in1"])  # i.e. what block 1 receives


def test_region_loss_ignores_everything_outside_the_mask():
    v = torch.zeros(1, C, 1, 8, 8)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1                                       # top half of the image is the subject
    v_pred = v.clone()
    v_pred[..., 4:, :] = 5.0                                    # errors only in the bottom half of the latent
    assert sm.region_loss(v_pred, v, mask) == 0
    v_pred[..., 0, 0] = 2.0                                     # one error inside the subject
    assert torch.isclose(sm.region_loss(v_pred, v, mask), torch.tensor(4.0 * C / v.numel()))


def test_one_step_x0_is_exact_for_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    z_t, v = common.noisy_and_target("flow", z0, eps, sigma)
    assert torch.allclose(sm.one_step_x0(z_t, v, sigma), z0, atol=1e-6)


def test_window_decode_keeps_reference_frames_4k_plus_5_to_4k_plus_20():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                           latents_std=[2.0] * 4).eval()
    z = torch.randn(1, 4, 9, 4, 4, requires_grad=True)       # 9 latents = 33 frames
    for k in (0, 2):
        start, end, drop, ref = sm.window(vae, 9, k, 6)
        assert (start, end, drop) == (k, k + 6, 5) and ref == list(range(4 * k + 5, 4 * k + 21))
    frames, ref = sm.decode_window(vae, z, 2, 6)
    assert frames.shape == (1, 16, 3, 32, 32) and ref == list(range(13, 29))
    full = vae.decode(sm.unnormalize(vae, z[:, :, 2:8])).sample  # 21 frames: the kept ones are its last 16
    assert full.shape[2] == 21 and torch.allclose(frames, full[:, :, 5:].transpose(1, 2), atol=1e-6)
    frames.sum().backward()
    assert z.grad[:, :, 2:8].abs().sum() > 0 and z.grad[:, :, :2].abs().sum() == 0
    # the toy pixel VAE has no temporal compression: a latent is a frame, and every decoded frame is kept
    assert sm.window(tw.load_vae(), 9, 2, 4) == (2, 6, 0, [2, 3, 4, 5])


def test_checkpointed_decode_equals_the_vae_and_keeps_less():
    """--mora-ckpt: the same frames and gradients as AutoencoderKLWan.decode, a fraction of the saved activations."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                           latents_std=[2.0] * 4).eval().requires_grad_(False)
    z = torch.randn(1, 4, 9, 4, 4, requires_grad=True)
    runs = []
    for ckpt in (False, True):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            frames, ref = sm.decode_window(vae, z, 2, 6, ckpt)
        frames.square().sum().backward()
        runs.append((frames, ref, z.grad.clone(), sum(saved)))
        z.grad = None
    (a, ref_a, grad_a, saved_a), (b, ref_b, grad_b, saved_b) = runs
    assert torch.equal(a, b) and ref_a == ref_b and torch.equal(grad_a, grad_b)
    assert saved_b < saved_a / 10, (saved_a, saved_b)


def test_mora_is_zero_for_the_same_motion_and_grows_with_a_shift():
    clip = tw.motion_clip()[None]
    ref_flow = tw.toy_flow(clip[0, :-1], clip[0, 1:])[None]
    assert sm.mora_loss(tw.toy_flow, clip, ref_flow) < 1e-6
    still = clip[:, :1].expand_as(clip)
    assert sm.mora_loss(tw.toy_flow, still, ref_flow) > 0.1


def test_mora_is_in_pixels_as_the_paper_writes_it():
    # the flow network's own units, as the paper's L1 of raw flows: the same motion at twice the size moves twice
    # as many pixels and gives twice the loss (flows divided by the image side would give the same loss)
    losses = []
    for scale in (1, 2):
        clip = F.interpolate(tw.motion_clip(), scale_factor=scale, mode="bilinear")[None]
        ref_flow = tw.toy_flow(clip[0, :-1], clip[0, 1:])[None]
        losses.append(float(sm.mora_loss(tw.toy_flow, clip[:, :1].expand_as(clip), ref_flow)))
    assert abs(losses[1] / losses[0] - 2) < 0.3, losses


def test_injection_layers_and_steps():
    args = sm.parse_args(["--model", "toy"])
    model = tw.build_backbone("wan")
    sm.add_loras(model, args)
    model.set_adapters(["subject", "motion"])
    layers = common.lora_layers(model)
    seen = []
    for i in range(10):
        sm.set_injection(layers, args, i, 10)
        seen.append({n: (m.scaling["subject"], m.scaling["motion"]) for n, m in layers})
    # both LoRAs are trained in every block linear, self- and cross-attention; sparsity is set at inference
    assert {t for n in seen[0] for t in sm.LORA_TARGETS if n.endswith(t)} == set(sm.LORA_TARGETS)
    for i, scales in enumerate(seen):
        for n, (s, mo) in scales.items():
            subject_layer = n.endswith(("to_q", "to_k", "ffn.net.0.proj"))
            motion_layer = n.endswith(("to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"))
            assert s == ((0.5 if i < 3 else 1.0) if subject_layer else 0.0), (i, n)
            assert mo == (1.0 if motion_layer else 0.0), (i, n)
    assert any(".attn2." in n for n in seen[0]) and any(s[0] > 0 for n, s in seen[5].items() if ".attn2." in n)
    all_args = sm.parse_args(["--model", "toy", "--inject", "all", "--subject-drop-ffn0"])
    sm.set_injection(layers, all_args, 9, 10)  # Combination 1: both LoRAs in every layer
    assert all(m.scaling["subject"] == 1.0 and m.scaling["motion"] == 1.0 for n, m in layers)
    drop = sm.parse_args(["--model", "toy", "--subject-drop-ffn0", "--self-attn-only"])
    sm.set_injection(layers, drop, 9, 10)
    for n, m in layers:
        assert (m.scaling["subject"] > 0) == (n.endswith(("to_q", "to_k")) and ".attn1." in n)
    one = sm.parse_args(["--model", "toy", "--motion-layers", "attn2.to_v", "--subject-layers", "ffn.net.2"])
    sm.set_injection(layers, one, 9, 10)
    for n, m in layers:
        assert (m.scaling["motion"] > 0) == n.endswith("attn2.to_v") and (m.scaling["subject"] > 0) == n.endswith(
            "ffn.net.2"), n


def test_our_loop_equals_wan_pipeline_when_all_scales_are_1():
    import copy
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    torch.manual_seed(0)
    model = tw.build_backbone("wan").eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tw.tokenizer(), text_encoder=tw.text_encoder("umt5"), vae=tw.load_vae(),
                       transformer=model, scheduler=copy.deepcopy(sched))
    text, uncond = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    noise = torch.randn(1, C, 9, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=32, width=32, num_frames=9,
               num_inference_steps=4, guidance_scale=4.0, latents=noise.clone(), output_type="latent").frames
    ours = sm.sample(model, sched, text, uncond, noise.clone(), 4, 4.0)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_gradients_reach_only_the_active_lora_and_the_projector():
    args = sm.parse_args(["--model", "toy"])
    model = tw.build_backbone("wan")
    subject, motion = sm.add_loras(model, args)
    (h, w), width = token_grid(model)
    projector = sm.Projector(width, 16, 32)
    store = {}
    sm.block0_hook(model, store)
    model.set_adapters(["subject"])
    v = model(torch.randn(2, C, 1, 8, 8), torch.tensor([500.0, 100.0]), torch.randn(2, 16, 32),
              return_dict=False)[0]
    for p in subject:  # B of LoRA is zero at init: make A's gradient non-zero too
        torch.nn.init.normal_(p, std=0.02)
    v = model(torch.randn(2, C, 1, 8, 8), torch.tensor([500.0, 100.0]), torch.randn(2, 16, 32),
              return_dict=False)[0]
    loss = v.pow(2).mean() + sm.sura_loss(store["h"], projector, torch.randn(2, h * w, 32))
    loss.backward()
    grads = {n for n, p in list(model.named_parameters()) + list(projector.named_parameters())
             if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {n for n, p in model.named_parameters() if ".subject." in n} | \
        {n for n, _ in projector.named_parameters()}
    assert all(p.grad is None for p in motion)


def test_toy_end_to_end_writes_everything_and_sample_only_reuses_it(tmp_path):
    out = tmp_path / "run"
    metrics = sm.main(FAST + ["--out", str(out)])
    for name in ("subject_lora/pytorch_lora_weights.safetensors", "motion_lora/pytorch_lora_weights.safetensors",
                 "config.json", "log.jsonl", "result.mp4", "result_grid.mp4", "metrics.json", "result/000.png"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"identity", "motion", "leakage", "dynamics", "noise"}
    assert json.loads((out / "config.json").read_text())["subject_size"] == 32  # the toy preset was applied
    again = sm.main(FAST + ["--out", str(out), "--sample-only"])
    assert again == metrics  # same LoRAs, same seed: the same clip
    from diffusers import WanPipeline
    pipe = WanPipeline(tokenizer=tw.tokenizer(), text_encoder=tw.text_encoder("umt5"), vae=tw.load_vae(),
                       transformer=tw.build_backbone("wan"), scheduler=None)
    pipe.load_lora_weights(str(out / "subject_lora"), adapter_name="subject")
    assert "subject" in pipe.get_list_adapters()["transformer"]


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = FAST + ["--subject-steps", "4", "--motion-steps", "4", "--save-every", "2"]
    sm.main(args + ["--out", str(tmp_path / "a")])
    # interrupted after 2 motion steps: the stage-2 checkpoint at step 2 is what an interrupted run leaves
    sm.main(args[:-6] + ["--subject-steps", "4", "--motion-steps", "2", "--save-every", "1",
                         "--out", str(tmp_path / "b")])
    import safetensors.torch as st
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert state["stage"] == "motion" and state["step"] == 1
    ran, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: ran.append(1) or step(self, *a, **k))
    sm.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert len(ran) == 3  # motion steps 2-4 only (a fresh run, the same LoRAs, would take 4 + 4)
    a = st.load_file(tmp_path / "a" / "motion_lora" / "pytorch_lora_weights.safetensors")
    b = st.load_file(tmp_path / "b" / "motion_lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "b" / "metrics.json").read_text())


def test_samples_are_written_during_training_without_changing_it(tmp_path):
    """--sample-every k: out/samples/<stage>_step_k.mp4 in both stages, each numbered as its log lines, from fixed
    noise; both LoRAs are the same as without previews."""
    import safetensors.torch as st
    sm.main(FAST + ["--out", str(tmp_path / "a"), "--sample-every", "2", "--num-samples", "1"])
    sm.main(FAST + ["--out", str(tmp_path / "b"), "--sample-every", "0", "--num-samples", "1"])
    assert sorted(q.name for q in (tmp_path / "a" / "samples").iterdir()) == [
        "motion_step_000002.mp4", "motion_step_000004.mp4", "subject_step_000002.mp4", "subject_step_000004.mp4"]
    assert not (tmp_path / "b" / "samples").exists()
    for name in ("subject", "motion"):
        a, b = (st.load_file(sm.lora_file(tmp_path / r, name)) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_inputs_end_with_one_line_before_any_model_loads(tmp_path, capsys):
    subj = tw.ASSETS / "toy" / "subject"
    mot = tw.ASSETS / "toy" / "motion"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = lambda argv: error_line(sm, argv, capsys)
    assert "--subject DIR and --motion VIDEO are needed" in bad([])
    assert "is not a folder" in bad(["--subject", str(tmp_path / "nope"), "--motion", str(mot), "--model", "toy"])
    assert "has no image" in bad(["--subject", str(empty), "--motion", str(mot), "--model", "toy"])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    assert "cannot read image" in bad(["--subject", str(junk), "--motion", str(mot), "--model", "toy"])
    masked = tmp_path / "masked"
    (masked / "masks").mkdir(parents=True)
    common.write_frames(masked, tw.subject_images()[0][:2])  # 000.png, 001.png
    common.write_frames(masked / "masks", tw.subject_images()[0][:1])
    assert "no mask with the same name" in bad(["--subject", str(masked), "--motion", str(mot), "--model", "toy"])
    short = tmp_path / "short"
    common.write_frames(short, tw.motion_clip()[:5])
    assert "has 5 frames, 9 are needed" in bad(["--subject", str(subj), "--motion", str(short), "--model", "toy"])
    assert "does not contain the placeholder" in bad(["--model", "toy", "--prompt", "a star moving left"])
    real = ["--subject", str(subj), "--motion", str(mot), "--motion-frames", "9"]
    assert "real models need --prompt" in bad(real + ["--model", str(tmp_path / "no-model")])
    real += ["--prompt", "a sks star dancing"]
    assert "neither a local folder nor in the hub cache" in bad(real + ["--model", str(tmp_path / "no-model")])
    wan = tmp_path / "wan"  # a model folder as far as the checks before loading can tell
    wan.mkdir()
    (wan / "model_index.json").write_text("{}")
    assert "--dino 'facebook/dinov2-giant' is neither" in bad(real + ["--model", str(wan)])
    dino = ["--dino", str(tw.ASSETS / "encoders" / "dinov2")]
    assert "RAFT weights" in bad(real + dino + ["--model", str(wan)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.mp4").write_bytes(b"earlier")
    bad(["--model", "toy", "--prompt", "no placeholder", "--out", str(out)])
    assert (out / "result.mp4").read_bytes() == b"earlier" and len(list(out.iterdir())) == 1


def test_dry_run_loads_nothing(tmp_path, capsys):
    assert sm.main(["--model", "toy", "--dry-run", "--out", str(tmp_path)]) is None
    out = capsys.readouterr().out
    assert "a sks star moving in a zigzag" in out and "toy DINOv2 stand-in" in out


def test_the_bundled_task_is_prompted_as_the_paper_does(tmp_path):
    """Supp. sec. 3: the photos under "a picture of V* <subject name>", the video under its detailed caption (the whole
    clip), and a sampling prompt of subject, motion and setting, which the paper has GPT-4o write and the toy world
    writes from its words; a real run takes its --prompt (no default: see the bad-input tests)."""
    *_, prompts = sm.read_inputs(sm.parse_args(["--model", "toy"]))
    assert prompts == dict(subject="a picture of sks star", motion="a blue striped square moving in"
                           " a zigzag on a gray background", sample="a sks star moving in a zigzag on a gray background")
    *_, prompts = sm.read_inputs(sm.parse_args(["--model", "toy", "--placeholder", "zz", "--class-word", "ring",
                                                "--motion-caption", "a red circle moving left on a white background"]))
    assert prompts["subject"] == "a picture of zz ring" and prompts["sample"] == "a zz ring moving left on a white " \
                                                                                "background"
    *_, prompts = sm.read_inputs(sm.parse_args(_real(tmp_path, "--no-mora", "--motion-caption", "a man dancing")))
    assert prompts == dict(subject="a picture of sks star", motion="a man dancing", sample="a sks star dancing")


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """A tiny Wan pipeline saved as a local folder (the real loading path), and a random RAFT-large state dict."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from torchvision.models.optical_flow import raft_large
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_wan")
    vae = AutoencoderKLWan(base_dim=3, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * C, latents_std=[1.0] * C)
    pipe = WanPipeline(tokenizer=tw.tokenizer(), text_encoder=tw.text_encoder("umt5"), vae=vae,
                       transformer=tw.build_backbone("wan"),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0))
    pipe.save_pretrained(folder / "wan")
    torch.save(raft_large(weights=None).state_dict(), folder / "raft.pth")
    return folder


def test_the_real_loading_path_at_tiny_size(tiny_wan, monkeypatch):
    """The same load_models the real run uses, on a tiny Wan pipeline saved as a local folder."""
    from diffusers import AutoencoderKLWan
    import torchvision.models.optical_flow as of
    made = []  # the RAFT that load_models builds, to look at
    monkeypatch.setattr(of, "raft_large", lambda **k: made.append(of.raft.raft_large(**k)) or made[-1])
    args = sm.parse_args(["--model", str(tiny_wan / "wan"), "--dino", str(tw.ASSETS / "encoders" / "dinov2"),
                          "--raft-weights", str(tiny_wan / "raft.pth")])
    m = sm.load_models(args, torch.device("cpu"), torch.float32)
    assert type(m["transformer"]).__name__ == "WanTransformer3DModel" and type(m["vae"]) is AutoencoderKLWan
    assert type(m["scheduler"]).__name__ == "UniPCMultistepScheduler"
    lat = sm.encode_video(m["vae"], torch.zeros(1, 9, 3, 64, 64))
    assert lat.shape == (1, C, 3, 8, 8)
    # RAFT is frozen: eval mode (BatchNorm keeps its running statistics) and no gradient into its weights, while the
    # gradient reaches the frames
    raft, = made
    stats = {k: v.clone() for k, v in raft.state_dict().items() if "running" in k}
    assert stats and not any(mod.training for mod in raft.modules())
    frames = (torch.rand(2, 3, 128, 128) * 2 - 1).requires_grad_()  # RAFT needs at least 128 px
    flow = m["flow"](frames, frames.flip(-1))
    assert flow.shape == (2, 2, 128, 128)
    flow.abs().mean().backward()
    assert frames.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in raft.parameters())
    assert all(torch.equal(v, raft.state_dict()[k]) for k, v in stats.items())
    text = common.encode_prompts(m["tokenizer"], m["text_encoder"], ["a sks star"], 16, True)
    z = sm.sample(m["transformer"], m["scheduler"], text, torch.zeros_like(text), torch.randn(1, C, 3, 8, 8), 2, 5.0)
    assert z.shape == (1, C, 3, 8, 8) and torch.isfinite(z).all()


def test_bf16_wan_keeps_its_fp32_modules_as_from_pretrained_loads_them(tiny_wan):
    """from_pretrained(torch_dtype=bf16) keeps Wan's _keep_in_fp32_modules (rope tables, time embedder,
    scale_shift_table, norms) in fp32, and WanPipeline runs them so: load_models must not cast them to bf16, on the
    real path nor on the toy's (whose fp32 files are cast as the real ones load). A test against the pipeline cannot
    see it when both share the cast model: the dtypes themselves."""
    from diffusers import WanTransformer3DModel
    dtypes = lambda model: {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    want = dtypes(WanTransformer3DModel.from_pretrained(tiny_wan / "wan", subfolder="transformer",
                                                        torch_dtype=torch.bfloat16))
    fp32 = {n for n, d in want.items() if d == torch.float32}
    assert {"rope.freqs_cos", "scale_shift_table"} <= fp32 and any(d == torch.bfloat16 for d in want.values())
    real = sm.parse_args(["--model", str(tiny_wan / "wan"), "--dino", str(tw.ASSETS / "encoders" / "dinov2"),
                          "--no-mora"])
    assert dtypes(sm.load_models(real, torch.device("cpu"), torch.bfloat16)["transformer"]) == want
    toy = dtypes(sm.load_models(sm.parse_args(["--model", "toy"]), torch.device("cpu"), torch.bfloat16)["transformer"])
    assert {n for n, d in toy.items() if d == torch.float32} == fp32 and torch.bfloat16 in toy.values()


def test_raft_gets_the_frames_in_its_input_range():
    """Our frames are in [-1, 1], RAFT's input range (what Raft_Large_Weights.transforms() makes of [0, 1]): RAFT
    must see the frames unchanged (a wrong mapping halves or shifts them), with the gradient reaching the frames."""
    seen = []
    raft = lambda a, b, num_flow_updates: seen.append((a, b)) or [a[:, :2] - b[:, :2]] * num_flow_updates
    a, b = (torch.rand(2, 3, 8, 8) * 2 - 1).requires_grad_(), torch.rand(2, 3, 8, 8) * 2 - 1
    sm.raft_flow(raft, a, b).sum().backward()
    (ra, rb), = seen
    assert torch.allclose(ra, a) and torch.allclose(rb, b) and torch.allclose(a.grad[:, :2], torch.ones(2, 2, 8, 8))


def test_no_mora_and_sample_only_run_a_real_model_without_raft_weights(tiny_wan, tmp_path):
    """Only MoRA needs the flow network: --no-mora and --sample-only need no --raft-weights (no flow is loaded, so
    none can be computed)."""
    run = ["--model", str(tiny_wan / "wan"), "--dino", str(tw.ASSETS / "encoders" / "dinov2"),
           "--subject", str(tw.ASSETS / "toy" / "subject"), "--motion", str(tw.ASSETS / "toy" / "motion"),
           "--subject-size", "64", "--motion-size", "64", "64", "--motion-frames", "9", "--height", "64", "--width",
           "64", "--frames", "9", "--max-text-len", "16", "--subject-steps", "1", "--motion-steps", "1", "--steps",
           "2", "--prompt", "a sks star dancing", "--out", str(tmp_path / "run")]
    assert sm.main(run + ["--no-mora"]) is None
    assert (tmp_path / "run" / "motion_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sm.main(run + ["--sample-only"]) is None
    assert (tmp_path / "run" / "result" / "008.png").is_file()


def test_real_runs_checkpoint_the_transformer_and_moras_decode_by_default():
    """The README's real command must fit an 80 GB GPU: bench.py --estimate puts the motion stage with MoRA at ~112 GB
    without checkpointing, ~87 GB with the transformer's alone, ~45 GB with MoRA's decode too; --no-... turns each
    off, and the toy world (no causal VAE to checkpoint) runs without."""
    real = ["--subject", "s", "--motion", "m"]
    assert sm.parse_args(real).grad_ckpt and sm.parse_args(real).mora_ckpt
    off = sm.parse_args(real + ["--no-grad-ckpt", "--no-mora-ckpt"])
    assert not off.grad_ckpt and not off.mora_ckpt
    toy = sm.parse_args(["--model", "toy"])
    assert not toy.grad_ckpt and not toy.mora_ckpt
    assert sm.parse_args(["--model", "toy", "--grad-ckpt"]).grad_ckpt


def test_dinov2_loads_only_where_sura_trains_and_is_freed(monkeypatch):
    """DINOv2-giant is ~2 GB in bf16: it is loaded only for SuRA's targets (not under --no-sura, not when resuming in
    the motion stage; --sample-only never gets there) and not kept once they are computed."""
    import gc
    import weakref
    loaded, load = [], sm.load_dino

    def watched(*a):
        dino = load(*a)
        loaded.append(weakref.ref(dino))
        return dino
    monkeypatch.setattr(sm, "load_dino", watched)
    transformer, images = tw.build_backbone("wan"), torch.zeros(2, 3, 32, 32)
    grid, width = token_grid(transformer)
    toy = lambda *flags: sm.parse_args(["--model", "toy", *flags])
    targets, projector = sm.sura_targets(toy(), dict(stage="subject"), transformer, images, grid, torch.float32)
    assert targets.shape[:2] == (2, grid[0] * grid[1])
    assert projector(torch.zeros(1, width)).shape[-1] == targets.shape[-1]
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None  # freed
    for args, stage in ((toy("--no-sura"), "subject"), (toy(), "motion")):
        assert sm.sura_targets(args, dict(stage=stage), transformer, images, grid, torch.float32) == (None, None)
    assert len(loaded) == 1
    assert "dino" not in sm.load_models(toy(), torch.device("cpu"), torch.float32)


def test_no_mora_computes_no_reference_flow(tmp_path, monkeypatch):
    calls = []
    flow = tw.toy_flow
    monkeypatch.setattr(tw, "toy_flow", lambda a, b: calls.append(a.shape) or flow(a, b))
    sm.main(FAST + ["--subject-steps", "1", "--motion-steps", "1", "--no-mora", "--out", str(tmp_path / "a")])
    assert calls == []
    sm.main(FAST + ["--subject-steps", "1", "--motion-steps", "1", "--out", str(tmp_path / "b")])
    assert calls[0] == (8, 3, 32, 32) and len(calls) == 2  # the reference flows, then one MoRA step


def test_motion_frames_that_the_window_cannot_use_end_with_one_line(tiny_wan, tmp_path, capsys):
    real = ["--model", str(tiny_wan / "wan"), "--dino", str(tw.ASSETS / "encoders" / "dinov2"), "--subject",
            str(tw.ASSETS / "toy" / "subject"), "--motion", str(tw.ASSETS / "toy" / "motion"), "--raft-weights",
            str(tiny_wan / "raft.pth"), "--prompt", "a sks star dancing", "--dry-run", "--out", str(tmp_path)]
    assert "encodes 4k+1 frames; use 5 or 9" in error_line(sm, real + ["--motion-frames", "8"], capsys)
    assert "shorter than MoRA's window of 6 latents (21 frames" in error_line(sm, real + ["--motion-frames", "9"],
                                                                             capsys)
    assert "3 or more latents" in error_line(sm, real + ["--motion-frames", "9", "--mora-window", "2"], capsys)
    assert sm.main(real + ["--motion-frames", "9", "--mora-window", "3"]) is None  # 9 frames = 3 latents: fits
    assert sm.main(real + ["--motion-frames", "9", "--no-mora"]) is None


def test_toy_run_with_bf16_frozen_weights(tmp_path, monkeypatch):
    """bf16-only bugs show on the CPU: the frozen transformer, text encoder and DINOv2 in bf16, the VAE in fp32; the
    LoRA computes in the activations' bf16 (common.add_lora), not on an fp32 copy of each input."""
    loaded, load, seen, add = [], sm.load_models, set(), sm.add_loras
    monkeypatch.setattr(sm, "load_models", lambda *a: loaded.append(load(*a)) or loaded[-1])

    def add_and_watch(transformer, args):  # the dtype each LoRA computes in, training and sampling
        params = add(transformer, args)
        for _, layer in common.lora_layers(transformer):
            for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
                linear.register_forward_hook(lambda mod, inp, out: seen.add((inp[0].dtype, out.dtype)))
        return params
    monkeypatch.setattr(sm, "add_loras", add_and_watch)
    metrics = sm.main(FAST + ["--subject-steps", "2", "--motion-steps", "2", "--num-samples", "1", "--dtype",
                              "bfloat16", "--out", str(tmp_path / "run")])
    m, = loaded
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert m["transformer"].dtype == torch.bfloat16 and m["vae"].dtype == torch.float32
    lora = [p for n, p in m["transformer"].named_parameters() if ".motion." in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # trainable parameters stay fp32
    assert all(v == v for v in metrics.values())  # no NaN


def test_every_ablation_is_a_valid_flag_set():
    assert {"base", "full", "no SuRA", "no MoRA", "inject all (Comb. 1)"} <= set(sm.ABLATIONS)
    base = sm.parse_args(["--model", "toy"])
    for name, flags in sm.ABLATIONS.items():
        args = sm.parse_args(["--model", "toy"] + flags)
        assert name == "full" or vars(args) != vars(base), name


def test_no_mask_ablation_ignores_the_shipped_masks():
    _, masks, _, _ = sm.read_inputs(sm.parse_args(["--model", "toy"]))
    assert 0 < masks.mean() < 0.5  # the toy subject's masks cover the sprite only
    _, masks, _, _ = sm.read_inputs(sm.parse_args(["--model", "toy", "--no-mask"]))
    assert masks.min() == 1  # --no-mask: the region loss covers the whole image


RUN = ("config.json", "ckpt.pt", "log.jsonl", "metrics.json", "result.mp4", "result/000.png",  # what a run leaves
       "subject_lora/pytorch_lora_weights.safetensors", "motion_lora/pytorch_lora_weights.safetensors")


BAD_FLAGS = {  # flags -> the words the one-line error must hold
    "subject steps -5": (["--subject-steps=-5"], "--subject-steps must be >= 0"),
    "motion steps -1": (["--motion-steps=-1"], "--motion-steps must be >= 0"),
    "steps 0": (["--steps", "0"], "--steps must be >= 1"),
    "steps -1": (["--steps=-1"], "--steps must be >= 1"),
    "num-samples 0": (["--num-samples", "0"], "--num-samples must be >= 1"),
    "lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "lr inf": (["--lr", "inf"], "--lr must be a finite number"),
    "lr 0": (["--lr", "0"], "--lr must be a finite number > 0"),
    "lr negative": (["--lr=-1e-3"], "--lr must be a finite number > 0"),
    "subject rank 0": (["--subject-rank", "0"], "--subject-rank must be >= 1"),
    "motion rank -2": (["--motion-rank=-2"], "--motion-rank must be >= 1"),
    "projector width 0": (["--proj-hidden", "0"], "--proj-hidden must be >= 1"),
    "batch 0": (["--batch", "0"], "--batch must be >= 1"),
    "seed -1": (["--seed=-1"], "--seed must be between"),
    "seed 2^32": (["--seed", str(2 ** 32)], "--seed must be between"),
    "lambda 0": (["--sura-lambda", "0"], "--sura-lambda must be a finite number > 0"),
    "alpha nan": (["--mora-alpha", "nan"], "--mora-alpha must be a finite number"),
    "shift 0": (["--shift", "0"], "--shift must be a finite number > 0"),
    "cfg -1": (["--cfg=-1"], "--cfg must be >= 0"),
    "cfg inf": (["--cfg", "inf"], "--cfg must be a finite number"),
    "T_point 1.5": (["--t-point", "1.5"], "--t-point must be between 0 and 1"),
    "subject scale -1": (["--subject-early-scale=-1"], "--subject-early-scale must be >= 0"),
    "motion scale inf": (["--motion-scale", "inf"], "--motion-scale must be a finite number"),
    "MoRA window 2": (["--mora-window", "2"], "3 or more latents"),
    "MoRA window past the toy clip": (["--mora-window", "10"], "--motion-frames 9 is shorter than MoRA's window of 10"),
    "motion frames 8": (["--motion-frames", "8"], "--motion-frames 8: Wan's VAE encodes 4k+1 frames; use 5 or 9"),
    "motion frames 1": (["--motion-frames", "1"], "--motion-frames 1: Wan's VAE encodes 4k+1 frames"),
    "frames 10": (["--frames", "10"], "--frames 10: Wan's VAE encodes 4k+1 frames; use 9 or 13"),
    "frames 0": (["--frames", "0"], "--frames 0: Wan's VAE encodes 4k+1 frames"),
    "height 30": (["--height", "30"], "--height/--width 30 32: use multiples of 16"),
    "subject size 0": (["--subject-size", "0"], "--subject-size 0: use multiples of 16"),
    "motion size 32x40": (["--motion-size", "32", "40"], "--motion-size 32 40: use multiples of 16"),
    "motion start -1": (["--motion-start=-1"], "--motion-start must be >= 0"),
    "motion end before start": (["--motion-start", "4", "--motion-end", "2"], "must be after --motion-start"),
    "motion stride 0": (["--motion-stride", "0"], "--motion-stride must be >= 1"),
    "text length 0": (["--max-text-len", "0"], "--max-text-len must be >= 1"),
    "fps 0": (["--fps", "0"], "--fps must be >= 1"),
    "log every 0": (["--log-every", "0"], "--log-every must be >= 1"),
    "save every 0": (["--save-every", "0"], "--save-every must be >= 1"),
    "sample every -1": (["--sample-every=-1"], "--sample-every must be >= 0"),
    "seeds 0": (["--seeds", "0"], "--seeds must be >= 1"),
    "ablate with seeds 0": (["--ablate", "--seeds", "0"], "--seeds must be >= 1"),
    "ablation seeds -1": (["--ablate", "--ablation-seeds=-1"], "--ablation-seeds must be >= 0"),
    "empty prompt": (["--prompt", ""], "--prompt is empty"),
    "blank class word": (["--class-word", "  "], "--class-word is empty"),
    "empty motion caption": (["--motion-caption", ""], "--motion-caption is empty"),
    "empty placeholder": (["--placeholder", ""], "--placeholder '' must be one word"),
    "two-word placeholder": (["--placeholder", "s k"], "--placeholder 's k' must be one word"),
    "prompt without placeholder": (["--prompt", "a star moving"], "does not contain the placeholder"),
    "toy caption without motion words": (["--motion-caption", "a blue square"], "names no toy motion and background"),
    "unknown subject layer": (["--subject-layers", "to_qq"], "--subject-layers 'to_qq': each must end with"),
    "empty motion layer": (["--motion-layers", "to_v", ""], "--motion-layers '': each must end with"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_cost_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad flag: exit code 2, one line naming it, no model loaded, the earlier run in --out unchanged (even with
    --overwrite, which clears it only once the inputs have passed)."""
    checksum = earlier_run(tmp_path / "out", RUN)
    flags, words = BAD_FLAGS[case]
    argv = ["--model", "toy", "--out", str(tmp_path / "out"), "--overwrite"] + flags
    check_bad_input(sm, argv, words, checksum, capsys, monkeypatch)


def _state(**changes):
    """A toy run's training state as save_state writes it (LoRA ranks 32 and 64), with some entries changed."""
    lora = {n: {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(r, 64), "blocks.0.attn1.to_q.lora_B.weight":
                torch.zeros(64, r)} for n, r in (("subject", 32), ("motion", 64))}
    return {**dict(stage="subject", step=2, opt=None, gen=None, rng=None, lora=lora,
                   projector={"net.0.weight": torch.zeros(64, 64)}), **changes}


def _saved(t, obj):
    torch.save(obj, t / "saved.pt")
    return str(t / "saved.pt")


def _raft():
    from torchvision.models.optical_flow import raft_large
    return raft_large(weights=None).state_dict()


def _real(t, *flags, raft=None, prompt="a sks star dancing"):
    """A real-model run as far as the checks before loading can tell (a Wan folder, the bundled DINOv2, a prompt)."""
    (t / "wan").mkdir(exist_ok=True)
    (t / "wan" / "model_index.json").write_text("{}")
    return ["--model", str(t / "wan"), "--dino", str(tw.ASSETS / "encoders" / "dinov2"), "--subject", str(SUBJ),
            "--motion", str(MOT), "--motion-frames", "9", "--mora-window", "3", "--subject-size", "32",
            "--motion-size", "32", "32", "--height", "32", "--width", "32", "--frames", "9"] + (
        ["--raft-weights", raft] if raft else []) + (["--prompt", prompt] if prompt else []) + list(flags)


BAD_FILES = {  # (tmp folder, --out) -> flags, and the words the one-line error must hold
    "out holds a run": (lambda t, out: [], "holds an earlier run"),
    "out is a file": (lambda t, out: ["--out", put_file(t, "a_file", b"x")], "is a file, not a folder"),
    "damaged checkpoint": (lambda t, out: ["--resume"], "cannot read the checkpoint"),
    "another method's checkpoint": (lambda t, out: with_ckpt(out, {"step": 3, "adapters": {}}),
                                    "holds no SMRABooth training state"),
    "checkpoint of another rank": (lambda t, out: with_ckpt(out, _state()) + ["--motion-rank", "16"],
                                   "was trained with --motion-rank 64"),
    "checkpoint of another projector": (lambda t, out: with_ckpt(out, _state(projector={
        "net.0.weight": torch.zeros(16, 64)})), "was trained with --proj-hidden 16"),
    "checkpoint with LoRAs in some layers": (lambda t, out: with_ckpt(out, _state()), "trained in some layers only"),
    "damaged LoRAs": (lambda t, out: ["--sample-only"], "subject_lora/pytorch_lora_weights.safetensors ("),
    "no LoRAs": (lambda t, out: ["--sample-only", "--out", empty_dir(t)], "does not exist; train first"),
    "no subject folder": (lambda t, out: ["--subject", str(t / "nope")], "is not a folder"),
    "subject is a file": (lambda t, out: ["--subject", put_file(t, "a.png", png(32, 32))], "is not a folder"),
    "no photos": (lambda t, out: ["--subject", empty_dir(t)], "has no image"),
    "junk photo": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"0.png": b"not a png"})], "cannot read image"),
    "truncated photo": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"1.png": (SUBJ / "1.png").read_bytes()[:60]})],
                        "cannot read image"),
    "mask of another size": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"masks/2.png": png(16, 32)})],
                             "is 32x16, its photo 32x32: a mask must have its photo's size"),
    "missing mask": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"masks/3.png": None})],
                     "no mask with the same name"),
    "junk mask": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"masks/0.png": b"junk"})], "cannot read image"),
    "empty prompt.txt": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"prompt.txt": b"\n"})], "prompt.txt is empty"),
    "empty caption.txt": (lambda t, out: ["--motion", copy_of(t, MOT, {"caption.txt": b" "})], "caption.txt is empty"),
    "no motion": (lambda t, out: ["--motion", str(t / "no.mp4")], "does not exist"),
    "empty motion folder": (lambda t, out: ["--motion", empty_dir(t)], "holds neither frames nor video files"),
    "corrupt video": (lambda t, out: ["--motion", put_file(t, "clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)],
                      "cannot read video"),
    "short clip": (lambda t, out: ["--motion", copy_of(t, MOT, {f"00{i}.png": None for i in range(5, 9)})],
                   "has 5 frames, 9 are needed"),
    "real model without inputs": (lambda t, out: ["--model", str(t / "wan")],
                                  "--subject DIR and --motion VIDEO are needed"),
    "real model without a prompt": (lambda t, out: _real(t, prompt=None),
                                    "real models need --prompt (the video you want, e.g. 'a sks star dancing on the"),
    "model folder without model_index.json": (lambda t, out: _real(t, "--model", empty_dir(t)),
                                              "holds no model_index.json"),
    "model nowhere": (lambda t, out: _real(t, "--model", str(t / "no-model")),
                      "neither a local folder nor in the hub cache"),
    "dino nowhere": (lambda t, out: _real(t, "--dino", str(t / "no-dino")), "--dino '"),
    "no RAFT weights": (lambda t, out: _real(t), "--raft-weights raft_large_C_T_SKHT_V2-ff5fadd5.pth (from https"),
    "damaged RAFT weights": (lambda t, out: _real(t, raft=put_file(t, "raft.pth", b"junk")),
                             "is not torchvision's raft_large state dict"),
    "other RAFT weights": (lambda t, out: _real(t, raft=_saved(t, {"w": torch.zeros(2)})),
                           "is not torchvision's raft_large state dict"),
    "clip shorter than MoRA's window": (lambda t, out: _real(t, "--mora-window", "4", raft=_saved(t, _raft())),
                                        "--motion-frames 9 is shorter than MoRA's window of 4 latents"),
    "ablate a real model": (lambda t, out: _real(t, "--ablate"), "use it with --model toy"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_cost_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad path or file: exit code 2, one short line naming it, before any model loads, and the earlier run in
    --out as it was."""
    out = tmp_path / "out"
    checksum = earlier_run(out, RUN)
    flags, words = BAD_FILES[case]
    check_bad_input(sm, ["--model", "toy", "--out", str(out)] + flags(tmp_path, out), words, checksum, capsys,
                    monkeypatch)
