"""Helpers shared by the method files and toyworld.py: nothing here is what a paper is about.

Device and dtype, seeding, clear input errors (fail raises InputError; cli, the scripts' entry, makes it one line
and exit code 2), image/video I/O (imageio) and resizing (torchvision), prompt encoding with a cache, the
noise/target arithmetic of the three prediction types, peft LoRA helpers, atomic checkpoints, a NaN guard, the log
line, sample writing (mp4, gif, lossless PNG frames, side-by-side grid), and the CogVideoX pieces dualreal.py and
dual_task_sdv.py share (loading, latents, rotary, v-loss, sampler loop).
"""
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")

# -----------------------------------------------------------------------------
# setup


def device_and_dtype(choice="auto"):
    """CUDA if present, else the CPU. Frozen weights: bf16 where the GPU supports it (Ampere and later), else fp32;
    --dtype overrides. Trainable parameters stay fp32 anyway."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        # bf16 hardware only: by default is_bf16_supported() also counts the emulation pre-Ampere GPUs (V100, T4) offer
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
        return torch.device("cuda"), auto if choice == "auto" else getattr(torch, choice)
    return torch.device("cpu"), torch.float32 if choice == "auto" else getattr(torch, choice)


def to_dtype(model, dtype):
    """model in dtype but for the modules a diffusers model's class keeps in fp32 (_keep_in_fp32_modules: Wan's rope
    tables, time embedder, scale_shift_table and norms), as from_pretrained(torch_dtype=dtype) loads it and its
    pipeline runs it; a plain .to(dtype) casts those too. For models built or loaded in fp32 (the toy world's, bench's
    random ones); from_pretrained's models already have their dtypes."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # by tensor name, as from_pretrained matches
        if t.is_floating_point() and not any(k in name.split(".") for k in keep):  # (scale_shift_table is one)
            t.data = t.data.to(dtype)
    return model


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class InputError(Exception):
    """A bad input or a run that cannot go on, said in one line: what is wrong and what to do."""


def fail(message):
    """Raise InputError: a caller that imports a reader can catch it; a script's cli() makes it its last words."""
    raise InputError(" ".join(str(message).split()))  # one line, even for library messages


def cli(main, argv=None):
    """Run a script's main(argv); an InputError ends it with one line on stderr, exit code 2 and no traceback. Only
    here does a bad input become an exit: everything below raises, so the scripts' functions stay usable in Python."""
    try:
        return main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def first_line(error, limit=200):
    """A library's message cut to its first meaningful line (ffmpeg's errors start with a page of banner)."""
    lines = [q.strip() for q in str(error).splitlines() if q.strip()]
    meaningful = [q for q in lines if "error" in q.lower() or "invalid" in q.lower()] or lines or [type(error).__name__]
    return meaningful[0][:limit]


def check_numbers(args, at_least_one=(), at_least_zero=(), positive=(), unit=()):
    """Range checks of numeric flags, before anything loads: every float finite, counts >= 1 (or >= 0), rates > 0,
    fractions in [0, 1], and a seed numpy and torch both accept."""
    def bad(name, want):
        fail(f"--{name.replace('_', '-')} must be {want} (got {getattr(args, name)})")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            bad(name, "a finite number")
    for names, ok, want in ((at_least_one, lambda v: v >= 1, ">= 1"), (at_least_zero, lambda v: v >= 0, ">= 0"),
                            (positive, lambda v: v > 0, "a finite number > 0"), (unit, lambda v: 0 <= v <= 1,
                                                                                  "between 0 and 1")):
        for name in names:
            if getattr(args, name) is not None and not ok(getattr(args, name)):
                bad(name, want)
    if not 0 <= getattr(args, "seed", 0) < 2 ** 32:
        bad("seed", "between 0 and 2^32 - 1")


def check_words(args, names):
    """Text flags given must hold words: an empty --prompt is a mistake, not a request for the default."""
    for name in names:
        if getattr(args, name) is not None and not getattr(args, name).strip():
            fail(f"--{name.replace('_', '-')} is empty: give the words, or leave the flag out for the default")


