"""The toy world: a tiny, fully known video world in which every method can learn and be measured on a CPU.

No real weights can be downloaded where this project runs, and random tiny models only prove plumbing. So this
file renders procedural videos (a sprite = shape x colour x pattern, moving along a trajectory over a plain
background, 9 frames of 32x32), writes their captions, and keeps some shapes, a pattern and a motion out of
pretraining: those are the *novel subjects and motions* that customization must teach, as a user's dog or dance
is new to a real backbone. It also holds the toy VAE and the toy backbones (the real diffusers classes at tiny size,
diffusing in that VAE's latents as the real models do), their training, frozen tiny stand-ins for the papers'
encoders (text encoders, DINOv2, CLIP vision, RAFT), and the toy metrics, measured from pixels against the known
rendering (no learned classifier).

    python toyworld.py train-vae                        # the toy VAE (assets/toy_vae); --resume continues
    python toyworld.py eval-vae                         # the toy metrics of clips sent through it
    python toyworld.py pretrain --family wan            # or cogvideox / unet3d, in the VAE's latents; --resume
    python toyworld.py make-bank                        # pretraining clips encoded once (out/bank); pretrain --bank
    python toyworld.py eval VIDEO --subject assets/toy/subject --motion assets/toy/motion
    python toyworld.py eval-base --family wan           # prompt following of a pretrained toy backbone
    python toyworld.py make-assets                      # re-create assets/ (encoders, tokenizer, toy inputs)
    python toyworld.py make-task out/task2              # a second task: a red ring, a magenta triangle's zigzag
"""
import argparse
import copy
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

import common

ASSETS = Path(__file__).resolve().parent / "assets"

# -----------------------------------------------------------------------------
# vocabulary: what exists in the world, and what pretraining never sees

COLOURS = {  # bright RGB in [0, 1]; a pattern's second shade is the same colour darkened (DARK x)
    "red": (1.0, 0.15, 0.1), "green": (0.15, 0.85, 0.15), "blue": (0.2, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.1), "magenta": (0.95, 0.2, 0.9), "cyan": (0.1, 0.9, 0.95),
}
DARK = 0.4
BACKGROUNDS = {"gray": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
               "beige": (0.85, 0.78, 0.6)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star", "ring"]
PATTERNS = ["solid", "striped", "checkered", "dotted"]
MOTIONS = ["left", "right", "up", "down", "circle", "still", "zigzag"]
MOTION_WORDS = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                "circle": "moving in a circle", "still": "standing still", "zigzag": "moving in a zigzag"}
# held out of pretraining: what customization has to teach (colours and backgrounds are all familiar)
NOVEL_SHAPES, NOVEL_PATTERNS, NOVEL_MOTIONS = ["star", "ring"], ["dotted"], ["zigzag"]
PRE_SHAPES = [s for s in SHAPES if s not in NOVEL_SHAPES]
PRE_PATTERNS = [p for p in PATTERNS if p not in NOVEL_PATTERNS]
PRE_MOTIONS = [m for m in MOTIONS if m not in NOVEL_MOTIONS]
PLACEHOLDERS = ["sks", "<cls>"]  # in the tokenizer, never in a pretraining caption
# the bundled customization task: a novel subject (new shape and pattern) and a novel motion done by a familiar
# sprite that shares no factor with the subject, so that leakage of the motion video's looks can be measured
SUBJECT = dict(colour="yellow", shape="star", pattern="dotted")
NEAREST = {"star": "diamond", "ring": "circle", "dotted": "checkered", "zigzag": "right"}  # familiar look-alikes
MOTION_SPRITE = dict(colour="blue", shape="square", pattern="striped")
NUM_FRAMES, SIZE, RADIUS = 9, 32, 6.0  # 4k+1 frames, as the diffusers pipelines and real VAEs expect


def caption(c, image=False, word=None):
    """'a red striped square moving left on a gray background'; `word` replaces 'pattern shape' (e.g. 'sks star')."""
    sprite = word or f"{c['pattern']} {c['shape']}"
    if image:
        return f"a picture of a {c['colour']} {sprite} on a {c['background']} background"
    return f"a {c['colour']} {sprite} {MOTION_WORDS[c['motion']]} on a {c['background']} background"


def is_heldout_combo(c):
    """A fixed ~1/8 of the pretraining combinations is never trained on, so that prompt following is measured on
    combinations of familiar words the backbone has not seen together."""
    key = f"{c['colour']}|{c['shape']}|{c['pattern']}|{c['motion']}|{c['background']}"
    return sum(key.encode()) * 2654435761 % 8 == 0


def random_concepts(n, gen, heldout=False):
    """n factor dicts of pretraining words: training combinations, or (heldout=True) the held-out ones."""
    out = []
    while len(out) < n:
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
        c = dict(colour=pick(list(COLOURS)), shape=pick(PRE_SHAPES), pattern=pick(PRE_PATTERNS),
                 motion=pick(PRE_MOTIONS), background=pick(list(BACKGROUNDS)))
        if is_heldout_combo(c) == heldout:
            out.append(c)
    return out


# -----------------------------------------------------------------------------
# renderer: vectorised over a batch, so pretraining spends its time on the model, not on drawing

def trajectory(motion, n, gen, frames=NUM_FRAMES):
    """Sprite centres (n, frames, 2) in pixels (x right, y down) with random start jitter and phase."""
    t = torch.linspace(0, 1, frames)
    c = SIZE / 2 - 0.5
    jit = (torch.rand(n, 2, generator=gen) * 2 - 1)  # in [-1, 1]
    phase = torch.rand(n, 1, generator=gen) * 2 * math.pi
    span = 12.0  # linear motions travel 12 px over the clip (1.5 px per frame)
    along = (t - 0.5) * span + 2 * jit[:, :1]                       # (n, frames)
    across = 4 * jit[:, 1:].expand(n, frames)
    if motion in ("left", "right", "up", "down"):
        sign = -1 if motion in ("left", "up") else 1
        x, y = (sign * along, across) if motion in ("left", "right") else (across, sign * along)
    elif motion == "circle":  # one clockwise turn (in image coordinates) of radius 6
        ang = phase + t * 2 * math.pi * (frames - 1) / frames
        x, y = 6 * torch.cos(ang) + 2 * jit[:, :1], 6 * torch.sin(ang) + 2 * jit[:, 1:]
    elif motion == "still":
        x, y = 4 * jit[:, :1].expand(n, frames), across
    elif motion == "zigzag":  # left to right along a triangle wave: 2.5 px a frame down, up, up, down (period 8)
        # Not a hop every frame: that is pi radians a frame, above the fastest rotary frequency of time in the toy
        # Wan and CogVideoX (1 radian a frame), and no adapter learnt it from one clip (results/toyworld/README.md,
        # "the novel zigzag"); real VAEs fold 4 frames into a latent, so real reference motion is slower still.
        x = along
        wave = torch.tensor([0.0, 1, 2, 1, 0, -1, -2, -1])[torch.arange(frames) % 8]
        y = 2 * jit[:, 1:] + 2.5 * wave
    else:
        raise ValueError(f"unknown motion {motion!r}")
    return torch.stack([x + c, y + c], -1)


def _shape_mask(shape, u, v):
    """Inside test for a shape of radius 1 in local coordinates u (right), v (down)."""
    r = torch.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return (u.abs() <= 0.8) & (v.abs() <= 0.8)
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (u.abs() <= (v + 1.0) * 0.55)
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.05
    if shape == "cross":
        return ((u.abs() <= 0.36) & (v.abs() <= 1.0)) | ((v.abs() <= 0.36) & (u.abs() <= 1.0))
    if shape == "star":  # five points: the radius swings between 1.05 and 0.5 with the angle
        ang = torch.atan2(u, -v)
        return r <= 0.5 + 0.55 * (torch.cos(5 * ang).clamp(min=0) ** 2)
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def _dark_mask(pattern, px, py):
    """Where a pattern uses the dark shade; px, py are pixel offsets from the sprite centre (pattern moves with it)."""
    if pattern == "solid":
        return torch.zeros_like(px, dtype=torch.bool)
    if pattern == "striped":  # horizontal stripes, 2 px each
        return torch.floor(py / 2).remainder(2) == 1
    if pattern == "checkered":  # 2 px checks
        return (torch.floor(px / 2) + torch.floor(py / 2)).remainder(2) == 1
    if pattern == "dotted":  # dark dots on a 4 px lattice
        dx, dy = px - 4 * torch.round(px / 4), py - 4 * torch.round(py / 4)
        return dx * dx + dy * dy <= 1.0
    raise ValueError(f"unknown pattern {pattern!r}")


