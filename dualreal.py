"""DualReal: adaptive joint training for lossless identity-motion fusion in video customization, on CogVideoX.

A frozen CogVideoX transformer gets two kinds of small bottleneck adapters in every block, identity adapters and
motion adapters (the latter conditioned on a CLIP image embedding), whose outputs are added to the attention and
feed-forward outputs with weights alpha (identity) and beta = s - alpha (motion). A tiny StageBlender Controller
reads the timestep embedding and the patch-embedded tokens and sets alpha per group of consecutive blocks, once
per forward. Dual-aware Adaptation trains both kinds jointly: each step is a motion batch (probability gamma) or
an identity batch (a subject photo as a one-frame video); both kinds act in every forward, but only the step's own
kind (and the controller) is updated. Sampling is CogVideoX's sampler with guidance.

    # a real run (`python bench.py --estimate`: ~37 GB for the default 3 clips a motion step with the default
    # gradient checkpointing, ~379 GB without; weights from the hub cache or local folders, no download)
    python dualreal.py --subject photos/ --motion pushups.mp4 --prompt "a sks dog doing push ups in a saloon"
    # the toy world on a CPU in minutes (toy CogVideoX, bundled toy subject and motion)
    python dualreal.py --model toy
    python dualreal.py --model toy --sample-only          # reuse the adapters saved in --out
    python dualreal.py --model toy --ablate --seeds 3     # the supplement's Fig. 4 ablations, in the toy world

Source: Wang et al., "DualReal: Adaptive Joint Training for Lossless Identity-Motion Fusion in Video Customization"
(ICCV 2025, arXiv:2505.02192) and its supplement (1000 steps, gamma 0.5, lr 1e-3, AdamW, 49 frames at 480x720, the
Fig. 4 ablations); where the paper is silent, the official code (github.com/wenc-k/DualReal). See CITATION.bib.
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import toyworld

# -----------------------------------------------------------------------------
# settings: paper (and official code) values as defaults; --model toy applies TOY on top


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--subject", help="folder of subject photos (+ prompt.txt with the class word)")
    p.add_argument("--motion", help="reference video file, a folder of its frames, or a folder of clips")
    p.add_argument("--class-word", help="the subject's class (default: SUBJECT/prompt.txt, else 'object')")
    p.add_argument("--motion-caption", help="the motion video's caption (default: the .txt beside the video or "
                                            "caption.txt in its folder, else 'moving')")
    p.add_argument("--prompt", help="sampling prompt; needed for real models (toy default: 'a sks star' + the "
                                    "motion caption's motion and background)")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt of guidance")
    p.add_argument("--placeholder", default="sks", help="the subject's identifier word")
    p.add_argument("--height", type=int, default=480, help="training and sampling height (supplement: 480x720)")
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--frames", type=int, default=49, help="frames of the motion clips and of the result (4k+1)")
    p.add_argument("--motion-start", type=int, default=0, help="first frame of the reference clip(s) to use")
    p.add_argument("--motion-end", type=int, help="frame after the last one to use (default: the clip's end)")
    p.add_argument("--motion-stride", type=int, default=1, help="take every n-th frame from --motion-start (official "
                   "loader: 1, consecutive frames); 0 spreads the frames over the whole clip")
    # models
    p.add_argument("--model", default="THUDM/CogVideoX-5b", help="hub id, local folder, or 'toy'")
    p.add_argument("--image-encoder", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   help="CLIP vision model (ViT-H/14, 1024-d image_embeds) giving the motion adapters' c")
    p.add_argument("--max-text-len", type=int, default=226, help="T5 tokens, as CogVideoXPipeline")
    # adapters and controller
    p.add_argument("--rank", type=int, default=64, help="bottleneck width (rank) of every adapter")
    p.add_argument("--groups", type=int, default=7, help="weight groups of consecutive blocks (42 blocks -> 6 each)")
    p.add_argument("--blend-scale", type=float, default=0.2, help="s: alpha = s sigmoid(.), beta = s - alpha")
    p.add_argument("--controller-dim", type=int, default=128, help="hidden width of the controller's MLP")
    # optimisation
    p.add_argument("--iterations", type=int, default=1000, help="training steps (supplement)")
    p.add_argument("--gamma", type=float, default=0.5, help="gamma: chance that a step is a motion step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (supplement)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (code; betas 0.9/0.95)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps of the cosine schedule (code)")
    p.add_argument("--lr-cycles", type=int, default=1, help="hard restarts of the cosine schedule (code: 1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (code)")
    p.add_argument("--motion-batch", type=int, default=3, help="distinct clips per motion step (code; fewer clips "
                                                                 "given: all of them, none repeated)")
    p.add_argument("--identity-batch", type=int, default=1, help="photos per identity step (code)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing of the transformer's blocks (memory for speed; on by default: the "
                        "paper's 49x480x720 motion batches need it)")
    # sampling
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--cfg", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm", help="CogVideoXDPMScheduler (recommended "
                                                                            "for the 5B) or CogVideoXDDIMScheduler")
    p.add_argument("--fps", type=int, default=8, help="of the written videos (CogVideoX: 49 frames at 8 fps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="frozen weights' dtype (auto: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--num-samples", type=int, default=1, help="videos sampled from different noise, batched "
                                                                "(toy metrics: their mean)")
    # ablations (supplement Fig. 4)
    p.add_argument("--no-dual-aware", action="store_true", help="no gradient masking: both kinds learn every step")
    p.add_argument("--no-controller", action="store_true", help="'direct fusion': fixed alpha = beta = s/2")
    p.add_argument("--no-grouping", action="store_true", help="one group: the same weights in every block")
    # run
    p.add_argument("--out", default="out/dualreal")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else it is kept)")
    p.add_argument("--sample-only", action="store_true", help="sample with the adapters saved in --out")
    p.add_argument("--dry-run", action="store_true", help="check inputs, print the plan, load nothing")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--sample-every", type=int, default=250, help="write a sample (fixed seed) to --out/samples/ every "
                                                                 "this many steps (0: never)")
    p.add_argument("--ablate", action="store_true", help="toy world: run the base model, the full method and every "
                                                         "ablation (--seeds, --ablation-seeds), and print the table")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the base model and the full method in --ablate")
    p.add_argument("--ablation-seeds", type=int, default=1,
                   help="seeds for every other --ablate variant (0: base and full only)")
    args = p.parse_args(argv)
    if args.model == "toy":
        toyworld.apply_preset(args, p, argv, TOY)
    return args


# the toy world: 9 frames of 32x32 in its VAE's latent space (576 video + 16 text tokens), its pretrained tiny
# CogVideoX (4 blocks, so 4 groups), its DDIM sampler, fewer sampling steps; max_text_len = toyworld.MAX_TOKENS.
# Training keeps the paper's 1000 steps, warm-up and batches (motion 3, identity 1): ~65 ms a step on one core of a
# loaded 2-core machine, the whole run (train + sample) ~75 s
TOY = dict(height=32, width=32, frames=9, fps=4, max_text_len=16, steps=20, cfg=4.0, sampler="ddim",
           num_samples=4, grad_ckpt=False)


# -----------------------------------------------------------------------------
# data: checked before anything loads; a bad input ends with one line and exit code 2


def check_args(args):
    """Every numeric flag in range: --iterations 0 is the untrained base model; CogVideoX's VAE needs 4k+1 frames
    and sizes that are multiples of 16 (8x VAE, 2x2 patches)."""
    common.check_numbers(args, at_least_one=["rank", "groups", "controller_dim", "motion_batch",
                                             "identity_batch", "steps", "num_samples", "max_text_len", "fps",
                                             "log_every", "save_every", "seeds", "lr_cycles"],
                         at_least_zero=["iterations", "sample_every", "warmup", "motion_start", "motion_stride",
                                        "ablation_seeds", "weight_decay", "cfg"],
                         positive=["lr", "blend_scale", "grad_clip"], unit=["gamma"])
    common.check_cogvideox_video(args)
    common.check_clip_range(args)
    common.check_words(args, ["prompt", "class_word", "motion_caption", "placeholder"])


def read_inputs(args):
    """Subject photos (K, 3, H, W), reference clips (M, N, 3, H, W) and the prompts (identity, motion, sample)."""
    check_args(args)
    if not args.subject or not args.motion:
        common.fail("--subject DIR and --motion VIDEO are needed (or --model toy, which brings its own)")
    folder, motion = Path(args.subject), Path(args.motion)
    if not folder.is_dir():
        common.fail(f"--subject {args.subject!r} is not a folder of subject photos")
    paths = common.list_images(folder)
    if not paths:
        common.fail(f"{folder} has no image ({', '.join(common.IMAGE_EXTS)})")
    size = (args.height, args.width)
    images = torch.stack([common.read_image(q, size) for q in paths])
    if not motion.exists():
        common.fail(f"--motion {args.motion!r} does not exist (a video file, a folder of frames or of clips)")
    clips = [motion] if motion.is_file() or common.list_images(motion) else sorted(
        q for q in motion.iterdir() if q.suffix.lower() in common.VIDEO_EXTS or (q.is_dir() and common.list_images(q)))
    if not clips:
        common.fail(f"{motion} holds neither frames nor video files nor frame folders")
    videos = torch.stack([common.read_video(c, args.frames, size, args.motion_start, args.motion_end,
                                            args.motion_stride or None) for c in clips])
    word = folder / "prompt.txt"
    class_word = args.class_word or common.read_text(word, "object")
    sidecar = motion.with_suffix(".txt") if motion.is_file() else motion / "caption.txt"
    caption = args.motion_caption or common.read_text(sidecar, "moving")
    subject = f"a {args.placeholder} {class_word}"  # code: identity captions name the subject only
    if args.prompt is None and args.model != "toy":  # a real caption names its own subject ("a person playing...")
        common.fail('real models need --prompt (the video you want, e.g. "a sks dog doing push ups in a saloon"); '
                    "the paper's prompts are written by hand")
    # the video trains under its own caption (the whole clip); the paper's sampling prompts are an LLM's, the subject
    # and motion enriched with details and a setting (supp. sec. 1, Prompts), so --model toy writes its own from the
    # world's words
    prompts = dict(subject=subject, motion=caption, sample=args.prompt or toyworld.sample_prompt(subject, caption))
    if args.placeholder not in prompts["sample"].split():
        common.fail(f"the prompt {prompts['sample']!r} does not contain the placeholder word {args.placeholder!r}")
    return images, videos, prompts, clips


# -----------------------------------------------------------------------------
# backbone, image encoder, adapters and the controller


def load_models(args, device, dtype):
    """CogVideoX (transformer, VAE, T5 and its tokenizer, the sampler of the model's scheduler config) and the CLIP
    image encoder with its own preprocessing from hub ids / local folders, or the toy world's pieces for --model toy."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    if args.model == "toy":
        m = toyworld.cogvideox_parts(dtype)
    else:
        m = common.load_cogvideox(args.model, args.sampler, dtype)
    encoder = args.image_encoder
    if args.model == "toy":
        encoder = toyworld.ASSETS / "encoders" / "clip_vision"  # the tiny frozen stand-in for ViT-H/14
    m["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(encoder, torch_dtype=dtype)
    m["image_processor"] = CLIPImageProcessor.from_pretrained(encoder)
    for k in ("transformer", "vae", "text_encoder", "image_encoder"):
        m[k] = m[k].to(device).eval().requires_grad_(False)
    return m


@torch.no_grad()
def image_embeds(encoder, processor, images):
    """CLIP image embeddings (N, D) of images (N, 3, H, W) in [-1, 1], preprocessed by the model's own
    CLIPImageProcessor (resize the short side, centre crop, CLIP mean/std)."""
    x = processor(images=list((images.float().cpu() + 1) / 2), do_rescale=False, return_tensors="pt").pixel_values
    return encoder(pixel_values=x.to(encoder.device, encoder.dtype)).image_embeds.float()


def condition_frames(videos, seed):
    """The frames (M, 3, H, W) whose embeddings are the clips' c: one random frame of each clip, drawn independently
    per clip and once per run (code)."""
    frame = torch.randint(videos.shape[1], (len(videos),), generator=torch.Generator().manual_seed(seed))
    return videos[torch.arange(len(videos)), frame]


class Adapter(nn.Module):
    """down (dim -> r) -> GELU -> up (r -> dim) on the block's normalised tokens; a motion adapter adds W_cond c + b
    to its input first, when it is given a c (code: identity steps give none, so W_cond is skipped). `up` starts at
    zero: the pretrained model is exactly preserved at step 0. The official adapter returns x + up(...), an internal
    skip that changes the model at initialisation (the sub-layer output gets alpha x added); we leave it out."""

    def __init__(self, dim, rank, cond_dim=None):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        self.cond = nn.Linear(cond_dim, dim) if cond_dim else None
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, c=None):
        if self.cond is not None and c is not None:
            x = x + self.cond(c)[:, None]  # c (B or 1, cond_dim): one condition per sample, on every token
        return self.up(F.gelu(self.down(x)))


class StageBlender(nn.Module):
    """The StageBlender Controller, in the official code's form: E = Linear(max-pooled patch-embedded tokens) (B, T);
    (shift, scale, gate) = Linear(SiLU(temb)) (adaLN style); h = Up-GELU-Down(LN(E) (1 + scale) + shift) + gate E
    (a 4x-wide tanh-GELU stage and a gated residual); alpha (B, groups) = s sigmoid(MLP(h)), beta = s - alpha.
    The MLP's last layer starts at zero, so alpha = beta = s/2 at step 0. (The paper writes omega for motion and
    1 - omega for identity; the code's weights sum to s, which is what we use.)"""

    def __init__(self, dim, time_dim, groups, hidden=128, s=0.2):
        super().__init__()
        self.s = s
        self.encode = nn.Linear(dim, time_dim)
        self.norm = nn.LayerNorm(time_dim, eps=1e-5)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 3 * time_dim))
        self.fuse = nn.Sequential(nn.Linear(time_dim, 4 * time_dim), nn.GELU(approximate="tanh"),
                                  nn.Linear(4 * time_dim, time_dim))
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(time_dim, hidden), nn.ReLU(), nn.Linear(hidden, groups))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, temb, pooled):
        shift, scale, gate = self.modulation(temb.float()).chunk(3, dim=-1)
        e = self.encode(pooled.float())
        h = self.fuse(self.norm(e) * (1 + scale) + shift) + gate * e
        alpha = self.s * torch.sigmoid(self.mlp(h))
        return alpha, self.s - alpha


