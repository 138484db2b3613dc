import functools
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import evaluate as ev
import toyworld as tw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random CLIP (+ the toy world's CLIP tokenizer), DINO ViT and aesthetic head, saved like hub folders."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = tw.tokenizer("clip")
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=dict(layers, vocab_size=len(tok), max_position_embeddings=16, pad_token_id=0,
                                          bos_token_id=3, eos_token_id=1),
                         vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)
              ).save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    ViTModel(ViTConfig(**layers, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    torch.save(torch.nn.Linear(16, 1).state_dict(), root / "head.pth")
    return root


def shifted_clip(size, frames, dx, pad=None):
    """A smooth random texture moving dx px right per frame (crops of one larger texture, no wrap-around)."""
    pad = pad or abs(dx) * frames + 4
    noise = torch.rand(1, 3, (size + 2 * pad) // 4, (size + 2 * pad) // 4, generator=torch.Generator().manual_seed(1))
    t = F.interpolate(noise, size=(size + 2 * pad,) * 2, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return torch.stack([t[:, pad:pad + size, pad - dx * i:pad - dx * i + size] for i in range(frames)])


# -----------------------------------------------------------------------------
# appearance metrics with tiny random encoders, loaded as main loads them


def test_clip_preprocessing_matches_the_clip_image_processor():
    from PIL import Image
    from transformers import CLIPImageProcessor
    x = F.interpolate(torch.rand(1, 3, 10, 12, generator=torch.Generator().manual_seed(0)), size=(40, 48),
                      mode="bilinear")
    img = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=img, return_tensors="pt").pixel_values
    ours = ev.clip_pixels(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255, 32)
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 0.03   # PIL's bicubic vs torch's


def test_dino_preprocessing_sizes_and_imagenet_statistics():
    grey = torch.full((1, 3, 300, 400), 0.5)
    expect = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    x = ev.dino_i_pixels(grey, 224)                              # DreamBooth: resize 256, centre crop 224
    assert x.shape == (1, 3, 224, 224) and torch.allclose(x[0, :, 0, 0], expect, atol=1e-4)
    x = ev.vbench_dino_pixels(grey, 224)                         # VBench: shorter side 224, no crop (298.7 floored)
    assert x.shape == (1, 3, 224, 298) and torch.allclose(x[0, :, 0, 0], expect, atol=1e-4)
    # the crop is the centre: a bright centre column survives, the left edge is cut
    bar = torch.zeros(1, 3, 256, 512)
    bar[..., :, 250:262] = 1
    assert ev.dino_i_pixels(bar, 224)[0, 0, :, 107:117].min() > 2 and ev.dino_i_pixels(bar, 224).shape[-1] == 224


def test_clip_metrics_top_scores_and_scale(tiny):
    model, tok = ev.load_clip(str(tiny / "clip"), "--clip")
    g = torch.Generator().manual_seed(0)
    still = torch.rand(1, 3, 40, 48, generator=g).expand(5, -1, -1, -1)
    assert ev.temporal_consistency(model, still) == pytest.approx(100, abs=1e-3)
    assert ev.temporal_consistency(model, still, all_pairs=True, scale=1) == pytest.approx(1, abs=1e-5)
    assert ev.clip_i(model, still, still[:1]) == pytest.approx(100, abs=1e-3)
    noise = torch.rand(5, 3, 40, 48, generator=g)
    # all pairs (i < j) vs consecutive differ on a clip whose frames differ
    assert ev.temporal_consistency(model, noise) != pytest.approx(ev.temporal_consistency(model, noise, True))
    t = ev.clip_t(model, tok, noise, "a red star moving left")
    assert ev.clip_t(model, tok, noise, "a red star moving left", scale=1) == pytest.approx(t / 100)
    # CLIP-T is 100 x the mean cosine of each frame with the text, here from the model's own calls (the pixels from
    # CLIPImageProcessor, which clip_pixels matches within 0.03 above)
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=list(noise), do_rescale=False,
                                                         return_tensors="pt").pixel_values).pooler_output
        ids = tok(["a red star moving left"], return_tensors="pt")
        txt = model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
    assert t == pytest.approx(100 * float(F.cosine_similarity(img, txt).mean()), abs=0.5)


def test_dino_metrics_identical_frames_score_1(tiny):
    dino = ev.load_dino(str(tiny / "dino"), "--dino")
    frame = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))   # non-square: positions interpolated
    assert ev.subject_consistency(dino, frame.expand(4, -1, -1, -1)) == pytest.approx(1, abs=1e-5)
    assert ev.dino_i(dino, frame.expand(3, -1, -1, -1), frame) == pytest.approx(1, abs=1e-5)
    other = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    assert ev.dino_i(dino, other, frame) < 1 - 1e-4


