import copy
import json

import pytest
import torch

import common
import jointtuner as jt
import toyworld as tw
from helpers import (MOT, SUBJ, check_bad_input, copy_of, earlier_run, empty_dir, error_line, png, put_file,
                     with_ckpt)

C = tw.LATENT_CHANNELS  # the toy VAE's latent channels

FAST = ["--model", "toy", "--iterations", "4", "--steps", "3", "--batch", "2", "--log-every", "2"]


def _unet(adapters=True, gate=True, scale=0.05):
    """The toy UNet3D (random weights) with adapters whose B is random, so that they act."""
    torch.manual_seed(0)
    unet = tw.build_backbone("unet3d").eval().requires_grad_(False)
    ad = jt.add_adapters(unet, 8, 0.1, gate) if adapters else {}
    for a in ad.values():
        torch.nn.init.normal_(a.lora_B.weight, std=scale)
        if a.gate is not None:
            torch.nn.init.normal_(a.gate.weight, std=1.0)
    return unet, ad


def test_gate_is_one_scalar_per_video_the_mean_of_sigmoid_gx():
    torch.manual_seed(0)
    a = jt.AdaptiveLoRA(torch.nn.Linear(8, 6), rank=4, gate=True).eval()
    torch.nn.init.normal_(a.lora_B.weight)
    a.videos = 2
    x = torch.randn(2 * 3, 5, 8)                                  # 2 videos x 3 frames (rows) x 5 tokens
    by_hand = torch.sigmoid(x @ a.gate.weight.T).view(2, 15).mean(1)
    g = a.gate_value(x)
    assert g.shape == (6, 1, 1) and torch.allclose(g.view(2, 3), by_hand[:, None].expand(2, 3))
    out = a(x)
    assert torch.allclose(out, a.base(x) + by_hand.repeat_interleave(3)[:, None, None] * a.lora_B(a.lora_A(x)),
                          atol=1e-6)
    x2 = x.clone()
    x2[3:] = torch.randn(3, 5, 8)                                 # change the other video only
    assert torch.equal(a(x2)[:3], out[:3]) and not torch.allclose(a(x2)[3:], out[3:])


def test_a_sample_does_not_depend_on_the_rest_of_its_batch():
    unet, _ = _unet()
    z, t, text = torch.randn(2, C, 3, 8, 8), torch.tensor([500, 20]), torch.randn(2, 16, 32)
    both = unet(z, t, text).sample
    alone = unet(z[:1], t[:1], text[:1]).sample
    assert torch.allclose(both[:1], alone, atol=1e-5), (both[:1] - alone).abs().max()


def test_zero_B_is_exactly_the_base_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    a = jt.AdaptiveLoRA(lin, rank=4, dropout=0.5, gate=True).train()  # even with dropout active
    x = torch.randn(3, 5, 8)
    assert torch.equal(a(x), lin(x))
    base, _ = _unet(adapters=False)
    wrapped = copy.deepcopy(base)
    jt.add_adapters(wrapped, 8, 0.1, True)
    z, t, text = torch.randn(1, C, 3, 8, 8), torch.tensor([300]), torch.randn(1, 16, 32)
    assert torch.equal(base(z, t, text).sample, wrapped(z, t, text).sample)