def render(concepts, gen=None, frames=NUM_FRAMES, centres=None, masks=False):
    """Render a batch of factor dicts to videos (B, F, 3, 32, 32) in [-1, 1] (and the sprite masks (B, F, 32, 32)
    if masks=True). `centres` (B, F, 2) overrides the trajectories; no 'motion' in a dict means standing still."""
    gen = gen or torch.Generator().manual_seed(0)
    n = len(concepts)
    if centres is None:
        centres = torch.stack([trajectory(c.get("motion", "still"), 1, gen, frames)[0] for c in concepts])
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    px = xs - centres[..., 0, None, None]                       # (B, F, H, W)
    py = ys - centres[..., 1, None, None]
    video = torch.empty(n, frames, 3, SIZE, SIZE)
    mask = torch.empty(n, frames, SIZE, SIZE, dtype=torch.bool)
    for i, c in enumerate(concepts):  # the per-sample loop only selects masks; the pixel work is vectorised
        inside = _shape_mask(c["shape"], px[i] / RADIUS, py[i] / RADIUS)
        dark = _dark_mask(c["pattern"], px[i], py[i]) & inside
        colour = torch.tensor(COLOURS[c["colour"]])[:, None, None, None]
        bg = torch.tensor(BACKGROUNDS[c["background"]])[:, None, None, None]
        img = torch.where(inside, colour, bg)
        img = torch.where(dark, colour * DARK, img)              # (3, F, H, W)
        video[i], mask[i] = img.permute(1, 0, 2, 3), inside
    return (video * 2 - 1, mask) if masks else video * 2 - 1


# -----------------------------------------------------------------------------
# the toy VAE: Wan, CogVideoX and ZeroScope all diffuse in the latent space of a VAE whose decoder draws the
# pixels. A tiny diffusers AutoencoderKL (ZeroScope's class, applied frame by frame as ZeroScope applies it) is
# trained here on frames of every concept, novel ones included: a real VAE has seen every kind of image, while the
# backbones still never see a novel concept. It turns a 32x32 frame into 8 channels at 8x8.

VAE_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
                  sample_size=SIZE, mid_block_add_attention=False)


class FrameVAE(AutoencoderKL):
    """AutoencoderKL with the video interface of Wan's and CogVideoX's VAEs: encode(x).latent_dist and
    decode(z).sample take (B, C, F, H, W) (each frame on its own, no temporal compression) as well as images."""

    def encode(self, x, return_dict=True):
        if x.ndim == 4:
            return super().encode(x, return_dict)
        moments = self._encode(x.transpose(1, 2).flatten(0, 1))  # (B F, 2C, h, w): mean and log-variance
        dist = DiagonalGaussianDistribution(moments.unflatten(0, (x.shape[0], -1)).transpose(1, 2))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        if z.ndim == 4:
            return super().decode(z, return_dict)
        x = super().decode(z.transpose(1, 2).flatten(0, 1)).sample.unflatten(0, (z.shape[0], -1)).transpose(1, 2)
        return DecoderOutput(sample=x) if return_dict else (x,)


def vae_path():
    return ASSETS / "toy_vae"


def vae_fingerprint(path=None):
    """The first 16 hex digits of the SHA-256 of the VAE's weights: pretrained backbones record it."""
    import hashlib
    weights = Path(path or vae_path()) / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else "none"


def load_vae(path=None):
    """The trained toy VAE (a diffusers folder), with the config fields the Wan and CogVideoX pipelines read."""
    path = Path(path or vae_path())
    if not (path / "config.json").is_file():
        common.fail(f"no toy VAE at {path}: run python toyworld.py train-vae")
    vae = FrameVAE.from_pretrained(path)
    c = vae.config.latent_channels
    vae.register_to_config(z_dim=c, scale_factor_temporal=1, temporal_compression_ratio=1,
                           scale_factor_spatial=2 ** (len(vae.config.block_out_channels) - 1))
    return vae.eval().requires_grad_(False)


def random_frames(n, gen):
    """n frames of clips of any concept (every shape, pattern, colour, background and motion), one random frame
    of each, so the sprites sit wherever the clips put them."""
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    concepts = [dict(colour=pick(list(COLOURS)), shape=pick(SHAPES), pattern=pick(PATTERNS), motion=pick(MOTIONS),
                     background=pick(list(BACKGROUNDS))) for _ in range(n)]
    clips = render(concepts, gen)
    return clips[torch.arange(n), torch.randint(NUM_FRAMES, (n,), generator=gen)]


@torch.no_grad()
def latent_statistics(vae, gen, n=1024):
    """Per-channel mean and std, and 1 / overall std, of the latents (the mode) of n random frames: the real VAEs'
    configs hold these (Wan: latents_mean / latents_std; CogVideoX and ZeroScope: scaling_factor)."""
    z = torch.cat([vae.encode(random_frames(256, gen)).latent_dist.mode() for _ in range(n // 256)])
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
    return dict(latents_mean=mean.tolist(), latents_std=std.tolist(), scaling_factor=float(1 / z.std()))


def train_vae(args):
    """MSE reconstruction + a small KL term (the beta-VAE of Stable Diffusion's autoencoder, without its GAN and
    perceptual losses: the toy world's images are flat colours, where MSE alone is sharp enough)."""
    import imageio.v3 as iio
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out, ckpt = Path(args.out or vae_path()), Path(args.ckpt or "out/vae/ckpt.pt")
    vae, step = FrameVAE(**dict(VAE_CONFIG, latent_channels=args.latent_channels)).train(), 0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = get_constant_schedule_with_warmup(opt, args.warmup)
    # the exported weights are an EMA: at a constant lr the raw weights' reconstructions of the patterns swing from
    # one save to the next (pattern 0.89 at step 2000, 0.63 at 2500 in a run without it)
    ema = EMAModel(vae.parameters(), decay=args.ema)
    if args.resume:
        if not ckpt.is_file():
            common.fail(f"--resume: no training state at {ckpt}")
        state = common.load_checkpoint(ckpt)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"]), gen.set_state(state["gen"]), common.set_rng_state(state["rng"])
        step = state["step"]
    print(f"training the toy VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, "
          f"from step {step} to {args.steps}, batch {args.batch}")
    fixed = random_frames(8, torch.Generator().manual_seed(12345))  # the reconstructions written while training
    log = common.StepLog(ckpt.parent / "log.jsonl", every=args.log_every, append=args.resume)
    bar = tqdm(total=args.steps, initial=step, disable=None)
    while step < args.steps:
        x = random_frames(args.batch, gen)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample(generator=gen)).sample
        mse, kl = F.mse_loss(rec, x), dist.kl().mean() / x[0].numel()  # KL per pixel value, like the MSE
        loss = mse + args.kl * kl
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(), sched.step(), ema.step(vae.parameters())
        step += 1
        bar.update(1)
        log(step, bar, mse=mse.item(), kl=kl.item())
        if step % args.save_every == 0 or step == args.steps:
            common.save_atomic(dict(model=vae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), step=step,
                                    ema=ema.state_dict(), gen=gen.get_state(), rng=common.rng_state()), ckpt)
            with torch.no_grad():
                ema.store(vae.parameters()), ema.copy_to(vae.parameters()), vae.eval()  # the EMA weights, for now
                rec = vae.decode(vae.encode(fixed).latent_dist.mode()).sample
                grid = torch.cat([torch.cat(list(fixed), -1), torch.cat(list(rec), -1)], -2)  # top: input
                iio.imwrite(ckpt.parent / "reconstructions.png", common.to_uint8(grid).repeat(3, 0).repeat(3, 1))
                export_vae(vae, out, latent_statistics(vae, torch.Generator().manual_seed(args.seed)), step)
                ema.restore(vae.parameters()), vae.train()
    bar.close()
    print(f"saved {out} (step {step})")


def export_vae(vae, out, stats, step):
    """A diffusers folder that AutoencoderKL.from_pretrained loads, written next to `out` and moved into place."""
    import shutil
    final = AutoencoderKL.from_config(vae.config, **stats)  # saved as the plain diffusers class
    final.load_state_dict(vae.state_dict())
    tmp = Path(str(out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(dict(steps=step), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# -----------------------------------------------------------------------------
# the text side: a word-level tokenizer over the world's words and frozen tiny random text encoders

WORDS = sorted({w for c in COLOURS for w in c.split()} | set(SHAPES) | set(PATTERNS) | set(BACKGROUNDS)
               | {w for m in MOTION_WORDS.values() for w in m.split()}
               | {"a", "an", "picture", "of", "on", "background", "the", "video", "with"} | set(PLACEHOLDERS))
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
MAX_TOKENS = 16  # longest caption (12 words) + start/end tokens, rounded up


def tokenizer(kind="t5"):
    """PreTrainedTokenizerFast over WORDS: lowercase, split on whitespace only (so '<cls>' stays one word), and
    '</s>' appended (T5/UMT5) or '<s> ... </s>' around the words (CLIP)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = "$A </s>" if kind == "t5" else "<s> $A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("</s>", vocab["</s>"]), ("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>", model_max_length=MAX_TOKENS)


def _text_encoder_configs():
    from transformers import CLIPTextConfig, T5Config, UMT5Config
    v = len(SPECIALS) + len(WORDS)
    t5 = dict(vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8, dropout_rate=0.0)
    return {"umt5": UMT5Config(**t5), "t5": T5Config(**t5),
            "clip": CLIPTextConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=0,
                                   bos_token_id=3, eos_token_id=1)}


def text_encoder(kind):
    """The frozen tiny random text encoder of a family, loaded from assets/ (the toy backbones were trained on
    exactly these outputs, and random init routines change between library versions, so weights are shipped)."""
    from transformers import CLIPTextModel, T5EncoderModel, UMT5EncoderModel
    cls = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel, "clip": CLIPTextModel}[kind]
    return cls.from_pretrained(ASSETS / "text_encoders" / kind).eval().requires_grad_(False)


def text_path(family):
    """A family's tokenizer and frozen text encoder (UMT5 and T5 share the toy word-level one)."""
    kind = FAMILIES[family]["text"]
    return tokenizer("clip" if kind == "clip" else "t5"), text_encoder(kind)


# -----------------------------------------------------------------------------
# stand-ins for the papers' frozen encoders


def image_encoder(kind):
    """Stand-in (frozen, tiny, random, weights in assets/) for DINOv2 ('dinov2', patch 4: an 8x8 token grid at
    32x32, the toy latent grid) or the CLIP image encoder ('clip_vision'). Same classes as the real models."""
    from transformers import CLIPVisionModelWithProjection, Dinov2Model
    cls = {"dinov2": Dinov2Model, "clip_vision": CLIPVisionModelWithProjection}[kind]
    return cls.from_pretrained(ASSETS / "encoders" / kind).eval().requires_grad_(False)


def _image_encoder_configs():
    from transformers import CLIPVisionConfig, Dinov2Config
    return {"dinov2": Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=4, image_size=SIZE),
            "clip_vision": CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=SIZE, patch_size=4, projection_dim=32)}


def _warp(img, flow):
    """Sample img at x + flow(x) (bilinear, border padding). Also returns a mask of samples inside the frame."""
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=img.dtype, device=img.device),
                            torch.arange(w, dtype=img.dtype, device=img.device), indexing="ij")
    # grid_sample wants coordinates in [-1, 1]; align_corners=True maps -1/+1 to the centres of the edge pixels.
    grid = torch.stack((2 * (xs + flow[:, 0]) / max(w - 1, 1) - 1,
                        2 * (ys + flow[:, 1]) / max(h - 1, 1) - 1), dim=-1)
    inside = (grid.abs() <= 1).all(-1).unsqueeze(1).to(img.dtype)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True), inside


