"""Data: Moving MNIST (Srivastava et al. 2015), digit sources, and loaders for the user's own clips.

Clips are uint8 arrays [N, T, H, W] (grayscale) or [N, T, H, W, C]; the model side is float [B, C, T, H, W]
in [-1, 1] (`to_model` / `from_model` convert, and check what they are given).

Digit sources, tried in order by `load_digits`:
  1. full MNIST (4 IDX .gz files, md5-checked) in `--data-dir`; downloaded there when a network is reachable;
  2. the layout of ../shared/data/mnist (test images only: 0-7999 train, 8000-9999 held out);
  3. digits this module draws itself (strokes with random jitter) -- with a warning, since they are not MNIST.
The train / held-out split is fixed per source, so evaluation never sees a training digit.
"""
import gzip
import hashlib
import os
import struct
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from config import SEED, Parser, check_flags, check_path

REPO = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path(os.environ.get("VIDEOAR_DATA", Path.home() / ".cache" / "videoar" / "mnist"))
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
TEST_ONLY_SPLIT = 8000  # with only the 10k test digits: [0, 8000) train, [8000, 10000) held out


# ----------------------------------------------------------------------------------------------- digits
@dataclass
class Digits:
    """28x28 uint8 digit images with labels, split into train / held-out. `source` says where they came from."""
    train_images: np.ndarray  # [N, 28, 28] uint8
    train_labels: np.ndarray  # [N] int64
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def split(self, name):
        if name == "train":
            return self.train_images, self.train_labels
        if name in ("test", "heldout"):
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}: use 'train' or 'test'")


def read_idx(path):
    """Parse an IDX file (optionally .gz): magic 0x0000 0x08 ndim, big-endian dims, uint8 payload."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} bytes for dims {dims})")
    return data.reshape(dims)


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _fetch_mnist(data_dir):
    """Download missing MNIST files into data_dir (md5-checked). Returns True when all four are there."""
    data_dir = Path(data_dir)
    for name, md5 in MNIST_MD5.items():
        dst = data_dir / name
        if dst.exists() and _md5(dst) == md5:
            continue
        if dst.exists():
            print(f"[data] {dst} is corrupt or truncated (md5 mismatch); downloading it again")
        data_dir.mkdir(parents=True, exist_ok=True)
        for mirror in MNIST_MIRRORS:
            try:
                tmp = dst.with_suffix(".part")
                with urllib.request.urlopen(mirror + name, timeout=10) as r:
                    tmp.write_bytes(r.read())
                if _md5(tmp) != md5:
                    tmp.unlink()
                    raise OSError("md5 mismatch")
                tmp.replace(dst)
                break
            except OSError as e:
                print(f"[data] could not fetch {mirror + name}: {e}")
        else:
            return False
    return True


def load_digits(data_dir=None, download=True, allow_synthetic=True, verbose=True):
    """The best digit source available (see module docstring)."""
    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    full = all((data_dir / n).exists() and _md5(data_dir / n) == m for n, m in MNIST_MD5.items())
    if not full and download and not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        if verbose:
            print(f"[data] downloading MNIST into {data_dir} ...")
        full = _fetch_mnist(data_dir)
        if not full and verbose:
            print("[data] MNIST could not be downloaded (offline?); trying local copies")
    if full:
        return Digits(read_idx(data_dir / "train-images-idx3-ubyte.gz"),
                      read_idx(data_dir / "train-labels-idx1-ubyte.gz").astype(np.int64),
                      read_idx(data_dir / "t10k-images-idx3-ubyte.gz"),
                      read_idx(data_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64), f"MNIST ({data_dir})")
    for d in (data_dir, SHARED_MNIST):
        img, lab = d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz"
        bad = [f for f in (img, lab) if f.exists() and _md5(f) != MNIST_MD5[f.name]]
        if bad:   # a corrupt or truncated copy is never read: the next source is tried instead
            print(f"[data] {', '.join(map(str, bad))}: md5 mismatch (corrupt or truncated); not using it. Delete it "
                  f"to let it be fetched again")
        elif img.exists() and lab.exists():
            x, y = read_idx(img), read_idx(lab).astype(np.int64)
            s = TEST_ONLY_SPLIT
            return Digits(x[:s], y[:s], x[s:], y[s:], f"MNIST test digits ({d}), split {s}/{len(x) - s}")
    if not allow_synthetic:
        raise FileNotFoundError(f"no MNIST files in {data_dir} or {SHARED_MNIST}, and synthetic digits not allowed")
    warnings.warn("No MNIST digits found or downloadable: using digits drawn by data.py (NOT real MNIST; "
                  "figures measured on them are not comparable to MNIST ones).")
    return synthetic_digits(seed=0)


# Stroke templates for drawn digits, in a 0..1 box: a list of polylines per digit.
_STROKES = {
    0: [[(.3, .15), (.7, .15), (.8, .5), (.7, .85), (.3, .85), (.2, .5), (.3, .15)]],
    1: [[(.35, .3), (.55, .12), (.55, .88)]],
    2: [[(.22, .3), (.4, .13), (.7, .15), (.75, .4), (.22, .86), (.8, .86)]],
    3: [[(.22, .15), (.75, .15), (.45, .45), (.75, .62), (.65, .85), (.22, .85)]],
    4: [[(.65, .88), (.65, .12), (.2, .62), (.82, .62)]],
    5: [[(.75, .14), (.3, .14), (.25, .45), (.68, .48), (.72, .78), (.25, .86)]],
    6: [[(.7, .14), (.3, .45), (.25, .78), (.5, .87), (.72, .7), (.55, .52), (.3, .6)]],
    7: [[(.2, .15), (.8, .15), (.42, .88)]],
    8: [[(.5, .5), (.25, .3), (.5, .13), (.75, .3), (.5, .5), (.22, .7), (.5, .87), (.78, .7), (.5, .5)]],
    9: [[(.7, .45), (.4, .5), (.3, .3), (.5, .13), (.72, .3), (.7, .86)]],
}


def synthetic_digits(n_train=8000, n_test=2000, seed=0):
    """Draw 28x28 digits from stroke templates with random affine jitter and stroke width (no MNIST needed)."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, d in enumerate(labels):
        im = Image.new("L", (28, 28))
        draw = ImageDraw.Draw(im)
        a = np.eye(2) + rng.normal(0, 0.08, (2, 2))  # jitter: shear, scale, rotation
        shift = rng.normal(0, 0.03, 2)
        for line in _STROKES[int(d)]:
            pts = [tuple(((a @ (np.array(p) - .5) + .5 + shift) * 20 + 4).tolist()) for p in line]
            draw.line(pts, fill=255, width=int(rng.integers(2, 4)), joint="curve")
        images[i] = np.asarray(im.filter(ImageFilter.GaussianBlur(0.6)))
    labels = labels.astype(np.int64)
    return Digits(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], "synthetic drawn digits")


