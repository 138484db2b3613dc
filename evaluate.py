"""The papers' metrics for customized video generation, and one comparison table for every method.

Each metric is a small function over frames (F, 3, H, W) in [0, 1] that returns a float; the models come from hub
ids or local folders given by flags (checked before anything loads; nothing is downloaded, nothing is vendored).

    python evaluate.py out/run/result --prompt "a sks dog dancing" --subject my_dog/ --motion dance.mp4 \\
        --raft-weights raft_large_C_T_SKHT_V2-ff5fadd5.pth --json out/run/metrics.json
    python evaluate.py out/smrabooth/result --toy --json out/smrabooth/toy_metrics.json   # the toy world's metrics
    python evaluate.py --table results/*/full/seed*/metrics.json   # markdown table; seed folders are averaged
    python evaluate.py --paired results/dualreal/base results/dualreal/full   # seed by seed: is B ahead of A?
    python evaluate.py --grad-cosine grad_cosine.png out/dual_task_sdv/ablations/p_0*/seed0/grad_log.jsonl
    python evaluate.py --alpha alpha.png out/dualreal/ablations/full/seed*   # what DualReal's controller chose

Metrics, formulas as in the reference code (DreamBooth, VBench, diffusion-motion-transfer = DMT, PickScore):
clip_t, clip_i, dino_i, temporal_consistency, subject_consistency (VBench), motion_fidelity (DMT), dynamic_degree
(VBench), and, when asked with --metrics, pickscore and aesthetic; each function below says its formula. CLIP-based
scores are 100 x cosine as in JointTuner's tables (--clip-scale 1: raw cosine, as SMRABooth reports them), DINO-I
is a raw cosine, VBench's metrics are in [0, 1]; every table prints the scale of each column in its header.

Composites of --table, over the columns shown (a row without a value leaves that column out of its composites):
  mean rank   per column, rank the methods (1 = best, ties share the mean of their ranks); average. Lower is better.
  normalised  per column, 100 x value / best (higher is better) or 100 x best / value (lower is better, 0 / 0 =
              100); average. Columns with a negative value (or, higher-is-better, a best <= 0) are left out.
  mean        the plain arithmetic mean of the values as shown, lower-is-better values negated (mixes scales).
"""
import argparse
import functools
import json
import re
import statistics
import sys
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import common

METRICS = ["clip_t", "clip_i", "dino_i", "temporal_consistency", "subject_consistency", "motion_fidelity",
           "dynamic_degree", "pickscore", "aesthetic", "toy"]
DEFAULT = METRICS[:7]  # each needs its input: clip_t a prompt, clip_i / dino_i --subject, motion_fidelity --motion

# -----------------------------------------------------------------------------
# settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # inputs
    p.add_argument("videos", nargs="*", help="generated videos: files or folders of PNG frames")
    p.add_argument("--prompt", nargs="+", help="one prompt for all videos, or one per video")
    p.add_argument("--subject", help="folder of subject images (CLIP-I, DINO-I; the toy world's identity)")
    p.add_argument("--motion", help="reference motion video (file or frame folder)")
    p.add_argument("--metrics", default="auto", help="comma list of " + ",".join(METRICS) + "; auto = the first "
                                                      "seven that the given inputs allow (toy with --toy)")
    p.add_argument("--toy", action="store_true", help="the toy world's metrics (toyworld.evaluate), with its bundled "
                                                      "subject and motion unless given")
    p.add_argument("--fps", type=float, help="frame rate of the videos (default: from the file, else 8)")
    p.add_argument("--json", help="write the numbers here (what --table reads)")
    p.add_argument("--name", help="row name in tables (default: the json's folder name)")
    # encoders
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP for clip_t, clip_i, temporal")
    p.add_argument("--dino", default="facebook/dino-vits16", help="DINO for dino_i (DreamBooth's protocol)")
    p.add_argument("--dino-sc", default="facebook/dino-vitb16", help="DINO for subject_consistency (VBench)")
    p.add_argument("--pickscore", default="yuvalkirstain/PickScore_v1")
    p.add_argument("--pickscore-processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help="its tokenizer")
    p.add_argument("--aesthetic-head", help="LAION aesthetic linear head state dict (768 -> 1, e.g. "
                                            "sa_0_4_vit_l_14_linear.pth)")
    p.add_argument("--aesthetic-clip", default="openai/clip-vit-large-patch14", help="the head's CLIP ViT-L/14")
    # conventions
    p.add_argument("--clip-scale", type=float, default=100.0, choices=[1.0, 100.0],
                   help="100: 100 x cosine (JointTuner's tables); 1: raw cosine (SMRABooth's)")
    p.add_argument("--temporal-pairs", choices=["consecutive", "all"], default="consecutive",
                   help="consecutive frames (JointTuner) or all frame pairs (SMRABooth's supplement)")
    # motion: flow network and tracker
    p.add_argument("--flow", choices=["raft", "toy"], help="flow network for tracks and dynamic degree (default: "
                                                          "raft with --raft-weights, else toyworld.toy_flow)")
    p.add_argument("--raft-weights", help="torchvision raft_large state dict (.pth)")
    p.add_argument("--cotracker", help="CoTracker checkpoint (.pth): track with it instead of integrated flow, as "
                                       "the papers do (needs the co-tracker code; untested here)")
    p.add_argument("--cotracker-code", help="a co-tracker checkout to import it from (default: installed package)")
    p.add_argument("--grid", type=int, default=55, help="tracks on a grid x grid lattice (DMT: 55)")
    p.add_argument("--keep-diagonal", action="store_true", help="do not subtract the identity before the row "
                                                                "max (DMT subtracts it: identical videos score < 1)")
    p.add_argument("--motion-mask", help="first-frame subject mask of the reference: seed tracks only in its "
                                         "bounding box (DMT's use_mask; default: the whole frame, as DMT)")
    # tables
    p.add_argument("--table", nargs="+", metavar="METRICS_JSON", help="print the markdown comparison table")
    p.add_argument("--columns", help="comma list of the table's metrics (default: all in the files)")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"), help="two --ablate result folders (seed0/, seed1/, ...): "
                   "per metric, B - A seed by seed, its mean and standard error, and whether B is ahead by > 2 SE")
    p.add_argument("--grad-cosine", nargs="+", metavar=("PNG", "GRAD_LOG"), help="draw dual_task_sdv's gradient "
                   "logs (grad_log.jsonl of --grad-every runs) as the paper's Fig. 5 into PNG")
    p.add_argument("--alpha", nargs="+", metavar=("PNG", "RUN"), help="draw DualReal's controller alpha per weight "
                   "group, in training by step kind and during sampling (log.jsonl, alpha_sample.json of RUN folders), "
                   "mean over the runs, into PNG, and print its table")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# frames: files or folders -> (F, 3, H, W) in [0, 1] (common's tensors are in [-1, 1])


