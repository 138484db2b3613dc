r"""SMRABooth: Subject and Motion Representation Alignment for customized video generation (CVPR 2026), on Wan2.1.

Two LoRAs are trained separately on a frozen Wan2.1 transformer. The subject LoRA learns a few photos with a
masked flow-matching loss plus SuRA: the hidden states after the first block, through a small MLP, are pulled
toward the frozen DINOv2 patch features of the photo. The motion LoRA learns a reference video with the
flow-matching loss plus MoRA: the one-step clean estimate is decoded and its optical flow is pulled toward the
reference video's flow. Both are trained in every block linear; at inference they are injected sparsely: the
subject LoRA only in Q, K and FFN.0, the motion LoRA only in V, O, FFN.0 and FFN.2, and the subject LoRA at half
strength for the first 30% of the sampling steps.

    # a real run (`python bench.py --estimate`: the motion stage with MoRA ~45 GB with the default checkpointing of
    # the transformer and of MoRA's decode, ~112 GB with --no-grad-ckpt --no-mora-ckpt; weights from the hub cache
    # or local folders)
    python smrabooth.py --subject photos/ --motion dance.mp4 --prompt "a sks dog dancing on the beach at sunset" \
        --raft-weights raft_large_C_T_SKHT_V2-ff5fadd5.pth
    # the toy world on a CPU in minutes (toy backbone, bundled toy subject and motion)
    python smrabooth.py --model toy
    python smrabooth.py --model toy --sample-only          # reuse the LoRAs saved in --out

Paper: "SMRABooth: Subject and Motion Representation Alignment for Customized Video Generation" (CVPR 2026; see
CITATION.bib): the method (SuRA, MoRA, sparse injection, losses, hyperparameters) and its supplementary material
(T_point and subject-scale ablations, Alg. 1 one-step x0, sec. 2.2 the sliding-window VAE decode).
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
    p.add_argument("--subject", help="folder of 3-5 subject photos (+ masks/<same name>, white = subject; "
                                     "+ prompt.txt with the class word)")
    p.add_argument("--motion", help="reference video file, a folder of its frames, or a folder of clips")
    p.add_argument("--class-word", help="the subject's class (default: SUBJECT/prompt.txt, else 'object')")
    p.add_argument("--motion-caption", help="the video's caption, its content and motion (supp. sec. 3) (default: "
                                            "the .txt beside the video or caption.txt in its folder, else 'moving')")
    p.add_argument("--prompt", help="sampling prompt: the subject doing the motion in a setting; needed for real "
                                    "models (toy default: 'a sks star' + the caption's motion and background)")
    p.add_argument("--placeholder", default="sks", help="the subject's identifier word")
    p.add_argument("--subject-size", type=int, default=512, help="subject photos are resized/cropped to this")
    p.add_argument("--motion-size", type=int, nargs=2, default=[320, 576], metavar=("H", "W"))
    p.add_argument("--motion-frames", type=int, default=49, help="reference frames used for training (4k+1)")
    p.add_argument("--motion-start", type=int, default=0, help="first frame of the reference clip to use")
    p.add_argument("--motion-end", type=int, help="frame after the last one to use (default: the clip's end)")
    p.add_argument("--motion-stride", type=int, help="take every n-th frame instead of spreading uniformly")
    # models
    p.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="hub id, local folder, or 'toy'")
    p.add_argument("--dino", default="facebook/dinov2-giant", help="SuRA's frozen encoder (hub id or folder)")
    p.add_argument("--raft-weights", help="torchvision raft_large state dict (.pth), MoRA's frozen flow network "
                                          "(the paper uses SEA-RAFT, which is not on PyPI)")
    p.add_argument("--max-text-len", type=int, default=512, help="text tokens, as WanPipeline")
    # adapters
    p.add_argument("--subject-rank", type=int, default=32)
    p.add_argument("--motion-rank", type=int, default=64)
    p.add_argument("--proj-hidden", type=int, default=2048, help="width of SuRA's projector h_phi")
    # optimisation
    p.add_argument("--subject-steps", type=int, default=300)
    p.add_argument("--motion-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sura-lambda", type=float, default=0.05, help="lambda: weight of L_SuRA")
    p.add_argument("--mora-alpha", type=float, default=1.0, help="alpha: weight of L_MoRA")
    p.add_argument("--mora-window", type=int, default=6, help="latent frames decoded per MoRA step (supp. 2.2: 6 = "
                                                              "21 frames, 16 kept; the toy preset: 4 frames); fewer "
                                                              "need less memory (min. 3)")
    p.add_argument("--mora-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute MoRA's VAE decode in the backward pass, latent frame by latent frame (memory for "
                        "speed; not the paper's; on by default: with --grad-ckpt it brings the motion stage to ~45 GB)")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift of training sigmas and sampler (Wan 480p)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing of the transformer's blocks (memory for speed; on by default: the "
                        "motion stage with MoRA needs ~112 GB without it and without --mora-ckpt)")
    # sampling
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (Wan's default)")
    p.add_argument("--t-point", type=float, default=0.3, help="T_point as a fraction of the steps (15 of 50)")
    p.add_argument("--subject-early-scale", type=float, default=0.5, help="subject LoRA scale before T_point")
    p.add_argument("--subject-late-scale", type=float, default=1.0, help="subject LoRA scale from T_point on")
    p.add_argument("--motion-scale", type=float, default=1.0)
    p.add_argument("--subject-layers", nargs="+", default=["to_q", "to_k", "ffn.net.0.proj"],
                   help="module-name endings the subject LoRA acts in at inference (sec. 3.4: Q, K, FFN.0)")
    p.add_argument("--motion-layers", nargs="+", default=["to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
                   help="the same for the motion LoRA (V, O, FFN.0, FFN.2); e.g. 'attn2.to_v' for one layer kind")
    p.add_argument("--self-attn-only", action="store_true", help="sparse injection only in attn1 (the paper does "
                                                                 "not say; default: self- and cross-attention)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--fps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="frozen weights' dtype (auto: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--num-samples", type=int, default=1, help="videos sampled from different noise, batched "
                                                                "(toy metrics: their mean)")
    # ablations (the paper's tables)
    p.add_argument("--no-sura", action="store_true", help="stage 1 without L_SuRA")
    p.add_argument("--no-mora", action="store_true", help="stage 2 without L_MoRA")
    p.add_argument("--no-mask", action="store_true", help="region loss over the whole image")
    p.add_argument("--inject", choices=["sparse", "all"], default="sparse",
                   help="all = 'Combination 1': both LoRAs injected in every layer")
    p.add_argument("--subject-drop-ffn0", action="store_true", help="'Combination 2': no subject LoRA in FFN.0")
    p.add_argument("--motion-drop-ffn0", action="store_true", help="'Combination 3': no motion LoRA in FFN.0")
    # run
    p.add_argument("--out", default="out/smrabooth")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else it is kept)")
    p.add_argument("--sample-only", action="store_true", help="sample with the LoRAs saved in --out")
    p.add_argument("--dry-run", action="store_true", help="check inputs, print the plan, load nothing")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=250, help="write a sample (fixed seed) to --out/samples/ every "
                                                                 "this many steps of each stage (0: never)")
    p.add_argument("--ablate", action="store_true", help="toy world: run the base model, the full method and every "
                                                         "ablation (--seeds, --ablation-seeds), and print the table")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the base model and the full method in --ablate")
    p.add_argument("--ablation-seeds", type=int, default=1,
                   help="seeds for every other --ablate variant (0: base and full only)")
    args = p.parse_args(argv)
    if args.model == "toy":
        toyworld.apply_preset(args, p, argv, TOY)
    return args


# the toy world: 9 frames of 32x32, its pretrained tiny Wan (trained with the real flow shift 3, so --shift keeps its
# default), fewer sampling steps, a larger lr; no checkpointing (its toy VAE has no causal decoder to checkpoint, and
# the toy needs no memory saving)
TOY = dict(subject_size=32, motion_size=[32, 32], motion_frames=9, height=32, width=32, frames=9, fps=4,
           max_text_len=16, proj_hidden=64, lr=1e-3, batch=4, steps=20, cfg=4.0, num_samples=4,
           grad_ckpt=False, mora_ckpt=False, mora_window=4)


# -----------------------------------------------------------------------------
# data: checked before anything loads; a bad input ends with one line and exit code 2


def check_args(args):
    """Every flag in range before anything loads: floats finite; 0 training steps is the untrained base model
    (--ablate's "base"), LoRA scales 0 switch a LoRA off; Wan's VAE needs 4k+1 frames and, with the 2x2 patches,
    sizes that are multiples of 16 (8x VAE)."""
    common.check_numbers(args, at_least_one=["subject_rank", "motion_rank", "proj_hidden", "batch", "steps",
                                             "num_samples", "max_text_len", "fps", "log_every", "save_every",
                                             "seeds", "motion_stride"],
                         at_least_zero=["subject_steps", "motion_steps", "sample_every", "motion_start",
                                        "ablation_seeds", "cfg", "subject_early_scale", "subject_late_scale",
                                        "motion_scale"],
                         positive=["lr", "sura_lambda", "mora_alpha", "shift"], unit=["t_point"])
    for flag, n in (("--motion-frames", args.motion_frames), ("--frames", args.frames)):
        if n % 4 != 1 or n < 5:
            lower = max(5, n - (n - 1) % 4)
            common.fail(f"{flag} {n}: Wan's VAE encodes 4k+1 frames; use {lower} or {lower + 4}")
    if args.mora_window < 3:
        common.fail(f"--mora-window {args.mora_window}: MoRA drops the first 5 decoded frames, so a window needs 3 "
                    f"or more latents")
    for flag, sizes in (("--subject-size", [args.subject_size]), ("--motion-size", args.motion_size),
                        ("--height/--width", [args.height, args.width])):
        if any(q % 16 or q < 16 for q in sizes):
            common.fail(f"{flag} {' '.join(map(str, sizes))}: use multiples of 16 (Wan's 8x VAE and 2x2 patches)")
    common.check_clip_range(args)
    common.check_words(args, ["prompt", "class_word", "motion_caption"])
    if args.placeholder.split() != [args.placeholder]:
        common.fail(f"--placeholder {args.placeholder!r} must be one word, e.g. sks")
    for flag, names in (("--subject-layers", args.subject_layers), ("--motion-layers", args.motion_layers)):
        odd = [n for n in names if not n.endswith(tuple(LORA_TARGETS))]
        if odd:
            common.fail(f"{flag} {' '.join(map(repr, odd))}: each must end with a LoRA layer's name "
                        f"({', '.join(LORA_TARGETS)})")


def read_inputs(args):
    """Subject photos (N, 3, S, S), their masks (N, 1, S, S), reference clips (C, F, 3, H, W) and the prompts."""
    check_args(args)
    if not args.subject or not args.motion:
        common.fail("--subject DIR and --motion VIDEO are needed (or --model toy, which brings its own)")
    folder = Path(args.subject)
    if not folder.is_dir():
        common.fail(f"--subject {args.subject!r} is not a folder of subject photos")
    paths = common.list_images(folder)
    if not paths:
        common.fail(f"{folder} has no image ({', '.join(common.IMAGE_EXTS)})")
    size = (args.subject_size, args.subject_size)
    photos = [common.read_image(p) for p in paths]
    images = torch.stack([common.resize_crop(x, size) for x in photos])
    if (folder / "masks").is_dir() and not args.no_mask:
        missing = [p.name for p in paths if not (folder / "masks" / p.name).is_file()]
        if missing:
            common.fail(f"no mask with the same name in {folder / 'masks'} for: {', '.join(missing)}")
        masks = [common.read_image(folder / "masks" / p.name) for p in paths]
        for p, x, m in zip(paths, photos, masks):  # resized alike, a mask of another size would miss the subject
            if m.shape != x.shape:
                common.fail(f"mask {folder / 'masks' / p.name} is {m.shape[2]}x{m.shape[1]}, its photo "
                            f"{x.shape[2]}x{x.shape[1]}: a mask must have its photo's size")
        masks = torch.stack([common.resize_crop(m, size)[:1] > 0 for m in masks]).float()
    else:  # --no-mask (the ablation) or no masks given: the region loss covers the whole image
        if not args.no_mask:
            print(f"warning: no {folder / 'masks'}; the region loss uses the whole image (we ship no segmenter)")
        masks = torch.ones(len(paths), 1, *size)
    if not Path(args.motion).exists():
        common.fail(f"--motion {args.motion!r} does not exist (a video file, a folder of frames or of clips)")
    motion = Path(args.motion)
    clips = [motion] if motion.is_file() or common.list_images(motion) else \
        sorted(q for q in motion.iterdir() if q.suffix.lower() in common.VIDEO_EXTS)
    if not clips:
        common.fail(f"{motion} holds neither frames nor video files")
    videos = torch.stack([common.read_video(c, args.motion_frames, tuple(args.motion_size), args.motion_start,
                                            args.motion_end, args.motion_stride) for c in clips])
    class_word = args.class_word or common.read_text(folder / "prompt.txt", "object")
    sidecar = motion.with_suffix(".txt") if motion.is_file() else motion / "caption.txt"
    motion_caption = args.motion_caption or common.read_text(sidecar, "moving")
    subject = f"a {args.placeholder} {class_word}"
    if args.prompt is None and args.model != "toy":  # a real caption names its own subject ("a man dancing...")
        common.fail(f"real models need --prompt (the video you want, e.g. '{subject} dancing on the beach at sunset'); "
                    f"the paper's prompts are GPT-4o's")
    # supp. sec. 3: the photos are captioned "A picture of V* <subject name>", the video by a detailed caption of its
    # content and motion; the sampling prompts are GPT-4o's (subject + motion + a setting), so --model toy writes its
    # own from the world's words (toyworld.sample_prompt)
    sample = args.prompt or toyworld.sample_prompt(subject, motion_caption)
    prompts = dict(subject=f"a picture of {args.placeholder} {class_word}", motion=motion_caption, sample=sample)
    if args.placeholder not in prompts["sample"].split():
        common.fail(f"the prompt {prompts['sample']!r} does not contain the placeholder word {args.placeholder!r}")
    return images, masks, videos, prompts


def check_motion_frames(args):
    """MoRA's window of w latents decodes 1 + 4 (w - 1) frames of Wan's causal VAE and keeps the last 4 (w - 2)
    (supplement 2.2: 6 latents, 21 frames, 16 kept), w frames of the toy VAE: the reference clip must be that long."""
    n, w = args.motion_frames, args.mora_window
    if args.model == "toy" and n < w:
        common.fail(f"--motion-frames {n} is shorter than MoRA's window of {w} frames: use a smaller --mora-window")
    if args.model != "toy" and n < 4 * (w - 1) + 1:
        common.fail(f"--motion-frames {n} is shorter than MoRA's window of {w} latents ({4 * (w - 1) + 1} frames, "
                    f"supplement 2.2): use a longer clip or a smaller --mora-window (3 or more)")


# -----------------------------------------------------------------------------
# backbone and adapters


def load_models(args, device, dtype):
    """Wan2.1 (transformer, VAE, UMT5 and its tokenizer, the sampler) and the flow network: the real ones from hub
    ids / local folders, or the toy world's tiny models and stand-ins for --model toy. DINOv2: load_dino."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if args.model == "toy":
        m = dict(transformer=common.to_dtype(toyworld.load_backbone("wan"), dtype), vae=toyworld.load_vae(),
                 tokenizer=toyworld.tokenizer("t5"), text_encoder=toyworld.text_encoder("umt5").to(dtype),
                 flow=toyworld.toy_flow,  # a stand-in for RAFT; fp32 files, cast as the real ones load
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift))
    else:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel
        m = dict(transformer=WanTransformer3DModel.from_pretrained(args.model, subfolder="transformer",
                                                                   torch_dtype=dtype),
                 vae=AutoencoderKLWan.from_pretrained(args.model, subfolder="vae", torch_dtype=torch.float32),
                 tokenizer=AutoTokenizer.from_pretrained(args.model, subfolder="tokenizer"),
                 text_encoder=UMT5EncoderModel.from_pretrained(args.model, subfolder="text_encoder",
                                                               torch_dtype=dtype),
                 # real Wan samples with UniPC on flow sigmas (deterministic); the flow_shift is the model's own
                 scheduler=UniPCMultistepScheduler.from_pretrained(args.model, subfolder="scheduler"))
        if not (args.sample_only or args.no_mora):  # only MoRA needs the flow network
            m["flow"] = functools.partial(raft_flow, load_raft(args.raft_weights, device))
    for k in ("transformer", "vae", "text_encoder"):  # frozen; the VAE in fp32, the rest in `dtype` as loaded:
        # moved only, so that Wan keeps the modules from_pretrained keeps in fp32 (rope, time embedder, norms), as in
        # WanPipeline
        m[k] = m[k].to(device).eval().requires_grad_(False)
    return m