# ----------------------------------------------------------------------------------------- Moving MNIST
@dataclass
class MovingMNISTConfig:
    size: int = 64          # canvas height H, and width W unless `width`
    width: int = 0          # canvas width W for a rectangular canvas; 0 = size (square)
    frames: int = 20
    num_digits: int = 2
    speed: float = 3.6      # pixels per frame (Srivastava et al.: step 0.1 of the (64-28) range)
    digit_size: int = 28


def mm_config(cfg, frames=None):
    """The Moving MNIST clips of a run's config.Config: its clip length, or `frames` frames."""
    return MovingMNISTConfig(size=cfg.size, width=cfg.canvas_w, frames=frames or cfg.frames, num_digits=cfg.num_digits,
                             speed=cfg.speed)


def moving_mnist(n, digits: Digits, split="train", cfg=MovingMNISTConfig(), seed=0):
    """Generate n bouncing-digit clips, deterministic in `seed`.

    Returns video uint8 [n, T, H, W] and labels int64 [n, num_digits]: the digits each clip shows, listed left to
    right as they stand in the first frame (the prompt for conditional generation; an ordered prompt says which
    digit is where, see model.Transformer.condition). Each digit starts at a uniform position with a uniform
    direction and moves at `speed` px/frame, reflecting off the walls; overlapping digits combine by pixel-wise max.
    """
    images, labels = digits.split(split)
    rng = np.random.default_rng(seed)
    height, width = cfg.size, cfg.width or cfg.size
    lim = np.array([height, width]) - cfg.digit_size                    # (y, x) room of a digit's corner
    if lim.min() < 0:
        raise ValueError(f"canvas {height}x{width} is smaller than a digit ({cfg.digit_size})")
    idx = rng.integers(0, len(images), (n, cfg.num_digits))
    pos = rng.uniform(0, lim, (n, cfg.num_digits, 2))                    # (y, x)
    pos = np.take_along_axis(pos, np.argsort(pos[..., 1], 1, kind="stable")[..., None], 1)   # left to right
    theta = rng.uniform(0, 2 * np.pi, (n, cfg.num_digits))
    vel = cfg.speed * np.stack([np.sin(theta), np.cos(theta)], -1)      # [n, D, 2]
    traj = np.empty((cfg.frames, n, cfg.num_digits, 2), np.int64)
    for f in range(cfg.frames):                                          # bounce: reflect position and velocity
        traj[f] = np.round(pos)
        pos = pos + vel
        for _ in range(2):
            low, high = pos < 0, pos > lim
            pos = np.where(low, -pos, np.where(high, 2 * lim - pos, pos))
            vel = np.where(low | high, -vel, vel)
    glyphs = images[idx]
    if cfg.digit_size != glyphs.shape[-1]:
        glyphs = F.interpolate(torch.from_numpy(glyphs).float().flatten(0, 1)[:, None], size=cfg.digit_size,
                               mode="bilinear", antialias=True).round().clamp(0, 255).byte()[:, 0]
        glyphs = glyphs.view(n, cfg.num_digits, cfg.digit_size, cfg.digit_size).numpy()
    video = np.zeros((n, cfg.frames, height, width), np.uint8)
    s = cfg.digit_size
    for f in range(cfg.frames):
        for b in range(n):
            for d in range(cfg.num_digits):
                y, x = traj[f, b, d]
                np.maximum(video[b, f, y:y + s, x:x + s], glyphs[b, d], out=video[b, f, y:y + s, x:x + s])
    return video, labels[idx]


