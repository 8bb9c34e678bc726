"""Evaluation of generated Moving MNIST clips: digit-aware scores, Frechet distances, motion, prediction error.

Published FVD/FID features (I3D on Kinetics, Inception on ImageNet) know little about white digits on black, so the
main figures here use two small networks trained once (cached) on real Moving MNIST made from the TRAINING digits;
their own accuracy is measured on clips of the HELD-OUT digits and reported next to every result:

  DigitNet  frame [B,1,64,64] -> which of the 10 digits are present (probabilities), plus a 4W-d frame feature.
  ClipNet   a small 3D conv net over DigitNet's feature maps of a clip's frames -> the clip's digit set (10 logits)
            and its motion kind (real / frames shuffled / frozen / twice as fast), so that its clip feature sees
            appearance AND motion.

Metrics (clips are uint8 [N,T,H,W] or [N,T,H,W,C]; the nets see them as 64x64 grayscale):
  semantic     share of frames whose detected digit set equals the prompt's (VBench's per-frame object / class
               score, Huang et al. 2024, with DigitNet as the detector). Needs prompts.
  semantic_first  semantic of the first frames alone: the image a clip starts from (paper A's first latent frame
               is one frame, drawn before any motion; issue 16's image target).
  *_se         the standard error of semantic and consistency over clips (std of the clip means / sqrt(N)): two
               generators whose scores differ by less than ~2 se are not told apart by N clips.
  consistency  share of frames whose detected digit set equals their clip's own majority set (the digits detected
               in more than half of its frames); frames of a clip whose majority set is empty count as inconsistent
               (VBench subject consistency, Huang et al. 2024: the subject must stay the same, and blank or noise
               video has none). Softer than "every frame the same", which fails most REAL 20-frame clips, because
               the per-frame detector errs for 1-3 frames while two digits cross.
  fid_mm       Frechet distance (Heusel et al. 2017) between DigitNet features of the clips' frames and of real frames;
  fvd_mm       the same between ClipNet features of the clips and of real clips (the FVD recipe of Unterthiner et
               al. 2018 with our own feature net). Both are NOT comparable to published FID / FVD figures.
  motion       1 - mean of two Kolmogorov-Smirnov statistics, both in [0, 1]: between the distributions (over all
               clips and steps) of the frame change mean|x[t+1] - x[t]| and of its second difference
               mean|x[t+2] - 2 x[t+1] + x[t]| of the clips and of real clips (pixels in [0, 1]). 1 = real-like;
               frozen video (no change), flicker and shuffled frames (too much, too jerky) score low.
  mse, mae     per frame, summed over the 64x64 pixels with values in [0, 1] (as in the Moving MNIST literature,
               Srivastava et al. 2015), averaged over frames and clips; ssim (Wang et al. 2004: 11x11 Gaussian
               window, sigma 1.5) and psnr (peak 1, capped at 100 dB for identical frames) averaged over frames.
               With S samples per context, `*_best` is the best sample per context (per metric), averaged.
  fvd          the standard FVD with an I3D network (Carreira & Zisserman 2017) whose weights you supply (--i3d).
Real reference clips are moving_mnist on the held-out split with a fixed seed, with the input's T and size.
"""
import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

from config import SEED, Parser, check_device, check_flags, check_path
from data import Digits, MovingMNISTConfig, check_video, load_clips, load_digits, moving_mnist

CACHE_DIR = Path(os.environ.get("VIDEOAR_EVAL_CACHE", Path.home() / ".cache" / "videoar" / "eval"))
VERSION = 3                # of the nets' design: part of the cache key, so a stale cache is never loaded
REAL_SEED = 1234           # the real reference clips are always the same
MOTIONS = ("real", "shuffled", "frozen", "fast")   # ClipNet's motion classes
GRID = 8                   # DigitNet's output map is GRID x GRID cells of 8x8 pixels
NONE, EITHER = 10, 11      # cell targets besides a digit d: no digit centred here; EITHER + d: d or none


@dataclass
class EvalNetConfig:
    """How the feature nets are trained; the cache file is keyed by these fields and the digit source."""
    seed: int = 0
    width: int = 32          # DigitNet channels W, 2W, 4W
    steps: int = 3000        # DigitNet training steps of `batch` frames
    batch: int = 64
    lr: float = 5e-3
    jitter_copies: int = 3   # affine-jittered copies of each training digit added to the pool
    clip_width: int = 64     # ClipNet channels
    clip_frames: int = 12
    clip_steps: int = 400
    clip_batch: int = 16


