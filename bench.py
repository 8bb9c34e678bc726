"""Speed, side by side in one run: sampling throughput of every generation method, training step time, achieved
GFLOP/s against the matmul peak measured here, and memory. Speed does not depend on the weights, so the models are
freshly initialised, with the sizes, units and steps of the --config preset and its flags.

  python bench.py --config toy                 # one table
  python bench.py --config toy --long 1001     # + streaming student: time and KV-cache size per unit along a long video
"""
import resource
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import data
from checkpoint import build_ar
from config import SEED, autocast, check_config, check_device, check_flags, config_from_args, parser
from model import Layout, Transformer, ar_sequence, frame_scale_layout, hw, partition, unit_layout
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


def timed(fn, device, reps=3, min_seconds=2.0):
    """(seconds per call, GFLOP per call) of fn(), after one warm-up call: the median of at least `reps` calls, more
    until they add up to `min_seconds` (a fast row timed over a fraction of a second would catch whatever spell of
    speed the machine is in; the median ignores a slow call)."""
    fn()
    with FlopCounterMode(display=False) as fc:
        fn()
    times = []
    while len(times) < reps or sum(times) < min_seconds:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), fc.get_total_flops() / 1e9


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
    n_latent = cfg.latent_frames()
    pos, unit, _ = (a.to(device) for a in frame_scale_layout(n_latent, tok.scales, tok.latent_grid))
    ar_layout = Layout(pos, unit, level=unit % len(tok.scales))
    with torch.no_grad():
        z = tok.encode(x)
        codes, inputs, f_hat, _ = tok.quantize(z)
    xs, ys = ar_sequence(inputs, codes, f_hat)
    tok_x = data.to_model(video[:, :cfg.tok_frames], device)
    zf, fside = fstats.normalize(z), fstats.shape(cfg.z_channels, tok.latent_grid)[1]   # the flow models' tokens
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
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each row for at least this long (its median "
                   "call is reported)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    check_config(p, cfg)
    check_flags(p, args, {"num": "[1, 1e4]", "long": "[0, 1e6]", "min_seconds": "[0, 1e4]", "seed": SEED})
    check_device(p, args.device)
    if args.long and (args.long - 1) % cfg.ft:
        p.error(f"--long {args.long}: allowed 0 (off) or 1 + {cfg.ft}*k frames")
    tokens, chunk = cfg.frame_grid(cfg.down * cfg.fm_patch), cfg.latent_frames()
    if args.long and len(stream_layout(cfg.unit, cfg.latent_frames(args.long), chunk, tokens,
                                       **cfg.unit_kwargs())) < 16:
        p.error(f"--long {args.long}: allowed 0 (off) or a video of at least 16 {cfg.unit} units (its timings compare "
                f"a fresh stream's second tenth of the units with the last tenth)")
    device = args.device
    torch.manual_seed(args.seed)
    tok = Tokenizer(cfg.tokenizer_config(), cfg.frame_grid()).to(device).eval()
    ar = build_ar(cfg, cfg.vocab).to(device)
    flow = Transformer(cfg.model_config()).to(device)
    n_latent = cfg.latent_frames()
    side, channels, n = tok.latent_grid, cfg.z_channels, args.num
    fstats = LatentStats(torch.zeros(channels), torch.ones(channels), cfg.fm_patch)   # unit stats: the token grid only
    fc, fside = fstats.shape(channels, side)
    prompts = random_prompts(n, cfg.num_digits, device=device)
    gen = torch.Generator(device)
    amp = lambda: autocast(device, args.precision)           # noqa: E731 (a fresh context per use)
    with amp():                                               # the peak in the precision the rows run in
        peak = matmul_peak(device)
    print(f"device {device}, threads {torch.get_num_threads()}, precision {args.precision}, matmul peak {peak:.0f} "
          "GFLOP/s; config: {} frames of {}x{}, latent {}x{}x{}x{}, ".format(cfg.frames, *hw(cfg.frame_grid()),
                                                                            n_latent, *hw(side), channels)
          + f"scales {tok.scales}, model dim {cfg.dim} depth {cfg.depth}")
    print("fwd/frame: transformer forward passes per video frame (ar: K scales per latent frame; teacher: one per "
          "step for the whole clip; student and dmd: steps per unit, each unit's clean re-forward folded into the next "
          "unit's first step)")
    print(f"{'what':40s} {'s/call':>8s} {'frames/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'fwd/frame':>9s} {'peak MB':>8s}")

    def row(name, fn, frames, fwd_per_frame=""):
        sec, gflop = timed(fn, device, reps=2, min_seconds=args.min_seconds)
        print(f"{name:40s} {sec:8.3f} {frames / sec:9.1f} {gflop / sec:8.1f} {gflop / sec / peak:8.1%} "
              f"{fwd_per_frame!s:>9s} {peak_mem_mb(device):8.0f}", flush=True)
        return frames / sec

    fps = {}   # frames/s of the sampler rows the closing line compares
    with torch.no_grad(), amp():
        clips = data.to_model(data.moving_mnist(n, data.load_digits(cfg.data_dir or None, verbose=False), "test",
                                                data.mm_config(cfg), seed=0)[0], device)
        row("tokenizer encode + decode (continuous)", lambda: tok.decode(tok.encode(clips)), n * cfg.frames)
        row("tokenizer encode + quantize + decode", lambda: tok.decode(tok.quantize(tok.encode(clips))[2]),
            n * cfg.frames)
        latent = tok.encode(clips)
        row("tokenizer decode (in every sample row below)", lambda: tok.decode(latent), n * cfg.frames)
        row(f"sample ar (CFG 3, temperature {cfg.ar_temperature:g})",
            lambda: tok.decode(generate_ar(ar, tok, prompts, n_latent, gen, temperature=cfg.ar_temperature,
                                           progress=False)),
            n * cfg.frames, f"{len(tok.scales) * n_latent / cfg.frames:.2f}")
        for steps in (25, 50):
            fps[f"teacher{steps}"] = row(
                f"sample teacher {steps} steps (CFG {cfg.teacher_cfg:g})",
                lambda: tok.decode(fstats.denormalize(generate_teacher(flow, prompts, n_latent, fside, fc, gen,
                                                                       steps, cfg.teacher_cfg, progress=False))),
                n * cfg.frames, f"{steps / cfg.frames:.2f}")
        units = len(stream_layout(cfg.unit, n_latent, n_latent, fside, **cfg.unit_kwargs()))
        row(f"sample student {cfg.unit} 4 steps (CFG 3)",
            lambda: tok.decode(fstats.denormalize(generate_student(flow, prompts, n_latent, n_latent, fside, fc, gen,
                                                                   cfg.unit, cfg.unit_kwargs(), 4, progress=False))),
            n * cfg.frames, f"{units * 4 / cfg.frames:.2f}")
        for steps in (1, 4):   # the DMD generator: the student's architecture and sampler, few steps, no CFG
            fps[f"dmd{steps}"] = row(f"sample dmd {cfg.unit} {steps} steps (no CFG)",
                lambda: tok.decode(fstats.denormalize(generate_student(flow, prompts, n_latent, n_latent, fside, fc,
                                                                       gen, cfg.unit, cfg.unit_kwargs(), steps,
                                                                       cfg_scale=1.0, progress=False))),
                n * cfg.frames, f"{units * steps / cfg.frames:.2f}")
    print(f"dmd 1 / 4 steps per unit against the teacher at 50 steps (paper B Table 1: 16.4 / 0.78 FPS = 21x): "
          f"{fps['dmd1'] / fps['teacher50']:.1f}x / {fps['dmd4'] / fps['teacher50']:.1f}x frames/s")
    b = cfg.ar_batch
    for name, (fn, frames) in train_steps(cfg, tok.train(), ar, flow, device, b, amp, fstats).items():
        row(f"{name} (batch {b}, fwd+bwd)", fn, frames)
    if args.long:
        with amp():
            long_video(args, cfg, flow, prompts[:1], device, fc, fside)


def clocked_stream(model, cfg, prompts, frames, grid, channels, steps, cfg_scale, seed, device, precision):
    """A streaming generator (causal student or DMD generator; cfg: its run's Config) makes `frames` video frames
    with the rolling cache, timed by paired_clock -> (scaled z [B,c,t,h,w], paired_clock's figures)."""
    chunk, latent = cfg.latent_frames(), cfg.latent_frames(frames)

    def stream(on_unit, progress):
        gen = torch.Generator(device).manual_seed(seed)
        with torch.no_grad(), autocast(device, precision):
            return generate_student(model, prompts, latent, chunk, grid, channels, gen, cfg.unit, cfg.unit_kwargs(),
                                    steps, cfg_scale, on_unit=on_unit, shift=cfg.fm_shift, progress=progress)

    return paired_clock(stream, len(stream_layout(cfg.unit, latent, chunk, grid, **cfg.unit_kwargs())), device)


def long_video(args, cfg, flow, prompt, device, channels, side):
    """Streaming student over a long video: ms per unit and cache size early and at the end (paired_clock)."""
    t0 = time.perf_counter()
    c = clocked_stream(flow, cfg, prompt, args.long, side, channels, 4, 3.0, 0, device, args.precision)[1]
    print(f"long video: {args.long} frames = {c['units']} {cfg.unit} units in {time.perf_counter() - t0:.1f} s; "
          f"per unit: {c['ms early']:.1f} ms at units {c['early units']} of a fresh stream vs {c['ms last']:.1f} ms at "
          f"units {c['last units']}, taking turns ({c['change']:+.1%}); KV cache {c['KV MB early']:.2f} MB vs "
          f"{c['KV MB last']:.2f} MB; peak RSS {peak_mem_mb(device):.0f} MB")


class _Timed(Exception):
    """Ends paired_clock's fresh stream once its units are timed."""


def paired_clock(stream, units, device="cpu"):
    """Is a stream's cost per unit flat along the video, with the machine's own drift cancelled (this project's VMs
    run ±15% faster or slower from one few-second spell to the next)? stream(on_unit, progress) runs one stream of
    `units` units, calling on_unit(i, cache) after unit i, and returns what it generated (progress: show a bar; the
    old one does). Two streams run in two threads that take turns: the old one alone up to its last 2w units
    (w = units // 10), then the old one and a fresh one alternately, one unit each. The fresh stream's units w+1..2w (a steady state: past the warm-up and the filling of
    the cache window) and the old stream's last w units are timed side by side, so a slow spell slows both.
    -> (the old stream's output, {'units', 'early units', 'last units', 'ms early' and 'ms last' (medians),
    'change' (last / early - 1), 'KV MB early', 'KV MB last'})."""
    if units < 4:
        raise ValueError(f"paired_clock: {units} units; allowed 4 or more")
    w = max(1, units // 10)
    turn = {"old": threading.Semaphore(0), "new": threading.Semaphore(0)}
    ms, kv, out, done, t0 = {"old": [], "new": []}, {}, {}, {}, {}

    def hand_over(me, other):   # the other thread takes its turn; this one waits for its next (unless that one ended)
        turn[other].release()
        if not done.get(other):
            turn[me].acquire()
        t0[me] = time.perf_counter()

    def on_unit(me, other, last):
        def call(i, cache):
            if me == "old" and i < units - 2 * w - 1:      # its run-up, alone
                return
            sync(device)
            if i > (units - 2 * w - 1 if me == "old" else -1):
                ms[me].append((time.perf_counter() - t0[me]) * 1e3)
            kv[me] = cache.nbytes() / 2 ** 20
            if i == last:
                if me == "new":
                    turn[other].release()
                    raise _Timed
                return
            hand_over(me, other)
        return call

    def run(me, other, last):
        try:
            if me == "new":
                turn["new"].acquire()
                t0["new"] = time.perf_counter()
            out[me] = stream(on_unit(me, other, last), me == "old")
        except _Timed:
            pass
        except BaseException as e:   # re-raised below, in the caller's thread
            out["error"] = e
        finally:
            done[me] = True
            turn[other].release()    # never leave the other thread waiting

    threads = [threading.Thread(target=run, args=("old", "new", units - 1)),
               threading.Thread(target=run, args=("new", "old", 2 * w - 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if "error" in out:
        raise out["error"]
    early, last = float(np.median(ms["new"][w:])), float(np.median(ms["old"][w:]))
    return out["old"], {"units": units, "early units": f"{w + 1}-{2 * w}", "last units": f"{units - w + 1}-{units}",
                        "ms early": early, "ms last": last, "change": last / early - 1,
                        "KV MB early": kv["new"], "KV MB last": kv["old"]}

if __name__ == "__main__":
    sys.exit(main())