def group_of(block, groups, num_layers):
    """Weight grouping: consecutive blocks share one (alpha, beta); 42 blocks in 7 groups -> 6 blocks each."""
    return block * groups // num_layers


class DualReal(nn.Module):
    """All trainable pieces: per block identity and motion adapters on attn1 and ff, and the controller. `c` (the
    image condition) and `weights` (alpha, beta) are set per forward, by the caller and by the controller hook."""

    def __init__(self, num_layers, dim, time_dim, cond_dim, rank=64, groups=7, s=0.2, controller=True,
                 controller_dim=128):
        super().__init__()
        self.identity = nn.ModuleDict({k: nn.ModuleList(Adapter(dim, rank) for _ in range(num_layers))
                                       for k in ("attn", "ff")})
        self.motion = nn.ModuleDict({k: nn.ModuleList(Adapter(dim, rank, cond_dim) for _ in range(num_layers))
                                     for k in ("attn", "ff")})
        self.controller = StageBlender(dim, time_dim, groups, controller_dim, s)
        self.use_controller, self.s, self.n_groups = controller, s, groups
        self.groups = [group_of(i, groups, num_layers) for i in range(num_layers)]
        self.c, self.temb, self.weights = None, None, None

    def blend(self, temb, tokens):
        """(alpha, beta), each (B, groups): the controller's, or 'direct fusion' s/2 each (--no-controller)."""
        if not self.use_controller:
            fixed = torch.full((tokens.shape[0], self.n_groups), self.s / 2, device=tokens.device)
            return fixed, fixed
        return self.controller(temb, tokens.amax(dim=1))  # max-pool over all (text and video) tokens

    def delta(self, kind, block, x):
        """alpha_g id_adapter(x) + beta_g motion_adapter(x, c) for block `block`'s sub-layer `kind` (fp32)."""
        alpha, beta = (w[:, self.groups[block], None, None] for w in self.weights)
        h = x.float()
        out = alpha * self.identity[kind][block](h) + beta * self.motion[kind][block](h, self.c)
        return out.to(x.dtype)


