"""bench.py: speed and memory of the four methods at their papers' sizes, measured on a GPU or estimated on the CPU.

Each backbone is built at its REAL size from its config, with random weights, directly on the GPU (speed and
memory do not depend on the weights' values, and nothing is downloaded). The method's adapters are attached by the
method file's own functions. Per method it measures one training step (forward + backward + AdamW; median of
--iters after --warmup, CUDA events), its peak memory, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode
on one step), with and without gradient checkpointing (out of memory is a result), and one whole sampling run with
classifier-free guidance: our `sample` loop against the diffusers pipeline on the same weights and latents.

    python bench.py                                   # a CUDA GPU (~80 GB for CogVideoX-5B); prints a table
    python bench.py --methods smrabooth --json out/bench.json
    python bench.py --tiny                            # the same code at toy sizes on the CPU (CI keeps it alive)
    python bench.py --estimate                        # no GPU: each training step's memory, counted on the meta device

--estimate builds the same real-size models on the meta device (shapes, no data) and traces one training step of
each setting: the bytes of weights, AdamW state, gradients and the activations autograd saves, with and without
gradient checkpointing. An estimate of tensors' bytes, not a measurement (no allocator, no CUDA workspace).
"""
import argparse
import datetime
import functools
import gc
import json
import statistics
import sys
import time
import unittest.mock
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import common
import dual_task_sdv
import dualreal
import jointtuner
import smrabooth
import toyworld

# -----------------------------------------------------------------------------
# settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="smrabooth,jointtuner,dualreal,dual_task_sdv", help="comma-separated")
    p.add_argument("--tiny", action="store_true", help="toy backbones and sizes on the CPU, fp32, CPU timers")
    p.add_argument("--iters", type=int, default=10, help="timed training steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first (kernels, allocator)")
    p.add_argument("--sample-steps", type=int, default=50, help="denoising steps of the whole sampling run")
    p.add_argument("--estimate", action="store_true", help="no GPU needed: the memory of one training step, counted "
                                                          "on the meta device (weights, AdamW state, grads, saved "
                                                          "activations), instead of the timing")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.tiny:  # a few iterations: CI checks that the code runs, not the numbers
        args.iters, args.warmup, args.sample_steps = min(args.iters, 2), min(args.warmup, 1), min(args.sample_steps, 3)
    return args


# real configs (performance.md, verified by building them); text = (tokens, width) of the random prompt embeddings
REAL = {
    "wan": dict(cls="WanTransformer3DModel", text=(512, 4096), config=dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "cogvideox": dict(cls="CogVideoXTransformer3DModel", text=(226, 4096), config=dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        use_rotary_positional_embeddings=True)),
    "unet3d": dict(cls="UNet3DConditionModel", text=(77, 1024), config=dict(cross_attention_dim=1024)),
}
TINY_TEXT = {"wan": 32, "cogvideox": 32, "unet3d": 32}  # the toy configs' text widths

# the settings measured: (name, latent shape at real size, latent shape at --tiny); Wan and ZeroScope latents are
# (B, C, F', h, w), CogVideoX's (B, F', C, h, w). Toy latents: 8 channels, 9 frames of 8x8 (toyworld's VAE)
SETTINGS = {
    "smrabooth": [("LoRA 49x480x832", (1, 16, 13, 60, 104), (1, 8, 9, 8, 8)),
                  ("motion+MoRA 49x320x576", (1, 16, 13, 40, 72), (1, 8, 9, 8, 8))],
    "jointtuner": [("AiT 16x384x384", (1, 4, 16, 48, 48), (1, 8, 9, 8, 8))],
    # DualReal's motion step: --motion-batch clips (3 by default, the official code's) of these latents each
    "dualreal": [("v-loss, 3 clips of 49x480x720", (1, 13, 16, 60, 90), (1, 9, 8, 8, 8))],
    # the dual-task trainer encodes pixels in its step: clips (B, F, 3, H, W), subject-image pairs (B, 3, H, W); per
    # pass and GPU its default micro-batches (--video-micro 1, --pair-micro 8; the toy preset's 2 and 4)
    "dual_task_sdv": [("I2V video 49x480x720", (1, 49, 3, 480, 720), (2, 9, 3, 32, 32)),
                      ("identity 8 pairs 480x720", (8, 3, 480, 720), (4, 3, 32, 32))],
}


# -----------------------------------------------------------------------------
# FLOPs


