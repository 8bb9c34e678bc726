"""Generation and reconstruction from a trained run directory (the samplers, and the sample GIFs and learning-curve
samples that train.py writes after and during each generator stage).

  python sample.py --ckpt runs/toy --method ar --prompt 3 --num 8 --gif out.gif         # paper A
  python sample.py --ckpt runs/toy --method ar --context clips.npy --context-frames 5 --npy out.npy
  python sample.py --ckpt runs/toy --method dmd --steps 2 --prompt 3 --gif out.gif      # paper B, after --stage dmd
  python sample.py --ckpt runs/toy --reconstruct IN.npy --npy OUT.npy   # tokenizer round trip, same shape/dtype
"""
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import data
from checkpoint import load_ar, load_flow, load_tokenizer
from config import (SEED, Parser, add_precision_flag, autocast, check_device, check_flags, check_path,
                    one_line_errors)
from model import (KVCache, Layout, cells, frame_context, grid_positions, hw, merge, partition, shift_time,
                   unit_layout)


def random_prompts(n, num_digits, generator=None, device="cpu"):
    """n prompts of `num_digits` random digits -> long [n, num_digits], on the generator's device when one is given."""
    device = generator.device if generator is not None else device
    return torch.randint(0, 10, (n, num_digits), generator=generator, device=device)


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
def generate_ar(model, tok, prompts, n_latent, generator, cfg_scale=3.0, cfg_schedule="constant", temperature=1.0,
                top_k=0, top_p=1.0, context=None, window=0, progress=True, context_scales=None):
    """Paper A generation: per latent frame, K next-scale steps (one forward each, KV cache), frames in order.

    prompts [B,n] digits (None: unconditional); n_latent: latent frames to produce; context: codes (list over scales
    of [B,n_ctx,s,s]) of given latent frames, teacher-forced through the same loop (only their first
    `context_scales` scales when given: the rest are sampled -- experiments.py scales); window > 0 keeps only the
    last `window` latent frames in the cache (rolling, for videos longer than trained). Returns f_hat
    [B,c,n_latent,h,w].
    """
    device = next(model.parameters()).device
    scales, grid, K = tok.scales, tok.latent_grid, len(tok.scales)      # grids: model.hw's int or (h, w)
    b = len(prompts) if prompts is not None else len(context[0])
    guided = prompts is not None and cfg_scale != 1.0
    prompt_in, drop = cfg_batch(prompts, b, cfg_scale, device)   # with CFG: rows b.. the batch, null condition
    cache, out = KVCache(model.cfg.depth), []
    f_hat = torch.zeros(b, tok.cfg.z_channels, *hw(grid), device=device)       # "frame -1": nothing yet
    for f in tqdm(range(n_latent), desc="frames", disable=not progress):
        ctx = frame_context(f_hat, scales).split([cells(s) for s in scales], 1)  # what frame f knows of f-1
        f_hat = torch.zeros_like(f_hat)
        x = f_hat.new_zeros(b, cells(scales[0]), tok.cfg.z_channels)          # scale 1: the start token (level 0)
        for k, s in enumerate(scales):
            layout = Layout(pos=grid_positions([f], s, grid).to(device),          # unit (frame f, scale k)
                            unit=torch.full((cells(s),), f * K + k, device=device),
                            level=torch.full((cells(s),), k, device=device))
            xk = torch.cat([x, ctx[k]], -1)                                       # as in model.ar_sequence
            logits = model(torch.cat([xk, xk]) if guided else xk, layout, prompt_in, drop=drop, cache=cache,
                           append=True)
            if guided:   # CFG (Ho & Salimans 2022) on the logits; the schedule ramps the weight over scales
                w = cfg_scale if cfg_schedule == "constant" else 1 + (cfg_scale - 1) * (k + 1) / K
                logits = logits[b:] + w * (logits[:b] - logits[b:])
            if context is not None and f < context[0].shape[1] and (context_scales is None or k < context_scales):
                idx = context[k][:, f].flatten(1)
            else:
                idx = sample_logits(logits, generator, temperature, top_k, top_p)
            f_hat, nxt = tok.vq.next_scale_input(f_hat, idx.view(b, *hw(s)), k)
            if nxt is not None:
                x = rearrange(nxt, "b c h w -> b (h w) c")
        out.append(f_hat)
        if window:
            cache.evict(window * K)
    return torch.stack(out, 2)