# forward hooks: the diffusers model stays as it is (its state dict too); the adapters see what CogVideoXBlock
# passes to attn1 (norm1's outputs) and to ff (norm2's outputs, text tokens first) and add to what these return,
# i.e. before the block multiplies by gate_msa / gate_ff and adds the residual


def keep_temb(dr, module, args, out):
    dr.temb = out  # the timestep embedding, computed before the patch embedding in the transformer's forward


def run_controller(dr, module, args, out):
    dr.weights = dr.blend(dr.temb, out)  # once per forward: out is (B, text + video tokens, dim)


def attn_hook(dr, block, module, args, kwargs, out):
    video, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    d = dr.delta("attn", block, torch.cat([text, video], dim=1))
    return out[0] + d[:, text.shape[1]:], out[1] + d[:, :text.shape[1]]


def ff_hook(dr, block, module, args, out):
    return out + dr.delta("ff", block, args[0])


def add_dualreal(transformer, rank, groups, s, controller, cond_dim, controller_dim=128):
    """Build the DualReal pieces for this transformer (fp32, on its device) and hook them in; returns them."""
    cfg = transformer.config
    layers = len(transformer.transformer_blocks)
    dr = DualReal(layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.time_embed_dim, cond_dim, rank,
                  min(groups, layers), s, controller, controller_dim).to(transformer.device)
    transformer.time_embedding.register_forward_hook(functools.partial(keep_temb, dr))
    transformer.patch_embed.register_forward_hook(functools.partial(run_controller, dr))
    for i, block in enumerate(transformer.transformer_blocks):
        block.attn1.register_forward_hook(functools.partial(attn_hook, dr, i), with_kwargs=True)
        block.ff.register_forward_hook(functools.partial(ff_hook, dr, i))
    return dr


