"""One transformer for both papers; what differs between them is the order of units and the head.

Reading guide (paper -> code):
  * Prediction units and their order (paper B Sec. 3.2; paper A's (frame, scale) blocks): `frame_scale_layout`,
    `partition` / `merge`. A unit is a set of latent tokens; every token carries its unit's order index.
  * Masks from unit order (paper B Fig. 3, Sec. 3.3): `unit_mask` -- full, forward (sees units <= own) or
    backward (units >= own); bidirectional inside a unit. Paper A's "VAR inside a frame, causal across frames"
    is the forward mask over (frame, scale) units. A forward pass gets its tokens' positions, units and mask as
    one `Layout`.
  * Next-frame context (paper A): `frame_context` -- every token of frame t is also fed frame t-1's full
    quantized sum at its own scale, so the next frame is built on the codes actually drawn.
  * Multi-scale Temporal RoPE (paper A Sec. 3.2): `rope_angles`, `rope` -- every token is rotated by its physical
    (t, h, w) on the finest latent grid; a coarse-scale token sits at the centre of the region it covers. Attention
    scores depend only on position differences, so the same weights serve any unit type, resolution and length.
  * KV cache, rolling (paper B Sec. 3.4): `KVCache` -- keys are cached before rotation with their positions and
    rotated at use relative to the oldest cached frame, so after evicting old units the model sees the same
    relative offsets at frame 10 and at frame 10 000.
  * Scale embedding (paper A; VAR's level embedding): `Transformer.level` tells each token its scale; scale 1's
    embedding is the start token.
  * AdaLN conditioning on the prompt with a learned null condition for CFG (DiT, Peebles & Xie 2023), plus a
    per-token flow-matching time for paper B (units may sit at different noise levels), shifted toward high noise
    by `shift_time` (SD3). Prompts are digits, ordered left to right (`Transformer.condition`).
  * Flow matching (paper B; one convention everywhere): `flow_pair` (x_t and the velocity target), `flow_times`.
  Elsewhere: paper A's Cross-Frame Error Correction and Random Frame Mask are training-time (train.py:
  `error_correction` with `tokenizer.MultiScaleVQ.forward(corrupt=)`, `random_frame_mask`); the DMD gradient is
  dmd.py's (`dmd_gradient`); the samplers, with the fold of a finished unit into the next call, are sample.py's.
Shapes: B batch, L tokens, C model width, H heads, D head dim, c latent channels.
"""
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    dim: int = 192
    depth: int = 6
    heads: int = 6
    in_channels: int = 16      # features per token fed in: c * p^2 (paper B, --fm-patch p), 2c (paper A, ar_sequence)
    vocab: int = 0             # > 0: discrete head over codes (paper A); 0: continuous velocity head (paper B)
    num_classes: int = 10      # prompt vocabulary: the digits
    levels: int = 0            # > 0: paper A's scales; each token gets its scale's embedding (VAR's level embedding)
    slots: int = 0             # > 0: ordered prompts of up to `slots` digits (one embedding per place and digit)
    mlp_ratio: float = 4.0
    rope_base: float = 100.0   # RoPE wavelengths up to 2*pi*base positions; latent grids are small


# ------------------------------------------------------------------------------------- units and masks
MASKS = ("full", "forward", "backward", "unit")


def unit_mask(uq, uk, kind, noisy_q=None, noisy_k=None):
    """May query i attend to key j? uq [Lq], uk [Lk] unit order indices -> bool [Lq, Lk].

    kind: 'full' (all see all), 'forward' (uk <= uq), 'backward' (uk >= uq), 'unit' (uk == uq: a unit sees only
    itself; dmd.py's composed fake rule). Inside a unit: bidirectional.
    With noisy_q / noisy_k (bool flags; teacher forcing for paper B's causal student): a clean token follows
    `kind` among clean tokens; a noisy token sees the noisy tokens of its own unit and the clean tokens of the
    other units that `kind` lets it see (forward: strictly earlier ones; backward: later; full: all others; unit:
    none) -- for 'forward', exactly what it sees at inference, where earlier units are clean in the KV cache.
    """
    uq, uk = uq[:, None], uk[None, :]
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}: choose from {', '.join(MASKS)}")
    base = {"full": torch.ones_like(uq == uk), "forward": uk <= uq, "backward": uk >= uq, "unit": uk == uq}[kind]
    if noisy_q is None:
        return base
    nq, nk = noisy_q[:, None], noisy_k[None, :]
    earlier = {"forward": uk < uq, "backward": uk > uq, "full": uk != uq, "unit": torch.zeros_like(uq == uk)}[kind]
    return torch.where(nq, torch.where(nk, uk == uq, earlier), ~nk & base)


