"""The README's comparison tables, reproducible: every row trains under the same budget as the base run, in its
own directory beside it (sharing the base run's tokenizer, and teacher for paper B), then is sampled and scored
with eval.py. Finished rows are skipped when the command is run again (checkpoints resume).

  python experiments.py units  --base runs/toy   # paper B Tables 2 and 3: prediction unit, cube size
  python experiments.py ar     --base runs/toy   # paper A: error correction x random frame mask; drift; continuation
  python experiments.py stream --base runs/toy   # paper B Sec. 3.4: a long streamed video, per-unit cost and drift
                                                  # (--generator dmd --unit-steps 1: the few-step DMD generator)
  python experiments.py suite  --base runs/toy   # eval.py itself: real held-out clips vs constructed inputs
  python experiments.py scales --base runs/toy   # paper A: true codes of the first k scales, the rest sampled
  python experiments.py codes  --base runs/toy   # paper A: does a frame's code map follow from the previous one?
  python experiments.py prompt --base runs/toy   # paper B's teacher: does it read the prompt, at which noise level?
  python experiments.py positions --base runs/toy  # the teacher on single frames: how digit positions slow learning

The base run is `python train.py --config toy` (or any config). Each command prints a markdown table and writes
<base>/<command>.json.
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import bench
import checkpoint
import data
import eval as E
import tokenizer
import train
from config import (SEED, Config, Parser, add_precision_flag, autocast, check_device, check_flags, check_path,
                    one_line_errors)
from model import Layout, Transformer, flow_pair, flow_times, hw, partition, unit_layout
from sample import (default_cfg, generate_ar, generate_student, generate_teacher, random_prompts, reconstruct, sample_stage,
                    stream_layout, unit_steps)

METRICS = ("semantic", "consistency", "fvd_mm", "fid_mm", "motion")


def variant_dir(base, name, links):
    """<base>-<name>/ with the base run's `links` checkpoints linked in (shared, not retrained)."""
    d = base.with_name(f"{base.name}-{name}")
    d.mkdir(exist_ok=True)
    for f in links:
        if not (d / f).exists():
            os.symlink((base / f).resolve(), d / f)
    return d


@torch.no_grad()
def decode(tok, z):
    """Latent [B,c,t,h,w] -> uint8 clips [B,T,H,W], one clip at a time (long videos)."""
    return np.concatenate([data.from_model(tok.decode(z[i:i + 1])) for i in range(len(z))])


def prompts_for(n, num_digits, seed):
    return random_prompts(n, num_digits, torch.Generator().manual_seed(seed))


def score(video, prompts, nets, digits, speed):
    """eval.py's generation metrics of uint8 clips [N,T,H,W] made for prompts [N, digits], against real clips whose
    digits move at `speed` (the run's data)."""
    r = E.evaluate(video, prompts.tolist(), nets=nets, digits=digits, speed=speed)
    return {k: r[k] for k in METRICS}


def table(rows, cols):
    """rows: {name: {col: value}} -> markdown."""
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                                  for c in cols) + " |")
    return "\n".join(lines)


def train_args(args):
    return SimpleNamespace(device=args.device, seed=args.seed, stop_after=0, precision=args.precision, compile=False,
                           curve=0, grad_accum=1, checkpointing=False)


def amp(args):
    return autocast(args.device, args.precision)