def test_vbench_subject_consistency_clamps_negative_cosines():
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    # i=1: prev cos -1 -> 0, first cos -1 -> 0: 0;  i=2: prev -1 -> 0, first +1: 0.5;  mean 0.25 (unclamped: -0.5)
    assert ev.vbench_consistency(f) == pytest.approx(0.25)
    assert ev.vbench_consistency(torch.tensor([[1.0, 2.0]] * 3)) == pytest.approx(1.0)


def test_optional_metrics_formulas(tiny):
    model, tok = ev.load_clip(str(tiny / "clip"), "--clip")
    frames = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cos = F.cosine_similarity(ev.clip_images(model, frames), ev.clip_texts(model, tok, ["a star"])).mean()
    expected = float(model.logit_scale.detach().exp() * cos)
    assert ev.pickscore(model, tok, frames, "a star") == pytest.approx(expected, rel=1e-4)
    head = torch.nn.Linear(16, 1).requires_grad_(False)
    assert ev.aesthetic(model, head, frames) == pytest.approx(
        float(head(ev.clip_images(model, frames)).mean()) / 10, rel=1e-4)


# -----------------------------------------------------------------------------
# motion fidelity (DMT's formula) and its trackers


def random_tracks(n=30, t=6, seed=0):
    return torch.randn(n, t, 2, generator=torch.Generator().manual_seed(seed)).cumsum(1)


def test_motion_fidelity_same_opposite_speed_static():
    tracks = random_tracks()
    assert ev.motion_fidelity_score(tracks, tracks, subtract_identity=False) == pytest.approx(1, abs=1e-5)
    # DMT subtracts the identity: a track may not match itself, so distinct tracks score below 1
    assert ev.motion_fidelity_score(tracks, tracks) < 0.9
    # speed-invariant: the same directions at twice the speed
    assert ev.motion_fidelity_score(2 * tracks, tracks) == pytest.approx(ev.motion_fidelity_score(tracks, tracks))
    # opposite direction: every track moves right in one, left in the other
    right = torch.arange(6.0)[None, :, None] * torch.tensor([1.0, 0.0]) + torch.rand(10, 1, 2)
    assert ev.motion_fidelity_score(right, right, subtract_identity=False) == pytest.approx(1)
    assert ev.motion_fidelity_score(right.flip(1), right, subtract_identity=False) == pytest.approx(-1)
    # static points: no NaN (DMT divides 0 by 0 there)
    static = torch.zeros(10, 6, 2)
    for a, b in ((static, right), (right, static), (static, static)):
        for eye in (True, False):
            assert not np.isnan(ev.motion_fidelity_score(a, b, eye))


def test_grid_and_box():
    pts = ev.grid_points(64, 128, 55)
    assert pts.shape == (55 * 55, 2) and pts[:, 0].min() == 2 and pts[:, 0].max() == 125   # inset w / 64
    box = (10, 20, 40, 30)
    inside = ev.grid_points(64, 128, 55, box)
    assert 0 < len(inside) < len(pts) and (inside[:, 0] >= 10).all() and (inside[:, 1] <= 30).all()


def test_mask_box(tmp_path):
    import imageio.v3 as iio
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[5:9, 10:31] = 255
    iio.imwrite(tmp_path / "m.png", mask)
    assert ev.mask_box(tmp_path / "m.png", 40, 80) == (20, 10, 61, 17)   # (x0, y0, x1, y1) at twice the size


def test_flow_tracks_follow_a_shifted_texture():
    clip = shifted_clip(32, 4, 2)
    tracks = ev.flow_tracks(ev.toy_flow, clip, ev.grid_points(32, 32, 5, box=(8, 8, 23, 23)))
    steps = tracks.diff(dim=1)
    assert torch.allclose(steps.mean((0, 1)), torch.tensor([2.0, 0.0]), atol=0.15)


