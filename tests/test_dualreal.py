import copy
import json

import imageio.v3 as iio
import pytest
import torch

import common
import dualreal as dr_mod
import toyworld as tw
from helpers import check_bad_input, earlier_run, error_line

FAST = ["--model", "toy", "--iterations", "4", "--warmup", "0", "--steps", "3", "--log-every", "2"]


def _model(config=None, acting=True, groups=7, controller=True):
    """A random toy CogVideoX with DualReal hooked in; acting=True randomises every zero-initialised weight (the
    adapters' up and the controller's last layer), so that everything acts and gets gradients."""
    torch.manual_seed(0)
    model = tw.build_backbone("cogvideox", config).eval().requires_grad_(False)
    base = copy.deepcopy(model)
    dr = dr_mod.add_dualreal(model, 16, groups, 0.2, controller, 32)
    if acting:
        for name, p in dr.named_parameters():
            if ".up." in name or name.startswith("controller.mlp.3"):
                torch.nn.init.normal_(p, std=0.3)
    dr.c = torch.randn(1, 32)
    return model, base, dr


def _inputs(n=2, frames=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, frames, tw.LATENT_CHANNELS, 8, 8, generator=g), torch.tensor([700, 30][:n]),
            torch.randn(n, 16, 32, generator=g))


def test_at_initialisation_the_adapted_model_is_exactly_the_base_model():
    model, base, dr = _model(acting=False)
    for p in dr.controller.parameters():  # even with a perturbed controller: up = 0 is what preserves the model
        torch.nn.init.normal_(p, std=0.5)
    z, t, text = _inputs()
    assert torch.equal(dr_mod.denoise(model, z, t, text), dr_mod.denoise(base, z, t, text))
    assert dr.weights[0].shape == (2, 4)  # the controller ran, per sample, 4 blocks -> 4 groups


def test_controller_gives_one_tenth_each_at_init_and_always_sums_to_s():
    ctrl = dr_mod.StageBlender(64, 32, 7, 128, 0.2)
    g = torch.Generator().manual_seed(0)  # inputs that do not depend on the tests run before
    temb, pooled = torch.randn(5, 32, generator=g), torch.randn(5, 64, generator=g)
    alpha, beta = ctrl(temb, pooled)
    assert alpha.shape == (5, 7) and torch.equal(alpha, torch.full((5, 7), 0.1)) and torch.equal(beta, alpha)
    torch.manual_seed(0)
    for p in ctrl.parameters():
        torch.nn.init.normal_(p, std=0.5)
    alpha, beta = ctrl(temb, pooled)
    assert torch.allclose(alpha + beta, torch.full_like(alpha, 0.2), atol=1e-7)
    assert alpha.std() > 0.01 and (alpha >= 0).all() and (alpha <= 0.2).all()
    assert not torch.allclose(alpha[0], alpha[1])  # input-dependent
    fixed = dr_mod.DualReal(4, 64, 32, 32, 16, 4, 0.2, controller=False)  # --no-controller: direct fusion
    a, b = fixed.blend(temb, torch.randn(5, 10, 64))
    assert torch.equal(a, torch.full((5, 4), 0.1)) and torch.equal(b, a)


def test_controller_has_the_official_form():
    """Official controller: shift/scale/gate from SiLU(temb); LN (affine, eps 1e-5) of the encoded pooled tokens,
    modulated, through a 4x-wide tanh-GELU stage, plus the gated encoding; then ReLU-MLP and s sigmoid."""
    torch.manual_seed(0)
    ctrl = dr_mod.StageBlender(64, 32, 7, 128, 0.2)
    for p in ctrl.parameters():
        torch.nn.init.normal_(p, std=0.3)
    temb, pooled = torch.randn(5, 32), torch.randn(5, 64)
    shift, scale, gate = torch.nn.functional.linear(torch.nn.functional.silu(temb), *ctrl.modulation[1].parameters()
                                                    ).chunk(3, dim=-1)
    e = pooled @ ctrl.encode.weight.T + ctrl.encode.bias
    ln = torch.nn.functional.layer_norm(e, (32,), ctrl.norm.weight, ctrl.norm.bias, 1e-5)
    up, down = ctrl.fuse[0], ctrl.fuse[2]
    h = down(torch.nn.functional.gelu(up(ln * (1 + scale) + shift), approximate="tanh")) + gate * e
    want = 0.2 * torch.sigmoid(ctrl.mlp[3](torch.relu(ctrl.mlp[1](torch.relu(h)))))
    assert torch.allclose(ctrl(temb, pooled)[0], want, atol=1e-6)