def wan_forward_flops(frames=49, height=480, width=832, linear_params=1.25e9, dim=1536, layers=30):
    """Analytic forward FLOPs of Wan2.1-1.3B (performance.md): tokens N = F' h/16 w/16 with F' = 1 + (F - 1)/4;
    every linear weight is used once per token (2 N P, P ~ 1.25e9 of the 1.42e9 parameters are in the blocks'
    linears) and self-attention costs Q K^T plus attn V, 2 x 2 N^2 dim per layer (the 512-token cross-attention is
    negligible). 49x480x832: 20,280 tokens, ~127 TFLOP."""
    n = (1 + (frames - 1) // 4) * (height // 16) * (width // 16)
    return 2 * n * linear_params + 4 * n ** 2 * dim * layers


def count_flops(fn):
    """FLOPs that torch dispatches during fn() (matmuls, convolutions and SDPA, forward and backward; the recompute
    of gradient checkpointing counts too, so TFLOP/s is what the GPU did, not the floor)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# setup: build on the device, timers


def build(family, tiny, device, dtype):
    """A random backbone built directly on `device` (no slow CPU init of billions of parameters), frozen in dtype."""
    import diffusers
    cls = REAL[family]["cls"]
    config = toyworld.FAMILIES[family]["config"] if tiny else REAL[family]["config"]
    with torch.device(device):
        model = getattr(diffusers, cls)(**config)
    return common.to_dtype(model, dtype).eval().requires_grad_(False)  # as from_pretrained: Wan's norms... in fp32


def text_embeds(family, tiny, device, dtype, n=1):
    """Random prompt embeddings (n, L, D) in place of the text encoder's (it is freed before training anyway)."""
    length, width = (toyworld.MAX_TOKENS, TINY_TEXT[family]) if tiny else REAL[family]["text"]
    return torch.randn(n, length, width, device=device, dtype=dtype)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters, warmup, device):
    """Median seconds of fn() over `iters` runs after `warmup` runs; CUDA events on the GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# measuring: one training step (with and without checkpointing) and one sampling run (ours vs the pipeline)


def train_step(loss_fn, opt):
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()


def set_checkpointing(model, on):
    """Gradient checkpointing of the model's blocks on or off: diffusers' switch where the model offers it, else as
    jointtuner's --grad-ckpt does it by hand (diffusers' UNet3DConditionModel offers none); off, the blocks get their
    own forward back."""
    if model._supports_gradient_checkpointing:
        model.enable_gradient_checkpointing() if on else model.disable_gradient_checkpointing()
    elif on:
        jointtuner.checkpoint_blocks(model)
    else:
        for block in blocks_of(model):
            vars(block).pop("forward", None)


def measure_training(model, loss_fn, params, args, device):
    """[(grad_ckpt, step_s, peak_mem_gb, tflops)] for gradient checkpointing off and on; 'OOM' where it runs out."""
    out = []
    for ckpt in (False, True):
        set_checkpointing(model, ckpt)
        opt = torch.optim.AdamW(params, lr=1e-4)
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step_s = timed(lambda: train_step(loss_fn, opt), args.iters, args.warmup, device)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
            flops = count_flops(lambda: train_step(loss_fn, opt))
            out.append((ckpt, step_s, peak, flops / step_s / 1e12 if flops else None))
        except torch.cuda.OutOfMemoryError:
            out.append((ckpt, "OOM", "OOM", None))
        del opt
        free()
    set_checkpointing(model, False)
    return out


def measure_sampling(ours, pipeline, args, device):
    """Seconds of one whole sampling run of our loop and of the pipeline (same weights, latents and steps)."""
    with torch.no_grad():
        ours_s = timed(ours, 1, 0, device)
        pipe_s = timed(pipeline, 1, 0, device)
    return dict(sample_step_s=ours_s / args.sample_steps, sample_s=ours_s, pipeline_s=pipe_s,
                pipeline_ratio=ours_s / pipe_s)


def rows_of(method, setting, training, sampling):
    return [dict(method=method, setting=setting, grad_ckpt=ckpt, step_s=s, peak_mem=m, tflops=t, **sampling)
            for ckpt, s, m, t in training]


# -----------------------------------------------------------------------------
# memory without a GPU (--estimate): one training step traced on the meta device, which runs every op's shape logic
# but holds no data, so the real sizes need neither a GPU nor RAM. It counts bytes of tensors only: no allocator
# overhead or fragmentation, no CUDA workspace or kernels' scratch buffers, no activation gradients in flight.


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention as a fused kernel keeps it for the backward pass: q, k, v, the output and one fp32 log-sum-exp per
    query row. On meta, torch's SDPA takes its math path, which would save the N x N attention weights that the
    GPU's flash, cuDNN and efficient kernels never hold; the CPU's flash kernel saves what they save and has a meta
    kernel (on a CPU, torch picks it itself: the test compares the two)."""
    if enable_gqa:
        raise NotImplementedError("grouped-query attention in flash_sdpa")
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                       attn_mask=attn_mask, scale=scale)[0]