def _filter(x, k):
    """Depthwise 3x3 filter with replicate padding (a zero border would look like a strong edge)."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])


def toy_flow(a, b, levels=None, iters=20, warps=2, alpha=0.2, min_size=8):
    """Stand-in for RAFT/SEA-RAFT in the toy world: weight-free, differentiable, coarse-to-fine.

    a, b: (N, 3, H, W) in [-1, 1]. Returns flow (N, 2, H, W) in pixels, channel 0 = dx (right),
    channel 1 = dy (down), such that b(x + flow(x)) ~ a(x) (RAFT's image1 -> image2 convention).
    Classic coarse-to-fine variational flow: Horn-Schunck smoothness (weight alpha^2) plus a blurred
    Lucas-Kanade data term summed over colour channels ("combined local-global", Bruhn et al. 2005).
    Plain tensor ops only, so it is differentiable w.r.t. both a and b.
    """
    opts = dict(dtype=a.dtype, device=a.device)
    ddx = torch.tensor([[0, 0, 0], [-0.5, 0, 0.5], [0, 0, 0]], **opts)   # central difference
    blur = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], **opts) / 16  # small LK window
    avg = torch.tensor([[1, 2, 1], [2, 0, 2], [1, 2, 1]], **opts) / 12   # HS mean of the neighbours
    if levels is None:  # halve down to ~min_size px, where even a large motion is under a pixel
        levels = 1
        while min(a.shape[-2:]) >> levels >= min_size:
            levels += 1
    pyramid = [(a, b)]
    for _ in range(levels - 1):
        pyramid.append(tuple(F.avg_pool2d(x, 2) for x in pyramid[-1]))

    flow = a.new_zeros(a.shape[0], 2, *pyramid[-1][0].shape[-2:])
    for la, lb in reversed(pyramid):  # coarse -> fine
        h, w = la.shape[-2:]
        if flow.shape[-2:] != (h, w):  # one coarse pixel is ~2 fine pixels: upsample AND rescale the vectors
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], **opts).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        # Neighbour mean = zero-padded conv / weight that fell inside the image (cheaper than padding each sweep).
        norm = alpha ** 2 / F.conv2d(torch.ones_like(flow[:1, :1]), avg[None, None], padding=1)
        for _ in range(warps):
            # Linearise b(x + u) = a(x) around the current flow u0:  Ix (u - u0) + Iy (v - v0) + It = 0.
            bw, inside = _warp(lb, flow)
            it = bw - la
            ix, iy = _filter(la + bw, ddx) / 2, _filter(la + bw, ddx.t()) / 2  # gradients of both frames
            # Structure tensor, summed over channels and blurred (the LK part). Pixels that left the frame
            # have no match, so they get no data term and the smoothness term fills them in.
            j = _filter(torch.stack([(ix * ix).sum(1), (ix * iy).sum(1), (iy * iy).sum(1),
                                     (ix * it).sum(1), (iy * it).sum(1)], 1) * inside, blur)
            j11, j12, j22, j13, j23 = j.unbind(1)
            u0, v0 = flow.unbind(1)
            r = torch.stack([j11 * u0 + j12 * v0 - j13, j12 * u0 + j22 * v0 - j23], 1)
            # Per-pixel inverse of the 2x2 matrix (J + alpha^2 I), shape (N, 2, 2, H, W). alpha^2 > 0 keeps it
            # invertible in flat regions, where J = 0 and the flow comes from the neighbours alone.
            a11, a22 = j11 + alpha ** 2, j22 + alpha ** 2
            m = torch.stack([torch.stack([a22, -j12], 1), torch.stack([-j12, a11], 1)], 1)
            m = m / (a11 * a22 - j12 * j12)[:, None, None]
            c, m = (m * r[:, None]).sum(2), m * norm
            for _ in range(iters):  # Jacobi sweeps of (J + alpha^2) u = alpha^2 * neighbour_mean(u) + r
                flow = (m * F.conv2d(flow, avg.expand(2, 1, 3, 3), padding=1, groups=2)[:, None]).sum(2) + c
    return flow


# -----------------------------------------------------------------------------
# toy backbones: the real diffusers classes at tiny size, in the toy VAE's latent space (8 x F x 8 x 8)

LATENT_CHANNELS = VAE_CONFIG["latent_channels"]
# Wan: the real model's patch (1, 2, 2) and flow shift 3 (the real pipeline's 480p value) in training and sampling;
# with uniform sigmas (shift 1) the toy Wan never learnt which frame comes first, so which way "left" or "up" goes
# (results/toyworld/README.md, the shift A/B)
FAMILIES = {  # each family keeps its real objective, text encoder, prompt convention and latent normalisation
    "wan": dict(cls="WanTransformer3DModel", pred="flow", text="umt5", zero_pad=True, shift=3.0, config=dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=4, rope_max_seq_len=32)),
    "cogvideox": dict(cls="CogVideoXTransformer3DModel", pred="v", text="t5", zero_pad=False, config=dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        time_embed_dim=64, text_embed_dim=32, num_layers=4, sample_width=8, sample_height=8,
        sample_frames=NUM_FRAMES, patch_size=1, temporal_compression_ratio=1, max_text_seq_length=MAX_TOKENS,
        use_rotary_positional_embeddings=True)),
    "unet3d": dict(cls="UNet3DConditionModel", pred="eps", text="clip", zero_pad=False, offset_noise=0.5, config=dict(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4)),
}


def build_backbone(family, config=None):
    """A randomly initialised toy backbone of `family` (config defaults to FAMILIES[family])."""
    import diffusers
    return getattr(diffusers, FAMILIES[family]["cls"])(**(config or FAMILIES[family]["config"]))


def backbone_path(family):
    return ASSETS / f"toy_{family}.safetensors"


def load_backbone(family, path=None, require=False):
    """The pretrained toy backbone from assets/ (its config is in the file's metadata), or, if none has been
    trained yet, a random one with a plain warning (require=True makes that an error instead)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path or backbone_path(family))
    if not path.is_file():
        if require:
            common.fail(f"no pretrained toy backbone at {path}: run python toyworld.py pretrain --family {family}")
        print(f"warning: no pretrained toy backbone at {path} yet; using a randomly initialised one "
              f"(python toyworld.py pretrain --family {family} makes it)")
        return build_backbone(family).requires_grad_(False)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = build_backbone(family, json.loads(meta["config"]))
    model.load_state_dict(load_file(str(path)))
    print(f"toy {family} backbone: {path.name}, pretrained {meta['steps']} steps, {meta['samples_seen']} samples")
    if meta.get("vae") != vae_fingerprint():  # it only understands the latents it was trained in
        print(f"warning: {path.name} was pretrained in the latents of another toy VAE than {vae_path()}; "
              f"its samples will not make sense (python toyworld.py pretrain --family {family} retrains it)")
    return model.eval().requires_grad_(False)


def noise_schedule(family):
    """The family's training/sampling schedulers: Wan flow matching (Euler), CogVideoX v-prediction with
    zero-terminal-SNR betas and trailing DDIM, ZeroScope epsilon with scaled_linear betas and DDIM (x0 clipped)."""
    from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    if family == "wan":
        return FlowMatchEulerDiscreteScheduler(shift=FAMILIES["wan"]["shift"])
    if family == "cogvideox":
        return CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                      timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def backbone_forward(family, model, z, t, text):
    """One denoiser call on latents z (B, C, F, h, w); returns the output in the same layout. Wan takes
    t = sigma * 1000; CogVideoX wants (B, F, C, h, w) and its rotary embedding."""
    if family == "cogvideox":
        rotary = common.cogvideox_rotary(model, z.shape[2], z.shape[3], z.shape[4])
        out = model(z.transpose(1, 2), text, t, image_rotary_emb=rotary, return_dict=False)[0]
        return out.transpose(1, 2)
    return model(z, t, text, return_dict=False)[0]


def sample_timesteps(family, n, gen):
    """Training noise levels: sigma = shift u / (1 + (shift - 1) u), u ~ U(0, 1) for Wan (the sampler's
    schedule), integer t ~ U{0..999} otherwise."""
    if family == "wan":
        u, s = torch.rand(n, generator=gen), FAMILIES["wan"]["shift"]
        return s * u / (1 + (s - 1) * u)
    return torch.randint(0, 1000, (n,), generator=gen)


def _wan_statistics(vae, z):
    """The VAE config's per-channel latents_mean and latents_std, shaped to broadcast over z (B, C, F, h, w)."""
    return (torch.tensor(getattr(vae.config, k), device=z.device).view(1, -1, 1, 1, 1)
            for k in ("latents_mean", "latents_std"))


def encode_latents(family, vae, video):
    """Clips (B, F, 3, H, W) -> the family's diffusion latents (B, C, F, h, w): the posterior mean normalised as the
    real pipelines do (`normalise_latents`)."""
    return normalise_latents(family, vae, vae.encode(video.transpose(1, 2)).latent_dist.mode())


def normalise_latents(family, vae, z):
    """Raw VAE latents -> the family's: per channel with latents_mean / latents_std (Wan), times scaling_factor
    (the others)."""
    if family == "wan":
        mean, std = _wan_statistics(vae, z)
        return (z - mean) / std
    return z * vae.config.scaling_factor


def decode_latents(family, vae, z):
    """The inverse of encode_latents, through the VAE's decoder: clips (B, F, 3, H, W) in [-1, 1]."""
    if family == "wan":
        mean, std = _wan_statistics(vae, z)
        z = z * std + mean
    else:
        z = z / vae.config.scaling_factor
    return vae.decode(z).sample.transpose(1, 2).clamp(-1, 1)


@torch.no_grad()
def sample(family, model, vae, text, uncond, steps=20, cfg=4.0, frames=NUM_FRAMES, gen=None, z=None):
    """Plain text-to-video sampling with batched classifier-free guidance, from z (B, C, F, h, w) or fresh noise;
    returns videos (B, F, 3, 32, 32)."""
    sched = noise_schedule(family)
    sched.set_timesteps(steps)
    n, dev, s = text.shape[0], text.device, vae.config.scale_factor_spatial
    if z is None:
        z = torch.randn(n, vae.config.latent_channels, frames, SIZE // s, SIZE // s, generator=gen)
    z = z.to(dev)
    cond = torch.cat([text, uncond.expand_as(text)])
    for t in sched.timesteps:
        out = backbone_forward(family, model, torch.cat([z, z]), t.expand(2 * n).to(dev), cond)
        c, u = out.chunk(2)
        z = sched.step(u + cfg * (c - u), t, z).prev_sample
    return decode_latents(family, vae, z)


# -----------------------------------------------------------------------------
# pretraining: text-to-video (and single frames) on freshly rendered clips of pretraining concepts only


# A latent bank: real pretraining encodes its data through the VAE once, offline, and trains on the stored latents.
# Here that is 20-40% of a clip step on the CPU (results/toyworld/README.md, "Throughput"). A bank holds the raw
# (unnormalised) posterior means as fp16 shards with each sample's factors, so one bank serves all three families:
# each applies its own latent normalisation at load, and draws fresh noise, timesteps and caption dropout.
FACTOR_LISTS = dict(colour=list(COLOURS), shape=SHAPES, pattern=PATTERNS, motion=MOTIONS, background=list(BACKGROUNDS))


def make_bank(args):
    """Render pretraining clips and stills in seeded shards and store their toy-VAE latents (resumable: shards
    already written are kept; each shard's content depends only on --seed and its index)."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    out, vae, fp = Path(args.out), load_vae(), vae_fingerprint()
    vae.to(memory_format=torch.channels_last)  # ~20% faster convolutions on the CPU; the same latents up to rounding
    n_shards = math.ceil(args.clips / args.shard)
    todo = [k for k in range(n_shards) if not (out / f"shard_{k:05d}.safetensors").is_file()]
    print(f"latent bank {out}: {n_shards} shards of {args.shard} clips and {args.shard} stills, {len(todo)} to write")
    bar, t0 = tqdm(todo, disable=None), time.time()
    for n, k in enumerate(bar):
        gen, parts = torch.Generator().manual_seed(args.seed * 100003 + k), {}
        for name, frames in (("clips", NUM_FRAMES), ("stills", 1)):
            concepts = random_concepts(args.shard, gen)
            if frames == 1:
                concepts = [dict(c, motion="still") for c in concepts]
            latents = []
            for i in range(0, args.shard, 64):
                with torch.no_grad():
                    video = render(concepts[i:i + 64], gen, frames=frames)  # (b, F, 3, H, W), encoded frame by frame
                    z = vae.encode(video.flatten(0, 1).contiguous(memory_format=torch.channels_last)).latent_dist
                    latents.append(z.mode().unflatten(0, video.shape[:2]).transpose(1, 2).contiguous())
            parts[name] = torch.cat(latents).half()
            parts[f"{name}_factors"] = torch.tensor([[FACTOR_LISTS[f].index(c[f]) for f in FACTOR_LISTS]
                                                     for c in concepts], dtype=torch.uint8)
        common.save_atomic(parts, out / f"shard_{k:05d}.safetensors", lambda sd, p: save_file(sd, p, metadata=dict(
            vae=fp, seed=str(args.seed), shard=str(k))))
        rate = (n + 1) * args.shard / (time.time() - t0)
        bar.write(f"shard {k} written ({n + 1} of {len(todo)}, {rate:.0f} clips/s)")
    print(f"wrote {out} ({n_shards * args.shard} clips and as many stills)")


def load_bank(folder):
    """All shards of a bank: {clips, stills} -> (latents fp16, concepts); refuses a bank of another toy VAE."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    files = sorted(Path(folder).glob("shard_*.safetensors"))
    if not files:
        common.fail(f"--bank: no shard_*.safetensors in {folder} (python toyworld.py make-bank --out {folder})")
    for file in files:  # every shard: a make-bank resumed after the VAE changed would mix two latent spaces
        with safe_open(str(file), "pt") as f:
            if f.metadata().get("vae") != vae_fingerprint():
                common.fail(f"--bank: {file} was encoded by another toy VAE than {vae_path()}; make the bank again")
    shards = [load_file(str(f)) for f in files]
    bank = {}
    for name in ("clips", "stills"):
        factors = torch.cat([sh[f"{name}_factors"] for sh in shards]).tolist()
        bank[name] = (torch.cat([sh[name] for sh in shards]),
                      [{f: FACTOR_LISTS[f][i] for f, i in zip(FACTOR_LISTS, row)} for row in factors])
    return bank


def export_backbone(model, ema, path, args, step, seen):
    """The EMA weights as one safetensors file, with everything needed to rebuild and reproduce them."""
    from safetensors.torch import save_file
    meta = dict(family=args.family, config=json.dumps(model.config), seed=str(args.seed), steps=str(step),
                samples_seen=str(seen), batch=str(args.batch), lr=str(args.lr), ema=str(args.ema),
                image_every=str(args.image_every), cfg_drop=str(args.cfg_drop), vae=vae_fingerprint(),
                bank=str(args.bank or ""), offset_noise=str(args.offset_noise))
    ema.store(model.parameters()), ema.copy_to(model.parameters())  # the EMA weights, for the export only
    common.save_atomic({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, path,
                       lambda sd, p: save_file(sd, p, metadata=meta))
    ema.restore(model.parameters())


def training_noise(shape, offset, gen):
    """Gaussian noise for the diffusion loss, plus `offset` times a per-sample, per-channel constant ("offset noise",
    Guttenberg 2023). Why the UNet3D needs it: ZeroScope's scaled_linear schedule keeps signal where sampling starts
    (sqrt(alpha_bar) = 0.07-0.09), the toy backgrounds' latent means differ by up to 2.8 per channel, and the pure
    noise's own per-channel mean on an 8 x 8 x F latent (std 1 / (8 sqrt F)) is no larger than what is left of them,
    so a denoiser trained without it takes the background from the noise's mean instead of the caption. 0.5 swamps
    that remnant; 0.1 (the usual value at real size) did not (results/toyworld/README.md, measured)."""
    noise = torch.randn(shape, generator=gen)
    return noise + offset * torch.randn(*shape[:2], *[1] * (len(shape) - 2), generator=gen) if offset else noise


def pretrain(args):
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm
    fam = FAMILIES[args.family]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # the data stream is drawn on the CPU: the same on any device
    dev = common.device_and_dtype()[0]
    ckpt, out = Path(args.ckpt or f"out/pretrain/{args.family}/ckpt.pt"), Path(args.out or backbone_path(args.family))
    state, weights, step, seen = None, None, 0, 0
    config = dict(fam["config"], **json.loads(args.config or "{}"))  # e.g. '{"num_attention_heads": 4}': wider
    if args.resume and ckpt.is_file():  # the full training state of an interrupted run
        state = common.load_checkpoint(ckpt)
        config, step, seen = state.get("config", config), state["step"], state["seen"]
    elif args.resume and out.is_file():  # a shipped checkpoint: continue from its EMA weights, fresh optimiser
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        if meta.get("vae") != vae_fingerprint():  # it only understands the latents it was trained in
            common.fail(f"--resume: {out} was pretrained in another VAE's latents than {vae_path()}; "
                        "pretrain from scratch")
        weights = load_file(str(out))  # loaded into the model built below from the file's own config
        config, step, seen = json.loads(meta["config"]), int(meta["steps"]), int(meta["samples_seen"])
        gen.manual_seed(args.seed + step)
    elif args.resume:
        common.fail(f"--resume: neither {ckpt} nor {out} exists")
    model = build_backbone(args.family, config).to(dev).train()
    if weights is not None:
        model.load_state_dict(weights)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = get_constant_schedule_with_warmup(opt, args.warmup)  # then constant: runs can be extended by resuming
    # the exported weights are an EMA whose decay warms up as min(ema, (1 + k) / (10 + k)) at update k, so early
    # exports are not mostly the random initialisation
    ema = EMAModel(model.parameters(), decay=args.ema)
    if state is not None:
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), warmup.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"]), gen.set_state(state["gen"]), common.set_rng_state(state["rng"])
    print(f"pretraining toy {args.family} on {dev}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, from step {step} to {args.steps}, batch {args.batch}")
    tok, enc = text_path(args.family)
    cache, sched, vae = {}, noise_schedule(args.family), load_vae().to(dev)
    bank = load_bank(args.bank) if args.bank else None
    if args.offset_noise is None:
        args.offset_noise = fam.get("offset_noise", 0.0)  # resolved here, recorded by export_backbone
    if bank:
        print(f"drawing from the latent bank {args.bank}: {len(bank['clips'][1])} clips and as many stills")
    log = common.StepLog(ckpt.parent / "log.jsonl", every=args.log_every, append=args.resume)

    bar = tqdm(total=args.steps, initial=step, disable=None)
    t0, first = time.time(), step
    while step < args.steps:
        image = args.image_every > 0 and step % args.image_every == 0  # single frames teach appearance alone
        if bank:  # shuffled draws (with replacement) of stored latents
            latents, all_concepts = bank["stills" if image else "clips"]
            pick = torch.randint(len(all_concepts), (args.batch,), generator=gen)
            concepts = [all_concepts[i] for i in pick.tolist()]
            z0 = normalise_latents(args.family, vae, latents[pick].float())
        else:  # render and encode fresh clips
            concepts = random_concepts(args.batch, gen)
            video = render([dict(c, motion="still") for c in concepts] if image else concepts, gen,
                           frames=1 if image else NUM_FRAMES)
            with torch.no_grad():
                z0 = encode_latents(args.family, vae, video.to(dev)).cpu()
        drop = torch.rand(args.batch, generator=gen) < args.cfg_drop  # empty prompts, for guidance
        prompts = ["" if d else caption(c, image=image) for c, d in zip(concepts, drop)]
        text = common.encode_prompts(tok, enc, prompts, MAX_TOKENS, fam["zero_pad"], cache)
        noise = training_noise(z0.shape, args.offset_noise, gen)
        t = sample_timesteps(args.family, args.batch, gen)
        z_t, target = common.noisy_and_target(fam["pred"], z0, noise, t, getattr(sched, "alphas_cumprod", None))
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):  # bf16 on a GPU, as the methods
            pred = backbone_forward(args.family, model, z_t.to(dev), (t * 1000 if fam["pred"] == "flow" else t).to(dev),
                                    text.to(dev))
        loss = F.mse_loss(pred.float(), target.to(dev))
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), warmup.step(), ema.step(model.parameters())
        step, seen = step + 1, seen + args.batch
        bar.update(1)
        log(step, bar, loss=loss.item(), samples_per_s=args.batch * (step - first) / (time.time() - t0))
        if step % args.save_every == 0 or step == args.steps:
            common.save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                                    sched=warmup.state_dict(), seen=seen, gen=gen.get_state(), rng=common.rng_state(),
                                    config=config), ckpt)
            export_backbone(model, ema, out, args, step, seen)
    bar.close()
    print(f"saved {out} (step {step}, {seen} samples)")