def test_block_i_reads_group_i_times_7_over_num_layers():
    assert [dr_mod.group_of(i, 7, 42) for i in range(42)] == [i // 6 for i in range(42)]
    cfg = dict(tw.FAMILIES["cogvideox"]["config"], num_layers=8)
    model, _, dr = _model(cfg)
    want = [i * 7 // 8 for i in range(8)]
    assert dr.groups == want == [0, 0, 1, 2, 3, 4, 5, 6] and dr.n_groups == 7
    outs = []
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0].clone()))
    z, t, text = _inputs(1)
    outs[:] = [None] * 8
    dr_mod.denoise(model, z, t[:1], text[:1])
    first = list(outs)
    bias = dr.controller.mlp[-1].bias
    orig = bias.detach().clone()  # restored exactly each time (adding and subtracting 1 can round)
    for g in range(7):  # changing group g's weight first changes the first block of group g
        with torch.no_grad():
            bias[g] += 1.0
        dr_mod.denoise(model, z, t[:1], text[:1])
        with torch.no_grad():
            bias.copy_(orig)
        changed = [i for i in range(8) if not torch.equal(outs[i], first[i])]
        assert changed[0] == want.index(g), (g, changed)
    _, _, one = _model(groups=1)  # --no-grouping
    assert one.groups == [0, 0, 0, 0] and one.controller.mlp[-1].out_features == 1


def _snapshots(tmp_path, monkeypatch, kinds, flags=()):
    """Train the random acting model through `kinds` (True = motion step); parameters after every step."""
    model, _, dr = _model()
    args = dr_mod.parse_args(["--model", "toy", "--iterations", str(len(kinds)), "--warmup", "0", "--log-every",
                              "1000"] + list(flags))
    seq = iter(kinds)
    monkeypatch.setattr(dr_mod, "is_motion_step", lambda gen, gamma: next(seq))
    snaps = [{k: v.clone() for k, v in dr.state_dict().items()}]

    class Log:  # called once per step, after the optimiser step
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            snaps.append({k: v.clone() for k, v in dr.state_dict().items()})

    monkeypatch.setattr(common, "StepLog", Log)
    lat = dict(identity=torch.randn(3, 1, tw.LATENT_CHANNELS, 8, 8), motion=torch.randn(1, 3, tw.LATENT_CHANNELS, 8, 8))
    text = dict(identity=torch.randn(1, 16, 32), motion=torch.randn(1, 16, 32))
    dr_mod.train(model, dr, tw.noise_schedule("cogvideox").alphas_cumprod, lat, text, torch.randn(1, 32), args, {},
                 tmp_path)

    def moved(i, part):
        return {k.split(".")[0] for k in snaps[i] if k.startswith(part) and not torch.equal(snaps[i][k],
                                                                                           snaps[i + 1][k])}
    return [{part for part in ("identity", "motion", "controller") if moved(i, part)} for i in range(len(kinds))]


def test_dual_aware_steps_leave_the_other_kind_bitwise_unchanged(tmp_path, monkeypatch):
    # motion steps first give the motion adapters Adam moments; the identity step must not move them (and back)
    kinds = [True, True, False, True, False]
    moved = _snapshots(tmp_path, monkeypatch, kinds)
    assert moved == [{"motion", "controller"}, {"motion", "controller"}, {"identity", "controller"},
                     {"motion", "controller"}, {"identity", "controller"}]