def check_raft_weights(path):
    """MoRA's flow network weights, opened before anything else loads: a torchvision raft_large state dict. Nothing
    is downloaded here, so Raft_Large_Weights only names the file (its DEFAULT, C_T_SKHT_V2)."""
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    if not (path and Path(path).is_file()):
        common.fail(f"MoRA needs torchvision RAFT weights: --raft-weights {Path(Raft_Large_Weights.DEFAULT.url).name} "
                    f"(from {Raft_Large_Weights.DEFAULT.url}), or --no-mora")
    try:
        raft_large(weights=None).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        common.fail(f"--raft-weights {path} is not torchvision's raft_large state dict ({common.first_line(e)})")


def load_raft(path, device):
    """torchvision's RAFT-large, frozen like the other networks: in eval mode its BatchNorm layers keep their
    running statistics, and its weights collect no gradient (MoRA's gradient passes through it to the frames)."""
    from torchvision.models.optical_flow import raft_large
    raft = raft_large(weights=None)
    raft.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return raft.to(device).eval().requires_grad_(False)


def raft_flow(raft, a, b):
    """Flow from frames a to b (N, 3, H, W) in [-1, 1]: the last of RAFT's 12 refinements. RAFT takes fp32 frames in
    [-1, 1], what the weights' own preset (Raft_Large_Weights.transforms()) makes of [0, 1] images, so the frames go
    in as they are: the preset's normalize checks its std with a data-dependent `.any()`, which the meta device
    (bench.py --estimate) cannot run. MoRA's gradient reaches the frames."""
    return raft(a.float().contiguous(), b.float().contiguous(), num_flow_updates=12)[-1]


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # attn1 + attn2 + FFN


