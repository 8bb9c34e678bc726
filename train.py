"""Training, every stage behind one command:

  python train.py --config toy                    # tokenizer to causal in order, each generator ending with a GIF
  python train.py --config toy --stage tokenizer  # one stage
  python train.py --config toy --stage dmd        # paper B's Symmetric DMD, after causal (not part of the above)

Stages write to --out (default runs/<config>): <stage>.pt (atomic checkpoint, config inside), log.jsonl and GIFs.
Re-running a command resumes from its checkpoint exactly (same batches, same RNG), or skips a finished stage.

  torchrun --nproc_per_node 8 train.py --config gpu   # data parallel on 8 GPUs (or CPU processes: --device cpu)
"""
import copy
import errno
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import dmd
from checkpoint import (build_ar, build_tokenizer, check_tokenizer, flow_model, load_checkpoint, load_tokenizer,
                        save_checkpoint, tokenizer_id, trained_weights)
from config import (SEED, CheckError, autocast, check_config, check_device, check_flags, check_path, config_from_args,
                    one_line_errors, parser, seed_everything)
from model import (Layout, Transformer, ar_sequence, cells, flow_pair, flow_times, frame_scale_layout,
                   frame_scale_order, partition, unit_layout)
from sample import generate_teacher, random_prompts, reconstruct, sample_stage, write_sample_gif
from tokenizer import LatentStats

STAGES = ["tokenizer", "ar", "teacher", "causal", "dmd"]
QUICKSTART = STAGES[:4]     # --stage all; dmd runs on its own command (README)
TOKENIZER_KEYS = ["size", "canvas_w", "ft", "down", "patch", "width", "z_channels", "vocab", "scales"]
MODEL_KEYS = TOKENIZER_KEYS + ["dim", "depth", "heads", "num_digits", "ordered_prompt"]
TEACHER_INIT_KEYS = MODEL_KEYS + ["fm_patch"]   # what the student and DMD's scorers need of the teacher they start from


def stage_keys(stage):
    """The config fields a stage's checkpoint must share with the flags to be resumed (or built on)."""
    if stage == "tokenizer":
        return TOKENIZER_KEYS
    if stage in ("ar", "teacher"):
        return MODEL_KEYS + ["frames"] + (["fm_patch"] if stage == "teacher" else [])
    student = MODEL_KEYS + ["frames", "fm_patch", "unit", "stride", "cube"]
    return student + ["causal_data"] if stage == "causal" else student + ["dmd_fake"]


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def batch_seed(seed, stage, step, shard=0, stream=0):
    """Micro-batch `shard` of batch `step` of a stage is a pure function of (seed, stage, step, shard): resuming
    replays the same data, and each rank draws its own shards (see `shards`). `stream` 1: a second, independent
    stream of data in the same step (--image-mix's images beside the clips)."""
    return (seed * 1_000_003 + STAGES.index(stage) * 10_007 + step + shard * 1_000_000_007 + stream * 2 ** 42) % 2 ** 63


def adamw(params, lr, cfg, weight_decay):
    return torch.optim.AdamW(params, lr=lr, betas=cfg.adam_betas(), weight_decay=weight_decay)


# ------------------------------------------------------------------------------ data parallel (torchrun)
# `torchrun --nproc_per_node N train.py ...` starts N copies of this script, one per rank. A stage's batch flag is
# the global batch: it is split into N x --grad-accum micro-batches ("shards"); rank r computes shards
# r*K .. r*K+K-1, each drawn from its own seed (batch_seed), and the gradients are averaged over all of them before
# one optimizer step. So a run depends on the global batch alone: N ranks with K accumulation steps train as one
# process with N*K (tests/test_distributed.py). The averaging is one all-reduce per step, after the backward passes:
# DDP's, without its overlap of communication with the backward pass (the stages' several forward passes per step,
# DMD's rollouts, need no special care this way). Rank 0 alone writes checkpoints, logs and GIFs.
def init_distributed(args):
    """Join the process group when torchrun started us (RANK is set); each rank takes its own GPU."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    return rank_and_world()[0] == 0


def shards(args):
    """This rank's micro-batch indices in the global batch."""
    rank = rank_and_world()[0]
    return [rank * args.grad_accum + k for k in range(args.grad_accum)]


def micro(batch, args):
    """Clips per micro-batch of a global batch (main() checks that it divides)."""
    return batch // (rank_and_world()[1] * args.grad_accum)