def test_identity_steps_give_the_motion_adapters_no_condition(tmp_path, monkeypatch):
    """The official code skips W_cond (which has a bias) on identity steps; a motion step adds W_cond c + b."""
    given, forward = [], dr_mod.Adapter.forward

    def record(self, x, c=None):  # whether each motion adapter got a condition
        if self.cond is not None:
            given.append(c is not None)
        return forward(self, x, c)
    monkeypatch.setattr(dr_mod.Adapter, "forward", record)
    kinds = [False, True]
    _snapshots(tmp_path, monkeypatch, kinds)
    half = len(given) // 2  # one forward per step, the same motion adapters in each
    assert given and given == [False] * half + [True] * half


def test_without_dual_aware_both_kinds_learn_every_step(tmp_path, monkeypatch):
    moved = _snapshots(tmp_path, monkeypatch, [True, False, True], ["--no-dual-aware"])
    assert moved == [{"identity", "motion", "controller"}] * 3
    moved = _snapshots(tmp_path, monkeypatch, [True, False], ["--no-controller"])  # fixed weights: not trained
    assert moved == [{"motion"}, {"identity"}]


def test_loss_by_hand_is_the_weighted_x0_error():
    ac = tw.noise_schedule("cogvideox").alphas_cumprod

    class Zero(torch.nn.Module):  # predicts v = 0, so x0_hat = sqrt(ab) z_t
        dtype = torch.float32
        config = type("C", (), dict(use_rotary_positional_embeddings=False))

        def forward(self, z, text, t, image_rotary_emb=None, return_dict=False):
            return (torch.zeros_like(z),)

    z0 = torch.randn(2, 3, 4, 2, 2)
    loss = dr_mod.v_loss(Zero(), z0, torch.zeros(2, 1, 1), ac, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eps, t = torch.randn(z0.shape, generator=g), torch.randint(0, 1000, (2,), generator=g)
    ab = ac[t].float().view(2, 1, 1, 1, 1)
    x0_hat = ab.sqrt() * (ab.sqrt() * z0 + (1 - ab).sqrt() * eps)
    want = ((x0_hat - z0) ** 2).flatten(1).mean(1) / (1 - ab.view(2))
    assert torch.allclose(loss, want.mean(), rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_our_loop_equals_cogvideox_pipeline(sampler):
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline
    sched = tw.noise_schedule("cogvideox")
    if sampler == "dpm":
        sched = CogVideoXDPMScheduler.from_config(sched.config)
    text, uncond = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    noise = torch.randn(1, 9, tw.LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))

    def pipeline(transformer):
        pipe = CogVideoXPipeline(tokenizer=tw.tokenizer("t5"), text_encoder=tw.text_encoder("t5"), vae=tw.load_vae(),
                                 transformer=transformer, scheduler=copy.deepcopy(sched))
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(3)
        return pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=32, width=32, num_frames=9,
                    num_inference_steps=4, guidance_scale=4.0, latents=noise.clone(), output_type="latent").frames

    model, base, dr = _model(acting=False)  # zero adapters: our loop on the adapted model = the plain pipeline
    torch.manual_seed(3)
    ours = dr_mod.sample(model, copy.deepcopy(sched), text, uncond, noise.clone(), 4, 4.0)
    ref = pipeline(base)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    model, _, dr = _model()  # acting adapters and controller: the pipeline calls the same hooked transformer
    torch.manual_seed(3)
    ours = dr_mod.sample(model, copy.deepcopy(sched), text, uncond, noise.clone(), 4, 4.0)
    ref = pipeline(model)
    assert torch.allclose(ours, ref, atol=1e-5) and not torch.allclose(ours, pipeline(base), atol=1e-3)


