"""Speed, side by side in one run: sampling throughput of every generation method, training step time, achieved
GFLOP/s against the matmul peak measured here, and memory. Speed does not depend on the weights, so models are
freshly initialised unless --ckpt names a trained run.

  python bench.py --config toy                 # one table
  python bench.py --config toy --long 1001     # + streaming student: time and KV-cache size per unit along a long video
"""
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
from checkpoint import build_ar
from config import SEED, autocast, check_config, check_device, check_flags, config_from_args, parser
from model import Layout, Transformer, ar_sequence, frame_scale_layout, partition, unit_layout
from sample import generate_ar, generate_student, generate_teacher, random_prompts, stream_layout
from tokenizer import LatentStats, Tokenizer


def matmul_peak(device, n=2048, reps=10):
    """GFLOP/s of an n x n matmul (fp32, or bf16 under autocast): the ceiling the other rows are compared with."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, reps=3):
    """(seconds per call, GFLOP per call) of fn(), after one warm-up call."""
    fn()
    with FlopCounterMode(display=False) as fc:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps, fc.get_total_flops() / 1e9


def peak_mem_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # process peak RSS (Linux: KiB)


def train_steps(cfg, tok, ar, flow, device, b, amp, fstats):
    """One optimizer-free training step (forward under `amp()`, then backward) of each stage, on b clips."""
    digits = data.load_digits(cfg.data_dir or None, verbose=False)
    video, labels = data.moving_mnist(b, digits, "train", data.mm_config(cfg), seed=0)
    x = data.to_model(video, device)
    prompt = torch.from_numpy(labels).to(device)
    n_latent = 1 + (cfg.frames - 1) // cfg.ft
    pos, unit, _ = (a.to(device) for a in frame_scale_layout(n_latent, tok.scales, tok.latent_side))
    ar_layout = Layout(pos, unit, level=unit % len(tok.scales))
    with torch.no_grad():
        z = tok.encode(x)
        codes, inputs, f_hat, _ = tok.quantize(z)
    xs, ys = ar_sequence(inputs, codes, f_hat)
    tok_x = data.to_model(video[:, :cfg.tok_frames], device)
    zf, fside = fstats.normalize(z), fstats.shape(cfg.z_channels, tok.latent_side)[1]   # the flow models' tokens
    order, fpos, funit = unit_layout(cfg.unit, n_latent, fside, **cfg.unit_kwargs())
    x0 = partition(zf, order, cfg.unit_kwargs()["scales"])
    noisy = torch.cat([torch.zeros_like(funit, dtype=torch.bool), torch.ones_like(funit, dtype=torch.bool)]).to(device)
    fpos, funit = fpos.to(device), funit.to(device)
    causal_layout = Layout(torch.cat([fpos, fpos]), torch.cat([funit, funit]), mask="forward", noisy=noisy)

    def tokenizer_step():
        with amp():
            rec, rec_q, vq, _ = tok(tok_x)
            loss = F.mse_loss(rec, tok_x) + F.mse_loss(rec_q, tok_x) + vq
        loss.backward()

    def ar_step():
        with amp():
            loss = F.cross_entropy(ar(xs, ar_layout, prompt).flatten(0, 1), ys.flatten())
        loss.backward()

    raster, rpos, runit = unit_layout("frame", n_latent, fside)
    xr, teacher_layout = partition(zf, raster), Layout(rpos.to(device), runit.to(device), mask="full")

    def teacher_step():
        with amp():
            loss = flow(xr, teacher_layout, prompt, flow_t=torch.rand(b, len(runit), device=device)).square().mean()
        loss.backward()

    def causal_step():
        flow_t = torch.rand(b, 2 * len(funit), device=device)
        with amp():
            loss = flow(torch.cat([x0, x0], 1), causal_layout, prompt, flow_t=flow_t).float().square().mean()
        loss.backward()

    return {"train tokenizer": (tokenizer_step, b * cfg.tok_frames), "train ar": (ar_step, b * cfg.frames),
            "train teacher": (teacher_step, b * cfg.frames), f"train causal ({cfg.unit})": (causal_step, b * cfg.frames)}


def main(argv=None):
    p = parser(__doc__.split("\n")[0], "bench.py")
    p.add_argument("--num", type=int, default=4, help="clips per sampling call")
    p.add_argument("--long", type=int, default=0, help="also stream the student for this many frames (1 + ft*k)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    check_config(p, cfg)
    check_flags(p, args, {"num": "[1, 1e4]", "long": "[0, 1e6]", "seed": SEED})
    check_device(p, args.device)
    if args.long and (args.long - 1) % cfg.ft:
        p.error(f"--long {args.long}: allowed 0 (off) or 1 + {cfg.ft}*k frames")
    side, chunk = cfg.size // cfg.down // cfg.fm_patch, 1 + (cfg.frames - 1) // cfg.ft
    if args.long and len(stream_layout(cfg.unit, 1 + (args.long - 1) // cfg.ft, chunk, side, **cfg.unit_kwargs())) < 16:
        p.error(f"--long {args.long}: allowed 0 (off) or a video of at least 16 {cfg.unit} units (its timings compare "
                f"units 6-15 with the last ten)")
    device = args.device
    torch.manual_seed(args.seed)
    tok = Tokenizer(cfg.tokenizer_config(), cfg.size).to(device).eval()
    ar = build_ar(cfg, cfg.vocab).to(device)
    flow = Transformer(cfg.model_config()).to(device)
    n_latent = 1 + (cfg.frames - 1) // cfg.ft
    side, channels, n = tok.latent_side, cfg.z_channels, args.num
    fstats = LatentStats(torch.zeros(channels), torch.ones(channels), cfg.fm_patch)   # unit stats: the token grid only
    fc, fside = fstats.shape(channels, side)
    prompts = random_prompts(n, cfg.num_digits, device=device)
    gen = torch.Generator(device)
    amp = lambda: autocast(device, args.precision)           # noqa: E731 (a fresh context per use)
    with amp():                                               # the peak in the precision the rows run in
        peak = matmul_peak(device)
    print(f"device {device}, threads {torch.get_num_threads()}, precision {args.precision}, matmul peak {peak:.0f} "
          f"GFLOP/s; config: {cfg.frames} frames of {cfg.size}x{cfg.size}, "
          f"latent {n_latent}x{side}x{side}x{channels}, scales {tok.scales}, model dim {cfg.dim} depth {cfg.depth}")
    print("fwd/frame: transformer forward passes per video frame (ar: K scales per latent frame; teacher: one per "
          "step for the whole clip; student and dmd: steps per unit, each unit's clean re-forward folded into the next "
          "unit's first step)")
    print(f"{'what':40s} {'s/call':>8s} {'frames/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'fwd/frame':>9s} {'peak MB':>8s}")

    def row(name, fn, frames, fwd_per_frame=""):
        sec, gflop = timed(fn, device, reps=2)
        print(f"{name:40s} {sec:8.3f} {frames / sec:9.1f} {gflop / sec:8.1f} {gflop / sec / peak:8.1%} "
              f"{fwd_per_frame!s:>9s} {peak_mem_mb(device):8.0f}", flush=True)

    with torch.no_grad(), amp():
        clips = data.to_model(data.moving_mnist(n, data.load_digits(cfg.data_dir or None, verbose=False), "test",
                                                data.mm_config(cfg), seed=0)[0], device)
        row("tokenizer encode + decode (continuous)", lambda: tok.decode(tok.encode(clips)), n * cfg.frames)
        row("tokenizer encode + quantize + decode", lambda: tok.decode(tok.quantize(tok.encode(clips))[2]),
            n * cfg.frames)
        latent = tok.encode(clips)
        row("tokenizer decode (in every sample row below)", lambda: tok.decode(latent), n * cfg.frames)
        row("sample ar (CFG 3)", lambda: tok.decode(generate_ar(ar, tok, prompts, n_latent, gen, progress=False)),
            n * cfg.frames, f"{len(tok.scales) * n_latent / cfg.frames:.2f}")
        for steps in (25, 50):
            row(f"sample teacher {steps} steps (CFG 3)",
                lambda: tok.decode(fstats.denormalize(generate_teacher(flow, prompts, n_latent, fside, fc, gen,
                                                                       steps, progress=False))),
                n * cfg.frames, f"{steps / cfg.frames:.2f}")
        units = len(stream_layout(cfg.unit, n_latent, n_latent, fside, **cfg.unit_kwargs()))
        row(f"sample student {cfg.unit} 4 steps (CFG 3)",
            lambda: tok.decode(fstats.denormalize(generate_student(flow, prompts, n_latent, n_latent, fside, fc, gen,
                                                                   cfg.unit, cfg.unit_kwargs(), 4, progress=False))),
            n * cfg.frames, f"{units * 4 / cfg.frames:.2f}")
        for steps in (1, 4):   # the DMD generator: the student's architecture and sampler, few steps, no CFG
            row(f"sample dmd {cfg.unit} {steps} steps (no CFG)",
                lambda: tok.decode(fstats.denormalize(generate_student(flow, prompts, n_latent, n_latent, fside, fc,
                                                                       gen, cfg.unit, cfg.unit_kwargs(), steps,
                                                                       cfg_scale=1.0, progress=False))),
                n * cfg.frames, f"{units * steps / cfg.frames:.2f}")
    b = cfg.ar_batch
    for name, (fn, frames) in train_steps(cfg, tok.train(), ar, flow, device, b, amp, fstats).items():
        row(f"{name} (batch {b}, fwd+bwd)", fn, frames)
    if args.long:
        with amp():
            long_video(args, cfg, flow, prompts[:1], device, fc, fside)


def long_video(args, cfg, flow, prompt, device, channels, side):
    """Streaming student over a long video: seconds and cache size at unit ~10 and at the last units."""
    chunk = 1 + (cfg.frames - 1) // cfg.ft
    latent = 1 + (args.long - 1) // cfg.ft
    stamps = []

    def on_unit(i, cache):
        sync(device)
        stamps.append((time.perf_counter(), cache.nbytes() / 2 ** 20))

    t0 = time.perf_counter()
    with torch.no_grad():
        generate_student(flow, prompt, latent, chunk, side, channels, torch.Generator(device), cfg.unit,
                         cfg.unit_kwargs(), 4, 3.0, None, progress=True, on_unit=on_unit)
    c = stream_clock(stamps)
    print(f"long video: {args.long} frames = {c['units']} {cfg.unit} units in {time.perf_counter() - t0:.1f} s; "
          f"per unit: {c['ms early']:.1f} ms at units {c['early units']} vs {c['ms last']:.1f} ms at units "
          f"{c['last units']} ({c['change']:+.1%}); KV cache {c['KV MB early']:.2f} MB vs {c['KV MB last']:.2f} MB; "
          f"peak RSS {peak_mem_mb(device):.0f} MB")


def stream_clock(stamps):
    """Is a stream's cost per unit flat? stamps: (seconds, KV-cache MB) after each unit -> ms per unit and cache size
    over the second tenth of the units (past the warm-up and the filling of the cache window, so a steady state)
    against the last tenth, and the relative change."""
    ms = np.diff([s[0] for s in stamps]) * 1e3         # ms[k]: unit k + 2 (1-based)
    w = max(1, len(ms) // 10)
    early, last = float(ms[w:2 * w].mean()), float(ms[-w:].mean())
    return {"units": len(stamps), "early units": f"{w + 2}-{2 * w + 1}", "last units": f"{len(ms) - w + 2}-{len(ms) + 1}",
            "ms early": early, "ms last": last, "change": last / early - 1,
            "KV MB early": stamps[w + 1][1], "KV MB last": stamps[-1][1]}

if __name__ == "__main__":
    sys.exit(main())
