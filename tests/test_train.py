"""Training-loop contracts: exact resume, atomic checkpoints, clear errors that leave checkpoints untouched."""
import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch

import checkpoint
import sample
import train

TINY = ["--config", "tiny", "--stage", "tokenizer", "--tok-steps", "6", "--eval-every", "3", "--device", "cpu"]


def losses(out, stage="tokenizer"):
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r["stage"] == stage}


def digest(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def refused(main, argv, capsys, match):
    """main(argv) ends as a bad flag does: exit status 2 and one line on stderr that says `match`, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and match in err and "\n" not in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run   # conftest.py: the session's tiny quickstart run (its tokenizer is what these tests need)


@pytest.mark.parametrize("stage, extra", [("tokenizer", []), ("ar", []), ("ar", ["--image-mix", "0.5"]),
                                          ("teacher", []), ("causal", []),
                                          ("causal", ["--causal-data", "teacher"]), ("dmd", [])])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(run, tmp_path, stage, extra):
    flags = TINY[:3] + [stage] + ["--tok-steps", "6", "--ar-steps", "6", "--fm-steps", "6", "--causal-steps", "6",
                                  "--dmd-steps", "6", "--eval-every", "3", "--device", "cpu"] + extra
    flags += ["--echo", "2"] if stage != "tokenizer" else []       # echoed batches resume exactly too
    flags += ["--gen-ema", "0.9"] if stage in ("ar", "teacher", "causal") else []   # their weight average (below)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for d in (whole, parts):          # later stages start from the same trained tokenizer (and teacher, student)
        d.mkdir()
        if stage != "tokenizer":
            shutil.copy(run / "tokenizer.pt", d)
        for before in {"causal": ["teacher"], "dmd": ["teacher", "causal"]}.get(stage, []):
            train.main(flags[:3] + [before] + flags[4:] + ["--out", str(d)])
    train.main(flags + ["--out", str(whole)])
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--out", str(parts), "--stop-after", "2"])
    assert e.value.code == 0
    train.main(flags + ["--out", str(parts)])
    a, b = (losses(d, stage) for d in (whole, parts))
    assert sorted(b) == list(range(1, 7))
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in range(3, 7)), (a, b)
    # the weight average (what is used and sampled) resumes too; six steps into its ramp the dmd average keeps ~2%
    # of its past (--gen-ema 0.9's ~40%), so only an exact match tells a restored one from a fresh one
    tol = dict(rtol=1e-5, atol=1e-7) if stage == "tokenizer" else dict(rtol=0, atol=0)
    ea, eb = (torch.load(d / f"{stage}.pt", weights_only=False)["ema"] for d in (whole, parts))
    assert all(torch.allclose(ea[k].float(), eb[k].float(), **tol) for k in ea)
    if stage != "tokenizer":            # ... and it is what sampling, eval.py and the later stages load
        saved = torch.load(parts / f"{stage}.pt", weights_only=False)
        model = checkpoint.load_ar(parts)[0] if stage == "ar" else checkpoint.load_flow(parts, stage)[0]
        assert all(torch.equal(v, eb[k]) for k, v in model.state_dict().items())
        assert any(not torch.equal(v, saved["model"][k]) for k, v in eb.items())
    if stage == "dmd":                  # and so do the fake scorers' losses
        fa, fb = ({r["step"]: r["fake_loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())
                   if r.get("stage") == "dmd"} for d in (whole, parts))
        assert all(fa[s] == pytest.approx(fb[s], rel=1e-5) for s in range(3, 7)), (fa, fb)


def test_ema_is_the_moving_average_of_the_weights():
    m = torch.nn.Linear(2, 2)
    ema, w0 = train.EMA(m, 0.75), m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, step=100)                  # decay min(0.75, 101 / 110) = 0.75
    assert torch.allclose(ema.model.weight, w0 + 0.25) and torch.allclose(m.weight, w0 + 1)
    assert train.EMA(m, 0).model is m        # off: the model itself


def test_later_stages_get_the_tokenizers_averaged_weights(run):
    state = torch.load(run / "tokenizer.pt", weights_only=False)
    tok, _ = checkpoint.load_tokenizer(run)
    assert all(torch.equal(v, state["ema"][k]) for k, v in tok.state_dict().items())
    assert any(not torch.equal(state["ema"][k], v) for k, v in state["model"].items() if v.is_floating_point())


def test_bad_flags_and_configs_leave_the_checkpoint_untouched(run, capsys):
    ckpt = run / "tokenizer.pt"
    before = digest(ckpt)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--out", str(run), "--no-such-flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    refused(train.main, TINY + ["--out", str(run), "--frames", "12"], capsys, "--frames 12: allowed 1 + 4*k")
    refused(train.main, TINY + ["--out", str(run), "--z-channels", "8"], capsys, "different config: --z-channels 4 there")
    assert digest(ckpt) == before


def test_a_generator_trained_on_another_tokenizer_is_refused(run, tmp_path, capsys):
    """A tokenizer retrained under the same config (other weights) must not pair silently with an ar model or a
    teacher trained on the old one's codes / latents: resuming, sampling and the next stage refuse it."""
    d = tmp_path / "r"
    d.mkdir()
    shutil.copy(run / "tokenizer.pt", d)
    common = ["--ar-steps", "3", "--fm-steps", "3", "--eval-every", "3", "--device", "cpu", "--out", str(d)]
    for stage in ("ar", "teacher"):
        train.main(TINY[:3] + [stage] + common)
    sample.main(["--ckpt", str(d), "--method", "ar", "--num", "1", "--npy", str(tmp_path / "ok.npy")])   # same: fine
    (d / "tokenizer.pt").unlink()
    train.main(TINY + ["--out", str(d), "--seed", "1"])                    # same config, other weights
    for stage in ("ar", "teacher", "causal"):                                # resume ar / teacher; causal's init
        refused(train.main, TINY[:3] + [stage] + common + ["--ar-steps", "6", "--fm-steps", "6"], capsys,
                "another tokenizer")
    for method in ("ar", "teacher"):
        refused(sample.main, ["--ckpt", str(d), "--method", method, "--num", "1", "--npy", str(tmp_path / "x.npy")],
                capsys, "another tokenizer")


def test_coarse_loss_flag_changes_the_tokenizer_objective(run, tmp_path):
    """--tok-coarse is not a no-op: the same first batch gives a different training loss with it."""
    train.main(TINY + ["--tok-steps", "1", "--tok-coarse", "1.0", "--out", str(tmp_path)])
    assert losses(tmp_path)[1] > losses(run)[1] + 1e-3


def test_soft_labels_become_the_codes_as_their_temperature_falls(run, tmp_path):
    """--ar-soft T trains paper A's model on soft labels over the codes near each residual: at T -> 0 they are the
    quantizer's codes (the losses of --ar-soft 0, one-hot labels); at T = 0.5 the training differs. (Step 1 cannot
    tell: the zero-initialised head predicts uniform codes, whose cross-entropy is ln V against any labels.)"""
    third = {}
    for t in ("0", "1e-6", "0.5"):
        d = tmp_path / t
        d.mkdir()
        shutil.copy(run / "tokenizer.pt", d)
        train.main(TINY[:3] + ["ar", "--ar-steps", "3", "--eval-every", "3", "--warmup", "0", "--ar-soft", t,
                               "--device", "cpu", "--out", str(d)])
        third[t] = losses(d, "ar")[3]
    assert third["1e-6"] == pytest.approx(third["0"], rel=1e-5)
    assert abs(third["0.5"] - third["0"]) > 1e-3


def test_compile_flag_sends_every_training_forward_through_torch_compile(tmp_path, monkeypatch):
    """--compile is not a no-op: each stage's training forward runs through torch.compile (a spy here; the real
    compiler is the slow test below), and without the flag nothing is compiled."""
    calls = {}

    def spy(module):
        def forward(*a, **k):
            calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1
            return module(*a, **k)
        return forward

    monkeypatch.setattr(train.torch, "compile", spy)
    flags = TINY[:3] + ["tokenizer", "--tok-steps", "3", "--ar-steps", "3", "--fm-steps", "3", "--eval-every", "3",
                        "--device", "cpu"]
    train.main(flags + ["--out", str(tmp_path / "plain")])
    assert calls == {}
    for stage in ("tokenizer", "ar", "teacher"):
        train.main(flags[:3] + [stage] + flags[4:] + ["--out", str(tmp_path / "compiled"), "--compile"])
    assert calls == {"Tokenizer": 3, "Transformer": 6}     # 3 tokenizer steps; 3 ar + 3 teacher steps


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(run, tmp_path):
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        (tmp_path / name).mkdir()
        shutil.copy(run / "tokenizer.pt", tmp_path / name)
        train.main(TINY[:3] + ["ar", "--ar-steps", "3", "--eval-every", "3", "--device", "cpu",
                               "--out", str(tmp_path / name)] + extra)
    a, b = losses(tmp_path / "eager", "ar"), losses(tmp_path / "compiled", "ar")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(a[s] == pytest.approx(b[s], rel=1e-3) for s in a), (a, b)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "tokenizer.pt").write_bytes(b"garbage")
    refused(train.main, TINY + ["--out", str(tmp_path)], capsys, "not a readable checkpoint")
    assert (tmp_path / "tokenizer.pt").read_bytes() == b"garbage"