class FusedAttentionOnMeta(TorchFunctionMode):
    """F.scaled_dot_product_attention on meta tensors goes to flash_sdpa; everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and (args[0] if args else kwargs["query"]).is_meta:
            return flash_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def blocks_of(model):
    """The blocks that gradient checkpointing runs again in the backward pass: a diffusers transformer's blocks
    (enable_gradient_checkpointing), the UNet3D's down, mid and up blocks (as jointtuner.checkpoint_blocks)."""
    for name in ("blocks", "transformer_blocks"):  # Wan, CogVideoX
        if hasattr(model, name):
            return list(getattr(model, name))
    return [*model.down_blocks, model.mid_block, *model.up_blocks]


def tensors_in(x):
    """The tensors in a module call's (args, kwargs), nested ones too (Wan's rotary tables come as a tuple)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for y in x for t in tensors_in(y)] if isinstance(x, (list, tuple)) else []


class SavedTensors:
    """What autograd keeps for the backward pass, seen by its saved_tensors_hooks (every saved tensor passes the
    pack hook). A storage counts once (the views of one activation are saved many times over) and the weights'
    storages not at all (they are the weights' bytes). Each storage is charged to the block calls running when it
    was saved, a call being (block index, how many times that block ran before: Wan's VAE runs its decoder once per
    latent frame); None is outside every block. The calls' tensor inputs are noted, for the checkpointing model
    below. The storages stay referenced while counting, so that no freed storage's address is taken for a new one's."""

    def __init__(self, weights, blocks):
        self.weights, self.block, self.calls = weights, None, []
        self.storages, self.where, self.inputs = {}, {}, {}  # key -> storage; saved key -> calls; call -> input keys
        self.hooks = [h for i, b in enumerate(blocks) for h in (
            b.register_forward_pre_hook(functools.partial(self.enter, i), with_kwargs=True),
            b.register_forward_hook(functools.partial(self.leave, i)))]

    def pack(self, t):
        s = t.untyped_storage()  # meta tensors have storages too, with their sizes, shared by views
        if s._cdata not in self.weights:
            self.storages[s._cdata] = s
            self.where.setdefault(s._cdata, set()).add(self.block)
        return t

    @staticmethod
    def unpack(t):
        return t

    def enter(self, i, module, args, kwargs):
        self.block = (i, sum(c[0] == i for c in self.calls))
        self.calls.append(self.block)
        self.inputs[self.block] = set()
        for t in tensors_in((args, kwargs)):
            s = t.untyped_storage()
            if s._cdata not in self.weights:
                self.storages[s._cdata] = s
                self.inputs[self.block].add(s._cdata)

    def leave(self, i, module, args, out):
        self.block = None

    def nbytes(self, keys):
        return sum(self.storages[k].nbytes() for k in keys)

    def total(self):
        return self.nbytes(self.where)

    def outside(self):
        return {k for k, where in self.where.items() if None in where}

    def checkpointed(self, blocks):
        """The saved bytes' peak with the calls of the blocks numbered in `blocks` checkpointed (non-reentrant, as
        diffusers and smrabooth.decode_checkpointed): the forward pass saves nothing inside such a call but keeps its
        inputs to run it again, and the backward pass holds one call's recomputed activations at a time. So: what is
        saved outside them, plus their inputs, plus the largest call's own saved bytes. (A test checks the first two
        terms against a real checkpointed run.)"""
        calls = {c for c in self.calls if c[0] in blocks}
        kept = {k for k, where in self.where.items() if where - calls}.union(*(self.inputs[c] for c in calls))
        per_call = {}
        for k, where in self.where.items():
            for c in where & calls:
                per_call.setdefault(c, set()).add(k)
        return self.nbytes(kept) + max((self.nbytes(keys - kept) for keys in per_call.values()), default=0)

    def remove(self):
        for h in self.hooks:
            h.remove()


def weights_of(modules):
    """{storage key: storage} of the modules' parameters and buffers."""
    return {t.untyped_storage()._cdata: t.untyped_storage() for m in modules for t in (*m.parameters(), *m.buffers())}