def broadcast_from_main(module):
    """Rank 0's parameters and buffers to every rank (at a stage's start; after the tokenizer's codebook moves)."""
    if dist.is_initialized():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Echo:
    """Data echoing (Choi et al. 2019, "Faster Neural Network Training with Data Echoing"): on a CPU the frozen
    tokenizer's encoder costs a generator step as much as the transformer itself, so each step encodes only
    ceil(batch / echo) fresh clips and fills the rest of the batch with clips drawn from the fresh ones of the last
    `window` steps: every encoded clip is trained on `echo` times on average, in different batches.

    fresh(step, m) -> tuple of tensors with m rows (e.g. z and labels), a pure function of the step; so the batch
    of a step is one too, and a resumed run re-encodes the window and sees exactly the batches of an unbroken one.
    `first`: the first step of the current kind of data (paper A's image stage, then clips); the window never
    reaches before it."""

    def __init__(self, fresh, echo, window=32):
        if echo < 1:
            raise ValueError(f"--echo must be >= 1, got {echo}")
        self.fresh, self.echo, self.window, self.recent = fresh, echo, window, {}

    def batch(self, step, size, first, generator):
        m = -(-size // self.echo)
        steps = range(max(first, step - self.window), step + 1)
        self.recent = {s: self.recent[s] if s in self.recent else self.fresh(s, m) for s in steps}
        new = self.recent[step]
        if m == size:
            return new
        pool = [torch.cat(parts) for parts in zip(*self.recent.values())]           # this step's clips included
        idx = torch.randint(0, len(pool[0]), (size - m,), generator=generator, device=generator.device)
        return tuple(torch.cat([a, p[idx.to(p.device)]]) for a, p in zip(new, pool))


def encoded_clips(cfg, args, digits, tok, stage, n_image, shard, prepare=lambda z: z, stream=0):
    """fresh(step, m) for Echo: m training clips of micro-batch `shard` of a generator stage's step (single images
    in paper A's image stage, steps < n_image), encoded by the frozen tokenizer -> (prepare(z) [m,...], labels [m,n]).
    `stream`: batch_seed's."""
    @torch.no_grad()
    def fresh(s, m):
        video, labels = data.moving_mnist(m, digits, "train", data.mm_config(cfg, 1 if s < n_image else None),
                                          seed=batch_seed(args.seed, stage, s, shard, stream))
        with autocast(args.device, args.precision):
            z = tok.encode(data.to_model(video, args.device)).float()
        return prepare(z), torch.from_numpy(labels).to(args.device)
    return fresh


def teacher_clips(cfg, args, teacher, stats, clip_latent, shard):
    """fresh(step, m) for Echo with --causal-data teacher (paper B's stage 1 trains the causal student on videos
    sampled from its base model): m clips of micro-batch `shard`, random prompts, sampled by the teacher (25 Euler
    steps, CFG --teacher-cfg, the grid shifted as in training) -> (scaled z [m,c,t,h,w], the layout stats.normalize gives,
    prompts [m,n])."""
    channels, grid = stats.shape(cfg.z_channels, cfg.frame_grid(cfg.down))

    @torch.no_grad()
    def fresh(s, m):
        gen = torch.Generator(args.device).manual_seed(batch_seed(args.seed, "causal", s, shard))
        prompts = random_prompts(m, cfg.num_digits, gen)
        with autocast(args.device, args.precision):
            z = generate_teacher(teacher, prompts, clip_latent, grid, channels, gen, cfg_scale=cfg.teacher_cfg,
                                 progress=False, shift=cfg.fm_shift)
        return z.float(), prompts
    return fresh


class Phase(NamedTuple):
    """Where a step stands in paper A's multi-stage recipe (`phase`)."""
    image: bool     # stage 1: single images
    n_latent: int   # latent frames per sample: 1 in stage 1, a training clip's in stage 2
    batch: int      # samples of the micro-batch: clip_latent x the clips' batch in stage 1
    first: int      # the step the stage's data stream starts at (Echo.batch)


def phase(step, n_image, batch, clip_latent):
    """Paper A's multi-stage training: the first n_image steps train on single images (one latent frame each,
    clip_latent x `batch` of them: the latent frames of a clip batch), the later steps on clips."""
    if step < n_image:
        return Phase(True, 1, batch * clip_latent, 0)
    return Phase(False, clip_latent, batch, n_image)


def joint_mean(term, echo, mixed, step, at, n_mixed, generator):
    """A micro-batch's loss in paper A's multi-stage recipe: term(z, prompt, n_latent, generator) -> (loss summed
    over tokens, number of tokens) on the step's samples from `echo` (`at`: the step's Phase); in the clip stage,
    with --image-mix, `n_mixed` single images from the Echo `mixed` join them (joint image + clip batches). -> the
    mean over all their tokens."""
    z, prompt = echo.batch(step, at.batch, at.first, generator)
    total, count = term(z, prompt, at.n_latent, generator)
    if mixed is not None and not at.image:
        z, prompt = mixed.batch(step, n_mixed, at.first, generator)
        more, n = term(z, prompt, 1, generator)
        total, count = total + more, count + n
    return total / count


def frozen(tok, device):
    """The tokenizer a generator stage trains on: on `device`, in eval mode, without gradients -> (tok, its
    fingerprint, which the stage's checkpoints record: checkpoint.tokenizer_id)."""
    tok = tok.to(device).eval().requires_grad_(False)
    return tok, tokenizer_id(tok)


def heldout_clips(cfg, digits, n, frames=None, seed=1234):
    """Clips of held-out digits (never seen in training), fixed across runs."""
    return data.moving_mnist(n, digits, "test", data.mm_config(cfg, frames), seed=seed)


def log(out, **row):
    if not is_main():
        return
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def psnr(a, b):
    """Mean over clips of PSNR (dB) between uint8 clips, on [0, 1] values, one MSE per clip over all its frames (the
    tokenizer's held-out figure everywhere in docs/; eval.py --target's psnr averages per-frame PSNRs instead, which
    weighs a badly reconstructed frame less)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255).reshape(len(a), -1).__pow__(2).mean(1)
    return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-10))))


# ------------------------------------------------------------------------------ the loop shared by all stages
def resume(path, cfg, keys, model, opt, name, total, tok=None):
    """Restore model, optimizer and RNG from `path` when it exists (refusing one written under other `keys`, or,
    given `tok`, against another tokenizer). -> (first step to run, the saved state or None)."""
    if not path.exists():
        return 0, None
    state = load_checkpoint(path, cfg, keys)
    check_tokenizer(state, tok, path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    is_main() and print(f"[{name}] {path} is finished ({state['step']} steps); skipping" if state["step"] >= total
          else f"[{name}] resuming from step {state['step']}")
    return state["step"], state


def compiled(module, args):
    """`module` itself, or with --compile its torch.compile'd wrapper for the training forward passes (same weights:
    checkpoints, evaluation and sampling keep using `module`). Worth it on a GPU; on a CPU compiling takes longer
    than it saves in a toy run."""
    return torch.compile(module) if args.compile else module


def optimize(model, opt, lr, losses):
    """One optimizer step on the global batch. losses: this rank's micro-batch losses as functions (each builds its
    graph when called, so one micro-batch's activations live at a time) -> the mean loss over the global batch.
    Gradients are averaged over micro-batches and ranks, then clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    total = 0
    for loss_of in losses:
        loss = loss_of() / len(losses)
        loss.backward()
        total = total + loss.detach()
    _, world = rank_and_world()
    if world > 1:
        for p in model.parameters():
            if p.grad is not None:   # the same parameters have gradients on every rank
                dist.all_reduce(p.grad)
                p.grad /= world
        dist.all_reduce(total)
    for g in opt.param_groups:
        g["lr"] = lr
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total.item() / world


class EMA:
    """Exponential moving average of a model's weights, w_avg <- d * w_avg + (1 - d) * w after every step (Polyak
    averaging, as VAR's and most diffusion codebases ship): the average is what is evaluated, saved and used. The
    decay ramps up as min(decay, (1 + step) / (10 + step)) so the first steps do not average in the random init.
    decay 0 = off: `model` is the trained model itself. Every stage keeps one: --tok-ema, --gen-ema (ar, teacher,
    causal), --dmd-ema. `state`: the checkpoint a run resumes from; its average is restored (one saved without an
    average, the flag newly on, starts it from the resumed weights)."""

    def __init__(self, model, decay, state=None):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False) if decay > 0 else model
        if decay > 0 and state is not None and "ema" in state:
            self.model.load_state_dict(state["ema"])

    def saved(self):
        """Its part of a checkpoint: the average as 'ema' (what checkpoint.trained_weights hands on); none when off."""
        return {"ema": self.model.state_dict()} if self.decay > 0 else {}

    @torch.no_grad()
    def update(self, model, step):
        if self.decay > 0:
            d = min(self.decay, (1 + step) / (10 + step))
            for a, w in zip(self.model.state_dict().values(), model.state_dict().values()):
                a.lerp_(w, 1 - d) if a.is_floating_point() else a.copy_(w)   # buffers too (code usage, flags)