def test_reconstruct_keeps_shape_and_dtype(run, tmp_path, digits, capsys):
    import data
    video, _ = data.moving_mnist(3, digits, cfg=data.MovingMNISTConfig(frames=9), seed=0)
    for name, v in (("gray", video), ("chan", video[..., None])):
        np.save(tmp_path / f"{name}.npy", v)
        sample.main(["--ckpt", str(run), "--reconstruct", str(tmp_path / f"{name}.npy"),
                     "--npy", str(tmp_path / f"{name}_out.npy"), "--device", "cpu"])
        out = np.load(tmp_path / f"{name}_out.npy")
        assert out.shape == v.shape and out.dtype == np.uint8
    np.save(tmp_path / "bad.npy", video[:, :8])
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(run), "--reconstruct", str(tmp_path / "bad.npy"), "--npy", str(tmp_path / "x.npy")])
    assert "1 + 4*k" in capsys.readouterr().err
    np.save(tmp_path / "float.npy", video.astype(np.float32))
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(run), "--reconstruct", str(tmp_path / "float.npy"), "--npy", str(tmp_path / "x.npy")])
    assert "uint8" in capsys.readouterr().err


def test_bf16_precision_flag_changes_the_arithmetic_not_the_result(run, tmp_path):
    """--precision bf16 (the CUDA default) runs the forward passes under bfloat16 autocast: the losses move a little
    from the fp32 run's, but no more than bf16 rounding explains."""
    flags = TINY[:3] + ["ar", "--ar-steps", "3", "--eval-every", "3", "--device", "cpu"]
    for precision in ("fp32", "bf16"):
        (tmp_path / precision).mkdir()
        shutil.copy(run / "tokenizer.pt", tmp_path / precision)
        train.main(flags + ["--precision", precision, "--out", str(tmp_path / precision)])
    a, b = (losses(tmp_path / p, "ar") for p in ("fp32", "bf16"))
    assert all(np.isfinite(list(b.values())))
    assert a != b and all(b[s] == pytest.approx(a[s], rel=2e-2) for s in a), (a, b)


