import argparse
import copy
import json

import pytest
import torch

import common
import dual_task_sdv as dts
import toyworld as tw
from helpers import check_bad_input, earlier_run, error_line

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


def test_task_draw_hits_p_and_is_identical_for_the_same_seed():
    a, b = dts.video_steps(7, 0.2, 5000), dts.video_steps(7, 0.2, 5000)
    assert torch.equal(a, b)                         # every rank seeds it the same: the same task each step
    assert abs(float(a.float().mean()) - 0.2) < 0.02
    assert dts.video_steps(0, 0.2, 20, two_stage=True).tolist() == [False] * 10 + [True] * 10


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
    with pytest.raises(common.InputError):
        dts.read_pairs(tmp_path, max_bad=0.1)
    vids = tmp_path / "v"
    vids.mkdir()
    for i in range(3):
        (vids / f"{i}.mp4").write_bytes(b"")
    (vids / "0.txt").write_text("a dog running")
    with pytest.raises(common.InputError):  # 2 of 3 without a caption
        dts.read_videos(vids, max_bad=0.5)
    assert len(dts.read_videos(vids, max_bad=0.7)) == 1
    (vids / "captions.jsonl").write_text(json.dumps(dict(video="1.mp4", caption="a cat")) + "\nbroken\n")
    assert [c for _, c in dts.read_videos(vids, max_bad=0.5)] == ["a dog running", "a cat"]


def test_unreadable_training_file_is_dropped_once_not_fatal_and_jitter_crops(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps(dict(ref=r, target="a.png", prompt="a <cls>")) for r in ["a.png", "b.png"]) + "\n")
    vids = tmp_path / "v"
    common.write_video(vids / "0.gif", tw.render(tw.random_concepts(1, torch.Generator().manual_seed(0)))[0], 4)
    (vids / "0.txt").write_text("a dog")
    data = dts.FolderData(argparse.Namespace(pairs=tmp_path, videos=vids, height=32, width=32, frames=9, fps=4,
                                             max_bad=0.5, crop_jitter=0.0, no_train_cls=False))
    bad, gen = set(), torch.Generator().manual_seed(0)
    for _ in range(3):  # b.png (record 1) fails once, is dropped, and is never drawn (nor counted) again
        ref, target, _ = dts.draw(data.pair_batch, torch.tensor([0, 1]), bad, 8, gen)
        assert ref.shape == (8, 3, 32, 32) and torch.allclose(ref, ref[:1])
    err = capsys.readouterr().err
    assert bad == {1} and err.count("warning: skipping") == 1 and "b.png" in err and "unreadable (cannot read" in err
    assert "error:" not in err
    with pytest.raises(common.InputError, match="all 1 records of a rank's share are unreadable"):
        dts.draw(data.pair_batch, torch.tensor([1]), bad, 1, gen)  # replacements come from the given pool alone
    # --max-bad counts distinct records, of all ranks together: 1 of 2 is not more than half; rank 0 says it, once
    dts.check_bad(dict(image=bad, video=set()), data, argparse.Namespace(max_bad=0.5), 0, 1, torch.device("cpu"))
    with pytest.raises(common.InputError, match="1 of 2 image records are unreadable"):
        dts.check_bad(dict(image=bad, video=set()), data, argparse.Namespace(max_bad=0.4), 0, 1, torch.device("cpu"))
    with pytest.raises(SystemExit):
        dts.check_bad(dict(image=bad, video=set()), data, argparse.Namespace(max_bad=0.4), 1, 1, torch.device("cpu"))
    assert "error:" not in capsys.readouterr().err
    ramp = torch.linspace(-1, 1, 64).expand(3, 64, 64)
    crops = {tuple(dts.jitter_crop(ramp, (32, 32), 0.25, torch.Generator().manual_seed(k))[0, 0, :2].tolist())
             for k in range(8)}
    assert len(crops) > 1 and dts.jitter_crop(ramp, (32, 32), 0.25, torch.Generator()).shape == (3, 32, 32)


