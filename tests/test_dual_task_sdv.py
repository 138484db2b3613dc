import argparse
import copy
import json

import pytest
import torch

import common
import dual_task_sdv as dts
import toyworld as tw

FAST = ["--model", "toy", "--iterations", "4", "--warmup", "0", "--steps", "2", "--log-every", "2",
        "--toy-pairs", "8", "--toy-videos", "4"]


def _model(acting=False):
    """A random toy CogVideoX with the method's LoRA (rank 8); acting=True randomises lora_B so the LoRA acts."""
    torch.manual_seed(0)
    model = tw.build_backbone("cogvideox").eval().requires_grad_(False)
    base = copy.deepcopy(model)
    dts.add_lora(model, argparse.Namespace(rank=8, lora_alpha=4, lora_dropout=0.1))
    if acting:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    return model.eval(), base


def _inputs(n=2, frames=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, frames, tw.LATENT_CHANNELS, 8, 8, generator=g), torch.tensor([700, 30][:n]),
            torch.randn(n, 16, 32, generator=g), torch.randn(n, 1, tw.LATENT_CHANNELS, 8, 8, generator=g))


def test_zero_lora_and_no_reference_equals_the_base_transformer():
    model, base = _model()
    z, t, text, _ = _inputs()
    with torch.no_grad():
        ours = dts.forward_with_reference(model, z, text, t)
        theirs = base(z, text, t, image_rotary_emb=common.cogvideox_rotary(base, 3, 8, 8), return_dict=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_targets_cover_the_paper_list_and_proj_as_decided():
    model, _ = _model()
    names = {n for n, _ in common.lora_layers(model)}
    for suffix in ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.linear", "norm2.linear",
                   "ff.net.2", "ff.net.0.proj"]:
        assert f"transformer_blocks.0.{suffix}" in names
    assert {"patch_embed.proj", "patch_embed.text_proj"} <= names
    assert not any(n.startswith("proj_out") or n.startswith("norm_out") for n in names)


def test_reference_tokens_sit_between_text_and_video_with_frame0_rotary(monkeypatch):
    model, _ = _model()
    z, t, text, ref = _inputs(frames=2)
    seen = {}
    real = dts.attention

    def spy(attn, x, n_text, rotary):
        seen.setdefault("x", x)
        seen.setdefault("n_text", n_text)
        seen.setdefault("rotary", rotary)
        return real(attn, x, n_text, rotary)

    monkeypatch.setattr(dts, "attention", spy)
    with torch.no_grad():
        dts.forward_with_reference(model, z, text, t, ref)
    x, n_text, (cos, sin) = seen["x"], seen["n_text"], seen["rotary"]
    assert n_text == 16 and x.shape[1] == 16 + 64 + 2 * 64     # [text, ref (one frame), video (2 frames)]
    full_cos, _ = common.cogvideox_rotary(model, 3, 8, 8)       # a (T+1)-frame grid
    assert torch.equal(cos, full_cos)                           # ref = frame 0, video = frames 1..T
    # the ref slot holds the patch-embedded reference, normalised with t = 0's modulation
    blk = model.transformer_blocks[0]
    emb0 = model.time_embedding(model.time_proj(torch.zeros(2, dtype=torch.long)), None)
    expect = blk.norm1(dts.ref_tokens(model, ref), dts.ref_tokens(model, ref), emb0)[0]
    assert torch.allclose(x[:, 16:80], expect, atol=1e-6)


def test_token_drop_rotary_is_gathered_per_sample_and_video_keeps_frames_1_to_T():
    model, _ = _model()
    keep = torch.tensor([[0, 5, 63], [1, 2, 3]])
    cos, sin = dts.reference_rotary(model, 2, 8, 8, 3, keep)
    full, _ = common.cogvideox_rotary(model, 3, 8, 8)
    assert cos.shape == (2, 3 + 128, full.shape[1])
    assert torch.equal(cos[0, :3], full[[0, 5, 63]]) and torch.equal(cos[1, :3], full[[1, 2, 3]])
    assert torch.equal(cos[1, 3:], full[64:])