def add_loras(transformer, args):
    """Both LoRAs on every block linear; sparsity is an inference choice. The papers say where the LoRAs are
    injected, not where they are trained; sec. 3.4's sparsity study zeroes the scales of LoRAs trained in every
    layer, and its Combination 1 injects both everywhere, so both are trained everywhere here."""
    subject = common.add_lora(transformer, "subject", args.subject_rank, LORA_TARGETS)
    motion = common.add_lora(transformer, "motion", args.motion_rank, LORA_TARGETS)
    return subject, motion


def injection_where(args):
    """Which LoRA layers each adapter acts in at inference (sec. 3.4, layer-wise sparsity), by module name."""
    subject, motion = list(args.subject_layers), list(args.motion_layers)
    if args.subject_drop_ffn0:
        subject = [n for n in subject if n != "ffn.net.0.proj"]
    if args.motion_drop_ffn0:
        motion = [n for n in motion if n != "ffn.net.0.proj"]
    if args.inject == "all":
        subject = motion = LORA_TARGETS

    def where(names):
        return lambda n: any(n.endswith(s) for s in names) and not (args.self_attn_only and ".attn2." in n)
    return where(subject), where(motion)


def set_injection(layers, args, i, steps):
    """Step-wise sparsity: the subject LoRA at the early scale before T_point, at the late scale after."""
    subject_where, motion_where = injection_where(args)
    early = i < round(args.t_point * steps)
    common.set_lora_scale(layers, "subject", args.subject_early_scale if early else args.subject_late_scale,
                          subject_where)
    common.set_lora_scale(layers, "motion", args.motion_scale, motion_where)