def test_the_loader_reads_ahead_what_a_direct_read_gives(tmp_path, capsys):
    """DataLoader workers read the items loader_items draws ahead: the same samples as reading them here; a resumed
    run's items are an uninterrupted run's from its step on; a bad sample is dropped once and replaced from the pool."""
    from PIL import Image
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"not a png")
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(dict(ref=r, target="b.png", prompt="a <cls>"))
                                                    for r in ["a.png", "b.png", "c.png"]) + "\n")
    vids = tmp_path / "v"
    common.write_video(vids / "0.gif", tw.render(tw.random_concepts(1, torch.Generator().manual_seed(0)))[0], 4)
    (vids / "0.txt").write_text("a dog")
    data = dts.FolderData(argparse.Namespace(pairs=tmp_path, videos=vids, height=32, width=32, frames=9, fps=4,
                                             max_bad=0.5, crop_jitter=0.25, no_train_cls=False))
    pools, tasks = dict(image=torch.tensor([0, 1, 2]), video=torch.tensor([0])), torch.tensor([0, 1, 0, 0]).bool()
    batches = dict(image=(2, 2), video=(1, 1))
    items = list(dts.loader_items(pools, tasks, batches, 7919, 0))
    assert len(items) == 7 and list(dts.loader_items(pools, tasks, batches, 7919, 2)) == items[3:]
    loaded = list(dts.train_loader(data, pools, tasks, batches, argparse.Namespace(seed=0, workers=2), 0, 0))
    same = lambda a, b: all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))
    assert len(loaded) == 7 and all(same(got, data[item]) for batch, want in zip(loaded, items)
                                    for got, item in zip(batch, want))
    bad, gen = set(), torch.Generator().manual_seed(0)
    for _ in range(2):
        ref, target, prompts = dts.take([data["image", 2, 0], data["image", 0, 0]], data.pair_batch, pools["image"],
                                        bad, gen)
        assert ref.shape == target.shape == (2, 3, 32, 32) and prompts == ["a <cls>"] * 2
    assert bad == {2} and capsys.readouterr().err.count("warning: skipping") == 1