# -----------------------------------------------------------------------------
# toy metrics, from pixels: segment the sprite against the background, recognise its colour, shape and pattern
# by matching the world's own templates, follow its centroid. identity / leakage = fraction of the subject's /
# the motion video's sprite factors recognised per frame; motion = mean cosine of per-frame sprite velocities
# with the reference's; dynamics = mean sprite speed in px per frame; noise = how far the frame's border is from a
# clean background.

FACTORS = ("colour", "shape", "pattern")
_YS, _XS = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
# a region that overlaps no sprite template by this much is not a sprite. Measured: rendered sprites >= 0.84 (all
# shapes, patterns, motions), blurry base-model sprites 0.26-0.58, frames of LoRA-broken noise 0.09-0.21.
MIN_IOU = 0.3
_OFFSETS = torch.cartesian_prod(torch.arange(-1.5, 1.6, 0.5), torch.arange(-1.5, 1.6, 0.5))


def _border(x):
    """The one-pixel frame border of (..., H, W) images as (..., 2H + 2W - 4)."""
    return torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], -1)


def segment(video):
    """video (F, 3, H, W) in [-1, 1] -> background colour (F, 3) in [0, 1] (median of the border) and sprite
    masks (F, H, W): pixels farther than 0.25 from the background colour."""
    x = (video.float() + 1) / 2
    border = _border(x)
    bg = border.median(-1).values
    return bg, (x - bg[..., None, None]).norm(dim=1) > 0.25