# ------------------------------------------------------------------------------------------------ data
def jitter_digits(digits, copies, seed):
    """Add `copies` randomly rotated / scaled / sheared versions of every training glyph (held-out ones untouched)."""
    g = torch.Generator().manual_seed(seed)
    x = repeat(torch.from_numpy(digits.train_images.copy()).float(), "n h w -> (c n) 1 h w", c=copies)
    ang, scale, shear = [(torch.rand(len(x), generator=g) - 0.5) * r for r in (0.5, 0.3, 0.4)]
    cos, sin = torch.cos(ang) / (1 + scale), torch.sin(ang) / (1 + scale)
    theta = torch.stack([torch.stack([cos, shear - sin, 0 * cos], 1), torch.stack([sin, cos, 0 * cos], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    jittered = x[:, 0].round().clamp(0, 255).byte().numpy()
    return Digits(np.concatenate([digits.train_images, jittered]), np.tile(digits.train_labels, copies + 1),
                  digits.test_images, digits.test_labels, digits.source)


def digit_frames(n, k, digits, split, seed):
    """n 64x64 frames with k digits, composed as the pixel-wise max of k one-digit Moving MNIST frames: the same
    distribution as moving_mnist(num_digits=k), but each digit's own ink box is known (for the dense loss and
    for "fully visible"). -> frames uint8 [n,64,64], labels int64 [n,k], boxes int64 [n,k,4] (y0, y1, x0, x1)."""
    v, labels = moving_mnist(n * k, digits, split, MovingMNISTConfig(frames=1, num_digits=1), seed=seed)
    layers = rearrange(v[:, 0], "(n k) h w -> n k h w", k=k)
    r = np.arange(64)
    ink_y, ink_x = layers.any(3), layers.any(2)                        # [n,k,64] rows / columns with ink
    boxes = np.stack([np.where(ink_y, r, 64).min(-1), np.where(ink_y, r, -1).max(-1),
                      np.where(ink_x, r, 64).min(-1), np.where(ink_x, r, -1).max(-1)], -1)
    return layers.max(1), labels.reshape(n, k), boxes


def separated(boxes):
    """[n,2,4] -> [n] bool: the two digits' ink boxes do not intersect (both digits fully visible)."""
    (a0, a1, b0, b1), (c0, c1, d0, d1) = boxes[:, 0].T, boxes[:, 1].T
    return (a1 < c0) | (c1 < a0) | (b1 < d0) | (d1 < b0)


def non_digit_frames(n, rng):
    """Frames with no digit, so the detector learns to say so: blank, uniform noise, sparse dots, smooth blobs."""
    kinds = [np.zeros((n, 64, 64)), rng.uniform(0, 255, (n, 64, 64)), 255.0 * (rng.random((n, 64, 64)) < 0.05),
             F.interpolate(torch.from_numpy(rng.uniform(0, 255, (n, 1, 8, 8))), size=64, mode="bilinear")[:, 0].numpy()]
    return np.concatenate(kinds)[rng.permutation(4 * n)[:n]].astype(np.uint8)


def digit_training_frames(n, digits, seed):
    """n frames: 1/16 without digits, the rest 1 (a quarter) or 2 digits -> frames uint8 [n,64,64], present [n,10]
    and the target of each cell [n,8,8]: the digit whose ink-box centre it holds; at the 8 cells around that one,
    which see most of the digit too, EITHER + digit ("this digit or none", never another one); NONE elsewhere."""
    rng = np.random.default_rng(seed)
    frames, present, cells = [non_digit_frames(n // 16, rng)], [np.zeros((n // 16, 10))], [np.full((n // 16, GRID, GRID), NONE)]
    for k, m in ((1, (n - n // 16) // 4), (2, n - n // 16 - (n - n // 16) // 4)):
        x, labels, boxes = digit_frames(m, k, digits, "train", seed=int(rng.integers(2**31)))
        c = np.full((m, GRID + 2, GRID + 2), NONE)                          # with a 1-cell border
        cy, cx = (boxes[..., 0] + boxes[..., 1]) // 16 + 1, (boxes[..., 2] + boxes[..., 3]) // 16 + 1
        b = np.arange(m)[:, None].repeat(k, 1)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                c[b, cy + dy, cx + dx] = EITHER + labels
        c[b, cy, cx] = labels
        p = np.zeros((m, 10))
        np.put_along_axis(p, labels, 1, 1)
        frames.append(x), present.append(p), cells.append(c[:, 1:-1, 1:-1])
    return [torch.from_numpy(np.concatenate(a)) for a in (frames, present, cells)]


def clip_training_batch(n, digits, split, frames, seed):
    """n clips of 1-2 digits, an eighth per (motion kind, digit count) -> clips uint8 [n,T,64,64], present [n,10],
    motion class [n] (index into MOTIONS). Shuffled: frames in random order; frozen: one frame repeated."""
    rng = np.random.default_rng(seed)
    clips, present, motion = [], [], []
    for c, kind in enumerate(MOTIONS):
        for k in (1, 2):
            cfg = MovingMNISTConfig(frames=frames, num_digits=k, speed=3.6 * (2 if kind == "fast" else 1))
            v, labels = moving_mnist(n // 8, digits, split, cfg, seed=int(rng.integers(2**31)))
            if kind == "shuffled":
                v = np.take_along_axis(v, rng.permuted(np.tile(np.arange(frames), (len(v), 1)), axis=1)[..., None, None], 1)
            if kind == "frozen":
                v = repeat(v[np.arange(len(v)), rng.integers(0, frames, len(v))], "n h w -> n t h w", t=frames)
            p = np.zeros((len(v), 10))
            np.put_along_axis(p, labels, 1, 1)
            clips.append(v), present.append(p), motion.append(np.full(len(v), c))
    return [torch.from_numpy(np.concatenate(a)) for a in (clips, present, motion)]


# ------------------------------------------------------------------------------------------------ nets
def conv_bn(cin, cout, k, stride, dims=2):
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    pad = tuple(s // 2 for s in k) if isinstance(k, tuple) else k // 2
    return nn.Sequential(conv(cin, cout, k, stride, pad, bias=False), bn(cout), nn.ReLU())


class DigitNet(nn.Module):
    """Digit detector slid over the frame: each cell of an 8x8 map (receptive field 41 px) says which digit, if any,
    is centred there (a softmax over 10 digits + none: one digit per place, so an ambiguous 2/7 cannot count
    twice); a digit is present where its best cell gives it probability > 0.5."""

    def __init__(self, width=24):
        super().__init__()
        w = width
        self.body = nn.Sequential(conv_bn(1, w, 5, 2), conv_bn(w, 2 * w, 3, 2), conv_bn(2 * w, 2 * w, 3, 1),
                                  conv_bn(2 * w, 4 * w, 3, 2), conv_bn(4 * w, 4 * w, 3, 1))
        self.head = nn.Conv2d(4 * w, 11, 1)

    def forward(self, x_B1HW):
        h = self.body(x_B1HW)                                   # [B,4W,8,8]
        return self.head(h), h.amax((2, 3))                     # cell logits [B,11,8,8], frame feature [B,4W]


def presence_prob(cell_logits):
    """[B,11,8,8] -> probability [B,10] that each digit is in the frame: its best cell's softmax probability."""
    return cell_logits.softmax(1)[:, :10].amax((2, 3))


class ClipNet(nn.Module):
    """Motion on top of appearance: a small 3D conv net over the frozen DigitNet's feature maps of every frame
    [B,C,T,8,8] -> (clip feature [B,W], digit logits [B,10], motion logits [B,4])."""

    def __init__(self, in_channels, width=64):
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_channels, width, (3, 3, 3), (1, 2, 2), 3),   # [B,W,T,4,4]
                                  conv_bn(width, width, (3, 3, 3), 1, 3))
        self.digits, self.motion = nn.Linear(width, 10), nn.Linear(width, len(MOTIONS))

    def forward(self, maps_BCTHW):
        f = self.body(maps_BCTHW).amax((3, 4)).mean(2)          # max over places, mean over time -> [B,W]
        return f, self.digits(f), self.motion(f)


@torch.no_grad()
def frame_maps(digit_net, clips_BTHW):
    """Float clips [B,T,64,64] in [0, 1] -> DigitNet feature maps of every frame [B,4W,T,8,8], ClipNet's input."""
    h = digit_net.body(rearrange(clips_BTHW, "b t h w -> (b t) 1 h w"))
    return rearrange(h, "(b t) c h w -> b c t h w", b=len(clips_BTHW))


def train(net, make_data, loss_fn, steps, batch, lr, seed, desc, chunk=100):
    """AdamW with a one-cycle schedule; data made `chunk` batches at a time by make_data(n, seed) -> tensors."""
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    device, g = next(net.parameters()).device, torch.Generator().manual_seed(seed)
    net.train()
    for i in tqdm(range(steps), desc=desc, mininterval=2):
        if i % chunk == 0:
            data = make_data(chunk * batch, seed * 1_000_003 + i)
            order = torch.randperm(len(data[0]), generator=g)
        idx = order[(i % chunk) * batch:(i % chunk + 1) * batch]
        loss = loss_fn(net, *(d[idx].to(device) for d in data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def digit_loss(net, x, present, cells):
    """BCE of the frame-level presence (what the detector is used for) + cross-entropy of each cell's target."""
    logits, _ = net(x[:, None].float() / 255)
    p = presence_prob(logits).clamp(1e-6, 1 - 1e-6)
    logp = logits.log_softmax(1)                                              # [B,11,8,8]
    cells = cells.long()
    either = cells >= EITHER
    lp = logp.gather(1, torch.where(either, cells - EITHER, cells)[:, None])[:, 0]
    lp = torch.where(either, torch.logaddexp(lp, logp[:, NONE]), lp)          # log p(digit or none)
    return F.binary_cross_entropy(p, present.float()) - lp.mean()


def clip_loss(net, digit_net, clips, present, motion):
    _, digits, kind = net(frame_maps(digit_net, clips.float() / 255))
    return F.binary_cross_entropy_with_logits(digits, present.float()) + F.cross_entropy(kind, motion)


@torch.no_grad()
def heldout_accuracy(digit_net, clip_net, digits, cfg):
    """Accuracy on held-out digits. DigitNet: exact match of the detected digit SET per frame (every digit found,
    nothing extra), over 4000 two-digit frames, on the frames whose digits' ink boxes are disjoint (fully visible:
    the headline figure), on all of them (digits may cross), and on 2000 one-digit frames. ClipNet: exact digit set
    and motion class over 400 clips."""
    device = next(digit_net.parameters()).device
    out = {}
    for k, n, name in ((2, 4000, "digit_net_acc"), (1, 2000, "digit_net_acc_one_digit")):
        x, labels, boxes = digit_frames(n, k, digits, "test", seed=cfg.seed + 7)
        present = detect(digit_net, torch.from_numpy(x)[:, None].float().div(255).to(device))[0].cpu()
        truth = torch.zeros(n, 10, dtype=torch.bool).scatter_(1, torch.from_numpy(labels), True)
        hit = (present == truth).all(1).numpy()
        out[name] = float(hit[separated(boxes)].mean() if k == 2 else hit.mean())
        if k == 2:
            out["digit_net_acc_all_frames"] = float(hit.mean())
    clips, present, motion = clip_training_batch(400, digits, "test", cfg.clip_frames, seed=cfg.seed + 7)
    _, dig, kind = batched(lambda v: clip_net(frame_maps(digit_net, v)), clips.float() / 255, device, size=16)
    out["clip_net_digit_acc"] = ((dig > 0) == present.bool()).all(1).float().mean().item()
    out["clip_net_motion_acc"] = (kind.argmax(1) == motion).float().mean().item()
    return out


def load_nets(cfg=EvalNetConfig(), cache_dir=None, device="cpu", digits=None):
    """Train DigitNet and ClipNet (or load them from <cache_dir>/<hash of cfg and digit source>.pt).
    -> (digit_net, clip_net, info) with info holding the held-out accuracies and training seconds."""
    digits = digits or load_digits(download=False)
    key = hashlib.sha1(json.dumps([VERSION, asdict(cfg), digits.source], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or CACHE_DIR) / f"{key}.pt"
    with torch.random.fork_rng():          # the seed fixes the initial weights too, without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        digit_net, clip_net = DigitNet(cfg.width).to(device), ClipNet(4 * cfg.width, cfg.clip_width).to(device)
    if path.exists():
        ckpt = torch.load(path, map_location=device, weights_only=True)
        digit_net.load_state_dict(ckpt["digit_net"]), clip_net.load_state_dict(ckpt["clip_net"])
        return digit_net.eval(), clip_net.eval(), ckpt["info"]
    print(f"[eval] training the feature nets on {digits.source} (cached to {path})")
    t0 = time.time()          # each chunk of batches draws from freshly jittered digits (augmentation)
    train(digit_net, lambda n, s: digit_training_frames(n, jitter_digits(digits, cfg.jitter_copies, s), s),
          digit_loss, cfg.steps, cfg.batch, cfg.lr, cfg.seed, "DigitNet")
    t1 = time.time()
    train(clip_net, lambda n, s: clip_training_batch(n, jitter_digits(digits, cfg.jitter_copies, s), "train",
                                                     cfg.clip_frames, s),
          lambda net, *batch: clip_loss(net, digit_net, *batch),
          cfg.clip_steps, cfg.clip_batch, cfg.lr, cfg.seed, "ClipNet", chunk=25)
    info = {"digit_net_train_s": t1 - t0, "clip_net_train_s": time.time() - t1, "digit_source": digits.source,
            **heldout_accuracy(digit_net, clip_net, digits, cfg)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(cfg), "digit_net": digit_net.state_dict(), "clip_net": clip_net.state_dict(),
                "info": info}, path)
    return digit_net, clip_net, info


# ---------------------------------------------------------------------------------------------- features
def to_unit(video):
    """uint8 [N,T,H,W(,C)] -> float [N,T,64,64] grayscale in [0, 1], the nets' input (bilinear if H, W != 64)."""
    x = torch.from_numpy(check_video(video)).float().mean(-1) / 255             # [N,T,H,W]
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    return x


@torch.no_grad()
def batched(net, x, device, size=256):
    """Run net over x in batches on device -> its output(s), concatenated on the CPU, as a list."""
    outs = [net(x[i:i + size].to(device)) for i in range(0, len(x), size)]
    outs = [o if isinstance(o, tuple) else (o,) for o in outs]
    return [torch.cat([o[j] for o in outs]).cpu() for j in range(len(outs[0]))]


@torch.no_grad()
def detect(digit_net, frames_B1HW):
    """-> present bool [B,10] (a digit's best cell has probability > 0.5), frame features [B,4W]."""
    logits, feats = digit_net(frames_B1HW)
    return presence_prob(logits) > 0.5, feats


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to features a [N,D] and b [M,D] (Heusel et al. 2017, eq. 6):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), with tr((S_a S_b)^1/2) = sum sqrt eig(S_a^1/2 S_b S_a^1/2)."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    tr_cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * tr_cross).item()


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic max_x |F_a(x) - F_b(x)| in [0, 1]."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True) / len(a)
    fb = torch.searchsorted(b, grid, right=True) / len(b)
    return (fa - fb).abs().max().item()


def motion_score(x, real):
    """x, real float [N,T,H,W] in [0, 1] (T >= 3) -> score in [0, 1]; see the module docstring."""
    def stats(v):
        return ((v[:, 1:] - v[:, :-1]).abs().mean((2, 3)).flatten(),
                (v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]).abs().mean((2, 3)).flatten())
    return 1 - sum(ks_statistic(g, r) for g, r in zip(stats(x), stats(real))) / 2


def ssim(x, y):
    """SSIM (Wang et al. 2004) of images [M,C,H,W] in [0, 1] -> [M]: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, averaged over the window positions that fit in the image and over channels."""
    g = torch.exp(-(torch.arange(11) - 5.0).square() / (2 * 1.5**2))
    w = repeat(torch.outer(g, g) / g.sum() ** 2, "h w -> c 1 h w", c=x.shape[1])
    def blur(z):
        return F.conv2d(z, w, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def prediction_metrics(pred, target, samples=None):
    """pred uint8 [N*S,T,H,W(,C)] where clip n*S + s is sample s for context n; target [N,T,H,W(,C)] the true frames.
    -> mse, mae, ssim, psnr averaged over samples (and *_best: the best sample per context, when S > 1)."""
    p = torch.from_numpy(check_video(pred, "videos")).float() / 255
    y = torch.from_numpy(check_video(target, "target")).float() / 255
    s = samples or len(p) // max(len(y), 1)
    if len(p) != s * len(y) or p.shape[1:] != y.shape[1:]:
        raise ValueError(f"videos {tuple(p.shape)} do not match target {tuple(y.shape)} with {s} samples per clip")
    p = rearrange(p, "(n s) t h w c -> n s t h w c", s=s)
    y = repeat(y, "n t h w c -> n s t h w c", s=s)
    err = p - y
    per_frame = {                                                                  # each [N,S,T]
        "mse": err.square().mean(-1).sum((-2, -1)),
        "mae": err.abs().mean(-1).sum((-2, -1)),
        "ssim": ssim(rearrange(p, "n s t h w c -> (n s t) c h w"),
                     rearrange(y, "n s t h w c -> (n s t) c h w")).view(p.shape[:3]),
        "psnr": 10 * torch.log10(1 / err.square().mean((-3, -2, -1)).clamp(min=1e-10)),  # 100 dB when identical
    }
    out = {"samples": s}
    for name, v in per_frame.items():
        v = v.mean(-1)                                                             # [N,S] per sample
        out[name] = v.mean().item()
        if s > 1:
            best = v.min(1).values if name in ("mse", "mae") else v.max(1).values
            out[name + "_best"] = best.mean().item()
    return out


# ------------------------------------------------------------------------------------- I3D (standard FVD)
def same_pad(x, kernel, stride):
    """TensorFlow 'SAME' padding of [B,C,T,H,W] (output size ceil(in / stride), the extra pixel at the end)."""
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        p = max(k - (s if size % s == 0 else size % s), 0)
        pads += [p // 2, p - p // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """Conv3d + BatchNorm + ReLU with 'SAME' padding; parameter names as in pytorch-i3d so its checkpoints load."""

    def __init__(self, cin, cout, k=1, stride=1, bn=True, relu=True):
        super().__init__()
        self.k, self.stride, self.relu = (k,) * 3, (stride,) * 3, relu
        self.conv3d = nn.Conv3d(cin, cout, k, stride, bias=not bn)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else nn.Identity()

    def forward(self, x):
        x = self.bn(self.conv3d(same_pad(x, self.k, self.stride)))
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    def __init__(self, k, stride):
        super().__init__()
        self.k, self.stride = k, stride

    def forward(self, x):
        return F.max_pool3d(same_pad(x, self.k, self.stride), self.k, self.stride)


class Inception(nn.Module):
    """Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated on channels."""

    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], 3)
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], 3)
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class I3D(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017), the network of the standard FVD (Unterthiner et al. 2018).
    x [B,3,T,224,224] in [-1, 1] -> logits [B,400] (the FVD embedding); `features` -> the 1024-d pooled features."""

    MIXED = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
             "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
             "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
             "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
             "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}

    def __init__(self, num_classes=400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2)
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        for name, (cin, c) in self.MIXED.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
            self.add_module(name, Inception(cin, c))
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False)

    def pooled(self, x):                                    # -> [B,1024,T/8-1,1,1]
        for name, module in self.named_children():
            if name != "logits":
                x = module(x)
        return F.avg_pool3d(x, (2, 7, 7), stride=1)         # [B,1024,T/8,7,7] -> 2x7x7 windows

    def features(self, x):
        return self.pooled(x).mean((2, 3, 4))

    def forward(self, x):
        return self.logits(self.pooled(x)).mean((2, 3, 4))


def i3d_input(video):
    """uint8 [N,T,H,W(,C)] -> [N,3,T,224,224] in [-1, 1], the FVD preprocessing (bilinear resize)."""
    x = torch.from_numpy(check_video(video)).float()
    x = repeat(x, "n t h w 1 -> (n t) 3 h w") if x.shape[-1] == 1 else rearrange(x, "n t h w c -> (n t) c h w")
    x = F.interpolate(x, size=(224, 224), mode="bilinear") / 127.5 - 1
    return rearrange(x, "(n t) c h w -> n c t h w", n=len(video))


# ---------------------------------------------------------------------------------------------- evaluate
def real_clips(n, frames, size, num_digits, digits, speed=3.6):
    """The real reference: n held-out Moving MNIST clips (fixed seed), digits scaled with the canvas."""
    cfg = MovingMNISTConfig(size=size, frames=frames, num_digits=num_digits, digit_size=round(28 * size / 64),
                            speed=speed * size / 64)
    return moving_mnist(n, digits, "test", cfg, seed=REAL_SEED)[0]


@torch.no_grad()
def digit_scores(present, prompts=None):
    """present bool [N,T,10] (the digits DigitNet detects in each frame) -> consistency, and semantic if prompts
    (N lists of digits) are given; see the module docstring for both definitions."""
    majority = present.float().mean(1) > 0.5                                 # [N,10] each clip's digit set
    agree = (present == majority[:, None]).all(2) & majority[:, None].any(2)  # [N,T]
    out = {"consistency": agree.float().mean().item(), "consistency_se": standard_error(agree)}
    if prompts is not None:
        if len(prompts) != len(present):
            raise ValueError(f"{len(prompts)} prompts for {len(present)} clips")
        wanted = torch.zeros(len(present), 10, dtype=torch.bool)
        for i, p in enumerate(prompts):
            wanted[i, list(p)] = True
        hit = (present == wanted[:, None]).all(2)                           # [N,T]
        out["semantic"], out["semantic_se"] = hit.float().mean().item(), standard_error(hit)
        out["semantic_first"] = hit[:, 0].float().mean().item()
    return out


def standard_error(per_frame):
    """Standard error of a frame score's mean, bool [N,T], over clips: the frames of a clip are not independent
    (one misdrawn digit spoils all of them), so the clip is the sample: std of the N clip means / sqrt(N)."""
    clip_means = per_frame.float().mean(1)
    return (clip_means.std() / len(clip_means) ** 0.5).item() if len(clip_means) > 1 else float("nan")


@torch.no_grad()
def quick_scores(videos, prompts, digit_net, device="cpu"):
    """Semantic and consistency alone (DigitNet only, no reference clips): cheap enough to run at every checkpoint
    of a training run, for learning curves (train.py --curve). uint8 clips [N,T,H,W(,C)], N prompts."""
    x = to_unit(videos)
    present = batched(lambda f: detect(digit_net, f), rearrange(x, "n t h w -> (n t) 1 h w"), device)[0]
    return digit_scores(rearrange(present, "(n t) d -> n t d", n=len(x)), prompts)


def evaluate(videos, prompts=None, target=None, samples=None, nets=None, num_real=256, device="cpu",
             i3d=None, digits=None, speed=3.6):
    """All metrics for uint8 clips [N,T,H,W(,C)] -> dict (see the module docstring for each name).

    prompts: N lists of digits (what each clip should show); target: true frames [N/S,T,H,W(,C)] for the
    prediction metrics; nets: (digit_net, clip_net, info) from load_nets (trained / loaded here if None);
    i3d: an I3D with loaded weights, or a path to its state dict, for the standard FVD; speed: of the real
    reference clips' digits (px/frame at 64 px), as in the data the clips imitate."""
    videos = check_video(videos, "videos")
    n, t, h, w, _ = videos.shape
    if h != w:
        raise ValueError(f"eval.py scores square Moving MNIST frames only (its nets read 64x64), got {h}x{w}")
    digits = digits or load_digits(download=False, verbose=False)
    digit_net, clip_net, info = nets or load_nets(device=device, digits=digits)
    num_digits = 2 if prompts is None else int(np.bincount([len(set(p)) for p in prompts]).argmax())
    real = real_clips(num_real, t, h, num_digits, digits, speed)
    x, xr = to_unit(videos), to_unit(real)                                   # [N,T,64,64], [R,T,64,64]
    frames = rearrange(x, "n t h w -> (n t) 1 h w")
    present, frame_feats = batched(lambda f: detect(digit_net, f), frames, device)
    present = rearrange(present, "(n t) d -> n t d", n=n)                    # [N,T,10] detected digits
    real_frame_feats = batched(lambda f: detect(digit_net, f), rearrange(xr, "n t h w -> (n t) 1 h w"), device)[1]
    clip_feats, real_clip_feats = (batched(lambda c: clip_net(frame_maps(digit_net, c)), v, device, size=16)[0]
                                   for v in (x, xr))                          # [N,W], [R,W]
    out = {"clips": n, "frames": t, "real_clips": num_real, **digit_scores(present, prompts),
           "fid_mm": frechet_distance(frame_feats, real_frame_feats),
           "fvd_mm": frechet_distance(clip_feats, real_clip_feats),
           "motion": motion_score(x, xr) if t >= 3 else None}
    if target is not None:
        out.update(prediction_metrics(videos, target, samples))
    if i3d is not None:
        if not isinstance(i3d, nn.Module):
            path, i3d = i3d, I3D()
            i3d.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        i3d = i3d.to(device).eval()
        logits = [torch.cat([i3d(i3d_input(v[i:i + 8]).to(device)).cpu() for i in range(0, len(v), 8)])
                  for v in (videos, real)]                                  # [N,400], [R,400]
        out["fvd"] = frechet_distance(*logits)
    return {**out, **info}


def read_prompts(path):
    """One line per clip, digits separated by spaces ("3 7")."""
    try:
        prompts = [[int(d) for d in line.split()] for line in Path(path).read_text().splitlines()]
    except (ValueError, UnicodeDecodeError):
        prompts = None
    if prompts is None or not prompts or any(not p or not all(0 <= d <= 9 for d in p) for p in prompts):
        raise ValueError(f"{path}: allowed one line per clip, each of digits 0-9 separated by spaces")
    return prompts


def read_inputs(p, args):
    """Every flag and input file, before the feature nets are trained or loaded (issue 20): p.error on a bad one.
    -> (videos, prompts or None, target or None)."""
    check_flags(p, args, {"samples": "[1, 1e6]", "num_real": "[2, 1e5]", "speed": "[0, 64]", "seed": SEED})
    check_device(p, args.device)
    for flag, kind in (("videos", "file"), ("prompts", "file"), ("target", "file"), ("i3d", "file"),
                       ("json", "out"), ("cache", "outdir")):
        check_path(p, "--" + flag, getattr(args, flag), kind)
    try:
        videos = load_clips(args.videos)
        target = load_clips(args.target) if args.target else None
        prompts = read_prompts(args.prompts) if args.prompts else None
    except (TypeError, ValueError) as e:
        p.error(str(e))
    h, w = check_video(videos).shape[2:4]
    if h != w:   # the nets read 64x64 Moving MNIST; a rectangular frame would be stretched, its digits too
        p.error(f"--videos {args.videos}: frames of {h}x{w}; eval.py scores square Moving MNIST frames only (the "
                f"digit and clip nets read 64x64)")
    if prompts is not None and len(prompts) != len(videos):
        p.error(f"--prompts {args.prompts}: {len(prompts)} lines for {len(videos)} clips in --videos; allowed one "
                f"line per clip")
    if target is not None:
        s = args.samples or len(videos) // len(target)
        if len(videos) != s * len(target) or check_video(videos).shape[1:] != check_video(target).shape[1:]:
            p.error(f"--target {args.target}: shape {target.shape} does not fit --videos {videos.shape} with {s} "
                    f"samples per clip; allowed [N/S,T,H,W(,C)] with the videos' T, H, W, C")
    return videos, prompts, target


def main(argv=None):
    ap = Parser(prog="eval.py", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Metric definitions:\n" + __doc__.split("Metrics")[1])
    ap.add_argument("--videos", required=True, help="generated clips: uint8 .npy [N,T,H,W] or [N,T,H,W,C]")
    ap.add_argument("--prompts", help="text file, one line per clip with its digits separated by spaces (for semantic)")
    ap.add_argument("--target", help="true continuation .npy [N/S,T,H,W(,C)] for mse / mae / ssim / psnr")
    ap.add_argument("--samples", type=int, help="samples per target clip (default: #videos / #targets); "
                                                "clip n*S + s is sample s of context n")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the feature nets' training (part of the cache key)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--num-real", type=int, default=256, help="real held-out reference clips for the distances")
    ap.add_argument("--speed", type=float, default=3.6, help="digit speed (px/frame on a 64-px canvas) of the real "
                                                             "reference clips: the generated clips' data (toy: 1.5)")
    ap.add_argument("--cache", default=str(CACHE_DIR), help="where trained feature nets are cached "
                                                            "(default: $VIDEOAR_EVAL_CACHE or ~/.cache/videoar/eval)")
    ap.add_argument("--i3d", help="I3D Kinetics-400 state dict (pytorch-i3d layout, e.g. rgb_imagenet.pt) for the "
                                  "standard FVD; nothing is downloaded")
    args = ap.parse_args(argv)
    videos, prompts, target = read_inputs(ap, args)
    digits = load_digits(download=False)
    nets = load_nets(EvalNetConfig(seed=args.seed), args.cache, args.device, digits)
    res = evaluate(videos, prompts, target, args.samples, nets, args.num_real, args.device, args.i3d, digits,
                   args.speed)
    for k, v in res.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