def check_clip_range(args):
    """--motion-start/--motion-end must leave frames to read."""
    if args.motion_end is not None and args.motion_end <= args.motion_start:
        fail(f"--motion-end {args.motion_end} must be after --motion-start {args.motion_start}")


def check_cogvideox_video(args):
    """--frames, --height, --width as CogVideoX's VAE takes them: 4k+1 frames, sizes in multiples of 16 (8x VAE,
    2x2 patches)."""
    if (args.frames - 1) % 4 or args.frames < 1:
        fail(f"--frames {args.frames}: CogVideoX needs 4k+1 frames (49, 9...)")
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        fail(f"--height {args.height} --width {args.width}: use multiples of 16")


RUN_FILES = ("config.json", "ckpt.pt", "metrics.json", "log.jsonl")
RESULT_FILES = ("result", "result.mp4", "result_grid.mp4", "metrics.json")


def check_out(out, resume=False, sample_only=False, overwrite=False):
    """--out must be a folder (or not exist); a folder holding an earlier run is only reused on purpose:
    --resume continues it, --sample-only samples from it, --overwrite replaces it (as the Hugging Face trainers)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder: choose another --out")
    held = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []
    if held and not (resume or sample_only or overwrite):
        fail(f"--out {out} holds an earlier run ({', '.join(held)}): add --resume to continue it, --sample-only to "
             f"sample from it, --overwrite to replace it, or choose another --out")


def clear_run(out, weights):
    """--overwrite: the earlier run's files go before the new run writes any, so a crash leaves a resumable new run
    (its ckpt.pt), never old weights beside a new config. Only the files a run writes are removed."""
    out = Path(out)
    for name in (*RUN_FILES, *RESULT_FILES, "samples", *weights):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)


def check_pretrained(name, flag, filename="model_index.json"):
    """A hub id or folder must be loadable offline: a local folder, or already in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    if Path(name).is_dir():
        if not (Path(name) / filename).is_file():
            fail(f"{flag} {name} holds no {filename}: point it at the model's folder (as save_pretrained writes it)")
        return
    try:
        cached = isinstance(try_to_load_from_cache(name, filename), str)
    except Exception:  # not even a valid hub id
        cached = False
    if not cached:
        fail(f"{flag} {name!r} is neither a local folder nor in the hub cache (nothing is downloaded here)")


# -----------------------------------------------------------------------------
# images and videos: tensors (3, H, W) / (F, 3, H, W) in [-1, 1]


def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)


def read_text(path, default):
    """A words file (prompt.txt, a caption) or the default when there is none; an empty file is an error."""
    if not Path(path).is_file():
        return default
    text = Path(path).read_text().strip()
    if not text:
        fail(f"{path} is empty: write the words in it, or delete it for the default")
    return text


def read_rgb(path):
    """Any common image file -> uint8 (H, W, 3): 16-bit images are scaled to 8 bits (not clipped), grey is repeated,
    alpha and palettes are resolved by PIL."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" for a 16-bit PNG): PIL's convert("RGB") clips
            a = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
            return np.repeat(a[..., None], 3, axis=-1)
        return np.array(im.convert("RGB"))


def to_tensor(image):
    """One uint8 image (H, W[, C]) -> float (3, H, W) in [-1, 1]; grey is repeated, alpha is dropped."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1
    x = x[..., None] if x.ndim == 2 else x
    return x.movedim(-1, 0)[:3].expand(3, -1, -1)


def to_uint8(x):
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).numpy()


def resize_crop(x, size):
    """Resize the shorter side to fit, then centre crop to size = (H, W) (torchvision)."""
    h, w = size
    scale = max(h / x.shape[-2], w / x.shape[-1])
    new = (max(h, round(x.shape[-2] * scale)), max(w, round(x.shape[-1] * scale)))
    if tuple(x.shape[-2:]) != new:
        x = TF.resize(x, list(new), antialias=True)
    return TF.center_crop(x, [h, w])