@dataclass
class Layout:
    """The layout of one forward pass: where its L tokens sit and what each may attend to. One transformer serves
    both papers; a Layout is what differs between a call of paper A's model, the teacher and the causal student.

    pos   [L,3] float   physical (t, h, w) on the finest latent grid (Multi-scale Temporal RoPE, `rope`)
    unit  [L] long      unit order index (`frame_scale_layout`, `unit_layout`); the mask is derived from it alone
    mask  str           'full' | 'forward' | 'backward' | 'unit' (`unit_mask`)
    noisy [L] bool      paper B teacher forcing: which tokens are the noisy copies of their unit (`unit_mask`)
    level [L] long      paper A: scale index k of each token (0 = a frame's start token; `Transformer.level`)
    hide  [B,L,L] bool  paper A's Random Frame Mask: keys hidden from queries, per sample (train.random_frame_mask)
    """
    pos: torch.Tensor
    unit: torch.Tensor
    mask: str = "forward"
    noisy: torch.Tensor | None = None
    level: torch.Tensor | None = None
    hide: torch.Tensor | None = None


def hw(grid):
    """A grid's (height, width): an int s is the square s x s grid, a pair (h, w) a rectangular one. Latent frames,
    token grids and the scales of paper A's pyramid are given either way (square frames: ints, --canvas-w: pairs)."""
    if isinstance(grid, numbers.Integral):
        return int(grid), int(grid)
    h, w = grid
    return int(h), int(w)


def grid_of(h, w):
    """The grid of h x w cells in `hw`'s form: the int h when square, else the pair (h, w)."""
    return int(h) if h == w else (int(h), int(w))


def cells(grid):
    """Number of cells of a grid (s*s, or h*w)."""
    h, w = hw(grid)
    return h * w


def centres(s, side):
    """Centres of s equal cells on a line of `side` fine-grid cells, in fine-grid coordinates: [s]."""
    return (torch.arange(s, dtype=torch.float32) + 0.5) * side / s - 0.5


def grid_positions(frame_ids, s, side):
    """Physical (t, h, w) of an s grid (s_h x s_w cells) over the latent `side` (h x w cells; `hw`), for each latent
    frame in frame_ids -> [len(frame_ids)*s_h*s_w, 3]."""
    (sh, sw), (h, w) = hw(s), hw(side)
    pt, ph, pw = torch.meshgrid(torch.as_tensor(frame_ids, dtype=torch.float32), centres(sh, h), centres(sw, w),
                                indexing="ij")
    return torch.stack([pt, ph, pw], -1).view(-1, 3)                  # [n, s_h, s_w, 3] -> [n*s_h*s_w, 3]


def frame_scale_layout(n_latent, scales, side):
    """Paper A: units (latent frame f, scale k) in frame-major order, unit index f*K + k.

    Returns pos [L, 3] (physical positions), unit [L] (order index), frame [L]. L = n_latent * sum_k cells(s_k).
    """
    pos, unit, frame = [], [], []
    for f in range(n_latent):
        for k, s in enumerate(scales):
            pos.append(grid_positions([f], s, side))
            unit.append(torch.full((cells(s),), f * len(scales) + k))
            frame.append(torch.full((cells(s),), f))
    return torch.cat(pos), torch.cat(unit), torch.cat(frame)


UNITS = ("frame", "keydetail", "cube", "scale")