class Projector(nn.Module):
    """SuRA's h_phi: transformer tokens (dim) -> DINOv2 feature space (D). Trained with the subject LoRA, then
    discarded: it is not used at inference."""

    def __init__(self, dim, hidden, out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


# -----------------------------------------------------------------------------
# latents: encoded once per run


def normalize(vae, z):
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).to(z.dtype)


def unnormalize(vae, z):
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return (z * std + mean).to(z.dtype)


@torch.no_grad()
def encode_video(vae, video):
    """(B, F, 3, H, W) in [-1, 1] -> normalised Wan latents (B, C, F', h, w); the VAE runs in fp32."""
    return normalize(vae, vae.encode(video.transpose(1, 2).float()).latent_dist.mode().float())


# -----------------------------------------------------------------------------
# the method's losses


def region_loss(v_pred, v, mask):
    """L_region = mean(M * (v_pred - v)^2), M the subject mask on the latent grid (sec. 3.2)."""
    m = F.interpolate(mask, size=v.shape[-2:], mode="area")[:, :, None]  # (B, 1, 1, h, w)
    return (m * (v_pred.float() - v.float()) ** 2).mean()


def sura_loss(tokens, projector, target):
    """L_SuRA = -(1/N) sum_n cos(h_phi(z_t^1)[n], y*[n]) between projected block-0 tokens (B, N, dim) and
    DINOv2 patch tokens (B, N, D) on the same grid (sec. 3, "Subject Representation Alignment")."""
    return -F.cosine_similarity(projector(tokens.float()), target.float(), dim=-1).mean()


