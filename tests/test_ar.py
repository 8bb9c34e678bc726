"""Paper A contracts: forward mask over (frame, scale) units, cache = full forward, RoPE shift invariance,
error correction, null condition, Random Frame Mask, rolling window, deterministic sampling."""
import pytest
import torch

import sample
from conftest import randomised
import train
from model import KVCache, Layout, ModelConfig, Transformer, ar_sequence, frame_scale_layout, hw, unit_mask
from tokenizer import Tokenizer, TokenizerConfig

SCALES, SIDE, FRAMES = (1, 2, 4), 4, 3
C = 2 * 8      # paper A token features: [next-scale input || previous frame] (model.ar_sequence)


def make_tok(scales=SCALES, size=64):
    torch.manual_seed(0)
    t = Tokenizer(TokenizerConfig(down=16, width=16, z_channels=8, vocab=32, scales=scales), size)
    t.train().quantize(t.encode(torch.rand(2, 1, 9, *hw(size)) * 2 - 1))   # initialise the codebook from data
    return t.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tok()


@pytest.fixture(scope="module")
def model():
    return randomised(Transformer(ModelConfig(dim=32, depth=2, heads=2, in_channels=16, vocab=32, levels=len(SCALES))))


def layout(scales=SCALES, grid=SIDE):
    pos, unit, frame = frame_scale_layout(FRAMES, scales, grid)
    return pos, unit, frame, unit % len(scales)


def test_mask_is_forward_over_frame_scale_units():
    pos, unit, frame, _ = layout()
    m = unit_mask(unit, unit, "forward")
    L = len(unit)
    assert L == FRAMES * sum(s * s for s in SCALES)
    for q in range(L):
        for k in range(L):   # frame-major (frame, scale) order: a later frame, or a finer scale of this frame
            earlier = (frame[k] < frame[q]) or (frame[k] == frame[q] and unit[k] <= unit[q])
            assert m[q, k] == earlier


def test_output_does_not_change_when_a_later_unit_changes(model):
    pos, unit, _, level = layout()
    x, prompt = torch.randn(2, len(unit), C), torch.tensor([[1, 2], [3, 4]])
    ref = model(x, Layout(pos, unit, level=level), prompt)
    for u in (1, 4, 7):
        y = x.clone()
        y[:, unit == u] += 3.0
        out = model(y, Layout(pos, unit, level=level), prompt)
        assert torch.allclose(out[:, unit < u], ref[:, unit < u], atol=1e-5)
        assert not torch.allclose(out[:, unit == u], ref[:, unit == u], atol=1e-3)


def test_time_shift_leaves_outputs_unchanged(model):
    pos, unit, _, level = layout()
    x, prompt = torch.randn(2, len(unit), C), torch.tensor([[1, 2], [3, 4]])
    shifted = pos + torch.tensor([100.0, 0, 0])
    assert torch.allclose(model(x, Layout(shifted, unit, level=level), prompt),
                          model(x, Layout(pos, unit, level=level), prompt), atol=1e-4)
    moved = pos + torch.tensor([0, 1.0, 0])   # sanity: RoPE is there -- a shift in h alone is also relative,
    moved[unit == 5, 1] += 1.0                # but moving one unit relative to the rest must change things
    assert not torch.allclose(model(x, Layout(moved, unit, level=level), prompt),
                              model(x, Layout(pos, unit, level=level), prompt), atol=1e-3)


