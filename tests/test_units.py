"""Paper B contracts: units partition and merge exactly, masks follow unit order, the KV cache reproduces the
masked full forward for every unit type (teacher-forcing layout included)."""
import pytest
import torch

import sample
from conftest import randomised
from model import KVCache, Layout, ModelConfig, Transformer, hw, merge, partition, unit_layout, unit_mask

T, SIDE, C = 4, 8, 6
SCALES = (1, 2, 4, 8)
RECT, RECT_SCALES = (8, 12), ((1, 2), (2, 3), (4, 6), (8, 12))   # --canvas-w: a 64x96 frame's 8x12 latent
CASES = [(SIDE, "frame", {}, 4), (SIDE, "keydetail", dict(stride=2), 2), (SIDE, "cube", dict(cube=(2, 4, 4)), 8),
         (SIDE, "cube", dict(cube=(1, 2, 2)), 64), (SIDE, "cube", dict(cube=(4, 4, 4)), 4),
         (SIDE, "scale", dict(scales=SCALES), 4),
         (RECT, "frame", {}, 4), (RECT, "cube", dict(cube=(2, 4, 4)), 12), (RECT, "scale", dict(scales=RECT_SCALES), 4)]
IDS = [f"{g}-{k}-{v}" for g, k, v, _ in CASES]


@pytest.fixture(scope="module")
def model():
    return randomised(Transformer(ModelConfig(dim=32, depth=2, heads=2, in_channels=C)))


