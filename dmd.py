"""Paper B Sec. 3.3: Symmetric Distribution Matching Distillation (the math; issue 17 wires it into train.py).

DMD (Yin et al. 2024) trains a few-step generator G so that the distribution of its samples matches the data's,
by descending the reverse KL divergence KL(p_gen || p_data). Its gradient (paper B, Eq. 2) is

    grad_theta L  ~  E_z E_{x_t ~ q(. | x = G_theta(z))} [ (s_gen(x_t) - s_real(x_t)) dG_theta(z)/dtheta ]

with s_real the score of the data (the frozen full-attention teacher, with classifier-free guidance) and s_gen the
score of the generator's own samples (the "fake" scorer, trained on them by flow matching as G changes).

In this project's flow convention (one everywhere, train.flow_pair): x_t = (1 - t) x0 + t eps, velocity
v = eps - x0, so a velocity model gives the denoised estimate x0_hat = x_t - t v (`denoised`); a score difference is
a difference of denoised estimates up to a positive factor, s_gen - s_real = (1 - t) / t^2 (x0_gen - x0_real). DMD
uses the denoised form with a per-sample normaliser that makes the step size independent of the data's scale:

    g = (x0_gen - x0_real) / mean |x - x0_real|                                                   (`dmd_gradient`)

and applies it through the surrogate loss 0.5 * mean (x - sg(x - g))^2, whose gradient in x is g / numel
(`dmd_loss`; sg = stop-gradient). Descending it moves x away from what the generator makes (x0_gen) and toward what
the data look like (x0_real).

Symmetric DMD: the generated-data scorer is a replica of the causal generator, twice: one forward-masked (a unit
sees the units before it) and one backward-masked (a unit sees the units after it), each trained by flow matching
on generated clips (`fake_loss`). Paper B says the pair "together" is s_gen and gives no formula; here the two
scorers' denoised estimates are averaged per token, x0_gen = (x0_fwd + x0_bwd) / 2 (`combine`), which is averaging
their scores at the same x_t and t.
"""
import torch
import torch.nn.functional as F

FAKE_RULES = ("full", "forward", "backward", "symmetric")


def denoised(x_t, v, t):
    """x0 estimate of a velocity model: x_t = (1 - t) x0 + t eps and v = eps - x0 give x0 = x_t - t v.
    x_t, v [B,L,c]; t [B,L] or a number."""
    t = t[..., None] if torch.is_tensor(t) and t.dim() == x_t.dim() - 1 else t
    return x_t - t * v


def combine(x0_by_scorer, rule):
    """The generated-data scorer's x0 estimate under a --dmd-fake rule, from {mask: x0} of the scorers run."""
    if rule not in FAKE_RULES:
        raise ValueError(f"--dmd-fake must be one of {', '.join(FAKE_RULES)}, got {rule!r}")
    if rule == "symmetric":
        return 0.5 * (x0_by_scorer["forward"] + x0_by_scorer["backward"])
    return x0_by_scorer[rule]


def dmd_gradient(x, x0_real, x0_gen):
    """DMD's generator gradient g = (x0_gen - x0_real) / mean|x - x0_real|, the mean taken per sample over all its
    elements, in fp32. x, x0_real, x0_gen [B,...] -> g [B,...] (no gradient flows through it)."""
    x, x0_real, x0_gen = x.detach().float(), x0_real.detach().float(), x0_gen.detach().float()
    scale = (x - x0_real).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (x0_gen - x0_real) / scale.view(-1, *[1] * (x.dim() - 1))


def dmd_loss(x, g):
    """Surrogate 0.5 * mean (x - sg(x - g))^2: its gradient in x is g / x.numel(), so backpropagating it applies
    the DMD gradient through the generator."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g), reduction="mean")


def noise_levels(b, low, high, generator, device="cpu"):
    """The DMD noise level t per clip, uniform in [low, high] (the flag's range; default [0.02, 0.98])."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"DMD noise range must satisfy 0 <= low < high <= 1, got [{low}, {high}]")
    return low + (high - low) * torch.rand(b, generator=generator, device=device)


def fake_loss(velocity, x, t, generator):
    """Flow-matching loss of a generated-data scorer on detached generator samples x [B,L,c] at times t [B,L]:
    velocity(x_t, t) -> [B,L,c] is the scorer (any mask)."""
    x = x.detach()
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    x_t = (1 - t[..., None]) * x + t[..., None] * eps
    return F.mse_loss(velocity(x_t, t).float(), (eps - x).float())