def count_saved(loss_fn, weights, blocks):
    """Run loss_fn() under the counting hooks; returns the loss and the SavedTensors."""
    counter = SavedTensors(weights, blocks)
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), FusedAttentionOnMeta():
            loss = loss_fn()
    finally:
        counter.remove()
    return loss, counter


def decoders_of(frozen):
    """MoRA's Wan VAE decoder among the frozen modules: smrabooth's --mora-ckpt checkpoints each of its calls, one
    per latent frame (smrabooth.decode_checkpointed), as gradient checkpointing does the transformer's blocks."""
    return [m.decoder for m in frozen if type(m).__name__ == "AutoencoderKLWan"]


def estimate_step(model, loss_fn, params, frozen):
    """Bytes of one training step (forward and backward of loss_fn): weights (parameters and buffers of the model
    and the other frozen modules), AdamW's state (two moments per trainable parameter, in its dtype: fp32),
    gradients (as the backward pass leaves them) and saved activations, {(grad ckpt, MoRA ckpt): bytes}: without and
    with checkpointing of the model's blocks, and of MoRA's decode where the step has one."""
    modules = [model, *frozen]
    weights = weights_of(modules)
    for m in modules:
        m.zero_grad(set_to_none=True)
    blocks, decoders = blocks_of(model), decoders_of(frozen)
    loss, counter = count_saved(loss_fn, weights, blocks + decoders)
    loss.backward()
    grads = sum(p.grad.nbytes for m in modules for p in m.parameters() if p.grad is not None)
    ours, decode = set(range(len(blocks))), set(range(len(blocks), len(blocks) + len(decoders)))
    saved = {(ckpt, mora): counter.checkpointed((ours if ckpt else set()) | (decode if mora else set()))
             for ckpt in (False, True) for mora in ((False, True) if decoders else (False,))}
    return dict(weights=sum(s.nbytes() for s in weights.values()), optimizer=2 * sum(p.nbytes for p in params),
                grads=grads, saved=saved)


def estimate(method, tiny, device="meta"):
    """--estimate rows of one method: its training steps with bf16 frozen weights (as on a GPU), traced on `device`
    (meta: the real sizes at no cost); a step that cannot be traced (an op without a meta kernel...) is 'n/a' with
    the reason, and the table goes on."""
    rows = []
    for setting, model, loss_fn, params, frozen in STEPS[method](tiny, device, torch.bfloat16):
        row = dict(method=method, setting=setting)
        try:
            b = estimate_step(model, loss_fn, params, frozen)
        except Exception as e:  # any failure of the trace is a result to print
            reason = f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
            rows += [dict(row, grad_ckpt=ckpt, note=reason) for ckpt in (False, True)]
            continue
        for (ckpt, mora), saved in sorted(b["saved"].items(), key=lambda kv: kv[0][::-1]):
            rows.append(dict(row, setting=setting + (", --mora-ckpt" if mora else ""), grad_ckpt=ckpt,
                             weights=b["weights"], optimizer=b["optimizer"], grads=b["grads"], saved=saved,
                             total=b["weights"] + b["optimizer"] + b["grads"] + saved, note=""))
    return rows


# -----------------------------------------------------------------------------
# the methods' training steps: backbone, the method's own adapters, its training loss