def load_dino(args, device, dtype):
    """SuRA's frozen encoder, DINOv2 (the toy world's stand-in for --model toy). Only runs where SuRA trains, and only
    for sura_targets, once: DINOv2-giant is ~2 GB in bf16, so it is not kept for the motion stage or sampling."""
    if args.model == "toy":
        dino = toyworld.image_encoder("dinov2").to(dtype)
    else:
        from transformers import AutoModel
        dino = AutoModel.from_pretrained(args.dino, torch_dtype=dtype)
    return dino.to(device).eval().requires_grad_(False)


def sura_targets(args, state, transformer, images, grid, dtype):
    """SuRA's DINOv2 targets of the photos and its projector h_phi where this run trains SuRA (not --no-sura, not
    resumed in the motion stage), else (None, None): DINOv2 is loaded only then, and freed on return."""
    if args.no_sura or state["stage"] != "subject":
        return None, None
    targets = dino_targets(load_dino(args, images.device, dtype), images, grid)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return targets, Projector(dim, args.proj_hidden, targets.shape[-1]).to(images.device)


@torch.no_grad()
def dino_targets(dino, images, grid):
    """DINOv2 patch tokens on the latent token grid: each image is fed at grid x patch pixels, so that one DINO
    patch covers one transformer token (no interpolation of features needed)."""
    p = dino.config.patch_size
    x = F.interpolate((images + 1) / 2, size=(grid[0] * p, grid[1] * p), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    out = dino(pixel_values=((x - mean) / std).to(dino.dtype)).last_hidden_state
    return out[:, 1 + getattr(dino.config, "num_register_tokens", 0):]  # drop CLS (and registers)


def one_step_x0(z_t, v_pred, sigma):
    """Supplement Alg. 1: z0_hat = z_t - sigma * v_pred (exact when v_pred is the true velocity eps - z0)."""
    return common.predicted_x0("flow", z_t, v_pred, sigma)


def window(vae, num_latents, k, size):
    """Sliding-window decode plan (supplement 2.2): decode latents k..k+size-1 (6 -> 1 + 4 * 5 = 21 frames), drop
    the first 5 decoded frames (the causal VAE's warm-up: the first latent's frame and the next latent's 4) and keep
    16 = reference frames 4k+5 .. 4k+20. Returns (start, end, dropped, reference indices of the kept frames).
    Without temporal compression (the toy VAE, frame by frame) a latent is a frame: frames k..k+size-1, all kept."""
    t = vae.config.scale_factor_temporal
    if t == 1:
        return k, k + size, 0, list(range(k, k + size))
    drop = 1 + t
    return k, k + size, drop, list(range(t * k + drop, t * k + drop + t * (size - 2)))


def decode_window(vae, z0_hat, k, size, ckpt=False):
    """Decode the latent window with gradients; returns frames (B, F, 3, H, W) and the reference frame indices.
    ckpt: recompute the decode in the backward pass (decode_checkpointed) instead of keeping its activations."""
    start, end, drop, ref_idx = window(vae, z0_hat.shape[2], k, size)
    z = unnormalize(vae, z0_hat[:, :, start:end].float())  # the VAE runs in fp32
    video = decode_checkpointed(vae, z) if ckpt else vae.decode(z).sample  # (B, 3, F, H, W)
    return video[:, :, drop:].transpose(1, 2), ref_idx


def decoder_step(decoder, x, cache, first):
    """One latent frame through Wan's causal decoder; `cache` holds what each causal conv keeps of the frames
    before. The updated cache is a new list and the given one is left as it was, so that torch.utils.checkpoint can
    run the step again in the backward pass and get the same result."""
    cache = list(cache)
    return decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first), cache


def decode_checkpointed(vae, z):
    """AutoencoderKLWan.decode of Wan2.1 (no patchify, no tiling), latent frame by latent frame as it decodes, with
    each frame's decoder pass checkpointed: the backward pass recomputes it, so the decode keeps only the causal
    caches between frames, not all its activations. diffusers' AutoencoderKLWan offers no gradient checkpointing."""
    x = vae.post_quant_conv(z)
    cache = [None] * sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
    frames = []
    for i in range(x.shape[2]):
        out, cache = checkpoint(decoder_step, vae.decoder, x[:, :, i:i + 1], cache, i == 0, use_reentrant=False)
        frames.append(out)
    return torch.cat(frames, 2).clamp(-1, 1)  # as AutoencoderKLWan.decode: no gradient through saturated pixels


@torch.no_grad()
def reference_flows(flow, videos):
    """Flows between consecutive frames of each reference clip (C, F, 3, H, W), once: MoRA compares against them."""
    return torch.stack([flow(v[:-1], v[1:]) for v in videos])