def test_latent_stats_normalise_each_channel_and_invert():
    from tokenizer import LatentStats
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 3, 2, 4, 4, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1, 1) \
        + torch.tensor([-2.0, 0.0, 1.0]).view(1, 3, 1, 1, 1)
    per = LatentStats.measure(z)
    x = per.normalize(z)
    assert torch.allclose(x.mean((0, 2, 3, 4)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3, 4)), torch.ones(3), atol=1e-5)
    assert torch.allclose(per.denormalize(x), z, atol=1e-5)
    glob = LatentStats.from_state(LatentStats.measure(z, per_channel=False).state())
    assert glob.normalize(z).mean((0, 2, 3, 4))[0] < -0.5        # one global std keeps the channels' offsets


def test_logit_normal_flow_times_concentrate_at_mid_noise():
    g = torch.Generator().manual_seed(0)
    u, ln = (train.flow_times((20000,), k, g, "cpu") for k in ("uniform", "logitnormal"))
    assert 0 < ln.min() and ln.max() < 1
    assert abs(ln.median().item() - 0.5) < 0.02 and 0.18 < ln.std().item() < 0.24   # logit-normal(0, 1): std 0.21
    mid = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert mid(u) == pytest.approx(0.5, abs=0.02) and mid(ln) > 0.65
    with pytest.raises(ValueError, match="fm-time"):
        train.flow_times((2,), "cosine", g, "cpu")


