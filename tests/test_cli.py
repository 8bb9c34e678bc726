"""End to end through the command lines, on the tiny preset: train every stage, sample with every method (clips
and their prompts file), and build each of experiments.py's tables (with small eval nets)."""
import json
import shutil

import numpy as np
import pytest

import checkpoint
import eval as E
import experiments
import sample
import train


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the session's tiny quickstart run: this module adds the dmd stage and experiments.py's tables."""
    out = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(tiny_run, out)
    return out


@pytest.fixture(scope="module")
def dmd_run(run):
    """The quickstart's run, then the dmd stage on its own command (it is not part of --stage all)."""
    train.main(["--config", "tiny", "--stage", "dmd", "--device", "cpu", "--out", str(run)])
    return run


@pytest.fixture(scope="module")
def small_nets(digits, tmp_path_factory):
    cfg = E.EvalNetConfig(width=8, steps=20, batch=16, clip_width=4, clip_steps=20, clip_batch=8)
    return E.load_nets(cfg, tmp_path_factory.mktemp("nets"), digits=digits)


def test_quickstart_writes_every_stage_and_a_sample_gif(run):
    for f in ("tokenizer.pt", "ar.pt", "teacher.pt", "causal.pt", "tokenizer.gif", "sample_ar.gif", "sample_ar.txt",
              "sample_teacher.gif", "sample_causal.gif", "sample_causal.txt"):
        assert (run / f).exists(), f
    assert not (run / "dmd.pt").exists()


def test_dmd_stage_writes_its_checkpoint_log_and_sample_gif(dmd_run):
    rows = [json.loads(line) for line in (dmd_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "dmd"] == [1, 2, 3, 4]       # tiny: 4 generator updates
    for f in ("dmd.pt", "sample_dmd.gif", "sample_dmd.txt"):
        assert (dmd_run / f).exists(), f
    import torch
    state = torch.load(dmd_run / "dmd.pt", weights_only=False)
    student = torch.load(dmd_run / "causal.pt", weights_only=False)["model"]
    model = checkpoint.load_flow(dmd_run, "dmd")[0]         # what sample.py --method dmd streams: the generator's average
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, state["model"][k]) for k, v in state["ema"].items())
    assert any(not torch.equal(v, student[k]) for k, v in state["ema"].items())        # DMD moved it


@pytest.mark.parametrize("method", ["ar", "teacher", "student", "dmd"])
def test_sample_writes_clips_and_their_prompts(run, tmp_path, method, request):
    if method == "dmd":
        request.getfixturevalue("dmd_run")
    npy = tmp_path / f"{method}.npy"
    sample.main(["--ckpt", str(run), "--method", method, "--num", "3", "--prompt", "3 7", "--npy", str(npy),
                 "--gif", str(tmp_path / f"{method}.gif"), "--device", "cpu"] + (["--steps", "2"] if method != "ar" else []))
    video = np.load(npy)
    assert video.shape == (3, 9, 64, 64) and video.dtype == np.uint8
    assert E.read_prompts(npy.with_suffix(".txt")) == [[3, 7]] * 3
    assert (tmp_path / f"{method}.gif").stat().st_size > 0


@pytest.mark.parametrize("method, field, flag, value, other", [("teacher", "teacher_cfg", "--cfg", 4.5, "6"),
                                                              ("ar", "ar_temperature", "--temperature", 0.3, "1")])
def test_sampler_defaults_are_the_runs_own(run, tmp_path, method, field, flag, value, other):
    """sample.py without --cfg (teacher) or --temperature (ar) samples at the run's --teacher-cfg / --ar-temperature
    (read from the checkpoint's config), not at Config's default."""
    import torch
    for f in ("tokenizer.pt", f"{method}.pt"):         # the checkpoints are named after the method here
        shutil.copy(run / f, tmp_path)
    state = torch.load(tmp_path / f"{method}.pt", weights_only=False)
    state["config"][field] = value                        # not Config's default: the run's own value is used
    torch.save(state, tmp_path / f"{method}.pt")

    def clips(*flags):
        npy = tmp_path / f"{len(list(tmp_path.glob('*.npy')))}.npy"
        steps = ["--steps", "2"] if method == "teacher" else []
        sample.main(["--ckpt", str(tmp_path), "--method", method, "--num", "2", *steps, "--npy", str(npy),
                     "--device", "cpu", *flags])
        return np.load(npy)
    default = clips()
    assert np.array_equal(default, clips(flag, str(value)))
    assert not np.array_equal(default, clips(flag, other))


@pytest.mark.parametrize("method, flag", [("ar", ["--steps", "4"]), ("teacher", ["--temperature", "0.5"]),
                                          ("dmd", ["--top-k", "3"]), ("ar", ["--context-len", "2"]),
                                          ("student", ["--window", "2"])])
def test_sample_refuses_a_flag_its_method_would_ignore(run, tmp_path, capsys, method, flag):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(run), "--method", method, "--npy", str(tmp_path / "x.npy"), "--device", "cpu"] + flag)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and flag[0] in err and "\n" not in err and not (tmp_path / "x.npy").exists(), err