def load_mnist_test_seq(path):
    """The standard Moving MNIST test file: uint8 (20, N, 64, 64), time first -> [N, 20, 64, 64]."""
    x = np.load(path)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"{path}: expected uint8 (T, N, H, W) as in mnist_test_seq.npy, got {x.dtype} {x.shape}")
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3))


# -------------------------------------------------------------------------------------- user's own clips
VIDEO_EXTS = (".npy", ".gif", ".mp4")


def _read_clip_file(path):
    """One file -> uint8 [N, T, H, W, C]."""
    if path.suffix == ".npy":
        x = np.load(path)
        if x.dtype != np.uint8:
            raise ValueError(f"dtype {x.dtype}, expected uint8")
        x = {3: x[None, ..., None], 4: x[..., None] if x.shape[-1] not in (1, 3) else x[None], 5: x}.get(x.ndim)
        if x is None:
            raise ValueError("expected [T,H,W], [T,H,W,C], [N,T,H,W] or [N,T,H,W,C]")
        return x
    if path.suffix.lower() == ".gif":
        return _read_gif(path)[None]
    import imageio.v3 as iio
    x = np.asarray(iio.imread(path, index=None))                     # [T,H,W(,C)]
    x = x[..., None] if x.ndim == 3 else x
    return x[None, ..., :3].astype(np.uint8)


def _read_gif(path):
    """GIF -> uint8 [T,H,W,3], every frame made RGB by Pillow itself.

    Pillow drops a palette that is the plain grey ramp (0, 1, 2, ...) and reads that frame as 'L'; a later frame with
    a palette of its own then decodes wrongly ("No packer found from P to L"). A grey first frame that uses every
    level, common in save_gif's grey clips, gets such a palette; keeping every palette reads it like any palette GIF.
    """
    from PIL import GifImagePlugin, ImageSequence

    class KeepPalettes(GifImagePlugin.GifImageFile):
        def _is_palette_needed(self, p):
            return True

    with KeepPalettes(path) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