def read_image(path, size=None):
    try:
        x = to_tensor(read_rgb(path))
    except Exception as e:
        fail(f"cannot read image {path}: {first_line(e)}")
    return resize_crop(x, size) if size else x


def read_video(path, num_frames, size=None, start=0, end=None, stride=None):
    """Read `num_frames` frames of a video file or PNG-frame folder, spread uniformly over [start, end) (or every
    `stride`-th frame from start), resized/cropped to size. Too short a clip is a clear error."""
    path = Path(path)
    try:
        frames = [read_rgb(p) for p in list_images(path)] if path.is_dir() else list(iio.imiter(path))
    except Exception as e:
        fail(f"cannot read video {path}: {first_line(e)}")
    end = len(frames) if end is None else min(end, len(frames))
    if stride:
        idx = list(range(start, end, stride))[:num_frames]
    else:
        idx = np.linspace(start, end - 1, num_frames).round().astype(int).tolist() if end - start >= num_frames \
            else []
    if len(idx) < num_frames:
        fail(f"{path} has {len(frames)} frames, {num_frames} are needed (from frame {start}"
             f"{f', stride {stride}' if stride else ''}): use a longer clip or ask for fewer frames")
    x = torch.stack([to_tensor(frames[i]) for i in idx])
    return resize_crop(x, size) if size else x