def test_sample_follows_the_generators_digit_count(run, tmp_path):
    """An ar model trained on one-digit clips beside a tokenizer trained on two: sample.py draws one-digit prompts
    (the generator's config, not the tokenizer's) and refuses a two-digit --prompt with a clear error."""
    shutil.copy(run / "tokenizer.pt", tmp_path)
    train.main(["--config", "tiny", "--stage", "ar", "--ar-steps", "2", "--num-digits", "1", "--device", "cpu",
                "--out", str(tmp_path)])
    npy = tmp_path / "one.npy"
    sample.main(["--ckpt", str(tmp_path), "--method", "ar", "--num", "2", "--npy", str(npy), "--device", "cpu"])
    assert all(len(p) == 1 for p in E.read_prompts(npy.with_suffix(".txt")))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path), "--method", "ar", "--prompt", "3 7", "--npy", str(npy), "--device", "cpu"])
    assert e.value.code == 2


@pytest.mark.parametrize("what", ["units", "ar", "stream", "suite", "scales", "codes", "prompt", "positions"])
def test_experiment_tables(run, small_nets, monkeypatch, capsys, what):
    monkeypatch.setattr(experiments.E, "load_nets", lambda **kw: small_nets)
    experiments.main([what, "--base", str(run), "--num", "4", "--long", "25", "--steps", "4", "--pool", "256",
                     "--device", "cpu"])
    rows = json.loads((run / f"{what}.json").read_text())
    printed = capsys.readouterr().out
    expected = {"units": 7, "ar": 4, "stream": 6, "suite": 6, "scales": 5, "codes": 4, "prompt": 4,
                "positions": 4}[what]   # units: teacher + 6 students; stream: cost + 5
    assert len(rows) == expected, rows
    assert printed.count("\n|") >= expected - (what == "stream"), printed


def test_stream_table_of_the_dmd_generator(dmd_run, small_nets, monkeypatch, capsys):
    monkeypatch.setattr(experiments.E, "load_nets", lambda **kw: small_nets)
    loaded, streamed = [], []
    load_flow, generate = experiments.checkpoint.load_flow, experiments.bench.generate_student
    monkeypatch.setattr(experiments.checkpoint, "load_flow", lambda base, stage, *a: (loaded.append(stage),
                                                                                      load_flow(base, stage, *a))[1])
    monkeypatch.setattr(experiments.bench, "generate_student", lambda *a, **kw: (streamed.append(a[9:11]),
                                                                                  generate(*a, **kw))[1])
    experiments.main(["stream", "--base", str(dmd_run), "--generator", "dmd", "--unit-steps", "1", "--num", "2",
                      "--long", "25", "--device", "cpu"])
    rows = json.loads((dmd_run / "stream.json").read_text())
    assert loaded == ["dmd"] and streamed == [(1, 1.0)] * 2, (loaded, streamed)   # 1 step per unit, no CFG; the
    # second stream: the fresh one bench.paired_clock times beside the first
    assert rows["cost"]["generator"] == "dmd, 1 steps per unit, CFG 1" and len(rows) == 6, rows


def test_bench_prints_a_row_per_method(capsys):
    import bench
    bench.main(["--config", "tiny", "--num", "1", "--device", "cpu", "--long", "13", "--min-seconds", "0"])
    out = capsys.readouterr().out
    for name in ("tokenizer encode + decode", "tokenizer encode + quantize", "tokenizer decode", "sample ar",
                 "sample teacher 25", "sample teacher 50", "sample student", "sample dmd", "train tokenizer", "train ar",
                 "train teacher", "train causal", "long video"):
        assert name in out, (name, out)


def test_timed_reports_the_median_call_over_at_least_min_seconds():
    import time
    import bench
    calls = []

    def fn():    # two warm-up calls (the second counts flops), then 9 ms per call with one slow outlier
        calls.append(1)
        time.sleep(0.05 if len(calls) == 4 else 0.009)
    sec, _ = bench.timed(fn, "cpu", reps=2, min_seconds=0.1)
    assert 6 <= len(calls) - 2 <= 7                      # 0.05 + 5 or 6 x 0.009 s: past min_seconds, not reps=2
    assert sec == pytest.approx(0.009, abs=0.004)         # the median (the mean would be ~0.015)


@pytest.mark.parametrize("slower_end", [0.0, 0.5])
def test_paired_clock_times_a_fresh_stream_beside_the_old_ones_end(slower_end):
    """bench.paired_clock: the old stream runs alone to its last 2w units, then it and a fresh stream take turns unit
    by unit; the fresh stream's units w+1..2w (not its warm-up) are compared with the old one's last w."""
    import time
    from types import SimpleNamespace
    import bench
    units, w, log = 40, 4, []
    ms = [8.0] * 2 + [2.0] * 34 + [2.0 * (1 + slower_end)] * 4          # a slow warm-up, then a steady state

    def stream(on_unit, progress):
        for i, m in enumerate(ms):
            time.sleep(m / 1e3)
            log.append(i)
            on_unit(i, SimpleNamespace(nbytes=lambda: 2 ** 20 * min(i, 5)))
        return "video"
    out, c = bench.paired_clock(stream, units)
    assert out == "video" and log == list(range(32)) + [k for j in range(8) for k in (j, 32 + j)]
    assert c["early units"] == "5-8" and c["last units"] == "37-40" and c["KV MB early"] == c["KV MB last"] == 5
    assert c["change"] == pytest.approx(slower_end, abs=0.15) and c["ms early"] == pytest.approx(2.0, abs=0.3)


def test_paired_clock_passes_on_a_streams_error():
    """An error in either thread reaches the caller (and neither thread is left waiting for its turn)."""
    from types import SimpleNamespace
    import bench

    def stream(on_unit, progress):
        for i in range(40):
            if i == 35:
                raise RuntimeError("unit 35")
            on_unit(i, SimpleNamespace(nbytes=lambda: 0))
    with pytest.raises(RuntimeError, match="unit 35"):
        bench.paired_clock(stream, 40)