def guided_velocity(model, x, layout, prompt_in, drop, flow_t, b, cfg_scale, **kw):
    """One model call on the CFG-doubled batch -> guided velocity [b,L,c]: v_uncond + w (v_cond - v_uncond).
    flow_t: the flow time of every token, a number, one per clip [b] (DMD's noise levels) or one per token [b,L]."""
    doubled = len(prompt_in) > b
    t = torch.as_tensor(flow_t, dtype=torch.float32, device=x.device)
    t_BL = t if t.dim() == 2 else t.expand(b)[:, None].expand(b, x.shape[1])
    v = model(torch.cat([x, x]) if doubled else x, layout, prompt_in, drop=drop,
              flow_t=torch.cat([t_BL, t_BL]) if doubled else t_BL, **kw)
    return v[b:] + cfg_scale * (v[:b] - v[b:]) if doubled else v


def cfg_batch(prompts, b, cfg_scale, device):
    """Prompts and null-condition flags for a batch of b clips, doubled for classifier-free guidance."""
    if prompts is None:
        return torch.zeros(b, 1, dtype=torch.long, device=device), torch.ones(b, dtype=torch.bool, device=device)
    prompt_in = torch.cat([prompts, prompts]) if cfg_scale != 1.0 else prompts
    return prompt_in, torch.arange(len(prompt_in), device=device) >= b


@torch.no_grad()
def generate_teacher(model, prompts, n_latent, grid, channels, generator, steps=25, cfg_scale=3.0, progress=True,
                     shift=1.0):
    """Paper B's base model: `steps` Euler steps of the flow ODE from noise (flow time 1) to data (0) over the whole
    clip of `n_latent` latent frames at once (full attention), on the time grid shifted as in training
    (model.shift_time); grid: the token grid (model.hw's int or (h, w)). Returns z [B,c,n_latent,h,w] (scaled)."""
    device = next(model.parameters()).device
    b = len(prompts)
    order, pos, unit = unit_layout("frame", n_latent, grid)
    layout = Layout(pos.to(device), unit.to(device), mask="full")
    prompt_in, drop = cfg_batch(prompts, b, cfg_scale, device)
    x = torch.randn(b, len(unit), channels, generator=generator, device=device)       # [B,L,c]
    times = shift_time(torch.linspace(1, 0, steps + 1), shift).tolist()
    for flow_t, flow_t_next in tqdm(list(zip(times, times[1:])), desc="steps", disable=not progress):
        x = x + (flow_t_next - flow_t) * guided_velocity(model, x, layout, prompt_in, drop, flow_t, b, cfg_scale)
    return merge(x, order, n_latent, grid)


def stream_layout(kind, n_latent, chunk, grid, **kw):
    """Units of a video of `n_latent` latent frames, as consecutive chunks of the trained length `chunk`, each laid
    out as in training (model.unit_layout), times continuing. -> list of (pos [l,3], order [l] or None, c0, n, u):
    order indexes the raster (t,h,w) of the whole video (None for scale units, whose level is u in a chunk of n
    latent frames starting at latent frame c0)."""
    units = []
    for c0 in range(0, n_latent, chunk):
        n = min(chunk, n_latent - c0)
        order, pos, unit = unit_layout(kind, n, grid, **kw)
        pos = pos + torch.tensor([float(c0), 0, 0])
        for u in range(int(unit.max()) + 1):
            sel = unit == u
            units.append((pos[sel], None if order is None else order[sel] + c0 * cells(grid), c0, n, u))
    return units