def wan_scheduler():
    """Wan's sampler: UniPC on flow sigmas with shift 3 (480p), as the model's scheduler config."""
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def flow_loss(transformer, z0, text, shift, gen, mora=None):
    """SMRABooth's training step on Wan (train_stage): flow matching, plus MoRA (window decode + flow) if given."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    sigma = smrabooth.sample_sigmas(1, shift, gen, z0.device)
    z_t, v = common.noisy_and_target("flow", z0, noise, sigma)
    v_pred = transformer(z_t.to(transformer.dtype), sigma * 1000, text, return_dict=False)[0].float()
    loss = F.mse_loss(v_pred, v)
    if mora is not None:
        vae, flow, ref_flow, window = mora
        frames, ref_idx = smrabooth.decode_window(vae, smrabooth.one_step_x0(z_t, v_pred, sigma), 0, window)
        loss = loss + smrabooth.mora_loss(flow, frames, ref_flow[:, ref_idx[:-1]])
    return loss


def mora_pieces(tiny, device, latents, window):
    """MoRA's frozen decoder and flow network: AutoencoderKLWan() and torchvision raft_large (random weights), fp32
    as in the method; the toy world's VAE and toy flow with --tiny. ref_flow is random (B, F - 1, 2, H, W), for the
    clip of the latents' shape (B, C, F', h, w). Returns flow_loss's `mora` and the frozen modules (their weights
    count in the estimate)."""
    if tiny:
        vae, flow, modules = toyworld.load_vae().to(device), toyworld.toy_flow, []
    else:
        from diffusers import AutoencoderKLWan
        from torchvision.models.optical_flow import raft_large
        with torch.device(device):
            vae, raft = AutoencoderKLWan(), raft_large(weights=None)
        raft.eval().requires_grad_(False)
        flow = functools.partial(smrabooth.raft_flow, raft)  # as smrabooth.load_models
        modules = [raft]
    vae.eval().requires_grad_(False)
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    ref_flow = torch.randn(1, t * (latents[2] - 1), 2, s * latents[3], s * latents[4], device=device)
    return (vae, flow, ref_flow, window), [vae, *modules]


# each method's training steps, shared by the timing and by --estimate: a generator of (setting, backbone, loss_fn,
# trainable parameters, other frozen modules), the backbone and adapters built on `device` as the method builds them;
# use each step before taking the next (a setting's own modules are freed in between)


def smrabooth_steps(tiny, device, dtype):
    """SMRABooth's motion stage on Wan (one stage trains one LoRA): flow matching, plus MoRA's window decode and flow
    at 320x576. MoRA's VAE and RAFT exist only during their setting."""
    margs = smrabooth.parse_args([])  # the paper's ranks, shift and window
    transformer = build("wan", tiny, device, dtype)
    with torch.device(device):  # LoRA weights made where they live (on meta: no memory, no init time)
        subject, motion = smrabooth.add_loras(transformer, margs)
    transformer.set_adapters(["motion"])
    text, gen = text_embeds("wan", tiny, device, dtype), torch.Generator().manual_seed(0)
    for setting, real, tiny_shape in SETTINGS["smrabooth"]:
        z0 = torch.randn(tiny_shape if tiny else real, device=device)
        mora, frozen = None, []
        if "MoRA" in setting:  # decoded frames: 16 of the 49 at 320x576 (6-latent window), all 9 of 32x32 toy ones
            mora, frozen = mora_pieces(tiny, device, z0.shape, margs.mora_window)
        yield setting, transformer, lambda: flow_loss(transformer, z0, text, margs.shift, gen, mora), motion, frozen
        del mora, frozen
        free()


def jointtuner_steps(tiny, device, dtype):
    """JointTuner's AiT video step on ZeroScope's UNet3D with Adaptive LoRA, in training mode (LoRA dropout on)."""
    margs = jointtuner.parse_args([])
    unet = build("unet3d", tiny, device, dtype)
    with torch.device(device):
        adapters = jointtuner.add_adapters(unet, margs.rank, margs.dropout, not margs.no_gate)
    unet.train()  # as jointtuner.train: the adapters' dropout is on
    scheduler = toyworld.noise_schedule("unet3d")  # ZeroScope's DDIM betas (the toy clips x0: a clamp per step)
    text, gen = text_embeds("unet3d", tiny, device, dtype), torch.Generator().manual_seed(0)
    setting, real, tiny_shape = SETTINGS["jointtuner"][0]
    z0 = torch.randn(tiny_shape if tiny else real, device=device)
    loss_fn = lambda: jointtuner.ait_loss(unet, z0, text, scheduler.alphas_cumprod, gen, margs.offset_noise)
    yield setting, unet, loss_fn, jointtuner.trainable(adapters, False)["video"], []


