"""JointTuner: appearance-motion adaptive joint training for customized video generation, on ZeroScope (3D UNet).

One set of Adaptive LoRAs (a LoRA whose output is scaled by a learned, input-dependent gate) sits in the spatial
and the temporal transformers of a frozen 3D UNet and learns the subject and the motion at the same time: each
training epoch runs the subject photos, repeated into still pseudo-videos and trained on one random frame
(One-Frame Spatial loss), then the reference video, trained with the Appearance-independent Temporal loss, whose
target is the noise plus a frame-wise offset noise (one spatial noise map shared by all frames), so that the
adapters learn how things move rather than what the reference video looks like. Sampling is plain DDIM.

    # a real run (`python bench.py --estimate`: ~16 GB with --grad-ckpt, ~36 GB without; the paper reports 17 GB;
    # weights from the hub cache or local folders, nothing is downloaded here)
    python jointtuner.py --subject photos/ --motion flute.mp4 --prompt "a dog playing the flute in the snow"
    # the toy world on a CPU in minutes (toy 3D UNet, bundled toy subject and motion)
    python jointtuner.py --model toy
    python jointtuner.py --model toy --sample-only          # reuse the adapters saved in --out
    python jointtuner.py --model toy --ablate --seeds 3     # Table 3's rows, cumulative, in the toy world

Paper: "JointTuner: Appearance-Motion Adaptive Joint Training for Customized Video Generation" (Chen, Zhao, Xu
and Lan, 2025; see CITATION.bib): Adaptive LoRA eq. 6, OFS loss eq. 7, AiT loss eq. 8, Algorithms 1 and 2, Table 3's
ablations. Facts marked (code) come from the authors' ZeroScope code, where the paper says nothing.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
import toyworld

# -----------------------------------------------------------------------------
# settings: paper values as defaults; --model toy applies TOY on top


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--subject", help="folder of 3-5 subject photos (+ prompt.txt with the class word)")
    p.add_argument("--motion", help="reference video file, a folder of its frames, or a folder of clips "
                                    "(video files or frame folders; each is resampled to --frames x H x W)")
    p.add_argument("--class-word", help="the subject's class (default: SUBJECT/prompt.txt, else 'object')")
    p.add_argument("--motion-caption", help="the motion video's caption, e.g. 'a person playing the flute' "
                                            "(default: the .txt beside the video or caption.txt in its folder)")
    p.add_argument("--prompt", help="sampling prompt, the subject doing the motion, e.g. 'a dog playing the "
                                    "flute in the snow' (needed for real models; toy: 'a star' + the caption's "
                                    "motion and background)")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt of guidance (the paper does not "
                                                         "say; the official script passes a list of defects)")
    p.add_argument("--placeholder", default="", help="an identifier word for the subject, e.g. sks (default none: the "
                                                     "paper names none and the code captions 'A bear plushie.')")
    p.add_argument("--height", type=int, default=384, help="training and sampling height (code: 384x384)")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--frames", type=int, default=16, help="N: frames of every training clip and of the result "
                                                          "(sec. 3.2)")
    p.add_argument("--motion-start", type=int, default=0, help="first frame of the reference clip(s) to use")
    p.add_argument("--motion-end", type=int, help="frame after the last one to use (default: the clip's end)")
    p.add_argument("--motion-stride", type=int, help="take every n-th frame instead of spreading uniformly "
                                                     "(supplement B.2: every 2nd frame for DAVIS at 8 fps)")
    p.add_argument("--hflip", type=float, default=0.5, help="chance of a mirrored subject photo (code)")
    # models
    p.add_argument("--model", default="cerspense/zeroscope_v2_576w", help="hub id, local folder, or 'toy' "
                                                                          "(damo-vilab/text-to-video-ms-1.7b works)")
    p.add_argument("--max-text-len", type=int, default=77, help="CLIP text tokens")
    # adapters
    p.add_argument("--rank", type=int, default=32, help="r of the Adaptive LoRA (code)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the LoRA path (code)")
    # optimisation
    p.add_argument("--iterations", type=int, default=2000, help="training iterations, one batch each (sec. 4.1)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (sec. 4.1)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (code)")
    p.add_argument("--batch", type=int, default=1, help="clips per iteration (code: 1)")
    p.add_argument("--ait-lambda", type=float, default=10.0, help="lambda: weight of L_AiT (eq. 8)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the UNet's blocks (memory "
                                                            "for speed; the code uses it)")
    # sampling
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (sec. 4.1)")
    p.add_argument("--cfg", type=float, default=12.0, help="classifier-free guidance scale (code: 12; the paper "
                                                           "does not say; TextToVideoSDPipeline's default is 7.5)")
    p.add_argument("--fps", type=int, default=8, help="of the written videos (sec. 4.1: 16 frames at 8 fps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="frozen weights' dtype (auto: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--num-samples", type=int, default=1, help="videos sampled from different noise, batched "
                                                                "(toy metrics: their mean)")
    # ablations (Table 3)
    p.add_argument("--offset-noise", choices=["frame", "pixel", "video", "none"], default="frame",
                   help="eps' of L_AiT: frame (1,H,W,1), pixel (F,1,1,C), video (F,H,W,C), none (plain eq. 4)")
    p.add_argument("--no-gate", action="store_true", help="classic LoRA: no gate G, scale 1 (eq. 2)")
    p.add_argument("--separate-lora", action="store_true", help="a spatial LoRA set trained by the image steps "
                                                                "and a temporal set trained by the video steps")
    p.add_argument("--two-stage", action="store_true", help="all image steps first, then all video steps "
                                                            "(Algorithm 2) instead of epochs of both")
    # run
    p.add_argument("--out", default="out/jointtuner")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else it is kept)")
    p.add_argument("--sample-only", action="store_true", help="sample with the adapters saved in --out")
    p.add_argument("--dry-run", action="store_true", help="check inputs, print the plan, load nothing")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--sample-every", type=int, default=250, help="write a sample (fixed seed) to --out/samples/ every "
                                                                 "this many iterations (0: never)")
    p.add_argument("--ablate", action="store_true", help="toy world: run the base model and Table 3's rows "
                                                         "(--seeds, --ablation-seeds), and print the table")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the base model and the full method in --ablate")
    p.add_argument("--ablation-seeds", type=int, default=1,
                   help="seeds for every other --ablate variant (0: base and full only)")
    args = p.parse_args(argv)
    if args.model == "toy":
        toyworld.apply_preset(args, p, argv, TOY)
    return args


# the toy world: 9 frames of 32x32 in its VAE's latent space, its pretrained tiny UNet3D, fewer sampling steps and
# a larger lr; the paper's 2000 iterations at the code's batch 1 (epochs of 4 photo steps, then 1 clip step)
TOY = dict(height=32, width=32, frames=9, fps=4, max_text_len=16, lr=1e-3, iterations=2000, steps=20, cfg=4.0,
           num_samples=4)


# -----------------------------------------------------------------------------
# data: checked before anything loads; a bad input ends with one line and exit code 2


def check_args(args):
    """Every flag in range before anything loads: floats finite; 0 iterations is the untrained base model (--ablate's
    "base"); a motion needs 2 or more frames; sizes are multiples of 8 (the SD VAE's 8x; the UNet pads the rest)."""
    common.check_numbers(args, at_least_one=["rank", "batch", "steps", "num_samples", "max_text_len", "fps",
                                             "log_every", "save_every", "seeds", "motion_stride"],
                         at_least_zero=["iterations", "sample_every", "motion_start", "weight_decay", "cfg",
                                        "ablation_seeds"],
                         positive=["lr", "ait_lambda"], unit=["hflip", "dropout"])
    if args.frames < 2:
        common.fail(f"--frames {args.frames}: a motion needs 2 or more frames (the paper: 16)")
    if args.height % 8 or args.width % 8 or min(args.height, args.width) < 8:
        common.fail(f"--height {args.height} --width {args.width}: use multiples of 8 (the VAE's 8x)")
    common.check_clip_range(args)
    common.check_words(args, ["prompt", "class_word", "motion_caption"])
    if args.placeholder and args.placeholder.split() != [args.placeholder]:
        common.fail(f"--placeholder {args.placeholder!r} must be one word, e.g. sks ('' for none)")


def motion_clips(motion):
    """One clip (a video file or a folder of frames) or several (a folder of video files and/or frame folders)."""
    if motion.is_file() or common.list_images(motion):
        return [motion]
    return sorted(q for q in motion.iterdir()
                  if q.suffix.lower() in common.VIDEO_EXTS or (q.is_dir() and common.list_images(q)))


def read_inputs(args):
    """Subject photos (K, 3, H, W), reference clips (M, N, 3, H, W) and the prompts. Sec. 3.2: every input is
    standardised to N frames of H x W: photos later become pseudo-videos, clips are resampled uniformly."""
    check_args(args)
    folder = Path(args.subject or "")
    if not args.subject or not folder.is_dir():
        common.fail(f"--subject {args.subject!r} is not a folder of subject photos")
    paths = common.list_images(folder)
    if not paths:
        common.fail(f"{folder} has no image ({', '.join(common.IMAGE_EXTS)})")
    size = (args.height, args.width)
    images = torch.stack([common.read_image(p, size) for p in paths])
    if not args.motion or not Path(args.motion).exists():
        common.fail(f"--motion {args.motion!r} does not exist (a video file, a folder of frames or of clips)")
    motion = Path(args.motion)
    clips = motion_clips(motion)
    if not clips:
        common.fail(f"{motion} holds neither frames nor video files nor frame folders")
    videos = torch.stack([common.read_video(c, args.frames, size, args.motion_start, args.motion_end,
                                            args.motion_stride) for c in clips])
    class_word = args.class_word or common.read_text(folder / "prompt.txt", "object")
    sidecar = motion.with_suffix(".txt") if motion.is_file() else motion / "caption.txt"
    motion_caption = args.motion_caption or common.read_text(sidecar, "moving")
    subject = " ".join(w for w in ("a", args.placeholder, class_word) if w)  # code: 'A bear plushie.'
    if not args.prompt and args.model != "toy":  # a real caption names its own subject ('a person playing the flute')
        common.fail(f"--prompt is needed for a real model: the subject doing the motion, as the paper's prompts (e.g. "
                    f"'{subject} playing the flute in the snow'); the motion caption is {motion_caption!r}")
    # the video is trained under its own caption (supp. B.2: BLIP-2's, the whole clip); the paper's sampling prompts
    # put each subject-motion pair in 5 settings (supp. B.1), so --model toy writes its own from the world's words
    sample = args.prompt or toyworld.sample_prompt(subject, motion_caption)
    prompts = dict(subject=subject, motion=motion_caption, sample=sample)
    if args.placeholder and args.placeholder not in prompts["sample"].split():
        common.fail(f"the prompt {prompts['sample']!r} does not contain the placeholder word {args.placeholder!r}")
    return images, videos, prompts, clips


# -----------------------------------------------------------------------------
# backbone and adapters


def load_models(args, device, dtype):
    """ZeroScope/ModelScope (3D UNet, SD VAE, CLIP text encoder and tokenizer, DDIM) from a hub id / local folder,
    or the toy world's tiny UNet3D, VAE and CLIP for --model toy."""
    if args.model == "toy":
        m = dict(unet=toyworld.load_backbone("unet3d"), vae=toyworld.load_vae(),
                 tokenizer=toyworld.tokenizer("clip"), text_encoder=toyworld.text_encoder("clip"),
                 scheduler=toyworld.noise_schedule("unet3d"))
    else:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel
        m = dict(unet=UNet3DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=dtype),
                 vae=AutoencoderKL.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32),
                 tokenizer=AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer"),
                 text_encoder=CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder", torch_dtype=dtype),
                 # the model's own DDIM config; its alphas_cumprod are also the DDPM forward process of training
                 scheduler=DDIMScheduler.from_pretrained(args.model, subfolder="scheduler"))
        m["vae"].enable_slicing()  # frames go through the VAE one at a time: same result, a fraction of the memory
    for k in ("unet", "vae", "text_encoder"):  # frozen; the VAE in fp32, the rest in `dtype`
        m[k] = m[k].to(device, torch.float32 if k == "vae" else dtype).eval().requires_grad_(False)
    return m