def test_adapters_keep_bf16_activations_and_fp32_gradients():
    """Next to a bf16 base the adapter computes in bf16 (what it saves for the backward pass is bf16, not fp32 copies
    of its input) while its own weights and their gradients stay fp32."""
    torch.manual_seed(0)
    a = jt.AdaptiveLoRA(torch.nn.Linear(8, 6).to(torch.bfloat16).requires_grad_(False), rank=4, dropout=0.1).train()
    torch.nn.init.normal_(a.lora_B.weight)
    a.videos = 2
    x = torch.randn(2 * 3, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = a(x)
    assert out.dtype == torch.bfloat16 and saved and set(saved) == {torch.bfloat16}, saved
    out.float().square().sum().backward()
    for p in (a.lora_A.weight, a.lora_B.weight, a.gate.weight):
        assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_grad_ckpt_checkpoints_the_unet_blocks_by_hand(tmp_path):
    """diffusers' UNet3DConditionModel refuses enable_gradient_checkpointing: --grad-ckpt checkpoints its blocks
    itself, with the same loss and gradients (dropout active) and the same saved keys."""
    assert jt.main(FAST + ["--grad-ckpt", "--out", str(tmp_path / "run")]) is not None  # no ValueError
    grads = []
    for ckpt in (False, True):
        unet, ad = _unet()
        unet.train()
        if ckpt:
            jt.checkpoint_blocks(unet)
        torch.manual_seed(1)  # the same dropout masks
        loss = jt.ait_loss(unet, torch.randn(2, C, 3, 8, 8), torch.randn(2, 16, 32),
                           tw.noise_schedule("unet3d").alphas_cumprod, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append([loss] + [p.grad for p in jt.trainable(ad, False)["video"]])
        keys = set(jt.adapter_state(unet))
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(*grads))
    assert len(keys) == 74 * 3 and all(".forward" not in k for k in keys)


def test_toy_run_with_bf16_frozen_weights(tmp_path, monkeypatch):
    """bf16-only bugs show on the CPU: the frozen UNet and text encoder in bf16, the VAE in fp32, adapters fp32."""
    loaded, load = [], jt.load_models
    monkeypatch.setattr(jt, "load_models", lambda *a: loaded.append(load(*a)) or loaded[-1])
    metrics = jt.main(FAST + ["--iterations", "2", "--num-samples", "1", "--dtype", "bfloat16",
                              "--out", str(tmp_path / "run")])
    m, = loaded
    assert m["unet"].dtype == torch.bfloat16 and m["vae"].dtype == torch.float32
    import safetensors.torch as st
    sd = st.load_file(tmp_path / "run" / "adapters.safetensors")
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_B.weight"))  # it trained
    assert all(v == v for v in metrics.values())  # no NaN


def test_adapter_placement_and_no_gate():
    unet, ad = _unet(gate=False)
    spatial = [p for p, a in ad.items() if a.kind == "spatial"]
    temporal = [p for p, a in ad.items() if a.kind == "temporal"]
    assert len(spatial) == 4 * 6 and len(temporal) == 5 * 10
    assert all(".attentions." in p and ".attn2." not in p for p in spatial)  # no spatial cross-attention
    assert all(".temp_attentions." in p or p.startswith("transformer_in.") for p in temporal)
    assert any(".attn2." in p for p in temporal)
    assert all(a.gate is None for a in ad.values())
    assert not any("gate" in n for n, _ in unet.named_parameters())


def test_adapters_file_round_trip_with_and_without_gate(tmp_path):
    for gate in (True, False):
        unet, _ = _unet(gate=gate)
        args = jt.parse_args(["--model", "toy"] + ([] if gate else ["--no-gate"]))
        jt.save_adapters(unet, tmp_path / "a.safetensors", args)
        torch.manual_seed(0)                                      # the same base weights as _unet's
        fresh = tw.build_backbone("unet3d").eval().requires_grad_(False)
        ad = jt.load_adapters(fresh, tmp_path / "a.safetensors")
        assert len(ad) == 74 and all((a.gate is not None) == gate and not a.training for a in ad.values())
        z, t, text = torch.randn(2, C, 3, 8, 8), torch.tensor([500, 20]), torch.randn(2, 16, 32)
        assert torch.equal(unet(z, t, text).sample, fresh(z, t, text).sample)


@pytest.mark.parametrize("gate", [True, False])
def test_gradients_reach_only_A_B_and_G(gate):
    unet, ad = _unet(gate=gate)
    unet.train()
    params = jt.trainable(ad, False)["video"]
    loss = jt.ait_loss(unet, torch.randn(2, C, 3, 8, 8), torch.randn(2, 16, 32), tw.noise_schedule("unet3d")
                       .alphas_cumprod, torch.Generator().manual_seed(0))
    loss.backward()
    got = {n for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = {n for n, p in unet.named_parameters() if n.endswith(("lora_A.weight", "lora_B.weight", "gate.weight"))}
    assert got == want and len(want) == len(params) == 74 * (3 if gate else 2)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if n not in want)


def test_offset_noise_shapes():
    shape, gen = (2, 4, 3, 5, 6), torch.Generator().manual_seed(0)
    frame = jt.offset_noise("frame", shape, gen)                  # the paper's (1, H, W, 1), per sample
    assert frame.shape == shape
    assert torch.equal(frame, frame[:, :1, :1].expand(shape))    # shared by every frame and channel
    assert frame[0, 0, 0].std() > 0.3 and not torch.equal(frame[0], frame[1])
    pixel = jt.offset_noise("pixel", shape, gen)                  # (F, 1, 1, C): constant over the image
    assert torch.equal(pixel, pixel[..., :1, :1].expand(shape)) and pixel[0, :, :, 0, 0].std() > 0.3
    video = jt.offset_noise("video", shape, gen)                  # (F, H, W, C): independent everywhere
    assert video.shape == shape and video.std() > 0.8 and not torch.equal(video[:, :, 0], video[:, :, 1])
    assert torch.equal(jt.offset_noise("none", shape, gen), torch.zeros(shape))


class Recorder(torch.nn.Module):
    """A stand-in denoiser that predicts zero and remembers its input."""
    dtype = torch.float32

    def forward(self, z, t, encoder_hidden_states=None, return_dict=False):
        self.z, self.t = z, t
        return (torch.zeros_like(z),)


def test_ait_loss_by_hand_noises_with_eps_and_shifts_only_the_target():
    ac = tw.noise_schedule("unet3d").alphas_cumprod
    z0 = torch.randn(2, 4, 3, 5, 6)
    rec = Recorder()
    loss = jt.ait_loss(rec, z0, torch.zeros(2, 1, 1), ac, torch.Generator().manual_seed(7), "frame", 10.0)
    g = torch.Generator().manual_seed(7)                          # the same draws, in the same order
    eps = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    off = torch.randn(2, 1, 1, 5, 6, generator=g)
    ab = ac[t].view(2, 1, 1, 1, 1)
    assert torch.equal(rec.t, t)
    assert torch.allclose(rec.z, ab.sqrt() * z0 + (1 - ab).sqrt() * eps, atol=1e-6)   # no eps' in z_t
    assert torch.allclose(loss, 10 * ((eps + off) ** 2).mean())  # (eps + eps') - 0, times lambda


def test_ofs_runs_the_unet_on_exactly_one_frame():
    unet, _ = _unet()
    seen = []
    unet.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape), with_kwargs=True)
    z0 = jt.pseudo_video(torch.randn(2, C, 1, 8, 8), 9)
    assert z0.shape == (2, C, 9, 8, 8) and torch.equal(z0[:, :, 0], z0[:, :, 8])
    jt.ofs_loss(unet, z0, torch.randn(2, 16, 32), tw.noise_schedule("unet3d").alphas_cumprod,
                torch.Generator().manual_seed(0))
    assert seen == [(2, C, 1, 8, 8)]
    rec = Recorder()                                              # and the target is that frame's noise
    ac = tw.noise_schedule("unet3d").alphas_cumprod
    loss = jt.ofs_loss(rec, z0, torch.zeros(2, 1, 1), ac, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    eps, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (2,), generator=g)
    f = int(torch.randint(9, (1,), generator=g))
    assert torch.allclose(loss, (eps[:, :, f] ** 2).mean())