def test_dropping_tokens_changes_nothing_but_the_sequence_when_all_are_kept():
    model, _ = _model(acting=True)
    z, t, text, ref = _inputs()
    all_kept = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        a = dts.forward_with_reference(model, z, text, t, ref)
        b = dts.forward_with_reference(model, z, text, t, ref, all_kept)
        c = dts.forward_with_reference(model, z, text, t)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_token_drop_fraction_count_once_per_batch_positions_per_sample():
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(400):
        keep = dts.token_keep(64, 3, 0.5, g)
        assert keep.shape[0] == 3 and (keep.diff(dim=1) > 0).all()  # same k for the batch, sorted, no repeats
        kept.append(keep.shape[1] / 64)
    assert abs(sum(kept) / len(kept) - 0.5) < 0.02
    keep = dts.token_keep(64, 4, 0.5, torch.Generator().manual_seed(3))
    assert len({tuple(k.tolist()) for k in keep}) > 1               # positions differ per sample
    assert dts.token_keep(64, 2, 0.0, g) is None


def test_task_sampler_hits_p_and_is_identical_for_the_same_seed():
    a, b = dts.TaskSampler(7, 0.2), dts.TaskSampler(7, 0.2)
    da, db = [a(s) for s in range(5000)], [b(s) for s in range(5000)]
    assert da == db                                  # every rank seeds it the same: the same task each step
    assert abs(sum(da) / len(da) - 0.2) < 0.02
    two = dts.TaskSampler(0, 0.2, two_stage_at=10)
    assert [two(s) for s in range(20)] == [False] * 10 + [True] * 10


def test_identity_step_is_a_one_frame_target_on_a_two_frame_grid(monkeypatch):
    model, _ = _model()
    z, t, text, ref = _inputs(frames=1)
    seen = []
    real = dts.reference_rotary
    monkeypatch.setattr(dts, "reference_rotary", lambda *a: seen.append(a[1:]) or real(*a))
    out = dts.forward_with_reference(model, z, text, t, ref)
    assert out.shape == z.shape and seen[0][0] == 1   # one video frame; the grid is frames + 1 = 2
    cos, _ = real(model, 1, 8, 8, 64)
    assert cos.shape[0] == 2 * 64