def test_motion_fidelity_end_to_end_on_toy_clips():
    tracker = functools.partial(ev.flow_tracks, ev.toy_flow)
    gen = torch.Generator().manual_seed(0)
    ref = (tw.render([dict(tw.MOTION_SPRITE, motion="right", background="gray")], gen)[0] + 1) / 2
    same = ev.motion_fidelity(tracker, ref, ref, grid=10, subtract_identity=False)
    reverse = ev.motion_fidelity(tracker, ref.flip(0), ref, grid=10, subtract_identity=False)
    still = ev.motion_fidelity(tracker, ref[:1].expand(9, -1, -1, -1), ref, grid=10)
    assert same == pytest.approx(1, abs=0.02) and reverse < -0.8 and abs(still) < 0.1


def test_raft_is_loaded_from_a_weights_file_and_pads_to_multiples_of_8(tmp_path):
    from torchvision.models.optical_flow import raft_large
    torch.save(raft_large(weights=None).state_dict(), tmp_path / "raft.pth")
    flow = ev.load_flow("raft", str(tmp_path / "raft.pth"))
    with torch.no_grad():
        assert flow(torch.rand(1, 3, 130, 140), torch.rand(1, 3, 130, 140)).shape == (1, 2, 130, 140)
    with pytest.raises(common.InputError, match="--flow raft needs --raft-weights"):
        ev.load_flow("raft", str(tmp_path / "missing.pth"))


# -----------------------------------------------------------------------------
# dynamic degree (VBench)


def test_dynamic_threshold_scales_with_resolution_and_fps():
    assert ev.dynamic_threshold(256, 256) == 6
    assert ev.dynamic_threshold(480, 832) == pytest.approx(6 * 480 / 256)
    assert ev.dynamic_threshold(32, 32) == pytest.approx(0.75)
    assert ev.dynamic_threshold(256, 256, fps=4) == 12 and ev.dynamic_threshold(256, 256, fps=24) == 6


def test_dynamic_degree_static_and_moving():
    clip = shifted_clip(256, 5, 10, pad=48)
    moving, magnitude = ev.dynamic_degree(ev.toy_flow, clip)
    assert moving and magnitude == pytest.approx(10, abs=1)
    still, magnitude = ev.dynamic_degree(ev.toy_flow, clip[:1].expand(5, -1, -1, -1))
    assert not still and magnitude < 0.1
    slow, magnitude = ev.dynamic_degree(ev.toy_flow, shifted_clip(256, 5, 5, pad=32))   # under the 6 px threshold
    assert not slow and magnitude == pytest.approx(5, abs=1)


def test_every_8fps_as_vbench():
    x = torch.arange(48)
    assert ev.every_8fps(x, 24).tolist() == list(range(0, 48, 3)) and ev.every_8fps(x, 8).tolist() == x.tolist()


# -----------------------------------------------------------------------------
# tables and composites


def test_composites_by_hand():
    rows = {"A": dict(x=0.8, leakage=0.1), "B": dict(x=0.4, leakage=0.2), "C": dict(x=0.4, leakage=0.05)}
    comp, skipped = ev.composites(rows, ["x", "leakage"])
    # ranks: x (higher better) A 1, B 2.5, C 2.5; leakage (lower better) C 1, A 2, B 3
    assert [comp[n]["rank"] for n in "ABC"] == [1.5, 2.75, 1.75]
    # normalised: x A 100, B 50, C 50; leakage best / value: A 50, B 25, C 100
    assert [comp[n]["normalised"] for n in "ABC"] == pytest.approx([75, 37.5, 75])
    # plain mean, leakage negated
    assert [comp[n]["mean"] for n in "ABC"] == pytest.approx([0.35, 0.1, 0.175]) and skipped == []
    # a zero leakage is the best possible; a negative column is left out of "normalised"
    comp, skipped = ev.composites({"A": dict(leakage=0.0, motion=-0.5), "B": dict(leakage=0.2, motion=0.5)},
                                  ["leakage", "motion"])
    assert comp["A"]["normalised"] == 100 and comp["B"]["normalised"] == 0 and skipped == ["motion"]