def checkpoint_blocks(unet):
    """--grad-ckpt by hand: diffusers' UNet3DConditionModel does not support gradient checkpointing (0.42.1 raises),
    so each down, mid and up block recomputes its forward in the backward pass (torch.utils.checkpoint; dropout
    draws the same masks again). The forward is replaced on the instances, so module paths and saved keys stay."""
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class AdaptiveLoRA(nn.Module):
    """Eq. 6: x' = W0 x + Mean(sigmoid(G x)) * B A x around a frozen nn.Linear W0; B starts at zero, so the model
    is unchanged at step 0. The mean runs over one video's tokens, giving one scalar per layer per sample. The
    official code averages over the whole batch too, which couples the samples of a batch (the conditional and
    unconditional halves of a guidance batch); the paper's 'Mean stabilizes scaling across batches and frames'
    allows either. gate=False is classic LoRA (eq. 2 with alpha = 1, as the code's scale)."""

    def __init__(self, base, rank, dropout=0.0, gate=True):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.gate = nn.Linear(base.in_features, 1, bias=False) if gate else None
        self.dropout = nn.Dropout(dropout)  # on the input of A, as peft (the code drops B A x instead)
        nn.init.normal_(self.lora_A.weight, std=1 / rank)  # (code)
        nn.init.zeros_(self.lora_B.weight)
        self.videos = None   # videos in the current UNet call (set by a hook, see add_adapters)
        self.enabled = True  # Algorithm 2's stage II runs without the spatial set

    def gate_value(self, x):
        """Mean of sigmoid(G x) over each video's tokens, per input row. The UNet's linears see frames (spatial:
        B*F rows of h*w tokens) or pixels (temporal: B*h*w rows of F tokens), video-major in both reshapes."""
        n = self.videos or x.shape[0]
        g = torch.sigmoid(F.linear(x, self.gate.weight.to(x.dtype))).reshape(n, -1).mean(1)
        return g.repeat_interleave(x.shape[0] // n).view(-1, *[1] * (x.ndim - 1))

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        # computed in the input's dtype with the fp32 weights cast at use (their gradients still arrive in fp32): the
        # activations kept for the backward pass are then bf16 next to a bf16 base, not fp32 copies of every input
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        delta = F.linear(F.linear(self.dropout(x), a), b)
        if self.gate is not None:
            delta = delta * self.gate_value(x)
        return out + delta


# which linears get an adapter (code): attn1 and the FFN of spatial transformers (their cross-attention attn2 is
# left alone), attn1, attn2 (self-attention there too) and the FFN of temporal transformers
SPATIAL = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
TEMPORAL = SPATIAL + ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def adapter_targets(unet):
    """{module path: 'spatial' | 'temporal'} for every targeted nn.Linear: ZeroScope has 16 spatial transformers
    (x 6 linears) and 17 temporal ones (transformer_in + temp_attentions, x 10): 266 adapters, 21.5 M parameters
    at rank 32; the toy UNet 4 x 6 + 5 x 10 = 74."""
    kinds = {"Transformer2DModel": ("spatial", SPATIAL), "TransformerTemporalModel": ("temporal", TEMPORAL)}
    out = {}
    for name, block in unet.named_modules():
        if type(block).__name__ in kinds:
            kind, ends = kinds[type(block).__name__]
            out.update({f"{name}.{sub}": kind for sub, layer in block.named_modules()
                        if isinstance(layer, nn.Linear) and sub.endswith(ends)})
    return out


def set_videos(adapters, module, args, kwargs):
    """Forward pre-hook of the UNet: tell every gate how many videos the call holds (sample is (B, C, F, h, w))."""
    sample = args[0] if args else kwargs["sample"]
    for a in adapters.values():
        a.videos = sample.shape[0]


def add_adapters(unet, rank, dropout, gate, layers=None):
    """Wrap the targeted linears (or `layers`: {path: kind}) in AdaptiveLoRA (fp32); returns {path: adapter}."""
    adapters = {}
    for path, kind in (layers or adapter_targets(unet)).items():
        parent, _, child = path.rpartition(".")
        base = unet.get_submodule(path)
        a = AdaptiveLoRA(base, rank, dropout, gate).to(base.weight.device).train(unet.training)  # eval: no dropout
        a.kind = kind
        setattr(unet.get_submodule(parent), child, a)
        adapters[path] = a
    unet.register_forward_pre_hook(functools.partial(set_videos, adapters), with_kwargs=True)
    return adapters


def trainable(adapters, separate):
    """The parameters each kind of step updates. One shared set (sec. 3.2): both losses update all of A, B and G.
    --separate-lora (Table 3's -LoRA Union, 'separate LoRAs for spatial and temporal Transformers'): the paper does
    not say which loss trains which set. The adapters sit in the same layers either way, so a split that only
    renamed them would change nothing; we let the spatial set learn from the image steps and the temporal set from
    the video steps (as Algorithm 2's delta and kappa, and MotionDirector's spatial and temporal LoRAs), both in the
    same joint loop, both acting in every forward pass."""
    def params(kinds):
        return [p for a in adapters.values() if a.kind in kinds for n, p in a.named_parameters()
                if not n.startswith("base.")]
    if not separate:
        return dict(image=params(("spatial", "temporal")), video=params(("spatial", "temporal")))
    return dict(image=params(("spatial",)), video=params(("temporal",)))


# adapters.safetensors: for each adapted linear, by its module path in the UNet (e.g.
# "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), "<path>.lora_A.weight" (r, in),
# "<path>.lora_B.weight" (out, r) and, unless --no-gate, "<path>.gate.weight" (1, in); all fp32.


def adapter_state(unet):
    return {f"{path}.{k}": v.detach().float().cpu().contiguous() for path, a in unet.named_modules()
            if isinstance(a, AdaptiveLoRA) for k, v in a.state_dict().items() if not k.startswith("base.")}


def save_adapters(unet, path, args):
    from safetensors.torch import save_file
    meta = dict(method="jointtuner", model=args.model, rank=str(args.rank), gate=str(not args.no_gate),
                separate=str(args.separate_lora), iterations=str(args.iterations))
    common.save_atomic(adapter_state(unet), path, lambda sd, p: save_file(sd, p, metadata=meta))


def check_adapters(path):
    """--sample-only: adapters.safetensors must open and be JointTuner's, before any model loads."""
    from safetensors import safe_open
    if not Path(path).is_file():
        common.fail(f"--sample-only: {path} does not exist; train first")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        common.fail(f"cannot read {path} ({common.first_line(e)}): train again with --overwrite")
    if meta.get("method") != "jointtuner":
        common.fail(f"{path} holds no JointTuner adapters (its metadata says method {meta.get('method')})")


def load_adapters(unet, path, dropout=0.0):
    """Wrap the layers named in an adapters.safetensors file (rank and gate read from it) and load them."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    targets = adapter_targets(unet)
    layers = {k.rsplit(".", 2)[0] for k in sd}
    if not layers or not layers <= set(targets):
        common.fail(f"{path} does not hold adapters for this --model (layer names differ); train again")
    first = min(layers)
    adapters = add_adapters(unet, sd[f"{first}.lora_A.weight"].shape[0], dropout, f"{first}.gate.weight" in sd,
                            {p: targets[p] for p in sorted(layers)})
    unet.load_state_dict(sd, strict=False)  # the adapters' keys are the UNet's own state-dict keys
    return adapters


# -----------------------------------------------------------------------------
# latents: encoded once per run (the code caches them too)


@torch.no_grad()
def encode_frames(vae, video):
    """(B, F, 3, H, W) in [-1, 1] -> latents (B, C, F, h, w). The SD VAE has no temporal compression: frames are
    encoded one by one, posterior mean x scaling_factor (the code caches one posterior sample instead)."""
    z = vae.encode(video.flatten(0, 1).float()).latent_dist.mode() * vae.config.scaling_factor
    return z.float().unflatten(0, (video.shape[0], -1)).transpose(1, 2)


@torch.no_grad()
def decode_frames(vae, z):
    """(B, C, F, h, w) -> (B, F, 3, H, W), frame by frame, as TextToVideoSDPipeline.decode_latents."""
    x = vae.decode(z.transpose(1, 2).flatten(0, 1).float() / vae.config.scaling_factor).sample
    return x.float().unflatten(0, (z.shape[0], -1))


def pseudo_video(image_latents, frames):
    """Sec. 3.2 / Algorithm 1 line 7: a photo (B, C, 1, h, w) duplicated into a still video of N frames."""
    return image_latents.expand(-1, -1, frames, -1, -1)


# -----------------------------------------------------------------------------
# the method's losses


def eps_pred(unet, z_t, t, text):
    return unet(z_t.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype), return_dict=False)[0].float()


def ofs_loss(unet, z0, text, alphas_cumprod, gen):
    """Eq. 7 (from MotionDirector): noise the pseudo-video z0 (B, C, N, h, w) (Algorithm 1 line 9), keep ONE random
    frame f of z_t and run the UNet on it alone (F = 1); epsilon MSE on that frame."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=gen).to(z0.device)
    z_t, eps = common.noisy_and_target("eps", z0, noise, t, alphas_cumprod)
    f = int(torch.randint(z0.shape[2], (1,), generator=gen))
    return F.mse_loss(eps_pred(unet, z_t[:, :, f:f + 1], t, text), eps[:, :, f:f + 1])


def offset_noise(kind, shape, gen):
    """eps' ~ N(0, I) of eq. 8 in (B, C, F, H, W) layout (the paper writes (F, H, W, C)): 'frame' (1, H, W, 1):
    one spatial map per sample shared by all frames and channels, (B, 1, 1, H, W); 'pixel' (F, 1, 1, C): one value
    per frame and channel, (B, C, F, 1, 1); 'video' (F, H, W, C): independent everywhere; 'none': zero."""
    b, c, f, h, w = shape
    size = dict(frame=(b, 1, 1, h, w), pixel=(b, c, f, 1, 1), video=(b, c, f, h, w)).get(kind)
    return torch.zeros(shape) if size is None else torch.randn(size, generator=gen).expand(shape)


def ait_loss(unet, z0, text, alphas_cumprod, gen, kind="frame", lam=10.0):
    """Eq. 8: L_AiT = lambda ||(eps_v + eps') - eps_theta(z_t)||^2. z_t is noised with eps_v alone (sec. 3.2: 'add
    it to the latent code following the diffusion forward process'); only the TARGET carries eps' ('perturbed
    targets'). The code adds eps' to the prediction instead: ||eps_v - (eps_theta + eps')||^2 =
    ||(eps_v - eps') - eps_theta||^2, the same loss in distribution since -eps' ~ eps'. eps' is independent of z_t,
    so the expected gradient is that of eq. 4: eps' acts as zero-mean gradient noise along one spatial pattern
    shared by all frames. kind='none' is lambda x eq. 4 (Table 3's -Offset Noise)."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=gen).to(z0.device)
    z_t, eps = common.noisy_and_target("eps", z0, noise, t, alphas_cumprod)
    target = eps + offset_noise(kind, z0.shape, gen).to(z0.device)
    return lam * F.mse_loss(eps_pred(unet, z_t, t, text), target)


# -----------------------------------------------------------------------------
# sampling: our own DDIM loop, equal to TextToVideoSDPipeline (deprecated) on the same UNet and latents


@torch.no_grad()
def sample(unet, scheduler, text, uncond, latents, steps, cfg):
    """Denoise `latents` (B, C, F, h, w) with classifier-free guidance, unconditional and conditional passes as one
    batch in the pipeline's order. The gates are per sample, so the two halves do not influence each other; there
    are no hand-set adapter scales (the gate is the scale)."""
    scheduler.set_timesteps(steps, device=latents.device)
    z, n = latents * scheduler.init_noise_sigma, latents.shape[0]
    text = text.expand(n, -1, -1)
    cond = torch.cat([uncond.expand_as(text), text])
    for t in scheduler.timesteps:
        u, c = eps_pred(unet, scheduler.scale_model_input(torch.cat([z, z]), t), t, cond).chunk(2)
        z = scheduler.step(u + cfg * (c - u), t, z, return_dict=False)[0]
    return z


def generate(m, text, args, n):
    """n videos (n, F, 3, H, W) of the sample prompt from fixed noise (--seed): DDIM with guidance, no LoRA dropout."""
    unet, vae = m["unet"], m["vae"]
    unet.eval()
    s = 2 ** (len(vae.config.block_out_channels) - 1)
    noise = torch.randn(n, unet.config.in_channels, args.frames, args.height // s, args.width // s,
                        generator=torch.Generator().manual_seed(args.seed))
    z = sample(unet, m["scheduler"], text["sample"], text["negative"], noise.to(unet.device), args.steps, args.cfg)
    return torch.cat([decode_frames(vae, zi[None]) for zi in z]).cpu()  # one at a time: a real decode is large


# -----------------------------------------------------------------------------
# training: Algorithm 1 (joint: epochs of photos then clips) or Algorithm 2 (--two-stage)


def epoch_batches(n_photos, n_clips, batch):
    """(image batches, video batches) of one epoch of the code's loader: each item once, the last batch short."""
    return -(-n_photos // batch), -(-n_clips // batch)


def is_image_step(step, n_image, n_video, iterations, two_stage):
    """Algorithm 1 walks one data loader over the photos, then the clips: the code's loader is a ConcatDataset of
    [photos, clips], not shuffled, so each epoch is n_image image batches then n_video video batches (4 photos and
    1 clip at batch 1: 4:1; the paper's 'alternately optimizes' names no ratio). --two-stage runs as many steps of
    each kind, all image steps first (Algorithm 2), so its Table 3 row changes only the order. Its stage I keeps the
    OFS loss (Algorithm 2 writes the whole-clip eq. 3, but Table 3 removes only the joint training)."""
    if two_stage:
        return step < iterations * n_image // (n_image + n_video)
    return step % (n_image + n_video) < n_image


def train(unet, alphas_cumprod, adapters, lat, text, args, state, out, preview=None):
    """`lat`: image latents (2, K, C, 1, h, w) (photos and their mirror images) and video latents (M, C, N, h, w);
    resumable from state['step'] with the optimiser, batch/noise generator and global RNG of the checkpoint.
    preview(step) writes a sample every --sample-every iterations."""
    groups = trainable(adapters, args.separate_lora)
    opt = torch.optim.AdamW(list(dict.fromkeys(groups["image"] + groups["video"])), lr=args.lr,
                            weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    if state.get("opt"):  # resuming: the same batches and noise as an uninterrupted run
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
    n_image, n_video = epoch_batches(lat["image"].shape[1], len(lat["video"]), args.batch)
    stage_two = [a for a in adapters.values() if a.kind == "spatial"] if args.two_stage and args.separate_lora else []
    log, last = common.StepLog(out / "log.jsonl", every=args.log_every, append=args.resume), {}
    unet.train()  # LoRA dropout on; the frozen UNet itself has no dropout
    bar = tqdm(range(state.get("step", 0), args.iterations), desc="two-stage" if args.two_stage else "joint",
               disable=None)
    for step in bar:
        image = is_image_step(step, n_image, n_video, args.iterations, args.two_stage)
        if image:
            idx = torch.randint(lat["image"].shape[1], (args.batch,), generator=gen)
            flip = (torch.rand(args.batch, generator=gen) < args.hflip).long()
            z0 = pseudo_video(lat["image"][flip, idx], args.frames)
            loss = ofs_loss(unet, z0, text["subject"].expand(args.batch, -1, -1), alphas_cumprod, gen)
        else:
            for a in stage_two:  # Algorithm 2, stage II: kappa learns on the unadapted spatial features
                a.enabled = False
            z0 = lat["video"][torch.randint(len(lat["video"]), (args.batch,), generator=gen)]
            loss = ait_loss(unet, z0, text["motion"].expand(args.batch, -1, -1), alphas_cumprod, gen,
                            args.offset_noise, args.ait_lambda)
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=groups["image" if image else "video"])  # the other set gets no gradient, no update
        opt.step()
        last["ofs" if image else "ait"] = loss.item()  # the latest of each loss, one line per interval
        log(step + 1, bar, **last)
        if (step + 1) % args.save_every == 0 and step + 1 < args.iterations:
            save_state(out, unet, step + 1, opt, gen)
        if preview and args.sample_every and (step + 1) % args.sample_every == 0:
            for a in stage_two:  # the sample uses every adapter, as the final one; the next video step turns them off
                a.enabled = True
            preview(step + 1)
            unet.train()
    for a in adapters.values():
        a.enabled = True
    unet.eval()


def save_state(out, unet, step, opt, gen):
    """Everything --resume needs: step, adapters, optimiser, generator and global RNG (atomic write)."""
    common.save_atomic(dict(step=step, adapters=adapter_state(unet), opt=opt.state_dict(), gen=gen.get_state(),
                            rng=common.rng_state()), out / "ckpt.pt")


def read_state(path, args):
    """--resume's training state, opened and matched to the flags that shape it before any model loads."""
    state = common.load_checkpoint(path)
    if not (isinstance(state, dict) and {"step", "adapters", "opt", "gen", "rng"} <= set(state)):
        common.fail(f"{path} holds no JointTuner training state: train again with --overwrite")
    ranks = {v.shape[0] for k, v in state["adapters"].items() if k.endswith("lora_A.weight")}
    if ranks != {args.rank}:
        common.fail(f"{path} was trained with --rank {', '.join(map(str, ranks))}: resume with the same flags")
    if any(k.endswith("gate.weight") for k in state["adapters"]) == args.no_gate:
        common.fail(f"{path} was trained {'without' if args.no_gate else 'with'} --no-gate: resume with the same flags")
    return state


def load_state(state, unet):
    unet.load_state_dict(state["adapters"], strict=False)
    common.set_rng_state(state["rng"])


# -----------------------------------------------------------------------------
# main


def plan(args, prompts, images, clips):
    n_image, n_video = epoch_batches(len(images), len(clips), args.batch)
    real = "" if args.model == "toy" else " (ZeroScope: 1.4 B UNet3D, 84 M VAE, 354 M CLIP text encoder freed " \
                                          "after encoding; the paper: 17 GB, ~30 min for 2000 iterations)"
    lines = [f"model: {args.model}" + real,
             f"adapters: {'classic LoRA' if args.no_gate else 'Adaptive LoRA (gated)'} rank {args.rank}, dropout "
             f"{args.dropout}, in spatial attn1 + FFN and temporal attn1 + attn2 + FFN, "
             f"{'separate spatial/temporal sets' if args.separate_lora else 'one shared set'}",
             f"subject: {len(images)} photos at {args.height}x{args.width} -> {args.frames}-frame pseudo-videos, "
             f"prompt {prompts['subject']!r}, One-Frame Spatial loss, hflip {args.hflip}",
             f"motion: {len(clips)} clip(s) from {args.motion}, each resampled to {args.frames} frames and resized/"
             f"cropped to {args.height}x{args.width}, prompt {prompts['motion']!r}, AiT loss lambda "
             f"{args.ait_lambda}, offset noise {args.offset_noise}",
             f"training: {args.iterations} iterations, " + (
                 "all image batches, then all video batches" if args.two_stage else
                 f"epochs of {n_image} image then {n_video} video batch(es)")
             + f", batch {args.batch}, AdamW lr {args.lr} wd {args.weight_decay}",
             f"sample: {prompts['sample']!r}, {args.frames} frames at {args.height}x{args.width}, DDIM {args.steps} "
             f"steps, cfg {args.cfg}",
             f"out: {args.out}"]
    print("\n".join(lines))


# Table 3's rows: CUMULATIVE (sec. 4.3 removes components one after the other); "base" trains nothing (B = 0)
ABLATIONS = {"base": ["--iterations", "0"],
             "Noise-Frame (full)": [],
             "Noise-Pixel": ["--offset-noise", "pixel"],
             "Noise-Video": ["--offset-noise", "video"],
             "-Offset Noise": ["--offset-noise", "none"],
             "-LoRA Gating": ["--offset-noise", "none", "--no-gate"],
             "-LoRA Union": ["--offset-noise", "none", "--no-gate", "--separate-lora"],
             "-Joint Training": ["--offset-noise", "none", "--no-gate", "--separate-lora", "--two-stage"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.ablate:
        check_args(args)  # the table's own --seeds too, before its runs
        return toyworld.run_ablations(main, argv, ABLATIONS, args, "jointtuner", "; rows are cumulative")
    images, videos, prompts, clips = read_inputs(args)
    if args.model != "toy":
        common.check_pretrained(args.model, "--model")
    out = Path(args.out)
    common.check_out(out, args.resume, args.sample_only, args.overwrite)
    if args.sample_only:
        check_adapters(out / "adapters.safetensors")
    state = read_state(out / "ckpt.pt", args) if args.resume else {}
    plan(args, prompts, images, clips)
    if args.dry_run:
        return None
    device, dtype = common.device_and_dtype(args.dtype)
    common.seed_everything(args.seed)
    m = load_models(args, device, dtype)
    if args.overwrite and not (args.resume or args.sample_only):
        common.clear_run(out, ["adapters.safetensors"])
    out.mkdir(parents=True, exist_ok=True)
    if not args.sample_only:  # sampling alone keeps the training's config
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))

    # prompts and latents once; then the text encoder is freed
    text = {k: common.encode_prompts(m["tokenizer"], m["text_encoder"], [p], args.max_text_len).to(device)
            for k, p in dict(prompts, negative=args.negative_prompt).items()}
    del m["text_encoder"]
    unet = m["unet"]
    if args.grad_ckpt:
        checkpoint_blocks(unet)
    if args.sample_only:
        load_adapters(unet, out / "adapters.safetensors", args.dropout)
    else:
        adapters = add_adapters(unet, args.rank, args.dropout, not args.no_gate)
        kinds, size = [a.kind for a in adapters.values()], sum(p.numel() for p in trainable(adapters, False)["video"])
        print(f"adapters on {len(adapters)} linears ({size / 1e6:.2f} M parameters): {kinds.count('spatial')} in "
              f"spatial transformers ({', '.join(SPATIAL)}), {kinds.count('temporal')} in temporal ones (+ attn2)")
        lat = dict(image=torch.stack([encode_frames(m["vae"], images[:, None].to(device)),   # photos and mirrors
                                      encode_frames(m["vae"], images.flip(-1)[:, None].to(device))]),
                   video=encode_frames(m["vae"], videos.to(device)))
        if state:
            load_state(state, unet)
        preview = lambda step: common.write_preview(out, step, generate(m, text, args, 1)[0], args.fps,
                                                    toy=args.model == "toy")
        train(unet, m["scheduler"].alphas_cumprod, adapters, lat, text, args, state, out, preview)
        save_adapters(unet, out / "adapters.safetensors", args)

    video = generate(m, text, args, args.num_samples)
    return common.write_result(out, video, images, videos[0], prompts["sample"], args.fps,
                               evaluate=toyworld.evaluate if args.model == "toy" else None)


if __name__ == "__main__":
    common.cli(main)
