import argparse
import json
from pathlib import Path

import pytest
import torch

import common
import toyworld as tw


def test_renderer_is_deterministic_and_in_range():
    concepts = tw.random_concepts(6, torch.Generator().manual_seed(3))
    a = tw.render(concepts, torch.Generator().manual_seed(1))
    b = tw.render(concepts, torch.Generator().manual_seed(1))
    c = tw.render(concepts, torch.Generator().manual_seed(2))
    assert a.shape == (6, 9, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_pretraining_data_never_shows_novel_concepts_or_placeholders():
    gen = torch.Generator().manual_seed(0)
    concepts = tw.random_concepts(3000, gen)
    novel = set(tw.NOVEL_SHAPES) | set(tw.NOVEL_PATTERNS) | set(tw.PLACEHOLDERS)
    novel_motion = {tw.MOTION_WORDS[m] for m in tw.NOVEL_MOTIONS}
    for c in concepts:
        assert not tw.is_heldout_combo(c)
        for image in (False, True):
            cap = tw.caption(c, image=image)
            assert not novel & set(cap.split()) and not any(m in cap for m in novel_motion), cap
    # all pretraining words are used, and the held-out combinations exist (about 1/8)
    assert {c["shape"] for c in concepts} == set(tw.PRE_SHAPES)
    assert {c["motion"] for c in concepts} == set(tw.PRE_MOTIONS)
    held = tw.random_concepts(200, gen, heldout=True)
    assert all(tw.is_heldout_combo(c) for c in held)


def test_tokenizer_round_trip_and_placeholders():
    tok = tw.tokenizer("t5")
    cap = "a sks star moving in a zigzag on a white background"
    ids = tok(cap).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == cap
    assert len(tok("<cls> star").input_ids) == 3  # '<cls>' is one token
    assert tok("a zebra").input_ids[1] == tok.unk_token_id
    clip = tw.tokenizer("clip")(cap).input_ids
    assert clip[0] == tok.bos_token_id and clip[1:] == ids
    assert max(len(tok(tw.caption(c)).input_ids) for c in tw.random_concepts(50, torch.Generator())) \
        <= tw.MAX_TOKENS - 1


def test_frame_vae_takes_videos_frame_by_frame_and_images_as_autoencoderkl():
    torch.manual_seed(0)
    vae = tw.FrameVAE(**tw.VAE_CONFIG).eval()
    x = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    dist = vae.encode(x).latent_dist
    z = dist.mode()
    assert z.shape == (2, tw.LATENT_CHANNELS, 5, 8, 8) and dist.logvar.shape == z.shape
    frame = vae.encode(x[:, :, 3]).latent_dist.mode()  # a 4D image goes through AutoencoderKL unchanged
    assert frame.shape == (2, tw.LATENT_CHANNELS, 8, 8) and torch.allclose(z[:, :, 3], frame, atol=1e-5)
    rec = vae.decode(z).sample
    assert rec.shape == x.shape and torch.allclose(rec[:, :, 3], vae.decode(frame).sample, atol=1e-5)


def test_train_vae_resumes_and_exports_a_folder_autoencoderkl_loads(tmp_path):
    from diffusers import AutoencoderKL
    out, ckpt = tmp_path / "vae", tmp_path / "state" / "ckpt.pt"
    flags = ["--batch", "4", "--out", str(out), "--ckpt", str(ckpt), "--log-every", "1", "--save-every", "2"]
    tw.main(["train-vae", "--steps", "2"] + flags)
    tw.main(["train-vae", "--steps", "3", "--resume"] + flags)
    steps = [json.loads(line)["step"] for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the resumed run did only step 3
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    assert (ckpt.parent / "reconstructions.png").is_file()
    plain = AutoencoderKL.from_pretrained(out)  # the real class, with the statistics measured on the data
    assert len(plain.config.latents_mean) == tw.LATENT_CHANNELS and plain.config.scaling_factor != 0.18215
    vae = tw.load_vae(out)
    assert vae.config.scale_factor_temporal == 1 and vae.config.scale_factor_spatial == 4
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), plain.state_dict().values()))


