"""dmd.py: the DMD generator gradient, its surrogate loss and the fake-scorer rules (paper B Sec. 3.3)."""
import pytest
import torch

import dmd


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
