"""The 3D multi-scale tokenizer of paper A (VideoAR, arXiv 2601.05966, Sec. 3.1 "3D multi-scale tokenizer").

Two parts:
* `CausalAE` -- a causal 3D convolutional autoencoder giving the continuous latent z that paper B splits into
  prediction units. Frame 0 is encoded alone, then every `ft` frames make one latent frame
  (T = 1 + ft*k frames -> t = 1 + k latent frames), with `down` x spatial compression (4, 8 or 16; paper A: 16).
  Causality: time convolutions pad only on the past side, and time is folded into channels in groups whose last
  frame is the group's newest frame, so latent frame j sees only input frames <= ft*j.
* `MultiScaleVQ` -- VAR's multi-scale residual quantizer (Tian et al. 2024, Alg. 1), applied to each latent
  frame: for scales s_1 < ... < s_K = h, quantize the area-downsampled residual at s_k x s_k, upsample the codes
  back to h x w and subtract, so that f_hat = sum_k up(e(R_k)) is accumulated at full latent resolution (on
  rectangular frames, --canvas-w, scale k is s_k x round(s_k w / h): `TokenizerConfig.scale_schedule`).

Why a codebook VQ and not a bitwise (BSQ) quantizer: with a 1-16 k vocabulary, a plain codebook and a softmax
over codes is the textbook VAR setup a reader can follow; BSQ's gain is for vocabularies of 2^32 and more that
need bitwise heads. Codebook collapse is avoided by initialising codes from data and re-seeding dead codes.

The API the project uses:
  encode(video [B,C,T,H,W]) -> z [B,c,t,h,w]           decode(z or f_hat [B,c,t,h,w]) -> video
  quantize(z) -> codes (list over scales of [B,t,s_k,s_k] long), inputs (each scale's input), f_hat [B,c,t,h,w],
                 vq_loss
  codes_to_fhat(codes) -> f_hat
  next_scale_input(f_hat, codes_k, k) -> (f_hat + up(e(codes_k)), input of scale k+1 [N,c,s_{k+1},s_{k+1}])
    -- THE one function that builds the next-scale input; training (model teacher forcing) and sampling call it.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model import grid_of, hw


@dataclass
class TokenizerConfig:
    channels: int = 1          # video channels
    ft: int = 4                # frames per latent frame (after frame 0); paper A: 4x temporal compression
    down: int = 8              # spatial compression: 4, 8 or 16 (paper A: 16)
    patch: int = 4             # pixel-unshuffle factor of the stem (the first conv runs at H/patch)
    width: int = 64            # conv width at the first (patchified) resolution, doubled at each downsampling
    z_channels: int = 16       # latent channels c
    vocab: int = 1024          # codebook size
    scales: tuple = ()         # side lengths s_1 < ... < s_K; () = 1, 2, 4, ... up to the latent side
    beta: float = 0.25         # commitment weight (VQ-VAE, van den Oord et al. 2017)

    def scale_schedule(self, latent_grid):
        """The pyramid's grids for a latent frame of `latent_grid` cells (model.hw: an int when square, else (h, w)):
        the sides s_k of --scales (default powers of 2) on a square grid; on a rectangular one they are the heights,
        each with the width of the frame's aspect, round(s_k * w / h) >= 1 (Infinity's aspect-ratio schedules)."""
        h, w = hw(latent_grid)
        s = tuple(self.scales) or tuple(2 ** i for i in range(h.bit_length()) if 2 ** i <= h)
        if s[-1] != h or list(s) != sorted(set(s)):
            raise ValueError(f"scale schedule {s} must increase and end at the latent side {h}")
        return tuple(grid_of(k, max(1, round(k * w / h))) for k in s)


# ------------------------------------------------------------------------------------------- conv blocks
class CausalConv3d(nn.Module):
    """kt x ks x ks conv whose time padding is all on the past side: output frame i sees input frames <= i."""

    def __init__(self, cin, cout, kt=3, ks=3):
        super().__init__()
        self.pad = (ks // 2, ks // 2, ks // 2, ks // 2, kt - 1, 0)  # (w, w, h, h, t_past, t_future)
        self.conv = nn.Conv3d(cin, cout, (kt, ks, ks))

    def forward(self, x):  # [B, C, T, H, W]
        if self.conv.kernel_size[1:] != (1, 1):
            return self.conv(F.pad(x, self.pad))
        # over time only (kt x 1 x 1): one matmul over the kt frames i-kt+1 .. i stacked on the channels, channels last
        # (the layout _spatial leaves); on a CPU ~3x faster than conv3d's kernel for it. Same weights, same result.
        kt, (b, c, t, h, w) = self.conv.kernel_size[0], x.shape
        frames = x.permute(0, 2, 3, 4, 1)                                           # [B, T, H, W, C]
        stacked = x.new_empty(b, t, h, w, kt * c)                                   # [B, T, H, W, kt*C]
        for k in range(kt):   # channel block k of frame i holds frame i - (kt-1-k); zeros before frame 0 (causal pad)
            lag, block = kt - 1 - k, stacked[..., k * c:(k + 1) * c]
            block[:, :lag] = 0
            block[:, lag:] = frames[:, :max(t - lag, 0)]
        weight = rearrange(self.conv.weight, "o c k 1 1 -> o (k c)")
        return F.linear(stacked, weight, self.conv.bias).permute(0, 4, 1, 2, 3)    # [B, C', T, H, W]


class FrameNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame. Pooling them over T would let a later frame change an earlier
    latent (and break the encoder's causality)."""

    def __init__(self, c):
        super().__init__(8, c)

    def forward(self, x):  # [B, C, T, H, W]
        return _spatial(x, super().forward)


