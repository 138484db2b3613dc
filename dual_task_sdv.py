"""Zero-shot subject-driven video by dual-task learning, on CogVideoX.

One model, trained once on many subjects, makes a video of any new subject from ONE reference image, with no
per-subject tuning. The reference image is VAE-encoded to one latent frame, patch-embedded by the transformer's own
patch_embed.proj and joined to the sequence as clean condition tokens between the text and the video tokens
(OminiControl-style). A LoRA on the frozen CogVideoX T5-to-video transformer learns to use them by alternating two
tasks: with probability p an I2V "motion" step on an unpaired video (a random frame of the clip is the reference,
half its tokens dropped) keeps the model's motion; otherwise an identity step on a subject-image pair (the target is
a one-frame video) teaches identity transfer. Guidance is on the text only: both branches hold the reference.

    # a real run on 8 GPUs: the paper's 256 pairs / 32 videos a step by 4 passes of gradient accumulation
    torchrun --nproc_per_node 8 dual_task_sdv.py train --pairs PAIRS --videos VIDEOS --out out/dual_task_sdv --grad-ckpt
    python dual_task_sdv.py sample --ckpt out/dual_task_sdv --image ref.png --prompt "a <cls> toy car driving"
    # the toy world on a CPU in minutes: train on toy pairs + videos, then sample held-out (novel) sprites
    python dual_task_sdv.py --model toy
    python dual_task_sdv.py --model toy --p 0 --out out/dual_task_sdv_p0   # image-only (the paper: videos freeze)
    python dual_task_sdv.py --model toy --sample-only   # sample the held-out sprites again with the LoRA in --out
    # the shipped toy run (assets/toy_dual_task_sdv) on any picture of a toy sprite, with any toy prompt
    python dual_task_sdv.py sample --model toy --image assets/toy/subject/0.png --prompt "a <cls> moving left"

Training writes pytorch_lora_weights.safetensors (the diffusers LoRA format: CogVideoXPipeline's load_lora_weights
loads it) and cls_embedding.safetensors (the trained input row of <cls>) into --out; with --grad-every also
grad_log.jsonl (B.1), which `python evaluate.py --grad-cosine PNG LOG...` draws as the paper's Fig. 5.

The paper: Kim et al., "Subject-driven Video Generation via Disentangled Identity and Motion" (2025; CITATION.bib):
sections 3-5, supplement A (LoRA, optimiser, data), B (gradient analysis), D. The official code is inference-only;
where it decides (reference token positions and modulation, guidance on the text only) we follow it.
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common
import toyworld

# -----------------------------------------------------------------------------
# settings: paper values as defaults; --model toy applies TOY on top

# supplement A.1. Peft matches a target as the whole module name or a ".target" suffix, so "proj" also hits
# patch_embed.proj (the conv that embeds latents and the reference) and ff.net.0.proj (the FF's first linear, inside
# GELU), on purpose, as the official config does: the LoRA on patch_embed.proj lets the model embed clean reference
# latents apart from noisy ones. It misses proj_out and text_proj (the suffix must follow a dot): text_proj is listed.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "norm1.linear", "norm2.linear", "ff.net.2", "proj", "text_proj"]
ADAPTER, CLS = "dtsdv", "<cls>"  # the peft adapter's name; the new word written before the subject noun (sec. 3)
LORA_FILE, CLS_FILE = "pytorch_lora_weights.safetensors", "cls_embedding.safetensors"  # what training leaves


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv.pop(0) if argv and argv[0] in ("train", "sample") else None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data (train)
    p.add_argument("--pairs", help="folder with pairs.jsonl: one {ref, target, prompt} per line (paths relative)")
    p.add_argument("--videos", help="folder of video files, each captioned by a sidecar .txt or captions.jsonl")
    p.add_argument("--crop-jitter", type=float, default=0.1, help="crop each view from a (1 + this) x resize (A.2)")
    p.add_argument("--max-bad", type=float, default=0.05, help="stop if more than this fraction of records is bad")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes per rank reading the training files "
                                                         "ahead of the steps (0: in the training process)")
    p.add_argument("--height", type=int, default=480, help="training and sampling size (the paper: 480x720)")
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--frames", type=int, default=49, help="frames of the videos and of the result (4k+1)")
    # sample
    p.add_argument("--ckpt", help="sample mode: the --out folder of a training run (toy: assets/toy_dual_task_sdv)")
    p.add_argument("--image", help="sample mode: the reference image of the subject")
    p.add_argument("--prompt", help="sample mode: the prompt, with <cls> before the subject noun")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt of guidance")
    # models
    p.add_argument("--model", default="THUDM/CogVideoX-5b", help="hub id, local folder, or 'toy'")
    p.add_argument("--max-text-len", type=int, default=226, help="T5 tokens, as CogVideoXPipeline")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (supplement A.1)")
    p.add_argument("--lora-alpha", type=float, default=64)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--no-train-cls", action="store_true", help="keep the <cls> embedding row frozen")
    # dual-task optimisation
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--p", type=float, default=0.2, help="probability of a motion (I2V video) step")
    p.add_argument("--p-drop", type=float, default=0.5, help="TokenDrop: chance of dropping each reference token")
    p.add_argument("--no-random-frame", action="store_true", help="reference = frame 0 instead of a random frame")
    p.add_argument("--t2v", action="store_true", help="motion steps without reference tokens (plain T2V)")
    p.add_argument("--two-stage", action="store_true", help="first half identity steps only, then video steps only")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-cycles", type=int, default=1, help="hard restarts of the cosine schedule")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--pair-batch", type=int, default=256, help="pairs per identity step, all ranks (sec. 4)")
    p.add_argument("--video-batch", type=int, default=32, help="videos per motion step, all ranks (sec. 4)")
    p.add_argument("--pair-micro", type=int, default=8, help="pairs per forward pass and rank (the rest accumulates)")
    p.add_argument("--video-micro", type=int, default=1, help="videos per forward pass and rank (the rest accumulates)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (memory for speed)")
    p.add_argument("--grad-every", type=int, default=0, help="every K steps: cos(g_img, g_vid) (B.1); 0: off")
    p.add_argument("--pcgrad", type=int, default=0, choices=[0, 4, 8], help="buffered PCGrad's FIFO size (B.3); 0: off")
    # sampling
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the training clips and of the result (A.2: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="frozen weights' dtype")
    # run
    p.add_argument("--out", default="out/dual_task_sdv")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else it is kept)")
    p.add_argument("--sample-only", action="store_true", help="sample --ckpt = --out (toy: the held-out sprites)")
    p.add_argument("--num-samples", type=int, default=1, help="sample: videos from seeds seed, seed + 1, ...")
    p.add_argument("--dry-run", action="store_true", help="check inputs, print the plan, load nothing")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=250, help="write a sample (fixed seed) to --out/samples/ every "
                                                                 "this many steps (0: never)")
    p.add_argument("--toy-pairs", type=int, default=256, help="toy world: subject-image pairs made in memory")
    p.add_argument("--toy-videos", type=int, default=64, help="toy world: unpaired videos made in memory")
    p.add_argument("--ablate", action="store_true", help="toy world: p = 0 / 0.2 / 0.4 and the regulariser ablations")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the base model and the full method in --ablate")
    p.add_argument("--ablation-seeds", type=int, default=1, help="seeds for the other --ablate variants (0: none)")
    args = p.parse_args(argv)
    args.mode = "sample" if args.sample_only else mode or ("toy" if args.model == "toy" else "train")
    args.ckpt = args.ckpt or (args.out if args.sample_only else None)
    if args.model == "toy" and args.mode == "sample" and not args.ckpt:  # the shipped run of the full method,
        args.ckpt = str(toyworld.ASSETS / "toy_dual_task_sdv")  # sampled into its own folder, not the demo's run
        args.out = "out/dual_task_sdv_shipped" if args.out == p.get_default("out") else args.out
    if args.model == "toy":
        args.subject = args.motion = None  # apply_toy_preset fills the bundled subject/motion (unused here)
        toyworld.apply_preset(args, p, argv, TOY)
    return args


# toy world: 9 frames of 32x32 (8 x 9 x 8 x 8 latents: 64 tokens a frame), text MAX_TOKENS; a smaller LoRA for a
# 64-wide model (alpha/rank = 0.5 as the paper's), a larger lr, a short warm-up. Steps: see the README timing.
TOY = dict(height=32, width=32, frames=9, fps=4, max_text_len=16, steps=20, cfg=4.0, sampler="ddim", rank=16,
           lora_alpha=8, lora_dropout=0.0, iterations=2000, lr=1e-3, warmup=20, pair_batch=4, video_batch=2,
           pair_micro=4, video_micro=2, save_every=200, log_every=50)


def check_args(args):
    """Every flag in range and every text non-empty, before anything loads (--iterations 0: the untrained base)."""
    common.check_numbers(
        args, positive=["lr", "lora_alpha", "grad_clip"], unit=["p", "p_drop", "lora_dropout", "max_bad"],
        at_least_zero=["iterations", "warmup", "grad_every", "sample_every", "weight_decay", "cfg", "crop_jitter",
                       "ablation_seeds", "workers"],
        at_least_one=["rank", "max_text_len", "pair_batch", "video_batch", "pair_micro", "video_micro", "steps",
                      "num_samples", "fps", "log_every", "save_every", "toy_pairs", "toy_videos", "seeds", "lr_cycles"])
    common.check_cogvideox_video(args)
    common.check_words(args, ["prompt"])
    if args.mode == "sample":  # --image with --prompt, or (the toy world's held-out sprites) neither
        if not args.ckpt or bool(args.image) != bool(args.prompt) or not args.image and args.model != "toy":
            common.fail("sample: --ckpt RUN (a training's --out), --image REF and --prompt are needed")
        if args.prompt and CLS not in args.prompt:  # sec. 3: <cls> stands before the subject noun, as in training
            common.fail(f"--prompt {args.prompt!r} has no {CLS}: write it before the subject noun ('a {CLS} toy car')")
    if args.mode == "train" and (not args.pairs or not args.videos):
        common.fail("train: --pairs DIR and --videos DIR are needed (or --model toy)")


# -----------------------------------------------------------------------------
# setup: one process per GPU under torchrun (nanoGPT style), or one plain process


def ddp_setup(device):
    """(rank, world, device). Under torchrun this process's GPU is cuda:LOCAL_RANK, chosen before any model loads
    (else every rank's weights land on GPU 0), and torch.distributed starts (NCCL on GPUs, gloo on CPUs)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def micro_batches(batch, micro, world, flag):
    """(micro-batch, passes) with micro-batch x passes x world = batch: sec. 4's 256 / 32 on any number of GPUs."""
    micro = min(micro, max(batch // world, 1))
    if batch % (micro * world):
        common.fail(f"--{flag}-batch {batch} is not a multiple of {micro} (--{flag}-micro) x {world} processes")
    return micro, batch // (micro * world)


# -----------------------------------------------------------------------------
# data: real folders (records checked before anything loads, files read lazily) and the toy world (in memory)


def skip(what, reason, bad, total, max_bad):
    """A bad record is skipped with one warning line; more than --max-bad of `total` ends the run."""
    print(f"warning: skipping {what}: {reason}", file=sys.stderr)
    bad.append(what)
    if len(bad) > max_bad * total:
        common.fail(f"{len(bad)} of {total} records are bad (more than --max-bad {max_bad:g}); fix the data")


def read_pairs(folder, max_bad):
    """[(ref path, target path, prompt, composite)] from FOLDER/pairs.jsonl: {"ref", "target", "prompt"} per line,
    or {"image", "prompt"} for a side-by-side composite (Subject200K; composite True). A pair whose ref and target are
    one file is a self-pair, not a composite."""
    folder, good, bad = Path(folder), [], []
    if not (folder / "pairs.jsonl").is_file():
        common.fail(f"--pairs {folder} has no pairs.jsonl (one {{\"ref\", \"target\", \"prompt\"}} per line)")
    lines = [line for line in (folder / "pairs.jsonl").read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            r = dict(r, ref=r["image"], target=r["image"]) if "image" in r else r  # composite: left ref, right target
            pair = (folder / r["ref"], folder / r["target"], str(r["prompt"]).strip(), "image" in r)
            why = next((f"missing file {q}" for q in pair[:2] if not q.is_file()), "" if pair[2] else "empty prompt")
        except (ValueError, KeyError, TypeError) as e:
            why = f"not a {{ref, target, prompt}} record ({e})"
        if why:
            skip(f"pairs.jsonl line {i}", why, bad, len(lines), max_bad)
        else:
            good.append(pair)
    return good  # none: task_pools stops the run


def read_videos(folder, max_bad):
    """[(video path, caption)]: video files of FOLDER, each captioned by a sidecar .txt or, failing that, by a
    {"video": file name, "caption": text} line of FOLDER/captions.jsonl."""
    folder, good, bad = Path(folder), [], []
    if not folder.is_dir():
        common.fail(f"--videos {folder} is not a folder of videos with captions (.txt sidecars or captions.jsonl)")
    index, captions = {}, folder / "captions.jsonl"
    for line in captions.read_text().splitlines() if captions.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a broken line leaves its video uncaptioned,
            r = json.loads(line)                                    # which is then skipped below
            index[str(r["video"])] = str(r["caption"]).strip()
    files = sorted(q for q in folder.iterdir() if q.suffix.lower() in common.VIDEO_EXTS)
    for q in files:
        cap = q.with_suffix(".txt")
        text = cap.read_text().strip() if cap.is_file() else index.get(q.name, "")
        if text:
            good.append((q, text))
        else:
            skip(str(q), "no caption (a non-empty sidecar .txt or a captions.jsonl line)", bad, len(files), max_bad)
    return good


def jitter_crop(image, size, jitter, gen):
    """Per-view random-crop jitter of the identity stream (supplement A.2; the amount is not given): resize to
    (1 + jitter) x size, then crop `size` at a random offset, so reference and target are never one framing."""
    if jitter <= 0:
        return common.resize_crop(image, size)
    big = common.resize_crop(image, (round(size[0] * (1 + jitter)), round(size[1] * (1 + jitter))))
    dy, dx = (int(torch.randint(b - s + 1, (1,), generator=gen)) for b, s in zip(big.shape[-2:], size))
    return big[..., dy:dy + size[0], dx:dx + size[1]]


def read_clip(path, frames, fps, size):
    """The first `frames` frames of a video at `fps` (A.2: decoded at the source rate, sub-sampled to 8 fps), not
    spread over the whole clip, which would train a faster motion on longer clips. Too short a clip is an error.
    Decoding stops at the last frame kept, only the kept frames are held, and they are resized as uint8 before they
    become floats: the whole clip at full size in fp32 was GBs of host memory per clip at 1080p."""
    meta = iio.immeta(path)
    source_fps = meta.get("fps") or 1000 / meta["duration"]  # ffmpeg gives the rate; a GIF, ms per frame
    span = round((frames - 1) * source_fps / fps) + 1        # source frames covering frames / fps seconds
    keep = torch.linspace(0, span - 1, frames).round().long().tolist()
    held, n = {}, 0
    try:
        for n, frame in enumerate(iio.imiter(path), 1):
            if n - 1 in keep:
                held[n - 1] = torch.from_numpy(frame.copy())
            if n == span:
                break
    except Exception as e:
        common.fail(f"cannot read video {path}: {common.first_line(e)}")
    if n < span:
        common.fail(f"{path} has {n} frames, {span} are needed ({frames} at {fps} fps): use a longer clip")
    x = torch.stack([held[i] for i in keep])  # uint8 (F, H, W, C), a kept frame repeated where fps is above the clip's
    x = (x[..., None] if x.ndim == 3 else x).movedim(-1, 1)[:, :3].expand(-1, 3, -1, -1)  # grey repeated, alpha dropped
    return common.resize_crop(x, size).float() / 127.5 - 1


class BadRecord(Exception):
    """A record whose file fails to decode during training: train's draw drops it from the rank's pool."""

    def __init__(self, index, what):
        super().__init__(what)
        self.index = index


class FolderData(torch.utils.data.Dataset):
    """Real data: the records are checked up front (cheap: no file is decoded, a corpus is large); the files are
    read during training by a DataLoader's workers (train_loader), an item (kind, record, seed) at a time. One that
    fails to decode then is dropped and another drawn (take, draw)."""

    def __init__(self, args):
        self.pairs, self.videos = read_pairs(args.pairs, args.max_bad), read_videos(args.videos, args.max_bad)
        self.args = args
        lacking = next((prompt for _, _, prompt, _ in self.pairs if CLS not in prompt), None)
        if lacking is not None and not args.no_train_cls:  # sec. 3: <cls> is prepended to the subject noun
            common.fail(f"pair prompt {lacking!r} has no {CLS}, so its embedding would learn nothing from it; write "
                        f"it before the subject noun ('an {CLS} armchair in the living room') or use --no-train-cls")

    def __getitem__(self, item):
        """(kind, record index, seed) -> a pair (ref, target, prompt), its crop jitter drawn from seed, or a clip
        (clip, caption); ("bad", index, why) where the file fails to decode (a worker returns it; take drops it)."""
        kind, i, seed = item
        rows, a = (self.pairs if kind == "image" else self.videos), self.args
        try:
            if kind == "image":
                return self._pair(rows[i], torch.Generator().manual_seed(seed))
            return read_clip(rows[i][0], a.frames, a.fps, (a.height, a.width)), rows[i][1]
        except Exception as e:  # common's readers raise InputError on a bad file: here it drops the record
            return "bad", i, f"{rows[i][0]}: unreadable ({common.first_line(e)})"

    def _pair(self, r, gen):
        size, jitter = (self.args.height, self.args.width), self.args.crop_jitter
        if r[3]:  # composite: the left half is the reference, the right half the target
            both = common.read_image(r[0])
            ref, target = both[..., :both.shape[-1] // 2 * 2].chunk(2, dim=-1)
        else:
            ref, target = common.read_image(r[0]), common.read_image(r[1])
        return jitter_crop(ref, size, jitter, gen), jitter_crop(target, size, jitter, gen), r[2]

    def batch(self, kind, idx, gen):
        """The records idx read here, at once (B.1's probe, the preview's pair, a bad sample's replacement): a batch
        as the step takes it; BadRecord for a file that fails to decode."""
        seeds = torch.randint(2 ** 31, (len(idx),), generator=gen).tolist()
        samples = [self[kind, i, seed] for i, seed in zip(idx.tolist(), seeds)]
        bad = next((s for s in samples if isinstance(s[0], str)), None)
        if bad:
            raise BadRecord(bad[1], bad[2])
        return collate(samples)

    def pair_batch(self, idx, gen):
        return self.batch("image", idx, gen)

    def video_batch(self, idx, gen):
        return self.batch("video", idx, gen)


def collate(samples):
    """Pairs (ref, target, prompt) or clips (clip, caption) -> the batch the step takes: the tensors stacked, the
    texts listed."""
    *tensors, texts = zip(*samples)
    return (*[torch.stack(t) for t in tensors], list(texts))


# -----------------------------------------------------------------------------
# backbone and adapters: CogVideoX, <cls>, the LoRA, and the transformer's forward with reference tokens


def load_models(args, device, dtype):
    """CogVideoX's parts (or the toy world's) with <cls> added to T5, and m["cls"]: its input row, an fp32 parameter."""
    m = common.load_cogvideox(args.model, args.sampler, dtype) if args.model != "toy" else toyworld.cogvideox_parts()
    cid = add_cls_token(m["tokenizer"], m["text_encoder"])
    cfg = m["transformer"].config
    if not cfg.use_rotary_positional_embeddings or cfg.patch_size_t is not None:
        common.fail(f"--model {args.model}: reference tokens need CogVideoX 1.0 with rotary embeddings (the 5B)")
    for k in ("transformer", "vae", "text_encoder"):  # the toy parts load in fp32
        m[k] = m[k].to(device, dtype).eval().requires_grad_(False)
    # <cls>'s row trains as its own fp32 vector, as textual inversion's new word: in T5's bf16 matrix AdamW steps of
    # lr 5e-5 round away, and every flat gradient (PCGrad, the analysis) would hold the vocabulary x D matrix
    row = m["text_encoder"].get_input_embeddings().weight[cid]
    m["cls"] = torch.nn.Parameter(row.detach().float().clone(), requires_grad=False)
    return m


def add_cls_token(tokenizer, text_encoder):
    """Add <cls> to the tokenizer (the toy one knows it) -> its id. T5's matrix has more rows than its tokenizer
    has tokens (32128 vs 32100): resizing to len(tokenizer) would shrink it, so it only ever grows."""
    if CLS not in tokenizer.get_vocab():
        tokenizer.add_tokens([CLS])
    if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(CLS)


def add_lora(transformer, args):
    """The LoRA of supplement A.1 (B = 0 at start: the model is exactly the base model)."""
    return common.add_lora(transformer, ADAPTER, args.rank, LORA_TARGETS, args.lora_alpha, args.lora_dropout)


def text_embeds(m, prompts, max_len):
    """T5 embeddings (B, L, D) of prompts, with m["cls"] as the input embedding of every <cls> (differentiable in
    it when it is trained). CogVideoX uses the raw outputs at pad positions."""
    tokenizer, enc = m["tokenizer"], m["text_encoder"]
    ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt").input_ids.to(enc.device)
    x = enc.get_input_embeddings()(ids)
    x = torch.where(ids[..., None] == tokenizer.convert_tokens_to_ids(CLS), m["cls"].to(x.dtype), x)
    return enc(inputs_embeds=x).last_hidden_state.float()


def ref_tokens(transformer, ref):
    """Reference latent (B, 1, C, h, w) -> tokens (B, h/p * w/p, D) by the transformer's own patch_embed.proj (the
    video tokens are made by the same conv). CogVideoX 1.0 (rotary, no absolute positions) only."""
    x = transformer.patch_embed.proj(ref[:, 0].to(transformer.dtype))  # (B, D, h/p, w/p)
    return x.flatten(2).transpose(1, 2)


def rope(x, cos, sin):
    """CogVideoX's rotary embedding (interleaved pairs, as diffusers' apply_rotary_emb with use_real) on x
    (B, H, S, Dh); cos/sin (S, Dh) shared or (B, S, Dh) per sample (token dropping keeps different positions)."""
    cos, sin = (c[None, None] if c.ndim == 2 else c[:, None] for c in (cos, sin))
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(attn, x, n_text, rotary):
    """The block's attention (its to_q/k/v, norm_q/k, to_out: LoRA included) over the whole sequence x; rotary on
    every token after the first n_text. What CogVideoXAttnProcessor2_0 computes, but with per-sample positions."""
    b, s, _ = x.shape
    q, k, v = (m(x).view(b, s, attn.heads, -1).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    q, k = (torch.cat([a[:, :, :n_text], rope(a[:, :, n_text:], *rotary)], 2) for a in (q, k))  # text: no rotary
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
    return attn.to_out[1](attn.to_out[0](o))


def block_forward(block, txt, ref, vid, emb, emb0, rotary):
    """CogVideoXBlock.forward with a third token group, ref, modulated by the block's own norm1/norm2 (adaLN-zero) at
    t = 0's embedding (clean condition tokens, OminiControl-style; no new weights); [text, ref, video] attend as one."""
    n_txt, n_ref = txt.shape[1], ref.shape[1]
    nv, nt, gv, gt = block.norm1(vid, txt, emb)
    nr, _, gr, _ = block.norm1(ref, ref, emb0)  # the "video" half of norm1's modulation, at t = 0
    a = attention(block.attn1, torch.cat([nt, nr, nv], 1), n_txt, rotary)
    txt, ref, vid = txt + gt * a[:, :n_txt], ref + gr * a[:, n_txt:n_txt + n_ref], vid + gv * a[:, n_txt + n_ref:]
    nv, nt, gv, gt = block.norm2(vid, txt, emb)
    nr, _, gr, _ = block.norm2(ref, ref, emb0)
    f = block.ff(torch.cat([nt, nr, nv], 1))
    return txt + gt * f[:, :n_txt], ref + gr * f[:, n_txt:n_txt + n_ref], vid + gv * f[:, n_txt + n_ref:]


def reference_rotary(transformer, frames, h, w, n_ref, keep=None):
    """(cos, sin) for [ref, video] on a (frames + 1)-frame grid: the reference on frame 0, the video on 1..frames;
    keep (B, k) gathers each sample's kept reference positions -> (B, S, Dh). n_ref = 0: the base model's grid."""
    if n_ref == 0 and keep is None:
        return common.cogvideox_rotary(transformer, frames, h, w)
    cos, sin = common.cogvideox_rotary(transformer, frames + 1, h, w)
    if keep is None:
        return cos, sin
    per_frame = (h // transformer.config.patch_size) * (w // transformer.config.patch_size)
    pick = lambda c: torch.cat([c[keep], c[None, per_frame:].expand(keep.shape[0], -1, -1)], 1)
    return pick(cos), pick(sin)


def forward_with_reference(transformer, z, text, t, ref=None, keep=None):
    """v-prediction (B, F, C, h, w) for noisy latents z, text embeddings (B, L, D), timesteps t (B,) and the reference
    latent ref (B, 1, C, h, w) (None: exactly the base model); keep (B, k): the tokens TokenDrop keeps (None: all)."""
    tr, (b, f, c, h, w), dt, p = transformer, z.shape, transformer.dtype, transformer.config.patch_size
    time = lambda tt: tr.time_embedding(tr.time_proj(tt).to(dt), None)
    emb, emb0 = time(t), time(torch.zeros_like(t))  # emb0: the reference tokens' modulation, at t = 0
    seq = tr.embedding_dropout(tr.patch_embed(text.to(dt), z.to(dt)))  # text_proj + proj, as the base model
    txt, vid = seq[:, :text.shape[1]], seq[:, text.shape[1]:]
    r = vid[:, :0] if ref is None else ref_tokens(tr, ref)
    if keep is not None:
        r = torch.gather(r, 1, keep[..., None].expand(-1, -1, r.shape[-1]))
    rotary = reference_rotary(tr, f, h, w, r.shape[1], keep)
    for block in tr.transformer_blocks:
        if torch.is_grad_enabled() and tr.gradient_checkpointing:
            txt, r, vid = torch.utils.checkpoint.checkpoint(block_forward, block, txt, r, vid, emb, emb0, rotary,
                                                            use_reentrant=False)
        else:
            txt, r, vid = block_forward(block, txt, r, vid, emb, emb0, rotary)
    x = tr.proj_out(tr.norm_out(tr.norm_final(vid), temb=emb))  # then unpatchify, as the base model
    return x.reshape(b, f, h // p, w // p, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4).float()


def save_lora(tr, m, args, out):
    """The LoRA as diffusers saves it (its LoraConfig in the metadata: CogVideoXPipeline.load_lora_weights(out)
    rebuilds rank, alpha, targets), and the <cls> row, {"<cls>": (D,) fp32}, in its own file as textual inversion
    keeps a new word (CogVideoX's pipeline has no textual-inversion loader: set the row yourself, as load_lora does)."""
    from diffusers import CogVideoXPipeline
    from safetensors.torch import save_file
    meta = dict(method="dual_task_sdv", model=args.model, iterations=str(args.iterations), p=str(args.p))
    common.save_atomic({CLS: m["cls"].detach().float().cpu().contiguous()}, out / CLS_FILE,
                       lambda sd, q: save_file(sd, q, metadata=meta))
    common.save_lora(CogVideoXPipeline, tr, ADAPTER, out / LORA_FILE)


def read_cls(folder, model):
    """The trained <cls> row of a run's folder; both files opened (and the model compared) before anything loads."""
    from safetensors import safe_open
    folder = Path(folder)
    if not all((folder / name).is_file() for name in (LORA_FILE, CLS_FILE)):
        common.fail(f"--ckpt {folder} holds no {LORA_FILE} and {CLS_FILE}; train first (its --out is the --ckpt)")
    try:
        with safe_open(str(folder / LORA_FILE), "pt"), safe_open(str(folder / CLS_FILE), "pt") as g:  # both open
            meta, row = g.metadata() or {}, g.get_tensor(CLS)
    except Exception as e:
        common.fail(f"cannot read the trained weights in {folder} ({common.first_line(e)}): train again")
    if meta.get("model") != model:
        common.fail(f"--ckpt {folder} was trained on --model {meta.get('model')}, not {model}: sample with that one")
    return row


def load_lora(m, folder, row):
    """What pipe.load_lora_weights(folder) does to the transformer (load_lora_adapter), and the <cls> row."""
    m["transformer"].load_lora_adapter(str(folder), weight_name=LORA_FILE, adapter_name=ADAPTER)
    m["transformer"].eval()  # the adapter's new dropout layers start in training mode
    m["cls"].data.copy_(row)


# -----------------------------------------------------------------------------
# the method's losses: task draw, RandomFrameSelect, TokenDrop, the dual-task v-loss, buffered PCGrad


def video_steps(seed, p, iterations, two_stage=False):
    """Algorithm 1's task draw for all steps at once: u ~ U(0, 1) < p -> a video (motion) step, else an identity step;
    one seed on every rank: the same task on all ranks (--resume needs no state). --two-stage: identity steps first."""
    if two_stage:
        return torch.arange(iterations) >= iterations // 2
    return torch.rand(iterations, generator=torch.Generator().manual_seed(seed)) < p


def token_keep(n_tokens, batch, p_drop, gen):
    """TokenDrop: the kept count k ~ Binomial(n, 1 - p_drop) drawn once per batch (no padding), the kept positions
    per sample (sorted) -> (B, k) indices."""
    if p_drop <= 0:
        return None
    k = int(torch.binomial(torch.tensor(float(n_tokens)), torch.tensor(1.0 - p_drop), generator=gen))
    return torch.stack([torch.randperm(n_tokens, generator=gen)[:k].sort().values for _ in range(batch)])


def reference_frames(clips, random_frame, gen):
    """RandomFrameSelect: one frame per clip (B, 3, H, W), uniform over the clip, or frame 0."""
    b, f = clips.shape[:2]
    idx = torch.randint(f, (b,), generator=gen) if random_frame else torch.zeros(b, dtype=torch.long)
    return clips[torch.arange(b), idx]


def trainable(m, args):
    """The LoRA's parameters, then the <cls> row (unless --no-train-cls): the fixed order of every flat gradient."""
    m["cls"].requires_grad_(not args.no_train_cls)
    lora = [p for n, p in m["transformer"].named_parameters() if f".{ADAPTER}." in n]
    return lora + ([m["cls"]] if not args.no_train_cls else [])


class DualTaskStep(torch.nn.Module):
    """The loss of one task on one micro-batch, as a module for DDP to wrap: it holds the trainable parameters (the
    transformer's LoRA, the <cls> row); VAE and T5 stay in the plain dict m, outside it (frozen, nothing to sync)."""

    def __init__(self, m, args):
        super().__init__()
        self.transformer, self.cls, self.m, self.args = m["transformer"], m["cls"], m, args

    def forward(self, kind, batch, gen):
        tr, args, dev = self.transformer, self.args, self.cls.device
        latents = lambda x: common.cogvideox_encode(self.m["vae"], x.to(dev))
        ref = keep = None
        if kind == "video":  # the motion step: I2V on the clip (--t2v: plain T2V, no reference tokens)
            clips, prompts = batch
            z0 = latents(clips)
            if not args.t2v:  # RandomFrameSelect, then TokenDrop on the reference's tokens
                ref = latents(reference_frames(clips, not args.no_random_frame, gen)[:, None])
                n_ref = ref.shape[-2] * ref.shape[-1] // tr.config.patch_size ** 2
                keep = token_keep(n_ref, len(clips), args.p_drop, gen)
                keep = keep.to(dev) if keep is not None else None
        else:  # the identity step: the target image is a one-frame video (on a 2-frame rotary grid)
            refs, targets, prompts = batch
            z0, ref = latents(targets[:, None]), latents(refs[:, None])
        # CogVideoX's v-prediction loss (common.cogvideox_v_loss) through the forward with the reference tokens
        predict = lambda z_t, t, txt: forward_with_reference(tr, z_t, txt, t, ref, keep)
        text = text_embeds(self.m, prompts, args.max_text_len)
        return common.cogvideox_v_loss(predict, z0, text, self.m["scheduler"].alphas_cumprod, gen)


def pcgrad_project(g, other, eps=1e-12):
    """Supplement B.3: g - 1[<g, o> < 0] <g, o> / (||o||^2 + eps) o, i.e. remove the component of g that conflicts
    with the other task's gradient o (nothing changes when they do not conflict)."""
    dot = torch.dot(g, other)
    return g - dot / (other.dot(other) + eps) * other if dot < 0 else g


class PCGradBuffer:
    """Buffered PCGrad (B.3): a FIFO of the last `size` (domain, gradient) pairs; the step's gradient is projected
    (B.3's formula) against the latest gradient of the OTHER domain in it, and not at all until both domains are in.
    The update is the projected gradient of the step's own task (one task per step, as the stochastic schedule), not
    B.3's (1-p) g_img + p g_vid mixture of buffered gradients (C.5 writes it differently again): stale gradients."""

    def __init__(self, size):
        self.size, self.items = size, []

    def __call__(self, kind, g):
        other = next((h for k, h in reversed(self.items) if k != kind), None)
        self.items = (self.items + [(kind, g.detach().clone())])[-self.size:]
        return g if other is None else pcgrad_project(g, other)


# -----------------------------------------------------------------------------
# sampling: CogVideoX's sampler, guidance on the text only


def sample(tr, scheduler, text, uncond, ref, latents, steps, cfg):
    """Denoise latents (1, F', C, h, w) (common.cogvideox_sample) with guidance on the text only: both branches see
    the reference tokens of ref (1, 1, C, h, w)."""
    predict = lambda z, t, txt: forward_with_reference(tr, z, txt, t, torch.cat([ref, ref]))  # one per branch
    return common.cogvideox_sample(predict, scheduler, text, uncond, latents, steps, cfg)


@torch.no_grad()
def generate(m, image, prompt, args, seed):
    """One video (F, 3, H, W) of the subject in `image` (3, H, W) following `prompt`."""
    tr, vae, dev = m["transformer"], m["vae"], m["cls"].device
    text, uncond = (text_embeds(m, [x], args.max_text_len) for x in (prompt, args.negative_prompt))
    ref = common.cogvideox_encode(vae, image[None, None].to(dev))
    noise = common.cogvideox_noise(tr, vae, 1, args.frames, args.height, args.width, seed)
    z = sample(tr, m["scheduler"], text, uncond, ref, noise.to(dev), args.steps, args.cfg)
    return common.cogvideox_decode(vae, z)[0].cpu().clamp(-1, 1)


def toy_eval(m, args, out):
    """The held-out toy sprites (toyworld.heldout_eval), each sampled from one reference image, into --out."""
    metrics, video, grid = toyworld.heldout_eval(lambda ref, p, seed: generate(m, ref, p, args, seed), args.seed)
    common.write_result_files(out, video, grid, args.fps, 8, metrics)
    return metrics


def write_preview(m, args, data, pools, out, rank, step):
    """--sample-every's sample. Every rank makes it (the same video from the same weights) and rank 0 writes it: a
    sample on rank 0 alone would hold the other ranks in the next step's all-reduce for all of it, which a long one
    keeps past NCCL's timeout."""
    video = generate(m, *preview_ref(args, data, pools), args, args.seed)
    if rank == 0:
        common.write_preview(out, step, video, args.fps, toy=args.mode == "toy")


def preview_ref(args, data, pools):
    """The (image, prompt) that --sample-every samples: toy, toy_eval's first held-out sprite; real, one fixed pair."""
    if args.mode != "toy":  # the first pair of B.1's validation split (--grad-every), else of training; a fixed crop
        first = torch.cat(pools["image"][::-1])[:1]  # pools: {kind: (training indices, validation indices)}
        refs, _, prompts = data.pair_batch(first, torch.Generator().manual_seed(args.seed))
        return refs[0], prompts[0]
    return toyworld.heldout_case(0)


# -----------------------------------------------------------------------------
# training loop: Algorithm 1 under DDP, with supplement B's gradient analysis and buffered PCGrad


def flat_grad(params):
    """The gradients of params concatenated in a fixed order (zeros where None), fp32."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])


def grad_probe(model, params, probe, args):
    """cos(g_img, g_vid), ||g_img||, ||g_vid|| on the fixed validation batches and noise (gradients cleared after).
    One backward per task: under DDP it all-reduces to the ranks' mean, as B.1's pre-sync sum over ranks / world."""
    g = {}
    for kind, batch in probe.items():
        model.zero_grad()
        model(kind, batch, torch.Generator().manual_seed(args.seed + 777)).backward()
        g[kind] = flat_grad(params)
    model.zero_grad()
    return dict(cos=float(F.cosine_similarity(g["image"], g["video"], dim=0)), norm_img=float(g["image"].norm()),
                norm_vid=float(g["video"].norm()))


def task_pools(data, batches, world, args):
    """{kind: (training indices, validation indices)}. With --grad-every, B.1 measures on a validation split disjoint
    from training: one micro-batch per rank, drawn with a seed that every rank shares, leaves the training pool."""
    pools = {}
    for kind, n in (("image", len(data.pairs)), ("video", len(data.videos))):
        n_val = batches[kind][0] * world if args.grad_every else 0
        if n_val >= n:  # no usable record at all, or all of them taken by the validation split
            common.fail(f"{n} usable {kind} records leave none to train on" +
                        f" after a validation split of {n_val} (--grad-every)" * bool(n_val))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
        pools[kind] = perm[n_val:].sort().values, perm[:n_val]
    return pools


def draw(load, pool, bad, n, gen):
    """n records of `pool` (this rank's training shard or validation split) read by load(indices, gen). A record that
    fails to read is dropped from the pool once (bad: its distinct bad records, which check_bad counts), with one
    warning, and the batch is drawn again from the same pool: never another rank's shard or the other split."""
    while True:
        alive = pool[~torch.isin(pool, torch.tensor(sorted(bad), dtype=pool.dtype))]
        if not len(alive):
            common.fail(f"all {len(pool)} records of a rank's share are unreadable; fix the data")
        try:
            return load(alive[torch.randint(len(alive), (n,), generator=gen)], gen)
        except BadRecord as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            bad.add(e.index)


def loader_items(pools, tasks, batches, seed, start):
    """What each forward pass of each step reads, drawn ahead from the rank's training shards: lists of (kind,
    record, seed of its crop jitter), from step `start` on (drawn from step 0, so that a resumed run reads what an
    uninterrupted one would)."""
    gen = torch.Generator().manual_seed(seed)
    for step, video in enumerate(tasks.tolist()):
        kind = "video" if video else "image"
        micro, passes = batches[kind]
        for _ in range(passes):
            idx = pools[kind][torch.randint(len(pools[kind]), (micro,), generator=gen)].tolist()
            seeds = torch.randint(2 ** 31, (micro,), generator=gen).tolist()
            if step >= start:
                yield [(kind, i, s) for i, s in zip(idx, seeds)]


def train_loader(data, pools, tasks, batches, args, rank, start):
    """The training files read ahead of the steps by --workers processes (torch.utils.data.DataLoader), so that the
    GPU does not wait on the decode; None for the toy world's data, which is in memory."""
    if not isinstance(data, FolderData):
        return None
    items = list(loader_items(pools, tasks, batches, args.seed + 7919 * (rank + 1), start))  # its own draws
    return iter(torch.utils.data.DataLoader(data, batch_sampler=items, num_workers=args.workers, collate_fn=list))


def take(samples, load, pool, bad, gen):
    """A loader's samples as the step's batch, each bad one replaced: its record dropped (once, with a warning; the
    loader drew ahead and may bring it again) and another of the pool read here (draw)."""
    for j, sample in enumerate(samples):
        if isinstance(sample[0], str):
            if sample[1] not in bad:
                print(f"warning: skipping {sample[2]}", file=sys.stderr)
                bad.add(sample[1])
            samples[j] = [x[0] for x in draw(load, pool, bad, 1, gen)]
    return collate(samples)


def check_bad(bad, data, args, rank, world, device):
    """--max-bad over the records dropped in training, all ranks together (their shards are disjoint, so the sum
    counts distinct records): every rank stops at the same step, and rank 0 alone says why, instead of one rank
    exiting while the others wait in their next all-reduce until NCCL's timeout."""
    n = torch.tensor([len(bad["image"]), len(bad["video"])], device=device)
    if world > 1:
        dist.all_reduce(n)
    over = [(int(c), t, k) for c, t, k in zip(n.tolist(), (len(data.pairs), len(data.videos)), ("image", "video"))
            if c > args.max_bad * t]
    if over and rank:
        raise SystemExit(2)
    if over:
        common.fail("{} of {} {} records are unreadable (more than --max-bad {:g}); fix the data".format(
            *over[0], args.max_bad))


def train(m, data, args, out, batches, state, rank=0, world=1, preview=None):
    """Algorithm 1: each step is a video (I2V) or an identity (one-frame) step, the same task on every rank; data and
    noise draw from per-rank generators. batches: {kind: (micro-batch, passes)}; state: --resume's checkpoint or {}."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup
    tr, params, model = m["transformer"], trainable(m, args), DualTaskStep(m, args)
    if world > 1:  # backward averages the gradients over ranks. DDP first broadcasts rank 0's weights (the frozen
        # transformer's too): all ranks start equal. A video caption without <cls> leaves that row unused.
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False)
    lora = [p for p in params if p is not m["cls"]]
    groups = [dict(params=lora)] + ([dict(params=[m["cls"]], weight_decay=0.0)] if len(lora) < len(params) else [])
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, args.warmup, args.iterations, args.lr_cycles)
    gen = torch.Generator().manual_seed(args.seed + 1_000_003 * rank)       # data + noise: per rank
    tasks = video_steps(args.seed, args.p, args.iterations, args.two_stage)  # the same on all ranks
    pcgrad = PCGradBuffer(args.pcgrad) if args.pcgrad else None
    if state:
        tr.load_state_dict(state["lora"], strict=False)
        m["cls"].data.copy_(state["cls"])
        common.set_rng_state(state["rng"][rank])  # this rank's (LoRA dropout draws from the global RNG)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"][rank])
    load, pools = dict(image=data.pair_batch, video=data.video_batch), task_pools(data, batches, world, args)
    pg, bad = torch.Generator().manual_seed(args.seed + 999), dict(image=set(), video=set())  # bad: dropped records
    probe = {kind: draw(load[kind], val[rank::world], bad[kind], len(val[rank::world]), pg)  # B.1: a fixed
             for kind, (_, val) in pools.items()} if args.grad_every else None  # validation mini-batch per task, rank
    # a DistributedSampler-style split: rank r draws from pool[r], pool[r + world], ...
    pools = {kind: pool[rank::world] if len(pool) > rank else pool for kind, (pool, _) in pools.items()}
    loaded = train_loader(data, pools, tasks, batches, args, rank, state.get("step", 0))
    log, last = common.StepLog(out / "log.jsonl", every=args.log_every, append=args.resume), {}
    grad_log = common.StepLog(out / "grad_log.jsonl", every=args.grad_every or 1, append=args.resume)  # B.1
    model.train()
    bar = tqdm(range(state.get("step", 0), args.iterations), desc="dual-task", disable=None if rank == 0 else True)
    for step in bar:
        if probe is not None and step % args.grad_every == 0:
            stats = grad_probe(model, params, probe, args)
            if rank == 0:
                grad_log(step, bar, **stats)
        kind = "video" if tasks[step] else "image"
        (micro, passes), last[kind] = batches[kind], 0.0  # the step's loss, summed over the passes
        opt.zero_grad(set_to_none=True)
        for i in range(passes):  # gradient accumulation: DDP all-reduces once, in the last pass's backward
            with model.no_sync() if world > 1 and i < passes - 1 else contextlib.nullcontext():
                batch = take(next(loaded), load[kind], pools[kind], bad[kind], gen) if loaded else \
                    draw(load[kind], pools[kind], bad[kind], micro, gen)
                loss = model(kind, batch, gen) / passes
                common.check_finite(loss, step)
                loss.backward()
            last[kind] += loss.item()
        check_bad(bad, data, args, rank, world, m["cls"].device)
        if pcgrad is not None:  # on the averaged gradient: every rank projects the same vector
            for p, g in zip(params, pcgrad(kind, flat_grad(params)).split([p.numel() for p in params])):
                p.grad = g.view_as(p).to(p.dtype).clone()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        sched.step()
        if rank == 0:
            log(step + 1, bar, **last, lr=sched.get_last_lr()[0])
        if (step + 1) % args.save_every == 0 and step + 1 < args.iterations:  # ckpt.pt, what --resume reads
            states = [(gen.get_state(), common.rng_state())] * world  # every rank's data/noise generator and global
            if world > 1:  # RNGs (its dropout masks), so that each rank continues its own streams
                dist.all_gather_object(states, states[0])
            if rank == 0:
                lora = {n: p.detach().float().cpu() for n, p in tr.named_parameters() if f".{ADAPTER}." in n}
                common.save_atomic(dict(step=step + 1, lora=lora, cls=m["cls"].detach().cpu(), opt=opt.state_dict(),
                                        sched=sched.state_dict(), gen=[g for g, _ in states],
                                        rng=[r for _, r in states]), out / "ckpt.pt")
        if preview and args.sample_every and (step + 1) % args.sample_every == 0:  # on every rank (write_preview)
            model.eval()  # no LoRA dropout; fork_rng: DPM's global-RNG draws start at --seed, training's stream stays
            with torch.random.fork_rng([m["cls"].device] if m["cls"].device.type == "cuda" else []):
                torch.manual_seed(args.seed)
                preview(step + 1)
            model.train()
    model.eval()


# -----------------------------------------------------------------------------
# main


def plan(args, data, batches):
    """What the run will do, printed before anything loads (all of it under --dry-run)."""
    what = (f"training: {len(data.pairs)} pairs, {len(data.videos)} videos; {args.iterations} steps, p {args.p}, "
            f"p_drop {args.p_drop}, AdamW lr {args.lr:g}; (micro-batch, passes) {batches}" + " (resumed)" * args.resume
            if data is not None else f"sample: LoRA and <cls> from {args.ckpt}; " + (
                f"{args.image}, {args.prompt!r}, {args.num_samples} sample(s)" if args.image else "held-out sprites"))
    print(f"model: {args.model}, LoRA rank {args.rank}\n{what}\nvideo: {args.frames} x {args.height}x{args.width}, "
          f"{args.fps} fps; {args.sampler} {args.steps} steps, cfg {args.cfg:g}, seed {args.seed}\nout: {args.out}")


ABLATIONS = {"base (no training)": ["--iterations", "0"], "p 0.2": [], "p 0 (image only)": ["--p", "0"],
             "p 0.4": ["--p", "0.4"], "two-stage": ["--two-stage"], "no random frame": ["--no-random-frame"],
             "p_drop 0": ["--p-drop", "0"], "t2v motion step": ["--t2v"], "pcgrad 4": ["--pcgrad", "4"]}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.ablate:
        return toyworld.run_ablations(main, argv, ABLATIONS, args, "dual_task_sdv", "")
    # every input is checked before any model loads: a bad one ends with one line, exit code 2, --out untouched
    check_args(args)
    if args.model != "toy":
        common.check_pretrained(args.model, "--model")
    out = Path(args.out)
    common.check_out(out, args.resume, args.mode == "sample", args.overwrite)  # sampling writes only result files
    data, state, batches = None, {}, None
    if args.mode == "sample":
        row = read_cls(args.ckpt, args.model)
        image = common.read_image(args.image, (args.height, args.width)) if args.image else None  # training size
    else:
        data = (FolderData(args) if args.mode == "train"
                else toyworld.PairVideoData(args.toy_pairs, args.toy_videos, args.seed))
        state = common.load_checkpoint(out / "ckpt.pt") if args.resume else {}
    device, dtype = common.device_and_dtype(args.dtype)
    rank, world, device = ddp_setup(device)  # before loading: each rank's weights on its own GPU
    if data is not None:
        batches = dict(image=micro_batches(args.pair_batch, args.pair_micro, world, "pair"),
                       video=micro_batches(args.video_batch, args.video_micro, world, "video"))
        pools = task_pools(data, batches, world, args)  # B.1's validation split must leave records to train on
    if rank == 0:
        plan(args, data, batches)
    if args.dry_run:
        return None
    common.seed_everything(args.seed + rank)  # each rank its own LoRA dropout masks (DDP gives all rank 0's weights)
    m = load_models(args, device, dtype)
    tr = m["transformer"]
    if args.grad_ckpt:
        tr.enable_gradient_checkpointing()
    if args.mode == "sample":
        load_lora(m, args.ckpt, row)
        if image is None:
            return toy_eval(m, args, out)
        videos = [generate(m, image, args.prompt, args, args.seed + i) for i in range(args.num_samples)]
        common.write_result_files(out, videos[0], common.side_by_side([image[None]] + videos), args.fps,
                                  8 if args.model == "toy" else 1)  # the grid: reference | samples
        print(f"wrote {out / 'result.mp4'} and {out / 'result_grid.mp4'} ({args.prompt!r}, {len(videos)} sample(s))")
        return None
    if world > 1:  # every rank has checked --out (NCCL starts lazily) before rank 0 writes into it
        dist.barrier()
    n_lora = sum(p.numel() for p in add_lora(tr, args))  # supplement A.1's LoRA, on every rank (DDP syncs them)
    if rank == 0:
        if args.overwrite and not args.resume:  # the earlier run goes only now, after the models loaded
            common.clear_run(out, [LORA_FILE, CLS_FILE, "grad_log.jsonl"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
        print(f"LoRA: {n_lora / 1e6:.2f} M parameters on {len(common.lora_layers(tr))} layers")
    preview = lambda step: write_preview(m, args, data, pools, out, rank, step)
    train(m, data, args, out, batches, state, rank, world, preview)  # DDP keeps ranks equal
    if rank == 0:
        save_lora(tr, m, args, out)
    result = toy_eval(m, args, out) if rank == 0 and args.mode == "toy" else None
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    common.cli(main)