def _train_calls(tmp_path, flags, iterations):
    """Run the training loop on the random toy UNet; record (frames, spatial adapters on) per UNet call."""
    unet, ad = _unet(scale=0.0)
    args = jt.parse_args(["--model", "toy", "--iterations", str(iterations), "--batch", "1"] + flags)
    calls = []
    spatial = next(a for a in ad.values() if a.kind == "spatial")
    unet.register_forward_pre_hook(lambda m, a, k: calls.append((a[0].shape[2], spatial.enabled)), with_kwargs=True)
    before = {k: v.clone() for k, v in jt.adapter_state(unet).items()}
    lat = dict(image=torch.randn(2, 3, C, 1, 8, 8), video=torch.randn(1, C, 9, 8, 8))
    text = dict(subject=torch.randn(1, 16, 32), motion=torch.randn(1, 16, 32))
    jt.train(unet, tw.noise_schedule("unet3d").alphas_cumprod, ad, lat, text, args, {}, tmp_path)
    after = jt.adapter_state(unet)
    changed = {ad[k.rsplit(".", 2)[0]].kind for k in after if not torch.equal(after[k], before[k])}
    return calls, changed, ad


def test_joint_training_runs_epochs_of_photos_then_clips_and_updates_one_shared_set(tmp_path):
    calls, changed, ad = _train_calls(tmp_path, [], 5)           # 3 photos, 1 clip, batch 1: the code's loader
    assert calls == [(1, True), (1, True), (1, True), (9, True), (1, True)]
    assert changed == {"spatial", "temporal"}
    _, changed, _ = _train_calls(tmp_path, [], 1)                 # one image step reaches the temporal set too
    assert changed == {"spatial", "temporal"}


def test_separate_lora_trains_spatial_on_images_and_temporal_on_videos(tmp_path):
    _, changed, _ = _train_calls(tmp_path, ["--separate-lora"], 1)
    assert changed == {"spatial"}
    calls, changed, ad = _train_calls(tmp_path, ["--separate-lora"], 4)
    assert calls == [(1, True)] * 3 + [(9, True)] and changed == {"spatial", "temporal"}  # joint: kappa sees delta
    groups = jt.trainable(ad, True)
    assert {id(p) for p in groups["image"]} == {id(p) for a in ad.values() if a.kind == "spatial"
                                                for p in (a.lora_A.weight, a.lora_B.weight, a.gate.weight)}