def unit_layout(kind, n_latent, side, stride=2, cube=(1, 2, 2), scales=()):
    """Paper B Sec. 3.2: the prediction units of a latent z [B,c,t,h,w] with t = n_latent, (h, w) = hw(side).

    frame:     unit i = latent frame i                               (N = t units)
    keydetail: unit j = frames j, j+stride, j+2*stride, ...           (N = stride: key frames first, then the rest)
    cube:      kt x kh x kw cubes, time-major cube order              (N = t/kt * h/kh * w/kw)
    scale:     unit l = z resized to the grid s_l in every frame (VAR pyramid, coarse to fine; the last is z itself)
    Returns order [L] (raster index (t,h,w) of each token; None for scale), pos [L,3], unit [L].
    """
    h, w = hw(side)
    if kind == "scale":
        if not scales or hw(scales[-1]) != (h, w):
            raise ValueError(f"scale units need scales ending at the latent grid {side}, got {scales}")
        pos = torch.cat([grid_positions(range(n_latent), s, side) for s in scales])
        unit = torch.cat([torch.full((n_latent * cells(s),), l) for l, s in enumerate(scales)])
        return None, pos, unit
    ti, hi, wi = torch.meshgrid(torch.arange(n_latent), torch.arange(h), torch.arange(w), indexing="ij")
    ti, hi, wi = ti.flatten(), hi.flatten(), wi.flatten()
    if kind == "frame":
        unit = ti
    elif kind == "keydetail":
        unit = ti % stride
    elif kind == "cube":
        kt, kh, kw = cube
        if n_latent % kt or h % kh or w % kw:
            raise ValueError(f"cube {kt}x{kh}x{kw} does not divide the latent {n_latent}x{h}x{w}")
        unit = ((ti // kt) * (h // kh) + hi // kh) * (w // kw) + wi // kw
    else:
        raise ValueError(f"unknown unit {kind!r}: choose from {UNITS}")
    order = torch.sort(unit * len(unit) + torch.arange(len(unit))).indices     # by unit, raster inside a unit
    pos = torch.stack([ti, hi, wi], -1).float()[order]
    return order, pos, unit[order]


def partition(z, order, scales=()):
    """z [B,c,t,h,w] -> tokens [B,L,c] in unit order (see unit_layout). Scale units (order None): z area-pooled to
    each scale's grid, the scales one after another, each frame-major: L = t * sum_k cells(s_k)."""
    if order is not None:   # order [L]: the raster index (t h w) of each token in unit order
        return rearrange(z, "b c t h w -> b (t h w) c")[:, order]
    n_latent = z.shape[2]
    return torch.cat([rearrange(F.interpolate(rearrange(z, "b c t h w -> (b t) c h w"), size=hw(s), mode="area"),
                                "(b t) c h w -> b (t h w) c", t=n_latent) for s in scales], 1)


def merge(tokens, order, n_latent, side):
    """Inverse of partition: tokens [B,L,c] -> z [B,c,t,h,w], t = n_latent (for scale units: the finest unit, which
    is z)."""
    if order is not None:
        # back to raster order: raster token order[i] = tokens[:, i]
        tokens = torch.empty_like(tokens).index_copy_(1, order.to(tokens.device), tokens)
    h, w = hw(side)
    return rearrange(tokens[:, -n_latent * h * w:], "b (t h w) c -> b c t h w", t=n_latent, h=h)


def frame_context(f_prev, scales):
    """Paper A, next-frame: what the tokens of latent frame t are told of frame t-1.

    f_prev [N,c,h,w]: the previous frame's full sum f_hat (every scale, so its finest detail too; zeros before
    frame 0) -> [N, sum_k cells(s_k), c]: f_prev area-downsampled to each scale of the pyramid, in token order, so
    each token sees the previous frame at its own place and resolution. Without it the finest codes of a frame -- the
    digits' strokes -- would reach the next frame only as the model's guesses, never as the codes drawn.
    """
    return torch.cat([rearrange(F.interpolate(f_prev, size=hw(s), mode="area"), "n c h w -> n (h w) c")
                      for s in scales], 1)


def frame_scale_order(maps):
    """Per-scale maps [B,t,s_k,s_k,...] (codes, or soft labels over codes) laid out in `frame_scale_layout` order:
    frame-major, then scale -> [B,L,...]."""
    return torch.cat([rearrange(m[:, f], "b h w ... -> b (h w) ...")                 # [B,cells(s_k),...] each
                      for f in range(maps[0].shape[1]) for m in maps], 1)


def ar_sequence(inputs, codes, f_hat):
    """Paper A teacher forcing: lay the tokenizer's outputs out in `frame_scale_layout` order.

    inputs: K-1 next-scale inputs [B,t,c,s_k,s_k] (k = 2..K); codes: K code maps [B,t,s_k,s_k]; f_hat
    [B,c,t,h,w] the quantized sum of each frame (Tokenizer.quantize: with error correction, the corrupted one)
    -> x [B,L,2c]: per token [next-scale input (zeros at scale 1: its level embedding is the start token) || previous
    frame's f_hat at its scale (frame_context)], and the labels [B,L].
    """
    b, n_latent = codes[0].shape[:2]
    c = f_hat.shape[1]
    prev = torch.cat([torch.zeros_like(f_hat[:, :, :1]), f_hat[:, :, :-1]], 2)            # frame t sees t-1
    ctx = rearrange(frame_context(rearrange(prev, "b c t h w -> (b t) c h w"), [i.shape[-2:] for i in codes]),
                    "(b t) l c -> b t l c", b=b)
    xs = []
    for f in range(n_latent):
        for k, idx in enumerate(codes):
            xs.append(f_hat.new_zeros(b, cells(tuple(idx.shape[-2:])), c) if k == 0   # [B,cells(s_k),c]
                      else rearrange(inputs[k - 1][:, f], "b c h w -> b (h w) c"))
    x = torch.cat(xs, 1)
    return torch.cat([x, rearrange(ctx, "b t l c -> b (t l) c").to(x.dtype)], -1), frame_scale_order(codes)


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_angles(pos, head_dim, base):
    """Paper A's Multi-scale Temporal RoPE: the rotation of every token by its 3D position pos [L,3] ->
    e^(i angle) = cos + i sin [L, D/2] complex64, computed once per forward and used by every layer (`rope`).

    The D/2 rotation pairs are split between t, h and w (t gets the remainder); pair i of an axis turns by
    pos_axis * base^(-i/n_axis). Positions are floats: coarse-scale tokens sit between fine-grid cells.
    """
    d2 = head_dim // 2
    n_s = d2 // 3
    sizes = (d2 - 2 * n_s, n_s, n_s)
    ang = torch.cat([pos[:, a:a + 1].float() * base ** (-torch.arange(n, device=pos.device, dtype=torch.float32) / n)
                     for a, n in enumerate(sizes)], -1)                    # [L, D/2]
    return torch.polar(torch.ones_like(ang), ang)


def rope(x, angles):
    """Rotate x [B,H,L,D] by rope_angles' e^(i angle) [L, D/2]: pair (x_2i, x_2i+1), read as the complex number
    x_2i + i x_2i+1, is multiplied by e^(i angle_i), i.e. (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos) -- one
    complex multiply (in fp32), ~10% faster end to end than the same sums on strided halves on a CPU."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))                  # [B,H,L,D/2] complex
    return torch.view_as_real(pairs * angles).flatten(-2).to(x.dtype)               # [B,H,L,D]


# ------------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Per-layer keys (before rotation) and values of finished tokens, with their positions and unit indices (on the
    tokens' device after the first append: no copy to the CPU per forward).

    `append=False` forwards attend to the cache without adding to it (paper B's denoising steps); a clean
    re-forward with `append=True` then writes the finished unit (`append=n`: only the call's first n tokens, a
    finished unit riding along with the next unit's first step, sample.generate_student's `fold`). The rolling
    cache (paper B Sec. 3.4) drops old tokens: `newest_units` says which tokens a window of units keeps,
    `keep` applies it, `evict(max_units)` is both; positions are re-based at every use (see `time_base`).
    """

    def __init__(self, depth):
        self.keys, self.values = [None] * depth, [None] * depth   # per layer: [B,H,L,D] or None
        self.pos = torch.zeros(0, 3)
        self.unit = torch.zeros(0, dtype=torch.long)

    def __len__(self):
        return len(self.unit)

    def time_base(self, new_pos):
        """Smallest frame index in view, a 0-d tensor on new_pos's device. Subtracting it keeps RoPE angles bounded
        by the context length."""
        return torch.cat([self.pos[:, 0].to(new_pos.device), new_pos[:, 0]]).min()

    def num_units(self):
        return len(torch.unique(self.unit))

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def newest_units(self, max_units):
        """bool [len(self)]: the tokens of the newest `max_units` units."""
        units = torch.unique(self.unit)
        if max_units <= 0:
            return torch.zeros_like(self.unit, dtype=torch.bool)
        return self.unit >= units[-max_units] if len(units) > max_units else torch.ones_like(self.unit, dtype=torch.bool)

    def evict(self, max_units):
        """Keep only the newest `max_units` units."""
        self.keep(self.newest_units(max_units))

    def keep(self, keep):   # keep [len(self)] bool: drop every other token
        idx = keep.nonzero().squeeze(1)
        self.pos, self.unit = self.pos[keep], self.unit[keep]
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(2, idx.to(self.keys[i].device))
                self.values[i] = self.values[i].index_select(2, idx.to(self.values[i].device))


# ----------------------------------------------------------------------------------------------- the blocks
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        d = cfg.dim // cfg.heads
        self.q_norm, self.k_norm = nn.RMSNorm(d), nn.RMSNorm(d)   # q/k normalisation keeps logits bounded

    def forward(self, x, angles, mask, cache=None, layer=0, append=False, angles_keys=None):
        """x [B,L,C]; angles: rope_angles of the new tokens' positions, angles_keys of the cached + new keys' (both
        re-based in time; None: the new tokens' own); mask [Lq, Lk] or [B,1,Lq,Lk]."""
        query, key, value = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.h)
        query = self.q_norm(query.float()).to(value.dtype)   # fp32 norms under bf16 autocast
        key = self.k_norm(key.float()).to(value.dtype)
        keys, values = key, value                            # [B,H,Lk,D]: cached + new
        if cache is not None and cache.keys[layer] is not None:
            keys = torch.cat([cache.keys[layer], key], 2)
            values = torch.cat([cache.values[layer], value], 2)
        if cache is not None and append:   # cached + the first `append` new tokens (True: all of them)
            end = keys.shape[2] if append is True else keys.shape[2] - key.shape[2] + append
            cache.keys[layer], cache.values[layer] = keys[:, :, :end], values[:, :, :end]
        query, keys = rope(query, angles), rope(keys, angles if angles_keys is None else angles_keys)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)      # [B,H,L,D]
        return self.proj(rearrange(o, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block with AdaLN-Zero modulation from the condition (DiT)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, cond, angles, mask, **kw):  # x [B,L,C], cond [B,1 or L,C]; angles: rope_angles
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(cond)).chunk(6, -1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), angles, mask, **kw)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