def trainable(dr, controller=True):
    """The parameters each side updates: the identity adapters, the motion adapters, and the controller (trained in
    every step; not at all with --no-controller, whose weights are fixed)."""
    return dict(identity=list(dr.identity.parameters()), motion=list(dr.motion.parameters()),
                controller=list(dr.controller.parameters()) if controller else [])


# adapters.safetensors: DualReal's state dict, all fp32, block i = 0..L-1, kind = attn | ff:
#   identity.<kind>.<i>.down.weight (r, dim), .down.bias (r), .up.weight (dim, r), .up.bias (dim)
#   motion.<kind>.<i>.down.*, .up.* (the same) and motion.<kind>.<i>.cond.weight (dim, cond_dim), .bias   (W_cond)
#   controller.encode.weight (T, dim), .bias; controller.norm.weight (T), .bias; controller.modulation.1.weight
#   (3T, T), .bias; controller.fuse.0.weight (4T, T), .bias; controller.fuse.2.weight (T, 4T), .bias;
#   controller.mlp.1.weight (128, T), .bias; controller.mlp.3.weight (groups, 128), .bias
# metadata: rank, groups, s, controller (False: fixed s/2), cond_dim, controller_dim, model, iterations


def save_adapters(dr, path, args):
    from safetensors.torch import save_file
    meta = dict(method="dualreal", model=args.model, rank=str(args.rank), groups=str(dr.n_groups),
                s=str(dr.s), controller=str(dr.use_controller), cond_dim=str(dr.motion["attn"][0].cond.in_features),
                controller_dim=str(args.controller_dim), iterations=str(args.iterations))
    state = {k: v.detach().float().cpu().contiguous() for k, v in dr.state_dict().items()}
    common.save_atomic(state, path, lambda sd, q: save_file(sd, q, metadata=meta))