def unit_steps(stage, cfg):
    """Default Euler steps per unit: 4 for the causal student, the count a DMD generator was trained with."""
    return cfg.dmd_unit_steps if stage == "dmd" else 4


def default_cfg(method, cfg):
    """Default CFG weight of a method ('ar', 'teacher', 'student' or 'causal', 'dmd') for a run's config: the teacher's
    --teacher-cfg, 1 (off) for the DMD generator, which learnt the guided real score, and 3 for the others."""
    return {"teacher": cfg.teacher_cfg, "dmd": 1.0}.get(method, 3.0)


def generate_student(model, prompts, n_latent, chunk, grid, channels, generator, kind="cube", unit_kw=None, steps=4,
                     cfg_scale=3.0, context=None, context_len=-1, progress=True, on_unit=None, shift=1.0, exits=None,
                     fold=True):
    """Paper B streaming generation (Sec. 3.4): unit by unit, `steps` Euler steps each, attending to the KV cache
    of the clean earlier units without writing to it; then one clean re-forward (flow time 0) writes the finished
    unit. The rolling cache keeps time and memory per unit constant however long the video: context_len -1 keeps the
    latent frames a unit at the end of a training clip sees (a unit ending at frame f sees frames > f - chunk, so
    attention never meets a time offset that training did not); context_len > 0 keeps that many newest units (with
    cubes, older frames than training saw); 0 keeps everything. context: scaled z [B,c,n_ctx,h,w] of given latent
    frames; units lying wholly inside them are teacher-forced; in a unit straddling them, the given tokens are held
    at their values noised to each step's flow time (replacement inpainting) and end exactly at them, while the rest
    is generated. Returns z [B,c,n_latent,h,w]; on_unit(i, cache) is called after each unit.

    fold (inference): a finished unit's clean re-forward rides in the next unit's first denoising call instead of a
    call of its own -- its tokens first (flow time 0, the only ones written to the cache), the next unit's noisy
    tokens after them. The mask gives each token exactly what it saw unfolded: the clean tokens the cache their unit
    was drawn with, the noisy ones the window of their own unit (cached tokens that window drops are hidden from
    them, then evicted). Same output, one call per unit fewer (at one step per unit: half the calls), and the last
    unit is never written (nothing reads it). With fold, the cache that on_unit(i, ...) sees lacks unit i.

    The causal student, the DMD generator at inference and the DMD generator in training (dmd.rollout) all run
    here. exits (training): per generated unit, the Euler step j at which it stops and jumps straight to flow time 0,
    x0 = x_t_j - t_j v (the last step's Euler update is exactly this jump); that one forward carries the gradient
    (unless called under torch.no_grad), every other forward runs without. exits None (inference): all `steps`
    steps, no gradient anywhere. Training does not fold (fold=False): a folded call that carries the gradient would
    write keys with a graph into the cache."""
    if fold and exits is not None:
        raise ValueError("fold is for inference: with exits (training), pass fold=False")
    device = next(model.parameters()).device
    unit_kw = unit_kw or {}
    scales = unit_kw.get("scales", ())
    b = len(prompts) if prompts is not None else len(context)
    prompt_in, drop = cfg_batch(prompts, b, cfg_scale, device)
    doubled = len(prompt_in) > b
    cache = KVCache(model.cfg.depth)
    z = torch.zeros(b, channels, n_latent, *hw(grid), device=device)
    n_ctx = 0 if context is None else context.shape[2]        # given latent frames
    times = shift_time(torch.linspace(1, 0, steps + 1), shift).tolist()
    n_generated = 0                            # units generated so far (not teacher-forced): indexes exits
    grad = exits is not None and torch.is_grad_enabled()   # called under no_grad: the same clip, no graph
    units = stream_layout(kind, n_latent, chunk, grid, **unit_kw)
    pending = None                             # fold: (x, pos, unit) of the finished unit not yet in the cache

    def write(x, pos, unit):   # the clean re-forward (flow time 0) that writes a finished unit into the cache
        with torch.no_grad():  # the cache holds the unit detached: no gradient reaches earlier units
            model(torch.cat([x, x]) if doubled else x, Layout(pos, unit, mask="forward"), prompt_in, drop=drop,
                  flow_t=torch.zeros(len(prompt_in), len(pos), device=device), cache=cache, append=True)

    def window(i, unwritten=None):   # bool [len(cache) (+ l)]: what unit i may see of the cached tokens (and of
        if context_len > 0:          # the `unwritten` positions [l,3] of a unit still to be written: fold)
            keep = cache.newest_units(context_len - (unwritten is not None))
            return keep if unwritten is None else torch.cat([keep, keep.new_ones(len(unwritten))])
        seen = cache.pos.to(device) if unwritten is None else torch.cat([cache.pos.to(device), unwritten])
        if context_len < 0:          # its training-clip window
            return seen[:, 0] >= units[i][0][:, 0].max().item() - chunk + 1
        return torch.ones(len(seen), dtype=torch.bool, device=device)

    for i, (pos, order, c0, n, u) in enumerate(tqdm(units, desc="units", disable=not progress)):
        pos = pos.to(device)
        unit = torch.full((len(pos),), i, device=device)
        given = pos[:, 0] < n_ctx              # [l] tokens of given frames
        if given.any():                        # their clean values; frame-major, so the given tokens lead
            x0_given = (partition(context, order[given.cpu()]) if order is not None else
                        partition(context[:, :, c0:n_ctx], None, scales[u:u + 1]))
        if given.all():                        # a unit of the given frames: teacher-forced
            if pending is not None:            # no denoising call to carry the pending unit
                write(*pending)
                cache.keep(window(i))
                pending = None
            x = x0_given
        else:
            x = torch.randn(b, len(pos), channels, generator=generator, device=device)      # [B,l,c]
            denoise = Layout(pos, unit, mask="forward", noisy=torch.ones(len(pos), dtype=torch.bool, device=device))
            stop = steps - 1 if exits is None else int(exits[n_generated])
            n_generated += 1
            eps_given = x[:, given]
            for j in range(stop + 1):
                flow_t = times[j]
                flow_t_next = times[j + 1] if j < stop else 0.0       # exiting at step j: straight to flow time 0
                if given.any():   # a unit straddling the given frames: their tokens follow the given values,
                    x = x.clone()  # noised to the current flow time (replacement inpainting); the rest is generated
                    x[:, given] = (1 - flow_t) * x0_given + flow_t * eps_given
                if pending is not None:        # fold: the finished unit's clean tokens lead this call
                    with torch.no_grad():
                        v = folded_velocity(model, pending, x, pos, unit, ~window(i, pending[1]), prompt_in, drop,
                                            flow_t, b, cfg_scale, cache)
                    cache.keep(window(i))      # now that the pending unit is written: unit i's window
                    pending = None
                else:
                    with torch.set_grad_enabled(grad and j == stop):
                        v = guided_velocity(model, x, denoise, prompt_in, drop, flow_t, b, cfg_scale, cache=cache)
                x = x + (flow_t_next - flow_t) * v
            if given.any():
                x = x.clone()
                x[:, given] = x0_given
        if fold:
            pending = (x, pos, unit) if i + 1 < len(units) else None    # the last unit is never written
        else:
            write(x, pos, unit)
            if i + 1 < len(units):             # what the next unit sees
                cache.keep(window(i + 1))
        if order is not None:
            z.view(b, channels, -1)[:, :, order.to(device)] = x.transpose(1, 2)    # [B,c,(t h w)] <- [B,c,l]
        elif u == len(scales) - 1:             # the finest scale unit of a chunk is the latent itself
            z[:, :, c0:c0 + n] = merge(x, None, n, grid)
        if on_unit:
            on_unit(i, cache)
    return z