def load_clip_folder(folder, frames, size, channels=1):
    """Every .npy/.gif/.mp4 in `folder`, resized to size x size, cut to `frames` frames -> uint8 [N, T, H, W(, C)].

    Clips longer than `frames` are cut into as many whole windows as fit; shorter ones are an error.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in VIDEO_EXTS) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no {'/'.join(VIDEO_EXTS)} clips found")
    out = []
    for p in files:
        try:
            x = _read_clip_file(p)
        except Exception as e:
            raise ValueError(f"{p}: cannot read clip ({type(e).__name__}: {e})") from e
        if x.shape[1] < frames:
            raise ValueError(f"{p}: {x.shape[1]} frames, need at least {frames}")
        c = x.shape[-1]
        v = torch.from_numpy(x).float()
        if channels == 1 and c != 1:
            v = v[..., :3].mean(-1, keepdim=True)
        elif channels == 3 and c == 1:
            v = v.expand(*v.shape[:-1], 3)
        n, length = v.shape[:2]
        v = v[:, :length // frames * frames].reshape(-1, frames, *v.shape[2:])      # whole windows
        v = F.interpolate(v.permute(0, 1, 4, 2, 3).flatten(0, 1), size=(size, size), mode="bilinear",
                          antialias=True).view(v.shape[0], frames, channels, size, size).permute(0, 1, 3, 4, 2)
        out.append(v.round().clamp(0, 255).byte().numpy())
    x = np.concatenate(out)
    return x[..., 0] if channels == 1 else x


# ----------------------------------------------------------------------------------------- conversions
def check_video(video, name="video"):
    """Validate a uint8 clip array [N,T,H,W] or [N,T,H,W,C]; return it as [N,T,H,W,C]."""
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8:
        raise TypeError(f"{name}: expected a uint8 array, got {getattr(video, 'dtype', type(video))}")
    if video.ndim == 4:
        video = video[..., None]
    if video.ndim != 5 or video.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected shape [N,T,H,W] or [N,T,H,W,C] with C in (1, 3), got {video.shape}")
    return video


def load_clips(path):
    """A .npy of uint8 clips [N,T,H,W] or [N,T,H,W,C] with at least one clip of one frame, as stored; a ValueError
    or TypeError naming the file otherwise (the scripts check their input files with this before any work)."""
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e
    check_video(x, str(path))
    if 0 in x.shape:
        raise ValueError(f"{path}: empty, shape {x.shape}")
    return x


def to_model(video, device="cpu"):
    """uint8 [N,T,H,W(,C)] -> float [N,C,T,H,W] in [-1, 1]."""
    v = torch.from_numpy(check_video(video)).to(device)
    return v.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


def from_model(x, squeeze=True):
    """float [N,C,T,H,W] in [-1, 1] -> uint8 [N,T,H,W] (C=1, squeeze) or [N,T,H,W,C]."""
    v = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
    return v[..., 0] if squeeze and v.shape[-1] == 1 else v


def save_gif(path, video, fps=8, scale=2):
    """uint8 [N,T,H,W(,C)] -> one GIF with the N clips side by side, upscaled for viewing."""
    import imageio.v3 as iio
    v = check_video(video)
    v = np.concatenate(list(v), axis=2)                              # [T, H, N*W, C], clips side by side
    v = v.repeat(scale, 1).repeat(scale, 2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, v[..., 0] if v.shape[-1] == 1 else v, duration=1000 / fps, loop=0)


def save_mp4(path, video, fps=8):
    import imageio.v3 as iio
    v = np.concatenate(list(check_video(video)), axis=2)
    try:
        iio.imwrite(path, v.repeat(3, -1) if v.shape[-1] == 1 else v, fps=fps)
    except Exception as e:
        raise RuntimeError(f"writing {path} needs an mp4 backend: pip install imageio[ffmpeg] ({e})") from e


def main(argv=None):
    """Write Moving MNIST clips to look at, reconstruct or score: uint8 .npy [N,T,H,W], their digits in a .txt
    beside it (one line per clip, what eval.py --prompts reads), and optionally a GIF."""
    p = Parser(description=main.__doc__.split(":")[0], prog="data.py")
    p.add_argument("--npy", required=True, help="output clips, uint8 [N,T,H,W]; the prompts go to the same name .txt")
    p.add_argument("--num", type=int, default=8, help="number of clips")
    p.add_argument("--frames", type=int, default=13, help="frames per clip")
    p.add_argument("--num-digits", "--digits", dest="num_digits", type=int, default=2,
                   help="digits per clip (the toy preset: 1), as train.py's --num-digits")
    p.add_argument("--speed", type=float, default=3.6, help="digit speed in pixels per frame (the toy preset: 1.5)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="digit images to use (test = held out)")
    p.add_argument("--gif", help="also write a GIF of the first 8 clips")
    p.add_argument("--data-dir", default=None, help="directory with full MNIST IDX files")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    check_flags(p, args, {"num": "[1, 1e5]", "frames": "[1, 1e5]", "num_digits": "[1, 10]", "speed": "[0, 64]",
                       "seed": SEED})
    for flag, suffix in (("npy", ".npy"), ("gif", ".gif")):
        check_path(p, "--" + flag, getattr(args, flag), "out")
        if getattr(args, flag) and Path(getattr(args, flag)).suffix.lower() != suffix:
            p.error(f"--{flag} {getattr(args, flag)!r}: allowed a file name ending in {suffix}")
    if args.data_dir is not None:
        check_path(p, "--data-dir", args.data_dir, "outdir")
    video, labels = moving_mnist(args.num, load_digits(args.data_dir), args.split,
                                 MovingMNISTConfig(frames=args.frames, num_digits=args.num_digits, speed=args.speed), seed=args.seed)
    Path(args.npy).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.npy, video)
    Path(args.npy).with_suffix(".txt").write_text("".join(" ".join(map(str, l)) + "\n" for l in labels))
    if args.gif:
        save_gif(args.gif, video[:8])
    print(f"[data] {video.shape} uint8 -> {args.npy} (+ {Path(args.npy).with_suffix('.txt')})")


if __name__ == "__main__":
    main()