def mora_loss(flow, frames, ref_flow):
    """L_MoRA = |F(x~_i, x~_i+1) - F(x_i, x_i+1)|_1 over consecutive decoded frames (sec. 3.3): the L1 norm of each
    pixel's flow difference (|du| + |dv|), averaged over pixels and frame pairs. The flows are the flow network's
    own output, in pixels, as the paper writes it with alpha = 1: it names no normalisation, so the term grows with
    the resolution (at the toy's 32 px it is 10-18x smaller than at the paper's 576x320 for the same motion)."""
    b, f = frames.shape[:2]
    gen = flow(frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1)).unflatten(0, (b, f - 1))
    return (gen.float() - ref_flow.float()).abs().sum(2).mean()


# -----------------------------------------------------------------------------
# sampling: our own loop, equal to WanPipeline when every LoRA scale is 1


@torch.no_grad()
def sample(transformer, scheduler, text, uncond, latents, steps, cfg, on_step=None):
    """Denoise `latents` (B, C, F', h, w). The conditional and unconditional passes run as one batch;
    on_step(i, steps) sets the LoRA scales of step i (sparse injection)."""
    scheduler.set_timesteps(steps, device=latents.device)
    z, n = latents, latents.shape[0]
    text = text.expand(n, -1, -1)
    cond = torch.cat([text, uncond.expand_as(text)]).to(transformer.dtype)
    for i, t in enumerate(scheduler.timesteps):
        if on_step:
            on_step(i, steps)
        out = transformer(torch.cat([z, z]).to(transformer.dtype), t.expand(2 * n), cond, return_dict=False)[0]
        c, u = out.float().chunk(2)
        z = scheduler.step(u + cfg * (c - u), t, z, return_dict=False)[0]
    return z


def generate(m, text, args, n):
    """n videos (n, F, 3, H, W) of the sample prompt from fixed noise (--seed): both LoRAs (during the subject stage
    the motion LoRA is still zero), sparse in layers and steps."""
    transformer, vae = m["transformer"], m["vae"]
    transformer.set_adapters(["subject", "motion"])
    layers = common.lora_layers(transformer)
    t_lat = (args.frames - 1) // vae.config.scale_factor_temporal + 1
    s = vae.config.scale_factor_spatial
    noise = torch.randn(n, transformer.config.in_channels, t_lat, args.height // s, args.width // s,
                        generator=torch.Generator().manual_seed(args.seed))
    z = sample(transformer, m["scheduler"], text["sample"], text["uncond"], noise.to(transformer.device), args.steps,
               args.cfg, on_step=lambda i, steps: set_injection(layers, args, i, steps))
    return torch.stack([vae.decode(unnormalize(vae, zi[None].to(torch.float32))).sample[0].transpose(0, 1)
                        .float().cpu() for zi in z])  # one at a time: a real VAE decode is large


# -----------------------------------------------------------------------------
# training


def sample_sigmas(n, shift, gen, device):
    """Training noise levels from the sampler's shifted schedule: sigma = shift u / (1 + (shift - 1) u)."""
    u = torch.rand(n, generator=gen).to(device)
    return shift * u / (1 + (shift - 1) * u)


def block0_hook(transformer, store):
    """Keep the tokens after the FIRST block (SuRA aligns them); gradients flow through them."""
    return transformer.blocks[0].register_forward_hook(lambda mod, inp, out: store.__setitem__("h", out))


def train_stage(stage, m, lat, text, args, trainable, state, out, extra=None, preview=None):
    """One stage (subject or motion): its LoRA alone is active; resumable from state['step'].
    preview(stage, step) writes a sample every --sample-every steps."""
    transformer, device = m["transformer"], lat.device
    transformer.set_adapters([stage])
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-2)
    if state.get("opt"):
        opt.load_state_dict(state["opt"])
    gen = torch.Generator().manual_seed(args.seed + (0 if stage == "subject" else 1))
    if state.get("gen") is not None:  # resuming: the same batches and noise as an uninterrupted run
        gen.set_state(state["gen"])
    steps = args.subject_steps if stage == "subject" else args.motion_steps
    log = common.StepLog(out / "log.jsonl", every=args.log_every, append=args.resume or stage == "motion")
    store = {}
    hook = block0_hook(transformer, store) if stage == "subject" and not args.no_sura else None
    bar = tqdm(range(state.get("step", 0), steps), desc=f"{stage} LoRA", disable=None)
    for step in bar:
        idx = torch.randint(len(lat), (args.batch,), generator=gen)
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        sigma = sample_sigmas(args.batch, args.shift, gen, device)
        z_t, v = common.noisy_and_target("flow", z0, noise, sigma)
        v_pred = transformer(z_t.to(transformer.dtype), sigma * 1000, text.expand(args.batch, -1, -1),
                             return_dict=False)[0].float()
        logs = {}
        if stage == "subject":
            loss = logs["region"] = region_loss(v_pred, v, extra["masks"][idx])
            if hook:
                logs["sura"] = sura_loss(store["h"], extra["projector"], extra["dino"][idx])
                loss = loss + args.sura_lambda * logs["sura"]
        else:
            loss = logs["temporal"] = F.mse_loss(v_pred, v)
            if not args.no_mora:  # a random window each step: the supplement slides it by 2 latents between
                # steps, which never starts at an odd latent; a random start reaches every one
                k = int(torch.randint(max(1, z0.shape[2] - args.mora_window + 1), (1,), generator=gen))
                frames, ref_idx = decode_window(m["vae"], one_step_x0(z_t, v_pred, sigma), k, args.mora_window,
                                                args.mora_ckpt)
                pairs = torch.tensor(ref_idx[:-1], device=device)
                logs["mora"] = mora_loss(m["flow"], frames, extra["ref_flow"][idx][:, pairs])
                loss = loss + args.mora_alpha * logs["mora"]
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log(step + 1, bar, loss=loss.item(), **{k: v.item() for k, v in logs.items()})
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_state(out, m, stage, step + 1, opt, gen, extra)
        if preview and args.sample_every and (step + 1) % args.sample_every == 0:
            preview(stage, step + 1)
            transformer.set_adapters([stage])  # back to training: this stage's LoRA alone, at scale 1
    if hook:
        hook.remove()