def shift_time(flow_t, shift):
    """Timestep shift (SD3, Esser et al. 2024, Sec. 5.3.2): t -> s t / (1 + (s - 1) t), for flow times in training
    and on the sampler's grid alike. s > 1 moves both toward high noise. A Moving MNIST latent is mostly empty
    background with a few high-magnitude ink cells, so its digits stay visible through moderate noise and are only
    decided near t = 1, where unshifted logit-normal times almost never train (P(t > 0.95) = 0.2%)."""
    return shift * flow_t / (1 + (shift - 1) * flow_t)


def flow_pair(x0, flow_t, generator):
    """Flow matching (one convention everywhere): x_t = (1 - t) x0 + t eps, velocity v = eps - x0, t = flow_t.
    x0 [B,L,c], flow_t [B,L] (or any x0 [B,...,c] with flow_t [B,...]) -> (x_t, v)."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    return (1 - flow_t[..., None]) * x0 + flow_t[..., None] * eps, eps - x0


def flow_times(shape, kind, generator, device, shift=1.0):
    """Training flow times [*shape] in (0, 1): uniform, or logit-normal (sigmoid of N(0, 1); SD3, Esser et al. 2024),
    which spends most samples at mid noise levels; then shifted toward high noise by `shift` (shift_time)."""
    if kind == "uniform":
        flow_t = torch.rand(shape, generator=generator, device=device)
    elif kind == "logitnormal":
        flow_t = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
    else:
        raise ValueError(f"--fm-time must be uniform or logitnormal, got {kind!r}")
    return shift_time(flow_t, shift)


def timestep_embedding(flow_t, dim):
    """Sinusoidal embedding of flow times flow_t [...] in [0, 1] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=flow_t.device, dtype=torch.float32) / half)
    ang = 1000 * flow_t.float()[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], -1)


