"""Generation and reconstruction from a trained run directory.

  python sample.py --ckpt runs/toy --method ar --prompt "3 7" --num 8 --gif out.gif     # paper A
  python sample.py --ckpt runs/toy --method ar --context clips.npy --context-frames 5 --npy out.npy
  python sample.py --ckpt runs/toy --reconstruct IN.npy --npy OUT.npy   # tokenizer round trip, same shape/dtype
"""
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import data
from model import KVCache, grid_positions
from train import load_ar, load_tokenizer, reconstruct


def sample_logits(logits, generator, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B,L,V] -> codes [B,L], with temperature, top-k and nucleus (top-p) truncation."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p          # keep the smallest set with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])


@torch.no_grad()
def generate_ar(model, tok, prompts, frames, generator, cfg_scale=3.0, cfg_schedule="constant", temperature=1.0,
                top_k=0, top_p=1.0, context=None, window=0, progress=True):
    """Paper A generation: per latent frame, K next-scale steps (one forward each, KV cache), frames in order.

    prompts [B,n] digits (None: unconditional); frames: latent frames to produce; context: codes (list over scales
    of [B,t_ctx,s,s]) of given frames, teacher-forced through the same loop; window > 0 keeps only the last
    `window` frames in the cache (rolling, for videos longer than trained). Returns f_hat [B,c,frames,h,w].
    """
    device = next(model.parameters()).device
    scales, side, K = tok.scales, tok.latent_side, len(tok.scales)
    b = len(prompts) if prompts is not None else len(context[0])
    guided = prompts is not None and cfg_scale != 1.0
    if prompts is None:                       # unconditional: every row takes the null condition
        prompt_in = torch.zeros(b, 1, dtype=torch.long, device=device)
        drop = torch.ones(b, dtype=torch.bool, device=device)
    else:                                     # with CFG, rows b.. repeat the batch under the null condition
        prompt_in = torch.cat([prompts, prompts]) if guided else prompts
        drop = torch.arange(len(prompt_in), device=device) >= b
    cache, out = KVCache(model.cfg.depth), []
    for f in tqdm(range(frames), desc="frames", disable=not progress):
        f_hat = torch.zeros(b, tok.cfg.z_channels, side, side, device=device)
        x = f_hat.new_zeros(b, 1, tok.cfg.z_channels)
        for k, s in enumerate(scales):
            pos = grid_positions([f], s, side).to(device)
            unit = torch.full((s * s,), f * K + k, device=device)
            start = torch.full((s * s,), k == 0, device=device)
            logits = model(torch.cat([x, x]) if guided else x, pos, unit, prompt_in, drop=drop, cache=cache,
                           append=True, start=start)
            if guided:   # CFG (Ho & Salimans 2022) on the logits; the schedule ramps the weight over scales
                w = cfg_scale if cfg_schedule == "constant" else 1 + (cfg_scale - 1) * (k + 1) / K
                logits = logits[b:] + w * (logits[:b] - logits[b:])
            if context is not None and f < context[0].shape[1]:
                idx = context[k][:, f].flatten(1)
            else:
                idx = sample_logits(logits, generator, temperature, top_k, top_p)
            f_hat, nxt = tok.vq.next_scale_input(f_hat, idx.view(b, s, s), k)
            if nxt is not None:
                x = rearrange(nxt, "b c h w -> b (h w) c")
        out.append(f_hat)
        if window:
            cache.evict(window * K)
    return torch.stack(out, 2)


def build_parser():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by train.py")
    p.add_argument("--method", choices=["ar"], help="ar: paper A, next-scale in a frame, next-frame across frames")
    p.add_argument("--prompt", help='digits the clips should show, e.g. "3 7" (default: random digits per clip)')
    p.add_argument("--num", type=int, default=8, help="number of clips")
    p.add_argument("--frames", type=int, default=0, help="video frames, 1 + ft*k (default: the trained length)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance weight (1 = off)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant",
                   help="CFG weight over scales: constant, or rising linearly to --cfg at the last scale")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--window", type=int, default=-1, help="latent frames kept in the KV cache when generating "
                   "(-1: the trained length minus one, so relative positions stay as in training; 0: all)")
    p.add_argument("--context", metavar="IN.npy", help="uint8 clips to continue (image-/video-to-video)")
    p.add_argument("--context-frames", type=int, default=1, help="frames of --context to keep, 1 + ft*k")
    p.add_argument("--reconstruct", metavar="IN.npy", help="uint8 clips [N,T,H,W] or [N,T,H,W,C] to reconstruct")
    p.add_argument("--continuous", action="store_true", help="reconstruct through z, skipping the quantizer")
    p.add_argument("--npy", help="write the clips here, uint8")
    p.add_argument("--gif", help="also write a GIF to look at")
    p.add_argument("--mp4", help="also write an MP4 (needs imageio[ffmpeg])")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    return p