def folded_velocity(model, pending, x, pos, unit, hidden, prompt_in, drop, flow_t, b, cfg_scale, cache):
    """generate_student's fold: one call on [the finished unit's clean tokens ; unit i's noisy tokens] that writes
    the former into the cache and returns the guided velocity of the latter [b,l,c]. hidden [len(cache) + n_done]:
    the cached and finished tokens that unit i's window drops (the clean tokens still see the cached ones, as in
    their own re-forward)."""
    x_done, pos_done, unit_done = pending
    n_done, l = len(pos_done), len(pos)
    hide = torch.zeros(n_done + l, len(cache) + n_done + l, dtype=torch.bool, device=x.device)   # [Lq, Lk]
    hide[n_done:, :len(cache) + n_done] = hidden.to(x.device)
    noisy = torch.cat([torch.zeros(n_done, dtype=torch.bool), torch.ones(l, dtype=torch.bool)]).to(x.device)
    layout = Layout(torch.cat([pos_done, pos]), torch.cat([unit_done, unit]), mask="forward", noisy=noisy,
                    hide=hide[None])
    flow_t = torch.cat([torch.zeros(b, n_done), torch.full((b, l), float(flow_t))], 1).to(x.device)   # [b, L]
    v = guided_velocity(model, torch.cat([x_done, x], 1), layout, prompt_in, drop, flow_t, b, cfg_scale,
                        cache=cache, append=n_done)
    return v[:, n_done:]


