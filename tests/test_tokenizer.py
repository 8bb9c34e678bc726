import pytest
import torch

from tokenizer import Tokenizer, TokenizerConfig


def tiny(down=8, **kw):
    torch.manual_seed(0)
    return Tokenizer(TokenizerConfig(down=down, width=16, z_channels=8, vocab=64, **kw), 64).eval()


@pytest.mark.parametrize("down,patch", [(4, 4), (8, 4), (16, 4), (8, 2)])
def test_shapes_for_each_compression(down, patch):
    tok = tiny(down, patch=patch)
    x = torch.rand(2, 1, 9, 64, 64) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (2, 8, 3, 64 // down, 64 // down)        # 9 frames = 1 + 4*2 -> 3 latent frames
    codes, inputs, f_hat, _ = tok.quantize(z)
    assert [c.shape[-1] for c in codes] == list(tok.scales) and tok.scales[-1] == 64 // down
    assert [i.shape[-1] for i in inputs] == list(tok.scales[1:])
    assert tok.decode(f_hat).shape == x.shape


def test_encoder_is_causal():
    """Changing input frame j changes no latent frame before the one that holds j (and does change that one)."""
    tok = tiny()
    x = torch.rand(1, 1, 13, 64, 64) * 2 - 1
    z = tok.encode(x)
    for j in (0, 1, 4, 5, 12):
        y = x.clone()
        y[:, :, j] = -y[:, :, j]
        z2 = tok.encode(y)
        holder = 0 if j == 0 else (j - 1) // 4 + 1
        assert torch.equal(z2[:, :, :holder], z[:, :, :holder]), j
        assert not torch.allclose(z2[:, :, holder], z[:, :, holder]), j


@pytest.mark.parametrize("kt, t", [(3, 7), (4, 2)])   # (4, 2): fewer frames than the kernel's past
@pytest.mark.parametrize("channels_last", [False, True])
def test_temporal_conv_matmul_equals_conv3d(channels_last, kt, t):
    """CausalConv3d over time only (kt x 1 x 1) runs as one matmul over stacked frames: the same output and gradients
    as conv3d on the causally padded input, whatever the input's memory layout."""
    import torch.nn.functional as F
    from tokenizer import CausalConv3d
    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, kt=kt, ks=1)
    x = torch.randn(2, 6, t, 4, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    out = conv(x)
    ref = F.conv3d(F.pad(x, conv.pad), conv.conv.weight, conv.conv.bias)
    assert out.shape == ref.shape == (2, 5, t, 4, 3) and torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv.conv.weight], g)
    want = torch.autograd.grad(ref, [x, conv.conv.weight], g)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, want))