def centroids(mask, min_area=6):
    """Sprite centre per frame (F, 2) as (x, y); NaN where no sprite was found."""
    area = mask.sum((-1, -2)).float()
    c = torch.stack([(mask * _XS).sum((-1, -2)), (mask * _YS).sum((-1, -2))], -1) / area.clamp(min=1)[:, None]
    c[area < min_area] = float("nan")
    return c


def _nearest(table, value):
    return min(table, key=lambda k: float((torch.tensor(table[k]) - value).norm()))


def recognise(video):
    """Per frame: dict(colour, shape, pattern, background) recognised from pixels (None where no sprite)."""
    bg, mask = segment(video)
    cents, x = centroids(mask), (video.float() + 1) / 2
    out = []
    for f in range(video.shape[0]):
        if torch.isnan(cents[f, 0]):
            out.append(None)
            continue
        m, px = mask[f], x[f]
        bright = px.max(0).values >= 0.7            # the dark shade of a pattern has max channel DARK
        colour = _nearest(COLOURS, px[:, m & bright].mean(1)) if (m & bright).any() else None
        centres = cents[f] + _OFFSETS                # template positions around the measured centre
        u = (_XS - centres[:, 0, None, None]) / RADIUS
        v = (_YS - centres[:, 1, None, None]) / RADIUS
        iou = {s: ((t & m).sum((1, 2)) / (t | m).sum((1, 2))) for s in SHAPES for t in [_shape_mask(s, u, v)]}
        shape = max(iou, key=lambda s: iou[s].max())
        if iou[shape].max() < MIN_IOU:  # no template fits: noise or a smear, not a sprite (counts as no sprite)
            out.append(None)
            continue
        centre = centres[iou[shape].argmax()] + _OFFSETS / 1.5   # then the pattern's phase, within a pixel
        dark = ~bright & m
        px_, py_ = _XS - centre[:, 0, None, None], _YS - centre[:, 1, None, None]
        agree = {p: ((_dark_mask(p, px_, py_) & m) == dark)[:, m].float().mean(1).max() for p in PATTERNS}
        out.append(dict(colour=colour, shape=shape, pattern=max(agree, key=agree.get),
                        background=_nearest(BACKGROUNDS, bg[f])))
    return out


def reference_factors(clips):
    """Majority vote of the recognised factors over all frames of reference clips/images (F, 3, H, W)."""
    votes = [r for clip in clips for r in recognise(clip if clip.ndim == 4 else clip[None]) if r]
    if not votes:
        common.fail("no sprite found in the reference frames (toy metrics need toy-world images)")
    return {k: max({r[k] for r in votes}, key=[r[k] for r in votes].count) for k in FACTORS}


def factor_match(video, factors, only=FACTORS):
    """Mean over frames of the fraction of `only` factors recognised as in `factors` (no sprite = 0)."""
    rec = recognise(video)
    return sum(sum(r[k] == factors[k] for k in only) / len(only) if r else 0.0 for r in rec) / len(rec)


def motion_score(traj, ref):
    """Mean over frame steps of cos(velocity, reference velocity); a step without a sprite or motion counts 0.
    1 = same motion (any speed), 0 = static, -1 = reversed."""
    v, r = traj.diff(dim=0), ref.diff(dim=0)
    cos = (v * r).sum(-1) / (v.norm(dim=-1) * r.norm(dim=-1)).clamp(min=1e-6)
    return float(torch.nan_to_num(cos, nan=0.0).mean())