# ------------------------------------------------------------------------------------ paper B: units, cubes
def units(args, base, cfg, tok, digits, nets):
    """Paper B Table 2 (unit type) and Table 3 (cube size) on Moving MNIST: one causal student per row, each
    initialised from the same teacher and trained for cfg.causal_steps; 4 Euler steps per unit, CFG 3."""
    teacher, _, stats = checkpoint.load_flow(base, "teacher", args.device, tok)
    n_latent, (channels, side) = cfg.latent_frames(), stats.shape(cfg.z_channels, tok.latent_grid)
    rows = {"frame": dict(unit="frame"), f"keydetail (k={cfg.stride})": dict(unit="keydetail"),
            "scale": dict(unit="scale")}
    for name, (a, b) in {"t/2 x h/2 x w/2": (2, 2), "t/4 x h/4 x w/4": (4, 4), "t x h/2 x w/2": (1, 2)}.items():
        cube = f"{max(1, n_latent // a)},{hw(side)[0] // b},{hw(side)[1] // b}"
        if n_latent % max(1, n_latent // a) == 0 and cube not in [r.get("cube") for r in rows.values()]:  # 3: no t/2
            rows[f"cube {name} ({cube.replace(',', 'x')})"] = dict(unit="cube", cube=cube)
    prompts = prompts_for(args.num, cfg.num_digits, args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with amp(args):
        z = generate_teacher(teacher, prompts.to(args.device), n_latent, side, channels, gen, 25, cfg.teacher_cfg,
                             progress=False, shift=cfg.fm_shift)
        video = decode(tok, stats.denormalize(z))
    out = {"teacher (full attention, 25 steps)": {**score(video, prompts, nets, digits, cfg.speed),
                                                  "frames/s": video.size / video[0, 0].size / (time.perf_counter() - t0)}}
    for name, over in rows.items():
        c = dataclasses.replace(cfg, **over)
        same = all(getattr(cfg, k) == v for k, v in over.items())     # the base run's own student
        d = base if same else variant_dir(base, over["unit"] + ("-" + over["cube"].replace(",", "x") if "cube" in
                                                                 over else ""), ["tokenizer.pt", "teacher.pt"])
        t1 = time.perf_counter()
        train.train_flow(c, train_args(args), digits, d, tok, "causal")
        train_s = time.perf_counter() - t1
        model, c, stats = checkpoint.load_flow(d, "causal", args.device, tok)
        n_units = len(stream_layout(c.unit, n_latent, n_latent, side, **c.unit_kwargs()))
        gen = torch.Generator(args.device).manual_seed(args.seed)
        t1 = time.perf_counter()
        with amp(args):
            z = generate_student(model, prompts.to(args.device), n_latent, n_latent, side, channels, gen, c.unit,
                                 c.unit_kwargs(), 4, 3.0, progress=False, shift=c.fm_shift)
            video = decode(tok, stats.denormalize(z))
        out[f"{name}: {n_units} units"] = {**score(video, prompts, nets, digits, cfg.speed), "train s": round(train_s),
                                           "frames/s": video.size / video[0, 0].size / (time.perf_counter() - t1)}
        print(f"[units] {name}: {out[f'{name}: {n_units} units']}", flush=True)
    return out, [*METRICS, "frames/s"]


# ---------------------------------------------------------------------------- paper A: EC x frame mask ablation
def ar(args, base, cfg, tok, digits, nets):
    """Paper A's ablations: error correction on/off x random frame mask on/off, each trained for cfg.ar_steps.
    Scored on prompted clips of the trained length and of 2x and 4x that length (drift: the cache rolls over the
    last trained-length - 1 frames), and on continuation of held-out clips (given 1 + 2 ft frames, predict the
    next 3 ft: Moving MNIST's 10 -> 10 with our 1 + ft*k lengths), prompted with the clips' true digits."""
    rows = {"EC on, frame mask on": {}, "EC off, frame mask on": dict(ec_strength=0.0),
            "EC on, frame mask off": dict(frame_mask=0.0), "EC off, frame mask off": dict(ec_strength=0.0, frame_mask=0.0)}
    trained = cfg.latent_frames()
    prompts = prompts_for(args.num, cfg.num_digits, args.seed)
    ctx_frames, total = 1 + 2 * cfg.ft, 1 + 5 * cfg.ft
    truth, labels = train.heldout_clips(cfg, digits, args.num // 2, frames=total, seed=99)
    labels = torch.as_tensor(labels)
    out = {}
    for name, over in rows.items():
        d = base if not over else variant_dir(base, "ar-" + "-".join(f"{k}{v:g}" for k, v in over.items()),
                                              ["tokenizer.pt"])
        c = dataclasses.replace(cfg, **over)
        train.train_ar(c, train_args(args), digits, d, tok)
        model, _ = checkpoint.load_ar(d, args.device, tok)
        with amp(args):
            r = train.eval_ar(model, tok, truth[:, :cfg.frames], labels, args.device)
        for mult in (1, 2, 4):
            gen = torch.Generator(args.device).manual_seed(args.seed)
            with amp(args):
                video = decode(tok, generate_ar(model, tok, prompts.to(args.device), 1 + (trained - 1) * mult, gen,
                                                temperature=cfg.ar_temperature, window=trained - 1, progress=False))
            s = score(video, prompts, nets, digits, cfg.speed)
            tag = "" if mult == 1 else f" {mult}x"
            r.update({f"semantic{tag}": s["semantic"], f"consistency{tag}": s["consistency"], f"fvd_mm{tag}": s["fvd_mm"]})
        gen = torch.Generator(args.device).manual_seed(args.seed)
        with torch.no_grad(), amp(args):
            codes = tok.quantize(tok.encode(data.to_model(truth[:, :ctx_frames], args.device)))[0]
            pred = decode(tok, generate_ar(model, tok, labels.to(args.device), cfg.latent_frames(total), gen,
                                           temperature=cfg.ar_temperature, context=codes, window=trained - 1,
                                           progress=False))[:, ctx_frames:]
        s = E.prediction_metrics(pred, truth[:, ctx_frames:])
        r.update({"cont. mse": s["mse"], "cont. ssim": s["ssim"],
                  "cont. semantic": score(pred, labels, nets, digits, cfg.speed)["semantic"]})
        out[name] = r
        print(f"[ar] {name}: {r}", flush=True)
    cols = [f"{m}{tag}" for tag in ("", " 2x", " 4x") for m in ("semantic", "consistency", "fvd_mm")]
    return out, ["ce", "ce_null", "ce_wrong", "acc_last_frame0", "acc_last_later", "acc_last_later_nopast", *cols, "cont. mse", "cont. ssim",
                 "cont. semantic"]


# --------------------------------------------------------------------------------- paper B: streaming, drift
def stream(args, base, cfg, tok, digits, nets):
    """A streaming generator (--generator: the causal student, 4 steps per unit and CFG 3; or the DMD generator,
    its run's --dmd-unit-steps and no CFG; --unit-steps overrides) streams args.long frames for args.num clips with
    the rolling cache (the training clip's time window). Reports ms per unit and KV-cache size in a steady state and
    at the end, timed beside a fresh stream so that the machine's drift cancels (bench.paired_clock), and the scores
    of windows of the trained length along the video (does quality drift?)."""
    model, c, stats = checkpoint.load_flow(base, args.generator, args.device, tok)
    steps, cfg_scale = args.unit_steps or unit_steps(args.generator, c), default_cfg(args.generator, c)
    channels, side = stats.shape(c.z_channels, tok.latent_grid)
    prompts = prompts_for(args.num, c.num_digits, args.seed).to(args.device)
    z, clock = bench.clocked_stream(model, c, prompts, args.long, side, channels, steps, cfg_scale, args.seed,
                                    args.device, args.precision)
    with amp(args):
        video = decode(tok, stats.denormalize(z))
    out = {"cost": {"generator": f"{args.generator}, {steps} steps per unit, CFG {cfg_scale:g}", **clock}}
    print(f"[stream] {out['cost']}", flush=True)
    starts = np.linspace(0, video.shape[1] - cfg.frames, 5).astype(int)
    for s in starts:
        out[f"frames {s}-{s + cfg.frames - 1}"] = score(video[:, s:s + cfg.frames], prompts, nets, digits, cfg.speed)
    return out, list(METRICS)


# ------------------------------------------------------------------------------------ the evaluation suite
def scales(args, base, cfg, tok, digits, nets):
    """Where paper A's sampling fails: every frame gets the true codes of its first k scales (held-out clips, their
    digits as prompts) and the model samples the rest; k = K is the tokenizer's quantized reconstruction."""
    model, _ = checkpoint.load_ar(base, args.device, tok)
    real, labels = train.heldout_clips(cfg, digits, args.num, seed=5)
    prompts = torch.from_numpy(labels).to(args.device)
    with torch.no_grad(), amp(args):
        codes = tok.quantize(tok.encode(data.to_model(real, args.device)))[0]
    rows = {}
    for k in range(len(tok.scales) + 1):
        g = torch.Generator(args.device).manual_seed(args.seed)
        with torch.no_grad(), amp(args):
            f_hat = generate_ar(model, tok, prompts, codes[0].shape[1], g, temperature=cfg.ar_temperature,
                                context=codes, context_scales=k, progress=False)
        name = f"true scales {', '.join(map(str, tok.scales[:k]))}" if k else "all sampled"
        rows[name] = score(decode(tok, f_hat), prompts, nets, digits, cfg.speed)
    return rows, list(METRICS)


def codes(args, base, cfg, tok, digits, nets):
    """How predictable is the next latent frame's code map from the previous one? Per scale, on held-out clips:
    the share of tokens holding the most common code, and the share a copy of the previous latent frame's codes
    gets right -- at the same cell, and at the best spatial shift chosen per clip and frame (an oracle for
    "the digits moved")."""
    real, _ = train.heldout_clips(cfg, digits, args.num, seed=5)
    with torch.no_grad(), amp(args):
        maps = tok.quantize(tok.encode(data.to_model(real, args.device)))[0]
    rows = {}
    for s, c in zip(tok.scales, maps):                   # c [N, t, s, s]
        prev, now = c[:, :-1], c[:, 1:]
        best = torch.zeros(now.shape[:2], device=c.device)
        for dy in range(-(s // 2), s // 2 + 1):
            for dx in range(-(s // 2), s // 2 + 1):
                hit = (torch.roll(prev, (dy, dx), (2, 3)) == now).float().mean((2, 3))
                best = torch.maximum(best, hit)
        rows[f"scale {s}x{s}"] = {"most common code": torch.unique(c, return_counts=True)[1].max().item() / c.numel(),
                                  "copy, same cell": (prev == now).float().mean().item(),
                                  "copy, best shift": best.mean().item()}
    return rows, ["most common code", "copy, same cell", "copy, best shift"]


def suite(args, base, cfg, tok, digits, nets):
    """eval.py's figures on real held-out clips (their digits as prompts) against constructed inputs: noise,
    blank frames, frames in a random order, and the base run's tokenizer reconstructions."""
    real, labels = train.heldout_clips(cfg, digits, args.num, seed=5)
    rng = np.random.default_rng(args.seed)
    prompts = torch.from_numpy(labels)
    rows = {"real held-out": real, "noise": rng.integers(0, 256, real.shape, dtype=np.uint8),
            "blank": np.zeros_like(real), "shuffled frames": np.stack([c[rng.permutation(len(c))] for c in real]),
            "tokenizer reconstructions (quantized)": None, "tokenizer reconstructions (continuous)": None}
    with amp(args):
        rows["tokenizer reconstructions (quantized)"] = reconstruct(tok, real, args.device, quantized=True)
        rows["tokenizer reconstructions (continuous)"] = reconstruct(tok, real, args.device, quantized=False)
    return {name: score(v, prompts, nets, digits, cfg.speed) for name, v in rows.items()}, list(METRICS)


@torch.no_grad()
def prompt(args, base, cfg, tok, digits, nets):
    """The teacher's held-out flow-matching loss at fixed flow times with each clip's own prompt, another clip's
    prompt and the null condition. Equal columns = the model ignores the prompt; the gap shows at which noise level
    the prompt is read (where the digits are decided). Same x_t and noise in every column."""
    model, c, stats = checkpoint.load_flow(base, "teacher", args.device, tok)
    clips, labels = train.heldout_clips(c, digits, args.num)
    channels, side = stats.shape(c.z_channels, tok.latent_grid)
    order, pos, unit = unit_layout("frame", c.latent_frames(), side)
    layout = Layout(pos.to(args.device), unit.to(args.device), mask="full")
    with amp(args):
        x0 = partition(stats.normalize(tok.encode(data.to_model(clips, args.device)).float()), order)
    right = torch.from_numpy(labels).to(args.device)
    conditions = {"right prompt": (right, False), "another clip's prompt": (right.roll(1, 0), False),
                  "null prompt": (right, True)}
    rows = {}
    for level in (0.2, 0.5, 0.8, 0.95):
        flow_t = torch.full(x0.shape[:2], level, device=args.device)                # [B,L]
        xt, v = flow_pair(x0, flow_t, torch.Generator(args.device).manual_seed(args.seed))
        with amp(args):
            rows[f"t = {level}"] = {name: torch.nn.functional.mse_loss(
                model(xt, layout, p, drop=torch.full((len(xt),), drop, device=args.device), flow_t=flow_t).float(),
                v).item()
                for name, (p, drop) in conditions.items()}
    return rows, list(conditions)


def placed_frames(n, digits, grid, size, rng):
    """n single frames of one digit each -> (uint8 [n,1,size,size], labels [n,1]). grid 0: the digit at the centre;
    grid g > 0: its top-left corner at a uniform multiple of g pixels (g = 1: anywhere, as in Moving MNIST)."""
    images, labels = digits.split("train")
    idx = rng.integers(0, len(images), n)
    video = np.zeros((n, 1, size, size), np.uint8)
    lim = size - 28
    for i, j in enumerate(idx):
        y, x = (lim // 2, lim // 2) if grid == 0 else grid * rng.integers(0, lim // grid + 1, 2)
        video[i, 0, y:y + 28, x:x + 28] = images[j]
    return video, labels[idx][:, None]


def positions(args, base, cfg, tok, digits, nets):
    """Why the generators learn slowly: a fresh teacher (the base run's config) trained on single frames of one
    digit whose position is fixed, on the flow tokens' grid, on the latent cells' grid, or anywhere; semantic of
    `--num` prompted samples at every quarter of `--steps`. Frames come from a pool of `--pool` encoded once (no
    encoder cost per step), 32 a step. The transformer's attention is relative (RoPE), so a shift by whole tokens
    costs it nothing; what it must learn anew is each sub-token phase of a glyph (a token of 16 pixels has 256)."""
    c = dataclasses.replace(cfg, num_digits=1, frames=1)
    cell, token = c.down, c.down * c.fm_patch
    grids = {"fixed (centre)": 0, f"token grid ({token} px)": token, f"latent-cell grid ({cell} px)": cell,
             "anywhere (Moving MNIST)": 1}
    nets_digit, rows = nets[0], {}
    for name, grid in grids.items():
        rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
        video, labels = zip(*(placed_frames(256, digits, grid, c.size, rng) for _ in range(-(-args.pool // 256))))
        with torch.no_grad(), amp(args):
            z = torch.cat([tok.encode(data.to_model(v, args.device)).float() for v in video])
        labels = torch.from_numpy(np.concatenate(labels)).to(args.device)
        stats = tokenizer.LatentStats.measure(z[:512], c.fm_norm == "channel", c.fm_patch)
        side = stats.shape(c.z_channels, tok.latent_grid)[1]
        order, pos, unit = unit_layout("frame", 1, side)
        x_all = partition(stats.normalize(z), order)
        layout = Layout(pos.to(args.device), unit.to(args.device), mask="full")
        torch.manual_seed(args.seed)
        model = Transformer(c.model_config()).to(args.device)
        opt = train.adamw(model.parameters(), c.fm_lr, c, c.weight_decay)
        row, t0 = {}, time.time()
        for step in range(args.steps):
            i = torch.randint(0, len(x_all), (32,), generator=gen).to(args.device)
            flow_t = flow_times((32, 1), c.fm_time, gen, "cpu", c.fm_shift).to(args.device).expand(-1, x_all.shape[1])
            xt, v = flow_pair(x_all[i], flow_t, gen)
            drop = (torch.rand(32, generator=gen) < c.cond_drop).to(args.device)

            def loss_of():
                with amp(args):
                    return torch.nn.functional.mse_loss(
                        model(xt, layout, labels[i], drop=drop, flow_t=flow_t).float(), v)
            train.optimize(model, opt, train.lr_at(step, args.steps, c.fm_lr, c.warmup), [loss_of])
            if (step + 1) % max(1, args.steps // 4) == 0:
                prompts = prompts_for(args.num, 1, 4321).to(args.device)
                frames = sample_stage("teacher", model, c, tok, stats, prompts,
                                            torch.Generator(args.device).manual_seed(4321), 1, args)
                row[f"step {step + 1}"] = E.quick_scores(frames, prompts.tolist(), nets_digit, args.device)["semantic"]
        row["minutes"] = (time.time() - t0) / 60   # training and scoring
        rows[name] = row
        print(name, row, flush=True)
    return rows, list(next(iter(rows.values())))


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0], prog="experiments.py")
    p.add_argument("what", choices=["units", "ar", "stream", "suite", "scales", "codes", "prompt", "positions"],
                   help="which table")
    p.add_argument("--base", default="runs/toy", help="the base run directory (python train.py --config toy)")
    p.add_argument("--num", type=int, default=64, help="prompted clips scored per row")
    p.add_argument("--long", type=int, default=1997, help="stream: video frames, 1 + ft*k; its latent frames must "
                   "split into whole cubes (1997 frames = 500 latent frames = 1000 cubes of 2x2x2 tokens)")
    p.add_argument("--generator", choices=["causal", "dmd"], default="causal", help="stream: the causal student or "
                   "the DMD generator (train.py --stage dmd)")
    p.add_argument("--unit-steps", type=int, default=0, help="stream: denoising steps per unit (0: 4 for the student, "
                   "the run's --dmd-unit-steps for DMD)")
    p.add_argument("--steps", type=int, default=800, help="positions: training steps per row")
    p.add_argument("--pool", type=int, default=8192, help="positions: encoded training frames per row")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    add_precision_flag(p)
    args = p.parse_args(argv)
    check_flags(p, args, {"num": "[1, 1e5]", "long": "[1, 1e6]", "steps": "[1, 1e7]", "pool": "[1, 1e7]", "seed": SEED,
                          "unit_steps": "[0, 1000]"})
    check_device(p, args.device)
    check_path(p, "--base", args.base, "dir")
    base = Path(args.base)
    check_path(p, "--base", base, "outdir")                # <base>/<table>.json is written at the end ...
    if args.what in ("units", "ar"):                       # ... and these train variants beside the base run
        check_path(p, "--base", base.resolve().parent / f"{base.name}-variant", "outdir")
    with one_line_errors(p):   # a run without the checkpoints this table needs: one line, not a traceback
        tok, _ = checkpoint.load_tokenizer(base, args.device)
        name = {"ar": "ar.pt", "scales": "ar.pt", "suite": "tokenizer.pt", "codes": "tokenizer.pt",
                "positions": "tokenizer.pt"}.get(args.what, "teacher.pt")
        cfg = Config(**checkpoint.load_checkpoint(base / name)["config"])
        if args.what == "stream":   # the length against the student that streams it, in sample.stream_layout's units
            c = Config(**checkpoint.load_checkpoint(base / f"{args.generator}.pt")["config"])
            side, kw = c.frame_grid(c.down * c.fm_patch), c.unit_kwargs()
            latent, chunk = c.latent_frames(args.long), c.latent_frames()
            kt = kw["cube"][0] if c.unit == "cube" else 1
            count = lambda n: int(unit_layout(c.unit, n, side, **kw)[2].max()) + 1 if n else 0   # units of n frames
            if (args.long - 1) % c.ft or latent < chunk or latent % kt \
                    or latent // chunk * count(chunk) + count(latent % chunk) < 11:   # the report reads unit 10 on
                p.error(f"--long {args.long}: allowed 1 + {c.ft}*k frames, at least the trained {c.frames}, whose "
                        f"latent frames split into whole cubes of {kt} and make at least 11 units")
    digits = data.load_digits(cfg.data_dir or None, download=False)
    nets = E.load_nets(device=args.device, digits=digits)
    torch.manual_seed(args.seed)
    rows, cols = {"units": units, "ar": ar, "stream": stream, "suite": suite,
            "scales": scales, "codes": codes, "prompt": prompt, "positions": positions}[args.what](args, base, cfg, tok, digits, nets)
    print(table({k: v for k, v in rows.items() if k != "cost"}, cols))
    (base / f"{args.what}.json").write_text(json.dumps(rows, indent=2))
    print(f"[experiments] -> {base / (args.what + '.json')}")


if __name__ == "__main__":
    sys.exit(main())