def dualreal_steps(tiny, device, dtype):
    """DualReal's motion step on CogVideoX-5B: both adapter kinds and the controller act in the forward and all get
    gradients (dualreal.train drops the identity side's before its AdamW step, which holds both sides' moments)."""
    margs = dualreal.parse_args([])
    transformer = build("cogvideox", tiny, device, dtype)
    cond_dim = 32 if tiny else 1024  # CLIP ViT-H/14's image embedding
    with torch.device(device):
        dr = dualreal.add_dualreal(transformer, margs.rank, margs.groups, margs.blend_scale,
                                   not margs.no_controller, cond_dim, margs.controller_dim)
    b = margs.motion_batch  # a motion step of the default batch: each clip with its condition c
    dr.c = torch.randn(b, cond_dim, device=device)
    scheduler = toyworld.noise_schedule("cogvideox")  # CogVideoX's v-prediction DDIM config
    text, gen = text_embeds("cogvideox", tiny, device, dtype).expand(b, -1, -1), torch.Generator().manual_seed(0)
    setting, real, tiny_shape = SETTINGS["dualreal"][0]
    z0 = torch.randn(b, *(tiny_shape if tiny else real)[1:], device=device)
    loss_fn = lambda: dualreal.v_loss(transformer, z0, text, scheduler.alphas_cumprod, gen)
    yield setting, transformer, loss_fn, list(dr.parameters()), [dr]


def t5_encoder(tiny, device):
    """T5-XXL v1.1's encoder (CogVideoX's text encoder, 4.8 B) from its config, random weights, built on `device`
    (moving a loaded T5 to meta would untie its tied input embeddings); the toy world's T5 config with --tiny. A
    token's id only picks a row, so the toy tokenizer serves both (padded to --max-text-len)."""
    from transformers import T5Config, T5EncoderModel
    config = T5Config.from_pretrained(toyworld.ASSETS / "text_encoders" / "t5") if tiny else T5Config(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu")
    with torch.device(device):
        return T5EncoderModel(config)


def call_block(block, *args):
    return block(*args)


def dual_task_loss(step, kind, batch, gen):
    """DualTaskStep's loss with each block run as block(...): dual_task_sdv runs a block as a function of its
    modules (block_forward), which module hooks (--estimate's per-block count) would not see as one call."""
    with unittest.mock.patch.object(dual_task_sdv, "block_forward", call_block):
        return step(kind, batch, gen)


def dual_task_sdv_steps(tiny, device, dtype):
    """The dual-task trainer on CogVideoX-5B with its LoRA and the trainable <cls> row of T5's input embeddings, so
    that the loss runs back through T5: one micro-batch of each task, an I2V video step (reference tokens of a random
    frame, TokenDrop) and an identity step (pairs as one-frame videos). The step VAE-encodes its pixels (no grad),
    as the method does: VAE and T5 weights are in the step."""
    margs = dual_task_sdv.parse_args(["--model", "toy"] if tiny else [])  # the paper's LoRA; the toy world's sizes
    transformer = build("cogvideox", tiny, device, dtype)
    with torch.device(device):
        dual_task_sdv.add_lora(transformer, margs)
    for block in transformer.transformer_blocks:  # block(...) now runs dual_task_sdv.block_forward (dual_task_loss)
        block.forward = functools.partial(dual_task_sdv.block_forward, block)
    if tiny:
        vae = toyworld.load_vae().to(device)  # the latents of the toy configs (toyworld.FAMILIES)
    else:
        from diffusers import AutoencoderKLCogVideoX
        with torch.device(device):
            vae = AutoencoderKLCogVideoX(scaling_factor=0.7)
    encoder, tokenizer = t5_encoder(tiny, device), toyworld.tokenizer("t5")
    vae, encoder = (m.to(dtype).eval().requires_grad_(False) for m in (vae, encoder))  # as load_models
    cid = dual_task_sdv.add_cls_token(tokenizer, encoder)
    cls = torch.nn.Parameter(encoder.get_input_embeddings().weight[cid].detach().float().clone(), requires_grad=False)
    m = dict(transformer=transformer, vae=vae, tokenizer=tokenizer, text_encoder=encoder, cls=cls,
             scheduler=toyworld.noise_schedule("cogvideox"))
    params = dual_task_sdv.trainable(m, margs)  # the LoRA and the <cls> row
    step = dual_task_sdv.DualTaskStep(m, margs).train()  # as train(): LoRA dropout on
    frozen, gen = [vae, encoder, torch.nn.ParameterList([cls])], torch.Generator().manual_seed(0)
    for setting, real, tiny_shape in SETTINGS["dual_task_sdv"]:
        pixels = torch.rand(tiny_shape if tiny else real, device=device) * 2 - 1
        prompts = ["a <cls> toy car driving on a road"] * len(pixels)
        batch = ("video", (pixels, prompts)) if "video" in setting else ("image", (pixels, pixels, prompts))
        yield setting, transformer, lambda: dual_task_loss(step, *batch, gen), params, frozen


# -----------------------------------------------------------------------------
# the timing: each method's training steps, then its sampler against the diffusers pipeline


def bench_smrabooth(args, device, dtype):
    rows = []
    for setting, transformer, loss_fn, params, _ in smrabooth_steps(args.tiny, device, dtype):
        rows.append((setting, measure_training(transformer, loss_fn, params, args, device)))
    # sampling at the paper's 49x480x832 with both LoRAs and sparse injection, vs WanPipeline (same LoRA scales)
    from diffusers import WanPipeline
    margs = smrabooth.parse_args([])
    transformer.set_adapters(["subject", "motion"])
    layers = common.lora_layers(transformer)
    text, uncond = (text_embeds("wan", args.tiny, device, dtype) for _ in range(2))
    noise = torch.randn(SETTINGS["smrabooth"][0][2 if args.tiny else 1], device=device)
    ours = lambda: smrabooth.sample(transformer, wan_scheduler(), text, uncond, noise, args.sample_steps, margs.cfg,
                                    on_step=lambda i, n: smrabooth.set_injection(layers, margs, i, n))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=wan_scheduler())
    pipe.set_progress_bar_config(disable=True)
    # pixel sizes only pass the pipeline's checks: the latents given are used as they are
    run_pipe = lambda: pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=noise.shape[-2] * 8,
                            width=noise.shape[-1] * 8, num_frames=(noise.shape[2] - 1) * 4 + 1,
                            num_inference_steps=args.sample_steps, guidance_scale=margs.cfg, latents=noise,
                            output_type="latent")
    sampling = measure_sampling(ours, run_pipe, args, device)
    del transformer, pipe
    free()
    return [r for setting, training in rows for r in rows_of("smrabooth", setting, training, sampling)]