def test_bad_video_inputs_are_clear_errors():
    tok = tiny()
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        tok.encode(torch.zeros(1, 1, 8, 64, 64))
    with pytest.raises(ValueError, match="64x64"):
        tok.encode(torch.zeros(1, 1, 5, 32, 32))
    with pytest.raises(TypeError, match="float"):
        tok.encode(torch.zeros(1, 1, 5, 64, 64, dtype=torch.uint8))
    x = torch.zeros(1, 1, 5, 64, 64)
    x[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(x)


def test_quantizer_sums_and_next_scale_input():
    tok = tiny()
    z = tok.encode(torch.rand(2, 1, 5, 64, 64) * 2 - 1)
    codes, inputs, f_hat, _ = tok.quantize(z)
    # the sum of upsampled scales is f_hat (dequantize == quantize's own sum)
    assert torch.allclose(tok.codes_to_fhat(codes), f_hat, atol=1e-5)
    # the next-scale-input function, chained over all scales, ends at f_hat and yields the training inputs
    flat = [c.flatten(0, 1) for c in codes]
    acc = torch.zeros(f_hat.shape[0] * f_hat.shape[2], *f_hat.shape[1:2], *f_hat.shape[3:])
    for k, idx in enumerate(flat):
        acc, nxt = tok.vq.next_scale_input(acc, idx, k)
        if nxt is not None:
            assert torch.allclose(nxt, inputs[k].flatten(0, 1), atol=1e-5)
    assert nxt is None
    assert torch.allclose(acc.view(2, -1, *acc.shape[1:]).transpose(1, 2), f_hat, atol=1e-5)
    # round trip: codes -> embeddings -> nearest codes gives the codes back
    e = tok.vq.codebook[flat[-1]].permute(0, 3, 1, 2)
    assert torch.equal(tok.vq.lookup(e), flat[-1])


def test_corruption_hook_requantizes_later_scales():
    """Error correction (paper A): corrupt scale 0; later labels are recomputed from the corrupted sum, so the
    final f_hat still approximates z far better than the corrupted first scale plus the clean later codes."""
    tok = tiny().train()
    z = tok.encode(torch.rand(2, 1, 5, 64, 64) * 2 - 1)
    tok.quantize(z)
    tok.eval()
    clean, _, f_clean, _ = tok.quantize(z)
    gen = torch.Generator().manual_seed(0)
    corrupt = lambda idx, k: torch.randint(0, 64, idx.shape, generator=gen) if k == 0 else idx
    labels, _, f_corr, _ = tok.quantize(z, corrupt=corrupt)
    assert torch.equal(labels[0], clean[0])                 # the label of the corrupted scale stays clean
    assert not all(torch.equal(a, b) for a, b in zip(labels[1:], clean[1:]))   # later labels re-quantized
    naive = tok.codes_to_fhat([torch.randint(0, 64, c.shape, generator=torch.Generator().manual_seed(0))
                               if i == 0 else c for i, c in enumerate(clean)])
    assert (f_corr - z).pow(2).mean() < (naive - z).pow(2).mean()


def test_coarse_loss_sees_only_what_its_scale_can_carry():
    """Tokenizer.coarse_loss(k) decodes z's s_k x s_k area means: a change of z that averages to zero over every
    cell of scale k leaves it unchanged; a change of one cell's mean does not."""
    tok = tiny()
    x = torch.rand(1, 1, 5, 64, 64) * 2 - 1
    z = tok.encode(x)
    k, s = 1, tok.scales[1]                          # 2 x 2 cells of 4 x 4 latent positions
    cell = tok.latent_grid // s
    wiggle = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(cell // 2, cell // 2).repeat(s, s)   # zero mean per cell
    base = tok.coarse_loss(x, z, k)
    assert torch.allclose(tok.coarse_loss(x, z + 3 * wiggle, k), base, atol=1e-6)
    shifted = z.clone()
    shifted[..., :cell, :cell] += 1.0
    assert not torch.allclose(tok.coarse_loss(x, shifted, k), base, atol=1e-4)


def test_soft_codes_peak_at_the_codes_the_quantizer_chose():
    """Soft labels (--ar-soft): at every scale a distribution over the codebook whose most likely code is the one
    quantize() chose -- also when error correction re-quantized the later scales from a corrupted sum, so the
    residuals are rebuilt from `inputs` as the quantizer saw them; lower temperature, sharper labels."""
    tok = tiny().train()
    z = tok.encode(torch.rand(2, 1, 5, 64, 64) * 2 - 1)
    tok.quantize(z)                                   # initialises the codebook from the data
    tok.eval()
    gen = torch.Generator().manual_seed(0)
    corrupt = lambda idx, k: torch.randint(0, 64, idx.shape, generator=gen) if k < 2 else idx
    codes, inputs, _, _ = tok.quantize(z, corrupt=corrupt)
    soft, sharp = tok.soft_codes(z, inputs, 1.0), tok.soft_codes(z, inputs, 0.1)
    for c, q, q_sharp in zip(codes, soft, sharp):
        assert q.shape == (*c.shape, 64) and torch.allclose(q.sum(-1), torch.ones(c.shape))
        assert torch.equal(q.argmax(-1), c)
        assert (q_sharp.max(-1).values >= q.max(-1).values - 1e-6).all()


def test_lookup_is_the_nearest_code():
    tok = tiny()
    r = torch.randn(3, 8, 4, 4)
    brute = torch.cdist(r.permute(0, 2, 3, 1).reshape(-1, 8), tok.vq.codebook.detach()).argmin(1)
    assert torch.equal(tok.vq.lookup(r).flatten(), brute)


@pytest.mark.parametrize("preset", ["toy", "toy-d4", "tiny", "gpu", "paper-a", "paper-b"])
def test_every_preset_builds_a_consistent_tokenizer(preset):
    from config import PRESETS, Config
    cfg = Config(**PRESETS[preset])
    tok = Tokenizer(cfg.tokenizer_config(), cfg.size)         # the scale schedule must end at the latent side
    assert tok.scales[-1] == cfg.size // cfg.down and (cfg.frames - 1) % cfg.ft == 0
    if preset in ("toy", "toy-d4"):
        x = torch.zeros(1, 1, cfg.tok_frames, cfg.size, cfg.size)
        assert tok.decode(tok.quantize(tok.encode(x))[2]).shape == x.shape