class Transformer(nn.Module):
    """Tokens [B,L,c] (latent features) in a Layout + prompt -> logits [B,L,vocab] or velocity [B,L,c]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.in_channels, cfg.dim)
        # paper A: which scale of the pyramid a token belongs to (RoPE says where it is, not how coarse); scale 1's
        # embedding is also the start token, whose next-scale input is empty
        self.level = nn.Embedding(cfg.levels, cfg.dim) if cfg.levels else None
        if self.level is not None:
            nn.init.normal_(self.level.weight, std=0.02)
        self.digit = nn.Embedding(cfg.num_classes * max(1, cfg.slots), cfg.dim)
        self.null = nn.Parameter(torch.randn(cfg.dim) * 0.02)      # the dropped prompt, for CFG
        self.time = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.checkpointing = False   # train.py --checkpointing: blocks recompute their activations in the backward
        self.ada_out = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab or cfg.in_channels)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def condition(self, prompt, drop=None):
        """prompt [B, n_digits] long -> [B,1,C]: the sum of its digits' embeddings, or null where drop [B].

        Order-free (slots 0), "3 7" and "7 3" are one condition, and the model must decide on its own which of two
        drawn digits is the 3: a binding problem that small diffusion models learn slowly. Ordered (slots n), digit
        d in place i has its own embedding, and the data lists a clip's digits left to right (data.moving_mnist):
        "3 7" asks for the 3 left of the 7."""
        if self.cfg.slots:
            if prompt.shape[1] > self.cfg.slots:
                raise ValueError(f"a prompt of {prompt.shape[1]} digits for a model of {self.cfg.slots} places")
            prompt = prompt + self.cfg.num_classes * torch.arange(prompt.shape[1], device=prompt.device)
        cond = self.digit(prompt).sum(1)                                         # [B,C]
        if drop is not None:
            cond = torch.where(drop[:, None], self.null.to(cond.dtype).expand_as(cond), cond)
        return cond[:, None]

    def forward(self, x, layout, prompt, drop=None, flow_t=None, cache=None, append=False):
        """
        x      [B,L,c] token features (paper A: next-scale inputs; paper B: latent, noisy or clean)
        layout Layout: where the L tokens sit and what they may attend to (positions, units, mask, ...)
        prompt [B,n]   digits;  drop [B] bool: use the null condition (CFG / condition dropout)
        flow_t [B,L]   flow time per token (paper B) or None (paper A)
        cache  KVCache: attend to cached tokens; append=True also writes these tokens into it (n: the first n)
        """
        pos, unit, noisy = layout.pos, layout.unit, layout.noisy
        h = self.inp(x)
        if layout.level is not None:   # added, not substituted: a start token keeps its input (paper A: frame_context)
            h = h + self.level(layout.level.to(h.device)).to(h.dtype)
        cond = self.condition(prompt, drop)                                      # [B,1,C]
        if flow_t is not None:
            cond = cond + self.time(timestep_embedding(flow_t, self.cfg.dim))    # [B,L,C]
        pos_q, pos_keys = pos, None
        if cache is not None:   # re-base time to the oldest frame in view (see KVCache); keys = cached + new
            cache_pos, cache_unit = cache.pos.to(pos.device), cache.unit.to(unit.device)   # no-ops after the first
            t0 = F.pad(cache.time_base(pos)[None], (0, 2))                     # [3]: (t0, 0, 0); no copy to the CPU
            pos_q = pos - t0
            pos_keys = torch.cat([cache_pos - t0, pos_q])                       # [Lk,3]
            unit_keys = torch.cat([cache_unit, unit])                           # [Lk]
            noisy_keys = None if noisy is None else torch.cat([noisy.new_zeros(len(cache)), noisy])
        else:
            unit_keys, noisy_keys = unit, noisy
        if layout.mask == "full" and noisy is None and layout.hide is None:
            mask = None         # all see all: no mask, so SDPA may pick its fastest (flash) kernel on a GPU
        else:
            mask = unit_mask(unit, unit_keys, layout.mask, noisy, noisy_keys)  # [Lq,Lk]
        if layout.hide is not None:
            mask = mask & ~layout.hide[:, None]                                  # [B,1,Lq,Lk]
        d = self.cfg.dim // self.cfg.heads
        angles = rope_angles(pos_q.to(h.device), d, self.cfg.rope_base)        # once for every layer
        angles_keys = None if pos_keys is None else rope_angles(pos_keys.to(h.device), d, self.cfg.rope_base)
        for i, blk in enumerate(self.blocks):
            if self.checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                h = checkpoint(blk, h, cond, angles, mask, use_reentrant=False)
            else:
                h = blk(h, cond, angles, mask, cache=cache, layer=i, append=append, angles_keys=angles_keys)
        if cache is not None and append:
            n = len(pos) if append is True else append
            cache.pos = torch.cat([cache_pos, pos[:n].float()])
            cache.unit = torch.cat([cache_unit, unit[:n]])
        shift, scale = self.ada_out(F.silu(cond)).chunk(2, -1)
        return self.head(modulate(self.norm(h), shift, scale))