def test_time_shift_moves_training_and_sampling_toward_noise():
    """--fm-shift s: the same map on training times and on the sampler's grid; s = 1 changes nothing; s = 3 puts the
    median logit-normal time at 0.75 and trains ~20x more often above t = 0.95 (where the digits are decided)."""
    from model import shift_time
    grid = torch.linspace(1, 0, 26)
    assert torch.equal(shift_time(grid, 1.0), grid)
    s3 = shift_time(grid, 3.0)
    assert s3[0] == 1 and s3[-1] == 0 and (s3.diff() < 0).all() and (s3[1:-1] > grid[1:-1]).all()
    g = lambda: torch.Generator().manual_seed(0)
    t1, t3 = (train.flow_times((20000,), "logitnormal", g(), "cpu", s) for s in (1.0, 3.0))
    assert t3.median().item() == pytest.approx(0.75, abs=0.02)
    assert (t3 > 0.95).float().mean() > 10 * (t1 > 0.95).float().mean()


@pytest.mark.parametrize("stage, mix", [("ar", []), ("ar", ["--image-mix", "0.5"]), ("teacher", []),
                                        ("teacher", ["--image-mix", "0.5"])])
def test_multi_stage_trains_single_images_first_then_clips(run, tmp_path, stage, mix, monkeypatch):
    """Paper A's multi-stage recipe (--image-frac): the first share of the steps sees one-frame samples at
    `latent frames` x the batch, the rest whole clips; the weights carry over (one checkpoint). With --image-mix
    the clip steps also see that share of their latent frames as single images (joint batches)."""
    seen = []
    moving_mnist = train.data.moving_mnist
    monkeypatch.setattr(train.data, "moving_mnist",
                        lambda n, d, split, mm, seed=0: (split == "train" and seen.append((n, mm.frames)),
                                                        moving_mnist(n, d, split, mm, seed))[1])
    shutil.copy(run / "tokenizer.pt", tmp_path)
    train.main(["--config", "tiny", "--stage", stage, "--ar-steps", "4", "--fm-steps", "4", "--eval-every", "4",
                "--image-frac", "0.5", "--echo", "1", "--device", "cpu", "--out", str(tmp_path)] + mix)
    clip_steps = [(4, 9), (6, 1)] if mix else [(4, 9)]   # tiny: batch 4, 9 frames = 3 latent; 0.5 x 4 x 3 images
    assert seen[-2 - 2 * len(clip_steps):] == [(12, 1), (12, 1)] + clip_steps * 2, seen


def test_causal_data_teacher_trains_the_student_on_the_teachers_clips(run, tmp_path, monkeypatch):
    """--causal-data teacher (paper B's stage 1): every fresh batch of the causal stage is sampled by the teacher
    (teacher.pt's shipped weights: their average under --gen-ema; the batch's own seed), and no Moving MNIST clip
    is read."""
    shutil.copy(run / "tokenizer.pt", tmp_path)
    flags = ["--config", "tiny", "--fm-steps", "2", "--causal-steps", "3", "--eval-every", "3", "--echo", "1",
             "--device", "cpu", "--out", str(tmp_path), "--gen-ema", "0.9"]
    train.main(flags + ["--stage", "teacher"])
    state = checkpoint.load_checkpoint(tmp_path / "teacher.pt")
    teacher = state["ema"]
    assert any(not torch.equal(v, state["model"][k]) for k, v in teacher.items())
    sampled, real, seen = [], [], []
    generate_teacher, moving_mnist, partition = train.generate_teacher, train.data.moving_mnist, train.partition

    def spy_generate(model, prompts, *a, **kw):
        assert all(torch.equal(v, teacher[k]) for k, v in model.state_dict().items())
        z = generate_teacher(model, prompts, *a, **kw)
        sampled.append(z)
        return z
    monkeypatch.setattr(train, "generate_teacher", spy_generate)
    monkeypatch.setattr(train.data, "moving_mnist", lambda n, d, split, *a, **kw: (
        split == "train" and real.append(n), moving_mnist(n, d, split, *a, **kw))[1])
    monkeypatch.setattr(train, "partition", lambda z, *a: (seen.append(z), partition(z, *a))[1])   # the batches
    train.main(flags + ["--stage", "causal", "--causal-data", "teacher"])
    assert len(sampled) == 3 and not real, (len(sampled), real)        # tiny: batch 4, one fresh batch per step
    assert all(torch.equal(a, b) for a, b in zip(sampled, seen)), "the student did not train on the teacher's clips"
    assert not torch.equal(sampled[0], sampled[1])