def write_frames(folder, video):
    """Lossless: one PNG per frame. Use this for anything that is measured (mp4 at 32x32 is badly lossy)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(to_uint8(video)):
        iio.imwrite(folder / f"{i:03d}.png", frame)


def write_video(path, video, fps=8, upscale=1):
    """mp4 or gif, for looking at. `upscale` repeats pixels so that 32x32 toy clips are visible."""
    frames = to_uint8(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:  # yuv420p needs even sizes; quality 9 keeps small clips readable
        iio.imwrite(path, frames, fps=fps, codec="libx264", quality=9, macro_block_size=2)


def write_preview(out, step, video, fps, toy=False, stage=None):
    """A sample written during training (--sample-every): out/samples/step_000250.mp4 (a staged method's:
    subject_step_000250.mp4...), to watch a run learn."""
    name = f"{stage}_step_{step:06d}.mp4" if stage else f"step_{step:06d}.mp4"
    write_video(Path(out) / "samples" / name, video, fps, upscale=8 if toy else 1)


def side_by_side(videos):
    """Place clips (F_i, 3, H, W) left to right, resizing to the first one's height and padding short clips by
    holding their last frame (a still image is a one-frame clip)."""
    h, n = videos[0].shape[-2], max(v.shape[0] for v in videos)
    out = []
    for v in videos:
        if v.shape[-2] != h:
            v = TF.resize(v, [h, round(v.shape[-1] * h / v.shape[-2])], antialias=True)
        out.append(torch.cat([v, v[-1:].expand(n - v.shape[0], *v.shape[1:])]) if v.shape[0] < n else v)
    return torch.cat(out, dim=-1)


def write_result(out, videos, images, motion, prompt, fps, evaluate=None):
    """A method's result from videos (N, F, 3, H, W), N samples of one prompt: lossless frames and result.mp4 of the
    first, result_grid.mp4 (subject | motion | every sample) and, given the toy world's `evaluate`, metrics.json with
    the mean over the N samples (returned)."""
    metrics = None
    if evaluate is not None:
        each = [evaluate(v, list(images), motion) for v in videos]
        metrics = {k: sum(e[k] for e in each) / len(each) for k in each[0]}
    up = 8 if evaluate is not None else 1  # 32x32 toy clips are too small to look at
    write_result_files(out, videos[0], side_by_side([images[:1], motion, *videos]), fps, up, metrics)
    print(f"wrote {out / 'result.mp4'} and {out / 'result_grid.mp4'} ({prompt!r}, {len(videos)} sample(s))")
    if metrics:
        print(f"toy metrics (mean of {len(each)} samples): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return metrics


def write_result_files(out, video, grid, fps, upscale=1, metrics=None):
    """RESULT_FILES: result/ (lossless frames) and result.mp4 of video, result_grid.mp4 of grid, metrics.json if
    given. Everything is written beside first, then moved into place: a crash while writing leaves the earlier
    result whole."""
    tmp = Path(out) / ".result.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_frames(tmp / "result", video)
    write_video(tmp / "result.mp4", video, fps, upscale=upscale)
    write_video(tmp / "result_grid.mp4", grid, fps, upscale=upscale)
    if metrics is not None:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name in RESULT_FILES:
        if (tmp / name).exists():
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            os.replace(tmp / name, out / name)
    tmp.rmdir()


# -----------------------------------------------------------------------------
# prompts: encoded once per run, so the text encoder can be freed before training


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, max_length, zero_pad=False, cache=None):
    """Embeddings (N, L, D) of the prompts, in order. zero_pad=True zeroes the padded positions (what WanPipeline
    does); CogVideoX and ZeroScope use the encoder's raw outputs at pad positions. `cache`: a dict reused across
    calls."""
    cache = {} if cache is None else cache
    todo = [p for p in dict.fromkeys(prompts) if p not in cache]
    if todo:
        tok = tokenizer(todo, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        dev = next(text_encoder.parameters()).device
        ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
        hidden = text_encoder(ids, attention_mask=mask if zero_pad else None).last_hidden_state
        if zero_pad:
            hidden = hidden * mask[..., None]
        cache.update({p: h for p, h in zip(todo, hidden)})
    return torch.stack([cache[p] for p in prompts])


# -----------------------------------------------------------------------------
# diffusion arithmetic for the three prediction types; t is per sample: sigma in [0, 1] for "flow",
# an integer timestep into alphas_cumprod for "v" and "eps"


def _bcast(a, x):
    return a.to(x.dtype).view(-1, *[1] * (x.ndim - 1))


def noisy_and_target(kind, x0, noise, t, alphas_cumprod=None):
    """Returns (x_t, target). flow: x_t = (1 - s) x0 + s eps, v = eps - x0 (Wan). v: x_t = sqrt(ab) x0 +
    sqrt(1 - ab) eps, v = sqrt(ab) eps - sqrt(1 - ab) x0 (CogVideoX). eps: same x_t, target eps (ZeroScope)."""
    if kind == "flow":
        s = _bcast(t, x0)
        return (1 - s) * x0 + s * noise, noise - x0
    ab = _bcast(alphas_cumprod.to(x0.device)[t], x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return x_t, (ab.sqrt() * noise - (1 - ab).sqrt() * x0 if kind == "v" else noise)


def predicted_x0(kind, x_t, out, t, alphas_cumprod=None):
    """The one-step estimate of the clean sample from a model output (flow: x0 = x_t - s v)."""
    if kind == "flow":
        return x_t - _bcast(t, x_t) * out
    ab = _bcast(alphas_cumprod.to(x_t.device)[t], x_t)
    if kind == "v":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out
    return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()


# -----------------------------------------------------------------------------
# peft LoRA: add, find, scale per layer and per step, save/load in diffusers format


def add_lora(model, name, rank, targets, alpha=None, dropout=0.0, **extra):
    """Add a peft LoRA named `name` (the base weights are frozen by add_adapter) with fp32 LoRA weights."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights=True, **extra)
    with warnings.catch_warnings():  # several named adapters on one model is what the methods want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(cfg, adapter_name=name)
    cast_training_params(model)  # the trainable parameters (this adapter's) to fp32, over frozen bf16 weights
    for _, layer in lora_layers(model):  # peft casts each LoRA input up to the fp32 weights and autograd keeps that
        # copy (~30 of SMRABooth's 88 GB by bench.py --estimate): compute in the activations' dtype instead, with the
        # fp32 weights cast at use (their gradients still arrive in fp32), as jointtuner's AdaptiveLoRA. Linears only:
        # a LoRA'd conv (dual_task_sdv's patch_embed.proj, on small latents) keeps peft's way
        if name in layer.lora_A and isinstance(layer.lora_A[name], torch.nn.Linear):
            layer.cast_input_dtype_enabled = False
            for linear in (layer.lora_A[name], layer.lora_B[name]):
                linear.forward = functools.partial(linear_in_input_dtype, linear)
    return [p for n, p in model.named_parameters() if f".{name}." in n]


