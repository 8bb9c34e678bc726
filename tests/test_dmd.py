"""dmd.py: the DMD generator gradient, its surrogate loss and the fake-scorer rules (paper B Sec. 3.3)."""
import pytest
import torch

import dmd
import sample
from conftest import randomised
from model import ModelConfig, Transformer


def test_surrogate_loss_gradient_is_g_over_numel():
    x = torch.randn(3, 5, 4, requires_grad=True)
    g = torch.randn(3, 5, 4)
    dmd.dmd_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_gradient_normaliser_is_per_sample_and_scale_free():
    x, real, gen = torch.randn(3, 2, 6, 4).unbind(0)
    g = dmd.dmd_gradient(x, real, gen)
    torch.testing.assert_close(dmd.dmd_gradient(10 * x, 10 * real, 10 * gen), g)   # data scale drops out
    torch.testing.assert_close(g[0], (gen[0] - real[0]) / (x[0] - real[0]).abs().mean())


def run_gaussian_dmd(sign=1.0, steps=300, seed=0):
    """A Gaussian generator x = mu + A z distilled by DMD against exact real and generated-data denoisers."""
    torch.manual_seed(seed)
    target_mean, target_cov = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 0.5], [0.5, 2.0]])
    mu, A = torch.zeros(2, requires_grad=True), (0.5 * torch.eye(2)).requires_grad_()
    opt = torch.optim.Adam([mu, A], lr=0.03)
    for _ in range(steps):
        x = mu + torch.randn(512, 2) @ A.T
        t = dmd.noise_levels(512, 0.02, 0.98, None)
        x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn(512, 2)
        with torch.no_grad():
            real = dmd.gaussian_x0(target_mean, target_cov, x_t, t, [0, 1])             # exact scorers
            gen = dmd.gaussian_x0(mu.detach(), A.detach() @ A.detach().T, x_t, t, [0, 1])
            g = dmd.dmd_gradient(x, real, gen)
        opt.zero_grad()
        dmd.dmd_loss(x, sign * g).backward()
        opt.step()
    return mu.detach(), (A @ A.T).detach(), target_mean, target_cov


def test_dmd_moves_a_gaussian_generator_to_the_target():
    mu, cov, target_mean, target_cov = run_gaussian_dmd()
    torch.testing.assert_close(mu, target_mean, atol=0.1, rtol=0)
    torch.testing.assert_close(cov, target_cov, atol=0.2, rtol=0)


def test_dmd_with_the_sign_flipped_moves_away():
    mu, cov, target_mean, _ = run_gaussian_dmd(sign=-1.0, steps=100)
    assert (mu - target_mean).norm() > target_mean.norm()   # farther than where it started (mu = 0)


def test_fake_rules():
    fwd, bwd = torch.randn(2, 3, 4).unbind(0)
    x0 = {"forward": fwd, "backward": bwd, "full": fwd + 1}
    torch.testing.assert_close(dmd.combine(x0, "symmetric"), (fwd + bwd) / 2)
    assert dmd.fake_masks("composed") == ("forward", "backward", "unit")
    torch.testing.assert_close(dmd.combine({**x0, "unit": fwd}, "composed"), bwd)
    assert dmd.combine(x0, "full") is x0["full"]
    with pytest.raises(ValueError, match="--dmd-fake"):
        dmd.combine(x0, "sideways")
    with pytest.raises(ValueError, match="noise range"):
        dmd.noise_levels(4, 0.9, 0.1, None)


def test_denoised_inverts_the_flow_pair():
    x0, eps, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.rand(2, 5)
    x_t = (1 - t[..., None]) * x0 + t[..., None] * eps
    torch.testing.assert_close(dmd.denoised(x_t, eps - x0, t), x0)


def test_two_unit_gaussian_fixed_points():
    """Exact scorers on a two-unit Gaussian video: a full-attention generated-data scorer brings the causal
    generator to the target; the forward+backward average (paper B's symmetric pair) does not (python dmd.py)."""
    mean, cov = torch.zeros(2), torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    got_mean, got_cov = dmd.gaussian_fixed_point("full", mean, cov, steps=600, batch=1024, lr=0.03)
    torch.testing.assert_close(got_cov, cov, atol=0.05, rtol=0)
    torch.testing.assert_close(got_mean, mean, atol=0.05, rtol=0)
    _, sym_cov = dmd.gaussian_fixed_point("symmetric", mean, cov, steps=600, batch=1024, lr=0.03)
    assert (sym_cov - cov).abs().max() > 0.2


def test_composed_fake_rule_removes_most_of_the_causal_bias():
    """Three units, a Markov target (covariance 0.9^|i-j|): the composed rule (forward + backward - own unit) lands
    near the target where the symmetric average lands far off (python dmd.py: 0.11 against 0.71 at full length)."""
    cov = torch.tensor([[0.9 ** abs(i - j) for j in range(3)] for i in range(3)])
    err = {rule: (dmd.gaussian_fixed_point(rule, torch.zeros(3), cov, steps=300, batch=512, lr=0.03)[1] - cov)
           .abs().max().item() for rule in ("composed", "symmetric")}
    assert err["composed"] < 0.2 < 0.4 < err["symmetric"], err


# ------------------------------------------------------------------- (c) a learned fake scorer: no mode collapse
def ring_x0(x_t, t, modes, sigma):
    """Exact E[x0 | x_t] for x0 from an equal mixture of N(mode_k, sigma^2 I): each mode's Gaussian posterior mean,
    weighted by the posterior of the mode. x_t [B,2], t [B], modes [K,2] -> [B,2]."""
    a = (1 - t)[:, None]
    var = a ** 2 * sigma ** 2 + t[:, None] ** 2                                   # Var(x_t | mode) per axis [B,1]
    weight = torch.softmax(-((x_t[:, None] - a[:, None] * modes) ** 2).sum(-1) / (2 * var), -1)          # [B,K]
    mean = modes + (a * sigma ** 2 / var)[:, None] * (x_t[:, None] - a[:, None] * modes)               # [B,K,2]
    return (weight[..., None] * mean).sum(1)