def adapter_metadata(path):
    """The adapters file's metadata; a missing or damaged file is one clear line, before any model loads."""
    from safetensors import safe_open
    if not Path(path).is_file():
        common.fail(f"--sample-only: {path} does not exist; train first")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
    except Exception as e:
        common.fail(f"cannot read {path} ({common.first_line(e)}): train again with --overwrite")
    if not meta or meta.get("method") != "dualreal":
        common.fail(f"{path} holds no DualReal adapters (its metadata says method {(meta or {}).get('method')})")
    return meta


def same_layout(sd, dr):
    """Whether a saved state dict holds exactly dr's tensors: the same names (e.g. W_cond's bias) and shapes."""
    return {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in dr.state_dict().items()}


def load_adapters(transformer, path):
    """Build and hook DualReal as the file's metadata says (groups, controller...) and load its weights."""
    from safetensors.torch import load_file
    meta = adapter_metadata(path)
    dr = add_dualreal(transformer, int(meta["rank"]), int(meta["groups"]), float(meta["s"]),
                      meta["controller"] == "True", int(meta["cond_dim"]), int(meta["controller_dim"]))
    sd = load_file(str(path))
    if not same_layout(sd, dr):
        common.fail(f"{path} does not hold adapters for this --model (blocks or widths differ, or it was saved before "
                    "W_cond had a bias); train again")
    dr.load_state_dict(sd)
    return dr