# ------------------------------------------------- a run's stages: their samples (train.py's GIFs and curves)
@torch.no_grad()
def reconstruct(tok, video, device="cpu", quantized=True, batch=16):
    """uint8 [N,T,H,W(,C)] -> its reconstruction, same shape and dtype."""
    v = data.check_video(video)
    out = []
    for i in range(0, len(v), batch):
        z = tok.encode(data.to_model(v[i:i + batch], device))
        out.append(data.from_model(tok.decode(tok.quantize(z)[2] if quantized else z), squeeze=False))
    out = np.concatenate(out)
    return out[..., 0] if video.ndim == 4 else out


@torch.no_grad()
def sample_stage(stage, model, cfg, tok, stats, prompts, generator, frames, args):
    """Prompted samples of a generator stage ('ar', 'teacher', 'causal' or 'dmd') at its default sampler settings ->
    uint8 clips [N,frames,H,W]; stats: the flow models' LatentStats (None for 'ar')."""
    was_training = model.training
    model.eval()
    n_latent = cfg.latent_frames(frames)
    if stage != "ar":   # the flow models' token grid (LatentStats.shape)
        channels, grid = stats.shape(cfg.z_channels, tok.latent_grid)
    with autocast(args.device, args.precision):
        if stage == "ar":
            z = generate_ar(model, tok, prompts, n_latent, generator, temperature=cfg.ar_temperature, progress=False)
        elif stage == "teacher":
            z = stats.denormalize(generate_teacher(model, prompts, n_latent, grid, channels, generator,
                                                   cfg_scale=cfg.teacher_cfg, progress=False, shift=cfg.fm_shift))
        else:   # the causal student (4 guided steps per unit), or the DMD generator (its steps, guidance distilled)
            chunk = cfg.latent_frames()
            steps, cfg_scale = unit_steps(stage, cfg), default_cfg(stage, cfg)
            z = stats.denormalize(generate_student(model, prompts, n_latent, chunk, grid, channels, generator, cfg.unit,
                                                   cfg.unit_kwargs(), steps, cfg_scale, progress=False,
                                                   shift=cfg.fm_shift))
        video = data.from_model(tok.decode(z), squeeze=False)[..., 0]
    model.train(was_training)
    return video


def write_sample_gif(cfg, args, out, stage, tok, n=8):
    """After each generator stage: n prompted clips to look at, out/sample_<stage>.gif (prompts in the .txt)."""
    gen = torch.Generator(args.device).manual_seed(args.seed)
    prompts = random_prompts(n, cfg.num_digits, gen)
    if stage == "ar":
        model, stats = load_ar(out, args.device, tok)[0], None
    else:
        model, _, stats = load_flow(out, stage, args.device, tok)
    data.save_gif(out / f"sample_{stage}.gif", sample_stage(stage, model, cfg, tok, stats, prompts, gen, cfg.frames, args))
    (out / f"sample_{stage}.txt").write_text("\n".join(" ".join(map(str, p.tolist())) for p in prompts) + "\n")
    print(f"[{stage}] samples for prompts {', '.join(' '.join(map(str, p.tolist())) for p in prompts)} -> "
          f"{out / f'sample_{stage}.gif'}")


