"""bench.py on the CPU: the --tiny run writes every promised field, no GPU means a message and no crash, and the
analytic Wan FLOP count matches performance.md's 129 TFLOP forward at 49x480x832."""
import json
import math

import pytest
import torch

import bench
import common
import jointtuner

FIELDS = {"method", "setting", "grad_ckpt", "step_s", "peak_mem", "tflops", "sample_step_s", "sample_s", "pipeline_s",
          "pipeline_ratio"}


def positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_runs_every_method(tmp_path):
    rows = bench.main(["--tiny", "--json", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and saved["gpu"] and saved["date"]
    assert {r["method"] for r in rows} == {"smrabooth", "jointtuner", "dualreal", "dual_task_sdv"}
    for r in rows:
        assert set(r) == FIELDS
        assert r["peak_mem"] in (None, "n/a")  # no CUDA memory on the CPU
        assert positive(r["sample_step_s"]) and positive(r["sample_s"])
        if r["method"] == "dual_task_sdv":  # no diffusers pipeline takes reference tokens
            assert r["pipeline_s"] is None and r["pipeline_ratio"] is None
        else:
            assert positive(r["pipeline_s"]) and positive(r["pipeline_ratio"])
        assert positive(r["step_s"]) and positive(r["tflops"])
    assert len(rows) == 12  # with and without checkpointing: 2 SMRABooth settings, JointTuner, DualReal, 2 dual-task


def test_jointtuner_is_timed_with_its_checkpointing_by_hand():
    """diffusers' UNet3D offers no gradient checkpointing; jointtuner's --grad-ckpt does it by hand, and bench times
    it so (it said n/a), then gives the blocks their own forward back."""
    setting, unet, loss_fn, params, _ = next(bench.jointtuner_steps(True, "cpu", torch.float32))
    rows = bench.measure_training(unet, loss_fn, params, bench.parse_args(["--tiny", "--iters", "1", "--warmup", "0"]),
                                  "cpu")
    assert [r[0] for r in rows] == [False, True] and all(positive(r[1]) and positive(r[3]) for r in rows), rows
    assert not any("forward" in vars(b) for b in bench.blocks_of(unet))


def test_methods_flag_selects(tmp_path):
    rows = bench.main(["--tiny", "--methods", "dualreal"])
    assert {r["method"] for r in rows} == {"dualreal"}
    with pytest.raises(common.InputError, match="--methods: unknown nosuch"):
        bench.main(["--tiny", "--methods", "nosuch"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_no_gpu_exits_cleanly(capsys):
    assert bench.main([]) is None
    assert "no CUDA device is available" in capsys.readouterr().out


def test_wan_flops_match_spec():
    assert bench.wan_forward_flops(49, 480, 832) == pytest.approx(129e12, rel=0.05)
    assert bench.wan_forward_flops(81, 480, 832) == pytest.approx(283e12, rel=0.05)


# --estimate: the meta device's count is the count of a real run


def test_meta_storages_are_shared_by_views():
    a = torch.empty(4, 4, device="meta")
    assert a.untyped_storage().nbytes() == 64
    assert a.t().untyped_storage()._cdata == a[1:].untyped_storage()._cdata == a.untyped_storage()._cdata
    assert torch.empty(4, 4, device="meta").untyped_storage()._cdata != a.untyped_storage()._cdata


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_tensors_counts_each_storage_once_and_no_weight(device):
    lin = torch.nn.Linear(8, 8, bias=False, device=device)  # its weight: 256 bytes
    x = torch.randn(4, 8, device=device, requires_grad=True)  # 128 bytes

    def loss_fn():
        h = lin(x)  # saves x and the weight
        return (h * h).sum() + (h.t() * h.t()).sum()  # saves h four times: two views of one storage
    _, counter = bench.count_saved(loss_fn, bench.weights_of([lin]), [])
    assert counter.total() == 128 + 128  # x and h, once each; the weight is the weights' bytes


def layer_norm_shortfall(model):
    """Hooks that add up by how many bytes a CPU run's saved LayerNorm statistics fall short of meta's: for bf16
    input and weight the CPU kernel keeps mean and rstd in bf16, the meta kernel (like CUDA's) in fp32."""
    short = [0]

    def hook(module, args, out):
        if out.grad_fn is not None and out.grad_fn.name() == "NativeLayerNormBackward0":
            short[0] += sum(s.numel() * (4 - s.element_size()) for s in (out.grad_fn._saved_result1,
                                                                         out.grad_fn._saved_result2))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    return short, handles


@pytest.mark.parametrize("method, dtype", [(m, torch.bfloat16) for m in bench.STEPS] + [("dualreal", torch.float32)])
def test_estimate_on_meta_equals_a_real_cpu_step(method, dtype):
    """Each tiny training step traced on meta and run on the CPU: the same saved bytes (with bf16 frozen weights up
    to the CPU's bf16 LayerNorm statistics, with fp32 ones exactly), and weights, grads and AdamW state are the real
    tiny model's numel x element size."""
    steps = (bench.STEPS[method](True, device, dtype) for device in ("meta", "cpu"))
    for (setting, *meta_step), (_, model, loss_fn, params, frozen) in zip(*steps):  # one step at a time
        meta = bench.estimate_step(*meta_step)
        short, handles = layer_norm_shortfall(model)
        real = bench.estimate_step(model, loss_fn, params, frozen)
        for h in handles:
            h.remove()
        assert short[0] == 0 or (dtype == torch.bfloat16 and method != "smrabooth")  # Wan's norms are fp32
        assert meta["saved"][False, False] == real["saved"][False, False] + short[0], setting
        if not short[0]:
            assert meta == real, setting
        tensors = [t for m in (model, *frozen) for t in (*m.parameters(), *m.buffers())]
        assert real["weights"] == sum(t.numel() * t.element_size() for t in tensors)
        assert real["grads"] == sum(p.numel() * 4 for p in params) and all(p.dtype == torch.float32 for p in params)
        assert real["optimizer"] == 2 * real["grads"]
        assert 0 < real["saved"][True, False] < real["saved"][False, False]


@pytest.mark.parametrize("method", list(bench.STEPS))
def test_checkpointed_run_keeps_what_the_model_says(method):
    """The checkpointing model's first two terms, on a real run: with the blocks checkpointed (as each method does
    it), the forward pass keeps exactly what the plain step saves outside the blocks plus the blocks' inputs (the
    checkpoint saves the inputs through the same hooks; nested ones, like Wan's rotary tables, it keeps in Python)."""
    runs = []
    for checkpointing in (False, True):  # two builds: the same random draws (the dual-task's kept token count)
        setting, model, loss_fn, params, frozen = next(bench.STEPS[method](True, "cpu", torch.float32))
        if checkpointing:
            jointtuner.checkpoint_blocks(model) if method == "jointtuner" else model.enable_gradient_checkpointing()
        runs.append(bench.count_saved(loss_fn, bench.weights_of([model, *frozen]), bench.blocks_of(model))[1])
    plain, checkpointed = runs
    kept = checkpointed.nbytes(set(checkpointed.where).union(*checkpointed.inputs.values()))
    assert kept == plain.nbytes(plain.outside().union(*plain.inputs.values())) < plain.total()


def test_estimate_table_prints_every_method(capsys):
    rows = bench.main(["--tiny", "--estimate"])
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "no allocator overhead" in out
    for method, settings in bench.SETTINGS.items():
        for setting, *_ in settings:
            assert sum(f"| {method} | {setting} |" in line for line in out.splitlines()) == 2  # without, with ckpt
    for r in rows:
        assert r["note"] == "" and r["total"] == r["weights"] + r["optimizer"] + r["grads"] + r["saved"] > 0


def test_estimate_says_na_where_meta_cannot_trace(monkeypatch):
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2, device="meta")])
    loss_fn = lambda: model.blocks[0](torch.ones(2, 2, device="meta")).sum().item()  # data-dependent: no meta kernel
    monkeypatch.setitem(bench.STEPS, "broken", lambda tiny, device, dtype: [("toy", model, loss_fn, [], [])])
    rows = bench.estimate("broken", True)
    assert [r["grad_ckpt"] for r in rows] == [False, True]
    assert all(r["note"].startswith("n/a: RuntimeError: Tensor.item() cannot be called on meta") for r in rows)
    assert "| broken | toy | no | n/a | n/a | n/a | n/a | n/a | n/a: RuntimeError" in bench.estimate_table(rows, "")


def test_estimate_traces_mora_with_wans_vae_and_raft(monkeypatch):
    """The real-size path of the MoRA row (Wan's config, AutoencoderKLWan(), torchvision raft_large, on meta) at a
    small clip (6 latents = 21 frames of 128x128, RAFT's least size): every row a number, --mora-ckpt's too, and
    checkpointing the decode keeps less. torchvision's RAFT preset checks its std with a data-dependent .any(),
    which made this row n/a."""
    small = (1, 16, 6, 16, 16)
    monkeypatch.setitem(bench.SETTINGS, "smrabooth", [(n, small, tiny) for n, _, tiny in bench.SETTINGS["smrabooth"]])
    rows = {(r["setting"], r["grad_ckpt"]): r for r in bench.estimate("smrabooth", False)}
    mora = bench.SETTINGS["smrabooth"][1][0]
    assert set(rows) == {(s, c) for s in (bench.SETTINGS["smrabooth"][0][0], mora, mora + ", --mora-ckpt")
                         for c in (False, True)}
    assert all(r["note"] == "" and r["total"] > 0 for r in rows.values()), [r["note"] for r in rows.values()]
    for ckpt in (False, True):
        assert rows[mora + ", --mora-ckpt", ckpt]["saved"] < rows[mora, ckpt]["saved"]


def test_mora_ckpt_model_keeps_what_a_checkpointed_decode_keeps():
    """The --mora-ckpt rows' first two terms on a real run: smrabooth.decode_checkpointed keeps what the plain decode
    saves outside the decoder's calls plus their inputs (the latent frame and the causal caches before it)."""
    import smrabooth
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * 4,
                           latents_std=[2.0] * 4).eval().requires_grad_(False)
    z = torch.randn(1, 4, 6, 4, 4, requires_grad=True)
    runs = [bench.count_saved(lambda: smrabooth.decode_window(vae, z, 0, 6, ckpt)[0].sum(), bench.weights_of([vae]),
                              bench.decoders_of([vae]))[1] for ckpt in (False, True)]
    plain, checkpointed = runs
    assert len(plain.calls) == 6 and len(checkpointed.calls) == 6  # one decoder call per latent frame
    kept = checkpointed.nbytes(set(checkpointed.where).union(*checkpointed.inputs.values()))
    assert kept == plain.nbytes(plain.outside().union(*plain.inputs.values())) < plain.total()


def test_dualreal_step_is_its_default_motion_batch(monkeypatch):
    """DualReal's row is the step its default runs: --motion-batch clips (3), each with its condition c; the README
    gave one clip's figure for it."""
    import dualreal
    b = dualreal.parse_args([]).motion_batch
    setting, model, loss_fn, params, (dr,) = next(bench.dualreal_steps(True, "meta", torch.bfloat16))
    seen = []
    monkeypatch.setattr(dualreal, "v_loss", lambda tr, z0, text, *a: seen.append((len(z0), len(text), len(dr.c))))
    loss_fn()
    assert b == 3 and seen == [(b, b, b)] and f"{b} clips" in setting