def mlp(n_in, n_out, width=64):
    return torch.nn.Sequential(torch.nn.Linear(n_in, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                               torch.nn.SiLU(), torch.nn.Linear(width, n_out))


def test_dmd_with_a_learned_fake_scorer_covers_every_mode_of_a_ring():
    """An MLP generator z -> x (2-D) distilled by DMD toward 8 Gaussians on a ring (exact real denoiser), its fake
    scorer an MLP learning the generator's samples by flow matching, 3 critic updates per generator update (as the
    dmd stage does). The fake score is what keeps DMD from collapsing: every mode gets at least a quarter of its fair
    share of samples."""
    from model import flow_times
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(8) * 2 * torch.pi / 8
    modes, sigma = 2 * torch.stack([angles.cos(), angles.sin()], 1), 0.1
    generator, scorer = mlp(2, 2), mlp(3, 2)
    opt_g, opt_f = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (generator, scorer))
    velocity = lambda x_t, t: scorer(torch.cat([x_t, t[:, None]], 1))
    real = lambda x_t, t: ring_x0(x_t, t, modes, sigma)
    fake = lambda x_t, t: dmd.denoised(x_t, velocity(x_t, t), t)
    for _ in range(600):
        for _ in range(3):
            x0 = generator(torch.randn(256, 2, generator=gen)).detach()
            loss = dmd.flow_matching_loss(velocity, x0, flow_times((256,), "uniform", gen, "cpu"), gen)
            opt_f.zero_grad()
            loss.backward()
            opt_f.step()
        x = generator(torch.randn(256, 2, generator=gen))
        loss, _ = dmd.distribution_matching_loss(x, dmd.noise_levels(256, 0.02, 0.98, gen), real, fake, gen)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    with torch.no_grad():
        x = generator(torch.randn(4000, 2, generator=gen))
    nearest = torch.cdist(x, modes).min(1)
    share = torch.bincount(nearest.indices[nearest.values < 0.5], minlength=8) / len(x)
    assert share.min() > 0.125 / 4 and share.sum() > 0.3, share


# ------------------------------------------------------------------------------------- (d) the generator's rollout
UNIT_KW, STEPS = dict(cube=(1, 2, 2), scales=()), 3      # 4 latent frames of 4 x 4 tokens: 4 units per frame


@pytest.fixture(scope="module")
def generator():
    return randomised(Transformer(ModelConfig(dim=32, depth=2, heads=2, in_channels=3, slots=2)))


def stream(generator, exits, noise=None, on_unit=None, steps=STEPS):
    """The DMD rollout's call (dmd.rollout), on a video of two chunks of 2 latent frames -> z [2,3,4,4,4]; without
    exits, the inference sampler's (folded)."""
    return sample.generate_student(generator, torch.tensor([[3, 7], [1, 2]]), 4, 2, 4, 3,
                                   noise or torch.Generator().manual_seed(0), "cube", UNIT_KW, steps, cfg_scale=1.0,
                                   progress=False, on_unit=on_unit, shift=3.0, exits=exits, fold=exits is None)


def test_rollout_exits_are_the_inference_samplers_with_one_graph_per_unit(generator):
    """Exits at the last step give sample.py's `steps`-step clip, exits at step 0 its one-step clip; in training
    (gradients on) exactly one forward per unit builds a graph; dmd.rollout's clip carries a gradient, but none
    under no_grad (the critic's clips)."""
    n_units = 16
    with torch.no_grad():
        plain, one_step = stream(generator, None), stream(generator, None, steps=1)
    torch.testing.assert_close(stream(generator, [0] * n_units).detach(), one_step)
    graphs = []
    hook = generator.register_forward_hook(lambda *_: graphs.append(torch.is_grad_enabled()))
    last = stream(generator, [STEPS - 1] * n_units)
    hook.remove()
    assert last.requires_grad and not plain.requires_grad and sum(graphs) == n_units
    torch.testing.assert_close(last.detach(), plain)
    z = dmd.rollout(generator, torch.tensor([[3, 7]]), 2, 4, 3, torch.Generator().manual_seed(0), "cube", UNIT_KW,
                    STEPS, 3.0)
    assert z.shape == (1, 3, 2, 4, 4) and z.requires_grad
    with torch.no_grad():
        assert not dmd.rollout(generator, torch.tensor([[3, 7]]), 2, 4, 3, torch.Generator().manual_seed(0), "cube",
                               UNIT_KW, STEPS, 3.0).requires_grad


def test_rollout_is_causal_a_unit_ignores_later_units(generator):
    """Reseeding the noise after unit k (on_unit) changes every later unit and none before, across chunks too."""
    exits = torch.randint(0, STEPS, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    units = [order for _, order, *_ in sample.stream_layout("cube", 4, 2, 4, **UNIT_KW)]
    base = stream(generator, exits).detach().flatten(2)                                       # [B,c,t*h*w]
    for k in (2, 9):    # inside the first chunk; inside the second
        noise = torch.Generator().manual_seed(0)
        other = stream(generator, exits, noise, lambda i, cache: i == k and noise.manual_seed(1)).detach().flatten(2)
        changed = [not torch.equal(base[..., order], other[..., order]) for order in units]
        assert changed == [i > k for i in range(len(units))], (k, changed)
