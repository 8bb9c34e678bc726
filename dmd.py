"""Paper B Sec. 3.3: Symmetric Distribution Matching Distillation (train.py --stage dmd runs it).

DMD (Yin et al. 2024) trains a few-step generator G so that the distribution of its samples matches the data's,
by descending the reverse KL divergence KL(p_gen || p_data). Its gradient is (paper B's Eq. 2 prints its negative,
(s_real - s_gen) dG/dtheta: the direction the generator moves in)

    grad_theta L  ~  E_z E_{x_t ~ q(. | x = G_theta(z))} [ (s_gen(x_t) - s_real(x_t)) dG_theta(z)/dtheta ]

with s_real the score of the data (the frozen full-attention teacher, with classifier-free guidance) and s_gen the
score of the generator's own samples (the "fake" scorer, trained on them by flow matching as G changes).

In this project's flow convention (one everywhere, model.flow_pair): x_t = (1 - t) x0 + t eps, velocity
v = eps - x0, so a velocity model gives the denoised estimate x0_hat = x_t - t v (`denoised`); a score difference is
a difference of denoised estimates up to a positive factor, s_gen - s_real = (1 - t) / t^2 (x0_gen - x0_real). DMD
uses the denoised form with a per-sample normaliser that makes the step size independent of the data's scale:

    g = (x0_gen - x0_real) / mean |x - x0_real|                                                   (`dmd_gradient`)

and applies it through the surrogate loss 0.5 * mean (x - sg(x - g))^2, whose gradient in x is g / numel
(`dmd_loss`; sg = stop-gradient). Descending it moves x away from what the generator makes (x0_gen) and toward what
the data look like (x0_real).

Symmetric DMD: the generated-data scorer is a replica of the causal generator, twice: one forward-masked (a unit
sees the units before it) and one backward-masked (a unit sees the units after it), each trained by flow matching
on generated clips (the same transformer as the generator; train.train_dmd starts them from the teacher's weights).
Paper B says the pair "together" is s_gen and gives no formula; `--dmd-fake symmetric` averages the two scorers'
denoised estimates per token, x0_gen = (x0_fwd + x0_bwd) / 2 (`combine`), which is averaging their scores at the
same x_t and t.

Beyond the paper: neither causal scorer sees what the real scorer sees (the whole clip), and on a Gaussian video
with exact scores the forward, backward and averaged rules all converge to an inflated covariance (`python dmd.py`).
`--dmd-fake composed` adds a third scorer that sees only its own unit (mask 'unit') and composes the three:

    x0_gen = x0_fwd + x0_bwd - x0_unit

For a Markov chain of units (past and future independent given unit k), log p(x) differentiated in unit k is
d/dx_k [log p(x_{<=k}) + log p(x_{>=k}) - log p(x_k)]; a score is linear in the denoised estimate at fixed x_t and t
(s = ((1 - t) x0 - x_t) / t^2, and the x_t terms keep weight 1 + 1 - 1 = 1), so the same sum holds for x0. With
two units it is exact (unit 1: forward = unit, so the sum is the backward scorer, which sees both; unit 2 the
converse); with more it is exact for clean Markov data and close for noisy (measured below, `python dmd.py`).

Training (train.py --stage dmd), per generator update:
  1. `dmd_critic` times: a generator clip without gradient (`rollout`), and one flow-matching step of the fake
     scorers on it (`flow_matching_loss`): each learns the velocity eps - x0 of the generator's current clips;
  2. a generator clip with gradient (`rollout`), noised to x_t at a level t ~ U[t_min, t_max] per clip, scored by the
     real scorer (teacher, full attention, CFG) and the fake rule (`fake_x0`), and the surrogate
     (`distribution_matching_loss`) backpropagated through the rollout.
"""
from dataclasses import replace

import torch
import torch.nn.functional as F

from model import flow_pair
from sample import cfg_batch, generate_student, guided_velocity, stream_layout

FAKE_RULES = ("full", "forward", "backward", "symmetric", "composed")


def denoised(x_t, v, t):
    """x0 estimate of a velocity model: x_t = (1 - t) x0 + t eps and v = eps - x0 give x0 = x_t - t v.
    x_t, v [B,L,c]; t [B,L] or a number."""
    t = t[..., None] if torch.is_tensor(t) and t.dim() == x_t.dim() - 1 else t
    return x_t - t * v


def fake_masks(rule):
    """The attention masks of the fake scorers a --dmd-fake rule runs (one scorer per mask)."""
    if rule not in FAKE_RULES:
        raise ValueError(f"--dmd-fake must be one of {', '.join(FAKE_RULES)}, got {rule!r}")
    return {"symmetric": ("forward", "backward"), "composed": ("forward", "backward", "unit")}.get(rule, (rule,))