def test_two_stage_runs_images_first_and_algorithm_2_without_the_spatial_set(tmp_path):
    assert [jt.is_image_step(s, 4, 1, 5, True) for s in range(5)] == [True, True, True, True, False]  # joint's ratio
    assert [jt.is_image_step(s, 1, 1, 4, True) for s in range(4)] == [True, True, False, False]
    assert [jt.is_image_step(s, 4, 1, 10, False) for s in range(10)] == ([True] * 4 + [False]) * 2
    assert [jt.is_image_step(s, 1, 1, 4, False) for s in range(4)] == [True, False, True, False]
    calls, _, ad = _train_calls(tmp_path, ["--two-stage"], 8)     # 3 photos, 1 clip: 6 image steps, 2 video steps
    assert calls == [(1, True)] * 6 + [(9, True)] * 2              # one shared set: nothing to switch off
    calls, _, ad = _train_calls(tmp_path, ["--two-stage", "--separate-lora"], 8)
    assert calls == [(1, True)] * 6 + [(9, False)] * 2
    assert all(a.enabled for a in ad.values())                   # both sets act at inference


def test_our_ddim_loop_equals_text_to_video_pipeline():
    from diffusers import TextToVideoSDPipeline
    unet, _ = _unet()                                             # acting adapters: gates in a guidance batch
    sched = tw.noise_schedule("unet3d")
    pipe = TextToVideoSDPipeline(vae=tw.load_vae(), text_encoder=tw.text_encoder("clip"),
                                 tokenizer=tw.tokenizer("clip"), unet=unet, scheduler=copy.deepcopy(sched))
    pipe.set_progress_bar_config(disable=True)
    text, uncond = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    noise = torch.randn(1, C, 9, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=32, width=32, num_frames=9,
               num_inference_steps=4, guidance_scale=4.0, latents=noise.clone(), output_type="latent").frames
    ours = jt.sample(unet, sched, text, uncond, noise.clone(), 4, 4.0)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_toy_end_to_end_writes_everything_and_sample_only_reuses_it(tmp_path):
    out = tmp_path / "run"
    metrics = jt.main(FAST + ["--out", str(out)])
    for name in ("adapters.safetensors", "config.json", "log.jsonl", "result.mp4", "result_grid.mp4",
                 "metrics.json", "result/000.png", "result/008.png"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"identity", "motion", "leakage", "dynamics", "noise"}
    assert json.loads((out / "config.json").read_text())["height"] == 32  # the toy preset was applied
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]
    import safetensors.torch as st
    sd = st.load_file(out / "adapters.safetensors")
    assert len(sd) == 74 * 3 and all(k.endswith(("lora_A.weight", "lora_B.weight", "gate.weight")) for k in sd)
    width = tw.FAMILIES["unet3d"]["config"]["block_out_channels"][0]  # the first block's attention is this wide
    assert sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (32, width)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_B.weight"))  # it trained
    again = jt.main(FAST + ["--out", str(out), "--sample-only"])
    assert again == metrics                                       # same adapters, same seed: the same clip
    fresh = tw.build_backbone("unet3d").requires_grad_(False)
    jt.load_adapters(fresh, out / "adapters.safetensors")
    assert all(torch.equal(v, jt.adapter_state(fresh)[k]) for k, v in sd.items())


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = FAST + ["--iterations", "4", "--save-every", "1"]
    jt.main(args + ["--out", str(tmp_path / "a")])
    # interrupted: a run of 2 iterations leaves its checkpoint at step 1
    jt.main(args[:-4] + ["--iterations", "2", "--save-every", "1", "--out", str(tmp_path / "b")])
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert state["step"] == 1
    calls = []
    for name in ("ofs_loss", "ait_loss"):                        # count the steps the resumed run trains
        fn = getattr(jt, name)
        monkeypatch.setattr(jt, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    jt.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert calls == ["ofs_loss", "ait_loss", "ofs_loss"]          # steps 1, 2, 3 (epochs: 2 photo, 1 clip step)
    import safetensors.torch as st
    a = st.load_file(tmp_path / "a" / "adapters.safetensors")
    b = st.load_file(tmp_path / "b" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "b" / "metrics.json").read_text())