def test_rope_turns_each_pair_by_its_axis_angle():
    """Multi-scale Temporal RoPE: pair i of the t / h / w share of a head turns (x_2i, x_2i+1) by pos_axis *
    base^(-i/n_axis) -- the written formula, against model.rope_angles + rope; and q.k depends on the offset only."""
    from model import rope, rope_angles
    torch.manual_seed(0)
    d, base = 12, 100.0                      # D/2 = 6 pairs: t, h, w get 2 each
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.5, 3.0], [4.0, 1.0, 0.5]])
    x = torch.randn(2, 1, 3, d)
    got = rope(x, rope_angles(pos, d, base))
    want = torch.empty_like(x)
    for li, p in enumerate(pos):
        for i in range(d // 2):
            axis, j = divmod(i, 2)
            a = p[axis] * base ** (-j / 2)
            x1, x2 = x[..., li, 2 * i], x[..., li, 2 * i + 1]
            want[..., li, 2 * i], want[..., li, 2 * i + 1] = x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()
    assert torch.allclose(got, want, atol=1e-5)
    q, k = torch.randn(2, d), torch.randn(2, d)
    dot = lambda shift: (rope(q[None, None, :1], rope_angles(pos[1:2] + shift, d, base)) *     # noqa: E731
                         rope(k[None, None, :1], rope_angles(pos[2:3] + shift, d, base))).sum()
    assert torch.allclose(dot(0.0), dot(torch.tensor([3.0, -2.0, 7.0])), atol=1e-4)


@pytest.mark.parametrize("scales, size", [(SCALES, 64), ((2, 4), 64), ((4,), 64), (SCALES, (64, 96))])
def test_sampling_loop_with_cache_equals_full_teacher_forced_forward(model, scales, size):
    """generate_ar, teacher-forced with given codes, must feed exactly what training feeds (one next-scale-input
    function) and, through the KV cache, produce the logits of one masked forward over the whole sequence -- for
    any scale schedule, including one that starts above 1x1 and a single scale, and on rectangular frames (a
    64x96 canvas: scales 1x2, 2x3, 4x6)."""
    tok = make_tok(scales, size)
    z = tok.encode(torch.rand(2, 1, 9, *hw(size)) * 2 - 1)
    codes, inputs, f_hat, _ = tok.quantize(z)
    assert [tuple(c.shape[-2:]) for c in codes] == [hw(s) for s in tok.scales]
    x, y = ar_sequence(inputs, codes, f_hat)
    pos, unit, _, level = layout(tok.scales, tok.latent_grid)
    prompt = torch.tensor([[1, 2], [3, 4]])
    full = model(x, Layout(pos, unit, level=level), prompt)
    seen = []
    hook = model.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        got = sample.generate_ar(model, tok, prompt, FRAMES, torch.Generator(), cfg_scale=1.0, context=codes,
                                 progress=False)
    finally:
        hook.remove()
    assert torch.allclose(torch.cat(seen, 1), full, atol=1e-4)
    assert torch.allclose(got, f_hat, atol=1e-5)


def test_next_frame_is_built_on_the_codes_drawn_in_the_previous_one(model, tok):
    """Frame t's logits must change when frame t-1's LAST scale codes change (the strokes; they are never a
    next-scale input, so only model.frame_context carries them across), and frame t-1's own logits must not."""
    z = tok.encode(torch.rand(2, 1, 9, 64, 64) * 2 - 1)
    codes = tok.quantize(z)[0]
    other = [c.clone() for c in codes]
    other[-1][:, 0] = (other[-1][:, 0] + 1) % 32             # frame 0, last scale only

    def logits(c):
        seen = []
        hook = model.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            sample.generate_ar(model, tok, torch.tensor([[1, 2], [3, 4]]), FRAMES, torch.Generator(), cfg_scale=1.0,
                               context=c, progress=False)
        finally:
            hook.remove()
        return torch.cat(seen[:len(SCALES)], 1), torch.cat(seen[len(SCALES):2 * len(SCALES)], 1)

    (a0, a1), (b0, b1) = logits(codes), logits(other)
    assert torch.allclose(a0, b0, atol=1e-6)                  # frame 0 does not see its own labels
    assert not torch.allclose(a1, b1, atol=1e-3)              # frame 1 sees what frame 0 drew, to the last stroke


def test_error_correction_ramps_with_frame_and_spares_last_scale(tok):
    gen = torch.Generator().manual_seed(0)
    corrupt = train.error_correction(0.8, 4, 32, gen)
    idx = torch.zeros(4000, 4, 4, dtype=torch.long)        # (b t) = 1000 clips x 4 frames
    hit = (corrupt(idx, 0) != 0).float().view(1000, 4, -1).mean((0, 2))
    assert hit[0] < hit[1] < hit[2] < hit[3] and hit[3] > 0.25
    z = tok.encode(torch.rand(2, 1, 9, 64, 64) * 2 - 1)
    clean = tok.quantize(z)[0]
    everything = lambda i, k: (i + 1) % 32                   # corrupt every code it is offered
    labels, _, _, _ = tok.quantize(z, corrupt=everything)
    assert torch.equal(labels[0], clean[0]) and not torch.equal(labels[-1], clean[-1])


def test_null_condition_is_used_when_the_prompt_is_dropped(model):
    pos, unit, _, level = layout()
    x = torch.randn(2, len(unit), C)
    a = torch.tensor([[1, 2], [1, 2]])
    b = torch.tensor([[5, 6], [7, 8]])
    drop = torch.tensor([True, True])
    ar = Layout(pos, unit, level=level)
    assert torch.allclose(model(x, ar, a, drop=drop), model(x, ar, b, drop=drop))
    assert not torch.allclose(model(x, ar, a), model(x, ar, b))
    null = model.condition(a, drop)
    assert torch.equal(null[0, 0], model.null.detach())


def test_ordered_prompts_say_which_digit_is_where():
    """slots > 0: "3 7" and "7 3" are different conditions; slots 0: the same bag of digits."""
    for slots in (0, 2):
        m = Transformer(ModelConfig(dim=32, depth=1, heads=2, in_channels=C, vocab=32, slots=slots))
        a, b = m.condition(torch.tensor([[3, 7]])), m.condition(torch.tensor([[7, 3]]))
        assert torch.allclose(a, b) == (slots == 0)
    with pytest.raises(ValueError, match="3 digits"):
        m.condition(torch.tensor([[1, 2, 3]]))


def test_level_embedding_tells_the_scales_apart(model):
    """Same inputs and positions, other scale indices -> other logits (RoPE alone says where, not how coarse)."""
    pos, unit, _, level = layout()
    x, prompt = torch.randn(1, len(unit), C), torch.tensor([[1, 2]])
    assert not torch.allclose(model(x, Layout(pos, unit, level=level), prompt),
                              model(x, Layout(pos, unit, level=level.flip(0)), prompt))


def test_random_frame_mask_hides_earlier_frames(model):
    pos, unit, frame, level = layout()
    gen = torch.Generator().manual_seed(0)
    hide, prev = train.random_frame_mask(1.0, frame, 2, gen)  # rate 1: every earlier frame hidden
    assert not hide[:, frame == 1][:, :, frame == 1].any()   # a frame always sees itself
    assert torch.equal(prev, (frame > 0).expand(2, -1))      # ... and is not fed the previous one either
    x, prompt = torch.randn(2, len(unit), C), torch.tensor([[1, 2], [3, 4]])
    masked = Layout(pos, unit, level=level, hide=hide)
    ref = model(x, masked, prompt)
    y = x.clone()
    y[:, frame == 0] += 3.0
    out = model(y, masked, prompt)
    assert torch.allclose(out[:, frame == 2], ref[:, frame == 2], atol=1e-5)   # frame 0 invisible to frame 2
    blank = train.hide_previous(x, prev)                      # the hidden previous frame is not fed as input either
    assert torch.equal(blank[..., :C // 2], x[..., :C // 2]) and torch.equal(blank[:, frame == 0], x[:, frame == 0])
    assert not blank[:, frame > 0, C // 2:].any()


@pytest.fixture(scope="module")
def shallow():
    """One block: its keys and values depend on each token's own input only, so a cache built along a long video
    holds the same entries as one built for a short clip, and only positions can make the two differ."""
    return randomised(Transformer(ModelConfig(dim=32, depth=1, heads=2, in_channels=16, vocab=32, levels=len(SCALES))))


def test_rolling_window_sees_what_a_short_clip_sees(shallow, tok):
    """With window W, frame f is generated from the cached frames f-W..f-1 only (whose inputs carry frame f-W-1,
    model.frame_context), at the relative time offsets of a short clip, however far along the video f is."""
    z = tok.encode(torch.rand(1, 1, 4 * 5 + 1, 64, 64) * 2 - 1)
    codes = tok.quantize(z)[0]                                 # 6 latent frames
    prompt = torch.tensor([[1, 2]])
    seen = []
    hook = shallow.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        sample.generate_ar(shallow, tok, prompt, 6, torch.Generator(), cfg_scale=1.0, context=codes, window=2,
                           progress=False)
        last = torch.cat(seen[-len(SCALES):], 1)             # logits of frame 5
        seen.clear()
        short = [c[:, 2:6] for c in codes]                     # frames 2-5 as a clip of its own
        sample.generate_ar(shallow, tok, prompt, 4, torch.Generator(), cfg_scale=1.0, context=short, window=2,
                           progress=False)
        ref = torch.cat(seen[-len(SCALES):], 1)
    finally:
        hook.remove()
    assert torch.allclose(last, ref, atol=1e-4)


def test_positions_are_rebased_far_into_a_video(shallow):
    """Frames 100000-100002 after evicting older ones give the logits of frames 0-2 exactly: positions are re-based
    to the oldest cached frame, so RoPE angles stay small (without it, float32 angles near 1e5 rad drift ~4e-5)."""
    pos, unit, frame, level = layout()
    x, prompt = torch.randn(1, len(unit), C), torch.tensor([[1, 2]])

    def last_frame_logits(offset, junk):
        cache = KVCache(1)
        if junk:   # two older frames that the window must evict
            shallow(torch.randn(1, 2 * 21, C), Layout(pos[frame < 2] + torch.tensor([offset - 2.0, 0, 0]),
                                                      unit[frame < 2] + 1000), prompt, cache=cache, append=True)
        for f in (0, 1):
            sel = frame == f
            shallow(x[:, sel], Layout(pos[sel] + torch.tensor([offset, 0, 0]), unit[sel] + 3000, level=level[sel]),
                    prompt, cache=cache, append=True)
            cache.evict(2 * len(SCALES))
        sel = frame == 2
        return shallow(x[:, sel], Layout(pos[sel] + torch.tensor([offset, 0, 0]), unit[sel] + 3000, level=level[sel]),
                       prompt, cache=cache)

    ref = last_frame_logits(0.0, junk=False)
    assert torch.allclose(last_frame_logits(100000.0, junk=True), ref, atol=1e-6)


def test_sampling_is_deterministic_given_a_seed(model, tok):
    prompt = torch.tensor([[1, 2], [3, 4]])
    run = lambda seed: sample.generate_ar(model, tok, prompt, 2, torch.Generator().manual_seed(seed), top_k=8,
                                          top_p=0.9, progress=False)
    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_heldout_figures_tell_whether_the_model_uses_the_prompt(tok):
    """train.eval_ar's ce, ce_null and ce_wrong (another clip's prompt) are equal exactly when the model ignores
    the prompt."""
    clips = (torch.rand(2, 9, 64, 64) * 255).to(torch.uint8).numpy()
    labels = torch.tensor([[1, 2], [3, 4]])
    m = randomised(Transformer(ModelConfig(dim=32, depth=2, heads=2, in_channels=16, vocab=32, levels=len(SCALES))))
    r = train.eval_ar(m, tok, clips, labels, "cpu")
    assert r["ce"] != r["ce_null"] and r["ce"] != r["ce_wrong"]
    with torch.no_grad():                     # every prompt now gives the null condition's embedding
        m.digit.weight.zero_()
        m.null.zero_()
        blind = train.eval_ar(m, tok, clips, labels, "cpu")
    assert blind["ce"] == blind["ce_null"] == blind["ce_wrong"]
    assert set(r) == {"ce", "ce_null", "ce_wrong", "acc_last_frame0", "acc_last_later", "acc_last_later_nopast"}
    assert all(0 <= r[k] <= 1 for k in r if k.startswith("acc"))