def dynamics(traj):
    """Mean sprite speed in px per frame (0 if no sprite was found)."""
    speed = traj.diff(dim=0).norm(dim=-1)
    return float(speed[~torch.isnan(speed)].mean()) if (~torch.isnan(speed)).any() else 0.0


def classify_motion(traj):
    """Nearest motion word: 'still' under 0.5 px/frame, else the best motion_score against rendered templates."""
    if dynamics(traj) < 0.5:
        return "still"
    gen = torch.Generator().manual_seed(0)
    score = {m: max(motion_score(traj, t) for t in trajectory(m, 16, gen, len(traj))) for m in MOTIONS if m != "still"}
    return max(score, key=score.get)


def direction_followed(traj, motion):
    """For a straight motion word, whether the sprite's net displacement (last found centre minus first) points
    the way the word says; None for other words or with fewer than two frames with a sprite. A backbone that knows
    the axis but not which way time runs gets about half of these."""
    if motion not in ("left", "right", "up", "down"):
        return None
    found = traj[~torch.isnan(traj[:, 0])]
    if len(found) < 2:
        return None
    axis, sign = (0 if motion in ("left", "right") else 1), (-1 if motion in ("left", "up") else 1)
    return bool(sign * (found[-1, axis] - found[0, axis]) > 0)


def motion_report(videos, concepts):
    """Per asked motion word: how often each word was recognised (a confusion row) and, for straight motions, the
    fraction whose net displacement goes the right way (`direction_followed`) over the `judged` samples (those with
    a sprite in two frames or more)."""
    rows = {}
    for v, c in zip(videos, concepts):
        traj = centroids(segment(v)[1])
        row = rows.setdefault(c["motion"], dict(n=0, got={}, right_way=[]))
        got = classify_motion(traj)
        row["n"], row["got"][got] = row["n"] + 1, row["got"].get(got, 0) + 1
        if (ok := direction_followed(traj, c["motion"])) is not None:
            row["right_way"].append(ok)
    for row in rows.values():
        way = row.pop("right_way")
        row["judged"], row["direction"] = len(way), sum(way) / len(way) if way else None
    return dict(sorted(rows.items()))


def background_noise(video):
    """Mean RGB distance ([0, 1] units) of each frame's border pixels from its background colour: 0 for a clean
    render; what is left of the starting noise when adapters stop the sampler from removing it (a sprite crossing
    the border adds a little)."""
    bg = segment(video)[0]  # the background colour as the sprite segmentation defines it
    return float((_border((video.float() + 1) / 2) - bg[..., None]).norm(dim=1).mean())


def evaluate(video, subject_images, motion_video):
    """The customization metrics of one generated clip against the subject images and the motion reference."""
    subj, mot = reference_factors(subject_images), reference_factors([motion_video])
    differ = [k for k in FACTORS if subj[k] != mot[k]] or list(FACTORS)
    traj = centroids(segment(video)[1])
    return dict(identity=factor_match(video, subj), leakage=factor_match(video, mot, differ),
                motion=motion_score(traj, centroids(segment(motion_video)[1])), dynamics=dynamics(traj),
                noise=background_noise(video))


def prompt_following(video, concept):
    """Which factors of a caption's concept the clip shows: {colour, shape, pattern, background, motion: bool}."""
    rec = [r for r in recognise(video) if r]
    got = {k: max({r[k] for r in rec}, key=[r[k] for r in rec].count) if rec else None
           for k in FACTORS + ("background",)}
    got["motion"] = classify_motion(centroids(segment(video)[1]))
    return {k: got[k] == concept[k] for k in got if k in concept}


# -----------------------------------------------------------------------------
# the methods in the toy world: --model toy's settings and parts, and the ablation tables (toy-only tooling)


def apply_preset(args, parser, argv, preset):
    """--model toy: the toy world's sizes and steps on top of the paper defaults (a flag given in argv stays, even
    when its value is the paper default), and the bundled toy subject and motion when none is given."""
    probe = copy.deepcopy(parser)  # the same parser with no defaults parses argv to exactly the flags given
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = vars(probe.parse_args(argv))
    for k, v in preset.items():
        if k not in given:
            setattr(args, k, v)
    args.subject = args.subject or str(ASSETS / "toy" / "subject")
    args.motion = args.motion or str(ASSETS / "toy" / "motion")


def cogvideox_parts(dtype=torch.float32):
    """The toy CogVideoX as common.load_cogvideox returns the real one (the VAE stays fp32, as the methods keep it)."""
    return dict(transformer=load_backbone("cogvideox").to(dtype), vae=load_vae(),
                tokenizer=tokenizer("t5"), text_encoder=text_encoder("t5").to(dtype),
                scheduler=noise_schedule("cogvideox"))


def slug(name):
    """A variant's folder name: '-LoRA Gating' -> 'no_lora_gating', 'inject all (Comb. 1)' -> 'inject_all'."""
    name = "no " + name[1:] if name.startswith("-") else name.split(" (")[0]
    return "_".join("".join(ch if ch.isalnum() else " " for ch in name.lower()).split())


def run_ablations(main, argv, variants, args, method, note=""):
    """Run a method's main() for every variant under args.out/ablations/<variant>/seed<k>/, keep each
    metrics.json under results/<method>/ (committed, so tables can be remade without training) and print one
    markdown table of mean +- std over seeds. The first two variants are the base model and the full method and
    get args.seeds seeds, the others args.ablation_seeds (CPU time is short; 0 leaves them out). A variant whose
    flags hold --sample-only changes only sampling: it starts from a copy of the full method's run of the same
    seed, so it reuses those trained adapters. --resume (a table that spans sessions) keeps every run that wrote its
    metrics.json and continues a training that left a ckpt.pt. The tables are the toy world's (its metrics need
    its renderer)."""
    if args.model != "toy":
        common.fail("--ablate runs the toy world's table: use it with --model toy")
    out, full = Path(args.out), slug(list(variants)[1])
    rest, rows = [a for a in argv if a not in ("--ablate", "--resume")], {}
    for i, (name, flags) in enumerate(variants.items()):
        n = args.seeds if i < 2 else min(args.ablation_seeds, args.seeds)
        if "--dry-run" in argv:  # the plan: each variant's flags and runs; nothing is run, written or removed
            print(f"{name}: {' '.join(flags) or '(the full method)'}, {n} seed(s) in {out / 'ablations' / slug(name)}")
            continue
        if n:  # --ablation-seeds 0: only the base model and the full method
            rows[name] = []
        for seed in range(n):
            run = out / "ablations" / slug(name) / f"seed{seed}"
            if args.resume and (run / "metrics.json").is_file():  # finished in an earlier session
                rows[name].append(json.loads((run / "metrics.json").read_text()))
            else:
                again = args.resume and "--sample-only" not in flags and (run / "ckpt.pt").is_file()
                if not again:
                    shutil.rmtree(run, ignore_errors=True)  # each variant's run is made afresh
                if "--sample-only" in flags:
                    shutil.copytree(out / "ablations" / full / f"seed{seed}", run)
                rows[name].append(main(rest + flags + ["--seed", str(seed), "--out", str(run)] + ["--resume"] * again))
            kept = Path("results") / method / slug(name) / f"seed{seed}" / "metrics.json"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text((run / "metrics.json").read_text())
    if not rows:
        return rows
    keys = list(rows[next(iter(rows))][0])
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for name, runs in rows.items():
        cell = (lambda k: f"{statistics.mean(r[k] for r in runs):.3f}" + (
            f" +- {statistics.pstdev(r[k] for r in runs):.3f}" if len(runs) > 1 else ""))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cell(k) for k in keys) + " |")
    table = "\n".join(lines) + f"\n\nmean +- std over seeds{note}."
    (Path(out) / "ablations" / "table.md").write_text(table + "\n")
    print(table)
    return rows


# -----------------------------------------------------------------------------
# dual_task_sdv's toy data: subject-image pairs and unpaired videos in memory, and the held-out sprites it is
# measured on (sampled from one reference image each, never trained on)


def cls_prompt(c, image=False):
    """Toy prompts name neither the sprite's colour, shape nor pattern: '<cls>' stands for the subject, so identity
    must come from the reference tokens ('a picture of a <cls> on a white background')."""
    if image:
        return f"a picture of a <cls> on a {c['background']} background"
    return f"a <cls> {MOTION_WORDS[c['motion']]} on a {c['background']} background"


class PairVideoData:
    """Subject-image pairs: the same sprite (pretraining shapes/patterns only) in two scenes (another background
    and position); unpaired videos: random pretraining concepts moving. All rendered once, in memory."""

    def __init__(self, n_pairs, n_videos, seed):
        gen = torch.Generator().manual_seed(1000 + seed)
        bgs = list(BACKGROUNDS)
        cs = random_concepts(n_pairs, gen)
        other = [dict(c, background=bgs[(bgs.index(c["background"]) + 1 + int(torch.randint(len(bgs) - 1, (1,),
                                          generator=gen))) % len(bgs)]) for c in cs]
        still = lambda xs: [dict(c, motion="still") for c in xs]
        self.ref = render(still(cs), gen, frames=1)[:, 0]
        self.target = render(still(other), gen, frames=1)[:, 0]
        self.pairs = [cls_prompt(c, image=True) for c in other]  # one prompt per pair
        vs = random_concepts(n_videos, gen)
        self.clips, self.videos = render(vs, gen), [cls_prompt(c) for c in vs]  # one caption per video

    def pair_batch(self, idx, gen):
        return self.ref[idx], self.target[idx], [self.pairs[i] for i in idx.tolist()]

    def video_batch(self, idx, gen):
        return self.clips[idx], [self.videos[i] for i in idx.tolist()]