def read_frames(path):
    """All frames of a video file or a folder of frames, and the file's fps (None for a folder)."""
    path = Path(path)
    if path.is_dir():
        files = common.list_images(path)
        if not files:
            common.fail(f"{path} holds no frames ({', '.join(common.IMAGE_EXTS)})")
        return (torch.stack([common.read_image(f) for f in files]) + 1) / 2, None
    if not path.is_file():
        common.fail(f"no video or frame folder at {path}")
    try:
        frames, meta = [common.to_tensor(f) for f in iio.imiter(path)], iio.immeta(path)
    except Exception as e:
        common.fail(f"cannot read video {path}: {e}")
    fps = meta.get("fps") or (1000 / meta["duration"] if path.suffix == ".gif" and meta.get("duration") else None)
    return (torch.stack(frames) + 1) / 2, fps


def read_subject(folder):
    """Subject images (N, 3, S, S) in [0, 1], each centre-cropped to a square (S = the smallest side among them):
    CLIP and DINO-I look at the centre square only, so this changes nothing but lets photos of any size stack."""
    if not Path(folder).is_dir():
        common.fail(f"--subject {folder!r} is not a folder of images")
    images = [common.read_image(p) for p in common.list_images(folder)]
    if not images:
        common.fail(f"{folder} has no image ({', '.join(common.IMAGE_EXTS)})")
    s = min(min(x.shape[-2:]) for x in images)
    return (torch.stack([common.resize_crop(x, (s, s)) for x in images]) + 1) / 2


def every_8fps(frames, fps):
    """VBench samples ~8 fps: every round(fps / 8)-th frame."""
    return frames[::max(1, round(fps / 8))]


def uniform(frames, n):
    """n frames spread uniformly over the clip (how the methods read a reference clip)."""
    return frames[torch.linspace(0, len(frames) - 1, n).round().long()]


# -----------------------------------------------------------------------------
# encoders: loading and each reference implementation's preprocessing

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BICUBIC, BILINEAR = InterpolationMode.BICUBIC, InterpolationMode.BILINEAR


def load_clip(name, flag, tokenizer=None):
    """A transformers CLIPModel and its tokenizer (PickScore's lives in another repo), in fp32 for the metrics."""
    from transformers import AutoTokenizer, CLIPModel
    common.check_pretrained(name, flag, "config.json")
    common.check_pretrained(tokenizer or name, flag if tokenizer is None else flag + "-processor",
                            "tokenizer_config.json")
    model = CLIPModel.from_pretrained(name).eval().to(common.device_and_dtype()[0])
    return model, AutoTokenizer.from_pretrained(tokenizer or name)


def load_dino(name, flag):
    from transformers import AutoModel
    common.check_pretrained(name, flag, "config.json")
    return AutoModel.from_pretrained(name).eval().to(common.device_and_dtype()[0])