def write_outputs(args, video):
    if args.npy:
        Path(args.npy).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.npy, video)
    if args.gif:
        data.save_gif(args.gif, video[:8])
    if args.mp4:
        data.save_mp4(args.mp4, video[:8])
    print(f"[sample] {video.shape} uint8 -> {', '.join(x for x in (args.npy, args.gif, args.mp4) if x)}")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.npy or args.gif or args.mp4):
        p.error("nothing to write: give --npy, --gif and/or --mp4")
    torch.manual_seed(args.seed)
    if args.reconstruct:
        tok, cfg = load_tokenizer(args.ckpt, args.device)
        video = np.load(args.reconstruct)
        try:
            out = reconstruct(tok, video, args.device, quantized=not args.continuous)
        except (TypeError, ValueError) as e:
            p.error(f"{args.reconstruct}: {e}")
        write_outputs(args, out)
        return 0
    if args.method != "ar":
        p.error("say what to do: --method ar, or --reconstruct IN.npy")
    video = run_ar(p, args)
    write_outputs(args, video)
    return 0


def parse_prompts(p, args, n, num_digits, generator):
    if args.prompt:
        try:
            digits = [int(d) for d in args.prompt.split()]
        except ValueError:
            p.error(f"--prompt must be digits separated by spaces, got {args.prompt!r}")
        if not digits or any(d < 0 or d > 9 for d in digits):
            p.error(f"--prompt digits must be 0-9, got {args.prompt!r}")
        return torch.tensor(digits).expand(n, -1)
    return torch.randint(0, 10, (n, num_digits), generator=generator)


def run_ar(p, args):
    """Everything --method ar does: prompts, context, generation, decoding -> uint8 [N,T,H,W]."""
    tok, cfg = load_tokenizer(args.ckpt, args.device)
    model, _ = load_ar(args.ckpt, args.device)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    frames = args.frames or cfg.frames
    if frames < 1 or (frames - 1) % cfg.ft:
        p.error(f"--frames must be 1 + {cfg.ft}*k, got {frames}")
    latent_frames = 1 + (frames - 1) // cfg.ft
    trained = 1 + (cfg.frames - 1) // cfg.ft
    window = trained - 1 if args.window < 0 else args.window
    context, ctx_video, n = None, None, args.num
    if args.context:
        if (args.context_frames - 1) % cfg.ft or args.context_frames > frames:
            p.error(f"--context-frames must be 1 + {cfg.ft}*k and at most --frames, got {args.context_frames}")
        ctx_video = data.check_video(np.load(args.context))[:, :args.context_frames]
        if ctx_video.shape[1] < args.context_frames:
            p.error(f"{args.context}: {ctx_video.shape[1]} frames, fewer than --context-frames {args.context_frames}")
        n = len(ctx_video)
        try:
            z = tok.encode(data.to_model(ctx_video, args.device))
        except (TypeError, ValueError) as e:
            p.error(f"{args.context}: {e}")
        context = tok.quantize(z)[0]
    prompts = parse_prompts(p, args, n, cfg.num_digits, gen).to(args.device) if (args.prompt or not args.context) else None
    f_hat = generate_ar(model, tok, prompts, latent_frames, gen, args.cfg, args.cfg_schedule, args.temperature,
                        args.top_k, args.top_p, context, window)
    video = data.from_model(tok.decode(f_hat), squeeze=False)
    if ctx_video is not None:      # keep the given frames as they were
        video[:, :ctx_video.shape[1]] = ctx_video
    if prompts is not None:
        print("[sample] prompts: " + "; ".join(" ".join(map(str, r.tolist())) for r in prompts[:8]))
    return video[..., 0]


if __name__ == "__main__":
    sys.exit(main())