def test_random_frame_select():
    clips = torch.arange(2 * 9).float().view(2, 9, 1, 1, 1).expand(2, 9, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(dts.reference_frames(clips, False, g)[:, 0, 0, 0], torch.tensor([0.0, 9.0]))
    picks = {int(dts.reference_frames(clips, True, g)[0, 0, 0, 0]) for _ in range(200)}
    assert picks == set(range(9))


def test_bad_records_are_skipped_with_a_warning_and_too_many_stop(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [json.dumps(dict(ref="a.png", target="a.png", prompt="a <cls> cat"))] * 8
    lines += [json.dumps(dict(ref="missing.png", target="a.png", prompt="x")), "not json"]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    assert len(dts.read_pairs(tmp_path, max_bad=0.25)) == 8
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 2 and "missing.png" in err
    with pytest.raises(SystemExit):
        dts.read_pairs(tmp_path, max_bad=0.1)
    vids = tmp_path / "v"
    vids.mkdir()
    for i in range(3):
        (vids / f"{i}.mp4").write_bytes(b"")
    (vids / "0.txt").write_text("a dog running")
    with pytest.raises(SystemExit):  # 2 of 3 without a caption
        dts.read_videos(vids, max_bad=0.5)
    assert len(dts.read_videos(vids, max_bad=0.7)) == 1
    (vids / "captions.jsonl").write_text(json.dumps(dict(video="1.mp4", caption="a cat")) + "\nbroken\n")
    assert [c for _, c in dts.read_videos(vids, max_bad=0.5)] == ["a dog running", "a cat"]


def test_unreadable_training_file_is_skipped_not_fatal_and_jitter_crops(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps(dict(ref=r, target="a.png", prompt="a <cls>")) for r in ["a.png", "b.png"]) + "\n")
    vids = tmp_path / "v"
    common.write_video(vids / "0.gif", tw.render(tw.random_concepts(1, torch.Generator().manual_seed(0)))[0], 4)
    (vids / "0.txt").write_text("a dog")
    data = dts.FolderData(argparse.Namespace(pairs=tmp_path, videos=vids, height=32, width=32, frames=9,
                                             max_bad=0.5, crop_jitter=0.0))
    ref, target, _ = data.pair_batch(torch.tensor([1, 0]), torch.Generator().manual_seed(0))  # b.png is bad
    assert ref.shape == (2, 3, 32, 32) and torch.allclose(ref[0], ref[1])
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 1 and "b.png" in err and "unreadable (cannot read image" in err
    assert "error:" not in err
    with pytest.raises(SystemExit):  # a second bad read passes --max-bad 0.5 of 2 records
        data.pair_batch(torch.tensor([1]), torch.Generator().manual_seed(0))
    ramp = torch.linspace(-1, 1, 64).expand(3, 64, 64)
    crops = {tuple(dts.jitter_crop(ramp, (32, 32), 0.25, torch.Generator().manual_seed(k))[0, 0, :2].tolist())
             for k in range(8)}
    assert len(crops) > 1 and dts.jitter_crop(ramp, (32, 32), 0.25, torch.Generator()).shape == (3, 32, 32)


def test_toy_run_trains_saves_and_samples_and_sample_mode_reloads(tmp_path):
    out = tmp_path / "run"
    metrics = dts.main(FAST + ["--out", str(out), "--save-every", "2"])
    assert set(metrics) >= {"identity", "dynamics"} and (out / "metrics.json").is_file()
    assert (out / "lora.safetensors").is_file() and (out / "ckpt.pt").is_file()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4
    # the <cls> row moved (trained), other rows did not
    from safetensors.torch import load_file
    sd = load_file(str(out / "lora.safetensors"))
    tok, enc = tw.tokenizer("t5"), tw.text_encoder("t5")
    cid, emb = dts.cls_row(tok, enc)
    assert not torch.equal(sd["cls_embedding"], emb[cid])
    # sample mode with a reference image file
    ref = tw.render([dict(tw.SUBJECT, background="white")], frames=1)[0]
    common.write_frames(tmp_path / "ref", ref)
    img = sorted((tmp_path / "ref").iterdir())[0]
    dts.main(["sample", "--model", "toy", "--ckpt", str(out), "--image", str(img), "--prompt",
              "a <cls> moving left on a gray background", "--steps", "2", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "result.mp4").is_file()


def test_resume_continues_to_the_same_weights(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    dts.main(FAST + ["--out", str(full), "--steps", "1"])
    dts.main(FAST + ["--out", str(part), "--steps", "1", "--iterations", "4", "--save-every", "2"])
    # interrupt-like: a checkpoint at step 2 exists; resume from it
    dts.main(FAST + ["--out", str(part), "--steps", "1", "--resume"])
    from safetensors.torch import load_file
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(part / "lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_clear_errors():
    with pytest.raises(SystemExit):
        dts.main(["train", "--model", "toy", "--pairs", "nowhere", "--videos", "nowhere"])
    with pytest.raises(SystemExit):
        dts.main(["sample", "--model", "toy", "--ckpt", "nowhere", "--image", "x.png", "--prompt", "p"])


def test_pcgrad_removes_exactly_the_conflicting_component():
    g, o = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    out = dts.pcgrad_project(g, o)
    assert abs(float(out @ o)) < 1e-6                                # no conflict left
    assert torch.allclose(g - out, (g @ o) / (o @ o) * o)             # only the component along o was removed
    ok = torch.tensor([1.0, 2.0, 0.0])
    assert torch.equal(dts.pcgrad_project(ok, o), ok)                 # no conflict: unchanged
    buf = dts.PCGradBuffer(4)
    assert torch.equal(buf("image", g), g)                            # one domain only: no projection yet
    assert torch.equal(buf("image", g), g)
    assert abs(float(buf("video", o) @ g)) < 1e-6                     # projected against the latest image gradient
    assert abs(float(buf("image", g) @ o)) < 1e-6                     # and back: against the buffered video one
    for _ in range(4):
        buf("image", g)
    assert all(k == "image" for k, _ in buf.items) and len(buf.items) == 4  # FIFO: the video gradient left


def test_grad_monitoring_and_pcgrad_run(tmp_path):
    out = tmp_path / "g"
    dts.main(FAST + ["--out", str(out), "--grad-every", "2", "--pcgrad", "4", "--p", "0.5"])
    rows = [json.loads(x) for x in (out / "grad_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(-1 <= r["cos"] <= 1 and r["norm_img"] > 0 for r in rows)
    dts.main(FAST + ["--out", str(out), "--grad-every", "2", "--p", "0.5"])   # a new run in the same --out
    assert [json.loads(x)["step"] for x in (out / "grad_log.jsonl").read_text().splitlines()] == [0, 2]


def test_two_process_gloo_run(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(dts.__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(root / "dual_task_sdv.py")] + FAST + ["--out", str(tmp_path / "d"), "--accum", "2"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ranks in sync: max |w - w_rank0| = 0" in r.stdout
    assert (tmp_path / "d" / "lora.safetensors").is_file() and (tmp_path / "d" / "metrics.json").is_file()


def test_train_mode_on_folders_with_the_toy_backbone(tmp_path, capsys):
    pairs, vids = tmp_path / "pairs", tmp_path / "videos"
    c = tw.random_concepts(3, torch.Generator().manual_seed(0))
    imgs = tw.render([dict(x, motion="still") for x in c], frames=1)[:, 0]
    lines = []
    for i, im in enumerate(imgs):
        common.write_frames(pairs / f"s{i}", im[None])
        lines.append(json.dumps(dict(ref=f"s{i}/000.png", target=f"s{i}/000.png", prompt=dts.toy_prompt(
            dict(c[i], motion="still"), image=True))))
    side = torch.cat([imgs[0], imgs[1]], -1)  # a Subject200K-style composite: left = ref, right = target
    common.write_frames(pairs / "side", side[None])
    lines.append(json.dumps(dict(image="side/000.png", prompt="a picture of a <cls> on a gray background")))
    (pairs / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    clips = tw.render(c)
    for i, v in enumerate(clips):
        common.write_video(vids / f"v{i}.gif", v, 4)
        (vids / f"v{i}.txt").write_text(dts.toy_prompt(c[i]))
    data = dts.FolderData(argparse.Namespace(pairs=pairs, videos=vids, height=32, width=32, frames=9, max_bad=0.0,
                                                crop_jitter=0.0))
    ref, target, _ = data.pair_batch(torch.tensor([3]), None)
    assert torch.allclose(ref[0], imgs[0], atol=1e-2) and torch.allclose(target[0], imgs[1], atol=1e-2)
    out = tmp_path / "run"
    dts.main(["train", "--model", "toy", "--pairs", str(pairs), "--videos", str(vids), "--iterations", "3",
              "--warmup", "0", "--p", "0.5", "--out", str(out), "--pair-batch", "2", "--video-batch", "2"])
    assert (out / "lora.safetensors").is_file() and not (out / "metrics.json").exists()


def test_ablate_runs_every_variant_and_plots_the_two_gradient_cosines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # results/ and out/ land here, not in the repo
    assert {"p 0.2", "p 0 (image only)", "p 0.4"} <= set(dts.ABLATIONS) and dts.ABLATIONS["p 0.2"] == []
    rows = dts.main(FAST + ["--ablate", "--seeds", "1", "--grad-every", "2"])
    assert list(rows) == list(dts.ABLATIONS) and all(set(r[0]) >= {"identity", "dynamics"} for r in rows.values())
    for name in dts.ABLATIONS:
        assert (tmp_path / "results" / "dual_task_sdv" / common.slug(name) / "seed0" / "metrics.json").is_file()
    run = tmp_path / "out/dual_task_sdv/ablations" / common.slug("p 0 (image only)") / "seed0"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["p"] == 0.0
    assert (tmp_path / "results" / "dual_task_sdv" / "grad_cosine.png").stat().st_size > 1000
