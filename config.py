"""One config for every script: presets (`--config toy` is the CPU default), flags derived from the fields,
device choice, and atomic checkpoints that carry their config.

Each field of `Config` is a flag (`--tok-steps 500`); its help is the field's comment. A preset only overrides
some fields; the rest keep the defaults written here.
"""
import argparse
import dataclasses
import os
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data (Moving MNIST, data.py)
    size: int = _f(64, "frame side in pixels")
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
                                 "against 16: the teacher learned single digits ~1.6x faster; docs/RESULTS.md)")
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
    # transformer (model.py), shared by paper A and paper B
    dim: int = _f(128, "transformer width")
    depth: int = _f(4, "transformer blocks")
    heads: int = _f(4, "attention heads")
    # paper A: next-scale within a frame, next-frame across frames (train.py --stage ar)
    ar_steps: int = _f(500, "paper A training steps")
    ar_batch: int = _f(16, "paper A batch size (clips)")
    ar_lr: float = _f(2e-3, "paper A learning rate")
    ec_strength: float = _f(0.3, "Cross-Frame Error Correction: max share of codes corrupted (last frame); 0 = off")
    frame_mask: float = _f(0.1, "Random Frame Mask: chance that an earlier frame is hidden from a later one; 0 = off")
    ordered_prompt: int = _f(1, "1: a prompt lists the digits left to right and each place has its own embeddings "
                                "(model.Transformer.condition); 0: an order-free bag of digits")
    cond_drop: float = _f(0.1, "chance that a clip's prompt is replaced by the null condition (for CFG)")
    # paper B: prediction units, flow-matching teacher, causal student (train.py --stage teacher / causal)
    unit: str = _f("cube", "prediction unit of the causal student: frame, keydetail, cube or scale")
    stride: int = _f(2, "keydetail: number of strided frame groups k")
    cube: str = _f("2,2,2", "cube size kt,kh,kw in flow tokens (latent frames x tokens of fm_patch^2 latent cells; "
                            "must divide the token grid)")
    fm_steps: int = _f(2000, "teacher (full-attention flow matching) training steps")
    causal_steps: int = _f(1000, "causal student training steps")
    fm_batch: int = _f(8, "paper B batch size (clips)")
    fm_lr: float = _f(3e-3, "paper B learning rate")
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
    # paper B Sec. 3.3: Symmetric DMD, the causal student distilled into a few-step generator (train.py --stage dmd)
    dmd_steps: int = _f(500, "DMD generator updates")
    dmd_lr: float = _f(3e-4, "DMD generator learning rate")
    dmd_fake_lr: float = _f(3e-4, "learning rate of the fake (generated-data) scorers")
    dmd_critic: int = _f(5, "fake-scorer updates per generator update, each on a fresh generated batch (the public DMD "
                            "codes use 5-10)")
    dmd_fake: str = _f("symmetric", "generated-data scorer (dmd.fake_masks): full (one full-attention scorer), forward "
                                    "or backward (one causal scorer), symmetric (both causal scorers, x0 averaged; paper B), "
                                    "composed (forward + backward - a scorer of each unit alone: unbiased on "
                                    "Markov videos; dmd.py's docstring)")
    dmd_unit_steps: int = _f(4, "Euler steps per unit in the generator's rollout (1-4; each unit exits at a random "
                                "one of them in training) and sample.py --method dmd's default")
    dmd_t_min: float = _f(0.02, "lowest noise level at which DMD compares the real and fake scores")
    dmd_t_max: float = _f(0.98, "highest noise level at which DMD compares the real and fake scores")
    dmd_cfg: float = _f(3.0, "classifier-free guidance weight of the real score (the generator itself runs unguided)")
    dmd_ema: float = _f(0.99, "decay of the moving average of the DMD generator's weights, which is what is saved and "
                              "sampled (train.EMA); 0 = off")
    echo: int = _f(4, "data echoing (train.Echo) for the generator stages: each encoded clip is trained on this many "
                      "times on average; 1 = every clip fresh")
    eval_every: int = _f(500, "steps between held-out evaluations (and checkpoints)")
    eval_clips: int = _f(32, "held-out clips for evaluation")

    def tokenizer_config(self):
        from tokenizer import TokenizerConfig
        scales = tuple(int(s) for s in self.scales.split(",")) if self.scales else ()
        return TokenizerConfig(channels=1, ft=self.ft, down=self.down, patch=self.patch, width=self.width,
                               z_channels=self.z_channels, vocab=self.vocab, scales=scales, beta=self.tok_beta)

    def model_config(self, vocab=0):
        from model import ModelConfig
        """The flow models' transformer (paper A's replaces in_channels and adds levels: train.build_ar)."""
        return ModelConfig(dim=self.dim, depth=self.depth, heads=self.heads, vocab=vocab,
                           in_channels=self.z_channels * self.fm_patch ** 2,
                           slots=self.num_digits if self.ordered_prompt else 0)

    def unit_kwargs(self):
        """Keyword arguments of model.unit_layout for this config's unit, on the flow models' token grid (the latent
        side / fm_patch; scale units keep the tokenizer's scales that fit it)."""
        side = self.size // self.down // self.fm_patch
        scales = self.tokenizer_config().scale_schedule(self.size // self.down)
        return dict(stride=self.stride, cube=tuple(int(v) for v in self.cube.split(",")),
                    scales=tuple(s for s in scales if s <= side))

    def mm_config(self, frames=None):
        from data import MovingMNISTConfig
        return MovingMNISTConfig(size=self.size, frames=frames or self.frames, num_digits=self.num_digits,
                                 speed=self.speed)


PRESETS = {
    "toy": {},  # the defaults above: 64x64, 13 frames, 4 x 8x8 latent, minutes on a 2-core CPU
    "toy-d4": dict(down=4, z_channels=8, scales="1,2,3,4,6,8,12,16", tok_steps=4000, eval_every=1000),
    # the toy run with a 4x-compression tokenizer: 28 / 24 dB in 5 min (README), but 530 tokens per latent frame
    # instead of 85, so its generator stages take hours on a CPU
    "tiny": dict(tok_steps=40, tok_batch=4, eval_every=20, eval_clips=4, width=16, vocab=256, frames=9,
                 dim=32, depth=2, heads=2, ar_steps=20, ar_batch=4, fm_steps=20, causal_steps=20,
                 fm_batch=4, cube="1,2,2", dmd_steps=4, dmd_critic=1),   # tests and smoke runs
    "paper": dict(down=16, patch=4, width=128, z_channels=32, vocab=4096, tok_steps=50000, tok_batch=32, tok_frames=17,
                  eval_every=2000, eval_clips=256, dim=1024, depth=16, heads=16, ar_steps=100000, ar_batch=64,
                  fm_patch=1, fm_lr=3e-4, echo=1,
                  ar_lr=3e-4),  # paper A's 16x spatial compression; needs a GPU
}


def parser(description):
    """argparse parser with --config, --out, --seed, --device and one flag per Config field."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    cfg = Config(**PRESETS[args.config])
    over = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **over)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, **state):
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect_config=None, keys=()):
    """Load a checkpoint; with expect_config, refuse one written under different config fields `keys`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                           f"delete it or point --out elsewhere") from e
    if not isinstance(state, dict) or "config" not in state:
        raise RuntimeError(f"{path} is not a checkpoint of this project (no config inside)")
    if expect_config is not None:
        saved = state["config"]
        diff = {k: (saved.get(k), getattr(expect_config, k)) for k in keys if saved.get(k) != getattr(expect_config, k)}
        if diff:
            raise RuntimeError(f"{path} was written with a different config: "
                               + ", ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in diff.items())
                               + ". Use the same flags, or another --out.")
    return state