def linear_in_input_dtype(linear, x):
    """nn.Linear's forward in x's dtype: its (fp32) weight and bias cast at use."""
    return F.linear(x, linear.weight.to(x.dtype), None if linear.bias is None else linear.bias.to(x.dtype))


def lora_layers(model):
    """(module name, peft LoraLayer) for every LoRA-wrapped layer."""
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def set_lora_scale(layers, name, scale, where=None):
    """Set adapter `name`'s scale on each layer (0.5 ms at real size, vs ~35 ms for set_adapters), or on the
    layers whose module name satisfies where(name) and 0 elsewhere when `where` is given."""
    for n, m in layers:
        if name in m.lora_A:
            m.set_scale(name, scale if where is None or where(n) else 0.0)


def save_lora(pipeline_cls, model, name, path):
    """The LoRA `name` in diffusers' format (pipe.load_lora_weights(folder) loads it), written beside and moved into
    place: a crash never leaves half a file."""
    from peft.utils import get_peft_model_state_dict
    save_atomic(get_peft_model_state_dict(model, adapter_name=name), path, lambda sd, q: pipeline_cls.save_lora_weights(
        str(Path(q).parent), transformer_lora_layers=sd, weight_name=Path(q).name,
        transformer_lora_adapter_metadata=model.peft_config[name].to_dict()))  # its alpha, rank and targets


# -----------------------------------------------------------------------------
# checkpoints, NaN guard, logging


def save_atomic(obj, path, save=torch.save):
    """Write to a temporary file, then rename: an interrupted run never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save(obj, str(tmp))
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """The training state --resume continues from; called before any model loads, so a bad file costs nothing."""
    if not Path(path).is_file():
        fail(f"no checkpoint at {path}: run without --resume to start a new training")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read the checkpoint {path} ({first_line(e)}): it is damaged; train again with --overwrite")


def check_finite(loss, step):
    """Stop at the first non-finite loss with what to try, instead of training on garbage."""
    if not torch.isfinite(loss).all():
        fail(f"loss is {loss.item()} at step {step}; lower the learning rate, check the inputs, or use fp32 "
             f"(--dtype float32)")


class StepLog:
    """One line per interval on the tqdm bar's stream, and every logged step appended to log.jsonl. A new run
    (append=False) starts the file afresh, so a run in an old --out does not mix its log with the old run's."""

    def __init__(self, path, every=10, append=False):
        self.path, self.every, self.t0 = Path(path), every, time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.unlink(missing_ok=True)

    def __call__(self, step, bar=None, **values):
        """values: numbers, or lists of numbers (e.g. one per group of layers)."""
        values = {k: [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v) for k, v in values.items()}
        text = {k: " ".join(f"{x:.3g}" for x in v) if isinstance(v, list) else f"{v:.4g}" for k, v in values.items()}
        if bar is not None:
            bar.set_postfix(text)
        if step % self.every == 0:
            ms = (time.time() - self.t0) * 1000 / self.every
            self.t0 = time.time()
            line = f"step {step}: " + ", ".join(f"{k} {v}" for k, v in text.items()) + f", time {ms:.0f}ms"
            (bar.write if bar is not None else print)(line)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


# -----------------------------------------------------------------------------
# CogVideoX, as dualreal.py and dual_task_sdv.py use it: loading, latents in the (B, F', C, h, w) layout, the rotary
# embedding, the v-prediction loss and the sampler loop around each method's own transformer call