def end_of_step(args, start, step, total, every):
    """-> (save a checkpoint now?, stop after it?): every `every` steps, at the end, and at --stop-after steps after
    `start`, the first step of this run (the progress bar's range starts there: bar.iterable.start)."""
    stop = bool(args.stop_after) and step + 1 - start >= args.stop_after
    return (step + 1) % every == 0 or step + 1 == total or stop, stop


def save_stage(path, cfg, model, opt, step, **extra):
    save_checkpoint(path, config=asdict(cfg), model=model.state_dict(), opt=opt.state_dict(),
                    rng=torch.get_rng_state(), step=step, **extra)


class Curve:
    """Learning curve of a generator stage (--curve N): at every checkpoint, N prompted samples of the model at the
    length it trains on (single images in paper A's image stage, then clips) are scored by eval.py's DigitNet
    (semantic, consistency), against the seconds spent training so far (scoring excluded; resumes carry them on).
    Rows go to log.jsonl; `write` puts the stage's rows into curve_<stage>.md and curve_<stage>.png."""

    def __init__(self, out, stage, args, state, cfg, digits):
        self.out, self.stage, self.n, self.cfg, self.device = out, stage, args.curve, cfg, args.device
        self.before = state.get("train_s", 0.0) if state else 0.0
        self.t0, self.paused = time.perf_counter(), 0.0
        self.digit_net = None
        if self.n:
            import eval as E
            self.digit_net = E.load_nets(device=args.device, digits=digits)[0]

    def train_s(self):
        return self.before + time.perf_counter() - self.t0 - self.paused

    @torch.no_grad()
    def point(self, bar, step, frames, sample):
        """sample(prompts [N,n], generator, frames) -> uint8 clips [N,T,H,W] of `frames` video frames."""
        if not self.n:
            return
        import eval as E
        t0, train_s = time.perf_counter(), self.train_s()   # read before scoring: this point's scoring is not training
        gen = torch.Generator(self.device).manual_seed(4321)   # the same prompts and noise at every point
        prompts = random_prompts(self.n, self.cfg.num_digits, gen)
        r = E.quick_scores(sample(prompts, gen, frames), prompts.tolist(), self.digit_net, self.device)
        row = dict(step=step, train_s=train_s, frames=frames, **r)
        log(self.out, stage=self.stage, curve=row)
        bar.write(f"[{self.stage}] step {step}, {row['train_s'] / 60:.1f} min: {frames}-frame samples score semantic "
                  f"{r['semantic']:.3f}, consistency {r['consistency']:.3f}")
        self.paused += time.perf_counter() - t0

    def write(self):
        if self.n:
            write_curve(self.out, self.stage)


def write_curve(out, stage):
    """The --curve rows of `stage` in out/log.jsonl -> out/curve_<stage>.md (table) and .png (plot)."""
    rows = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    rows = [r["curve"] for r in rows if r.get("stage") == stage and "curve" in r]
    if not rows:
        return
    lines = [f"| step | train min | frames | semantic | first frame | consistency |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['train_s'] / 60:.1f} | {r['frames']} | {r['semantic']:.3f} | "
              f"{r.get('semantic_first', float('nan')):.3f} | {r['consistency']:.3f} |" for r in rows]
    (Path(out) / f"curve_{stage}.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for key in ("semantic", "consistency"):
        ax.plot([r["train_s"] / 60 for r in rows], [r[key] for r in rows], marker="o", label=key)
    ax.set(xlabel="training minutes", ylabel="score (eval.py DigitNet)", ylim=(0, 1), title=f"{stage}: {Path(out).name}")
    ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out) / f"curve_{stage}.png")
    plt.close(fig)


def stop_now(bar, name, args):
    bar.close()
    is_main() and print(f"[{name}] stopped after {args.stop_after} steps (--stop-after); run again to resume")
    sys.exit(0)


# ------------------------------------------------------------------------------------------------ tokenizer
@torch.no_grad()
def eval_tokenizer(tok, clips, device):
    """Held-out PSNR of both paths, code usage per scale (share of the codebook used), bits per latent frame."""
    tok.eval()
    cont, quant = reconstruct(tok, clips, device, False), reconstruct(tok, clips, device, True)
    codes = tok.quantize(tok.encode(data.to_model(clips, device)))[0]
    usage, perplexity = [], []
    for idx in codes:   # share of the codebook a scale uses, and the perplexity exp(H) of its code histogram
        p = torch.bincount(idx.flatten(), minlength=tok.cfg.vocab).float() / idx.numel()
        usage.append(float((p > 0).float().mean()))
        perplexity.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    bits = sum(cells(s) for s in tok.scales) * math.log2(tok.cfg.vocab)
    tok.train()
    return dict(psnr_cont=psnr(clips, cont), psnr_quant=psnr(clips, quant), usage=usage, perplexity=perplexity,
                bits_per_latent_frame=bits), cont, quant