def test_toy_end_to_end_writes_everything_and_sample_only_reuses_it(tmp_path):
    out = tmp_path / "run"
    metrics = dr_mod.main(FAST + ["--out", str(out), "--save-every", "2"])  # a checkpoint at step 2
    for name in ("adapters.safetensors", "config.json", "log.jsonl", "ckpt.pt", "result.mp4", "result_grid.mp4",
                 "metrics.json", "result/000.png", "result/008.png"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"identity", "motion", "leakage", "dynamics", "noise"}
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["height"], cfg["max_text_len"], cfg["sampler"]) == (32, tw.MAX_TOKENS, "ddim")
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 4]
    import safetensors.torch as st
    sd = st.load_file(out / "adapters.safetensors")
    assert len(sd) == 4 * 2 * 4 + 4 * 2 * 6 + 14  # adapters, motion adapters with W_cond, the controller's 7 layers
    assert sd["motion.ff.3.cond.weight"].shape == (64, 32) and sd["identity.attn.0.down.weight"].shape == (64, 64)
    assert sd["controller.mlp.3.weight"].shape == (4, 128)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if ".up." in k)  # it trained
    # what the controller chose: alpha per group, the latest of each step kind, and at every sampling step
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kinds = {k for line in log for k in ("alpha_identity", "alpha_motion") if k in line}
    assert kinds and all(len(line[k]) == 4 and all(0 < a < 0.2 for a in line[k]) for line in log for k in kinds)
    alphas = json.loads((out / "alpha_sample.json").read_text())
    assert len(alphas) == 3 and all(len(a) == 4 for a in alphas)  # 3 steps, guidance batched: one call each
    assert len({tuple(a) for a in alphas}) == 3 and all(a != 0.1 for step in alphas for a in step)  # t-dependent
    again = dr_mod.main(FAST + ["--out", str(out), "--sample-only"])
    assert again == metrics                                       # same adapters, same seed: the same clip


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = FAST + ["--iterations", "5", "--save-every", "2"]
    dr_mod.main(args + ["--out", str(tmp_path / "a")])
    calls, loss = [], dr_mod.v_loss

    def crash_at_step_3(*a, **k):  # interrupted during step 3: the checkpoint holds step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*a, **k)
    monkeypatch.setattr(dr_mod, "v_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dr_mod.main(args + ["--out", str(tmp_path / "b")])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2
    calls.clear()
    monkeypatch.setattr(dr_mod, "v_loss", lambda *a, **k: calls.append(1) or loss(*a, **k))
    dr_mod.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    assert len(calls) == 3                                        # steps 2, 3, 4: not from the start
    import safetensors.torch as st
    a = st.load_file(tmp_path / "a" / "adapters.safetensors")
    b = st.load_file(tmp_path / "b" / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "b" / "metrics.json").read_text())


