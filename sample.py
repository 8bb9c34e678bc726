"""Generation and reconstruction from a trained run directory.

  python sample.py --ckpt runs/toy --reconstruct IN.npy --npy OUT.npy   # tokenizer round trip, same shape/dtype
"""
import sys
from pathlib import Path

import numpy as np
import torch

import data
from train import load_tokenizer, reconstruct


def build_parser():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory written by train.py")
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
    p.error("say what to do: --reconstruct IN.npy")


if __name__ == "__main__":
    sys.exit(main())