def train_tokenizer(cfg, args, digits, out):
    device = args.device
    path = out / "tokenizer.pt"
    tok = build_tokenizer(cfg).to(device)
    opt = adamw(tok.parameters(), cfg.tok_lr, cfg, cfg.tok_weight_decay)
    step, state = resume(path, cfg, stage_keys("tokenizer"), tok, opt, "tokenizer", cfg.tok_steps)
    broadcast_from_main(tok)
    ema = EMA(tok, cfg.tok_ema, state)     # ema.model is what is evaluated, saved and handed to the later stages
    if step >= cfg.tok_steps:
        return ema.model.eval()
    heldout, _ = heldout_clips(cfg, digits, cfg.eval_clips)
    mm = data.mm_config(cfg, cfg.tok_frames)
    t_data = t_step = 0.0
    fwd = compiled(tok, args)
    bar = tqdm(range(step, cfg.tok_steps), desc="tokenizer", initial=step, total=cfg.tok_steps, dynamic_ncols=True,
               disable=not is_main())
    for step in bar:
        t0, first = time.perf_counter(), []

        def loss_of(shard):
            nonlocal t_data
            t1 = time.perf_counter()
            video, _ = data.moving_mnist(micro(cfg.tok_batch, args), digits, "train", mm,
                                         seed=batch_seed(args.seed, "tokenizer", step, shard))
            x = data.to_model(video, device)
            t_data += time.perf_counter() - t1
            with autocast(device, args.precision):
                rec, rec_q, vq_loss, z = fwd(x)
                loss = F.mse_loss(rec, x) + F.mse_loss(rec_q, x) + vq_loss
                if cfg.tok_coarse > 0 and len(tok.scales) > 1:   # one coarse scale per step, in turn (coarse_loss)
                    loss = loss + cfg.tok_coarse * tok.coarse_loss(x, z, step % (len(tok.scales) - 1))
            first[:] = first or [z.detach()]
            return loss

        loss = optimize(tok, opt, lr_at(step, cfg.tok_steps, cfg.tok_lr, cfg.warmup),
                        [lambda s=s: loss_of(s) for s in shards(args)])
        if step % 25 == 0:   # keep every code alive (see MultiScaleVQ.restart_dead_codes)
            tok.vq.restart_dead_codes(first[0].transpose(1, 2).flatten(0, 1))
            broadcast_from_main(tok.vq)   # the data-dependent codebook (its first step's init too) is rank 0's
        ema.update(tok, step)
        t_step += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss:.4f}")
        log(out, stage="tokenizer", step=step + 1, loss=loss)
        save, stop = end_of_step(args, bar.iterable.start, step, cfg.tok_steps, cfg.eval_every)
        if save and is_main():
            m, cont, quant = eval_tokenizer(ema.model, heldout, device)
            n = step + 1 - bar.iterable.start
            t_model = t_step - t_data
            log(out, stage="tokenizer", step=step + 1, eval=m, data_ms=1e3 * t_data / n, step_ms=1e3 * t_model / n)
            bar.write(f"[tokenizer] step {step + 1}: held-out PSNR {m['psnr_cont']:.2f} dB (continuous), "
                      f"{m['psnr_quant']:.2f} dB (quantized); code perplexity per scale "
                      f"{', '.join(f'{u:.0f}' for u in m['perplexity'])}; data {1e3 * t_data / n:.1f} ms vs "
                      f"step {1e3 * t_model / n:.0f} ms")
            save_stage(path, cfg, tok, opt, step + 1, metrics=m, **ema.saved())
            data.save_gif(out / "tokenizer.gif", np.concatenate([heldout[:6], cont[:6], quant[:6]], axis=2))
        if stop:
            stop_now(bar, "tokenizer", args)
    return ema.model.eval()


# ------------------------------------------------------------------------------------------- paper A: ar
# Paper A's two training tricks against exposure bias (Sec. 3.3), both here: Cross-Frame Error Correction
# (error_correction, through the quantizer's corrupt hook, MultiScaleVQ.forward) and Random Frame Mask
# (random_frame_mask, hide_previous). train_ar applies them; eval_ar measures with every earlier frame hidden.
def error_correction(strength, n_latent, vocab, generator):
    """Paper A Sec. 3.3, Cross-Frame Error Correction: a hook for MultiScaleVQ.forward that replaces a random share
    of the codes of a scale by random codes. Each (clip, latent frame f) draws its rate from
    U(0, strength * (f+1)/n_latent): the rate ramps up with the frame index, as errors accumulate at inference. The
    quantizer never corrupts the last scale and re-quantizes every later scale from the corrupted sum, so the labels
    teach correction."""
    def corrupt(idx, k):                       # idx [(B t), s, s], t = n_latent
        n = idx.shape[0]
        f = torch.arange(n, device=idx.device) % n_latent
        rate = torch.rand(n, generator=generator, device=idx.device) * strength * (f + 1) / n_latent
        hit = torch.rand(idx.shape, generator=generator, device=idx.device) < rate[:, None, None]
        return torch.where(hit, torch.randint(0, vocab, idx.shape, generator=generator, device=idx.device), idx)
    return corrupt


def random_frame_mask(rate, frame, batch, generator):
    """Paper A Sec. 3.3, Random Frame Mask: hide each earlier frame from later frames with probability `rate`, per
    clip. frame [L] -> hide [B, L, L] (True = key hidden from query; a frame always sees itself) and prev [B, L] (True
    where a token's previous frame is hidden: its frame_context input must be blanked too, see hide_previous)."""
    n_latent = int(frame.max()) + 1
    hidden = torch.rand(batch, n_latent, generator=generator, device=frame.device) < rate    # [B, n_latent]
    prev = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)[:, frame]         # frame t-1 hidden
    return hidden[:, frame][:, None, :] & (frame[None, :, None] > frame[None, None, :]), prev


def hide_previous(x, prev):
    """Random Frame Mask, continued: blank the previous-frame half of paper A's inputs x [B,L,2c] where prev [B,L]
    is True (as for frame 0)."""
    c = x.shape[-1] // 2
    return torch.cat([x[..., :c], x[..., c:] * ~prev[..., None]], -1)


@torch.no_grad()
def eval_ar(model, tok, clips, labels, device):
    """Teacher-forced held-out figures of a paper A model on uint8 clips [N,T,H,W] with their digits [N,n]:
    cross-entropy over all codes with the clip's prompt (ce), with the null condition (ce_null) and with another
    clip's prompt (ce_wrong: clips rolled by one; if it equals ce, the model ignores the prompt), and the share of
    the last scale's codes it gets right (acc_last: the scale that draws the digits), for the first latent frame and
    for the later ones (which can look at earlier frames). A prompt of n ordered digits carries at most ln 10^n
    nats (2.3 for the toy's one digit), so a model that reads it perfectly can gain at most that / L nats per token
    over the best prompt-free model (L tokens per clip: 340 at the toy size, 0.007); ce_wrong - ce may exceed that,
    as a wrong prompt misleads."""
    was_training = model.training
    model.eval()
    n_latent = 1 + (clips.shape[1] - 1) // tok.cfg.ft
    pos, unit, frame = (a.to(device) for a in frame_scale_layout(n_latent, tok.scales, tok.latent_grid))
    K = len(tok.scales)
    codes, inputs, f_hat, _ = tok.quantize(tok.encode(data.to_model(clips, device)))
    x, y = ar_sequence(inputs, codes, f_hat)
    prompts = torch.as_tensor(labels, device=device)
    past = (frame[:, None] > frame[None, :]).expand(len(x), -1, -1)    # [B,L,L]: every earlier frame hidden
    blind = hide_previous(x, (frame > 0).expand(len(x), -1))           # ... and not fed as context either
    last = unit % K == K - 1
    out = {}
    wrong = prompts.roll(1, 0)
    for name, drop, hide in (("", False, None), ("_null", True, None), ("_wrong", False, None),
                             ("_nopast", False, past)):
        logits = model(x if hide is None else blind, Layout(pos, unit, level=unit % K, hide=hide),
                       wrong if name == "_wrong" else prompts, drop=torch.full((len(x),), drop, device=device))
        if name != "_nopast":
            out["ce" + name] = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        hit = (logits.argmax(-1) == y).float()
        if name == "":
            out["acc_last_frame0"] = hit[:, last & (frame == 0)].mean().item()
        if name in ("", "_nopast") and n_latent > 1:
            out["acc_last_later" + name] = hit[:, last & (frame > 0)].mean().item()
    model.train(was_training)
    return out