def bench_jointtuner(args, device, dtype):
    from diffusers import TextToVideoSDPipeline
    (setting, unet, loss_fn, params, _), = jointtuner_steps(args.tiny, device, dtype)
    training = measure_training(unet, loss_fn, params, args, device)
    unet.eval()
    margs = jointtuner.parse_args([])
    text, uncond = (text_embeds("unet3d", args.tiny, device, dtype) for _ in range(2))
    noise = torch.randn(SETTINGS["jointtuner"][0][2 if args.tiny else 1], device=device)
    ours = lambda: jointtuner.sample(unet, toyworld.noise_schedule("unet3d"), text, uncond, noise,
                                     args.sample_steps, margs.cfg)
    pipe = TextToVideoSDPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                 scheduler=toyworld.noise_schedule("unet3d"))
    pipe.set_progress_bar_config(disable=True)
    run_pipe = lambda: pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=noise.shape[-2] * 8,
                            width=noise.shape[-1] * 8, num_frames=noise.shape[2], num_inference_steps=args.sample_steps,
                            guidance_scale=margs.cfg, latents=noise, output_type="latent")
    sampling = measure_sampling(ours, run_pipe, args, device)
    del unet, pipe
    free()
    return rows_of("jointtuner", setting, training, sampling)


def bench_dualreal(args, device, dtype):
    from diffusers import CogVideoXPipeline
    (setting, transformer, loss_fn, params, (dr,)), = dualreal_steps(args.tiny, device, dtype)
    training = measure_training(transformer, loss_fn, params, args, device)
    dr.c = dr.c[:1]  # sampling one video: one condition
    margs = dualreal.parse_args([])
    text, uncond = (text_embeds("cogvideox", args.tiny, device, dtype) for _ in range(2))
    noise = torch.randn(SETTINGS["dualreal"][0][2 if args.tiny else 1], device=device)
    ours = lambda: dualreal.sample(transformer, toyworld.noise_schedule("cogvideox"), text, uncond, noise,
                                   args.sample_steps, margs.cfg)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=toyworld.noise_schedule("cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    run_pipe = lambda: pipe(prompt_embeds=text, negative_prompt_embeds=uncond, height=noise.shape[-2] * 8,
                            width=noise.shape[-1] * 8, num_frames=(noise.shape[1] - 1) * 4 + 1,
                            num_inference_steps=args.sample_steps, guidance_scale=margs.cfg, latents=noise,
                            output_type="latent", use_dynamic_cfg=False)
    sampling = measure_sampling(ours, run_pipe, args, device)
    del transformer, pipe
    free()
    return rows_of("dualreal", setting, training, sampling)