def test_samples_are_written_during_training_without_changing_it(tmp_path):
    """--sample-every k: out/samples/step_k.mp4 from fixed noise; the training is the same as without previews (the
    preview runs without LoRA dropout, and training gets it back)."""
    import safetensors.torch as st
    jt.main(FAST + ["--out", str(tmp_path / "a"), "--sample-every", "2", "--num-samples", "1"])
    jt.main(FAST + ["--out", str(tmp_path / "b"), "--sample-every", "0", "--num-samples", "1"])
    assert sorted(q.name for q in (tmp_path / "a" / "samples").iterdir()) == ["step_000002.mp4", "step_000004.mp4"]
    assert not (tmp_path / "b" / "samples").exists()
    a, b = (st.load_file(tmp_path / r / "adapters.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_end_with_one_line_before_any_model_loads(tmp_path, capsys):
    subj, mot = tw.ASSETS / "toy" / "subject", tw.ASSETS / "toy" / "motion"
    empty = tmp_path / "empty"
    empty.mkdir()
    toy = ["--model", "toy"]
    assert "is not a folder" in error_line(jt, toy + ["--subject", str(tmp_path / "nope")], capsys)
    assert "has no image" in error_line(jt, toy + ["--subject", str(empty)], capsys)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    assert "cannot read image" in error_line(jt, toy + ["--subject", str(junk)], capsys)
    assert "does not exist" in error_line(jt, toy + ["--motion", str(tmp_path / "no.mp4")], capsys)
    assert "holds neither frames" in error_line(jt, toy + ["--motion", str(empty)], capsys)
    short = tmp_path / "short"
    common.write_frames(short, tw.motion_clip()[:5])
    assert "has 5 frames, 9 are needed" in error_line(jt, toy + ["--motion", str(short)], capsys)
    sks = toy + ["--placeholder", "sks"]
    assert "does not contain the placeholder" in error_line(jt, sks + ["--prompt", "a star moving"], capsys)
    real = ["--subject", str(subj), "--motion", str(mot), "--frames", "9", "--model", str(tmp_path / "no")]
    assert "--prompt is needed for a real model" in error_line(jt, real, capsys)
    real += ["--prompt", "a sks star moving in a zigzag"]
    assert "neither a local folder nor in the hub cache" in error_line(jt, real, capsys)
    assert "does not exist; train first" in error_line(jt, toy + ["--sample-only", "--out", str(empty)], capsys)
    assert "no checkpoint" in error_line(jt, toy + ["--resume", "--out", str(empty)], capsys)
    assert "use it with --model toy" in error_line(jt, real + ["--ablate"], capsys)
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.mp4").write_bytes(b"earlier")
    error_line(jt, toy + ["--placeholder", "sks", "--prompt", "no placeholder", "--out", str(out)], capsys)
    assert (out / "result.mp4").read_bytes() == b"earlier" and len(list(out.iterdir())) == 1


def test_a_folder_of_clips_of_other_sizes_and_lengths_is_resampled(tmp_path, capsys):
    clips = tmp_path / "clips"
    big = torch.nn.functional.interpolate(tw.motion_clip(), size=(48, 64))
    common.write_frames(clips / "a", torch.cat([big, big]))      # 18 frames of 48x64
    common.write_frames(clips / "b", tw.motion_clip(seed=1))     # 9 frames of 32x32
    common.write_video(clips / "c.gif", tw.motion_clip(seed=2))
    (clips / "caption.txt").write_text(tw.motion_caption())  # the toy prompt is written from its words
    assert jt.main(["--model", "toy", "--motion", str(clips), "--dry-run", "--out", str(tmp_path / "out")]) is None
    assert "3 clip(s)" in capsys.readouterr().out
    args = jt.parse_args(["--model", "toy", "--motion", str(clips)])
    _, videos, _, _ = jt.read_inputs(args)
    assert videos.shape == (3, 9, 3, 32, 32)


def test_dry_run_loads_nothing(tmp_path, capsys):
    assert jt.main(["--model", "toy", "--dry-run", "--out", str(tmp_path)]) is None
    out = capsys.readouterr().out
    assert "'a star moving in a zigzag" in out and "DDIM 20 steps" in out and "Loading" not in out


def test_the_bundled_task_is_prompted_as_the_paper_does():
    """The photos under 'a star' (code: 'A bear plushie.', no identifier), the video under its own caption, the
    whole clip (supp. B.2: BLIP-2's), and the sampling prompt, the subject doing the motion in a setting (supp.
    B.1), which the paper writes by hand and the toy world writes from its words."""
    _, _, prompts, _ = jt.read_inputs(jt.parse_args(["--model", "toy"]))
    assert prompts == dict(subject="a star", motion="a blue striped square moving in a zigzag on a gray background",
                           sample="a star moving in a zigzag on a gray background")
    _, _, prompts, _ = jt.read_inputs(jt.parse_args(["--model", "toy", "--placeholder", "sks"]))
    assert prompts["subject"] == "a sks star"
    assert prompts["sample"] == "a sks star moving in a zigzag on a gray background"


def test_the_real_loading_path_at_tiny_size(tmp_path):
    """The same load_models the real run uses, on a tiny ZeroScope-like pipeline saved as a local folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    torch.manual_seed(0)
    cfg = dict(tw.FAMILIES["unet3d"]["config"], in_channels=4, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.18215)
    TextToVideoSDPipeline(vae=vae, text_encoder=tw.text_encoder("clip"), tokenizer=tw.tokenizer("clip"),
                          unet=UNet3DConditionModel(**cfg),
                          scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
                          ).save_pretrained(tmp_path / "zeroscope")
    args = jt.parse_args(["--model", str(tmp_path / "zeroscope"), "--max-text-len", "16"])
    m = jt.load_models(args, torch.device("cpu"), torch.float32)
    assert type(m["unet"]) is UNet3DConditionModel and type(m["vae"]) is AutoencoderKL
    assert type(m["scheduler"]) is DDIMScheduler and m["scheduler"].config.steps_offset == 1
    video = torch.rand(1, 3, 3, 16, 16) * 2 - 1
    lat = jt.encode_frames(m["vae"], video)
    assert lat.shape == (1, 4, 3, 8, 8)
    frame = m["vae"].encode(video[0, 1:2]).latent_dist.mode() * 0.18215  # frames are encoded one by one
    assert torch.allclose(lat[:, :, 1], frame, atol=1e-5)
    ad = jt.add_adapters(m["unet"], 4, 0.1, True)
    assert len(ad) == 74
    text = common.encode_prompts(m["tokenizer"], m["text_encoder"], ["a sks star", ""], 16)
    loss = jt.ait_loss(m["unet"], lat, text[:1], m["scheduler"].alphas_cumprod, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    z = jt.sample(m["unet"], m["scheduler"], text[:1], text[1:], torch.randn(1, 4, 3, 8, 8), 2, 12.0)
    assert jt.decode_frames(m["vae"], z).shape == (1, 3, 3, 16, 16)
    # and the whole real run through main, train then sample-only
    run = ["--model", str(tmp_path / "zeroscope"), "--subject", str(tw.ASSETS / "toy" / "subject"), "--motion",
           str(tw.ASSETS / "toy" / "motion"), "--height", "16", "--width", "16", "--frames", "3", "--max-text-len",
           "16", "--iterations", "2", "--steps", "2", "--prompt", "a sks star moving", "--out", str(tmp_path / "run")]
    assert jt.main(run) is None
    assert (tmp_path / "run" / "result" / "002.png").is_file() and (tmp_path / "run" / "result_grid.mp4").is_file()
    first = common.read_video(tmp_path / "run" / "result", 3)
    jt.main(run + ["--sample-only"])
    assert torch.equal(common.read_video(tmp_path / "run" / "result", 3), first)


def test_every_ablation_row_is_a_valid_cumulative_flag_set():
    assert list(jt.ABLATIONS) == ["base", "Noise-Frame (full)", "Noise-Pixel", "Noise-Video", "-Offset Noise",
                                  "-LoRA Gating", "-LoRA Union", "-Joint Training"]
    base = vars(jt.parse_args(["--model", "toy"]))
    rows = {name: vars(jt.parse_args(["--model", "toy"] + flags)) for name, flags in jt.ABLATIONS.items()}
    assert rows["Noise-Frame (full)"] == base and rows["base"]["iterations"] == 0
    assert rows["Noise-Pixel"]["offset_noise"] == "pixel" and rows["Noise-Video"]["offset_noise"] == "video"
    removed = ["-Offset Noise", "-LoRA Gating", "-LoRA Union", "-Joint Training"]
    for prev, name in zip(removed, removed[1:]):                  # each row keeps every earlier removal
        assert set(jt.ABLATIONS[prev]) <= set(jt.ABLATIONS[name]) and rows[prev] != rows[name]
    last = rows["-Joint Training"]
    assert (last["offset_noise"], last["no_gate"], last["separate_lora"], last["two_stage"]) == \
        ("none", True, True, True)
    assert len({tw.slug(n) for n in jt.ABLATIONS}) == len(jt.ABLATIONS)
    assert tw.slug("-LoRA Gating") == "no_lora_gating" and tw.slug("Noise-Frame (full)") == "noise_frame"


def test_ablate_runs_every_row_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # results/ and out/ land here, not in the repo
    rows = jt.main(["--model", "toy", "--ablate", "--seeds", "1", "--iterations", "2", "--steps", "2"])
    assert list(rows) == list(jt.ABLATIONS)
    for name in jt.ABLATIONS:
        assert (tmp_path / "results" / "jointtuner" / tw.slug(name) / "seed0" / "metrics.json").is_file(), name
    table = (tmp_path / "out" / "jointtuner" / "ablations" / "table.md").read_text()
    assert table.count("\n| ") == len(jt.ABLATIONS) + 1 and "| -Joint Training | " in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out/jointtuner/ablations/no_joint_training/seed0/config.json").read_text())
    assert (cfg["offset_noise"], cfg["no_gate"], cfg["separate_lora"], cfg["two_stage"]) == ("none", True, True, True)


RUN = ("config.json", "ckpt.pt", "log.jsonl", "metrics.json", "result.mp4", "result/000.png",  # what a run leaves
       "adapters.safetensors")


BAD_FLAGS = {  # flags -> the words the one-line error must hold
    "iterations -5": (["--iterations=-5"], "--iterations must be >= 0"),
    "steps 0": (["--steps", "0"], "--steps must be >= 1"),
    "steps -1": (["--steps=-1"], "--steps must be >= 1"),
    "num-samples 0": (["--num-samples", "0"], "--num-samples must be >= 1"),
    "lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "lr inf": (["--lr", "inf"], "--lr must be a finite number"),
    "lr 0": (["--lr", "0"], "--lr must be a finite number > 0"),
    "lr negative": (["--lr=-1e-3"], "--lr must be a finite number > 0"),
    "rank 0": (["--rank", "0"], "--rank must be >= 1"),
    "rank -4": (["--rank=-4"], "--rank must be >= 1"),
    "batch 0": (["--batch", "0"], "--batch must be >= 1"),
    "seed -1": (["--seed=-1"], "--seed must be between"),
    "seed 2^32": (["--seed", str(2 ** 32)], "--seed must be between"),
    "hflip 1.5": (["--hflip", "1.5"], "--hflip must be between 0 and 1"),
    "hflip -0.1": (["--hflip=-0.1"], "--hflip must be between 0 and 1"),
    "dropout 2": (["--dropout", "2"], "--dropout must be between 0 and 1"),
    "dropout nan": (["--dropout", "nan"], "--dropout must be a finite number"),
    "weight decay -1": (["--weight-decay=-1"], "--weight-decay must be >= 0"),
    "lambda 0": (["--ait-lambda", "0"], "--ait-lambda must be a finite number > 0"),
    "lambda inf": (["--ait-lambda", "inf"], "--ait-lambda must be a finite number"),
    "cfg -1": (["--cfg=-1"], "--cfg must be >= 0"),
    "cfg nan": (["--cfg", "nan"], "--cfg must be a finite number"),
    "frames 1": (["--frames", "1"], "--frames 1: a motion needs 2 or more frames"),
    "frames 0": (["--frames", "0"], "--frames 0: a motion needs 2 or more frames"),
    "height 30": (["--height", "30"], "--height 30 --width 32: use multiples of 8"),
    "width 0": (["--width", "0"], "--height 32 --width 0: use multiples of 8"),
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
    "blank placeholder": (["--placeholder", " "], "--placeholder ' ' must be one word"),
    "two-word placeholder": (["--placeholder", "s k"], "--placeholder 's k' must be one word"),
    "prompt without placeholder": (["--placeholder", "sks", "--prompt", "a star moving"],
                                   "does not contain the placeholder"),
    "toy caption without motion words": (["--motion-caption", "a blue square"], "names no toy motion and background"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_cost_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad flag: exit code 2, one line naming it, no model loaded, the earlier run in --out unchanged (even with
    --overwrite, which clears it only once the inputs have passed)."""
    checksum = earlier_run(tmp_path / "out", RUN)
    flags, words = BAD_FLAGS[case]
    argv = ["--model", "toy", "--out", str(tmp_path / "out"), "--overwrite"] + flags
    check_bad_input(jt, argv, words, checksum, capsys, monkeypatch)


def _gif(t, frames, caption=None):
    """A gif of the toy motion's first frames, with a caption file beside it when one is given."""
    common.write_video(t / "clip.gif", tw.motion_clip()[:frames])
    if caption is not None:
        (t / "clip.txt").write_text(caption)
    return str(t / "clip.gif")


# a toy run's training state as save_state writes it: rank 32, gated
STATE = dict(step=2, adapters={"a.lora_A.weight": torch.zeros(32, 8), "a.gate.weight": torch.zeros(1, 8)}, opt={},
             gen=None, rng=None)


def _adapters(out, method):
    """out/adapters.safetensors replaced by a valid file whose metadata names `method`."""
    from safetensors.torch import save_file
    save_file({"a.lora_A.weight": torch.zeros(32, 8)}, str(out / "adapters.safetensors"), metadata={"method": method})
    return ["--sample-only"]


REAL = ["--subject", str(SUBJ), "--motion", str(MOT), "--frames", "9", "--height", "32", "--width", "32"]
PROMPT = ["--prompt", "a sks star moving"]

BAD_FILES = {  # (tmp folder, --out) -> flags, and the words the one-line error must hold
    "out holds a run": (lambda t, out: [], "holds an earlier run"),
    "out is a file": (lambda t, out: ["--out", put_file(t, "a_file", b"x")], "is a file, not a folder"),
    "damaged checkpoint": (lambda t, out: ["--resume"], "cannot read the checkpoint"),
    "another method's checkpoint": (lambda t, out: with_ckpt(out, dict(stage="subject", step=2, lora={})),
                                    "holds no JointTuner training state"),
    "checkpoint of another rank": (lambda t, out: with_ckpt(out, STATE) + ["--rank", "16"],
                                   "was trained with --rank 32"),
    "checkpoint with gates resumed with --no-gate": (lambda t, out: with_ckpt(out, STATE) + ["--no-gate"],
                                                     "was trained without --no-gate"),
    "damaged adapters": (lambda t, out: ["--sample-only"], "out/adapters.safetensors ("),
    "another method's adapters": (lambda t, out: _adapters(out, "dualreal"), "holds no JointTuner adapters"),
    "no adapters": (lambda t, out: ["--sample-only", "--out", empty_dir(t)], "does not exist; train first"),
    "no subject folder": (lambda t, out: ["--subject", str(t / "nope")], "is not a folder"),
    "subject is a file": (lambda t, out: ["--subject", put_file(t, "a.png", png(32, 32))], "is not a folder"),
    "no photos": (lambda t, out: ["--subject", empty_dir(t)], "has no image"),
    "junk photo": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"0.png": b"not a png"})], "cannot read image"),
    "truncated photo": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"1.png": (SUBJ / "1.png").read_bytes()[:60]})],
                        "cannot read image"),
    "empty prompt.txt": (lambda t, out: ["--subject", copy_of(t, SUBJ, {"prompt.txt": b"\n"})], "prompt.txt is empty"),
    "empty caption.txt": (lambda t, out: ["--motion", copy_of(t, MOT, {"caption.txt": b" "})], "caption.txt is empty"),
    "empty caption beside a video": (lambda t, out: ["--motion", _gif(t, 9, caption="")], "clip.txt is empty"),
    "no motion": (lambda t, out: ["--motion", str(t / "no.mp4")], "does not exist"),
    "empty motion folder": (lambda t, out: ["--motion", empty_dir(t)], "holds neither frames nor video files"),
    "corrupt video": (lambda t, out: ["--motion", put_file(t, "clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)],
                      "cannot read video"),
    "short clip": (lambda t, out: ["--motion", copy_of(t, MOT, {f"00{i}.png": None for i in range(5, 9)})],
                   "has 5 frames, 9 are needed"),
    "short video": (lambda t, out: ["--motion", _gif(t, 4)], "has 4 frames, 9 are needed"),
    "real model without a prompt": (lambda t, out: REAL + ["--model", empty_dir(t)],
                                    "--prompt is needed for a real model"),
    "model folder without model_index.json": (lambda t, out: REAL + PROMPT + ["--model", empty_dir(t)],
                                              "holds no model_index.json"),
    "model nowhere": (lambda t, out: REAL + PROMPT + ["--model", str(t / "no-model")],
                      "neither a local folder nor in the hub cache"),
    "ablate a real model": (lambda t, out: REAL + PROMPT + ["--model", str(t / "no"), "--ablate"],
                            "use it with --model toy"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_cost_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad path or file: exit code 2, one short line naming it, before any model loads, and the earlier run in
    --out as it was."""
    out = tmp_path / "out"
    checksum = earlier_run(out, RUN)
    flags, words = BAD_FILES[case]
    check_bad_input(jt, ["--model", "toy", "--out", str(out)] + flags(tmp_path, out), words, checksum, capsys,
                    monkeypatch)