def test_the_shipped_vae_reconstructs_the_bundled_subject_and_motion():
    """Identity of the yellow dotted star and the zigzag's motion survive the trip through the shipped toy VAE."""
    vae = tw.load_vae()
    assert sum(p.stat().st_size for p in tw.vae_path().iterdir()) < 10e6
    r = tw.main(["eval-vae", "--n", "16"])
    assert r["subject_identity"] >= 0.95 and r["zigzag_motion"] >= 0.95 and r["zigzag_identity"] >= 0.95, r
    assert min(r[k] for k in ("colour", "shape", "pattern", "background", "motion")) >= 0.9, r
    for family in tw.FAMILIES:  # each family's normalisation is undone exactly on the way back
        clip = tw.motion_clip()[None]
        z = tw.encode_latents(family, vae, clip)
        direct = vae.decode(vae.encode(clip.transpose(1, 2)).latent_dist.mode()).sample.transpose(1, 2)
        assert torch.allclose(tw.decode_latents(family, vae, z), direct.clamp(-1, 1), atol=1e-4)
        assert 0.3 < float(z.std()) < 3  # about unit variance, as the backbones expect


@pytest.mark.parametrize("family", list(tw.FAMILIES))
def test_backbone_learns_a_fixed_batch_and_samples(family):
    torch.manual_seed(0)
    fam, gen = tw.FAMILIES[family], torch.Generator().manual_seed(0)
    model = tw.build_backbone(family).train()
    tok, enc = tw.tokenizer("clip" if fam["text"] == "clip" else "t5"), tw.text_encoder(fam["text"])
    concepts = tw.random_concepts(4, gen)
    text = common.encode_prompts(tok, enc, [tw.caption(c) for c in concepts], tw.MAX_TOKENS, fam["zero_pad"])
    vae = tw.load_vae()
    z0 = tw.encode_latents(family, vae, tw.render(concepts, gen))
    noise, t = torch.randn(z0.shape, generator=gen), tw.sample_timesteps(family, 4, gen)
    sched = tw.noise_schedule(family)
    z_t, target = common.noisy_and_target(fam["pred"], z0, noise, t, getattr(sched, "alphas_cumprod", None))
    t_in = t * 1000 if fam["pred"] == "flow" else t
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the pretraining default
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(tw.backbone_forward(family, model, z_t, t_in, text), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    model.eval()
    uncond = common.encode_prompts(tok, enc, [""], tw.MAX_TOKENS, fam["zero_pad"])
    video = tw.sample(family, model, vae, text[:2], uncond, steps=3, gen=torch.Generator().manual_seed(0))
    assert video.shape == (2, 9, 3, 32, 32) and torch.isfinite(video).all()


def test_recognition_is_exact_on_rendered_ground_truth():
    gen = torch.Generator().manual_seed(1)
    concepts = [dict(colour=list(tw.COLOURS)[i % 6], shape=tw.SHAPES[i % 7], pattern=tw.PATTERNS[(i // 7) % 4],
                     motion=tw.MOTIONS[(i // 3) % 7], background=list(tw.BACKGROUNDS)[(i // 2) % 4])
                for i in range(56)]
    for c, clip in zip(concepts, tw.render(concepts, gen)):
        assert all(tw.prompt_following(clip, c).values()), c


def test_customization_metrics_on_ground_truth():
    gen = torch.Generator().manual_seed(5)
    images, _ = tw.subject_images()
    ref = tw.motion_clip()
    ideal = tw.render([dict(tw.SUBJECT, motion="zigzag", background="white")], gen)[0]
    m = tw.evaluate(ideal, images, ref)
    # the zigzag moves 1.5 px right and 2.5 px up or down a frame
    assert m["identity"] == 1 and m["motion"] > 0.99 and m["leakage"] == 0 and m["dynamics"] > 2.5
    copy = tw.evaluate(ref, images, ref)  # the motion video itself: all leakage, no identity
    assert copy["identity"] == 0 and copy["leakage"] == 1
    other = tw.render([dict(colour="green", shape="cross", pattern="checkered", motion="zigzag",
                            background="black")], gen)[0]
    assert tw.evaluate(other, images, ref)["identity"] == 0
    static = tw.render([dict(tw.SUBJECT, motion="still", background="white")], gen)[0]
    s = tw.evaluate(static, images, ref)
    assert s["dynamics"] < 0.1 and abs(s["motion"]) < 0.1
    right = tw.render([dict(tw.MOTION_SPRITE, motion="right", background="gray")], gen)[0]
    assert tw.motion_score(tw.centroids(tw.segment(right.flip(0))[1]), tw.centroids(tw.segment(right)[1])) < -0.99


def test_eval_cli_on_lossless_and_mp4_files(tmp_path):
    ideal = tw.render([dict(tw.SUBJECT, motion="zigzag", background="white")], torch.Generator())[0]
    common.write_frames(tmp_path / "ideal", ideal)
    common.write_video(tmp_path / "ideal.mp4", ideal)
    rows = tw.main(["eval", str(tmp_path / "ideal"), str(tmp_path / "ideal.mp4"), "--json", str(tmp_path / "m.json")])
    assert rows[str(tmp_path / "ideal")]["identity"] == 1
    assert json.loads((tmp_path / "m.json").read_text()) == rows


def test_bundled_assets_match_the_code():
    images = [common.read_image(p) for p in common.list_images(tw.ASSETS / "toy" / "subject")]
    assert 3 <= len(images) <= 5 and tw.reference_factors(images) == tw.SUBJECT
    masks = common.list_images(tw.ASSETS / "toy" / "subject" / "masks")
    assert [p.name for p in masks] == [p.name for p in common.list_images(tw.ASSETS / "toy" / "subject")]
    clip = common.read_video(tw.ASSETS / "toy" / "motion", tw.NUM_FRAMES)
    assert (common.to_uint8(clip) == common.to_uint8(tw.motion_clip())).all()
    assert tw.classify_motion(tw.centroids(tw.segment(clip)[1])) == "zigzag"


def test_the_zigzag_turns_slower_than_the_backbones_fastest_sense_of_time():
    """The novel zigzag goes up or down 2.5 px a frame along a triangle wave of period 8 frames (pi/4 radians a
    frame), under the 1 radian a frame of the fastest rotary frequency of time in the toy transformers; a hop every
    frame (pi radians a frame) was learnt by no adapter (results/toyworld/README.md, "the novel zigzag")."""
    traj = tw.trajectory("zigzag", 3, torch.Generator().manual_seed(0))
    assert torch.allclose(traj[..., 0].diff(dim=1), torch.tensor(1.5))  # drifting right
    dy = traj[..., 1].diff(dim=1)
    assert torch.allclose(dy.abs(), torch.tensor(2.5))
    assert (dy.sign() == torch.tensor([1, 1, -1, -1, -1, -1, 1, 1])).all()
    rope = tw.build_backbone("wan").rope  # its time columns come first; at frame 1 each angle is its frequency
    assert torch.arccos(rope.freqs_cos[1, :rope.t_dim].clamp(-1, 1)).max() <= 1 + 1e-6


def test_make_task_writes_a_second_task_the_metrics_read_back(tmp_path):
    """`toyworld.py make-task` renders TASK2 as the bundled task is laid out; its photos and clip are recognised as
    the factors asked for, the clip is a zigzag sharing no factor with the subject, and a rendered video of the
    subject doing the clip's motion scores full identity and motion with no leakage."""
    tw.main(["make-task", str(tmp_path)])
    images = [common.read_image(p) for p in common.list_images(tmp_path / "subject")]
    assert tw.reference_factors(images) == tw.TASK2["subject"] != tw.SUBJECT
    clip = common.read_video(tmp_path / "motion", tw.NUM_FRAMES)
    assert tw.classify_motion(tw.centroids(tw.segment(clip)[1])) == "zigzag"
    seen = tw.reference_factors([clip])
    assert all(seen[k] == tw.TASK2["clip"][k] != tw.TASK2["subject"][k] for k in tw.FACTORS)
    assert common.read_text(tmp_path / "motion" / "caption.txt", None) == tw.caption(tw.TASK2["clip"])
    assert common.read_text(tmp_path / "subject" / "prompt.txt", None) == "ring"
    assert len(common.list_images(tmp_path / "subject" / "masks")) == len(images)
    ring = dict(tw.TASK2["subject"], motion="zigzag", background="white")
    video = tw.render([ring], torch.Generator().manual_seed(1))[0]
    m = tw.evaluate(video, torch.stack(images), clip)
    assert m["identity"] == 1 and m["leakage"] == 0 and m["motion"] > 0.99


def test_bundled_motion_caption_names_the_whole_clip_in_the_worlds_words():
    """caption.txt says what the frames show (sprite, background and motion, recognised from the pixels), as the
    papers caption their reference videos; the subject's prompt.txt is its class word; --model toy writes its
    sampling prompt from the caption's motion and background words."""
    clip = common.read_video(tw.ASSETS / "toy" / "motion", tw.NUM_FRAMES)
    seen = dict(tw.reference_factors([clip]), background=tw.recognise(clip)[0]["background"],
                motion=tw.classify_motion(tw.centroids(tw.segment(clip)[1])))
    text = common.read_text(tw.ASSETS / "toy" / "motion" / "caption.txt", None)
    assert text == tw.caption(seen) == tw.motion_caption() == "a blue striped square moving in a zigzag on a gray " \
                                                              "background"
    assert common.read_text(tw.ASSETS / "toy" / "subject" / "prompt.txt", None) == tw.SUBJECT["shape"] == "star"
    ids = tw.tokenizer("t5")(text).input_ids
    assert tw.tokenizer("t5").unk_token_id not in ids and len(ids) <= tw.MAX_TOKENS
    assert tw.sample_prompt("a sks star", text) == "a sks star moving in a zigzag on a gray background"
    assert tw.sample_prompt("a star", "moving in a circle on a white background") == \
        "a star moving in a circle on a white background"
    for unnamed in ("a blue striped square on a gray background", "a blue square moving in a zigzag"):
        with pytest.raises(common.InputError, match="names no toy motion and background"):
            tw.sample_prompt("a sks star", unnamed)

def test_shipped_encoders_load_and_are_frozen():
    for kind in ("umt5", "t5", "clip"):
        enc = tw.text_encoder(kind)
        assert not any(p.requires_grad for p in enc.parameters())
    dino = tw.image_encoder("dinov2")
    out = dino(torch.zeros(1, 3, 32, 32)).last_hidden_state
    assert out.shape == (1, 1 + 64, 32)  # CLS + an 8x8 patch grid, the toy latent grid
    assert tw.image_encoder("clip_vision")(torch.zeros(1, 3, 32, 32)).image_embeds.shape == (1, 32)


def test_pretrain_runs_resumes_and_exports(tmp_path, monkeypatch):
    out, ckpt = tmp_path / "wan.safetensors", tmp_path / "ckpt.pt"
    base = ["pretrain", "--family", "wan", "--batch", "4", "--out", str(out), "--ckpt", str(ckpt),
            "--log-every", "1", "--save-every", "2", "--image-every", "2"]
    tw.main(base + ["--steps", "4"])
    straight = tw.load_backbone("wan", out).state_dict()
    tw.main(base + ["--steps", "2"])
    ran, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: ran.append(1) or step(self, *a, **k))
    tw.main(base + ["--steps", "4", "--resume"])
    assert len(ran) == 2  # the resumed run did only steps 3 and 4 (from scratch, the same weights in 4 steps)
    resumed = tw.load_backbone("wan", out).state_dict()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "4" and meta["samples_seen"] == "16" and json.loads(meta["config"])["num_layers"] == 4
    assert meta["vae"] == tw.vae_fingerprint()  # it was trained in the toy VAE's latents and says so


def test_a_backbone_of_another_vaes_latents_is_not_resumed(tmp_path):
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    model = tw.build_backbone("wan")
    save_file(model.state_dict(), str(other), metadata=dict(family="wan", config=json.dumps(model.config),
                                                            steps="1", samples_seen="1", vae="0123456789abcdef"))
    with pytest.raises(common.InputError, match="pretrained in another VAE's latents"):
        tw.main(["pretrain", "--family", "wan", "--steps", "2", "--resume", "--out", str(other),
                 "--ckpt", str(tmp_path / "none.pt")])


def test_pretrain_config_override_is_kept_through_resume_and_export(tmp_path):
    """--config builds a different (here wider) backbone; resuming and loading rebuild it from what was stored."""
    out, ckpt = tmp_path / "wan.safetensors", tmp_path / "ckpt.pt"
    base = ["pretrain", "--family", "wan", "--batch", "2", "--out", str(out), "--ckpt", str(ckpt), "--save-every", "1"]
    tw.main(base + ["--steps", "1", "--config", '{"num_attention_heads": 3, "ffn_dim": 96}'])
    tw.main(base + ["--steps", "2", "--resume"])  # no --config: the checkpoint's own
    model = tw.load_backbone("wan", out)
    assert model.config.num_attention_heads == 3 and model.config.ffn_dim == 96
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    tw.main(base + ["--steps", "3", "--resume", "--ckpt", str(tmp_path / "none.pt")])  # from the exported file
    assert tw.load_backbone("wan", out).config.num_attention_heads == 3


def test_missing_backbone_is_a_warning_or_a_clear_error(tmp_path, capsys):
    model = tw.load_backbone("cogvideox", tmp_path / "none.safetensors")
    assert "randomly initialised" in capsys.readouterr().out and isinstance(model, torch.nn.Module)
    with pytest.raises(common.InputError, match="no pretrained toy backbone at"):
        tw.load_backbone("cogvideox", tmp_path / "none.safetensors", require=True)


def test_noise_is_not_a_sprite():
    """A frame of coloured noise (what a broken adapter draws) fits no sprite template: it scores as no sprite,
    not as the dotted subject (noise looks dotted to the pattern matcher)."""
    gen = torch.Generator().manual_seed(0)
    gray = torch.zeros(9, 3, tw.SIZE, tw.SIZE)
    speckle = (torch.rand(9, 1, tw.SIZE, tw.SIZE, generator=gen) < 0.3).float()
    yellow = torch.tensor([1.0, 1.0, -1.0])[:, None, None]
    noisy = gray * (1 - speckle) + yellow * speckle + 0.2 * torch.randn(9, 3, tw.SIZE, tw.SIZE, generator=gen)
    assert tw.recognise(noisy.clamp(-1, 1)) == [None] * 9
    images, _ = tw.subject_images()
    assert tw.evaluate(noisy.clamp(-1, 1), list(images), tw.motion_clip())["identity"] == 0.0


def test_background_noise_is_zero_on_a_render_and_grows_with_added_noise():
    gen = torch.Generator().manual_seed(0)
    clean = tw.render([dict(tw.SUBJECT, motion="zigzag", background="beige")], gen)[0]
    assert tw.background_noise(clean) < 1e-6
    levels = [tw.background_noise((clean + s * torch.randn(clean.shape, generator=gen)).clamp(-1, 1))
              for s in (0.05, 0.2, 0.5)]
    assert levels[0] > 0.01 and levels[0] < levels[1] < levels[2]
    # gaussian noise of std s in [-1, 1] units: per channel s / 2 in [0, 1] units, distance ~ sqrt(3) s / 2
    assert abs(levels[1] - 3 ** 0.5 * 0.2 / 2) < 0.03


# The v2 toy UNet3D has had 35k samples (colour 0.23, background 0.41 on 64 prompts): not yet (issue 19). Strict: the
# test fails once it passes, so the mark goes when the UNet3D has learned; a load error is not an expected failure.
YOUNG = pytest.mark.xfail(strict=True, raises=AssertionError, reason="the v2 toy UNet3D is still being pretrained")


@pytest.mark.parametrize("family", [f if f != "unet3d" else pytest.param(f, marks=YOUNG) for f in tw.FAMILIES])
def test_shipped_backbone_loads_and_follows_prompts_loosely(family, tmp_path):
    """The committed checkpoint loads (config and pretraining record in its metadata) and, on 8 held-out prompts
    sampled in 8 steps, draws the asked-for background and mostly the asked-for colour; prompted with the nearest
    familiar words it does not already draw the novel subject (the methods must have something to learn)."""
    from safetensors import safe_open
    with safe_open(str(tw.backbone_path(family)), "pt") as f:
        meta = f.metadata()
    assert meta["family"] == family and int(meta["steps"]) > 0 and int(meta["samples_seen"]) > 0
    assert tw.backbone_path(family).stat().st_size < 10e6
    r = tw.main(["eval-base", "--family", family, "--n", "8", "--n-novel", "4", "--steps", "8", "--batch", "12",
                 "--json", str(tmp_path / "r.json")])
    assert r["background"] >= 0.75 and r["colour"] >= 0.5, r
    assert r["novel_identity"] < 0.67, r  # at most the colour of the yellow dotted star, not its shape and pattern


def test_eval_base_on_single_frames_scores_appearance_only(tmp_path):
    """--frames 1 samples still images with the pretraining's image captions: no motion key, no novel-motion
    samples, and the shipped backbone still draws the asked-for background (it was pretrained on single frames too)."""
    r = tw.main(["eval-base", "--family", "cogvideox", "--frames", "1", "--n", "8", "--steps", "8",
                 "--gif", str(tmp_path / "b.gif")])
    assert set(r) == {"colour", "shape", "pattern", "background"}, r
    assert r["background"] >= 0.75, r


def test_shapes_are_recognised_on_blurred_and_noisy_stills():
    """A sample need not be pixel-perfect for its shape to count: on 64 rendered stills blurred (gaussian, sigma
    0.8) or with gaussian noise of std 0.2 added, most shapes are still recognised (0.83 and 0.86 at this seed)."""
    import torchvision.transforms.functional as TF
    gen = torch.Generator().manual_seed(0)
    concepts = [dict(c, motion="still") for c in tw.random_concepts(64, gen, heldout=True)]
    stills = tw.render(concepts, gen, frames=1)
    for degrade in (lambda x: TF.gaussian_blur(x, 3, 0.8),
                    lambda x: (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)):
        hits = [tw.prompt_following(degrade(x), c)["shape"] for x, c in zip(stills, concepts)]
        assert sum(hits) / len(hits) >= 0.75


def test_run_ablations_seeds_and_sample_only_reuse(tmp_path, monkeypatch):
    """Base and full get --seeds seeds, the rest --ablation-seeds; a --sample-only variant starts from a copy of
    the full run of its seed (the fake main below fails if the trained file is missing)."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_main(argv):
        out, seed = Path(argv[argv.index("--out") + 1]), int(argv[argv.index("--seed") + 1])
        if "--sample-only" in argv:
            assert (out / "trained.txt").read_text() == f"full {seed}"   # the full run's adapters, same seed
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "trained.txt").write_text(f"{'full' if '--x' not in argv else 'x'} {seed}")
        calls.append((argv, seed))
        metrics = dict(identity=float(seed), motion=1.0)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    args = argparse.Namespace(model="toy", seeds=3, ablation_seeds=1, out=str(tmp_path / "o"), resume=False)
    variants = {"base": ["--x"], "full": [], "later": ["--sample-only", "--late"], "other": ["--x", "--y"]}
    rows = tw.run_ablations(fake_main, ["--model", "toy", "--ablate"], variants, args, "m")
    assert [len(rows[k]) for k in variants] == [3, 3, 1, 1]
    assert all("--ablate" not in a for a, _ in calls)
    # --resume: finished runs are kept; a run that left a checkpoint and no metrics continues with --resume
    run = tmp_path / "o" / "ablations" / "full" / "seed1"
    (run / "metrics.json").unlink()
    (run / "ckpt.pt").write_text("step 5")
    calls.clear()
    args.resume = True
    again = tw.run_ablations(fake_main, ["--model", "toy", "--ablate", "--resume"], variants, args, "m")
    assert again == rows and [(a[-1], seed) for a, seed in calls] == [("--resume", 1)] and (run / "ckpt.pt").is_file()
    args.resume = False
    assert (tmp_path / "results" / "m" / "later" / "seed0" / "metrics.json").is_file()
    table = (tmp_path / "o" / "ablations" / "table.md").read_text()
    assert "| full | 3 | 1.000 +- 0.816 | 1.000 +- 0.000 |" in table and "| later | 1 | 0.000 | 1.000 |" in table
    args.seeds, args.ablation_seeds = 1, 0
    assert list(tw.run_ablations(fake_main, ["--model", "toy"], variants, args, "m")) == ["base", "full"]
    before = sorted(str(q) for q in tmp_path.rglob("*"))
    assert tw.run_ablations(fake_main, ["--model", "toy", "--dry-run"], variants, args, "m") == {}
    assert sorted(str(q) for q in tmp_path.rglob("*")) == before  # a dry run runs, writes and removes nothing
    with pytest.raises(common.InputError, match="use it with --model toy"):
        tw.run_ablations(fake_main, [], variants, argparse.Namespace(model="x", seeds=1, ablation_seeds=1, out="o",
                                                                     resume=False), "m")


def test_toy_preset_keeps_every_flag_given_even_at_its_default():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--subject")
    p.add_argument("--motion")
    for argv, want in [([], (1e-3, 20)), (["--lr", "1e-4"], (1e-4, 20)), (["--steps", "7"], (1e-3, 7))]:
        args = p.parse_args(argv)
        tw.apply_preset(args, p, argv, dict(lr=1e-3, steps=20))
        assert (args.lr, args.steps) == want, argv
        assert args.subject.endswith("subject") and args.motion.endswith("motion")


def test_latent_bank_keeps_each_samples_factors_and_serves_every_family(tmp_path, capsys):
    """make-bank stores raw VAE latents with their factors (resumable: written shards are kept); decoded with any
    family's normalisation they show what their factors say, and pretrain --bank trains on them."""
    bank = tmp_path / "bank"
    tw.main(["make-bank", "--out", str(bank), "--clips", "8", "--shard", "4"])
    first = (bank / "shard_00000.safetensors").stat().st_mtime_ns
    tw.main(["make-bank", "--out", str(bank), "--clips", "12", "--shard", "4"])  # one more shard, the others kept
    assert (bank / "shard_00000.safetensors").stat().st_mtime_ns == first and "1 to write" in capsys.readouterr().out
    data, vae = tw.load_bank(bank), tw.load_vae()
    (clips, concepts), (stills, still_concepts) = data["clips"], data["stills"]
    assert clips.shape == (12, 8, 9, 8, 8) and stills.shape == (12, 8, 1, 8, 8) and clips.dtype == torch.float16
    assert {c["motion"] for c in still_concepts} == {"still"} and not any(tw.is_heldout_combo(c) for c in concepts)
    for family in ("wan", "cogvideox"):
        videos = tw.decode_latents(family, vae, tw.normalise_latents(family, vae, clips[:4].float()))
        assert all(all(tw.prompt_following(v, c).values()) for v, c in zip(videos, concepts[:4])), family
    out = tmp_path / "wan.safetensors"
    tw.main(["pretrain", "--family", "wan", "--batch", "4", "--steps", "2", "--image-every", "2", "--bank", str(bank),
             "--out", str(out), "--ckpt", str(tmp_path / "ckpt.pt")])
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["bank"] == str(bank) and f.metadata()["samples_seen"] == "8"


def test_a_bank_of_another_vae_is_refused(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "bank").mkdir()  # the first shard is of this VAE, a later one of another: every shard is checked
    for k, vae in enumerate([tw.vae_fingerprint(), "0123456789abcdef"]):
        save_file({"clips": torch.zeros(1, 8, 9, 8, 8)}, str(tmp_path / "bank" / f"shard_{k:05d}.safetensors"),
                  metadata=dict(vae=vae))
    with pytest.raises(common.InputError, match="another toy VAE"):
        tw.load_bank(tmp_path / "bank")


def test_motion_report_reads_each_word_and_which_way_it_goes():
    """eval-base's per-motion rows: rendered clips are read as their own word and go the right way; the same clips
    played backwards go the wrong way (a backbone that knows the axis but not time's direction scores ~0.5)."""
    gen = torch.Generator().manual_seed(0)
    concepts = [dict(c, motion=m) for m in tw.PRE_MOTIONS for c in tw.random_concepts(2, gen)]
    clips = tw.render(concepts, gen)
    report = tw.motion_report(clips, concepts)
    assert set(report) == set(tw.PRE_MOTIONS)
    assert all(r["got"] == {m: 2} for m, r in report.items()), report
    assert all(report[m]["direction"] == 1.0 for m in ("left", "right", "up", "down"))
    assert report["circle"]["direction"] is None and report["still"]["direction"] is None
    backwards = tw.motion_report(clips.flip(1), concepts)
    assert all(backwards[m]["direction"] == 0.0 for m in ("left", "right", "up", "down")), backwards


def test_offset_noise_gives_each_clips_channels_a_random_mean(tmp_path):
    """Without it the per-channel mean of 8 x 8 x 9 noise has std 1/24; with offset 0.5 about 0.5. The UNet3D's
    pretraining uses it by default and its exported file says so."""
    shape = (256, 8, 9, 8, 8)
    plain = tw.training_noise(shape, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    assert abs(plain.mean((2, 3, 4)).std().item() - 1 / 24) < 0.01
    offset = tw.training_noise(shape, 0.5, torch.Generator().manual_seed(0))
    assert abs(offset.mean((2, 3, 4)).std().item() - 0.5) < 0.05 and abs(offset.std().item() - 1.118) < 0.05
    out = tmp_path / "unet3d.safetensors"
    tw.main(["pretrain", "--family", "unet3d", "--batch", "2", "--steps", "1", "--out", str(out),
             "--ckpt", str(tmp_path / "ckpt.pt")])
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["offset_noise"] == "0.5"