def test_a_self_pair_is_not_split_as_a_composite(tmp_path):
    """ref == target (one photo as both views) is a self-pair, used whole; only an {"image"} record is a Subject200K
    side-by-side composite, split into its left (reference) and right (target) halves."""
    from PIL import Image
    photo = Image.new("RGB", (64, 32), (255, 0, 0))
    photo.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    photo.save(tmp_path / "a.png")
    records = [dict(ref="a.png", target="a.png", prompt="a <cls>"), dict(image="a.png", prompt="a <cls>")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (tmp_path / "v").mkdir()
    data = dts.FolderData(argparse.Namespace(pairs=tmp_path, videos=tmp_path / "v", height=32, width=64, max_bad=0.5,
                                             crop_jitter=0.0, no_train_cls=False))
    ref, target, _ = data.pair_batch(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    whole = common.read_image(tmp_path / "a.png", (32, 64))
    assert torch.equal(ref[0], whole) and torch.equal(target[0], whole)
    assert (ref[1, 0] == 1).all() and (ref[1, 2] == -1).all() and (target[1, 2] == 1).all()


def test_toy_run_trains_saves_and_samples_and_sample_mode_reloads(tmp_path):
    out, base = tmp_path / "run", tmp_path / "base"
    metrics = dts.main(FAST + ["--out", str(out), "--save-every", "2"])
    assert set(metrics) >= {"identity", "dynamics"} and (out / "metrics.json").is_file()
    assert (out / dts.LORA_FILE).is_file() and (out / dts.CLS_FILE).is_file() and (out / "ckpt.pt").is_file()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4
    # the <cls> row moved (trained), other rows did not
    from safetensors.torch import load_file
    row = load_file(str(out / dts.CLS_FILE))[dts.CLS]
    tok, enc = tw.tokenizer("t5"), tw.text_encoder("t5")
    assert not torch.equal(row, enc.get_input_embeddings().weight[dts.add_cls_token(tok, enc)])
    # sample mode with a reference image file: the trained LoRA changes the video (against an untrained one)
    dts.main(FAST + ["--out", str(base), "--iterations", "0"])
    ref = tw.render([dict(tw.SUBJECT, background="white")], frames=1)[0]
    common.write_frames(tmp_path / "ref", ref)
    img = sorted((tmp_path / "ref").iterdir())[0]
    videos = []
    for ckpt in (out, base):
        dts.main(["sample", "--model", "toy", "--ckpt", str(ckpt), "--image", str(img), "--prompt",
                  "a <cls> moving left on a gray background", "--steps", "2", "--out", str(tmp_path / ckpt.name)])
        assert (tmp_path / ckpt.name / "result.mp4").is_file()
        videos.append(torch.stack([common.read_image(q) for q in sorted((tmp_path / ckpt.name / "result").iterdir())]))
    assert (videos[0] - videos[1]).abs().max() > 0.05
    # --sample-only: the held-out sprites again, from the LoRA in --out (the same numbers); --num-samples: a grid
    assert dts.main(FAST + ["--out", str(out), "--sample-only"]) == metrics
    dts.main(["sample", "--model", "toy", "--ckpt", str(out), "--image", str(img), "--prompt", "a <cls>", "--steps",
              "1", "--num-samples", "2", "--out", str(tmp_path / "two")])
    assert (tmp_path / "two" / "result_grid.mp4").is_file()


def test_the_shipped_toy_checkpoint_samples_the_held_out_sprites_as_when_it_was_trained(tmp_path):
    """assets/toy_dual_task_sdv: the full method's toy run (`--seed 0 --grad-every 100`), the sample mode's --ckpt
    for --model toy; sampled again it gives the metrics.json its training run wrote (a file under 10 MB)."""
    shipped = tw.ASSETS / "toy_dual_task_sdv"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 10e6
    metrics = dts.main(["sample", "--model", "toy", "--out", str(tmp_path / "again")])
    assert metrics == pytest.approx(json.loads((shipped / "metrics.json").read_text()), abs=0.03)
    assert dts.parse_args(["sample", "--model", "toy"]).out == "out/dual_task_sdv_shipped"  # not the demo's run
    common.write_frames(tmp_path / "ref", tw.heldout_case(0)[0][None])
    img = sorted((tmp_path / "ref").iterdir())[0]
    dts.main(["sample", "--model", "toy", "--image", str(img), "--prompt", "a <cls> moving left on a white background",
              "--steps", "2", "--out", str(tmp_path / "one")])
    assert (tmp_path / "one" / "result.mp4").is_file()


def test_samples_are_written_during_training_without_changing_it(tmp_path, monkeypatch):
    """--sample-every k: out/samples/step_k.mp4 of the first held-out sprite at seed --seed (the last one is toy_eval's
    first video); LoRA and <cls> are those of a run without previews, with LoRA dropout on and a sampler drawing from
    the global RNG (as the real DPM one does)."""
    from safetensors.torch import load_file
    real = dts.generate
    monkeypatch.setattr(dts, "generate", lambda *a: real(*a) + 0 * torch.randn(()))  # a global-RNG draw, as DPM's
    a, b = tmp_path / "a", tmp_path / "b"
    dts.main(FAST + ["--out", str(a), "--lora-dropout", "0.1", "--sample-every", "2"])
    dts.main(FAST + ["--out", str(b), "--lora-dropout", "0.1", "--sample-every", "0"])
    assert sorted(q.name for q in (a / "samples").iterdir()) == ["step_000002.mp4", "step_000004.mp4"]
    assert not (b / "samples").exists()
    for name in (dts.LORA_FILE, dts.CLS_FILE):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert (a / "samples" / "step_000004.mp4").read_bytes() == (a / "result.mp4").read_bytes()


def test_the_saved_lora_loads_in_a_cogvideox_pipeline_as_in_our_loader(tmp_path):
    """pytorch_lora_weights.safetensors is the diffusers format: CogVideoXPipeline.load_lora_weights gives the same
    transformer as the one that saved it, and as our sample mode's loader."""
    from diffusers import CogVideoXPipeline
    model, base = _model(acting=True)
    ours = copy.deepcopy(base)
    m = dict(transformer=model, cls=torch.nn.Parameter(torch.randn(32)))
    dts.save_lora(model, m, argparse.Namespace(model="toy", iterations=1, p=0.2), tmp_path)
    pipe = CogVideoXPipeline(tokenizer=tw.tokenizer("t5"), text_encoder=tw.text_encoder("t5"), transformer=base,
                             vae=tw.load_vae(), scheduler=tw.noise_schedule("cogvideox"))
    pipe.load_lora_weights(str(tmp_path))
    mine = dict(transformer=ours, cls=torch.nn.Parameter(torch.zeros(32)))
    dts.load_lora(mine, tmp_path, dts.read_cls(tmp_path, "toy"))
    z, t, text, ref = _inputs()
    with torch.no_grad():
        want = dts.forward_with_reference(model, z, text, t, ref)
        for tr in (pipe.transformer.eval(), ours):
            assert torch.allclose(dts.forward_with_reference(tr, z, text, t, ref), want, atol=1e-5)
    assert torch.equal(mine["cls"], m["cls"])
    assert not torch.allclose(dts.forward_with_reference(_model()[1], z, text, t, ref), want, atol=1e-3)


def test_resume_continues_to_the_same_weights_running_only_the_steps_left(tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    dts.main(FAST + ["--out", str(full), "--steps", "1"])
    dts.main(FAST + ["--out", str(part), "--steps", "1", "--iterations", "4", "--save-every", "2"])
    # interrupt-like: a checkpoint at step 2 exists; resume from it and count the steps it runs
    seen, real = [], dts.DualTaskStep.forward
    monkeypatch.setattr(dts.DualTaskStep, "forward", lambda self, *a: seen.append(1) or real(self, *a))
    dts.main(FAST + ["--out", str(part), "--steps", "1", "--resume"])
    assert len(seen) == 2                                            # steps 3 and 4, one pass each
    from safetensors.torch import load_file
    for name in (dts.LORA_FILE, dts.CLS_FILE):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_clear_errors(tmp_path, capsys):
    for argv in (["train", "--model", "toy", "--pairs", "nowhere", "--videos", "nowhere"],
                 ["sample", "--model", "toy", "--ckpt", "nowhere", "--image", "x.png", "--prompt", "a <cls>"]):
        error_line(dts, argv + ["--out", str(tmp_path)], capsys)


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
    dts.main(FAST + ["--out", str(out), "--grad-every", "2", "--p", "0.5", "--overwrite"])  # a new run, same --out
    assert [json.loads(x)["step"] for x in (out / "grad_log.jsonl").read_text().splitlines()] == [0, 2]


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
import dual_task_sdv as dts
DDP, seen = torch.nn.parallel.DistributedDataParallel, dict(forward=0, no_sync=0, generate=0)
forward, no_sync, train, generate = DDP.forward, DDP.no_sync, dts.train, dts.generate
def count(name, real):
    def counted(*a, **k):
        seen[name] += 1
        return real(*a, **k)
    return counted
def checked_train(m, *a, **k):
    seen["seed"] = torch.initial_seed()
    train(m, *a, **k)
    dts.generate = generate  # count the previews only, not the final toy_eval
    w = torch.cat([p.detach().flatten() for n, p in m["transformer"].named_parameters() if "lora_" in n] + [m["cls"]])
    w0 = w.clone()
    dist.broadcast(w0, 0)
    seen["divergence"] = float((w - w0).abs().max())
DDP.forward, DDP.no_sync, dts.train = count("forward", forward), count("no_sync", no_sync), checked_train
dts.generate = count("generate", generate)
dts.main(sys.argv[1:])
out = Path(sys.argv[sys.argv.index("--out") + 1])
(out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
"""


def test_two_process_gloo_run_trains_through_ddp_and_keeps_the_ranks_equal(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    root = Path(dts.__file__).resolve().parent
    (tmp_path / "run.py").write_text(RANK_SCRIPT)
    # on the CPU even where a GPU is present (two ranks cannot share one GPU under NCCL)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "d"
    # 4 pairs a step over 2 ranks of 1 pair per pass: 2 passes, the first under no_sync
    with socket.socket() as free:  # a free port: other test runs on this machine may hold a fixed one
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(tmp_path / "run.py")] + FAST + ["--out", str(out), "--pair-micro", "1", "--grad-every", "2",
                                               "--pcgrad", "4", "--sample-every", "2", "--save-every", "2"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]
    assert all(s["forward"] > 0 and s["no_sync"] > 0 and s["divergence"] == 0 for s in ranks), ranks
    # each rank its own seed (LoRA dropout masks) and RNG states in the checkpoint; every rank samples the previews
    # (steps 2 and 4), so that none waits in an all-reduce for rank 0's
    assert ranks[0]["seed"] != ranks[1]["seed"] and [s["generate"] for s in ranks] == [2, 2], ranks
    rng = torch.load(out / "ckpt.pt", weights_only=False)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert (out / dts.LORA_FILE).is_file() and (out / "metrics.json").is_file()
    assert [json.loads(x)["step"] for x in (out / "grad_log.jsonl").read_text().splitlines()] == [0, 2]


CHECK_BAD_SCRIPT = """
import argparse, torch, torch.distributed as dist
import common, dual_task_sdv as dts
dist.init_process_group("gloo")
rank, data = dist.get_rank(), argparse.Namespace(pairs=[None] * 10, videos=[None] * 10)
bad = dict(image={3} if rank == 1 else set(), video=set())  # a bad record on rank 1's shard only
common.cli(lambda argv: dts.check_bad(bad, data, argparse.Namespace(max_bad=0.05), rank, 2, torch.device("cpu")))
"""


def test_too_many_bad_records_stop_every_rank_with_one_message(tmp_path):
    """A rank that passes --max-bad alone must not exit while the others wait in NCCL until its timeout: the ranks
    sum their bad records each step and all stop together; rank 0 says why."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    root = Path(dts.__file__).resolve().parent
    (tmp_path / "run.py").write_text(CHECK_BAD_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                        str(tmp_path / "run.py")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-2000:]
    assert "1 of 10 image records are unreadable (more than --max-bad 0.05)" in errors[0]


def test_train_mode_on_folders_with_the_toy_backbone(tmp_path, capsys):
    pairs, vids = tmp_path / "pairs", tmp_path / "videos"
    c = tw.random_concepts(3, torch.Generator().manual_seed(0))
    imgs = tw.render([dict(x, motion="still") for x in c], frames=1)[:, 0]
    lines = []
    for i, im in enumerate(imgs):
        common.write_frames(pairs / f"s{i}", im[None])
        lines.append(json.dumps(dict(ref=f"s{i}/000.png", target=f"s{i}/000.png", prompt=tw.cls_prompt(
            dict(c[i], motion="still"), image=True))))
    side = torch.cat([imgs[0], imgs[1]], -1)  # a Subject200K-style composite: left = ref, right = target
    common.write_frames(pairs / "side", side[None])
    lines.append(json.dumps(dict(image="side/000.png", prompt="a picture of a <cls> on a gray background")))
    (pairs / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    clips = tw.render(c)
    for i, v in enumerate(clips):
        common.write_video(vids / f"v{i}.gif", v, 4)
        (vids / f"v{i}.txt").write_text(tw.cls_prompt(c[i]))
    data = dts.FolderData(argparse.Namespace(pairs=pairs, videos=vids, height=32, width=32, frames=9, fps=4,
                                             max_bad=0.0, crop_jitter=0.0, no_train_cls=False))
    ref, target, _ = data.pair_batch(torch.tensor([3]), None)
    assert torch.allclose(ref[0], imgs[0], atol=1e-2) and torch.allclose(target[0], imgs[1], atol=1e-2)
    # --sample-every's pair: the first of the validation split if there is one, else the first training pair
    run = argparse.Namespace(mode="train", seed=0)
    for train, val, want in ([0, 1, 2, 3], [], 0), ([0, 1, 2], [3], 3):
        image, prompt = dts.preview_ref(run, data, dict(image=(torch.tensor(train), torch.tensor(val).long())))
        refs, _, prompts = data.pair_batch(torch.tensor([want]), None)
        assert torch.equal(image, refs[0]) and prompt == prompts[0]
    out = tmp_path / "run"
    dts.main(["train", "--model", "toy", "--pairs", str(pairs), "--videos", str(vids), "--iterations", "3",
              "--warmup", "0", "--p", "0.5", "--out", str(out), "--pair-batch", "2", "--video-batch", "2",
              "--sample-every", "3", "--steps", "2"])
    assert (out / dts.LORA_FILE).is_file() and not (out / "metrics.json").exists()
    assert [q.name for q in (out / "samples").iterdir()] == ["step_000003.mp4"]


def test_ablate_runs_every_variant_and_logs_the_gradient_cosines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # results/ and out/ land here, not in the repo
    assert {"p 0.2", "p 0 (image only)", "p 0.4"} <= set(dts.ABLATIONS) and dts.ABLATIONS["p 0.2"] == []
    rows = dts.main(FAST + ["--ablate", "--seeds", "1", "--grad-every", "2"])
    assert list(rows) == list(dts.ABLATIONS) and all(set(r[0]) >= {"identity", "dynamics"} for r in rows.values())
    for name in dts.ABLATIONS:
        assert (tmp_path / "results" / "dual_task_sdv" / tw.slug(name) / "seed0" / "metrics.json").is_file()
    run = tmp_path / "out/dual_task_sdv/ablations" / tw.slug("p 0 (image only)") / "seed0"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["p"] == 0.0
    assert [json.loads(x)["step"] for x in (run / "grad_log.jsonl").read_text().splitlines()] == [0, 2]


def test_each_rank_loads_its_models_on_its_own_gpu(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(common, "device_and_dtype", lambda choice: (torch.device("cuda"), torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(("set_device", d)))

    def stop(args, device, dtype):
        seen.append(("load", device))
        raise RuntimeError("stop")

    monkeypatch.setattr(dts, "load_models", stop)
    with pytest.raises(RuntimeError, match="stop"):
        dts.main(FAST + ["--out", str(tmp_path)])
    assert seen == [("set_device", torch.device("cuda", 1)), ("load", torch.device("cuda", 1))]


def test_toy_run_with_bf16_frozen_weights_trains_the_cls_row_as_its_own_fp32_parameter(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    seen, train = {}, dts.train
    monkeypatch.setattr(dts, "train", lambda m, *a: seen.setdefault("m", m) and train(m, *a))
    out = tmp_path / "bf16"
    metrics = dts.main(FAST + ["--out", str(out), "--dtype", "bfloat16"])
    assert all(v == v for v in metrics.values())                     # finite, not NaN
    m = seen["m"]
    row = m["text_encoder"].get_input_embeddings().weight
    assert row.dtype == torch.bfloat16 and m["cls"].dtype == torch.float32 and m["cls"].shape == row.shape[1:]
    params = dts.trainable(m, argparse.Namespace(no_train_cls=False))
    lora = sum(p.numel() for n, p in m["transformer"].named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in params) == lora + row.shape[1]     # one row in the flat gradient, not the matrix
    assert all(p.dtype == torch.float32 for p in params)
    # every entry learned: AdamW steps of lr ~1e-3 round away in a bf16 row wherever |entry| > ~0.25 (a bf16 row
    # moves 41% of its entries here)
    tok, enc = tw.tokenizer("t5"), tw.text_encoder("t5")
    start = enc.get_input_embeddings().weight[dts.add_cls_token(tok, enc)].bfloat16().float()
    moved = load_file(str(out / dts.CLS_FILE))[dts.CLS] != start
    assert moved.float().mean() > 0.9


def test_adding_cls_never_shrinks_the_t5_embedding_matrix():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    def tokenizer():
        tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    small = dict(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    padded = T5EncoderModel(T5Config(vocab_size=16, **small))        # as T5-XXL: 32128 rows for 32100 tokens
    assert dts.add_cls_token(tokenizer(), padded) == 5 and padded.get_input_embeddings().weight.shape[0] == 16
    exact = T5EncoderModel(T5Config(vocab_size=5, **small))
    assert dts.add_cls_token(tokenizer(), exact) == 5 and exact.get_input_embeddings().weight.shape[0] == 6


def test_gradient_analysis_measures_on_a_disjoint_validation_split(tmp_path, monkeypatch):
    drawn = {"pair_batch": [], "video_batch": []}
    for name in drawn:
        real = getattr(tw.PairVideoData, name)
        monkeypatch.setattr(tw.PairVideoData, name, lambda self, idx, gen, name=name, real=real:
                            drawn[name].append(set(idx.tolist())) or real(self, idx, gen))
    dts.main(FAST + ["--out", str(tmp_path), "--grad-every", "2", "--p", "0.5"])
    for name, sets in drawn.items():
        probe, trained = sets[0], set().union(*sets[1:])              # the probe's batch is drawn first
        assert probe and trained and not probe & trained, name


def test_training_clips_are_taken_at_the_training_fps_from_the_start(tmp_path):
    vids = tmp_path / "v"
    ramp = torch.linspace(-1, 1, 40)[:, None, None, None].expand(40, 3, 8, 8)  # frame i has brightness i
    common.write_video(vids / "c.gif", ramp, fps=20)                            # 2 s at 20 fps
    (vids / "c.txt").write_text("a dog")
    common.write_frames(tmp_path / "p", ramp[:1])
    (tmp_path / "p" / "pairs.jsonl").write_text(json.dumps(dict(ref="000.png", target="000.png", prompt="a <cls>")))
    data = dts.FolderData(argparse.Namespace(pairs=tmp_path / "p", videos=vids, height=8, width=8, frames=5, fps=8,
                                             max_bad=0.0, crop_jitter=0.0, no_train_cls=False))
    clip = data.video_batch(torch.tensor([0]), torch.Generator())[0][0]
    assert ((clip[:, 0, 0, 0] + 1) / 2 * 39).round().tolist() == [0, 2, 5, 8, 10]  # every 2.5th frame: 8 fps
    with pytest.raises(common.InputError):                                       # 2 s hold 17 frames at 8 fps
        dts.read_clip(vids / "c.gif", 18, 8, (8, 8))


def test_a_clip_is_read_as_before_but_only_its_kept_frames(tmp_path, monkeypatch):
    """read_clip decodes only up to its last kept frame and resizes uint8 frames: the same frames as reading the
    whole clip in float and keeping 49 of them (up to a rounding of the resize), with fewer frames decoded."""
    import imageio.v3 as iio
    gen = torch.Generator().manual_seed(0)
    clip = torch.rand(60, 3, 24, 40, generator=gen) * 2 - 1  # 60 frames at 30 fps: 2 s
    common.write_video(tmp_path / "c.mp4", clip, fps=30)
    decoded, imiter = [], iio.imiter
    monkeypatch.setattr(iio, "imiter", lambda *a, **k: (decoded.append(1) or f for f in imiter(*a, **k)))
    new, n_decoded = dts.read_clip(tmp_path / "c.mp4", 9, 8, (16, 16)), len(decoded)
    span = round(8 * 30 / 8) + 1  # 31 source frames cover 9 frames at 8 fps
    old = common.read_video(tmp_path / "c.mp4", span, (16, 16), end=span)[torch.linspace(0, span - 1, 9).round().long()]
    assert new.shape == old.shape == (9, 3, 16, 16) and (new - old).abs().max() <= 2 / 127.5
    assert n_decoded == span < 60


def test_the_papers_batch_is_reached_by_gradient_accumulation(tmp_path, monkeypatch):
    assert dts.micro_batches(256, 8, 8, "pair") == (8, 4) and dts.micro_batches(32, 1, 8, "video") == (1, 4)
    assert dts.micro_batches(32, 1, 1, "video") == (1, 32) and dts.micro_batches(2, 4, 1, "pair") == (2, 1)
    with pytest.raises(common.InputError):
        dts.micro_batches(32, 3, 2, "video")
    sizes, real = [], dts.DualTaskStep.forward
    monkeypatch.setattr(dts.DualTaskStep, "forward", lambda self, kind, batch, gen: sizes.append(len(batch[0])) or
                        real(self, kind, batch, gen))
    dts.main(FAST + ["--out", str(tmp_path), "--p", "0", "--pair-batch", "4", "--pair-micro", "1"])
    assert sizes == [1] * 16                                         # 4 steps of 4 one-pair passes


def test_a_pair_prompt_without_cls_stops_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(dict(ref="a.png", target="a.png", prompt=p)) + "\n"
                                                  for p in ["a <cls> cat", "a cat on a sofa"]))
    vids = tmp_path / "v"
    common.write_video(vids / "0.gif", torch.zeros(9, 3, 8, 8), 4)
    (vids / "0.txt").write_text("a dog")
    monkeypatch.setattr(dts, "load_models", lambda *a: pytest.fail("the models were loaded"))
    err = error_line(dts, ["train", "--model", "toy", "--pairs", str(tmp_path), "--videos", str(vids), "--out",
                           str(tmp_path / "o")], capsys)
    assert "'a cat on a sofa' has no <cls>" in err


def test_the_docstring_cites_the_paper_not_a_path_outside_the_repo():
    assert "../shared" not in dts.__doc__ and "Disentangled Identity and Motion" in dts.__doc__


def _bad_world(tmp):
    """Good inputs, bad ones to swap in, and an earlier run in tmp/out -> ({name: path}, checksum of tmp/out)."""
    from PIL import Image
    from safetensors.torch import save_file
    Image.new("RGB", (16, 16)).save(tmp / "ref.png")
    (tmp / "bad.png").write_bytes(b"not a png")
    (tmp / "a_file").write_text("x")
    for name, rec in (("pairs", dict(ref="a.png", prompt="a <cls> cat")), ("nocls", dict(ref="a.png", prompt="a cat")),
                      ("gone", dict(ref="gone.png", prompt="a <cls> cat"))):
        (tmp / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp / name / "a.png")
        (tmp / name / "pairs.jsonl").write_text(json.dumps(dict(rec, target="a.png")) + "\n")
    for name, captions in (("videos", ["a dog"]), ("uncaptioned", ["a dog", ""])):
        for i, caption in enumerate(captions):
            common.write_video(tmp / name / f"{i}.gif", torch.zeros(9, 3, 8, 8), 4)
            (tmp / name / f"{i}.txt").write_text(caption)
    for name, model in (("ckpt", "toy"), ("other", "THUDM/CogVideoX-2b"), ("damaged", "toy")):
        (tmp / name).mkdir()
        save_file({dts.CLS: torch.zeros(32)}, str(tmp / name / dts.CLS_FILE), metadata=dict(model=model))
        save_file({"x": torch.zeros(1)}, str(tmp / name / dts.LORA_FILE))
    (tmp / "damaged" / dts.LORA_FILE).write_bytes(b"\x00" * 40)
    (tmp / "empty").mkdir()
    (tmp / "nopairs").mkdir()
    (tmp / "nopairs" / "pairs.jsonl").write_text("\n")
    checksum = earlier_run(tmp / "out", ("config.json", dts.LORA_FILE, dts.CLS_FILE, "ckpt.pt", "result.mp4",
                                         "metrics.json", "log.jsonl"))
    return {q.stem: str(q) for q in tmp.iterdir()}, checksum


TOY = ["--model", "toy", "--out", "{out}", "--overwrite"]
TRAIN = ["train", "--model", "toy", "--pairs", "{pairs}", "--videos", "{videos}", "--out", "{out}", "--overwrite"]
SAMPLE = ["sample", "--model", "toy", "--ckpt", "{ckpt}", "--image", "{ref}", "--prompt", "a <cls> dog",
          "--out", "{out}"]
BAD = {  # argv -> the words of the one-line error
    "iterations -5": (TOY + ["--iterations", "-5"], "--iterations must be >= 0"),
    "steps 0": (TOY + ["--steps", "0"], "--steps must be >= 1"),
    "steps -1 (sample)": (SAMPLE + ["--steps", "-1"], "--steps must be >= 1"),
    "lr nan": (TOY + ["--lr", "nan"], "--lr must be a finite number"),
    "lr 0": (TOY + ["--lr", "0"], "--lr must be a finite number > 0"),
    "lr negative": (TOY + ["--lr=-1e-3"], "--lr must be a finite number > 0"),
    "rank 0": (TOY + ["--rank", "0"], "--rank must be >= 1"),
    "lora alpha 0": (TOY + ["--lora-alpha", "0"], "--lora-alpha must be a finite number > 0"),
    "lora dropout 2": (TOY + ["--lora-dropout", "2"], "--lora-dropout must be between 0 and 1"),
    "seed -1": (TOY + ["--seed", "-1"], "--seed must be between"),
    "p 1.5": (TOY + ["--p", "1.5"], "--p must be between 0 and 1"),
    "p-drop -0.1": (TOY + ["--p-drop=-0.1"], "--p-drop must be between 0 and 1"),
    "max-bad 2": (TRAIN + ["--max-bad", "2"], "--max-bad must be between 0 and 1"),
    "pair batch 0": (TOY + ["--pair-batch", "0"], "--pair-batch must be >= 1"),
    "video micro 0": (TOY + ["--video-micro", "0"], "--video-micro must be >= 1"),
    "pair batch not a multiple": (TOY + ["--pair-batch", "3", "--pair-micro", "2"], "is not a multiple of 2"),
    "grad clip inf": (TOY + ["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    "cfg -1": (TOY + ["--cfg", "-1"], "--cfg must be >= 0"),
    "warmup -1": (TOY + ["--warmup", "-1"], "--warmup must be >= 0"),
    "grad every -1": (TOY + ["--grad-every", "-1"], "--grad-every must be >= 0"),
    "sample every -1": (TOY + ["--sample-every", "-1"], "--sample-every must be >= 0"),
    "save every 0": (TOY + ["--save-every", "0"], "--save-every must be >= 1"),
    "fps 0": (SAMPLE + ["--fps", "0"], "--fps must be >= 1"),
    "num samples 0": (SAMPLE + ["--num-samples", "0"], "--num-samples must be >= 1"),
    "--sample-only without a run": (TOY[:2] + ["--out", "{empty}", "--sample-only"], "holds no pytorch_lora_weights"),
    "toy pairs 0": (TOY + ["--toy-pairs", "0"], "--toy-pairs must be >= 1"),
    "frames 10": (TOY + ["--frames", "10"], "4k+1 frames"),
    "height 30": (SAMPLE + ["--height", "30"], "multiples of 16"),
    "no pairs left for the probe": (TOY + ["--toy-pairs", "4", "--grad-every", "2"], "leave none to train on"),
    "--out holds a run": (["--model", "toy", "--out", "{out}"], "holds an earlier run"),
    "--out is a file": (TOY[:2] + ["--out", "{a_file}"], "is a file, not a folder"),
    "damaged ckpt.pt": (TOY[:-1] + ["--resume"], "cannot read the checkpoint"),
    "--model empty folder": (TRAIN + ["--model", "{empty}"], "holds no model_index.json"),
    "--model unknown": (TRAIN + ["--model", "{empty}/none"], "neither a local folder nor in the hub cache"),
    "train without --videos": (TRAIN[:5] + ["--out", "{out}"], "--pairs DIR and --videos DIR are needed"),
    "no pairs.jsonl": (TRAIN + ["--pairs", "{empty}"], "has no pairs.jsonl"),
    "pair file missing": (TRAIN + ["--pairs", "{gone}"], "records are bad"),
    "pair prompt without <cls>": (TRAIN + ["--pairs", "{nocls}"], "has no <cls>"),
    "no pair at all": (TRAIN + ["--pairs", "{nopairs}"], "0 usable image records leave none to train on"),
    "no video at all": (TRAIN + ["--videos", "{empty}"], "0 usable video records leave none to train on"),
    "--videos a file": (TRAIN + ["--videos", "{a_file}"], "is not a folder of videos"),
    "uncaptioned video": (TRAIN + ["--videos", "{uncaptioned}"], "records are bad"),
    "sample without --image": (SAMPLE[:5] + SAMPLE[7:], "--image REF and --prompt are needed"),
    "--ckpt without weights": (SAMPLE + ["--ckpt", "{empty}"], "holds no pytorch_lora_weights.safetensors"),
    "--ckpt damaged": (SAMPLE + ["--ckpt", "{damaged}"], "cannot read the trained weights"),
    "--ckpt of another model": (SAMPLE + ["--ckpt", "{other}"], "was trained on --model THUDM/CogVideoX-2b"),
    "--image not an image": (SAMPLE + ["--image", "{bad}"], "cannot read image"),
    "--image missing": (SAMPLE + ["--image", "{empty}/none.png"], "cannot read image"),
    "empty prompt": (SAMPLE + ["--prompt", " "], "--prompt is empty"),
    "prompt without <cls>": (SAMPLE + ["--prompt", "a dog"], "has no <cls>"),
    "sample --out a file": (SAMPLE + ["--out", "{a_file}"], "is a file, not a folder"),
    "--ablate on a real model": (TRAIN + ["--model", "THUDM/CogVideoX-5b", "--ablate"], "use it with --model toy"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_costs_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad input: exit code 2, one error line naming it (after any warnings about skipped records), no model
    loaded, the earlier run in --out unchanged."""
    paths, checksum = _bad_world(tmp_path)
    argv, words = BAD[case]
    check_bad_input(dts, [a.format(**paths) for a in argv], words, checksum, capsys, monkeypatch, warnings=True)