@pytest.mark.parametrize("grid,kind,kw,n_units", CASES, ids=IDS)
def test_partition_merge_round_trip_and_unit_counts(grid, kind, kw, n_units):
    z = torch.randn(2, C, T, *hw(grid))
    order, pos, unit = unit_layout(kind, T, grid, **kw)
    tokens = partition(z, order, kw.get("scales", ()))
    assert len(unit.unique()) == n_units and tokens.shape[1] == len(unit) == len(pos)
    assert torch.equal(merge(tokens, order, T, grid), z)
    if order is not None:                                      # every cell of the latent once, at its own position
        t, h, w = torch.meshgrid(*(torch.arange(n) for n in (T, *hw(grid))), indexing="ij")
        assert torch.equal(pos, torch.stack([t, h, w], -1).view(-1, 3).float()[order])
    assert (unit[1:] >= unit[:-1]).all()                     # tokens are laid out in unit order
    if kind == "keydetail":                                    # frames 0, 2 first, then 1, 3
        assert pos[unit == 0, 0].unique().tolist() == [0, 2] and pos[unit == 1, 0].unique().tolist() == [1, 3]
    if kind == "cube":                                         # time-major: all cubes of the first time slab first
        assert pos[unit < n_units // (T // kw["cube"][0]), 0].max() < kw["cube"][0]


def test_cube_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide"):
        unit_layout("cube", 5, SIDE, cube=(2, 4, 4))
    with pytest.raises(ValueError, match="unknown unit"):
        unit_layout("pixel", T, SIDE)


def test_masks_follow_unit_order():
    u = torch.tensor([0, 0, 1, 2, 2])
    assert torch.equal(unit_mask(u, u, "forward"), u[None, :] <= u[:, None])
    assert torch.equal(unit_mask(u, u, "backward"), u[None, :] >= u[:, None])
    assert unit_mask(u, u, "full").all()
    assert torch.equal(unit_mask(u, u, "unit"), u[None, :] == u[:, None])
    with pytest.raises(ValueError, match="unknown mask"):
        unit_mask(u, u, "sideways")
    # teacher-forcing layout: noisy unit 1 sees clean unit 0 and noisy unit 1 only
    uu, noisy = torch.cat([u, u]), torch.tensor([False] * 5 + [True] * 5)
    m = unit_mask(uu, uu, "forward", noisy, noisy)
    assert m[7].tolist() == [True, True, False, False, False, False, False, True, False, False]
    assert not m[:5, 5:].any()                                 # clean tokens never see noisy ones


@pytest.mark.parametrize("grid,kind,kw,n_units", CASES, ids=IDS)
def test_forward_and_backward_masks_are_causal_in_their_direction(model, grid, kind, kw, n_units):
    _, pos, unit = unit_layout(kind, T, grid, **kw)
    x, prompt = torch.randn(1, len(unit), C), torch.tensor([[1, 2]])
    flow_t = torch.rand(1, len(unit))
    mid = n_units // 2
    y = x.clone()
    y[:, unit == mid] += 2.0
    for mask, same in (("forward", unit < mid), ("backward", unit > mid)):
        a = model(x, Layout(pos, unit, mask), prompt, flow_t=flow_t)
        b = model(y, Layout(pos, unit, mask), prompt, flow_t=flow_t)
        assert torch.allclose(a[:, same], b[:, same], atol=1e-5)
        assert not torch.allclose(a[:, unit == mid], b[:, unit == mid], atol=1e-3)
    full = model(x, Layout(pos, unit, "full"), prompt, flow_t=flow_t) - model(y, Layout(pos, unit, "full"), prompt,
                                                                            flow_t=flow_t)
    assert full[:, unit != mid].abs().max() > 1e-3              # full attention: everything sees the change


@pytest.mark.parametrize("grid,kind,kw,n_units", CASES, ids=IDS)
def test_incremental_with_cache_equals_teacher_forced_full_forward(model, grid, kind, kw, n_units):
    """Denoising a unit against the cache of clean earlier units (then appending it clean) gives exactly the
    outputs of the training forward over the clean/noisy layout."""
    _, pos, unit = unit_layout(kind, T, grid, **kw)
    L = len(unit)
    x0, xt = torch.randn(1, L, C), torch.randn(1, L, C)
    flow_t = torch.rand(1, n_units)[:, unit]
    prompt = torch.tensor([[3, 4]])
    noisy = torch.tensor([False] * L + [True] * L)
    full = model(torch.cat([x0, xt], 1), Layout(torch.cat([pos, pos]), torch.cat([unit, unit]), noisy=noisy), prompt,
                 flow_t=torch.cat([torch.zeros_like(flow_t), flow_t], 1))
    cache, got_noisy, got_clean = KVCache(2), [], []
    for u in range(n_units):
        sel = unit == u
        noisy_unit = Layout(pos[sel], unit[sel], noisy=torch.ones(int(sel.sum()), dtype=torch.bool))
        got_noisy.append(model(xt[:, sel], noisy_unit, prompt, flow_t=flow_t[:, sel], cache=cache))
        got_clean.append(model(x0[:, sel], Layout(pos[sel], unit[sel]), prompt, flow_t=torch.zeros_like(flow_t[:, sel]),
                               cache=cache, append=True))
    assert torch.allclose(torch.cat(got_noisy, 1), full[:, L:], atol=1e-4)
    assert torch.allclose(torch.cat(got_clean, 1), full[:, :L], atol=1e-4)


@pytest.mark.parametrize("grid,kind,kw,n_units", CASES, ids=IDS)
def test_student_stream_teacher_forced_equals_masked_forward(model, grid, kind, kw, n_units):
    """generate_student walks the units in the training order: teacher-forced with a whole clip as context, the
    clean re-forwards it writes into the cache produce the outputs of one forward-masked pass over the clip."""
    z = torch.randn(1, C, T, *hw(grid))
    order, pos, unit = unit_layout(kind, T, grid, **kw)
    prompt = torch.tensor([[3, 4]])
    ref = model(partition(z, order, kw.get("scales", ())), Layout(pos, unit), prompt, flow_t=torch.zeros(1, len(unit)))
    seen = []
    hook = model.register_forward_hook(lambda m, a, kwargs, out: seen.append(out) if kwargs.get("append") else None,
                                       with_kwargs=True)
    try:
        out = sample.generate_student(model, prompt, T, T, grid, C, torch.Generator(), kind, kw, cfg_scale=1.0,
                                      context=z, progress=False, fold=False)   # every unit's own re-forward
    finally:
        hook.remove()
    assert torch.allclose(torch.cat(seen, 1), ref, atol=1e-4)
    assert torch.allclose(out, z)


@pytest.mark.parametrize("kind,kw", [("cube", dict(cube=(2, 4, 4))), ("scale", dict(scales=SCALES))])
def test_continuation_sees_given_frames_inside_straddling_units(model, kind, kw):
    """One given latent frame, units spanning two or more frames (issue 19, bug 1): no unit lies wholly inside the
    given frames, yet the generated frames depend on them, and the given frame comes back exactly."""
    def continue_from(ctx):
        return sample.generate_student(model, torch.tensor([[1, 2]]), T, T, SIDE, C, torch.Generator().manual_seed(0),
                                       kind, kw, steps=2, cfg_scale=1.0, context=ctx, progress=False)
    a, b = torch.randn(2, 1, C, 1, SIDE, SIDE).unbind(0)
    za, zb = continue_from(a), continue_from(b)
    torch.testing.assert_close(za[:, :, :1], a)
    assert (za[:, :, 1:] - zb[:, :, 1:]).abs().max() > 1e-3


def test_student_memory_is_bounded_by_the_context_length(model):
    """With a rolling cache of n units, the cache never holds more than n units, however long the video."""
    sizes = []
    z = sample.generate_student(model, torch.tensor([[1, 2]]), 12, T, SIDE, C, torch.Generator().manual_seed(0),
                                "cube", dict(cube=(2, 4, 4)), steps=1, cfg_scale=1.0, context_len=3,
                                progress=False, on_unit=lambda i, cache: sizes.append(cache.num_units()))
    assert z.shape == (1, C, 12, SIDE, SIDE) and len(sizes) == 12 // 2 * 4
    assert max(sizes) == 3 and sizes[-1] == 3


@pytest.mark.parametrize("kind,kw", [("frame", {}), ("cube", dict(cube=(2, 4, 4))), ("cube", dict(cube=(1, 4, 4))),
                                     ("scale", dict(scales=SCALES))])
def test_rolling_cache_keeps_time_offsets_inside_the_training_clip(model, kind, kw):
    """The default rolling cache (context_len -1): when a unit is generated, the oldest cached frame is at most
    T - 1 latent frames before the unit's last frame, the largest offset a T-frame training clip shows; and the
    cache still holds that whole window (the unit sees all the context it saw in training)."""
    layout = sample.stream_layout(kind, 12, T, SIDE, **kw)
    seen = []       # after unit i: (frames of unit i + 1, cached frames) -- what unit i + 1 attends to
    sample.generate_student(model, torch.tensor([[1, 2]]), 12, T, SIDE, C, torch.Generator().manual_seed(0), kind, kw,
                            steps=1, cfg_scale=1.0, progress=False, fold=False,   # the cache between units
                            on_unit=lambda i, cache: seen.append((layout[(i + 1) % len(layout)][0][:, 0],
                                                                  set(cache.pos[:, 0].tolist()))))
    for unit_frames, cached in seen[:-1]:
        first, last = int(unit_frames.min()), int(unit_frames.max())
        assert last - min(cached, default=last) <= T - 1, (kind, kw, last, sorted(cached))
        assert set(range(max(0, last - T + 1), first)) <= cached                # the window before the unit is kept


@pytest.mark.parametrize("method", ["teacher", "student"])
def test_samplers_walk_the_shifted_time_grid(model, monkeypatch, method):
    """--fm-shift is applied at sampling as in training (model.shift_time): the times the model is asked about are
    the shifted grid, for the teacher and for each unit of the student."""
    from model import shift_time
    seen = []
    real = sample.guided_velocity
    monkeypatch.setattr(sample, "guided_velocity", lambda *a, **k: seen.append(a[5]) or real(*a, **k))   # flow_t
    prompt, gen = torch.tensor([[1, 2]]), torch.Generator().manual_seed(0)
    if method == "teacher":
        sample.generate_teacher(model, prompt, 1, 4, C, gen, steps=5, progress=False, shift=3.0)
    else:
        sample.generate_student(model, prompt, 1, 1, 4, C, gen, "frame", steps=5, progress=False, shift=3.0)
    assert seen == pytest.approx(shift_time(torch.linspace(1, 0, 6), 3.0)[:-1].tolist())


@pytest.mark.parametrize("kind,kw,context_len,cfg_scale,n_ctx", [
    ("cube", dict(cube=(1, 4, 4)), -1, 3.0, 0),      # the training-clip window, evicting at every new frame; CFG
    ("cube", dict(cube=(2, 4, 4)), 3, 1.0, 0),       # the newest 3 units
    ("frame", {}, 0, 3.0, 0),                        # everything kept
    ("scale", dict(scales=SCALES), -1, 1.0, 0),
    ("cube", dict(cube=(2, 4, 4)), -1, 1.0, 3)])     # given frames: whole units, and one straddling them
def test_folded_stream_equals_unfolded(model, kind, kw, context_len, cfg_scale, n_ctx):
    """fold=True (a finished unit's clean re-forward carried by the next unit's first step) draws the video of
    fold=False over three chunks, with one model call per unit fewer where no frame is given."""
    prompts = torch.tensor([[1, 2], [3, 4]])
    context = torch.randn(2, C, n_ctx, SIDE, SIDE) if n_ctx else None
    n_units = len(sample.stream_layout(kind, 3 * T, T, SIDE, **kw))
    videos, calls = [], []
    for fold in (True, False):
        seen = []
        hook = model.register_forward_hook(lambda *_: seen.append(1))
        try:
            videos.append(sample.generate_student(model, prompts, 3 * T, T, SIDE, C, torch.Generator().manual_seed(0),
                                                  kind, kw, steps=2, cfg_scale=cfg_scale, context=context,
                                                  context_len=context_len, progress=False, fold=fold))
        finally:
            hook.remove()
        calls.append(len(seen))
    torch.testing.assert_close(videos[0], videos[1], atol=1e-5, rtol=1e-4)
    if not n_ctx:
        assert calls == [2 * n_units, 3 * n_units]


def test_rectangular_grids_keep_height_and_width_apart():
    """--canvas-w: a grid is (height, width) everywhere -- positions, paper A's scale pyramid, the config's grids."""
    from config import Config
    from model import grid_positions
    from tokenizer import TokenizerConfig
    assert grid_positions([0], (1, 2), (4, 6)).tolist() == [[0, 1.5, 1.0], [0, 1.5, 4.0]]   # cell centres
    assert TokenizerConfig(scales=(1, 2, 4)).scale_schedule((4, 6)) == ((1, 2), (2, 3), (4, 6))
    assert TokenizerConfig().scale_schedule((8, 12)) == ((1, 2), (2, 3), (4, 6), (8, 12))   # heights: powers of 2
    assert TokenizerConfig().scale_schedule(8) == (1, 2, 4, 8)                             # square: sides
    cfg = Config(size=64, canvas_w=96, down=8, fm_patch=2, unit="scale")
    assert cfg.frame_grid() == (64, 96) and cfg.frame_grid(8) == (8, 12) and Config(size=64).frame_grid(8) == 8
    assert cfg.unit_kwargs()["scales"] == ((1, 2), (2, 3), (4, 6))                        # those of the 4x6 tokens