def save_state(out, m, stage, step, opt=None, gen=None, extra=None):
    """Everything --resume needs: stage, step, both LoRAs, projector, optimiser and RNG states (atomic write)."""
    from peft.utils import get_peft_model_state_dict
    state = dict(stage=stage, step=step, opt=opt and opt.state_dict(), gen=gen and gen.get_state(),
                 rng=common.rng_state(),
                 lora={n: get_peft_model_state_dict(m["transformer"], adapter_name=n) for n in ("subject", "motion")},
                 projector=extra["projector"].state_dict() if extra and extra.get("projector") else None)
    common.save_atomic(state, out / "ckpt.pt")


def read_state(path, args):
    """--resume's training state, opened and matched to the flags that shape it before any model loads."""
    state = common.load_checkpoint(path)
    if not (isinstance(state, dict) and {"stage", "step", "lora", "projector", "rng"} <= set(state)):
        common.fail(f"{path} holds no SMRABooth training state: train again with --overwrite")
    rank = {n: next((v.shape[0] for k, v in sd.items() if "lora_A" in k), None) for n, sd in state["lora"].items()}
    held = dict(subject_rank=rank.get("subject"), motion_rank=rank.get("motion"),
                proj_hidden=state["projector"]["net.0.weight"].shape[0] if state["projector"] else args.proj_hidden)
    for name, value in held.items():
        if value != getattr(args, name):
            common.fail(f"{path} was trained with --{name.replace('_', '-')} {value}: resume with the same flags")
    for name, sd in state["lora"].items():  # runs before 7f5a8a6 trained each LoRA only where it is injected
        layers = {k.split(".lora_")[0] for k in sd}
        if not all(any(n.endswith(t) for n in layers) for t in LORA_TARGETS):
            common.fail(f"{path} holds a {name} LoRA trained in some layers only (an older run): train again with "
                        "--overwrite")
    return state


def load_state(state, m, projector):
    from peft.utils import set_peft_model_state_dict
    for name, sd in state["lora"].items():
        set_peft_model_state_dict(m["transformer"], sd, adapter_name=name)
    if state["projector"] is not None and projector is not None:
        projector.load_state_dict(state["projector"])
    common.set_rng_state(state["rng"])


def lora_file(out, name):
    """Each LoRA in diffusers' format: pipe.load_lora_weights("OUT/subject_lora") loads it."""
    return Path(out) / f"{name}_lora" / "pytorch_lora_weights.safetensors"


def save_lora(m, name, out):
    """Written beside and moved into place (common.save_atomic): a crash never leaves half a LoRA file."""
    from diffusers import WanPipeline
    common.save_lora(WanPipeline, m["transformer"], name, lora_file(out, name))


def check_saved_loras(out):
    """--sample-only: both LoRA files must open, before any model loads."""
    from safetensors import safe_open
    for name in ("subject", "motion"):
        path = lora_file(out, name)
        if not path.is_file():
            common.fail(f"--sample-only: {path} does not exist; train first")
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:
            common.fail(f"cannot read {path} ({common.first_line(e)}): train again with --overwrite")


def load_saved_loras(m, out):
    for name in ("subject", "motion"):
        m["transformer"].load_lora_adapter(str(lora_file(out, name).parent), adapter_name=name,
                                           weight_name="pytorch_lora_weights.safetensors")


# -----------------------------------------------------------------------------
# main


def plan(args, prompts, images, videos):
    lines = [f"model: {args.model}" + ("" if args.model == "toy" else " (Wan2.1-T2V-1.3B: 1.4 B transformer, "
                                       "127 M VAE, 5.7 B UMT5 freed after encoding)"),
             f"SuRA encoder: {'toy DINOv2 stand-in' if args.model == 'toy' else args.dino}; flow: "
             f"{'toy flow stand-in' if args.model == 'toy' else 'torchvision RAFT from ' + str(args.raft_weights)}",
             f"subject: {len(images)} photos at {args.subject_size}px, prompt {prompts['subject']!r}, "
             f"LoRA rank {args.subject_rank}, {args.subject_steps} steps, lambda {args.sura_lambda}",
             f"motion: {len(videos)} clip(s) of {args.motion_frames} frames at {args.motion_size[0]}x"
             f"{args.motion_size[1]}, prompt {prompts['motion']!r}, LoRA rank {args.motion_rank}, "
             f"{args.motion_steps} steps, alpha {args.mora_alpha}",
             f"sample: {prompts['sample']!r}, {args.frames} frames at {args.height}x{args.width}, {args.steps} steps, "
             f"cfg {args.cfg}, T_point {args.t_point}, subject scale {args.subject_early_scale}->"
             f"{args.subject_late_scale}, injection {args.inject}",
             f"out: {args.out}"]
    print("\n".join(lines))


