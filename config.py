"""One config for every script: presets (`--config toy` is the CPU default), flags derived from the fields,
device choice, and the checks of every flag before any work (checkpoints that carry a config: checkpoint.py).

Each field of `Config` is a flag (`--tok-steps 500`); its help is the field's comment. A preset only overrides
some fields; the rest keep the defaults written here.
"""
import argparse
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from model import ModelConfig, grid_of, hw
from tokenizer import TokenizerConfig


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data (Moving MNIST, data.py)
    size: int = _f(64, "frame side in pixels: the height, and the width unless --canvas-w")
    canvas_w: int = _f(0, "frame width in pixels for rectangular frames (paper A: 384x672 = --size 384 --canvas-w "
                          "672); 0 = square, --size")
    frames: int = _f(13, "frames per training clip (1 + ft*k)")
    num_digits: int = _f(2, "digits per clip")
    speed: float = _f(3.6, "digit speed in pixels per frame")
    data_dir: str = _f("", "directory with full MNIST IDX files (default: ~/.cache/videoar/mnist)")
    # tokenizer (tokenizer.py)
    ft: int = _f(4, "frames per latent frame (temporal compression)")
    down: int = _f(8, "spatial compression: 4, 8 or 16")
    patch: int = _f(4, "tokenizer stem pixel-unshuffle factor (1, 2 or 4)")
    width: int = _f(32, "tokenizer conv width at the stem, doubled at each downsampling")
    z_channels: int = _f(4, "latent channels: fewer channels, an easier latent to generate (Moving MNIST, 4 "
                                 "against 16: the teacher learned single digits ~1.6x faster; docs/RESULTS.md, 2026-12-03)")
    vocab: int = _f(1024, "codebook size")
    scales: str = _f("", "comma-separated scale sides, e.g. 1,2,4,8 (default: powers of 2 up to the latent side)")
    tok_steps: int = _f(2500, "tokenizer training steps")
    tok_batch: int = _f(4, "tokenizer batch size (clips); small batches, many steps: best PSNR per CPU minute")
    tok_frames: int = _f(5, "frames per tokenizer training clip (1 + ft*k); the AE is causal conv, any length works")
    tok_lr: float = _f(6e-3, "tokenizer learning rate")
    tok_beta: float = _f(0.1, "commitment weight of the quantizer (VQ-VAE's beta; VAR uses 0.25)")
    tok_ema: float = _f(0.999, "decay of the moving average of the tokenizer's weights that is evaluated, shipped and "
                               "used by later stages (train.EMA); 0 = off, the raw weights")
    tok_coarse: float = _f(0.0, "weight of the coarse-scale loss (Tokenizer.coarse_loss): coarse partial sums decode "
                                "to blurred video; 0 = off")
    # transformer (model.py), shared by paper A and paper B. The size dial is --depth (nanochat's; VAR's d): width
    # and heads follow it unless given (Config.__post_init__); the defaults are the toy's 4 x 128 model
    depth: int = _f(4, "transformer blocks: the size dial; --dim and --heads follow it unless given")
    aspect: float = _f(32.0, "width per block: --dim 0 means depth * aspect, rounded to a multiple of --head-dim "
                             "(VAR: 64)")
    head_dim: int = _f(32, "attention head width: --heads 0 means dim / head-dim")
    dim: int = _f(0, "transformer width; 0 = derived from --depth (see --aspect)")
    heads: int = _f(0, "attention heads; 0 = derived from --dim (see --head-dim)")
    # optimiser (AdamW) of every stage; the learning rates are per stage (--tok-lr, --ar-lr, ...)
    warmup: int = _f(50, "learning-rate warm-up steps (linear) of every stage, then cosine decay to 10%% of the peak")
    betas: str = _f("0.9,0.95", "AdamW betas b1,b2 of every stage")
    weight_decay: float = _f(0.05, "AdamW weight decay of the generator stages (ar, teacher, causal, dmd and its "
                                   "fake scorers)")
    tok_weight_decay: float = _f(0.0, "AdamW weight decay of the tokenizer")
    gen_ema: float = _f(0.0, "decay of the moving average of the ar, teacher and causal models' weights (train.EMA); "
                             "when on, the average is what is evaluated, sampled, saved and handed to the later "
                             "stages; 0 = off, the raw weights (the toy's default: its gain on a CPU is not measured)")
    # paper A: next-scale within a frame, next-frame across frames (train.py --stage ar)
    ar_steps: int = _f(500, "paper A training steps")
    ar_batch: int = _f(16, "paper A batch size (clips)")
    ar_lr: float = _f(2e-3, "paper A learning rate")
    ec_strength: float = _f(0.3, "Cross-Frame Error Correction: max share of codes corrupted (last frame); 0 = off")
    frame_mask: float = _f(0.1, "Random Frame Mask: chance that an earlier frame is hidden from a later one; 0 = off")
    ordered_prompt: int = _f(1, "1: a prompt lists the digits left to right and each place has its own embeddings "
                                "(model.Transformer.condition); 0: an order-free bag of digits")
    ar_temperature: float = _f(0.6, "sampling temperature of paper A's model: sample.py --method ar's default, the ar "
                                    "model's curve and GIF (1 -> 0.6 lifts semantic 0.23 -> 0.36 and consistency "
                                    "0.10 -> 0.27 on the small run's clips; docs/RESULTS.md, eighth session)")
    teacher_cfg: float = _f(6.0, "classifier-free guidance weight of the teacher's sampler: sample.py --method "
                                 "teacher's default, the teacher's curve and GIF, --causal-data teacher's clips (3 -> "
                                 "6 lifts semantic 0.64 -> 0.75 on the small run's teacher, 0.45 -> 0.54 on a toy "
                                 "one; docs/RESULTS.md, seventh session)")
    ar_soft: float = _f(2.0, "paper A's labels: soft labels over the codes near each token's residual "
                             "(Tokenizer.soft_codes) at this temperature, in units of the codebook's nearest-neighbour "
                             "squared distance; 0 = the quantizer's codes, one-hot (0 -> 0.5 -> 2 lifts the small "
                             "run's ar model 0.31 -> 0.62 -> 0.71 semantic at 4000 steps; docs/RESULTS.md, ninth session)")
    cond_drop: float = _f(0.1, "chance that a clip's prompt is replaced by the null condition (for CFG)")
    # paper B: prediction units, flow-matching teacher, causal student (train.py --stage teacher / causal)
    unit: str = _f("cube", "prediction unit of the causal student: frame, keydetail, cube or scale")
    stride: int = _f(2, "keydetail: number of strided frame groups k")
    cube: str = _f("2,2,2", "cube size kt,kh,kw in flow tokens (latent frames x tokens of fm_patch^2 latent cells; "
                            "must divide the token grid)")
    fm_steps: int = _f(2000, "teacher (full-attention flow matching) training steps")
    causal_steps: int = _f(1000, "causal student training steps")
    causal_data: str = _f("real", "clips the causal student learns from: real (encoded Moving MNIST) or teacher "
                                  "(sampled from the teacher, 25 steps, --teacher-cfg: paper B's stage 1, so the "
                                  "student learns the distribution that DMD later matches; ~2x the stage's time on a "
                                  "CPU)")
    fm_batch: int = _f(8, "paper B batch size (clips)")
    fm_lr: float = _f(3e-3, "teacher learning rate (paper B's base model)")
    causal_lr: float = _f(3e-3, "causal student learning rate (paper B's stage 1: 1e-4 at 1.3B)")
    fm_patch: int = _f(2, "paper B: latent cells per token side (DiT's patch size): 2 folds 2x2 cells into one token, "
                          "4x fewer tokens (measured: 2x the teacher's steps per second on a CPU, where the encoder "
                          "then costs as much as the step; see --echo)")
    fm_norm: str = _f("channel", "latent normalisation of the flow models: channel (mean and std per latent channel) "
                                 "or global (one std, no shift); tokenizer.LatentStats")
    fm_time: str = _f("logitnormal", "flow times in training: uniform, or logitnormal (sigmoid of a standard normal, "
                                     "SD3's choice: most samples at mid noise, where the digits are decided)")
    fm_shift: float = _f(3.0, "timestep shift s of the flow models, in training and sampling (model.shift_time, SD3): "
                              "s > 1 trains and samples more at high noise, where the digits are decided")
    image_frac: float = _f(0.5, "paper A multi-stage training, for the ar model and the teacher: share of the steps "
                                "trained on single images (one latent frame, batch x latent frames, so the same "
                                "tokens per step) before clips; 0 = clips only")
    image_mix: float = _f(0.0, "joint image + clip batches in the clip stage of paper A's recipe (after --image-frac; "
                               "ar model and teacher): each step also trains on this share of its clips' latent "
                               "frames as single images (0.25: 8 images beside 8 clips of 4 latent frames, 25%% more "
                               "tokens), so the first frame keeps learning while the clips do; 0 = off")
    # paper B Sec. 3.3: Symmetric DMD, the causal student distilled into a few-step generator (train.py --stage dmd)
    dmd_steps: int = _f(500, "DMD generator updates")
    dmd_lr: float = _f(3e-4, "DMD generator learning rate (paper B's stage 2: 2e-6 at 1.3B)")
    dmd_fake_lr: float = _f(3e-4, "learning rate of the fake (generated-data) scorers")
    dmd_critic: int = _f(5, "fake-scorer updates per generator update, each on a fresh generated batch (the public DMD "
                            "codes use 5-10)")
    dmd_fake: str = _f("symmetric", "generated-data scorer (dmd.fake_masks): full (one full-attention scorer), "
                                    "forward or backward (one causal scorer), symmetric (both causal scorers, x0 "
                                    "averaged; paper B), composed (forward + backward - a scorer of each unit alone: "
                                    "unbiased on Markov videos; dmd.py's docstring)")
    dmd_unit_steps: int = _f(4, "Euler steps per unit in the generator's rollout (1-4; each unit exits at a random "
                                "one of them in training) and sample.py --method dmd's default")
    dmd_t_min: float = _f(0.02, "lowest noise level at which DMD compares the real and fake scores")
    dmd_t_max: float = _f(0.98, "highest noise level at which DMD compares the real and fake scores")
    dmd_cfg: float = _f(3.0, "classifier-free guidance weight of the real score (the generator itself runs unguided); "
                             "the small preset: 6, the teacher's own (one step per unit, 3 -> 6: semantic 0.66 -> 0.79 "
                             "and 0.61 -> 0.78 on two small bases; docs/RESULTS.md, twelfth session)")
    dmd_ema: float = _f(0.99, "decay of the moving average of the DMD generator's weights, which is what is saved and "
                              "sampled (train.EMA); 0 = off")
    echo: int = _f(4, "data echoing (train.Echo) for the generator stages: each encoded clip is trained on this many "
                      "times on average; 1 = every clip fresh")
    eval_every: int = _f(500, "steps between held-out evaluations (and checkpoints)")
    eval_clips: int = _f(32, "held-out clips for evaluation")

    def __post_init__(self):
        """The size dial: width and heads derived from depth where they are 0 (bad values are left for check_config
        to name)."""
        if self.depth >= 1 and self.head_dim >= 1 and math.isfinite(self.aspect) and 0 < self.aspect <= 1e4:
            if self.dim == 0:
                self.dim = max(1, round(self.depth * self.aspect / self.head_dim)) * self.head_dim
            if self.heads == 0 and self.dim >= self.head_dim:
                self.heads = self.dim // self.head_dim

    def adam_betas(self):
        return tuple(float(b) for b in self.betas.split(","))

    def tokenizer_config(self):
        scales = tuple(int(s) for s in self.scales.split(",")) if self.scales else ()
        return TokenizerConfig(channels=1, ft=self.ft, down=self.down, patch=self.patch, width=self.width,
                               z_channels=self.z_channels, vocab=self.vocab, scales=scales, beta=self.tok_beta)

    def model_config(self, vocab=0):
        """The flow models' transformer (paper A's replaces in_channels and adds levels: checkpoint.build_ar)."""
        return ModelConfig(dim=self.dim, depth=self.depth, heads=self.heads, vocab=vocab,
                           in_channels=self.z_channels * self.fm_patch ** 2,
                           slots=self.num_digits if self.ordered_prompt else 0)

    def latent_frames(self, frames=None):
        """Latent frames of `frames` video frames (default: a training clip, --frames): paper A's causal tokenizer
        encodes frame 0 alone, then every --ft frames into one latent frame."""
        return 1 + ((self.frames if frames is None else frames) - 1) // self.ft

    def frame_grid(self, per=1):
        """The frames' pixels per `per` (model.hw's form: an int when square, else (height, width)): per = down
        gives the latent grid, down * fm_patch the flow models' token grid."""
        return grid_of(self.size // per, (self.canvas_w or self.size) // per)

    def unit_kwargs(self):
        """Keyword arguments of model.unit_layout for this config's unit, on the flow models' token grid (the latent
        grid / fm_patch; scale units keep the tokenizer's scales that fit it)."""
        tokens = hw(self.frame_grid(self.down * self.fm_patch))
        scales = self.tokenizer_config().scale_schedule(self.frame_grid(self.down))
        return dict(stride=self.stride, cube=tuple(int(v) for v in self.cube.split(",")),
                    scales=tuple(s for s in scales if all(a <= b for a, b in zip(hw(s), tokens))))


PRESETS = {
    # the CPU quickstart: 64x64, 13 frames, a 4 x 8x8 latent; one digit moving at 1.5 px/frame (standard Moving
    # MNIST: two digits at 3.6), what a small teacher learns to draw in CPU minutes; the steps fit every stage in
    # 20 minutes on 2 cores, most of them the teacher's (849 s: docs/RESULTS.md, 2026-12-07, eighth session)
    "toy": dict(num_digits=1, speed=1.5, tok_steps=1600, ar_steps=300, ar_batch=8, fm_steps=6000, causal_steps=800,
                image_frac=0.33, eval_every=1000),
    # the toy's data, model and tokenizer with the budget paper A's model needs to draw digits anywhere: 8000 ar
    # steps (4000 x 32 single frames, 4000 x 8 clips: semantic 0.81, first frame 0.86; 4000 steps in all: 0.71);
    # every stage, DMD too, in 54 minutes on 2 cores (docs/RESULTS.md, 2026-12-07, tenth session, with 2000 student
    # steps: 4000 lift the student 0.575 -> 0.734 and cost ~2.5 more minutes; twelfth session)
    "small": dict(num_digits=1, speed=1.5, tok_steps=3000, ar_steps=8000, ar_batch=8, fm_steps=12000,
                  causal_steps=4000, dmd_steps=400, dmd_cfg=6.0, image_frac=0.5, eval_every=1000),
    # the toy run with a 4x-compression tokenizer: 28.1 / 24.4 dB in 243 s (docs/RESULTS.md, "Up to 2026-11-24"),
    # but 530 tokens per latent frame instead of 85, so its generator stages take hours on a CPU
    "toy-d4": dict(down=4, z_channels=8, scales="1,2,3,4,6,8,12,16", tok_steps=4000, eval_every=1000),
    "tiny": dict(tok_steps=40, tok_batch=4, eval_every=20, eval_clips=4, width=16, vocab=256, frames=9,
                 depth=2, aspect=16, head_dim=16, ar_steps=20, ar_batch=4, fm_steps=20, causal_steps=20,
                 fm_batch=4, cube="1,2,2", dmd_steps=4, dmd_critic=1),   # tests and smoke runs: a 2 x 32 model
    # one GPU, hours (not measured yet): Moving MNIST at 128x128, 17 frames, a 12-block ~130M model (VAR's aspect)
    "gpu": dict(size=128, frames=17, width=64, vocab=4096, tok_steps=20000, tok_batch=32, eval_every=2000,
                eval_clips=64, depth=12, aspect=64, head_dim=64, ar_steps=50000, ar_batch=64, ar_lr=3e-4,
                fm_steps=50000, causal_steps=20000, fm_batch=64, fm_lr=3e-4, causal_lr=1e-4, cube="1,4,4",
                dmd_steps=5000, dmd_lr=1e-5, dmd_fake_lr=1e-5, echo=1, warmup=1000, gen_ema=0.999),
    # paper A's VideoAR-XL (~2B): VAR-d30's shape (30 blocks of width 64 * 30 = 1920, 30 heads of 64); its 16x
    # spatial / 4x temporal tokenizer on 4 s clips (65 frames: 16 fps assumed) of 384x672 frames: a 24x42 latent,
    # scales 1x2 ... 24x42 (unit "frame": the flow models' flags must fit the grid too; paper A has none)
    "paper-a": dict(size=384, canvas_w=672, unit="frame", frames=65, down=16, patch=4, width=128, z_channels=32,
                    vocab=4096, scales="1,2,3,4,6,8,12,16,24", tok_steps=50000, tok_batch=32, tok_frames=17,
                    eval_every=2000, eval_clips=256, depth=30, aspect=64, head_dim=64, ar_steps=100000, ar_batch=64,
                    ar_lr=3e-4, echo=1, warmup=2000, gen_ema=0.999),
    # paper B's Wan-1.3B-shaped student: 30 blocks of width 1536, 12 heads of 128 (Wan2.1-1.3B; our MLP is 4x, Wan's
    # 5.8x, and there is no text cross-attention), Wan's 8x / 4x latent of 16 channels in 2x2 patches, 81 frames (5 s
    # at 16 fps) of Wan's 480x832 frames, cubes of 3 latent frames x half the token grid's height and width (paper B's
    # t/2 x h/2 x w/2 where 21 latent frames allow: 7 x 2 x 2 units); paper B Sec. 4: causal lr 1e-4 for 30k
    # iterations, DMD lr 2e-6 for 6k
    "paper-b": dict(size=480, canvas_w=832, frames=81, down=8, patch=4, width=128, z_channels=16, tok_steps=50000,
                    tok_batch=32, scales="1,2,3,5,10,15,30,60", tok_frames=17, eval_every=2000, eval_clips=256,
                    depth=30, aspect=51.2, head_dim=128,
                    fm_patch=2, unit="cube", cube="3,15,26", fm_steps=100000, causal_steps=30000, fm_batch=64,
                    fm_lr=1e-4, causal_lr=1e-4, dmd_steps=6000, dmd_lr=2e-6, dmd_fake_lr=2e-6, echo=1, warmup=1000,
                    gen_ema=0.999),
}


# ------------------------------------------------------------------------------------------ checking the inputs
# Every script checks all its flags and input files before any work (issue 20): a bad value is one line naming the
# flag, what was given and what is allowed, exit status 2, nothing written. Intervals read as in maths: "[1, 1e9]"
# includes both ends, "(0, 10]" excludes 0; a tuple lists the allowed values. Caps are far above any sane value:
# they catch typos (an extra zero or three), not ambition.
STEPS, BATCH, FRAMES, LR, SHARE = "[1, 1e9]", "[1, 1e5]", "[1, 1e5]", "(0, 10]", "[0, 1]"
LIMITS = {
    "size": "[28, 1024]", "canvas_w": "[0, 4096]", "frames": FRAMES, "num_digits": "[1, 10]", "speed": "[0, 1024]",
    "ft": "[1, 64]", "down": (4, 8, 16), "patch": (1, 2, 4), "width": "[1, 4096]", "z_channels": "[1, 1024]",
    "vocab": "[2, 1e6]", "tok_steps": STEPS, "tok_batch": BATCH, "tok_frames": FRAMES, "tok_lr": LR,
    "tok_beta": "[0, 100]", "tok_ema": "[0, 1)", "tok_coarse": "[0, 100]",
    "depth": "[1, 1000]", "aspect": "(0, 1e4]", "head_dim": "[6, 4096]", "dim": "[0, 65536]", "heads": "[0, 1024]",
    "warmup": "[0, 1e9]", "weight_decay": "[0, 10]", "tok_weight_decay": "[0, 10]",
    "gen_ema": "[0, 1)",
    "ar_steps": STEPS, "ar_batch": BATCH, "ar_lr": LR, "ec_strength": SHARE, "frame_mask": SHARE,
    "ordered_prompt": (0, 1), "cond_drop": SHARE,
    "unit": ("frame", "keydetail", "cube", "scale"), "stride": "[1, 1e5]",
    "fm_steps": STEPS, "causal_steps": STEPS, "causal_data": ("real", "teacher"), "fm_batch": BATCH, "fm_lr": LR,
    "causal_lr": LR, "fm_patch": "[1, 256]",
    "fm_norm": ("channel", "global"), "fm_time": ("uniform", "logitnormal"), "fm_shift": "(0, 1000]",
    "image_frac": SHARE, "image_mix": "[0, 4]",
    "dmd_steps": STEPS, "dmd_lr": LR, "dmd_fake_lr": LR, "dmd_critic": "[1, 1000]",
    "dmd_fake": ("full", "forward", "backward", "symmetric", "composed"), "dmd_unit_steps": "[1, 1000]",
    "dmd_t_min": SHARE, "dmd_t_max": SHARE, "dmd_cfg": "[0, 100]", "teacher_cfg": "[0, 100]", "dmd_ema": "[0, 1)",
    "ar_temperature": "(0, 100]", "ar_soft": "[0, 100]",
    "echo": "[1, 1000]", "eval_every": STEPS, "eval_clips": BATCH,
}
SEED = "[0, 4294967295]"   # numpy's seeds are 32-bit


class CheckError(RuntimeError):
    """A bad input that only shows once files are read (a checkpoint written under other flags or against another
    tokenizer, an unreadable file): the scripts print it as one line and exit with status 2, like a bad flag."""


class Parser(argparse.ArgumentParser):
    """The scripts' argparse: a bad flag is one line, `prog: error: ...`, with exit status 2 (not the usage block,
    which for train.py runs to dozens of lines above the message)."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextmanager
def one_line_errors(p):
    """A CheckError raised inside ends the script as a bad flag does (one line, exit status 2), not as a traceback."""
    try:
        yield
    except CheckError as e:
        p.error(str(e))


def bad_value(flag, value, allowed):
    """`value` of `flag` against `allowed` (an interval string or a tuple of values) -> the complaint, or None."""
    if isinstance(allowed, tuple):
        return None if value in allowed else f"{flag} {value!r}: allowed {', '.join(map(str, allowed))}"
    lo, hi = (float(v) for v in allowed[1:-1].split(","))
    ok = isinstance(value, (int, float)) and math.isfinite(value) \
        and (lo < value if allowed[0] == "(" else lo <= value) and (value < hi if allowed[-1] == ")" else value <= hi)
    kind = "an integer" if isinstance(value, int) else "a number"
    return None if ok else f"{flag} {value!r}: allowed {kind} in {allowed}"


def check_flags(p, args, limits):
    """The flags named in `limits` ({dest: allowed}) that were given; p.error on the first bad one."""
    for dest, allowed in limits.items():
        value = getattr(args, dest)
        if value is not None and (msg := bad_value("--" + dest.replace("_", "-"), value, allowed)):
            p.error(msg)


def check_path(p, flag, path, kind):
    """kind 'file': an existing readable file; 'dir': an existing directory; 'out': a file we may write (created
    with its folders); 'outdir': a directory we may write in (created with its parents). p.error otherwise."""
    if path is None:
        return
    if str(path) == "":
        p.error(f"{flag} '': allowed a path, not an empty string")
    path = Path(path)
    if kind in ("file", "dir"):
        ok = path.is_file() and os.access(path, os.R_OK) if kind == "file" else path.is_dir()
        if not ok:
            p.error(f"{flag} {str(path)!r}: " + ("no such " + ("file" if kind == "file" else "directory")
                                                  if not path.exists() else f"allowed a readable {kind}"))
        return
    if path.exists():
        if (kind == "outdir") != path.is_dir():
            p.error(f"{flag} {str(path)!r}: allowed a {'directory' if kind == 'outdir' else 'file'} path, "
                    f"this is a {'file' if path.is_file() else 'directory'}")
        folder = path if kind == "outdir" else path.parent
    else:
        folder = path.parent
        while not folder.exists():        # the nearest existing folder above must take new entries
            folder = folder.parent
        if not folder.is_dir():
            p.error(f"{flag} {str(path)!r}: cannot be created ({folder} is not a directory)")
    if not os.access(folder, os.W_OK | os.X_OK):
        p.error(f"{flag} {str(path)!r}: {folder} is not writable")


def check_device(p, device):
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        p.error(f"--device {device!r}: allowed cpu, cuda or cuda:i")
    if d.type == "cuda" and not (torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()):
        p.error(f"--device {device!r}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if d.type not in ("cpu", "cuda"):
        p.error(f"--device {device!r}: allowed cpu, cuda or cuda:i")


def check_config(p, cfg):
    """Every Config field against LIMITS, then the fields that constrain each other; p.error on the first bad one.
    Flags are named as the user types them (a preset's value is named by its flag too)."""
    for f in fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name in LIMITS and (msg := bad_value(flag, value, LIMITS[f.name])):
            p.error(msg)

    def need(ok, msg):
        if not ok:
            p.error(msg)

    for name in ("frames", "tok_frames"):
        n = getattr(cfg, name)
        need((n - 1) % cfg.ft == 0, f"--{name.replace('_', '-')} {n}: allowed 1 + {cfg.ft}*k (--ft {cfg.ft})")
    need(cfg.size % cfg.down == 0, f"--size {cfg.size}: allowed a multiple of --down {cfg.down}")
    need(cfg.canvas_w == 0 or (cfg.canvas_w >= 28 and cfg.canvas_w % cfg.down == 0),
         f"--canvas-w {cfg.canvas_w}: allowed 0 (square) or a multiple of --down {cfg.down}, at least 28")
    side, width = hw(cfg.frame_grid(cfg.down))      # the latent grid
    try:
        if cfg.scales and any(int(s) <= 0 for s in cfg.scales.split(",")):
            raise ValueError
        cfg.tokenizer_config().scale_schedule(cfg.frame_grid(cfg.down))
    except ValueError:
        p.error(f"--scales {cfg.scales!r}: allowed increasing comma-separated sides ending at the latent side {side} "
                f"(--size / --down), or '' for powers of 2")
    need(side % cfg.fm_patch == 0 and width % cfg.fm_patch == 0,
         f"--fm-patch {cfg.fm_patch}: allowed a divisor of the latent grid {side}x{width}")
    cube = cfg.cube.split(",")
    need(len(cube) == 3 and all(c.strip().isdigit() and int(c) > 0 for c in cube),
         f"--cube {cfg.cube!r}: allowed three positive integers kt,kh,kw")
    n_latent, (rows, cols) = cfg.latent_frames(), (side // cfg.fm_patch, width // cfg.fm_patch)
    kt, kh, kw = map(int, cube)
    need(cfg.unit != "cube" or not (n_latent % kt or rows % kh or cols % kw),
         f"--cube {cfg.cube!r}: allowed kt,kh,kw dividing the {n_latent}x{rows}x{cols} token grid "
         f"(latent frames x latent grid / --fm-patch)")
    need(cfg.unit != "scale" or [hw(s) for s in cfg.unit_kwargs()["scales"][-1:]] == [(rows, cols)],
         f"--unit scale: the scales ({cfg.scales or 'powers of 2'}) must include the token side {rows}")
    betas = cfg.betas.split(",")
    need(len(betas) == 2 and all(not bad_value("", _float(b), "[0, 1)") for b in betas),
         f"--betas {cfg.betas!r}: allowed two numbers b1,b2 in [0, 1)")
    need(cfg.head_dim % 2 == 0, f"--head-dim {cfg.head_dim}: allowed an even number (RoPE turns pairs)")
    need(cfg.dim >= 6 and cfg.heads >= 1, f"--dim {cfg.dim} / --heads {cfg.heads}: --depth {cfg.depth} x --aspect "
                                          f"{cfg.aspect} is narrower than one head of --head-dim {cfg.head_dim}")
    need(cfg.dim % cfg.heads == 0 and cfg.dim // cfg.heads % 2 == 0 and cfg.dim // cfg.heads >= 6,
         f"--dim {cfg.dim} / --heads {cfg.heads}: allowed a head width dim/heads that is an even integer >= 6")
    need(cfg.dmd_t_min < cfg.dmd_t_max, f"--dmd-t-min {cfg.dmd_t_min} / --dmd-t-max {cfg.dmd_t_max}: allowed "
                                        f"min < max")
    need(not cfg.data_dir or not Path(cfg.data_dir).exists() or Path(cfg.data_dir).is_dir(),
         f"--data-dir {cfg.data_dir!r}: allowed a directory (MNIST is downloaded there when missing)")


def _float(text):
    try:
        return float(text)
    except ValueError:
        return None


def parser(description, prog):
    """argparse parser with --config, --out, --seed, --device and one flag per Config field."""
    p = Parser(description=description, prog=prog)
    p.add_argument("--config", default="toy", choices=sorted(PRESETS), help="preset; flags below override it")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    add_precision_flag(p)
    g = p.add_argument_group("config fields (override the preset)")
    for f in fields(Config):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f.metadata["help"])
    return p


def add_precision_flag(p):
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: matmuls and convs under bfloat16 autocast; auto = bf16 on CUDA, fp32 on CPU (bf16 is "
                        "far slower than fp32 on most CPUs)")


def autocast(device, precision):
    """The forward passes' precision: a torch.autocast context, disabled for fp32. Losses, norms and softmax stay
    fp32 under autocast; the quantizer runs in fp32 (Tokenizer.quantize)."""
    kind = torch.device(device).type
    bf16 = precision == "bf16" or (precision == "auto" and kind == "cuda")
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16)


def config_from_args(args):
    over = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return Config(**{**PRESETS[args.config], **over})    # one construction: the size dial sees the flags too


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