def test_curve_scores_samples_at_each_checkpoint(run, tmp_path, monkeypatch):
    import eval as E
    monkeypatch.setattr(E, "load_nets", lambda **kw: (E.DigitNet(8).eval(), None, {}))   # untrained: fast
    scores, calls = E.quick_scores, []
    def slow_first(*a):            # the first point's scoring takes a second: it must not count as training time
        calls.append(1)
        time.sleep(1.0 if len(calls) == 1 else 0.0)
        return scores(*a)
    monkeypatch.setattr(E, "quick_scores", slow_first)
    shutil.copy(run / "tokenizer.pt", tmp_path)
    train.main(["--config", "tiny", "--stage", "teacher", "--fm-steps", "4", "--eval-every", "2", "--curve", "3",
                "--image-frac", "0", "--device", "cpu", "--out", str(tmp_path)])
    rows = [json.loads(l)["curve"] for l in (tmp_path / "log.jsonl").read_text().splitlines() if "curve" in l]
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["train_s"] < rows[1]["train_s"]
    assert all(0 <= r["semantic"] <= 1 and r["frames"] == 9 for r in rows)
    assert (tmp_path / "curve_teacher.md").read_text().count("\n") == 4
    assert (tmp_path / "curve_teacher.png").stat().st_size > 1000


def test_data_echo_reuses_recent_clips_and_resumes_exactly():
    """--echo 4: a quarter of each batch is fresh, the rest comes from the fresh clips of the last `window` steps
    (never before `first`, where the kind of data changed); a new Echo at step s (a resumed run) gives the same batch."""
    fresh = lambda s, m: (torch.arange(m) + 100 * s,)            # row ids that say which step encoded them
    gen = lambda s: torch.Generator().manual_seed(s)
    echo = train.Echo(fresh, 4, window=3)
    batches = [echo.batch(s, 8, 0, gen(s))[0] for s in range(10)]
    for s, b in enumerate(batches):
        assert len(b) == 8 and torch.equal(b[:2], fresh(s, 2)[0])
        assert ((b // 100 >= max(0, s - 3)) & (b // 100 <= s)).all()
    assert len(torch.cat(batches[3:]).unique()) > 2 * 7           # old clips do come back
    assert torch.equal(train.Echo(fresh, 4, window=3).batch(7, 8, 0, gen(7))[0], batches[7])
    assert (train.Echo(fresh, 4, window=3).batch(6, 8, 5, gen(6))[0] // 100 >= 5).all()
    assert torch.equal(train.Echo(fresh, 1).batch(4, 8, 0, gen(4))[0], fresh(4, 8)[0])


def test_rectangular_frames_run_every_stage_and_sample(tmp_path, capsys):
    """--canvas-w (paper A's 384x672 video): a 64x96 canvas is an 8x12 latent, scales 1x2 ... 8x12, a 4x6 flow token
    grid; every stage trains on it, every method samples clips of its shape, and eval.py refuses what its nets
    cannot read (square 64x64 Moving MNIST)."""
    import eval as E
    flags = ["--config", "tiny", "--canvas-w", "96", "--tok-steps", "4", "--ar-steps", "2", "--fm-steps", "2",
             "--causal-steps", "2", "--dmd-steps", "1", "--eval-every", "2", "--device", "cpu", "--out", str(tmp_path)]
    for stage in train.STAGES:
        train.main(flags + ["--stage", stage])
    tok, _ = checkpoint.load_tokenizer(tmp_path)
    assert tok.latent_grid == (8, 12) and tok.scales == ((1, 2), (2, 3), (4, 6), (8, 12))
    for method in ("ar", "teacher", "student", "dmd"):
        npy = tmp_path / f"{method}.npy"
        sample.main(["--ckpt", str(tmp_path), "--method", method, "--num", "2", "--frames", "9", "--npy", str(npy)])
        assert np.load(npy).shape == (2, 9, 64, 96)
    with pytest.raises(SystemExit):
        E.main(["--videos", str(tmp_path / "ar.npy")])
    assert "square" in capsys.readouterr().err