# ------------------------------------------------------------------------------------------ the command
def build_parser():
    p = Parser(description=__doc__.split("\n")[0], prog="sample.py")
    p.add_argument("--ckpt", required=True, help="run directory written by train.py")
    p.add_argument("--method", choices=["ar", "teacher", "student", "dmd"], help="ar: paper A (next-scale in a "
                   "frame, next-frame across frames); teacher: paper B's full-attention flow model; student: paper B's "
                   "causal model, unit by unit with a KV cache; dmd: the student distilled by Symmetric DMD "
                   "(train.py --stage dmd), streamed the same way in a few steps per unit")
    p.add_argument("--steps", type=int, default=0, help="Euler steps (teacher: whole clip, default 25; "
                   "student: per unit, default 4; dmd: per unit, default the --dmd-unit-steps it was trained with, the count "
                   "it learnt besides 1)")
    p.add_argument("--context-len", type=int, default=-1, help="student and dmd: the rolling KV cache (-1: the "
                   "latent frames a unit of a training clip sees; N > 0: the N newest units; 0: all)")
    p.add_argument("--prompt", help='digits the clips should show, left to right as they start (models trained '
                   'with ordered prompts, the default), e.g. "3 7" (default: random digits per clip)')
    p.add_argument("--num", type=int, default=8, help="number of clips")
    p.add_argument("--frames", type=int, default=0, help="video frames, 1 + ft*k (default: the trained length)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance weight (1 = off; default: the run's --teacher-cfg for the teacher, 1 "
                        "for dmd, whose generator learnt the guided real score, 3 for the others)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant",
                   help="CFG weight over scales: constant, or rising linearly to --cfg at the last scale")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the run's --ar-temperature)")
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
    add_precision_flag(p)
    return p


def write_outputs(args, video, prompts=None):
    """--npy OUT.npy also gets OUT.txt with each clip's prompt (one line per clip: eval.py --prompts reads it)."""
    if args.npy:
        Path(args.npy).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.npy, video)
        if prompts is not None:
            Path(args.npy).with_suffix(".txt").write_text("".join(" ".join(map(str, r.tolist())) + "\n" for r in prompts))
    if args.gif:
        data.save_gif(args.gif, video[:8])
    if args.mp4:
        data.save_mp4(args.mp4, video[:8])
    print(f"[sample] {video.shape} uint8 -> {', '.join(x for x in (args.npy, args.gif, args.mp4) if x)}")


LIMITS = {"steps": "[0, 1e4]", "context_len": "[-1, 1e6]", "num": "[1, 1e4]", "frames": "[0, 1e5]", "cfg": "[0, 100]",
          "temperature": "(0, 100]", "top_k": "[0, 1e7]", "top_p": "(0, 1]", "window": "[-1, 1e6]",
          "context_frames": "[1, 1e5]", "seed": SEED}


# flags that only some methods read (paper A samples each scale in one pass; paper B integrates a flow)
METHOD_FLAGS = {"steps": ("teacher", "student", "dmd"), "context_len": ("student", "dmd"),
                "temperature": ("ar",), "top_k": ("ar",), "top_p": ("ar",), "cfg_schedule": ("ar",), "window": ("ar",)}