# -----------------------------------------------------------------------------
# the method's loss


def denoise(transformer, z, t, text):
    """One transformer call on z (B, F', C, h, w) with its 3D rotary embedding (built as the pipeline builds it)."""
    f, h, w = z.shape[1], z.shape[3], z.shape[4]
    rotary = common.cogvideox_rotary(transformer, f, h, w) if transformer.config.use_rotary_positional_embeddings \
        else None
    return transformer(z.to(transformer.dtype), text.to(transformer.dtype), t, image_rotary_emb=rotary,
                       return_dict=False)[0].float()


def v_loss(transformer, z0, text, alphas_cumprod, gen):
    """CogVideoX's v-prediction objective (common.cogvideox_v_loss) through the hooked transformer: the adapters act
    in every forward."""
    return common.cogvideox_v_loss(functools.partial(denoise, transformer), z0, text, alphas_cumprod, gen)


# -----------------------------------------------------------------------------
# sampling: our own loop, equal to CogVideoXPipeline on the same transformer


def sample(transformer, scheduler, text, uncond, latents, steps, cfg):
    """Denoise `latents` (B, F', C, h, w) (common.cogvideox_sample); the unconditional and conditional passes run as
    one batch, so the controller runs once per step (per sample: each half gets its own weights)."""
    return common.cogvideox_sample(functools.partial(denoise, transformer), scheduler, text, uncond, latents, steps,
                                   cfg)


def generate(m, dr, text, c_subject, args, n):
    """n videos (n, F, 3, H, W) of the sample prompt from fixed noise (--seed): the controller's weights at every
    step, c = the subject photo's embedding."""
    dr.eval()
    dr.c = c_subject
    transformer, vae = m["transformer"], m["vae"]
    noise = common.cogvideox_noise(transformer, vae, n, args.frames, args.height, args.width, args.seed)
    z = sample(transformer, m["scheduler"], text["sample"], text["negative"], noise.to(transformer.device), args.steps,
               args.cfg)
    return torch.cat([common.cogvideox_decode(vae, zi[None]) for zi in z]).cpu()  # one at a time: a decode is large


# -----------------------------------------------------------------------------
# training: Dual-aware Adaptation


def is_motion_step(gen, gamma):
    """Each step is a motion step with probability gamma, else an identity step."""
    return float(torch.rand(1, generator=gen)) < gamma