# novel shapes/patterns never in training (SUBJECT first), each with a motion and a background for its reference
HELDOUT_SUBJECTS = [dict(colour="yellow", shape="star", pattern="dotted", background="white", motion="right"),
                    dict(colour="red", shape="ring", pattern="solid", background="black", motion="down"),
                    dict(colour="green", shape="square", pattern="dotted", background="white", motion="left"),
                    dict(colour="blue", shape="star", pattern="striped", background="black", motion="circle")]


def heldout_case(i):
    """Held-out sprite i as heldout_eval poses it: its reference image (its own scene, (3, H, W)) and the prompt of
    a video of it on a gray background."""
    c = HELDOUT_SUBJECTS[i]
    ref = render([dict(c, motion="still")], torch.Generator().manual_seed(i), frames=1)[0, 0]
    return ref, cls_prompt(dict(c, background="gray"))


def heldout_eval(generate, seed):
    """generate(reference (3, H, W), prompt, seed) -> video, for each held-out sprite from a reference image (its own
    scene) to a video on a gray background; identity = factor match against the reference's recognised factors;
    dynamics = mean sprite speed; motion = against the prompt's motion. -> (mean metrics, first video, grid)."""
    rows, videos, refs = [], [], []
    for i, c in enumerate(HELDOUT_SUBJECTS):
        ref, prompt = heldout_case(i)
        video = generate(ref, prompt, seed + i)
        traj = centroids(segment(video)[1])
        template = trajectory(c["motion"], 1, torch.Generator().manual_seed(0))[0]  # the prompt's motion
        rows.append(dict(identity=factor_match(video, reference_factors([ref])), dynamics=dynamics(traj),
                         motion=motion_score(traj, template)))
        videos.append(video)
        refs.append(ref[None].expand_as(video))
        print(f"held-out {c['colour']} {c['pattern']} {c['shape']}: {prompt!r}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()))
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print("toy metrics (mean over held-out sprites): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics, videos[0], common.side_by_side(refs + videos)


# -----------------------------------------------------------------------------
# bundled assets and the command line


def subject_images(n=4, seed=0, subject=SUBJECT):
    """A subject's photos (the bundled novel one by default): n stills on different backgrounds and places, with
    masks (n, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    concepts = [dict(subject, background=b) for b in list(BACKGROUNDS)[:n]]
    video, mask = render(concepts, gen, frames=1, masks=True)
    return video[:, 0], mask[:, 0]


MOTION_CLIP = dict(MOTION_SPRITE, motion="zigzag", background="gray")  # the bundled motion clip's concept


def motion_clip(seed=0, concept=MOTION_CLIP):
    """A motion clip of `concept`; by default the bundled novel motion: a familiar sprite (MOTION_SPRITE) moving in a
    zigzag on a gray background."""
    return render([concept], torch.Generator().manual_seed(seed))[0]


def motion_caption(concept=MOTION_CLIP):
    """A clip's caption.txt (the bundled one by default), the whole clip in the world's words: 'a blue striped square
    moving in a zigzag on a gray background'. The papers caption their reference videos so: SMRABooth supp. sec. 3
    (a detailed GPT-4o caption of the content and its motion), JointTuner supp. B.2 (BLIP-2 captions), DualReal (the
    video's caption)."""
    return caption(concept)


# a second task (`make-task`), so that a result is not about one star: another novel shape (a ring, solid, red) and
# the novel zigzag done by another familiar sprite on another background, again sharing no factor with the subject
TASK2 = dict(subject=dict(colour="red", shape="ring", pattern="solid"),
             clip=dict(colour="magenta", shape="triangle", pattern="checkered", motion="zigzag", background="white"))


def write_task(folder, subject=SUBJECT, clip=MOTION_CLIP):
    """A customization task as the methods read it: folder/subject (4 stills, masks/, prompt.txt: the class word)
    and folder/motion (9 PNG frames and caption.txt), with a gif of each."""
    import imageio.v3 as iio
    folder = Path(folder)
    images, masks = subject_images(subject=subject)
    subj = folder / "subject"
    (subj / "masks").mkdir(parents=True, exist_ok=True)
    for i, (img, m) in enumerate(zip(images, masks)):
        iio.imwrite(subj / f"{i}.png", common.to_uint8(img))
        iio.imwrite(subj / "masks" / f"{i}.png", (m.numpy() * 255).astype("uint8"))
    (subj / "prompt.txt").write_text(subject["shape"] + "\n")
    video = motion_clip(concept=clip)
    common.write_frames(folder / "motion", video)
    (folder / "motion" / "caption.txt").write_text(motion_caption(clip) + "\n")
    common.write_video(folder / "motion.gif", video, fps=4, upscale=4)
    common.write_video(folder / "subject.gif", images, fps=1, upscale=4)


def sample_prompt(subject, clip_caption):
    """--model toy's sampling prompt: the subject ('a sks star') doing the motion named in the motion clip's caption,
    on that caption's background: 'a sks star moving in a zigzag on a gray background'. The papers write these by
    hand or with an LLM (SMRABooth supp. sec. 3: GPT-4o pairs subject and motion and adds a setting; JointTuner supp.
    B.1: each pair in 5 settings; DualReal supp. sec. 1: an LLM enriches them), so the toy world writes its own from
    its words. The background is named because every pretraining caption names one."""
    text = f" {' '.join(clip_caption.split())} "
    motions = [m for m in MOTION_WORDS.values() if f" {m} " in text]
    backgrounds = [b for b in BACKGROUNDS if f" on a {b} background " in text]
    if not motions or not backgrounds:
        common.fail(f"the motion caption {clip_caption!r} names no toy motion and background (as "
                    f"{motion_caption()!r}), from which --model toy writes its prompt: give --prompt")
    return f"{subject} {motions[0]} on a {backgrounds[0]} background"


def make_assets():
    """Write assets/: frozen tiny text encoders and image-encoder stand-ins (seeded), and the toy subject/motion."""
    from transformers import (CLIPTextModel, CLIPVisionModelWithProjection, Dinov2Model, T5EncoderModel,
                              UMT5EncoderModel)
    classes = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel, "clip": CLIPTextModel, "dinov2": Dinov2Model,
               "clip_vision": CLIPVisionModelWithProjection}
    for i, (kind, cfg) in enumerate({**_text_encoder_configs(), **_image_encoder_configs()}.items()):
        torch.manual_seed(1000 + i)
        folder = "text_encoders" if kind in ("umt5", "t5", "clip") else "encoders"
        classes[kind](cfg).save_pretrained(ASSETS / folder / kind)
    from transformers import CLIPImageProcessor  # the CLIP stand-in's own preprocessing, as the real model ships it
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        ASSETS / "encoders" / "clip_vision")
    write_task(ASSETS / "toy")
    print(f"wrote {ASSETS}")


def cmd_eval(args):
    images = [common.read_image(p, (SIZE, SIZE)) for p in common.list_images(args.subject)]
    if not images:
        common.fail(f"no images in {args.subject}")
    ref = common.read_video(args.motion, NUM_FRAMES, (SIZE, SIZE))
    rows = {}
    for path in args.videos:
        rows[path] = evaluate(common.read_video(path, NUM_FRAMES, (SIZE, SIZE)), images, ref)
        print(path + ": " + ", ".join(f"{k} {v:.3f}" for k, v in rows[path].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


@torch.no_grad()
def cmd_eval_vae(args):
    """The toy metrics of clips sent through the VAE and back: prompt following on clips of held-out combinations,
    the bundled subject's identity and the bundled zigzag's motion (and sprite)."""
    vae, gen = load_vae(args.vae), torch.Generator().manual_seed(args.seed)
    through = lambda v: vae.decode(vae.encode(v.transpose(1, 2)).latent_dist.mode()).sample.transpose(1, 2).clamp(-1, 1)
    concepts = random_concepts(args.n, gen, heldout=True)
    clips = torch.cat([through(render(concepts[i:i + 16], gen)) for i in range(0, args.n, 16)])
    hits = [prompt_following(v, c) for v, c in zip(clips, concepts)]
    result = {k: sum(h[k] for h in hits) / len(hits) for k in hits[0]}
    images, motion = subject_images()[0], motion_clip()
    subj, rec_motion = through(images[:, None])[:, 0], through(motion[None])[0]
    result["subject_identity"] = sum(factor_match(x[None], SUBJECT) for x in subj) / len(subj)
    result["zigzag_identity"] = factor_match(rec_motion, MOTION_SPRITE)
    result["zigzag_motion"] = motion_score(centroids(segment(rec_motion)[1]), centroids(segment(motion)[1]))
    print(f"toy VAE, {args.n} held-out clips and the bundled subject and motion, reconstructed: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(result, n=args.n, seed=args.seed), indent=2))
    return result


def cmd_eval_base(args):
    """Prompt following of a (pretrained) toy backbone on held-out combinations of familiar words, and how far
    its nearest familiar prompt gets to the novel subject and motion (it should not get there)."""
    fam = FAMILIES[args.family]
    torch.manual_seed(args.seed)  # the random stand-in, when no pretrained backbone exists yet, is seeded too
    model, vae = load_backbone(args.family, args.ckpt), load_vae()
    tok, enc = text_path(args.family)
    concepts = random_concepts(args.n, torch.Generator().manual_seed(args.seed), heldout=True)
    image = args.frames == 1  # single frames: appearance alone, with the pretraining's still-image captions
    if image:
        concepts = [dict(c, motion="still") for c in concepts]
    near = dict(colour=SUBJECT["colour"], shape=NEAREST[SUBJECT["shape"]], pattern=NEAREST[SUBJECT["pattern"]],
                motion=NEAREST["zigzag"], background="white")
    n_novel = 0 if image else args.n_novel
    prompts = [caption(c, image=image) for c in concepts] + [caption(near)] * n_novel
    text = common.encode_prompts(tok, enc, prompts, MAX_TOKENS, fam["zero_pad"])
    uncond = common.encode_prompts(tok, enc, [""], MAX_TOKENS, fam["zero_pad"])
    gen, videos = torch.Generator().manual_seed(args.seed), []
    for i in range(0, len(prompts), args.batch):
        videos.append(sample(args.family, model, vae, text[i:i + args.batch], uncond, args.steps, args.cfg,
                             frames=args.frames, gen=gen))
    videos = torch.cat(videos)
    hits = [prompt_following(v, c) for v, c in zip(videos, concepts)]
    result = {k: sum(h[k] for h in hits) / len(hits) for k in hits[0] if not (image and k == "motion")}
    if not image:  # which word each asked motion was read as, and whether straight motions go the right way
        report = motion_report(videos[:len(concepts)], concepts)
        judged = sum(r["judged"] for r in report.values())  # pooled over the samples whose direction was judged
        result["direction"] = (sum(r["direction"] * r["judged"] for r in report.values() if r["judged"]) / judged
                               if judged else float("nan"))
        for m, r in report.items():
            print(f"  {m:6s} x{r['n']:<2d} read as " + ", ".join(f"{k} {n}" for k, n in sorted(r["got"].items()))
                  + (f"; right way {r['direction']:.2f}" if r["direction"] is not None else ""))
    if n_novel:
        images, _ = subject_images()
        novel = [evaluate(v, images, motion_clip()) for v in videos[len(concepts):]]
        result.update({f"novel_{k}": sum(m[k] for m in novel) / len(novel) for k in ("identity", "motion")})
    print(f"toy {args.family}, {args.n} held-out prompts, {args.frames} frames, {args.steps} steps, cfg {args.cfg}: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    if args.gif:  # one row per prompt: the prompt rendered | the sample
        shown = range(min(8, len(concepts)))
        truth = render([concepts[i] for i in shown], torch.Generator().manual_seed(args.seed), frames=args.frames)
        rows = [common.side_by_side([truth[i], videos[i]]) for i in shown]
        common.write_video(args.gif, torch.cat(rows, dim=-2), fps=4, upscale=3)
        print(f"wrote {args.gif} (left: the prompt rendered, right: the model's sample)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(result, family=args.family, n=args.n, frames=args.frames,
                                                   steps=args.steps, cfg=args.cfg, seed=args.seed,
                                                   **({} if image else dict(motions=report))), indent=2))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("pretrain", help="pretrain a toy backbone (resumable)")
    pt.add_argument("--family", choices=list(FAMILIES), required=True)
    pt.add_argument("--steps", type=int, default=10000, help="total optimiser steps")
    pt.add_argument("--batch", type=int, default=32)
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--warmup", type=int, default=200)
    pt.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights (warm-up: "
                                                              "min(ema, (1 + step) / (10 + step)))")
    pt.add_argument("--image-every", type=int, default=8, help="every k-th batch is single frames (0: never)")
    pt.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of empty prompts, for guidance")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--config", help="JSON overrides of the family's model config, e.g. '{\"num_attention_heads\": 4}' "
                                     "(a wider model); stored in the checkpoint and the exported file")
    pt.add_argument("--out", help="exported EMA weights (default assets/toy_FAMILY.safetensors)")
    pt.add_argument("--ckpt", help="training state (default out/pretrain/FAMILY/ckpt.pt)")
    pt.add_argument("--resume", action="store_true", help="continue from --ckpt, else from the exported weights")
    pt.add_argument("--log-every", type=int, default=50)
    pt.add_argument("--save-every", type=int, default=500)
    pt.add_argument("--offset-noise", type=float, help="std of a per-channel constant added to the training noise "
                                                        "(default: 0.5 for unet3d, whose schedule keeps signal at "
                                                        "its last step; 0 for the others)")
    pt.add_argument("--bank", help="train on the latents stored by make-bank in this folder (else render and encode)")
    mb = sub.add_parser("make-bank", help="render pretraining clips and stills once and store their VAE latents")
    mb.add_argument("--out", default="out/bank", help="folder of fp16 shards (never committed)")
    mb.add_argument("--clips", type=int, default=100000, help="clips in the bank (and as many stills)")
    mb.add_argument("--shard", type=int, default=2048, help="clips per shard")
    mb.add_argument("--seed", type=int, default=0, help="shard k is drawn from seed * 100003 + k")
    ev = sub.add_parser("eval", help="toy metrics of generated clips (PNG-frame folders or videos)")
    ev.add_argument("videos", nargs="+")
    ev.add_argument("--subject", default=str(ASSETS / "toy" / "subject"))
    ev.add_argument("--motion", default=str(ASSETS / "toy" / "motion"))
    ev.add_argument("--json", help="also write the numbers here")
    eb = sub.add_parser("eval-base", help="prompt following of a toy backbone, with a gif of samples")
    eb.add_argument("--family", choices=list(FAMILIES), default="wan")
    eb.add_argument("--ckpt", help="backbone file (default assets/toy_FAMILY.safetensors)")
    eb.add_argument("--n", type=int, default=64, help="held-out prompts")
    eb.add_argument("--n-novel", type=int, default=8, help="samples of the nearest familiar prompt to the novel task")
    eb.add_argument("--frames", type=int, default=NUM_FRAMES, help="1: single frames, appearance only")
    eb.add_argument("--steps", type=int, default=20)
    eb.add_argument("--cfg", type=float, default=4.0)
    eb.add_argument("--batch", type=int, default=16)
    eb.add_argument("--seed", type=int, default=0)
    eb.add_argument("--gif", help="write samples next to the rendered prompts here")
    eb.add_argument("--json")
    tv = sub.add_parser("train-vae", help="train the toy VAE on frames of every concept (resumable)")
    tv.add_argument("--steps", type=int, default=4250, help="total optimiser steps (the shipped VAE's)")
    tv.add_argument("--batch", type=int, default=32, help="frames per step")
    tv.add_argument("--lr", type=float, default=1e-3)
    tv.add_argument("--warmup", type=int, default=100)
    tv.add_argument("--kl", type=float, default=1e-4, help="weight of the KL term (per pixel value)")
    tv.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights (with warm-up)")
    tv.add_argument("--latent-channels", type=int, default=VAE_CONFIG["latent_channels"],
                    help="channels of the 8x8 latent (the toy backbones are built for the default)")
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--out", help="the diffusers folder written (default assets/toy_vae)")
    tv.add_argument("--ckpt", help="training state (default out/vae/ckpt.pt)")
    tv.add_argument("--resume", action="store_true", help="continue from --ckpt")
    tv.add_argument("--log-every", type=int, default=50)
    tv.add_argument("--save-every", type=int, default=250)
    ev_vae = sub.add_parser("eval-vae", help="toy metrics of clips reconstructed through the toy VAE")
    ev_vae.add_argument("--vae", help="diffusers folder (default assets/toy_vae)")
    ev_vae.add_argument("--n", type=int, default=64, help="held-out clips")
    ev_vae.add_argument("--seed", type=int, default=0)
    ev_vae.add_argument("--json")
    sub.add_parser("make-assets", help="re-create the shipped encoders and toy subject/motion in assets/")
    mt = sub.add_parser("make-task", help="render the second toy task (a red ring; a magenta triangle's zigzag)")
    mt.add_argument("out", help="folder for subject/ and motion/ (pass them as --subject and --motion)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.cmd == "pretrain":
        return pretrain(args)
    if args.cmd == "make-bank":
        return make_bank(args)
    if args.cmd == "eval":
        return cmd_eval(args)
    if args.cmd == "eval-base":
        return cmd_eval_base(args)
    if args.cmd == "train-vae":
        return train_vae(args)
    if args.cmd == "eval-vae":
        return cmd_eval_vae(args)
    if args.cmd == "make-task":
        write_task(args.out, **TASK2)
        print(f"wrote {args.out}: --subject {Path(args.out) / 'subject'} --motion {Path(args.out) / 'motion'}")
        return None
    return make_assets()


if __name__ == "__main__":
    common.cli(main)