def test_bad_inputs_end_with_one_line_before_any_model_loads(tmp_path, capsys):
    subj, mot = tw.ASSETS / "toy" / "subject", tw.ASSETS / "toy" / "motion"
    empty = tmp_path / "empty"
    empty.mkdir()
    toy = ["--model", "toy"]
    bad = lambda argv: error_line(dr_mod, argv, capsys)
    assert "--subject DIR and --motion VIDEO are needed" in bad([])
    assert "is not a folder" in bad(toy + ["--subject", str(tmp_path / "nope")])
    assert "has no image" in bad(toy + ["--subject", str(empty)])
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    assert "cannot read image" in bad(toy + ["--subject", str(junk)])
    assert "does not exist" in bad(toy + ["--motion", str(tmp_path / "no.mp4")])
    assert "holds neither frames" in bad(toy + ["--motion", str(empty)])
    short = tmp_path / "short"
    common.write_frames(short, tw.motion_clip()[:5])
    assert "has 5 frames, 9 are needed" in bad(toy + ["--motion", str(short)])
    assert "does not contain the placeholder" in bad(toy + ["--prompt", "a star moving left"])
    real = ["--subject", str(subj), "--motion", str(mot), "--frames", "9", "--prompt", "a sks star"]
    assert "neither a local folder nor in the hub cache" in bad(real + ["--model", str(tmp_path / "no")])
    assert "holds no model_index.json" in bad(real + ["--model", str(empty)])
    cached = tmp_path / "model"
    cached.mkdir()
    (cached / "model_index.json").write_text("{}")
    assert "real models need --prompt" in bad(real[:-2] + ["--model", str(cached)])
    assert "does not exist; train first" in bad(toy + ["--sample-only", "--out", str(empty)])
    assert "no checkpoint" in bad(toy + ["--resume", "--out", str(empty)])
    assert "use it with --model toy" in bad(real + ["--ablate"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.mp4").write_bytes(b"earlier")
    bad(toy + ["--prompt", "no placeholder", "--out", str(out)])
    assert (out / "result.mp4").read_bytes() == b"earlier" and len(list(out.iterdir())) == 1


def test_dry_run_loads_nothing(tmp_path, capsys):
    assert dr_mod.main(["--model", "toy", "--dry-run", "--out", str(tmp_path)]) is None
    out = capsys.readouterr().out
    assert "a sks star moving in a zigzag" in out and "ddim 20 steps" in out and "Loading" not in out


def test_the_bundled_task_is_prompted_as_the_paper_does():
    """The photos under 'a sks star' (code: identity captions name the subject only), the video under its own
    caption (the whole clip), and the sampling prompt, which the paper has an LLM write (supp. sec. 1, Prompts) and the
    toy world writes from its words."""
    _, _, prompts, _ = dr_mod.read_inputs(dr_mod.parse_args(["--model", "toy"]))
    assert prompts == dict(subject="a sks star", motion="a blue striped square moving in a zigzag on a gray background",
                           sample="a sks star moving in a zigzag on a gray background")


def test_the_real_loading_path_at_tiny_size(tmp_path):
    """The same load_models the real run uses, on a tiny CogVideoX pipeline saved as a local folder."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4, scaling_factor=0.7)
    cfg = dict(tw.FAMILIES["cogvideox"]["config"], in_channels=4, out_channels=4, num_layers=2, sample_width=4,
               sample_height=4, patch_size=2, temporal_compression_ratio=4)
    CogVideoXPipeline(tokenizer=tw.tokenizer("t5"), text_encoder=tw.text_encoder("t5"), vae=vae,
                      transformer=CogVideoXTransformer3DModel(**cfg), scheduler=tw.noise_schedule("cogvideox")
                      ).save_pretrained(tmp_path / "cogvideox")
    enc = str(tw.ASSETS / "encoders" / "clip_vision")
    args = dr_mod.parse_args(["--model", str(tmp_path / "cogvideox"), "--image-encoder", enc])
    m = dr_mod.load_models(args, torch.device("cpu"), torch.float32)
    assert type(m["transformer"]) is CogVideoXTransformer3DModel and type(m["vae"]) is AutoencoderKLCogVideoX
    assert type(m["scheduler"]) is CogVideoXDPMScheduler and m["scheduler"].config.rescale_betas_zero_snr
    ddim = dr_mod.parse_args(["--model", str(tmp_path / "cogvideox"), "--image-encoder", enc, "--sampler", "ddim"])
    assert type(dr_mod.load_models(ddim, torch.device("cpu"), torch.float32)["scheduler"]) is CogVideoXDDIMScheduler
    lat = common.cogvideox_encode(m["vae"], torch.rand(1, 9, 3, 32, 32) * 2 - 1)
    assert lat.shape == (1, 3, 4, 4, 4)                          # (B, F, C, h, w): 9 frames -> 3 latents
    assert dr_mod.image_embeds(m["image_encoder"], m["image_processor"], torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    # and the whole real run through main, train then sample-only
    run = ["--model", str(tmp_path / "cogvideox"), "--image-encoder", enc, "--prompt", "a sks star moving",
           "--subject", str(tw.ASSETS / "toy" /
           "subject"), "--motion", str(tw.ASSETS / "toy" / "motion"), "--height", "32", "--width", "32", "--frames",
           "9", "--max-text-len", "16", "--iterations", "2", "--warmup", "0", "--steps", "2",
           "--out", str(tmp_path / "run")]
    assert dr_mod.main(run) is None
    assert (tmp_path / "run" / "result" / "008.png").is_file() and (tmp_path / "run" / "result_grid.mp4").is_file()
    first = common.read_video(tmp_path / "run" / "result", 9)
    dr_mod.main(run + ["--sample-only"])
    assert torch.equal(common.read_video(tmp_path / "run" / "result", 9), first)


def test_every_ablation_is_a_valid_flag_set():
    assert list(dr_mod.ABLATIONS) == ["base", "full", "no dual-aware", "no controller", "no grouping", "gamma 0.25",
                                      "gamma 0.75"]
    base = vars(dr_mod.parse_args(["--model", "toy"]))
    rows = {name: vars(dr_mod.parse_args(["--model", "toy"] + flags)) for name, flags in dr_mod.ABLATIONS.items()}
    assert rows["full"] == base and rows["base"]["iterations"] == 0
    for name, row in rows.items():
        assert name == "full" or row != base, name
    assert rows["no dual-aware"]["no_dual_aware"] and rows["no controller"]["no_controller"]
    assert rows["no grouping"]["no_grouping"] and rows["gamma 0.75"]["gamma"] == 0.75
    assert len({tw.slug(n) for n in dr_mod.ABLATIONS}) == len(dr_mod.ABLATIONS)


def test_ablate_runs_every_variant_and_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # results/ and out/ land here, not in the repo
    rows = dr_mod.main(["--model", "toy", "--ablate", "--seeds", "1", "--iterations", "2", "--steps", "2"])
    assert list(rows) == list(dr_mod.ABLATIONS)
    for name in dr_mod.ABLATIONS:
        assert (tmp_path / "results" / "dualreal" / tw.slug(name) / "seed0" / "metrics.json").is_file(), name
    table = (tmp_path / "out" / "dualreal" / "ablations" / "table.md").read_text()
    assert table.count("\n| ") == len(dr_mod.ABLATIONS) + 1 and "| no grouping | " in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out/dualreal/ablations/gamma_0_25/seed0/config.json").read_text())
    assert cfg["gamma"] == 0.25 and not cfg["no_controller"]



def test_one_clip_is_one_motion_sample_and_batches_never_repeat_an_item(tmp_path, monkeypatch):
    """The official loader yields each clip once per batch: one reference clip is a motion batch of 1, not 3."""
    model, _, dr = _model()
    dr.weights = (torch.full((1, 7), 0.1),) * 2  # (alpha, beta), which no forward sets: v_loss is stubbed
    args = dr_mod.parse_args(["--model", "toy", "--iterations", "6", "--warmup", "0", "--log-every", "1000"])
    seen = []
    monkeypatch.setattr(dr_mod, "v_loss", lambda tr, z0, *a: seen.append(z0) or sum(p.sum() for p in dr.parameters()) * 0)
    kinds = iter([True, False, True, False, True, False])
    monkeypatch.setattr(dr_mod, "is_motion_step", lambda gen, gamma: next(kinds))
    one = dict(identity=torch.randn(3, 1, tw.LATENT_CHANNELS, 8, 8), motion=torch.randn(1, 3, tw.LATENT_CHANNELS, 8, 8))
    dr_mod.train(model, dr, tw.noise_schedule("cogvideox").alphas_cumprod, one, dict(identity=torch.randn(1, 16, 32),
                 motion=torch.randn(1, 16, 32)), torch.randn(1, 32), args, {}, tmp_path)
    assert [len(z) for z in seen[::2]] == [1, 1, 1]
    seen.clear()
    four = dict(one, motion=torch.randn(4, 3, tw.LATENT_CHANNELS, 8, 8))
    kinds = iter([True] * 6)
    monkeypatch.setattr(dr_mod, "is_motion_step", lambda gen, gamma: next(kinds))
    dr_mod.train(model, dr, tw.noise_schedule("cogvideox").alphas_cumprod, four, dict(identity=torch.randn(1, 16, 32),
                 motion=torch.randn(1, 16, 32)), torch.randn(4, 32), args, {}, tmp_path)
    for z in seen:  # 3 distinct clips each step
        assert len(z) == 3 and len({tuple(x.flatten()[:4].tolist()) for x in z}) == 3


def test_each_clip_gets_its_own_random_frame_for_c():
    videos = torch.arange(8.0)[:, None, None, None, None] + torch.arange(9.0)[None, :, None, None, None] / 10
    frames = dr_mod.condition_frames(videos.expand(8, 9, 3, 4, 4), 0)
    picked = [round(float(f.mean()) % 1 * 10) for f in frames]  # clip k frame i holds k + i / 10
    assert [int(f.mean()) for f in frames] == list(range(8)) and len(set(picked)) > 1


def test_motion_frames_are_consecutive_as_the_official_loader(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for i in range(20):  # frame i has brightness 10 i
        iio.imwrite(clip / f"{i:03d}.png", torch.full((32, 32, 3), i * 10, dtype=torch.uint8).numpy())
    (clip / "caption.txt").write_text(tw.motion_caption())  # the toy prompt is written from its words
    base = ["--model", "toy", "--motion", str(clip)]
    _, videos, _, _ = dr_mod.read_inputs(dr_mod.parse_args(base))
    assert [round(float((v.mean() + 1) / 2 * 255) / 10) for v in videos[0]] == list(range(9))
    _, spread, _, _ = dr_mod.read_inputs(dr_mod.parse_args(base + ["--motion-stride", "0"]))
    assert round(float((spread[0, -1].mean() + 1) / 2 * 255) / 10) == 19


def test_grad_ckpt_is_on_for_real_models_and_changes_no_gradient():
    assert dr_mod.parse_args(["--subject", "s", "--motion", "m"]).grad_ckpt
    assert not dr_mod.parse_args(["--model", "toy"]).grad_ckpt
    assert not dr_mod.parse_args(["--subject", "s", "--motion", "m", "--no-grad-ckpt"]).grad_ckpt
    grads = []
    for ckpt in (False, True):
        model, _, dr = _model()
        if ckpt:
            model.enable_gradient_checkpointing()
        model.train()  # diffusers checkpoints only in training mode with grad enabled
        z, t, text = _inputs()
        dr_mod.denoise(model, z, t, text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in dr.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_clip_condition_uses_the_models_own_preprocessing():
    """CLIPImageProcessor centre-crops a non-square photo (a hand-written square resize squashes it)."""
    from transformers import CLIPImageProcessor
    enc = tw.ASSETS / "encoders" / "clip_vision"
    encoder, processor = tw.image_encoder("clip_vision"), CLIPImageProcessor.from_pretrained(enc)
    torch.manual_seed(0)
    wide = torch.rand(1, 3, 32, 48) * 2 - 1
    full, crop = (dr_mod.image_embeds(encoder, processor, x) for x in (wide, wide[..., 8:40]))
    assert torch.allclose(full, crop, atol=1e-4)


def test_toy_run_with_bf16_frozen_weights(tmp_path):
    """--dtype bfloat16 on the CPU: the GPU's dtype path (frozen bf16 backbone, fp32 adapters) runs end to end."""
    metrics = dr_mod.main(FAST + ["--dtype", "bfloat16", "--num-samples", "1", "--out", str(tmp_path)])
    assert (tmp_path / "adapters.safetensors").is_file() and all(v == v for v in metrics.values())


RUN = ("config.json", "adapters.safetensors", "ckpt.pt", "result.mp4", "metrics.json")  # what a run leaves


BAD = {  # flags -> the words the one-line error must hold
    "iterations -5": (["--iterations", "-5"], "--iterations must be >= 0"),
    "steps 0": (["--steps", "0"], "--steps must be >= 1"),
    "steps -1": (["--steps", "-1"], "--steps must be >= 1"),
    "num-samples 0": (["--num-samples", "0"], "--num-samples must be >= 1"),
    "lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "lr 0": (["--lr", "0"], "--lr must be a finite number > 0"),
    "lr negative": (["--lr=-1e-3"], "--lr must be a finite number > 0"),
    "rank 0": (["--rank", "0"], "--rank must be >= 1"),
    "seed -1": (["--seed", "-1"], "--seed must be between"),
    "gamma 1.5": (["--gamma", "1.5"], "--gamma must be between 0 and 1"),
    "motion batch 0": (["--motion-batch", "0"], "--motion-batch must be >= 1"),
    "identity batch 0": (["--identity-batch", "0"], "--identity-batch must be >= 1"),
    "groups 0": (["--groups", "0"], "--groups must be >= 1"),
    "s 0": (["--blend-scale", "0"], "--blend-scale must be a finite number > 0"),
    "grad clip inf": (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    "cfg -1": (["--cfg", "-1"], "--cfg must be >= 0"),
    "cfg nan": (["--cfg", "nan"], "--cfg must be a finite number"),
    "gamma inf": (["--gamma", "inf"], "--gamma must be a finite number"),
    "ablate, seeds 0": (["--ablate", "--seeds", "0"], "--seeds must be >= 1"),
    "warmup -1": (["--warmup", "-1"], "--warmup must be >= 0"),
    "save every 0": (["--save-every", "0"], "--save-every must be >= 1"),
    "log every 0": (["--log-every", "0"], "--log-every must be >= 1"),
    "frames 10": (["--frames", "10"], "4k+1 frames"),
    "height 30": (["--height", "30"], "multiples of 16"),
    "motion end before start": (["--motion-start", "4", "--motion-end", "2"], "must be after --motion-start"),
    "empty prompt": (["--prompt", ""], "--prompt is empty"),
    "blank class word": (["--class-word", "  "], "--class-word is empty"),
    "empty motion caption": (["--motion-caption", ""], "--motion-caption is empty"),
    "prompt without placeholder": (["--prompt", "a star moving"], "does not contain the placeholder"),
    "toy caption without motion words": (["--motion-caption", "a blue square"], "names no toy motion and background"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_flags_cost_nothing(case, tmp_path, capsys, monkeypatch):
    """Each bad flag: exit code 2, one line naming it, no model loaded, the earlier run in --out unchanged."""
    checksum = earlier_run(tmp_path / "out", RUN)
    flags, words = BAD[case]
    argv = ["--model", "toy", "--out", str(tmp_path / "out"), "--overwrite"] + flags
    check_bad_input(dr_mod, argv, words, checksum, capsys, monkeypatch)


def test_bad_files_cost_nothing(tmp_path, capsys, monkeypatch):
    """Bad paths and files, each before any model loads and leaving the earlier run as it was."""
    out = tmp_path / "out"
    checksum = earlier_run(out, RUN)
    toy = ["--model", "toy", "--out", str(out)]
    subject = tmp_path / "subject"
    subject.mkdir()
    iio.imwrite(subject / "0.png", common.to_uint8(tw.subject_images()[0][0]))
    (subject / "prompt.txt").write_text("\n")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)
    (tmp_path / "a_file").write_text("x")
    cases = [(toy, "holds an earlier run"),
             (["--model", "toy", "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
             (toy + ["--overwrite", "--subject", str(subject)], "prompt.txt is empty"),
             (toy + ["--overwrite", "--motion", str(video)], "cannot read video"),
             (toy + ["--resume"], "cannot read the checkpoint"),
             (toy + ["--sample-only"], "cannot read"),
             (toy + ["--overwrite", "--subject", str(tmp_path / "a_file")], "is not a folder")]
    for argv, words in cases:
        check_bad_input(dr_mod, argv, words, checksum, capsys, monkeypatch)


def test_samples_are_written_during_training_without_changing_it(tmp_path):
    """--sample-every k: out/samples/step_k.mp4 from fixed noise; the training is the same as without previews."""
    import safetensors.torch as st
    dr_mod.main(FAST + ["--out", str(tmp_path / "a"), "--sample-every", "2", "--num-samples", "1"])
    dr_mod.main(FAST + ["--out", str(tmp_path / "b"), "--sample-every", "0", "--num-samples", "1"])
    assert sorted(q.name for q in (tmp_path / "a" / "samples").iterdir()) == ["step_000002.mp4", "step_000004.mp4"]
    assert not (tmp_path / "b" / "samples").exists()
    a, b = (st.load_file(tmp_path / r / "adapters.safetensors") for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