def clip_pixels(frames, size):
    """CLIP's preprocessing: shorter side to size (bicubic), centre crop, CLIP mean/std."""
    x = TF.center_crop(TF.resize(frames, size, BICUBIC, antialias=True), size).clamp(0, 1)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def dino_i_pixels(frames, size):
    """DreamBooth's DINO protocol: resize 256, centre crop 224 (scaled with the model's size), ImageNet mean/std."""
    x = TF.center_crop(TF.resize(frames, round(size * 256 / 224), BICUBIC, antialias=True), size).clamp(0, 1)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def vbench_dino_pixels(frames, size):
    """VBench's dino_transform: shorter side to 224 (bilinear, no antialias), no crop, ImageNet mean/std."""
    return TF.normalize(TF.resize(frames, size, BILINEAR, antialias=False), IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def clip_images(model, frames):
    """Unit CLIP image embeddings (N, D), in chunks of 16 frames."""
    x = clip_pixels(frames, model.config.vision_config.image_size).to(model.device)
    return F.normalize(torch.cat([model.get_image_features(pixel_values=c).pooler_output for c in x.split(16)]), dim=-1)


@torch.no_grad()
def clip_texts(model, tokenizer, prompts):
    tok = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    out = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    return F.normalize(out, dim=-1)


@torch.no_grad()
def dino_cls(model, pixels):
    """CLS token of the last layer after its LayerNorm (= DINO's own forward output; ViTModel's pooler adds a
    dense + tanh that DINO never trained). Positions are interpolated for non-square inputs."""
    return torch.cat([model(pixel_values=c.to(model.device), interpolate_pos_encoding=True).last_hidden_state[:, 0]
                      for c in pixels.split(16)])


# -----------------------------------------------------------------------------
# appearance and text metrics: frames (F, 3, H, W) in [0, 1] -> float


def clip_t(model, tokenizer, frames, prompt, scale=100.0):
    return scale * float((clip_images(model, frames) @ clip_texts(model, tokenizer, [prompt]).T).mean())


def clip_i(model, frames, images, scale=100.0):
    return scale * float((clip_images(model, frames) @ clip_images(model, images).T).mean())


def dino_i(model, frames, images):
    size = model.config.image_size
    a, b = (F.normalize(dino_cls(model, dino_i_pixels(x, size)), dim=-1) for x in (frames, images))
    return float((a @ b.T).mean())


def temporal_consistency(model, frames, all_pairs=False, scale=100.0):
    e = clip_images(model, frames)
    if all_pairs:  # SMRABooth's supplement: every pair i < j
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        return scale * float((e[i] * e[j]).sum(-1).mean())
    return scale * float((e[1:] * e[:-1]).sum(-1).mean())


def vbench_consistency(features):
    """VBench's subject_consistency over per-frame features (F, D): negative cosines count as 0."""
    f = F.normalize(features.float(), dim=-1)
    prev, first = (f[1:] * f[:-1]).sum(-1).clamp(min=0), (f[1:] * f[:1]).sum(-1).clamp(min=0)
    return float(((prev + first) / 2).mean())


def subject_consistency(model, frames):
    return vbench_consistency(dino_cls(model, vbench_dino_pixels(frames, model.config.image_size)))


@torch.no_grad()
def pickscore(model, tokenizer, frames, prompt):
    """PickScore's reference: logit_scale.exp() x cos(text, image), here averaged over frames."""
    cos = clip_images(model, frames) @ clip_texts(model, tokenizer, [prompt]).T
    return float(model.logit_scale.exp() * cos.mean())


@torch.no_grad()
def aesthetic(model, head, frames):
    """VBench's aesthetic quality: the LAION linear head on the unit CLIP ViT-L/14 embedding, / 10, frame mean."""
    return float(head(clip_images(model, frames)).mean() / 10)


# -----------------------------------------------------------------------------
# motion: flow networks, point tracks, motion fidelity, dynamic degree


def raft_flow(model, a, b, updates=20):
    """torchvision RAFT on frames in [0, 1]: inputs in [-1, 1], sides padded (replicate) to multiples of 8 as
    VBench's InputPadder does, 20 updates as VBench's iters."""
    h, w = a.shape[-2:]
    pad = ((-w % 8) // 2, -w % 8 - (-w % 8) // 2, (-h % 8) // 2, -h % 8 - (-h % 8) // 2)
    a, b = (F.pad(x * 2 - 1, pad, mode="replicate") for x in (a, b))
    return model(a, b, num_flow_updates=updates)[-1][..., pad[2]:pad[2] + h, pad[0]:pad[0] + w]


def toy_flow(a, b):
    """The toy world's weight-free variational flow (a stand-in for RAFT), on frames in [0, 1]."""
    import toyworld
    return toyworld.toy_flow(a * 2 - 1, b * 2 - 1)


def load_flow(kind, raft_weights=None):
    """flow(a, b): (N, 3, H, W) in [0, 1] -> (N, 2, H, W) px such that b(x + flow(x)) ~ a(x) (RAFT's convention)."""
    if kind == "toy":
        return toy_flow
    from torchvision.models.optical_flow import raft_large
    if not raft_weights or not Path(raft_weights).is_file():
        common.fail(f"--flow raft needs --raft-weights raft_large_*.pth (got {raft_weights!r}), or use --flow toy")
    model = raft_large(weights=None)
    model.load_state_dict(torch.load(raft_weights, map_location="cpu"))
    return functools.partial(raft_flow, model.eval().to(common.device_and_dtype()[0]))


@torch.no_grad()
def pair_flows(flow, frames, chunk=8):
    """Flows of consecutive frames (F - 1, 2, H, W), a few pairs at a time."""
    dev, n = common.device_and_dtype()[0], len(frames) - 1
    return torch.cat([flow(frames[i:min(i + chunk, n)].to(dev), frames[i + 1:min(i + chunk, n) + 1].to(dev))
                      .float().cpu() for i in range(0, n, chunk)])


def grid_points(h, w, n, box=None):
    """n x n points (x, y) inset by w / 64 as CoTracker seeds its grid; with box = (x0, y0, x1, y1), only those
    inside it (CoTracker's segm_mask)."""
    m = w / 64
    ys, xs = torch.meshgrid(torch.linspace(m, h - 1 - m, n), torch.linspace(m, w - 1 - m, n), indexing="ij")
    pts = torch.stack([xs.flatten(), ys.flatten()], -1)
    if box is not None:
        pts = pts[(pts[:, 0] >= box[0]) & (pts[:, 0] <= box[2]) & (pts[:, 1] >= box[1]) & (pts[:, 1] <= box[3])]
    return pts


def flow_tracks(flow, frames, points):
    """The default tracker: integrate forward flow from frame 0, p_t+1 = p_t + flow_t(p_t) (bilinear at sub-pixel
    points). Returns (N, T, 2)."""
    flows, (h, w) = pair_flows(flow, frames), frames.shape[-2:]
    track = [points]
    for fl in flows:
        p = track[-1]
        grid = torch.stack([2 * p[:, 0] / max(w - 1, 1) - 1, 2 * p[:, 1] / max(h - 1, 1) - 1], -1)
        step = F.grid_sample(fl[None], grid.view(1, 1, -1, 2), align_corners=True, padding_mode="border")
        track.append(p + step[0, :, 0].T)
    return torch.stack(track, 1)


def load_cotracker(path, code=None):
    """DMT's tracker: CoTrackerPredictor(checkpoint=...) from the co-tracker code. Untested here (no weights)."""
    if not Path(path).is_file():
        common.fail(f"--cotracker {path!r} is not a checkpoint file (e.g. cotracker2.pth)")
    if code:
        sys.path.insert(0, code)
    try:
        from cotracker.predictor import CoTrackerPredictor
    except ImportError:
        common.fail("--cotracker needs the co-tracker code: pip install -e CHECKOUT, or --cotracker-code CHECKOUT")
    return CoTrackerPredictor(checkpoint=path).eval().to(common.device_and_dtype()[0])


@torch.no_grad()
def cotracker_tracks(model, frames, points):
    """The same grid as queries on frame 0 (what CoTracker's grid_size does); video in 0-255 as it expects."""
    queries = torch.cat([torch.zeros(len(points), 1), points], -1)[None].to(model.device)
    tracks, _ = model(frames[None].to(model.device) * 255, queries=queries)
    return tracks[0].transpose(0, 1).float().cpu()


def mask_box(path, h, w):
    """Bounding box (x0, y0, x1, y1) of a first-frame mask image (white = subject), at the video's size."""
    mask = common.read_image(path)[:1] > 0
    mask = F.interpolate(mask[None].float(), size=(h, w), mode="nearest")[0, 0].nonzero()
    if not len(mask):
        common.fail(f"--motion-mask {path} is empty")
    return mask[:, 1].min().item(), mask[:, 0].min().item(), mask[:, 1].max().item(), mask[:, 0].max().item()


def motion_fidelity_score(tracks, ref, subtract_identity=True, eps=1e-6):
    """DMT's score of generated tracks (N, T, 2) against reference tracks (M, T, 2): unit displacements per step,
    corr(n, m) = mean_t cos, minus the identity matrix (DMT's get_score), row max, mean. A step shorter than eps
    px is a zero vector (cos 0) instead of DMT's 0 / 0 = NaN."""
    d, r = (x.diff(dim=1) / x.diff(dim=1).norm(dim=-1, keepdim=True).clamp(min=eps) for x in (tracks, ref))
    corr = torch.einsum("ntc,mtc->nm", d, r) / d.shape[1]
    if subtract_identity:
        corr = corr - torch.eye(*corr.shape)
    return float(corr.max(dim=1).values.mean())


def motion_fidelity(tracker, frames, ref, grid=55, box=None, subtract_identity=True):
    """Both clips at the same length (the shorter one's, spread uniformly) and the generated clip's size."""
    n = min(len(frames), len(ref))
    frames, ref = uniform(frames, n), common.resize_crop(uniform(ref, n), frames.shape[-2:])
    pts = grid_points(*frames.shape[-2:], grid, box)
    return motion_fidelity_score(tracker(frames, pts), tracker(ref, pts), subtract_identity)


def dynamic_threshold(h, w, fps=8.0):
    """VBench: 6 px at a 256 px shorter side, proportional to it; x 8 / fps below 8 fps."""
    return max(1.0, 8.0 / fps) * 6.0 * min(h, w) / 256


def dynamic_degree(flow, frames, fps=8.0):
    """VBench: (is the video dynamic, mean over pairs of the mean of the top 5% flow magnitudes in px)."""
    frames = every_8fps(frames, fps)
    rad = pair_flows(flow, frames).norm(dim=1).flatten(1)
    top = rad.topk(max(1, int(rad.shape[1] * 0.05)), dim=1).values.mean(1)
    moving = int((top > dynamic_threshold(*frames.shape[-2:], fps)).sum())
    return moving >= round(4 * len(frames) / 16), float(top.mean())


# -----------------------------------------------------------------------------
# tables and composites

DIRECTIONS = {"leakage": -1, "noise": -1}  # +1 (higher is better) unless listed here
NOT_METRICS = {"seed", "steps", "cfg", "n", "n_novel", "batch", "step", "samples_seen"}
SCALES = {"dino_i": "cos", "subject_consistency": "VBench [0, 1]", "dynamic_degree": "VBench fraction",
          "dynamic_magnitude": "px", "motion_fidelity": "DMT, cos", "pickscore": "logit", "aesthetic": "LAION / 10",
          "identity": "toy fraction", "leakage": "toy fraction", "motion": "toy cos", "dynamics": "toy px/frame",
          "noise": "toy RGB distance"}
CLIP_BASED = ("clip_t", "clip_i", "temporal_consistency")


def composites(rows, columns):
    """{name: dict(rank=, normalised=, mean=)} over `columns` (see the module docstring), and the columns left
    out of `normalised`."""
    parts = {n: dict(rank=[], normalised=[], mean=[]) for n in rows}
    skipped = []
    for c in columns:
        d = DIRECTIONS.get(c, 1)
        vals = {n: r[c] for n, r in rows.items() if c in r}
        best = max(vals.values()) if d > 0 else min(vals.values())
        ratio_ok = min(vals.values()) >= 0 and (best > 0 or d < 0)
        skipped += [] if ratio_ok else [c]
        for n, v in vals.items():
            better, ties = sum(d * (u - v) > 0 for u in vals.values()), sum(u == v for u in vals.values())
            parts[n]["rank"].append(1 + better + (ties - 1) / 2)
            parts[n]["mean"].append(d * v)
            if ratio_ok:
                parts[n]["normalised"].append(100 * (v / best if d > 0 else (1 if v == best else best / v)))
    return {n: {k: statistics.mean(v) if v else float("nan") for k, v in p.items()} for n, p in parts.items()}, skipped


def read_metrics(paths):
    """Rows {name: {metric: value}} and their info dicts from metrics.json files (flat name -> number, as the
    methods write them; other fields are skipped). A row is named by the "name" field, else the json's folder;
    files in folders seed0, seed1, ... of one run (what --ablate writes) become one row, the mean over the seeds,
    named "<method>/<variant> (n seeds)"."""
    groups, infos = {}, {}
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            common.fail(f"cannot read {p}: {e}")
        flat = {k: float(v) for k, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS}
        if not flat:
            common.fail(f"{p} holds no metric (a flat dict of name -> number is expected)")
        folder = Path(p).resolve().parent
        seeded = re.fullmatch(r"seed\d+", folder.name) is not None
        name = d.get("name") or (f"{folder.parent.parent.name}/{folder.parent.name}" if seeded else folder.name)
        name = str(Path(p).parent) if name in groups and not seeded else name
        groups.setdefault(name, []).append(flat)
        infos[name] = d.get("info", {})
    rows = {}
    for name, runs in groups.items():
        label = f"{name} ({len(runs)} seeds)" if len(runs) > 1 else name
        rows[label] = {k: statistics.mean(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}
        infos[label] = infos.pop(name)
    return rows, infos


def markdown_table(rows, infos, columns):
    """The comparison table with each column's scale and direction in its header, then the composites."""
    comp, skipped = composites(rows, columns)
    clip = {i.get("clip_scale") for n, i in infos.items() if any(c in rows[n] for c in CLIP_BASED)}
    clip_label = "mixed!" if len(clip) > 1 else {100: "100 x cos", 1: "cos", None: "as written"}[
        clip.pop() if clip else None]
    head = ["method"] + [f"{c} ({clip_label if c in CLIP_BASED else SCALES.get(c, 'as written')}) "
                         f"{'↓' if DIRECTIONS.get(c, 1) < 0 else '↑'}" for c in columns]
    head += ["mean rank ↓", "normalised (best = 100) ↑", "mean ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n, r in rows.items():
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in columns] + [f"{comp[n][k]:.2f}" for k in comp[n]]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    clip_note = f"CLIP-based columns are {clip_label} (JointTuner's tables: 100 x cos; SMRABooth's: raw cos); " \
        if any(c in CLIP_BASED for c in columns) else ""
    lines.append(f"\nScales: {clip_note}VBench's metrics are in [0, 1]. Composites over {len(columns)} columns: mean "
                 f"rank (1 = best); 100 x value / best (best / value if lower is better), averaged; the plain mean "
                 f"(lower-is-better values negated)." + (f" Left out of 'normalised' (negative values): "
                                                         f"{', '.join(skipped)}." if skipped else ""))
    return "\n".join(lines)


def plot_grad_cosine(logs, png):
    """Fig. 5 of Kim et al. (supplement B.1): cos(g_img, g_vid) and both gradient norms over the training steps,
    one line per grad_log.jsonl, labelled by its run folder (an --ablate variant and seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    for path in logs:
        rows, label = [json.loads(x) for x in Path(path).read_text().splitlines()], "/".join(Path(path).parts[-3:-1])
        for a, k, style in ((ax[0], "cos", "-"), (ax[1], "norm_img", "-"), (ax[1], "norm_vid", "--")):
            a.plot([r["step"] for r in rows], [r[k] for r in rows], style, label=f"{k} {label}")
    ax[0].axhline(0, color="gray", lw=0.5)
    save_panels(fig, ax, png, [("step", "cos(g_img, g_vid)"), ("step", "gradient norm")], fontsize=7)


def save_panels(fig, ax, png, labels, fontsize):
    """The two diagnostics' figures: each panel's (x, y) labels and legend, then the figure written to png."""
    import matplotlib.pyplot as plt
    for a, (x, y) in zip(ax, labels):
        a.set(xlabel=x, ylabel=y)
        a.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def alpha_trace(runs, png):
    """DualReal's StageBlender choices, mean over runs: alpha (the identity adapters' weight; beta = s - alpha) per
    weight group at each logged training step, for the latest identity and motion step (log.jsonl), and at every
    sampling step (alpha_sample.json). Draws both into PNG; returns the markdown table of the last training values
    and the first and last sampling steps. The runs must share their logged steps, sampling steps and groups."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs, sampled = [], []
    for r in runs:
        for name in ("log.jsonl", "alpha_sample.json"):
            if not (Path(r) / name).is_file():
                common.fail(f"--alpha PNG RUN...: no {name} in {r} (a trained DualReal run with its controller)")
        rows = [json.loads(x) for x in (Path(r) / "log.jsonl").read_text().splitlines()]
        # by step, the last row of a step winning (--resume appends), once both kinds have run
        logs.append({row["step"]: row for row in rows if "alpha_identity" in row and "alpha_motion" in row})
        sampled.append(json.loads((Path(r) / "alpha_sample.json").read_text()))
    steps = sorted(set.intersection(*(set(log) for log in logs)))
    if not steps or len({(len(x), len(x[0])) for x in sampled}) > 1:
        common.fail(f"--alpha: {', '.join(runs)} share no logged step with both kinds, or differ in sampling steps "
                    f"or groups; give runs of one setting")

    def mean(xs):  # over runs, per group
        return [sum(v) / len(v) for v in zip(*xs)]
    train = {k: [mean([log[st][k] for log in logs]) for st in steps] for k in ("alpha_identity", "alpha_motion")}
    sampling = [mean(step) for step in zip(*sampled)]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    for g in range(len(sampling[0])):
        for kind, style in (("identity", "-"), ("motion", "--")):
            ax[0].plot(steps, [a[g] for a in train[f"alpha_{kind}"]], style, color=f"C{g}",
                       label=f"group {g}, {kind} steps")
        ax[1].plot(range(1, len(sampling) + 1), [a[g] for a in sampling], "-", color=f"C{g}", label=f"group {g}")
    save_panels(fig, ax, png, [("training step", "alpha (beta = s - alpha)"),
                               ("sampling step (noisy to clean)", "alpha")], fontsize=6)
    rows = [("training, last identity step", train["alpha_identity"][-1]),
            ("training, last motion step", train["alpha_motion"][-1]),
            ("sampling, first step", sampling[0]), ("sampling, last step", sampling[-1])]
    head = f"| alpha, mean of {len(runs)} run(s) | " + " | ".join(f"group {g}" for g in range(len(sampling[0])))
    return "\n".join([head + " |", "|" + " --- |" * (len(sampling[0]) + 1)] +
                     [f"| {name} | " + " | ".join(f"{x:.3f}" for x in v) + " |" for name, v in rows])


def paired(a, b):
    """{metric: dict(a=[...], b=[...], diff=, se=, ahead=, beats=)} over the seeds both folders hold. diff is the
    mean of (B - A) per seed, signed so that positive is better (leakage negated); se its standard error
    (sample std / sqrt(n)); ahead counts the seeds where B is better; beats = diff > 2 se, the rule the README's
    "beats the base model" means."""
    seeds = sorted({p.parent.name for p in Path(a).glob("seed*/metrics.json")} &
                   {p.parent.name for p in Path(b).glob("seed*/metrics.json")}, key=lambda s: int(s[4:]))
    if len(seeds) < 2:
        common.fail(f"--paired needs at least two seeds run in both {a} and {b} (seed*/metrics.json)")
    runs = {k: [read_metrics([Path(d) / s / "metrics.json"])[0].popitem()[1] for s in seeds] for k, d in
            (("a", a), ("b", b))}
    out = {}
    for m in [m for m in runs["a"][0] if all(m in r for r in runs["a"] + runs["b"])]:
        va, vb = [r[m] for r in runs["a"]], [r[m] for r in runs["b"]]
        d = [DIRECTIONS.get(m, 1) * (y - x) for x, y in zip(va, vb)]
        diff, se = statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5
        out[m] = dict(a=va, b=vb, diff=diff, se=se, ahead=sum(x > 0 for x in d), beats=diff > 2 * se)
    return seeds, out


# -----------------------------------------------------------------------------
# main


def load_models(args, todo):
    """Everything the asked metrics need; every path is checked before anything loads."""
    flows = bool(todo & {"motion_fidelity", "dynamic_degree"})
    for name, flag, needed in ((args.clip, "--clip", todo & {"clip_t", "clip_i", "temporal_consistency"}),
                               (args.dino, "--dino", "dino_i" in todo),
                               (args.dino_sc, "--dino-sc", "subject_consistency" in todo),
                               (args.pickscore, "--pickscore", "pickscore" in todo),
                               (args.aesthetic_clip, "--aesthetic-clip", "aesthetic" in todo)):
        if needed:
            common.check_pretrained(name, flag, "config.json")
    if "pickscore" in todo:
        common.check_pretrained(args.pickscore_processor, "--pickscore-processor", "tokenizer_config.json")
    for flag, path, needed in (("--aesthetic-head", args.aesthetic_head, "aesthetic" in todo),
                               ("--raft-weights", args.raft_weights, flows and args.flow == "raft"),
                               ("--cotracker", args.cotracker, flows and args.cotracker),
                               ("--motion-mask", args.motion_mask, args.motion_mask)):
        if needed and not (path and Path(path).is_file()):
            common.fail(f"{flag} {path!r} is not a file" if path else f"{flag} is needed (a local file)")
    m = {}
    if todo & {"clip_t", "clip_i", "temporal_consistency"}:
        m["clip"] = load_clip(args.clip, "--clip")
    if "dino_i" in todo:
        m["dino"] = load_dino(args.dino, "--dino")
    if "subject_consistency" in todo:
        m["dino_sc"] = load_dino(args.dino_sc, "--dino-sc")
    if "pickscore" in todo:
        m["pickscore"] = load_clip(args.pickscore, "--pickscore", args.pickscore_processor)
    if "aesthetic" in todo:
        state = torch.load(args.aesthetic_head, map_location="cpu")
        head = torch.nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        clip = load_clip(args.aesthetic_clip, "--aesthetic-clip")[0]
        m["aesthetic"] = clip, head.to(clip.device)
    if todo & {"motion_fidelity", "dynamic_degree"}:
        m["flow"] = load_flow(args.flow, args.raft_weights)
        m["tracker"] = functools.partial(flow_tracks, m["flow"])
        if args.cotracker:
            m["tracker"] = functools.partial(cotracker_tracks, load_cotracker(args.cotracker, args.cotracker_code))
    return m


def evaluate_video(args, m, todo, path, prompt, images, ref):
    """The asked metrics of one video, by name."""
    r = {}
    if "toy" in todo:  # the toy world's own reading, as `toyworld.py eval`: 9 frames of 32 x 32 in [-1, 1]
        import toyworld as tw
        size = (tw.SIZE, tw.SIZE)
        video = common.read_video(path, tw.NUM_FRAMES, size)
        r.update(tw.evaluate(video, list(common.resize_crop(images * 2 - 1, size)),
                             common.resize_crop(uniform(ref, tw.NUM_FRAMES) * 2 - 1, size)))
    if not todo - {"toy"}:
        return r
    frames, fps = read_frames(path)
    if len(frames) < 2 and todo & {"temporal_consistency", "subject_consistency", "motion_fidelity",
                                   "dynamic_degree"}:
        common.fail(f"{path} has {len(frames)} frame: consistency and motion need at least 2")
    fps = args.fps or fps or 8.0
    sampled = every_8fps(frames, fps)  # appearance metrics at ~8 fps; consistency and motion on every frame
    if "clip_t" in todo:
        r["clip_t"] = clip_t(*m["clip"], sampled, prompt, args.clip_scale)
    if "clip_i" in todo:
        r["clip_i"] = clip_i(m["clip"][0], sampled, images, args.clip_scale)
    if "dino_i" in todo:
        r["dino_i"] = dino_i(m["dino"], sampled, images)
    if "temporal_consistency" in todo:
        r["temporal_consistency"] = temporal_consistency(m["clip"][0], frames, args.temporal_pairs == "all",
                                                         args.clip_scale)
    if "subject_consistency" in todo:
        r["subject_consistency"] = subject_consistency(m["dino_sc"], frames)
    if "motion_fidelity" in todo:
        box = mask_box(args.motion_mask, *frames.shape[-2:]) if args.motion_mask else None
        r["motion_fidelity"] = motion_fidelity(m["tracker"], frames, ref, args.grid, box, not args.keep_diagonal)
    if "dynamic_degree" in todo:
        r["dynamic_degree"], r["dynamic_magnitude"] = dynamic_degree(m["flow"], frames, fps)
    if "pickscore" in todo:
        r["pickscore"] = pickscore(*m["pickscore"], sampled, prompt)
    if "aesthetic" in todo:
        r["aesthetic"] = aesthetic(*m["aesthetic"], sampled)
    return r


def main(argv=None):
    args = parse_args(argv)
    if args.grad_cosine:
        png, *logs = args.grad_cosine
        missing = [q for q in logs if not Path(q).is_file()] or ([] if logs else ["(none given)"])
        if missing:
            common.fail(f"--grad-cosine PNG GRAD_LOG...: no gradient log at {missing[0]} (dual_task_sdv --grad-every)")
        return plot_grad_cosine(logs, png)
    if args.alpha:
        png, *runs = args.alpha
        if not runs:
            common.fail("--alpha PNG RUN...: give at least one DualReal run folder")
        table = alpha_trace(runs, png)
        print(table)
        return table
    if args.paired:
        seeds, res = paired(*args.paired)
        a, b = args.paired
        print(f"{b} against {a}, seeds {seeds[0][4:]}-{seeds[-1][4:]} ({len(seeds)}); diff = mean of B - A per seed "
              f"(leakage: A - B), beats = diff > 2 standard errors")
        for m, r in res.items():
            print(f"{m}: A {statistics.mean(r['a']):.3f}, B {statistics.mean(r['b']):.3f}, diff {r['diff']:.3f}, "
                  f"SE {r['se']:.3f}, B ahead in {r['ahead']}/{len(seeds)}, beats: {'yes' if r['beats'] else 'no'}"
                  f"\n  A per seed: {', '.join(f'{x:.2f}' for x in r['a'])}\n  B per seed: "
                  f"{', '.join(f'{x:.2f}' for x in r['b'])}")
        return res
    if args.table:
        rows, infos = read_metrics(args.table)
        columns = args.columns.split(",") if args.columns else list(dict.fromkeys(k for r in rows.values() for k in r))
        if any(all(c not in r for r in rows.values()) for c in columns):
            common.fail(f"--columns {args.columns}: a column is in none of the files")
        table = markdown_table(rows, infos, columns)
        print(table)
        return table
    if not args.videos:
        common.fail("give the videos to evaluate (files or frame folders), or --table METRICS_JSON ...")
    for v in args.videos:
        if not Path(v).exists():
            common.fail(f"no video or frame folder at {v}")

    # which metrics: asked, or all that the inputs allow; inputs checked before any model loads
    import toyworld as tw
    if args.toy:
        args.subject = args.subject or str(tw.ASSETS / "toy" / "subject")
        args.motion = args.motion or str(tw.ASSETS / "toy" / "motion")
    have = dict(clip_t=args.prompt, clip_i=args.subject, dino_i=args.subject, motion_fidelity=args.motion,
                pickscore=args.prompt, toy=args.subject and args.motion)
    if args.metrics == "auto":
        todo = {"toy"} if args.toy else {k for k in DEFAULT if have.get(k, True)}
    else:
        todo = set(args.metrics.split(","))
        if todo - set(METRICS):
            common.fail(f"unknown metric(s) {', '.join(sorted(todo - set(METRICS)))}; known: {', '.join(METRICS)}")
        if any(not have.get(k, True) for k in todo):
            common.fail(f"{', '.join(k for k in sorted(todo) if not have.get(k, True))}: missing --prompt, --subject "
                        f"or --motion")
    if args.prompt and len(args.prompt) not in (1, len(args.videos)):
        common.fail(f"--prompt: give one prompt, or one per video ({len(args.videos)})")
    prompts = (args.prompt or [None]) * (len(args.videos) if not args.prompt or len(args.prompt) == 1 else 1)
    images = read_subject(args.subject) if args.subject else None
    ref = read_frames(args.motion)[0] if args.motion else None
    if "toy" in todo and len(ref) < tw.NUM_FRAMES:  # as `toyworld.py eval`: the reference motion's 9 frames
        common.fail(f"--motion {args.motion} has {len(ref)} frame(s): the toy metrics need {tw.NUM_FRAMES}")
    args.flow = args.flow or ("raft" if args.raft_weights else "toy")
    flow = "toyworld.toy_flow" if args.flow == "toy" else f"torchvision raft_large ({args.raft_weights})"
    tracker = f"CoTracker ({args.cotracker})" if args.cotracker else f"integrated optical flow: {flow}"
    uses_flow = bool(todo & {"motion_fidelity", "dynamic_degree"})
    print(f"metrics: {', '.join(m for m in METRICS if m in todo)}; CLIP-based x {args.clip_scale:g}"
          + (f"; tracks: {tracker}; flow: {flow}" if uses_flow else ""))
    if uses_flow and args.flow == "toy" and not args.toy:
        print("note: toy_flow is a classical variational flow, not RAFT: --raft-weights for numbers like VBench's")
    models = load_models(args, todo)

    per_video = {}
    for path, prompt in zip(args.videos, prompts):
        per_video[path] = evaluate_video(args, models, todo, path, prompt, images, ref)
        print(f"{path}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in per_video[path].items()))
    result = {k: statistics.mean(float(r[k]) for r in per_video.values()) for k in per_video[args.videos[0]]}
    print(f"mean of {len(per_video)} video(s): " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    info = dict(clip_scale=args.clip_scale, temporal_pairs=args.temporal_pairs, clip=args.clip, dino=args.dino,
                dino_sc=args.dino_sc, flow=flow, motion_tracker=tracker, grid=args.grid,
                subtract_identity=not args.keep_diagonal, motion_mask=args.motion_mask, prompts=prompts)
    result = dict(result, **({"name": args.name} if args.name else {}), info=info, videos=per_video)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    common.cli(main)