# the paper's ablations as extra flags; "base" trains nothing (zero LoRAs = the pretrained backbone). The injection
# (Combinations 1-3) and schedule ablations change only sampling, so (--sample-only) they reuse the full method's
# LoRAs of the same seed, as the paper's sparsity experiments zero LoRA scales and its T_point experiments vary
# inference on trained LoRAs.
ABLATIONS = {"base": ["--subject-steps", "0", "--motion-steps", "0"], "full": [], "no SuRA": ["--no-sura"],
             "no MoRA": ["--no-mora"], "no mask": ["--no-mask"],
             "inject all (Comb. 1)": ["--sample-only", "--inject", "all"],
             "subject w/o FFN.0 (Comb. 2)": ["--sample-only", "--subject-drop-ffn0"],
             "motion w/o FFN.0 (Comb. 3)": ["--sample-only", "--motion-drop-ffn0"],
             "T_point 0": ["--sample-only", "--t-point", "0"], "T_point 0.8": ["--sample-only", "--t-point", "0.8"],
             "subject scale 1 throughout": ["--sample-only", "--subject-early-scale", "1.0"],
             # not the paper's: each LoRA alone (the other at scale 0), to see what each has learned
             "subject LoRA only": ["--sample-only", "--motion-scale", "0"],
             "motion LoRA only": ["--sample-only", "--subject-early-scale", "0", "--subject-late-scale", "0"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.ablate:
        check_args(args)  # the table's own --seeds too, before its runs
        return toyworld.run_ablations(main, argv, ABLATIONS, args, "smrabooth", "")
    images, masks, videos, prompts = read_inputs(args)
    if args.model != "toy":
        common.check_pretrained(args.model, "--model")
        if not (args.sample_only or args.no_sura):  # only SuRA needs DINOv2
            common.check_pretrained(args.dino, "--dino", "config.json")
        if not (args.sample_only or args.no_mora):  # only MoRA needs the flow network
            check_raft_weights(args.raft_weights)
    if not (args.sample_only or args.no_mora):
        check_motion_frames(args)
    out = Path(args.out)
    common.check_out(out, args.resume, args.sample_only, args.overwrite)
    if args.sample_only:
        check_saved_loras(out)
    state = read_state(out / "ckpt.pt", args) if args.resume else dict(stage="subject", step=0)
    plan(args, prompts, images, videos)
    if args.dry_run:
        return None
    device, dtype = common.device_and_dtype(args.dtype)
    common.seed_everything(args.seed)
    m = load_models(args, device, dtype)
    if args.overwrite and not (args.resume or args.sample_only):
        common.clear_run(out, ["subject_lora", "motion_lora"])
    out.mkdir(parents=True, exist_ok=True)
    if not args.sample_only:  # sampling alone keeps the training's config
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))

    # prompts and latents once; then the text encoder is freed
    text = {k: common.encode_prompts(m["tokenizer"], m["text_encoder"], [p], args.max_text_len, True).to(device)
            for k, p in dict(prompts, uncond="").items()}
    del m["text_encoder"]
    transformer = m["transformer"]
    if args.grad_ckpt:
        transformer.enable_gradient_checkpointing()
    if args.sample_only:
        load_saved_loras(m, out)
    else:
        subject_params, motion_params = add_loras(transformer, args)
        img_lat = encode_video(m["vae"], images[:, None].to(device))            # photos as one-frame videos
        vid_lat = encode_video(m["vae"], videos.to(device))
        grid = (img_lat.shape[-2] // transformer.config.patch_size[1],
                img_lat.shape[-1] // transformer.config.patch_size[2])
        dino, projector = sura_targets(args, state, transformer, images.to(device), grid, dtype)
        ref_flow = None if args.no_mora else reference_flows(m["flow"], videos.to(device))
        if args.resume:
            load_state(state, m, projector)
        # each stage numbers its steps from 1, as its log lines: samples/subject_step_000250.mp4, motion_step_...
        preview = lambda stage, step: common.write_preview(out, step, generate(m, text, args, 1)[0], args.fps,
                                                           toy=args.model == "toy", stage=stage)
        if state["stage"] == "subject":
            train_stage("subject", m, img_lat, text["subject"], args,
                        subject_params + (list(projector.parameters()) if projector else []), state, out,
                        dict(masks=masks.to(device), dino=dino, projector=projector), preview)
            save_lora(m, "subject", out)
            state = dict(stage="motion", step=0)
            save_state(out, m, "motion", 0)
        train_stage("motion", m, vid_lat, text["motion"], args, motion_params, state, out, dict(ref_flow=ref_flow),
                    preview)
        save_lora(m, "motion", out)

    video = generate(m, text, args, args.num_samples)
    return common.write_result(out, video, images, videos[0], prompts["sample"], args.fps,
                               evaluate=toyworld.evaluate if args.model == "toy" else None)


if __name__ == "__main__":
    common.cli(main)