class ResBlock(nn.Module):
    """(2+1)D residual block: norm, SiLU, 3x3 conv on each frame; norm, SiLU, causal 3x1x1 conv over time.
    Factorising space and time costs 12 C^2 MACs per voxel instead of 27 C^2 for a full 3x3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.n1, self.c1 = FrameNorm(c), nn.Conv2d(c, c, 3, padding=1)
        self.n2, self.c2 = FrameNorm(c), CausalConv3d(c, c, kt=3, ks=1)

    def forward(self, x):  # [B, C, T, H, W]
        h = _spatial(F.silu(self.n1(x)), self.c1)
        return x + self.c2(F.silu(self.n2(h)))


def _spatial(x, fn):
    """Apply a 2D op to every frame of x [B, C, T, H, W], channels last: the frames [(B T), C, H, W] are then a view
    of x when x is channels-last already (every block's output is), and a CPU's convs run ~1.7x faster on them."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).permute(0, 3, 1, 2))    # [(B T), C, H, W], C in memory last
    return y.permute(0, 2, 3, 1).reshape(b, t, *y.shape[2:], y.shape[1]).permute(0, 4, 1, 2, 3)


class CausalAE(nn.Module):
    """Causal 3D conv autoencoder. Layout (down=8, ft=4, width=64):
    enc: 4x4 pixel-unshuffle [B,16C,T',16,16] -> conv -> ResBlock -> stride-2 conv (x2 width) ... -> time fold
    (ft frames -> channels) -> ResBlock -> 1x1 conv -> z [B,c,t,h,w];  dec mirrors it."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.down not in (4, 8, 16):
            raise ValueError(f"down must be 4, 8 or 16, got {cfg.down}")
        self.cfg = cfg
        p, w = cfg.patch, cfg.width
        n_down = (cfg.down // p).bit_length() - 1
        if cfg.down % p or 2 ** n_down * p != cfg.down:
            raise ValueError(f"down ({cfg.down}) must be patch ({p}) times a power of 2")
        widths = [w * 2 ** i for i in range(n_down + 1)]
        enc = [CausalConv3d(cfg.channels * p * p, w), ResBlock(w)]
        for a, b in zip(widths, widths[1:]):
            enc += [_Down(a, b), ResBlock(b)]
        self.enc = nn.Sequential(*enc)
        wz = widths[-1]
        self.enc_t = nn.Sequential(nn.Conv3d(wz * cfg.ft, wz, 1), ResBlock(wz), FrameNorm(wz), nn.SiLU(),
                                   nn.Conv3d(wz, cfg.z_channels, 1))
        self.dec_t = nn.Sequential(nn.Conv3d(cfg.z_channels, wz, 1), ResBlock(wz), nn.Conv3d(wz, wz * cfg.ft, 1))
        dec = []
        for a, b in zip(widths[::-1], widths[::-1][1:]):
            dec += [ResBlock(a), _Up(a, b)]
        dec += [ResBlock(w), ResBlock(w), FrameNorm(w), nn.SiLU(), CausalConv3d(w, cfg.channels * p * p)]
        self.dec = nn.Sequential(*dec)
        self.patch = p

    def check_video(self, x):
        cfg = self.cfg
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"video must be a float tensor [B,C,T,H,W] in [-1,1], got {getattr(x, 'dtype', type(x))}")
        if x.ndim != 5 or x.shape[1] != cfg.channels:
            raise ValueError(f"video must be [B,{cfg.channels},T,H,W], got {tuple(x.shape)}")
        T, H, W = x.shape[2:]
        if (T - 1) % cfg.ft:
            raise ValueError(f"video length must be 1 + {cfg.ft}*k frames (frame 0 alone, then groups of "
                             f"{cfg.ft}); got {T}. Cut it to {1 + (T - 1) // cfg.ft * cfg.ft} frames.")
        if H % cfg.down or W % cfg.down:
            raise ValueError(f"frame size {H}x{W} must be divisible by the spatial compression {cfg.down}")
        if not torch.isfinite(x).all():
            raise ValueError("video contains NaN or inf")

    def encode(self, x):
        """x [B,C,T,H,W] in [-1,1], T = 1 + ft*k -> z [B,c,1+k,H/down,W/down]."""
        self.check_video(x)
        ft = self.cfg.ft
        x = torch.cat([x[:, :, :1].expand(-1, -1, ft - 1, -1, -1), x], 2)   # frame 0 padded to a full group
        x = rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=self.patch, q=self.patch)
        h = self.enc(x)
        h = rearrange(h, "b c (t f) h w -> b (f c) t h w", f=ft)   # group j = input frames ft*j-ft+1 .. ft*j
        return self.enc_t(h)

    def decode(self, z):
        """z or f_hat [B,c,t,h,w] -> video [B,C,1+ft*(t-1),h*down,w*down] (unclamped)."""
        ft = self.cfg.ft
        h = rearrange(self.dec_t(z), "b (f c) t h w -> b c (t f) h w", f=ft)[:, :, ft - 1:]
        x = self.dec(h)
        return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=self.patch, q=self.patch)


class _Down(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.conv = nn.Conv2d(a, b, 4, stride=2, padding=1)

    def forward(self, x):
        return _spatial(x, self.conv)


class _Up(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.conv = nn.Conv2d(a, b, 3, padding=1)

    def forward(self, x):
        return _spatial(x, lambda y: self.conv(F.interpolate(y, scale_factor=2, mode="nearest")))


# ------------------------------------------------------------------------------------ multi-scale quantizer
class MultiScaleVQ(nn.Module):
    """VAR residual quantizer over scales (Tian et al. 2024, Alg. 1), per latent frame [N = B*t, c, h, w].

    One deliberate difference from VAR: no phi refinement convolution after upsampling each scale's codes (VAR's
    `quant_resi`; this is VAR with `quant_resi=0`), so up(e(R_k)) is the bicubic-upsampled embedding itself. Apart
    from that the codes, f_hat and next-scale inputs agree exactly with VAR's quantizer (compared numerically)."""

    def __init__(self, cfg: TokenizerConfig, latent_grid):
        super().__init__()
        self.scales = cfg.scale_schedule(latent_grid)
        self.grid, self.beta = hw(latent_grid), cfg.beta
        self.codebook = nn.Parameter(torch.randn(cfg.vocab, cfg.z_channels) * 0.1)
        self.register_buffer("usage", torch.zeros(len(self.scales), cfg.vocab))  # EMA of code use per scale
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def lookup(self, r):
        """r [N, c, s, s] -> nearest code indices [N, s, s]: argmin_j |r - e_j|^2 = argmin_j (|e_j|^2 - 2 r.e_j)
        (|r|^2 is the same for every j, so it is left out; one fused matmul-add, no graph)."""
        flat, e = rearrange(r, "n c h w -> (n h w) c"), self.codebook.detach()
        d = torch.addmm(e.pow(2).sum(1), flat, e.t(), alpha=-2)
        return d.argmin(1).view(r.shape[0], r.shape[2], r.shape[3])

    def up(self, idx):
        """codes [N, s, s] -> their embeddings upsampled to the latent grid [N, c, h, w]."""
        e = rearrange(self.codebook[idx], "n h w c -> n c h w")
        return e if tuple(e.shape[-2:]) == self.grid else F.interpolate(e, size=self.grid, mode="bicubic")

    def next_scale_input(self, f_hat, idx, k):
        """Add scale k's codes to the running sum and return (f_hat_k, input of scale k+1).

        f_hat [N,c,h,w], idx [N,s_k,s_k] -> f_hat + up(e(idx)), and down(f_hat_k, s_{k+1}) [N,c,s_{k+1},s_{k+1}]
        (paper A eq.: F_hat_{k} = down(sum_{i<=k} up(R_i, (H,W)), (H_{k+1}, W_{k+1}))); None after the last scale.
        """
        f_hat = f_hat + self.up(idx)
        if k + 1 == len(self.scales):
            return f_hat, None
        return f_hat, F.interpolate(f_hat, size=hw(self.scales[k + 1]), mode="area")

    def forward(self, f, corrupt=None):
        """Quantize f [N,c,h,w] scale by scale.

        corrupt(idx, k) -> idx' is the hook for paper A's Cross-Frame Error Correction: the codes it returns are
        the ones added to f_hat, so the residual -- and hence the codes (labels) of every later scale -- is
        re-quantized from the corrupted sum. Returns codes (clean labels, list of [N,s_k,s_k]), inputs (list of
        the K-1 next-scale inputs [N,c,s_{k+1},s_{k+1}]), f_hat (straight-through), vq_loss.
        """
        if self.training and not self.initialised:   # codes start as data vectors: no collapse at step 0
            flat = rearrange(f.detach(), "n c h w -> (n h w) c")
            self.codebook.data.copy_(flat[torch.randint(len(flat), (len(self.codebook),), device=f.device)])
            self.initialised.fill_(True)
        f_hat, codes, inputs, loss = torch.zeros_like(f), [], [], 0.0
        for k, s in enumerate(self.scales):
            rest = f.detach() - f_hat.detach()
            r = F.interpolate(rest, size=hw(s), mode="area") if hw(s) != self.grid else rest
            idx = self.lookup(r)
            codes.append(idx)
            if self.training:
                self.usage[k].mul_(0.99).add_(torch.bincount(idx.flatten(), minlength=len(self.codebook)) / idx.numel(), alpha=0.01)
            used = corrupt(idx, k) if corrupt is not None and k + 1 < len(self.scales) else idx
            f_hat_new, nxt = self.next_scale_input(f_hat, used, k)
            loss = loss + F.mse_loss(f_hat_new, f.detach()) + self.beta * F.mse_loss(f, f_hat_new.detach())
            f_hat = f_hat_new
            if nxt is not None:
                inputs.append(nxt)
        return codes, inputs, f + (f_hat - f).detach(), loss / len(self.scales)

    @torch.no_grad()
    def restart_dead_codes(self, f, threshold=1e-4):
        """Re-seed codes no scale has used lately with random latent vectors (keeps every code alive)."""
        dead = self.usage.max(0).values < threshold
        if dead.any():
            flat = rearrange(f.detach().float(), "n c h w -> (n h w) c")
            self.codebook.data[dead] = flat[torch.randint(len(flat), (int(dead.sum()),), device=f.device)]
            self.usage[:, dead] = 1.0 / len(self.codebook)
        return int(dead.sum())

    def codes_to_fhat(self, codes):
        f_hat = 0
        for idx in codes:
            f_hat = f_hat + self.up(idx)
        return f_hat