def train_ar(cfg, args, digits, out, tok):
    """Paper A: cross-entropy over the codes of every (frame, scale) unit, forward mask over units; with
    --image-frac > 0, paper A's multi-stage recipe: single images first, then clips, one set of weights (the
    physical RoPE positions make the same weights fit both lengths)."""
    device = args.device
    path = out / "ar.pt"
    model = build_ar(cfg, cfg.vocab).to(device)
    model.checkpointing = args.checkpointing
    opt = adamw(model.parameters(), cfg.ar_lr, cfg, cfg.weight_decay)
    step, state = resume(path, cfg, stage_keys("ar"), model, opt, "ar", cfg.ar_steps, tok)
    broadcast_from_main(model)
    ema = EMA(model, cfg.gen_ema, state)   # --gen-ema: ema.model is what is evaluated, sampled and saved for use
    if step >= cfg.ar_steps:
        return ema.model.eval()
    tok, tok_id = frozen(tok, device)
    spacing = tok.code_spacing()                     # the frozen codebook's: soft labels' temperature unit
    clip_latent = cfg.latent_frames()   # of a training clip
    n_image = image_steps(cfg, cfg.ar_steps)
    n_mixed = round(cfg.image_mix * micro(cfg.ar_batch, args) * clip_latent)   # images beside each clip batch
    layouts = {}    # n latent frames -> Layout (forward mask; level = scale index), frame [L] (latent frame index)
    for n in ({1, clip_latent} if n_image or n_mixed else {clip_latent}):
        pos, unit, frame = (a.to(device) for a in frame_scale_layout(n, tok.scales, tok.latent_grid))
        layouts[n] = Layout(pos, unit, level=unit % len(tok.scales)), frame
    held, held_labels = heldout_clips(cfg, digits, cfg.eval_clips)
    curve = Curve(out, "ar", args, state, cfg, digits)
    fwd = compiled(model, args)
    echoes = {s: Echo(encoded_clips(cfg, args, digits, tok, "ar", n_image, s), cfg.echo) for s in shards(args)}
    mixed = {s: Echo(encoded_clips(cfg, args, digits, tok, "ar", cfg.ar_steps, s, stream=1), cfg.echo)
             for s in shards(args)} if n_mixed else {}   # --image-mix: single images beside the clips
    bar = tqdm(range(step, cfg.ar_steps), desc="ar", initial=step, total=cfg.ar_steps, dynamic_ncols=True,
               disable=not is_main())
    for step in bar:
        at = phase(step, n_image, micro(cfg.ar_batch, args), clip_latent)
        hits = []

        def ce_of(z, prompt, n_latent, gen):   # -> cross-entropy summed over the tokens of z's L tokens, B*L
            layout, frame = layouts[n_latent]
            corrupt = error_correction(cfg.ec_strength, n_latent, cfg.vocab, gen) if cfg.ec_strength > 0 else None
            with torch.no_grad():   # error correction: fresh corruption at every use of an echoed clip
                codes, inputs, f_hat, _ = tok.quantize(z, corrupt=corrupt)
            x, y = ar_sequence(inputs, codes, f_hat)   # f_hat: the corrupted sum, the later frames' context
            target = y.flatten() if cfg.ar_soft == 0 else \
                frame_scale_order(tok.soft_codes(z, inputs, cfg.ar_soft, spacing)).flatten(0, 1)   # [(B L), V]
            drop = torch.rand(len(x), generator=gen, device=device) < cfg.cond_drop
            if cfg.frame_mask > 0 and n_latent > 1:
                hide, prev = random_frame_mask(cfg.frame_mask, frame, len(x), gen)
                x = hide_previous(x, prev)
                layout = replace(layout, hide=hide)
            logits = fwd(x, layout, prompt, drop=drop)
            hits.append((logits.argmax(-1) == y).float().mean())
            return F.cross_entropy(logits.flatten(0, 1), target, reduction="sum"), y.numel()

        def loss_of(shard):
            gen = torch.Generator(device).manual_seed(batch_seed(args.seed, "ar", step, shard))
            with autocast(device, args.precision):
                return joint_mean(ce_of, echoes[shard], mixed.get(shard), step, at, n_mixed, gen)

        loss = optimize(model, opt, lr_at(step, cfg.ar_steps, cfg.ar_lr, cfg.warmup),
                        [lambda s=s: loss_of(s) for s in shards(args)])
        ema.update(model, step)
        bar.set_postfix(loss=f"{loss:.3f}")
        log(out, stage="ar", step=step + 1, loss=loss)
        save, stop = end_of_step(args, bar.iterable.start, step, cfg.ar_steps, cfg.eval_every)
        if save and is_main():
            with autocast(device, args.precision):
                held_out = eval_ar(ema.model, tok, held, held_labels, device)
            bar.write(f"[ar] step {step + 1}: held-out " + ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
            log(out, stage="ar", step=step + 1, train_acc=(sum(hits) / len(hits)).item(),
                **{"heldout_" + k: v for k, v in held_out.items()})
            save_stage(path, cfg, model, opt, step + 1, tokenizer_id=tok_id, train_s=curve.train_s(), **ema.saved())
            curve.point(bar, step + 1, 1 + (at.n_latent - 1) * cfg.ft,
                        lambda prompts, gen, f: sample_stage("ar", ema.model, cfg, tok, None, prompts, gen, f, args))
        if stop:
            stop_now(bar, "ar", args)
    curve.write()
    return ema.model.eval()


# ------------------------------------------------------------------------ paper B: teacher and causal student
def measure_latent(tok, cfg, digits, device, n=64):
    """LatentStats of z over n training clips (tokenizer.LatentStats; --fm-norm)."""
    if cfg.fm_norm not in ("channel", "global"):
        raise ValueError(f"--fm-norm must be channel or global, got {cfg.fm_norm!r}")
    video, _ = data.moving_mnist(n, digits, "train", data.mm_config(cfg), seed=10 ** 6)
    with torch.no_grad():
        return LatentStats.measure(tok.encode(data.to_model(video, device)).float(), cfg.fm_norm == "channel",
                                   cfg.fm_patch)


def image_steps(cfg, steps):
    """Paper A's multi-stage training: the first steps of a stage train on single images (--image-frac)."""
    return int(round(cfg.image_frac * steps))


def train_flow(cfg, args, digits, out, tok, stage):
    """Paper B. stage 'teacher': full attention over whole clips, noise level per clip -- the real score.
    stage 'causal': the student, initialised from the teacher, forward mask over `cfg.unit` units.

    The student is trained by teacher forcing with a clean/noisy layout (CausVid's teacher-forcing variant):
    the sequence holds every unit twice, clean (t=0) and noisy (its own t); a noisy unit sees the clean units
    before it and itself (model.unit_mask). At inference a unit is denoised while the KV cache holds the
    *clean* earlier units, so this trains exactly the situation met at inference, for all units in one pass.
    Diffusion forcing (noisy contexts) would be cheaper but trains on contexts that a clean cache never shows.
    Data (--causal-data): real clips, or clips sampled from the teacher as in paper B's stage 1 (teacher_clips).
    The teacher follows paper A's multi-stage recipe when --image-frac > 0: single images first, then clips.
    """
    device, path = args.device, out / f"{stage}.pt"
    steps, lr = (cfg.fm_steps, cfg.fm_lr) if stage == "teacher" else (cfg.causal_steps, cfg.causal_lr)
    model = Transformer(cfg.model_config()).to(device)
    model.checkpointing = args.checkpointing
    opt = adamw(model.parameters(), lr, cfg, cfg.weight_decay)
    step, state = resume(path, cfg, stage_keys(stage), model, opt, stage, steps, tok)
    if step >= steps:
        return EMA(model, cfg.gen_ema, state).model.eval()
    from_teacher = stage == "causal" and cfg.causal_data == "teacher"   # paper B's stage 1: the teacher's clips
    teacher = None
    if stage == "causal" and (state is None or from_teacher):
        teacher = load_checkpoint(out / "teacher.pt", cfg, TEACHER_INIT_KEYS)
        check_tokenizer(teacher, tok, out / "teacher.pt")
    if state is not None:
        stats = LatentStats.from_state(state["z_stats"])
    elif stage == "causal":   # the student starts as the teacher the run ships: its average, with --gen-ema
        model.load_state_dict(trained_weights(teacher))
        stats = LatentStats.from_state(teacher["z_stats"])
    else:
        stats = measure_latent(tok, cfg, digits, device)
    broadcast_from_main(model)
    ema = EMA(model, cfg.gen_ema, state)   # --gen-ema: ema.model is what is sampled, scored and saved for use
    tok, tok_id = frozen(tok, device)
    clip_latent = cfg.latent_frames()   # of a training clip
    grid = stats.shape(cfg.z_channels, tok.latent_grid)[1]
    kind = "frame" if stage == "teacher" else cfg.unit
    n_image = image_steps(cfg, steps) if stage == "teacher" else 0

    def units_of(n_latent):   # -> order [L] (raster index of each token), Layout, number of units
        order, pos, unit = unit_layout(kind, n_latent, grid, **cfg.unit_kwargs())
        pos, unit = pos.to(device), unit.to(device)
        n_units = int(unit.max()) + 1
        if stage == "teacher":
            return order, Layout(pos, unit, mask="full"), n_units
        # the student: every unit twice, clean copies then noisy copies (see docstring); 2L tokens
        noisy = torch.cat([torch.zeros_like(unit, dtype=torch.bool), torch.ones_like(unit, dtype=torch.bool)])
        return order, Layout(torch.cat([pos, pos]), torch.cat([unit, unit]), mask="forward", noisy=noisy), n_units

    n_mixed = round(cfg.image_mix * micro(cfg.fm_batch, args) * clip_latent) if stage == "teacher" else 0
    layouts = {n: units_of(n) for n in ({1, clip_latent} if n_image or n_mixed else {clip_latent})}
    curve = Curve(out, stage, args, state, cfg, digits)
    fwd = compiled(model, args)
    bar = tqdm(range(step, steps), desc=stage, initial=step, total=steps, dynamic_ncols=True, disable=not is_main())
    if from_teacher:
        base = flow_model(teacher, cfg.model_config(), device).requires_grad_(False)   # sample.py's teacher

    def clips(shard):   # Echo's source for one micro-batch: the teacher's samples or encoded Moving MNIST
        if from_teacher:
            return teacher_clips(cfg, args, base, stats, clip_latent, shard)
        return encoded_clips(cfg, args, digits, tok, stage, n_image, shard, stats.normalize)
    echoes = {s: Echo(clips(s), cfg.echo) for s in shards(args)}
    mixed = {s: Echo(encoded_clips(cfg, args, digits, tok, stage, steps, s, stats.normalize, stream=1), cfg.echo)
             for s in shards(args)} if n_mixed else {}   # --image-mix: single images beside the clips
    for step in bar:
        at = phase(step, n_image, micro(cfg.fm_batch, args), clip_latent)

        def sse_of(z, prompt, n_latent, gen):   # -> squared velocity error summed over z's tokens, their count
            order, layout, n_units = layouts[n_latent]
            x0 = partition(z, order, cfg.unit_kwargs()["scales"])                       # [B,L,c] in unit order
            b = len(x0)
            drop = torch.rand(b, generator=gen, device=device) < cfg.cond_drop
            if stage == "teacher":   # one noise level per clip: flow_t [B,L]
                flow_t = flow_times((b, 1), cfg.fm_time, gen, device, cfg.fm_shift).expand(-1, x0.shape[1])
                xt, v = flow_pair(x0, flow_t, gen)
                pred = fwd(xt, layout, prompt, drop=drop, flow_t=flow_t)
            else:                    # one noise level per unit [B,n_units], then per (noisy) token [B,L]
                flow_t = flow_times((b, n_units), cfg.fm_time, gen, device, cfg.fm_shift)
                flow_t = flow_t[:, layout.unit[len(layout.unit) // 2:]]
                xt, v = flow_pair(x0, flow_t, gen)
                pred = fwd(torch.cat([x0, xt], 1), layout, prompt, drop=drop,            # [B,2L,c]: clean, noisy
                           flow_t=torch.cat([torch.zeros_like(flow_t), flow_t], 1))[:, x0.shape[1]:]
            return F.mse_loss(pred.float(), v, reduction="sum"), v.numel()

        def loss_of(shard):
            gen = torch.Generator(device).manual_seed(batch_seed(args.seed, stage, step, shard))
            with autocast(device, args.precision):
                return joint_mean(sse_of, echoes[shard], mixed.get(shard), step, at, n_mixed, gen)

        loss = optimize(model, opt, lr_at(step, steps, lr, cfg.warmup), [lambda s=s: loss_of(s) for s in shards(args)])
        ema.update(model, step)
        bar.set_postfix(loss=f"{loss:.4f}")
        log(out, stage=stage, step=step + 1, loss=loss)
        save, stop = end_of_step(args, bar.iterable.start, step, steps, cfg.eval_every)
        if save and is_main():
            save_stage(path, cfg, model, opt, step + 1, z_stats=stats.state(), tokenizer_id=tok_id,
                       train_s=curve.train_s(), **ema.saved())
            curve.point(bar, step + 1, 1 + (at.n_latent - 1) * cfg.ft,
                        lambda prompts, gen, f: sample_stage(stage, ema.model, cfg, tok, stats, prompts, gen, f, args))
        if stop:
            stop_now(bar, stage, args)
    curve.write()
    return ema.model.eval()


def train_dmd(cfg, args, digits, out, tok):
    """Paper B Sec. 3.3, its stage 2: Symmetric DMD (dmd.py) distils the causal student into a few-step streaming
    generator. One step = --dmd-critic fake-scorer updates, then one generator update (dmd.py's docstring).

    generator: initialised from the causal student (causal.pt), trained through its own rollout (dmd.rollout);
    real scorer: the frozen teacher (teacher.pt), full attention, guided by --dmd-cfg;
    fake scorers: one per mask of --dmd-fake (dmd.fake_masks), each starting from the teacher's weights -- the
    teacher learnt exactly their task, whole clips noised to one level (the student saw clean contexts) -- and
    fine-tuned by flow matching on the generator's clips.
    No data is read: DMD needs prompts only (random digits, as sample.py draws them). The moving average of the
    generator (--dmd-ema) is what load_flow, the sample GIF and sample.py --method dmd use."""
    device, path, steps = args.device, out / "dmd.pt", cfg.dmd_steps
    G = Transformer(cfg.model_config()).to(device)   # G_theta of paper B's Eq. 2, the few-step generator
    opt = adamw(G.parameters(), cfg.dmd_lr, cfg, cfg.weight_decay)
    masks = dmd.fake_masks(cfg.dmd_fake)
    scorers = torch.nn.ModuleList(Transformer(cfg.model_config()) for _ in masks).to(device)
    fakes = dict(zip(masks, scorers))                      # mask -> its fake scorer
    for m in [G, *scorers]:
        m.checkpointing = args.checkpointing
    fake_opt = adamw(scorers.parameters(), cfg.dmd_fake_lr, cfg, cfg.weight_decay)
    step, state = resume(path, cfg, stage_keys("dmd"), G, opt, "dmd", steps, tok)
    if state is None:   # a fresh start: the generator is the causal student
        student = load_checkpoint(out / "causal.pt", cfg, stage_keys("causal"))
        check_tokenizer(student, tok, out / "causal.pt")
        G.load_state_dict(trained_weights(student))   # the student's average, with --gen-ema
    ema = EMA(G, cfg.dmd_ema, state)
    if step >= steps:
        return ema.model.eval()
    teacher_state = load_checkpoint(out / "teacher.pt", cfg, TEACHER_INIT_KEYS)
    check_tokenizer(teacher_state, tok, out / "teacher.pt")
    if state is None:   # ... and the fake scorers start as the teacher
        for scorer in scorers:
            scorer.load_state_dict(trained_weights(teacher_state))
    else:
        scorers.load_state_dict(state["fakes"])
        fake_opt.load_state_dict(state["fake_opt"])
    broadcast_from_main(G), broadcast_from_main(scorers)
    stats = LatentStats.from_state(student["z_stats"] if state is None else state["z_stats"])
    teacher = flow_model(teacher_state, cfg.model_config(), device).requires_grad_(False)   # the real score
    tok, tok_id = frozen(tok, device)
    channels, grid = stats.shape(cfg.z_channels, tok.latent_grid)
    clip_latent = cfg.latent_frames()   # of a training clip
    order, pos, unit = unit_layout(cfg.unit, clip_latent, grid, **cfg.unit_kwargs())
    layout = Layout(pos.to(device), unit.to(device))   # the generator's units; each scorer sets its own mask

    def clip(prompts, gen):   # the generator's clip in its unit layout [B,L,c]; gradient as the caller's context
        z = dmd.rollout(G, prompts, clip_latent, grid, channels, gen, cfg.unit, cfg.unit_kwargs(),
                        cfg.dmd_unit_steps, cfg.fm_shift)
        return partition(z, order)

    def prompts(gen):
        return random_prompts(micro(cfg.fm_batch, args), cfg.num_digits, gen)

    def fake_loss_of(gen):   # flow matching of the fake scorers on fresh generated clips
        p = prompts(gen)
        with autocast(device, args.precision):
            with torch.no_grad():
                x0 = clip(p, gen)
            flow_t = flow_times((len(x0), 1), cfg.fm_time, gen, device, cfg.fm_shift).expand(-1, x0.shape[1])
            return sum(dmd.flow_matching_loss(dmd.fake_velocity(fakes, m, layout, p), x0, flow_t, gen)
                       for m in fakes) / len(fakes)

    def loss_of(gen):        # the generator's distribution matching loss
        p = prompts(gen)
        with autocast(device, args.precision):
            x = clip(p, gen)
            flow_t = dmd.noise_levels(len(x), cfg.dmd_t_min, cfg.dmd_t_max, gen, device)[:, None].expand(-1, x.shape[1])
            return dmd.distribution_matching_loss(x, flow_t, dmd.real_x0(teacher, layout, p, cfg.dmd_cfg),
                                                  dmd.fake_x0(fakes, cfg.dmd_fake, layout, p), gen)[0]

    curve = Curve(out, "dmd", args, state, cfg, digits)
    bar = tqdm(range(step, steps), desc="dmd", initial=step, total=steps, dynamic_ncols=True, disable=not is_main())
    for step in bar:
        gens = [torch.Generator(device).manual_seed(batch_seed(args.seed, "dmd", step, s)) for s in shards(args)]
        for _ in range(cfg.dmd_critic):   # the fake scorers follow the generator's current clips
            fake_loss = optimize(scorers, fake_opt, lr_at(step, steps, cfg.dmd_fake_lr, cfg.warmup),
                                 [lambda g=g: fake_loss_of(g) for g in gens])
        loss = optimize(G, opt, lr_at(step, steps, cfg.dmd_lr, cfg.warmup),
                        [lambda g=g: loss_of(g) for g in gens])
        ema.update(G, step)
        bar.set_postfix(loss=f"{loss:.4f}", fake=f"{fake_loss:.4f}")
        log(out, stage="dmd", step=step + 1, loss=loss, fake_loss=fake_loss)
        save, stop = end_of_step(args, bar.iterable.start, step, steps, cfg.eval_every)
        if save and is_main():
            save_stage(path, cfg, G, opt, step + 1, **ema.saved(), fakes=scorers.state_dict(),
                       fake_opt=fake_opt.state_dict(), z_stats=stats.state(), tokenizer_id=tok_id,
                       train_s=curve.train_s())
            curve.point(bar, step + 1, cfg.frames,
                        lambda prompts, gen, f: sample_stage("dmd", ema.model, cfg, tok, stats, prompts, gen, f, args))
        if stop:
            stop_now(bar, "dmd", args)
    curve.write()
    return ema.model.eval()


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = parser(__doc__.split("\n")[0], "train.py")
    p.add_argument("--stage", choices=STAGES + ["all"], default="all", help="which stage to train (all: every stage "
                   "but dmd, which runs on its own command after causal)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config>)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward passes (for GPUs; on a "
                   "CPU the compile time outweighs the gain in a toy run)")
    p.add_argument("--curve", type=int, default=0, help="learning curve: at every checkpoint, score this many "
                   "prompted samples with eval.py's DigitNet (semantic, consistency) against training minutes; table "
                   "and plot in --out/curve_<stage>.md/.png (0 = off; the first use trains eval.py's nets, ~10 min)")
    p.add_argument("--stop-after", type=int, default=0, help="save and stop after this many steps of this run "
                   "(for time-sliced or preemptible jobs; running the command again resumes)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step: the batch flags are the "
                   "global batch, split over ranks (torchrun) x this, for a batch larger than memory")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the transformer blocks: "
                   "recomputed in the backward pass instead of stored (less memory, ~1/3 more compute)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)       # every flag and the run directory are checked before any work (issue 20)
    check_config(p, cfg)
    check_flags(p, args, {"seed": SEED, "curve": "[0, 1e4]", "stop_after": "[0, 1e9]", "grad_accum": "[1, 1e5]"})
    check_device(p, args.device)
    check_path(p, "--out", args.out, "outdir")
    out = Path(args.out if args.out is not None else f"runs/{args.config}")
    stages = QUICKSTART if args.stage == "all" else [args.stage]
    shares = int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum   # torchrun sets WORLD_SIZE
    for flag in {{"tokenizer": "tok_batch", "ar": "ar_batch"}.get(s, "fm_batch") for s in stages}:
        if getattr(cfg, flag) % shares:
            p.error(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: allowed a multiple of ranks x --grad-accum "
                    f"({shares})")
    if "dmd" in stages and cfg.unit == "scale":
        p.error("--unit scale: --stage dmd needs frame, keydetail or cube units (the teacher scores the finest "
                "latent, which scale units only reach at their last unit)")
    with one_line_errors(p), disk_errors(p, out):   # one line, not a traceback
        check_run(cfg, out, stages)
        init_distributed(args)
        out.mkdir(parents=True, exist_ok=True)
        train_stages(cfg, args, out, stages)


@contextmanager
def disk_errors(p, out):
    """A disk that fills up or turns read-only mid-run ends it with one line (exit 2); the checkpoints written so far
    stay loadable (checkpoint.save_checkpoint is atomic), so the same command resumes once there is room."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        p.error(f"--out {out}: {e.strerror} while writing {e.filename or 'a file'}; the last checkpoint is intact: "
                f"make room and run the same command to resume")


def check_run(cfg, out, stages):
    """Before any work, the checkpoints in `out` that the stages will resume or build on must fit the flags
    (load_checkpoint raises CheckError otherwise), and a stage after the tokenizer needs one."""
    if "tokenizer" not in stages and not (out / "tokenizer.pt").exists():
        raise CheckError(f"no tokenizer in {out}: train one first (--stage tokenizer), or point --out at a run")
    later = {"causal": ["teacher"], "dmd": ["teacher", "causal"]}
    for stage in ["tokenizer"] + stages + [s for s in stages for s in later.get(s, [])]:
        if (out / f"{stage}.pt").exists():
            keys = TEACHER_INIT_KEYS if stage == "teacher" and stage not in stages else stage_keys(stage)
            load_checkpoint(out / f"{stage}.pt", cfg, keys)


def train_stages(cfg, args, out, stages):
    seed_everything(args.seed)
    digits = data.load_digits(cfg.data_dir or None)
    is_main() and print(f"[data] digits: {data_source_line(digits)}")
    t0 = time.time()
    tok = None
    for stage in stages:
        if stage == "tokenizer":
            tok = train_tokenizer(cfg, args, digits, out)
        else:
            tok = tok or load_tokenizer(out, args.device)[0]
            if stage == "ar":
                train_ar(cfg, args, digits, out, tok)
            elif stage == "dmd":
                train_dmd(cfg, args, digits, out, tok)
            else:
                train_flow(cfg, args, digits, out, tok, stage)
            if is_main():   # rank 0 alone writes
                write_sample_gif(cfg, args, out, stage, tok)
        barrier()   # the next stage reads what rank 0 just wrote
    is_main() and print(f"[train] done in {time.time() - t0:.0f} s; outputs in {out}/")


def data_source_line(d):
    return f"{d.source}: {len(d.train_images)} train / {len(d.test_images)} held-out digit images"


if __name__ == "__main__":
    sys.exit(main())