def bench_dual_task_sdv(args, device, dtype):
    rows = []
    for setting, transformer, loss_fn, params, _ in dual_task_sdv_steps(args.tiny, device, dtype):
        rows.append((setting, measure_training(transformer, loss_fn, params, args, device)))
    # sampling a 49x480x720 video from one reference latent; diffusers has no pipeline with reference tokens
    margs = dual_task_sdv.parse_args([])
    text, uncond = (text_embeds("cogvideox", args.tiny, device, dtype) for _ in range(2))
    noise = torch.randn(SETTINGS["dualreal"][0][2 if args.tiny else 1], device=device)
    ref = torch.randn_like(noise[:, :1])
    with torch.no_grad():
        sample_s = timed(lambda: dual_task_sdv.sample(transformer, toyworld.noise_schedule("cogvideox"), text, uncond,
                                                      ref, noise, args.sample_steps, margs.cfg), 1, 0, device)
    sampling = dict(sample_step_s=sample_s / args.sample_steps, sample_s=sample_s, pipeline_s=None,
                    pipeline_ratio=None)
    del transformer
    free()
    return [r for setting, training in rows for r in rows_of("dual_task_sdv", setting, training, sampling)]


BENCHES = {"smrabooth": bench_smrabooth, "jointtuner": bench_jointtuner, "dualreal": bench_dualreal,
           "dual_task_sdv": bench_dual_task_sdv}
STEPS = {"smrabooth": smrabooth_steps, "jointtuner": jointtuner_steps, "dualreal": dualreal_steps,
         "dual_task_sdv": dual_task_sdv_steps}


# -----------------------------------------------------------------------------
# output


def fmt(x, digits=3):
    return "-" if x is None else x if isinstance(x, str) else f"{x:.{digits}g}"


def table(rows, header):
    lines = [header, "",
             "| method | setting | grad ckpt | step s | peak GB | TFLOP/s | sample step s | sample s | pipeline s | "
             "ours / pipeline |", "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {'yes' if r['grad_ckpt'] else 'no'} | {fmt(r['step_s'])} | "
                     f"{fmt(r['peak_mem'])} | {fmt(r['tflops'])} | {fmt(r['sample_step_s'])} | {fmt(r['sample_s'])} "
                     f"| {fmt(r['pipeline_s'])} | {fmt(r['pipeline_ratio'])} |")
    return "\n".join(lines)


def estimate_table(rows, header):
    gb = lambda r, k: "n/a" if r["note"] else fmt(r[k] / 2 ** 30)
    lines = [header, "",
             "| method | setting | grad ckpt | weights GB | AdamW state GB | grads GB | saved activations GB | "
             "total GB | note |", "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {'yes' if r['grad_ckpt'] else 'no'} | {gb(r, 'weights')} | "
                     f"{gb(r, 'optimizer')} | {gb(r, 'grads')} | {gb(r, 'saved')} | {gb(r, 'total')} | {r['note']} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in BENCHES]
    if unknown:
        common.fail(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    if args.estimate:
        return main_estimate(args, methods)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device is available: nothing to measure (python bench.py --tiny runs the code on the CPU)")
        return None
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    rows = []
    for method in methods:
        print(f"{method}: measuring ...", file=sys.stderr)
        rows += BENCHES[method](args, device, dtype)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (--tiny: toy sizes, fp32)"
    date = datetime.date.today().isoformat()
    print(table(rows, f"{gpu}, {date}, torch {torch.__version__}, bs 1, {args.sample_steps} sampling steps"))
    write_json(args.json, dict(gpu=gpu, date=date, torch=torch.__version__, rows=rows))
    return rows


def main_estimate(args, methods):
    rows = []
    for method in methods:
        print(f"{method}: tracing one training step on the meta device ...", file=sys.stderr)
        rows += estimate(method, args.tiny)
    date = datetime.date.today().isoformat()
    sizes = "toy sizes" if args.tiny else "real sizes"
    print(estimate_table(rows, f"ESTIMATE of one training step's memory ({sizes}, 1 clip unless the setting says; "
                               f"bf16 frozen weights, fp32 trainable ones; traced on the meta device, {date}, torch "
                               f"{torch.__version__}): bytes of tensors only, no allocator overhead or fragmentation, "
                               f"no CUDA workspace; GB = 2^30 bytes"))
    write_json(args.json, dict(estimate=True, date=date, torch=torch.__version__, rows=rows))
    return rows


def write_json(path, obj):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2))


if __name__ == "__main__":
    common.cli(main)