# ------------------------------------------------------------------------------------------- the tokenizer
class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, size):
        """size: the frames' side in pixels, or (height, width) for rectangular frames (--canvas-w)."""
        super().__init__()
        self.cfg, self.size = cfg, size
        h, w = hw(size)
        self.latent_grid = grid_of(h // cfg.down, w // cfg.down)
        self.ae = CausalAE(cfg)
        self.vq = MultiScaleVQ(cfg, self.latent_grid)

    def config(self):
        return {"tokenizer": asdict(self.cfg), "size": self.size}

    @property
    def scales(self):
        return self.vq.scales

    def encode(self, x):
        if tuple(x.shape[-2:]) != hw(self.size):
            raise ValueError("this tokenizer was built for {}x{} frames, got {}".format(*hw(self.size),
                                                                                       tuple(x.shape[-2:])))
        return self.ae.encode(x)

    def decode(self, z):
        return self.ae.decode(z)

    def quantize(self, z, corrupt=None):
        """z [B,c,t,h,w] -> codes (list over scales of [B,t,s,s]), inputs (list of [B,t,c,s,s]), f_hat, vq_loss."""
        b = z.shape[0]
        f = rearrange(z.float(), "b c t h w -> (b t) c h w")
        with torch.autocast(z.device.type, enabled=False):   # fp32 even under bf16 autocast: the nearest-code
            codes, inputs, f_hat, loss = self.vq(f, corrupt)  # search and the residual sums need its resolution
        codes = [rearrange(idx, "(b t) h w -> b t h w", b=b) for idx in codes]
        inputs = [rearrange(x, "(b t) c h w -> b t c h w", b=b) for x in inputs]
        return codes, inputs, rearrange(f_hat, "(b t) c h w -> b c t h w", b=b), loss

    def coarse_loss(self, x, z, k):
        """Coarse-scale loss: the part of z that scale k can carry (z area-downsampled to s_k x s_k, bicubic back
        up) must decode to the video blurred to 4*s_k pixels a side. Without it the coarse partial sums decode
        to nothing and every digit stroke lives in the last scale, which the transformer samples in one parallel
        step (docs/RESULTS.md, "Up to 2026-11-24": what --tok-coarse 1 does and does not do). x [B,C,T,H,W], z [B,c,t,h,w] -> scalar."""
        s, b = self.scales[k], z.shape[0]
        low = F.interpolate(F.interpolate(rearrange(z, "b c t h w -> (b t) c h w"), size=hw(s), mode="area"),
                            size=hw(self.latent_grid), mode="bicubic")
        blur = tuple(min(4 * a, b) for a, b in zip(hw(s), x.shape[-2:]))
        images = rearrange(x, "b c t h w -> (b t) c h w")
        target = F.interpolate(F.interpolate(images, size=blur, mode="area"), size=x.shape[-2:], mode="bilinear")
        rec = self.decode(rearrange(low, "(b t) c h w -> b c t h w", b=b))
        return F.mse_loss(rec, rearrange(target, "(b t) c h w -> b c t h w", b=b))

    @torch.no_grad()
    def code_spacing(self):
        """The median squared distance of a code to its nearest other code: soft_codes' unit of temperature."""
        e = self.vq.codebook.float()
        return torch.cdist(e, e).pow(2).fill_diagonal_(float("inf")).min(1).values.median()

    @torch.no_grad()
    def soft_codes(self, z, inputs, tau, spacing=None):
        """Soft labels for paper A's model: per scale, q_j proportional to exp(-(|r - e_j|^2 - min_i |r - e_i|^2) / T)
        over the codebook, r the residual the quantizer looked up at that scale, T = tau * code_spacing() (pass
        `spacing` to skip recomputing it for a frozen codebook). z [B,c,t,h,w] and the `inputs` quantize(z) returned
        (area-downsampling is linear, so r_k = down(z, s_k) - inputs[k-1], error-corrected sums included) -> list over
        scales of [B,t,s,s,V]."""
        e = self.vq.codebook.float()
        gap = self.code_spacing() if spacing is None else spacing
        f = rearrange(z.float(), "b c t h w -> b t c h w")
        out = []
        for k, s in enumerate(self.scales):
            down = f if hw(s) == self.vq.grid else F.interpolate(f.flatten(0, 1), size=hw(s), mode="area").view(
                *f.shape[:3], *hw(s))
            r = down if k == 0 else down - inputs[k - 1].float()                            # [B,t,c,s_h,s_w]
            d = torch.cdist(rearrange(r, "b t c h w -> b t h w c").flatten(0, 3), e).pow(2)   # [(B t s_h s_w), V]
            q = torch.softmax(-(d - d.min(1, keepdim=True).values) / (tau * gap), 1)
            out.append(q.view(*r.shape[:2], *hw(s), -1))
        return out

    def codes_to_fhat(self, codes):
        """codes: list over scales of [B,t,s,s] -> f_hat [B,c,t,h,w]."""
        b = codes[0].shape[0]
        f = self.vq.codes_to_fhat([rearrange(idx, "b t h w -> (b t) h w") for idx in codes])
        return rearrange(f, "(b t) c h w -> b c t h w", b=b)

    def forward(self, x):
        """Training pass: returns (recon of z, recon of f_hat, vq_loss, z)."""
        z = self.encode(x)
        _, _, f_hat, vq_loss = self.quantize(z)
        return self.decode(z), self.decode(f_hat), vq_loss, z


class LatentStats:
    """What paper B's flow models see of z [B,c,t,h,w]: the affine normalisation (z - mean) / std, with p x p
    latent cells folded into one token (DiT's patch size; `--fm-patch`): x [B, c*p*p, t, h/p, w/p].

    per_channel (the default, `--fm-norm channel`): a mean and std per latent channel, measured on training clips.
    The AE's channels carry offsets (means down to -1.9 in units of the global std) and spreads from 0.4 to 1.1, so
    one global std (`--fm-norm global`, mean 0) leaves the flow's data far from the unit-variance noise it starts
    from, channel by channel. Patches: a transformer's cost grows with its tokens, and on a CPU the samples a
    generator sees per second decide whether it learns at all; p = 2 makes a 64x64 frame 16 tokens instead of 64.
    Stored in the flow checkpoints (state / from_state)."""

    def __init__(self, mean, std, patch=1):
        self.mean, self.std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()   # [c] each
        self.patch = patch

    @classmethod
    def measure(cls, z, per_channel=True, patch=1):
        """z [B,c,t,h,w] of training clips -> the stats that make it zero-mean, unit-variance."""
        if z.shape[-1] % patch or z.shape[-2] % patch:
            raise ValueError(f"--fm-patch {patch} does not divide the latent grid {tuple(z.shape[-2:])}")
        if per_channel:
            return cls(z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4)), patch)
        return cls(torch.zeros(z.shape[1]), z.std().expand(z.shape[1]), patch)

    def shape(self, channels, latent_grid):
        """(channels, latent_grid) of the latent (model.hw's int or (h, w)) -> (features per token, token grid) of
        what the flow models see, the grid in the same form."""
        h, w = hw(latent_grid)
        return channels * self.patch ** 2, grid_of(h // self.patch, w // self.patch)

    def _shape(self, v, like):
        return v.to(like.device, like.dtype).view(1, -1, 1, 1, 1)

    def normalize(self, z):
        """z [B,c,t,h,w] -> x [B,c*p*p,t,h/p,w/p]."""
        x = (z - self._shape(self.mean, z)) / self._shape(self.std, z)
        return rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=self.patch, q=self.patch)

    def denormalize(self, x):
        """x [B,c*p*p,t,h,w] -> z [B,c,t,h*p,w*p]."""
        z = rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=self.patch, q=self.patch)
        return z * self._shape(self.std, z) + self._shape(self.mean, z)

    def state(self):
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "patch": self.patch}

    @classmethod
    def from_state(cls, s):
        return cls(s["mean"], s["std"], s.get("patch", 1))