def combine(x0_by_scorer, rule):
    """The generated-data scorer's x0 estimate under a --dmd-fake rule, from {mask: x0} of the scorers run."""
    if rule not in FAKE_RULES:
        raise ValueError(f"--dmd-fake must be one of {', '.join(FAKE_RULES)}, got {rule!r}")
    if rule == "symmetric":
        return 0.5 * (x0_by_scorer["forward"] + x0_by_scorer["backward"])
    if rule == "composed":
        return x0_by_scorer["forward"] + x0_by_scorer["backward"] - x0_by_scorer["unit"]
    return x0_by_scorer[rule]


def dmd_gradient(x, x0_real, x0_gen):
    """DMD's generator gradient g = (x0_gen - x0_real) / mean|x - x0_real|, the mean taken per sample over all its
    elements, in fp32. x, x0_real, x0_gen [B,...] -> g [B,...] (no gradient flows through it)."""
    x, x0_real, x0_gen = x.detach().float(), x0_real.detach().float(), x0_gen.detach().float()
    scale = (x - x0_real).abs().flatten(1).mean(1).clamp(min=1e-8)
    return (x0_gen - x0_real) / scale.view(-1, *[1] * (x.dim() - 1))          # scale [B] -> [B,1,...,1]


def dmd_loss(x, g):
    """Surrogate 0.5 * mean (x - sg(x - g))^2: its gradient in x is g / x.numel(), so backpropagating it applies
    the DMD gradient through the generator."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g), reduction="mean")


def noise_levels(b, low, high, generator, device="cpu"):
    """The DMD noise level t per clip, uniform in [low, high] (the flag's range; default [0.02, 0.98])."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"DMD noise range must satisfy 0 <= low < high <= 1, got [{low}, {high}]")
    return low + (high - low) * torch.rand(b, generator=generator, device=device)


def distribution_matching_loss(x, t, real_x0, fake_x0, generator):
    """The generator's loss (Eq. 2 through the surrogate): noise the generated x to x_t = (1 - t) x + t eps, ask both
    scorers for x0, and return (dmd_loss(x, g), g) with g = dmd_gradient(x, x0_real, x0_fake).
    x [B,...,c] carries the generator's gradient; t [B,...] (one level per clip, repeated over its tokens);
    real_x0 / fake_x0: (x_t, t) -> x0 estimate, run without gradient."""
    x_t, _ = flow_pair(x.detach(), t, generator)
    with torch.no_grad():
        g = dmd_gradient(x, real_x0(x_t, t), fake_x0(x_t, t))
    return dmd_loss(x, g), g


def flow_matching_loss(velocity, x0, t, generator):
    """A fake scorer's loss on generated samples x0 (detached: the critic's step must not move the generator):
    mean (v_theta(x_t, t) - (eps - x0))^2 with x_t = (1 - t) x0 + t eps (model.flow_pair), as the teacher learnt the
    data. velocity: (x_t, t) -> v; x0 [B,...,c], t [B,...]."""
    x_t, v = flow_pair(x0.detach(), t, generator)
    return F.mse_loss(velocity(x_t, t).float(), v)


# ---------------------------------------------------------------------------------- paper B's generator and scorers
def rollout(model, prompts, n_latent, grid, channels, generator, kind, unit_kw, steps, shift):
    """G_theta(z) of Eq. 2: one clip of `n_latent` latent frames from the causal generator, run exactly as at inference
    (sample.generate_student: unit by unit with the KV cache, `steps` Euler steps per unit, the finished unit
    re-forwarded clean into the cache; Self Forcing, Huang et al. 2025), without CFG (the generator learns the real
    score's guidance). Returns z [B,c,n_latent,h,w], carrying the gradient of one exit step per unit.

    Each unit exits at a step j drawn uniformly from its `steps` and jumps from there to t = 0; only that forward
    keeps its graph. Why: backpropagating through every step would keep `steps` forwards' activations per unit (and,
    through a cache with gradient, send each unit's gradient into every earlier unit); one exit keeps one forward per
    unit -- a unit's tokens against the detached cache, about the memory of one teacher-forced pass over the clip,
    whatever `steps`. Random exits train the finish from every point of the time grid: exit 0 is the one-step
    generator, exits at the last step the `steps`-step one; other step counts at inference reach the time grid's
    points by other paths, untrained. grid: the token grid (model.hw's int or (h, w))."""
    n_units = len(stream_layout(kind, n_latent, n_latent, grid, **unit_kw))
    exits = torch.randint(0, steps, (n_units,), generator=generator, device=generator.device).tolist()
    return generate_student(model, prompts, n_latent, n_latent, grid, channels, generator, kind, unit_kw, steps,
                            cfg_scale=1.0, progress=False, shift=shift, exits=exits, fold=False)


def real_x0(teacher, layout, prompts, cfg_scale):
    """s_real: the frozen full-attention teacher with classifier-free guidance (the only guided score), as
    (x_t [B,L,c], t [B,L]) -> x0 [B,L,c]. Full attention makes the token order irrelevant, so it reads the clip in the
    generator's unit layout (a model.Layout; its mask is replaced by 'full') like the fake scorers."""
    full = replace(layout, mask="full")

    def x0(x_t, t):
        b = len(x_t)
        prompt_in, drop = cfg_batch(prompts, b, cfg_scale, x_t.device)
        return denoised(x_t, guided_velocity(teacher, x_t, full, prompt_in, drop, t[:, 0], b, cfg_scale), t)
    return x0


def fake_velocity(fakes, mask, layout, prompts):
    """One fake scorer (fakes[mask], attending under `mask` over the generator's units, a model.Layout) as
    (x_t, t) -> v."""
    masked = replace(layout, mask=mask)
    return lambda x_t, t: fakes[mask](x_t, masked, prompts, flow_t=t)


def fake_x0(fakes, rule, layout, prompts):
    """s_gen under a --dmd-fake rule, as (x_t [B,L,c], t [B,L]) -> x0 [B,L,c]: each scorer's x0, then `combine`."""
    return lambda x_t, t: combine({m: denoised(x_t, fake_velocity(fakes, m, layout, prompts)(x_t, t), t)
                                   for m in fake_masks(rule)}, rule)


# ------------------------------------------------------------------ exact Gaussian "video" of scalar units
def gaussian_x0(mean, cov, x_t, t, visible):
    """Exact E[x0 | the noisy coordinates `visible` of x_t] for x0 ~ N(mean, cov), x_t = (1 - t) x0 + t eps:
    a scorer that sees only those units (its mask) and is trained to perfection. mean [d], cov [d,d], x_t [B,d],
    t [B] -> [B,d] (every coordinate's estimate from the same visible set)."""
    a = (1 - t)[:, None, None]
    s = torch.tensor(visible)
    cross = a * cov[:, s]                                                         # Cov(x0, x_t[S]) [B,d,|S|]
    noisy = a ** 2 * cov[s][:, s] + t[:, None, None] ** 2 * torch.eye(len(s))     # Cov(x_t[S])     [B,|S|,|S|]
    return mean + (cross @ torch.linalg.solve(noisy, (x_t[:, s] - a[..., 0] * mean[s])[..., None]))[..., 0]


def causal_x0(mean, cov, x_t, t, mask):
    """Per unit, the estimate of a perfect scorer under `mask` (model.unit_mask's kinds) over d scalar units: 'full'
    sees all, 'forward' lets unit i see units <= i, 'backward' units >= i, 'unit' only unit i. x_t [B,d] -> [B,d]."""
    d = len(mean)
    seen = {"full": lambda i: list(range(d)), "forward": lambda i: list(range(i + 1)),
            "backward": lambda i: list(range(i, d)), "unit": lambda i: [i]}[mask]
    return torch.stack([gaussian_x0(mean, cov, x_t, t, seen(i))[:, i] for i in range(d)], 1)


def gaussian_fixed_point(rule, target_mean, target_cov, steps=1500, batch=4096, lr=0.02, seed=0):
    """DMD of a causal linear-Gaussian generator x = m + L z (L lower triangular: unit i depends on z_1..z_i only,
    any d-dimensional Gaussian) against the exact full-attention real scorer of N(target_mean, target_cov) and
    exact generated-data scorers under `rule`. Returns the generator's mean and covariance after `steps` Adam
    steps: where the rule's DMD converges."""
    d = len(target_mean)
    g = torch.Generator().manual_seed(seed)
    m, L = torch.zeros(d, requires_grad=True), torch.eye(d).requires_grad_()
    opt = torch.optim.Adam([m, L], lr=lr)
    for _ in range(steps):
        x = m + torch.randn(batch, d, generator=g) @ torch.tril(L).T                     # [B,d]
        t = noise_levels(batch, 0.02, 0.98, g)
        x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn(batch, d, generator=g)
        with torch.no_grad():
            low = torch.tril(L)
            real = causal_x0(target_mean, target_cov, x_t, t, "full")
            gen = combine({k: causal_x0(m, low @ low.T, x_t, t, k) for k in fake_masks(rule)}, rule)
            grad = dmd_gradient(x, real, gen)
        opt.zero_grad()
        dmd_loss(x, grad).backward()
        opt.step()
    low = torch.tril(L.detach())
    return m.detach(), low @ low.T


def main():
    """python dmd.py: where DMD's fake rules converge on Gaussian videos of 2 and 3 scalar units with exact scores
    (target: a Markov chain, covariance 0.9^|i-j|)."""
    print("| units | --dmd-fake | max abs error of the covariance | covariance (rows) |\n|---|---|---|---|")
    for d in (2, 3):
        target_cov = torch.tensor([[0.9 ** abs(i - j) for j in range(d)] for i in range(d)])
        for rule in FAKE_RULES:
            _, cov = gaussian_fixed_point(rule, torch.zeros(d), target_cov)
            print(f"| {d} | {rule} | {(cov - target_cov).abs().max():.3f} | "
                  f"{[[round(v, 2) for v in row] for row in cov.tolist()]} |", flush=True)


if __name__ == "__main__":
    main()