def check_args(p, args):
    """Every flag and path before any work (issue 20); what needs the run's config (--frames, --prompt, the clips'
    size and length) is checked once it is read, still before anything is generated or written."""
    check_flags(p, args, LIMITS)
    check_device(p, args.device)
    for flag, suffix in (("npy", ".npy"), ("gif", ".gif"), ("mp4", ".mp4")):
        path = getattr(args, flag)
        check_path(p, "--" + flag, path, "out")
        if path and Path(path).suffix.lower() != suffix:
            p.error(f"--{flag} {path!r}: allowed a file name ending in {suffix}")
    if not (args.npy or args.gif or args.mp4):
        p.error("nothing to write: give --npy, --gif and/or --mp4")
    check_path(p, "--ckpt", args.ckpt, "dir")
    for flag in ("context", "reconstruct"):
        check_path(p, "--" + flag, getattr(args, flag), "file")
    if args.reconstruct is None and args.method is None:
        p.error("say what to do: --method ar|teacher|student|dmd, or --reconstruct IN.npy")
    for flag, methods in METHOD_FLAGS.items():   # a flag the chosen method would ignore is refused, not dropped
        value = getattr(args, flag)
        if args.method and args.method not in methods and value != p.get_default(flag):
            p.error(f"--{flag.replace('_', '-')} {value}: allowed with --method {' or '.join(methods)} only")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    torch.manual_seed(args.seed)
    with one_line_errors(p):        # a checkpoint missing, unreadable or trained on another tokenizer: one line
        return run(p, args)


def run(p, args):
    if args.reconstruct:
        tok, cfg = load_tokenizer(args.ckpt, args.device)
        video = read_clips(p, "--reconstruct", args.reconstruct, cfg)
        try:
            with autocast(args.device, args.precision):
                out = reconstruct(tok, video, args.device, quantized=not args.continuous)
        except (TypeError, ValueError) as e:
            p.error(f"--reconstruct: {e}")
        write_outputs(args, out)
        return 0
    with autocast(args.device, args.precision):
        video, prompts = run_ar(p, args) if args.method == "ar" else run_flow(p, args)
    write_outputs(args, video, prompts)
    return 0


def read_clips(p, flag, path, cfg, whole=True):
    """uint8 clips the run's tokenizer can encode (data.load_clips; grey frames of its size, 1 + ft*k of them unless
    `whole` is False: a context is cut to --context-frames), or p.error."""
    try:
        video = data.load_clips(path)
    except (TypeError, ValueError) as e:
        p.error(f"{flag}: {e}")
    n, frames, h, w, channels = data.check_video(video).shape
    if (h, w, channels) != (*hw(cfg.frame_grid()), 1) or whole and (frames - 1) % cfg.ft:
        p.error(f"{flag} {path}: {frames} frames of {h}x{w}x{channels}; allowed 1 + {cfg.ft}*k grey frames of "
                "{}x{} (this run's tokenizer)".format(*hw(cfg.frame_grid())))
    return video


def parse_prompts(p, args, n, num_digits, generator):
    if args.prompt is not None:
        try:
            digits = [int(d) for d in args.prompt.split()]
        except ValueError:
            p.error(f"--prompt {args.prompt!r}: allowed digits 0-9 separated by spaces")
        if not digits or any(d < 0 or d > 9 for d in digits):
            p.error(f"--prompt {args.prompt!r}: allowed digits 0-9 separated by spaces")
        if len(digits) != num_digits:   # fewer would leave places the model always saw filled: refused too
            p.error(f"--prompt {args.prompt!r}: allowed {num_digits} digits, the count this model was trained on")
        return torch.tensor(digits).expand(n, -1)
    return random_prompts(n, num_digits, generator)


def frames_and_context(p, args, cfg, tok):
    """Check --frames / --context-frames; read and encode --context. -> (video frames, context clip, z or None)."""
    frames = args.frames or cfg.frames
    if frames < 1 or (frames - 1) % cfg.ft:
        p.error(f"--frames {frames}: allowed 1 + {cfg.ft}*k (this model's --ft)")
    if not args.context:
        return frames, None, None
    if (args.context_frames - 1) % cfg.ft or args.context_frames > frames:
        p.error(f"--context-frames {args.context_frames}: allowed 1 + {cfg.ft}*k, at most --frames {frames}")
    clip = data.check_video(read_clips(p, "--context", args.context, cfg, whole=False))[:, :args.context_frames]
    if clip.shape[1] < args.context_frames:
        p.error(f"--context {args.context}: {clip.shape[1]} frames, fewer than --context-frames {args.context_frames}")
    try:
        return frames, clip, tok.encode(data.to_model(clip, args.device))
    except (TypeError, ValueError) as e:
        p.error(f"--context: {e}")