def load_cogvideox(model, sampler, dtype):
    """CogVideoX (transformer, VAE, T5 and its tokenizer, the DPM or DDIM sampler of the model's scheduler config)
    from a hub id or local folder (the toy world's are toyworld.cogvideox_parts)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXTransformer3DModel)
    from transformers import AutoTokenizer, T5EncoderModel
    sched = CogVideoXDPMScheduler if sampler == "dpm" else CogVideoXDDIMScheduler
    m = dict(transformer=CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype),
             vae=AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=dtype),
             tokenizer=AutoTokenizer.from_pretrained(model, subfolder="tokenizer"),
             text_encoder=T5EncoderModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype),
             scheduler=sched.from_pretrained(model, subfolder="scheduler"))  # its alphas_cumprod train too
    m["vae"].enable_slicing()
    m["vae"].enable_tiling()  # 49 frames at 480x720 in pieces: the same latents up to tile blending
    return m


def cogvideox_rotary(transformer, frames, height, width):
    """CogVideoX 1.0's 3D rotary embedding (cos, sin) for a latent grid of frames x height x width, built as
    CogVideoXPipeline builds it (the transformer expects it as an argument)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    cfg, p = transformer.config, transformer.config.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, grid_size=grid, temporal_size=frames,
                                   device=transformer.device)


@torch.no_grad()
def cogvideox_encode(vae, video):
    """(B, F, 3, H, W) in [-1, 1] -> latents (B, F', C, h, w) x scaling_factor (0.7; the toy VAE's own): the
    posterior mean (the diffusers example samples it once). One frame -> one latent frame."""
    z = vae.encode(video.transpose(1, 2).to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return z.float().transpose(1, 2)


@torch.no_grad()
def cogvideox_decode(vae, z):
    """(B, F', C, h, w) -> (B, F, 3, H, W), as CogVideoXPipeline.decode_latents."""
    return vae.decode((z.transpose(1, 2) / vae.config.scaling_factor).to(vae.dtype)).sample.float().transpose(1, 2)


def cogvideox_noise(transformer, vae, n, frames, height, width, seed):
    """The sampler's starting noise (n, F', C, h, w) from `seed`, shaped as the pipeline's prepare_latents: 49 frames
    -> 13 latent frames, 8x smaller frames (the toy VAE: 4x)."""
    t_lat = (frames - 1) // vae.config.temporal_compression_ratio + 1
    s = 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.randn(n, t_lat, transformer.config.in_channels, height // s, width // s,
                       generator=torch.Generator().manual_seed(seed))


def cogvideox_v_loss(predict, z0, text, alphas_cumprod, gen):
    """CogVideoX's v-prediction objective as diffusers' CogVideoX LoRA example: uniform timesteps; the one-step x0
    from the v that predict(z_t, t, text) returns, against x0, weighted by 1 / (1 - alpha_bar_t)."""
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=gen).to(z0.device)
    z_t, _ = noisy_and_target("v", z0, noise, t, alphas_cumprod)
    x0 = predicted_x0("v", z_t, predict(z_t, t, text), t, alphas_cumprod)
    weight = 1 / (1 - alphas_cumprod.to(z0.device)[t].float())
    return (weight * (x0 - z0).pow(2).flatten(1).mean(1)).mean()


@torch.no_grad()
def cogvideox_sample(predict, scheduler, text, uncond, latents, steps, cfg):
    """CogVideoXPipeline's loop on latents (B, F', C, h, w), v = predict(z, t, text): the unconditional and
    conditional passes run as one batch in the pipeline's order, then guidance and the scheduler's step."""
    from diffusers import CogVideoXDPMScheduler
    scheduler.set_timesteps(steps, device=latents.device)
    z, n, old_x0 = latents * scheduler.init_noise_sigma, latents.shape[0], None
    text = text.expand(n, -1, -1)
    cond = torch.cat([uncond.expand_as(text), text])
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        u, c = predict(scheduler.scale_model_input(torch.cat([z, z]), t), t.expand(2 * n), cond).chunk(2)
        v = u + cfg * (c - u)
        if isinstance(scheduler, CogVideoXDPMScheduler):  # DPM-solver++ keeps the previous x0 estimate
            z, old_x0 = scheduler.step(v, old_x0, t, timesteps[i - 1] if i > 0 else None, z, return_dict=False)
        else:
            z = scheduler.step(v, t, z, return_dict=False)[0]
    return z