def test_table_of_two_method_metrics(tmp_path, capsys):
    for name, m in dict(smrabooth=dict(identity=0.9, motion=0.8, leakage=0.1, dynamics=2.0),
                        jointtuner=dict(identity=0.7, motion=0.9, leakage=0.0, dynamics=3.0)).items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    ev.main(["--table", str(tmp_path / "smrabooth" / "metrics.json"), str(tmp_path / "jointtuner" / "metrics.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| method | identity (toy fraction) ↑ |") and "leakage (toy fraction) ↓" in out[0]
    assert "mean rank ↓" in out[0] and out[2].startswith("| smrabooth | 0.900 | 0.800 | 0.100 | 2.000 | 1.75 |")
    assert out[3].startswith("| jointtuner |") and any(line.startswith("Scales:") for line in out)


# -----------------------------------------------------------------------------
# the command line


def test_missing_model_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    common.write_frames(tmp_path / "v", tw.motion_clip())
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, [str(tmp_path / "v"), "--prompt", "a star", "--metrics", "clip_t", "--clip",
                             str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --clip")
    (tmp_path / "ct.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "cotracker", None)   # as where the co-tracker code is not installed
    for argv in (["--metrics", "clip_t"], ["--metrics", "nope"], ["--motion", str(tmp_path / "none")],
                 ["--motion", str(tmp_path / "v"), "--metrics", "motion_fidelity",
                  "--cotracker", str(tmp_path / "ct.pth")],
                 ["--metrics", "dynamic_degree", "--flow", "raft"]):
        with pytest.raises(SystemExit) as e:
            common.cli(ev.main, [str(tmp_path / "v")] + argv)
        assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_toy_metrics_need_the_reference_motions_frames_as_toyworld_eval(tmp_path, capsys):
    common.write_frames(tmp_path / "v", tw.motion_clip())
    common.write_frames(tmp_path / "one", tw.motion_clip()[:1])
    for run in (lambda: common.cli(ev.main, [str(tmp_path / "v"), "--toy", "--motion", str(tmp_path / "one")]),
                lambda: common.cli(tw.main, ["eval", str(tmp_path / "v"), "--motion", str(tmp_path / "one")])):
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "frame" in err


def test_cli_toy_world_metrics_to_json(tmp_path):
    gen = torch.Generator().manual_seed(0)
    clip = tw.render([dict(tw.SUBJECT, motion="zigzag", background="white")], gen)[0]
    common.write_frames(tmp_path / "run" / "result", clip)
    out = tmp_path / "run" / "metrics.json"
    ev.main([str(tmp_path / "run" / "result"), "--toy", "--json", str(out)])
    m = json.loads(out.read_text())
    assert m["identity"] > 0.9 and m["leakage"] < 0.1 and m["motion"] > 0.9 and m["dynamics"] > 1
    assert m["noise"] < 1e-6
    assert set(m["videos"]) == {str(tmp_path / "run" / "result")}
    rows, _ = ev.read_metrics([out])   # what --table reads: the run folder's name, the metrics only
    assert rows == {"run": {k: m[k] for k in ("identity", "leakage", "motion", "dynamics", "noise")}}


def test_cli_every_metric_with_tiny_models(tiny, tmp_path):
    common.write_frames(tmp_path / "v", tw.motion_clip())
    clip = str(tiny / "clip")
    m = ev.main([str(tmp_path / "v"), "--prompt", "a blue square", "--subject", str(tw.ASSETS / "toy" / "subject"),
                 "--motion", str(tw.ASSETS / "toy" / "motion"), "--metrics", ",".join(ev.METRICS[:-1]),
                 "--clip", clip, "--dino", str(tiny / "dino"), "--dino-sc", str(tiny / "dino"), "--pickscore", clip,
                 "--pickscore-processor", clip, "--aesthetic-clip", clip, "--aesthetic-head", str(tiny / "head.pth"),
                 "--grid", "6", "--json", str(tmp_path / "m.json")])
    assert set(ev.METRICS[:-1]) | {"dynamic_magnitude"} <= set(m)
    assert all(np.isfinite(m[k]) for k in ev.METRICS[:-1])
    assert m["temporal_consistency"] <= 100 and m["dynamic_degree"] == 1.0   # the zigzag hops 5 px at 32 px
    assert m["info"]["motion_tracker"] == "integrated optical flow: toyworld.toy_flow"
    assert m["info"]["clip_scale"] == 100


def test_table_averages_the_seeds_of_an_ablation_run(tmp_path):
    paths = []
    for method, variant, seed, ident in [("smrabooth", "full", 0, 0.5), ("smrabooth", "full", 1, 1.0),
                                         ("dualreal", "full", 0, 0.25)]:
        p = tmp_path / "results" / method / variant / f"seed{seed}" / "metrics.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(dict(identity=ident, motion=0.5)))
        paths.append(p)
    rows, _ = ev.read_metrics(paths)
    assert rows == {"smrabooth/full (2 seeds)": dict(identity=0.75, motion=0.5),
                    "dualreal/full": dict(identity=0.25, motion=0.5)}


def test_paired_comparison_by_hand(tmp_path):
    for variant, idents, leaks in [("base", [0.1, 0.2, 0.3], [0.1, 0.1, 0.1]),
                                   ("full", [0.3, 0.3, 0.3], [0.0, 0.05, 0.0])]:
        for seed, (i, l) in enumerate(zip(idents, leaks)):
            p = tmp_path / variant / f"seed{seed}" / "metrics.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps(dict(identity=i, leakage=l)))
    seeds, res = ev.paired(tmp_path / "base", tmp_path / "full")
    assert seeds == ["seed0", "seed1", "seed2"]
    # identity: B - A = 0.2, 0.1, 0.0 -> mean 0.1, sample std 0.1, SE 0.1 / sqrt(3) = 0.058; 0.1 < 2 SE
    ident = res["identity"]
    assert ident["diff"] == pytest.approx(0.1) and ident["se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert ident["ahead"] == 2 and not ident["beats"]
    # leakage is lower-is-better: A - B = 0.1, 0.05, 0.1 -> mean 0.0833, SE 0.0289 / sqrt(3) = 0.0167
    leak = res["leakage"]
    assert leak["diff"] == pytest.approx(0.25 / 3) and leak["ahead"] == 3 and leak["beats"]
    with pytest.raises(common.InputError, match="--paired needs at least two seeds"):  # one has no standard error
        ev.paired(tmp_path / "base", tmp_path / "nothing")


def test_grad_cosine_draws_the_gradient_logs_of_two_runs(tmp_path, capsys):
    logs = []
    for name, cos in (("p_0", 0.8), ("p_0_2", 0.1)):
        log = tmp_path / name / "seed0" / "grad_log.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps(dict(step=s, cos=cos, norm_img=1.0, norm_vid=2.0)) + "\n" for s in (0, 2)))
        logs.append(str(log))
    ev.main(["--grad-cosine", str(tmp_path / "fig5.png")] + logs)
    assert (tmp_path / "fig5.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, ["--grad-cosine", str(tmp_path / "x.png"), str(tmp_path / "none.jsonl")])
    assert e.value.code == 2 and "no gradient log" in capsys.readouterr().err


def test_alpha_trace_averages_dualreals_controller_over_runs(tmp_path, capsys):
    """--alpha: alpha per group at the last logged step of each kind and at the first and last sampling steps, the
    mean over the runs; rows logged before both kinds ran are skipped, a step logged twice (--resume) counts its
    last row; a run without alpha_sample.json, or of another length, is one line."""
    runs = []
    for k, shift in enumerate((0.0, 0.2)):
        run = tmp_path / f"seed{k}"
        run.mkdir()
        rows = [dict(step=10, alpha_identity=[0.5, 0.5]),  # no motion step yet
                dict(step=20, alpha_identity=[0.1 + shift, 0.2], alpha_motion=[0.3, 0.4 + shift]),
                dict(step=30, alpha_identity=[0.9, 0.9], alpha_motion=[0.9, 0.9]),  # overwritten on resume
                dict(step=30, alpha_identity=[0.12 + shift, 0.2], alpha_motion=[0.05, 0.06 + shift], lr=0.1)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "alpha_sample.json").write_text(json.dumps([[0.1, 0.2 + shift], [0.3, 0.4], [0.5 + shift, 0.6]]))
        runs.append(str(run))
    table = ev.main(["--alpha", str(tmp_path / "alpha.png")] + runs)
    assert (tmp_path / "alpha.png").stat().st_size > 1000
    lines = table.splitlines()
    assert lines[2] == "| training, last identity step | 0.220 | 0.200 |"
    assert lines[3] == "| training, last motion step | 0.050 | 0.160 |"
    assert lines[4] == "| sampling, first step | 0.100 | 0.300 |"
    assert lines[5] == "| sampling, last step | 0.600 | 0.600 |"
    (tmp_path / "seed1" / "alpha_sample.json").write_text(json.dumps([[0.1, 0.2]]))
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, ["--alpha", str(tmp_path / "x.png")] + runs)
    assert e.value.code == 2 and "differ in sampling steps" in capsys.readouterr().err
    (tmp_path / "seed1" / "alpha_sample.json").unlink()
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, ["--alpha", str(tmp_path / "x.png")] + runs)
    assert e.value.code == 2 and "no alpha_sample.json" in capsys.readouterr().err