def finish(video, clip, prompts):
    """Keep the given context frames as they were; report the prompts. -> (uint8 [N,T,H,W], prompts)."""
    if clip is not None:
        video[:, :clip.shape[1]] = clip
    if prompts is not None:
        print("[sample] prompts: " + "; ".join(" ".join(map(str, r.tolist())) for r in prompts[:8]))
    return video[..., 0], prompts


def run_flow(p, args):
    """--method teacher | student | dmd -> (uint8 [N,T,H,W], prompts or None). The student and the DMD generator
    stream alike (generate_student); they differ in weights, steps per unit and guidance."""
    tok, _ = load_tokenizer(args.ckpt, args.device)
    stage = {"teacher": "teacher", "student": "causal", "dmd": "dmd"}[args.method]
    model, cfg, stats = load_flow(args.ckpt, stage, args.device, tok)
    cfg_scale = default_cfg(args.method, cfg) if args.cfg is None else args.cfg
    gen = torch.Generator(args.device).manual_seed(args.seed)
    frames, clip, z_ctx = frames_and_context(p, args, cfg, tok)
    n_latent = cfg.latent_frames(frames)
    channels, grid = stats.shape(cfg.z_channels, tok.latent_grid)    # the flow models' token grid
    n = args.num if clip is None else len(clip)
    prompts = parse_prompts(p, args, n, cfg.num_digits, gen).to(args.device) \
        if (args.prompt is not None or clip is None) else None
    if args.method == "teacher":
        if clip is not None:
            p.error("--context needs --method student or dmd (the teacher generates whole clips)")
        z = generate_teacher(model, prompts, n_latent, grid, channels, gen, args.steps or 25, cfg_scale,
                             shift=cfg.fm_shift)
    else:
        chunk = cfg.latent_frames()
        try:
            z = generate_student(model, prompts, n_latent, chunk, grid, channels, gen, cfg.unit, cfg.unit_kwargs(),
                                 args.steps or unit_steps(stage, cfg), cfg_scale,
                                 None if z_ctx is None else stats.normalize(z_ctx),
                                 args.context_len, shift=cfg.fm_shift)
        except ValueError as e:
            p.error(str(e))
    return finish(data.from_model(tok.decode(stats.denormalize(z)), squeeze=False), clip, prompts)


def run_ar(p, args):
    """--method ar -> (uint8 [N,T,H,W], prompts or None)."""
    tok, _ = load_tokenizer(args.ckpt, args.device)
    model, cfg = load_ar(args.ckpt, args.device, tok)       # the model's config: its clip length and digit count
    gen = torch.Generator(args.device).manual_seed(args.seed)
    frames, clip, z_ctx = frames_and_context(p, args, cfg, tok)
    clip_latent = cfg.latent_frames()   # of a training clip
    window = clip_latent - 1 if args.window < 0 else args.window
    context = None if z_ctx is None else tok.quantize(z_ctx)[0]
    n = args.num if clip is None else len(clip)
    prompts = parse_prompts(p, args, n, cfg.num_digits, gen).to(args.device) \
        if (args.prompt is not None or clip is None) else None
    cfg_scale = default_cfg("ar", cfg) if args.cfg is None else args.cfg
    temperature = cfg.ar_temperature if args.temperature is None else args.temperature
    f_hat = generate_ar(model, tok, prompts, cfg.latent_frames(frames), gen, cfg_scale, args.cfg_schedule,
                        temperature, args.top_k, args.top_p, context, window)
    return finish(data.from_model(tok.decode(f_hat), squeeze=False), clip, prompts)


if __name__ == "__main__":
    sys.exit(main())