def train(transformer, dr, alphas_cumprod, lat, text, cond, args, state, out, preview=None):
    """`lat`: identity latents (K, 1, C, h, w) (photos as one-frame videos) and motion latents (M, F', C, h, w);
    `cond`: the motion clips' c (M, D). Resumable from state['step'] (optimiser, schedule, generator, RNG).
    preview(step) writes a sample every --sample-every steps."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup
    side = trainable(dr, not args.no_controller)
    params = side["identity"] + side["motion"] + side["controller"]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    lr_sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, args.warmup, args.iterations, args.lr_cycles)
    gen = torch.Generator().manual_seed(args.seed)
    if state.get("opt"):  # resuming: the same batches and noise as an uninterrupted run
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
    log, last = common.StepLog(out / "log.jsonl", every=args.log_every, append=args.resume), {}
    dr.train()
    bar = tqdm(range(state.get("step", 0), args.iterations), desc="dual-aware", disable=None)
    for step in bar:
        motion = is_motion_step(gen, args.gamma)
        key, b = ("motion", args.motion_batch) if motion else ("identity", args.identity_batch)
        idx = torch.randperm(len(lat[key]), generator=gen)[:b]  # distinct items, as a shuffled loader's batch
        b = len(idx)
        dr.c = cond[idx] if motion else None  # identity steps: no condition (code)
        loss = v_loss(transformer, lat[key][idx], text[key].expand(b, -1, -1), alphas_cumprod, gen)
        last[f"alpha_{key}"] = dr.weights[0].detach().mean(0).tolist()  # the controller's choice, per group
        common.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # both kinds act in the forward, so both get gradients
        if not args.no_dual_aware:  # drop the other kind's: grad None makes AdamW skip it (no moment, no decay)
            for p in side["identity" if motion else "motion"]:
                p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], args.grad_clip)
        opt.step()
        lr_sched.step()
        last[key] = loss.item()  # the latest loss and alphas of each kind, one line per interval
        log(step + 1, bar, **last, lr=lr_sched.get_last_lr()[0])
        if (step + 1) % args.save_every == 0 and step + 1 < args.iterations:
            save_state(out, dr, step + 1, opt, lr_sched, gen)
        if preview and args.sample_every and (step + 1) % args.sample_every == 0:
            preview(step + 1)
            dr.train()
    dr.eval()


def save_state(out, dr, step, opt, lr_sched, gen):
    """Everything --resume needs: step, adapters + controller, optimiser, schedule, generator and global RNG."""
    common.save_atomic(dict(step=step, adapters=dr.state_dict(), opt=opt.state_dict(),
                            lr_sched=lr_sched.state_dict(), gen=gen.get_state(), rng=common.rng_state()),
                       out / "ckpt.pt")


def load_state(state, dr):
    if not same_layout(state["adapters"], dr):
        common.fail("ckpt.pt holds other adapters (other flags, or saved before W_cond had a bias): train again "
                    "with --overwrite")
    dr.load_state_dict(state["adapters"])
    common.set_rng_state(state["rng"])


# -----------------------------------------------------------------------------
# main


def plan(args, prompts, images, clips):
    real = "" if args.model == "toy" else " (CogVideoX-5B: ~5 B transformer, its 3D VAE, T5-XXL encoder freed " \
                                          "after encoding; CLIP ViT-H/14 vision ~0.6 B, freed too)"
    lines = [f"model: {args.model}" + real,
             f"image encoder: {'toy CLIP vision stand-in' if args.model == 'toy' else args.image_encoder}",
             f"adapters: identity + motion bottlenecks (r {args.rank}) on attn and FF of every block; "
             + ("fixed alpha = beta = " + str(args.blend_scale / 2) if args.no_controller else
                f"StageBlender Controller, s {args.blend_scale}")
             + f", {1 if args.no_grouping else args.groups} weight group(s)",
             f"identity: {len(images)} photos at {args.height}x{args.width} as one-frame videos, prompt "
             f"{prompts['subject']!r}, batch {args.identity_batch}, no condition c",
             f"motion: {len(clips)} clip(s) from {args.motion}, {args.frames} frames, prompt {prompts['motion']!r}, "
             f"batch {args.motion_batch}, c = CLIP embedding of a random frame of each clip",
             f"training: {args.iterations} steps, motion with probability gamma {args.gamma}, "
             f"{'no gradient masking' if args.no_dual_aware else 'dual-aware gradient masking'}, AdamW lr {args.lr} "
             f"wd {args.weight_decay}, cosine ({args.lr_cycles} cycle(s)) after {args.warmup} warm-up steps",
             f"sample: {prompts['sample']!r}, {args.frames} frames at {args.height}x{args.width}, {args.sampler} "
             f"{args.steps} steps, cfg {args.cfg}, c = CLIP embedding of the first subject photo",
             f"out: {args.out}"]
    print("\n".join(lines))


# the supplement's Fig. 4 ablations and gamma; "base" trains nothing (zero adapters = the pretrained backbone)
ABLATIONS = {"base": ["--iterations", "0"], "full": [], "no dual-aware": ["--no-dual-aware"],
             "no controller": ["--no-controller"], "no grouping": ["--no-grouping"],
             "gamma 0.25": ["--gamma", "0.25"], "gamma 0.75": ["--gamma", "0.75"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.ablate:
        check_args(args)
        return toyworld.run_ablations(main, argv, ABLATIONS, args, "dualreal", "")
    images, videos, prompts, clips = read_inputs(args)
    if args.model != "toy":
        common.check_pretrained(args.model, "--model")
        common.check_pretrained(args.image_encoder, "--image-encoder", "config.json")
    out = Path(args.out)
    common.check_out(out, args.resume, args.sample_only, args.overwrite)
    if args.sample_only:
        adapter_metadata(out / "adapters.safetensors")  # opens, before any model loads
    state = common.load_checkpoint(out / "ckpt.pt") if args.resume else {}
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

    # prompts, image conditions and latents once; then the encoders are freed
    text = {k: common.encode_prompts(m["tokenizer"], m["text_encoder"], [q], args.max_text_len).to(device)
            for k, q in dict(prompts, identity=prompts["subject"], negative=args.negative_prompt).items()}
    cond = image_embeds(m["image_encoder"], m["image_processor"], condition_frames(videos, args.seed)).to(device)
    c_subject = image_embeds(m["image_encoder"], m["image_processor"], images[:1]).to(device)  # inference: the photo
    del m["text_encoder"], m["image_encoder"]
    transformer = m["transformer"]
    if args.grad_ckpt:
        transformer.enable_gradient_checkpointing()
    if args.sample_only:
        dr = load_adapters(transformer, out / "adapters.safetensors")
    else:
        dr = add_dualreal(transformer, args.rank, 1 if args.no_grouping else args.groups, args.blend_scale,
                          not args.no_controller, cond.shape[1], args.controller_dim)
        print(f"adapters: {sum(p.numel() for p in dr.parameters()) / 1e6:.2f} M parameters, "
              f"{len(dr.groups)} blocks in {dr.n_groups} group(s): {dr.groups}")
        lat = dict(identity=common.cogvideox_encode(m["vae"], images[:, None].to(device)),  # one-frame videos
                   motion=common.cogvideox_encode(m["vae"], videos.to(device)))
        if state:
            load_state(state, dr)
        preview = lambda step: common.write_preview(out, step, generate(m, dr, text, c_subject, args, 1)[0], args.fps,
                                                    toy=args.model == "toy")
        train(transformer, dr, m["scheduler"].alphas_cumprod, lat, text, cond, args, state, out, preview)
        save_adapters(dr, out / "adapters.safetensors", args)

    alphas = []  # the controller's alpha per group at each sampling step (mean over the guidance batch)
    hook = dr.controller.register_forward_hook(lambda mod, inputs, weights: alphas.append(weights[0].mean(0).tolist()))
    video = generate(m, dr, text, c_subject, args, args.num_samples)
    hook.remove()
    (out / "alpha_sample.json").unlink(missing_ok=True)  # --no-controller: fixed s/2, never computed
    if alphas:
        (out / "alpha_sample.json").write_text(json.dumps(alphas))
    return common.write_result(out, video, images, videos[0], prompts["sample"], args.fps,
                               evaluate=toyworld.evaluate if args.model == "toy" else None)


if __name__ == "__main__":
    common.cli(main)
