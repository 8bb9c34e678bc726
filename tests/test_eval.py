"""Acceptance tests of eval.py. Hermetic: the feature nets are trained here (a smaller config of the same nets, into
a temporary cache) on the digits of conftest's `digits` fixture (real MNIST test digits when ../shared has them, else
data.py's drawn digits). The full-size accuracy test is `slow`."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as E
from data import MovingMNISTConfig, moving_mnist

REPO = Path(__file__).resolve().parents[1]
SMALL = E.EvalNetConfig(width=16, steps=1200, clip_steps=150)   # ~1 min on 2 CPU cores
N, T = 64, 10


@pytest.fixture(scope="session")
def nets(digits, tmp_path_factory):
    return E.load_nets(SMALL, tmp_path_factory.mktemp("eval_cache"), digits=digits)


@pytest.fixture(scope="session")
def real(digits):
    """Held-out clips with their digits as prompts (a different seed from the reference clips)."""
    video, labels = moving_mnist(N, digits, "test", MovingMNISTConfig(frames=T), seed=5)
    return video, [list(map(int, l)) for l in labels]


@pytest.fixture(scope="session")
def score(nets, digits):
    def run(video, prompts=None, **kw):
        return E.evaluate(video, prompts, nets=nets, digits=digits, num_real=N, **kw)
    return run


@pytest.fixture(scope="session")
def real_scores(real, score):
    return score(*real)


def test_small_nets_heldout_accuracy(nets):
    info = nets[2]
    assert info["digit_net_acc"] > 0.85 and info["digit_net_acc_one_digit"] > 0.9, info
    assert info["clip_net_motion_acc"] > 0.9, info


@pytest.mark.slow
def test_full_digit_net_accuracy(digits):
    """The default nets (cached in VIDEOAR_EVAL_CACHE / ~/.cache/videoar/eval after the first run)."""
    info = E.load_nets(E.EvalNetConfig(), digits=digits)[2]
    assert info["digit_net_acc"] >= 0.98, info


def test_training_and_evaluation_are_deterministic(digits, tmp_path, real):
    tiny = E.EvalNetConfig(width=8, steps=20, batch=16, clip_width=4, clip_steps=20, clip_batch=8, seed=3)
    a = E.load_nets(tiny, tmp_path / "a", digits=digits)
    b = E.load_nets(tiny, tmp_path / "b", digits=digits)
    for net_a, net_b in zip(a[:2], b[:2]):
        for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            assert torch.equal(va, vb), k
    video = real[0][:16]
    timeless = lambda r: {k: v for k, v in r.items() if not k.endswith("_train_s")}   # wall-clock seconds differ
    assert timeless(E.evaluate(video, nets=a, digits=digits, num_real=16)) == \
        timeless(E.evaluate(video, nets=b, digits=digits, num_real=16))


def test_real_heldout_clips_score_well(real_scores, score, real):
    shuffled = score(real[0][:, np.random.default_rng(0).permutation(T)], real[1])
    assert real_scores["semantic"] > 0.75 and real_scores["consistency"] > 0.75, real_scores
    assert real_scores["motion"] > 0.85, real_scores
    assert real_scores["fvd_mm"] < 0.5 * shuffled["fvd_mm"], (real_scores, shuffled)


def test_shuffled_frames_lose_motion_and_fvd(real_scores, score, real):
    rng = np.random.default_rng(1)
    video = np.stack([clip[rng.permutation(T)] for clip in real[0]])       # each clip in its own random order
    s = score(video, real[1])
    assert s["motion"] < real_scores["motion"] - 0.3, (s, real_scores)
    assert s["fvd_mm"] > 2 * real_scores["fvd_mm"] + 1e-3, (s, real_scores)
    assert s["semantic"] > real_scores["semantic"] - 0.05                 # the frames themselves are still real


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_noise_and_blank_clips_score_near_zero(kind, real, score, real_scores):
    shape = real[0].shape
    video = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if kind == "noise" else np.zeros(shape, np.uint8)
    s = score(video, real[1])
    assert s["semantic"] < 0.05 and s["consistency"] < 0.05, s
    assert s["fid_mm"] > 10 * real_scores["fid_mm"] and s["motion"] < 0.5, s


def test_digits_changing_halfway_lose_consistency(real, score, real_scores):
    video, prompts = real
    # each clip's second half comes from the next clip that shares none of its digits
    swapped = np.array([next(j for j in [*range(i + 1, N), *range(i)] if not set(prompts[i]) & set(prompts[j]))
                        for i in range(N)])
    changed = np.concatenate([video[:, :T // 2], video[swapped, T // 2:]], 1)   # second half: other digits
    assert all(not set(prompts[i]) & set(prompts[j]) for i, j in enumerate(swapped))
    s = score(changed)
    assert s["consistency"] < real_scores["consistency"] - 0.3, (s, real_scores)


def test_prompt_naming_other_digits_loses_semantic(real, score, real_scores):
    wrong = [[(d + 1) % 10 for d in p] for p in real[1]]
    assert score(real[0], wrong)["semantic"] < 0.1 < real_scores["semantic"] - 0.5


def test_prediction_metrics():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (4, 5, 64, 64), dtype=np.uint8)
    same = E.prediction_metrics(target, target)
    assert same["mse"] == 0 and same["mae"] == 0 and same["psnr"] == 100 and same["ssim"] == pytest.approx(1, abs=1e-5)
    # 3 samples per context (clip n*3 + s), each a noisier copy of the target
    noisy = [np.clip(target + rng.normal(0, sd, target.shape), 0, 255).astype(np.uint8) for sd in (5, 20, 60)]
    videos = np.stack(noisy, 1).reshape(12, 5, 64, 64)
    m = E.prediction_metrics(videos, target)
    assert m["samples"] == 3
    assert m["mse_best"] < m["mse"] and m["mae_best"] < m["mae"]
    assert m["ssim_best"] > m["ssim"] and m["psnr_best"] > m["psnr"]
    one = E.prediction_metrics(noisy[0], target)                          # best sample = the least noisy copy
    assert m["mse_best"] == pytest.approx(one["mse"]) and m["ssim_best"] == pytest.approx(one["ssim"])
    err = (noisy[2] / 255.0 - target / 255.0) ** 2
    assert E.prediction_metrics(noisy[2], target)["mse"] == pytest.approx(err.sum((2, 3)).mean(), rel=1e-4)
    with pytest.raises(ValueError):
        E.prediction_metrics(videos[:10], target)


def test_frechet_distance_closed_form():
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))
    assert E.frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert E.frechet_distance(x, x + 1) == pytest.approx(8, rel=1e-6)        # |mean shift|^2, same covariance
    assert E.frechet_distance(x, 2 * x) == pytest.approx(8, rel=0.1)         # tr(S + 4S - 2*2S) = tr(S) ~ 8


def test_i3d_shapes_and_checkpoint_layout():
    net = E.I3D().eval()
    keys = net.state_dict().keys()
    assert {"Conv3d_1a_7x7.conv3d.weight", "Mixed_3b.b1b.bn.running_mean", "Mixed_5c.b3b.conv3d.weight",
            "logits.conv3d.bias"} <= set(keys)
    assert sum(k.startswith("Mixed_") and k.endswith("b0.conv3d.weight") for k in keys) == 9
    video = np.random.default_rng(0).integers(0, 256, (1, 10, 64, 64), dtype=np.uint8)
    x = E.i3d_input(video)
    assert x.shape == (1, 3, 10, 224, 224) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        assert net(x).shape == (1, 400) and net.features(x).shape == (1, 1024)


def test_cli_refuses_unknown_flags():
    r = subprocess.run([sys.executable, "eval.py", "--videos", "x.npy", "--bogus", "1"], cwd=REPO, capture_output=True)
    assert r.returncode == 2 and b"unrecognized arguments" in r.stderr
    assert b"--num-real" in subprocess.run([sys.executable, "eval.py", "--help"], cwd=REPO, capture_output=True).stdout


def test_standard_errors_count_clips_not_frames():
    """semantic_se / consistency_se: std of the clip means / sqrt(N). Half the clips all right and half all wrong
    is a coin per clip (se 0.5/sqrt(N) with the unbiased std), however many frames; identical clips give 0."""
    n, t = 16, 13
    present = torch.zeros(n, t, 10, dtype=torch.bool)
    present[:, :, 3] = True
    prompts = [[3]] * (n // 2) + [[5]] * (n // 2)           # the second half asks for a digit it does not get
    s = E.digit_scores(present, prompts)
    assert s["semantic"] == 0.5 and s["consistency"] == 1.0 and s["consistency_se"] == 0.0
    assert s["semantic_se"] == pytest.approx(np.std([1.0] * 8 + [0.0] * 8, ddof=1) / n ** 0.5)
    flicker = present.clone()
    flicker[:, 1::2, 3] = False                              # every other frame empty, in every clip alike
    s = E.digit_scores(flicker, [[3]] * n)
    assert s["semantic"] == pytest.approx(7 / 13) and s["semantic_se"] == pytest.approx(0.0, abs=1e-7)
    assert s["semantic_first"] == 1.0
    flicker[: n // 4, 0, 3] = False                         # a quarter of the clips start blank
    assert E.digit_scores(flicker, [[3]] * n)["semantic_first"] == 0.75
