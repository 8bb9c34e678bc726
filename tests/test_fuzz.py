"""Issue 20's fuzz test: for every script and every flag, values people mistype (0, negative, NaN, inf, huge, the
wrong type, an empty string, a path that cannot be read or written) and bad input files (float instead of uint8,
wrong rank, wrong size, empty, more prompts than clips). Each must end as a bad flag does -- exit status 2, one line
on stderr that names the flag or file, no traceback -- before any work starts (the functions that do the work are
replaced by a tripwire), and the files of an existing run must not change. The scripts run in-process through
main(argv); a few real subprocesses check the exit status as a shell sees it. `pytest -s` prints the figures."""
import hashlib
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import bench
import config
import data
import eval as E
import experiments
import sample
import train

REPO = Path(__file__).resolve().parents[1]
TALLY = {}   # script -> (pairs tried, clean errors)

# Config fields where 0 is a meaningful value (off, none, static digits); every other numeric field refuses 0
ZERO_OK = {"speed", "tok_beta", "tok_ema", "tok_coarse", "ec_strength", "frame_mask", "ordered_prompt", "cond_drop",
           "image_frac", "dmd_t_min", "dmd_cfg", "teacher_cfg", "dmd_ema", "gen_ema", "dim", "heads", "warmup",
           "weight_decay", "tok_weight_decay", "ar_soft", "image_mix",
           "canvas_w"}   # dim, heads 0: derived from --depth (the size dial); canvas_w 0: square frames
SHARES = {"tok_ema", "ec_strength", "frame_mask", "cond_drop", "image_frac", "dmd_t_min", "dmd_t_max", "dmd_ema",
          "gen_ema"}
STRINGS = {   # bad values of the string fields (the tiny preset: 64x64, down 8, fm_patch 2 -> 3x4x4 flow tokens)
    "unit": ["", "abc", "0"], "cube": ["", "abc", "0,2,2", "-1,2,2", "1,2", "3,3,3", "1,2,2,2"],
    "scales": ["abc", "0,8", "1,2,4", "8,4,2,1", "1,2,4,8,16", ","], "fm_norm": ["", "abc"], "fm_time": ["", "abc"],
    "dmd_fake": ["", "abc"], "causal_data": ["", "abc"], "betas": ["", "abc", "0.9", "0.9,1", "0.9,-0.1", "0.9,0.95,0.99", "nan,0.9"],
}
CROSS = {"frames": ["10"], "canvas_w": ["100", "20"],
         "tok_frames": ["6"], "size": ["100"], "dim": ["31"], "heads": ["3"], "ft": ["3"],
         "head_dim": ["7"],
         "fm_patch": ["3"], "dmd_t_min": ["0.99"], "down": ["3"], "patch": ["3"], "ordered_prompt": ["2"]}


def config_pairs(tmp):
    """(flag, bad value) for every Config field."""
    pairs = []
    for f in fields(config.Config):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "data_dir":
            values = [str(tmp / "a_file")]
        elif isinstance(f.default, str):
            values = STRINGS[f.name]
        else:
            values = ["-1", "nan", "inf", "-inf", "1e30" if isinstance(f.default, float) else "1000000000000",
                      "abc", ""] + ([] if f.name in ZERO_OK else ["0"])
            values += ["2.5"] if isinstance(f.default, int) else []
            values += ["1.5"] if f.name in SHARES else []
        pairs += [(flag, v) for v in values + CROSS.get(f.name, [])]
    return pairs


class WorkStarted(Exception):
    """Raised by the tripwires: a bad value got past the checks and work began."""


def trip(*a, **k):
    raise WorkStarted


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run   # conftest.py: the session's tiny quickstart run; the fuzzing checks it stays unchanged


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """Good and bad input files, and paths that cannot be read or written."""
    d = tmp_path_factory.mktemp("files")
    clips, labels = data.moving_mnist(3, digits, "test", data.MovingMNISTConfig(frames=9), seed=0)
    np.save(d / "good.npy", clips)
    (d / "good.txt").write_text("".join(" ".join(map(str, l)) + "\n" for l in labels))
    (d / "a_file").write_text("not a directory\n")
    bad = {"float": clips.astype(np.float32), "int64": clips.astype(np.int64), "rank3": clips[0], "rank6": clips[None, ..., None],
           "size32": clips[:, :, :32, :32], "empty": clips[:0], "noframes": clips[:, :0], "channels2": np.stack([clips] * 2, -1),
           "frames8": clips[:, :8], "oneframe": clips[:, :1], "bool": clips > 0, "scalar": np.uint8(3)}
    for name, x in bad.items():
        np.save(d / f"{name}.npy", x)
    np.save(d / "object.npy", np.array([clips, None], dtype=object), allow_pickle=True)
    (d / "text.npy").write_text("hello\n")
    (d / "truncated.npy").write_bytes((d / "good.npy").read_bytes()[:500])
    prompts = {"more": "3 7\n" * 5, "fewer": "3 7\n", "letters": "a b\n" * 3, "big": "12 3\n" * 3,
               "negative": "-1 3\n" * 3, "emptyfile": "", "blankline": "3 7\n\n3 7\n"}
    for name, text in prompts.items():
        (d / f"{name}.txt").write_text(text)
    return d


def fuzz(name, main, base, pairs, capsys, tripwires, monkeypatch, watched=(), tally=None):
    """main(base + extra) for each (label, extra) in pairs -> the labels that did not end cleanly."""
    for obj, attr in tripwires:
        monkeypatch.setattr(obj, attr, trip)
    before = [tree_digest(w) for w in watched]
    bad = []
    for label, extra in pairs:
        capsys.readouterr()
        try:
            main(base + extra)
            outcome = "ran to the end"
        except SystemExit as e:
            err = capsys.readouterr().err.strip()
            named = label.split()[0] in err or any(a in err for a in extra if "/" in a)
            clean = e.code == 2 and err.startswith(f"{name}: error: ") and "\n" not in err and named
            outcome = None if clean else f"exit {e.code}: {err[-300:]!r}"
        except WorkStarted:
            outcome = "work started"
        except Exception as e:   # a traceback for the user
            outcome = f"{type(e).__name__}: {e}"
        if outcome:
            bad.append((label, outcome))
    assert [tree_digest(w) for w in watched] == before, "an existing run's or folder's files changed"
    TALLY[tally or name] = (len(pairs), len(pairs) - len(bad))
    return bad


def test_train_refuses_every_bad_flag_before_work(run, files, capsys, monkeypatch):
    base = ["--config", "tiny", "--device", "cpu", "--out", str(run)]
    pairs = [(f"{f} {v!r}", [f, v]) for f, v in config_pairs(files)]
    pairs += [(f"{f} {v!r}", [f, v]) for f, vs in {
        "--seed": ["-1", "abc", "", "nan", "4294967296", "1.5"], "--curve": ["-1", "abc", "1000000", ""],
        "--stop-after": ["-1", "abc", "", "1e12"], "--stage": ["abc", ""], "--config": ["abc", ""],
        "--precision": ["abc", ""], "--device": ["abc", "", "cuda:7", "cpu:x"],
        "--out": ["", str(files / "a_file"), str(files / "a_file" / "run")], "--no-such-flag": ["1"]}.items()
              for v in vs]
    pairs += [("--stage dmd --unit scale", ["--stage", "dmd", "--unit", "scale"]),   # later-only errors:
              ("--cube 1,4,4 (resume)", ["--cube", "1,4,4"]),                         # a resume under other flags
              ("--z-channels 8 (resume)", ["--z-channels", "8"])]
    bad = fuzz("train.py", train.main, base, pairs, capsys, [(train, "train_stages")], monkeypatch, [run])
    assert not bad, bad


def test_train_refuses_stages_without_a_tokenizer(tmp_path, capsys, monkeypatch):
    bad = fuzz("train.py", train.main, ["--config", "tiny", "--device", "cpu", "--out", str(tmp_path)],
               [(f"--stage {s}", ["--stage", s]) for s in ("ar", "teacher", "causal", "dmd")], capsys,
               [(train, "train_stages")], monkeypatch, tally="train.py (no tokenizer)")
    assert not bad and not any(tmp_path.iterdir()), bad


def test_sample_refuses_every_bad_flag_and_file_before_work(run, files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--ckpt", str(run), "--device", "cpu", "--npy", str(out / "x.npy")]
    flags = {"--steps": ["-3", "-1", "abc", "", "nan", "100000", "2.5"],
             "--context-len": ["-2", "abc", "", "1e9", "10000000"],
             "--num": ["0", "-1", "abc", "", "nan", "1000000000"], "--frames": ["-1", "10", "abc", "", "1000000"],
             "--cfg": ["-1", "nan", "inf", "abc", "", "1e30"], "--temperature": ["0", "-1", "nan", "inf", "abc", ""],
             "--top-k": ["-1", "abc", "", "100000000"], "--top-p": ["0", "-0.5", "1.5", "nan", "abc", ""],
             "--window": ["-2", "abc", "", "10000000"], "--seed": ["-1", "abc", "", "4294967296"],
             "--device": ["abc", "", "cuda:7"], "--method": ["abc", ""], "--cfg-schedule": ["abc", ""],
             "--precision": ["abc"], "--prompt": ["", "abc", "3 7 9", "3", "12 3", "-1 3", "3,7"],
             "--ckpt": ["", str(files / "nowhere"), str(files / "a_file"), str(files)],
             "--npy": ["", str(files / "a_file" / "x.npy"), str(out / "x.txt"), str(files)],
             "--gif": ["", str(files / "a_file" / "x.gif"), str(out / "x.npy")],
             "--mp4": ["", str(files / "a_file" / "x.mp4"), str(out / "x.gif")], "--no-such-flag": ["1"]}
    pairs = []
    for flag, values in flags.items():
        method = "teacher" if flag == "--steps" else "student" if flag == "--context-len" else "ar"
        pairs += [(f"{flag} {v!r}", ["--method", method, flag, v]) for v in values]
    pairs.append(("--method (none)", []))
    files_bad = ["float", "int64", "rank3", "rank6", "size32", "empty", "noframes", "channels2", "bool", "scalar",
                 "object", "text", "truncated", "nowhere"]
    pairs += [(f"--reconstruct {b}", ["--reconstruct", str(files / f"{b}.npy")]) for b in files_bad + ["frames8"]]
    pairs += [(f"--context {b}", ["--method", "student", "--context", str(files / f"{b}.npy"), "--context-frames", "5"])
              for b in files_bad + ["oneframe"]]
    pairs += [(f"--context-frames {v}", ["--method", "student", "--context", str(files / "good.npy"),
                                         "--context-frames", v]) for v in ("0", "-1", "2", "13", "abc", "", "99999")]
    pairs.append(("--context with --method teacher", ["--method", "teacher", "--context", str(files / "good.npy")]))
    tripwires = [(sample, n) for n in ("generate_ar", "generate_teacher", "generate_student", "reconstruct",
                                       "write_outputs")]
    bad = fuzz("sample.py", sample.main, base, pairs, capsys, tripwires, monkeypatch, [run, files])
    assert not bad and not out.exists(), bad


def test_eval_refuses_every_bad_flag_and_file_before_work(files, tmp_path, capsys, monkeypatch):
    good = str(files / "good.npy")
    base = ["--device", "cpu", "--cache", str(tmp_path / "cache")]
    pairs = [(f"--videos {b}", ["--videos", str(files / f"{b}.npy")])
             for b in ("float", "int64", "rank3", "rank6", "empty", "noframes", "channels2", "bool", "scalar", "object",
                       "text", "truncated", "nowhere")]
    pairs += [("--videos ''", ["--videos", ""])]
    pairs += [(f"--prompts {b}", ["--videos", good, "--prompts", str(files / f"{b}.txt")])
              for b in ("more", "fewer", "letters", "big", "negative", "emptyfile", "blankline", "nowhere")]
    pairs += [(f"--target {b}", ["--videos", good, "--target", str(files / f"{b}.npy")])
              for b in ("float", "size32", "empty", "frames8", "rank3", "text", "nowhere")]
    flags = {"--samples": ["0", "-1", "abc", "", "2", "nan"], "--num-real": ["0", "1", "-1", "abc", "", "1000000000"],
             "--seed": ["-1", "abc", "", "4294967296"], "--device": ["abc", "", "cuda:7"],
             "--json": ["", str(files / "a_file" / "x.json"), str(files)], "--cache": ["", str(files / "a_file")],
             "--i3d": ["", str(files / "nowhere.pt")], "--no-such-flag": ["1"]}
    pairs += [(f"{f} {v!r}", ["--videos", good, "--target", good, f, v] if f == "--samples" else ["--videos", good, f, v])
              for f, vs in flags.items() for v in vs]
    bad = fuzz("eval.py", E.main, base, pairs, capsys, [(E, "load_nets"), (E, "evaluate")], monkeypatch, [files])
    assert not bad and not (tmp_path / "cache").exists(), bad


def test_data_refuses_every_bad_flag_before_work(files, tmp_path, capsys, monkeypatch):
    base = ["--npy", str(tmp_path / "x.npy")]
    flags = {"--num": ["0", "-1", "abc", "", "nan", "1000000000"], "--frames": ["0", "-1", "abc", "", "1000000000"],
             "--num-digits": ["0", "-1", "abc", "", "11"], "--split": ["abc", ""], "--seed": ["-1", "abc", "", "4294967296"],
             "--npy": ["", str(files / "a_file" / "x.npy"), str(tmp_path / "x.txt"), str(files)],
             "--gif": ["", str(files / "a_file" / "x.gif"), str(tmp_path / "x.npy")],
             "--data-dir": ["", str(files / "a_file")], "--no-such-flag": ["1"]}
    pairs = [(f"{f} {v!r}", [f, v]) for f, vs in flags.items() for v in vs]
    bad = fuzz("data.py", data.main, base, pairs, capsys, [(data, "load_digits"), (data, "moving_mnist")],
               monkeypatch, [files])
    assert not bad and not any(tmp_path.iterdir()), bad


def test_bench_refuses_every_bad_flag_before_work(files, capsys, monkeypatch):
    pairs = [(f"{f} {v!r}", [f, v]) for f, v in config_pairs(files)]
    pairs += [(f"{f} {v!r}", [f, v]) for f, vs in {
        "--num": ["0", "-1", "abc", "", "1000000000"], "--long": ["-1", "4", "5", "abc", "", "1000000001"],
        "--seed": ["-1", "abc", ""], "--device": ["abc", "", "cuda:7"]}.items() for v in vs]
    bad = fuzz("bench.py", bench.main, ["--config", "tiny", "--device", "cpu"], pairs, capsys,
               [(bench, "Tokenizer")], monkeypatch)
    assert not bad, bad


def test_experiments_refuses_every_bad_flag_before_work(run, files, tmp_path, capsys, monkeypatch):
    """Each table on the base run, with a bad value of one flag (the flags a table reads: --long for stream, --steps
    and --pool for positions), or a --base that is not a run or lacks the checkpoint the table needs."""
    partial = tmp_path / "tokenizer_only"     # a run with a tokenizer alone: no teacher for units, no ar, no causal
    partial.mkdir()
    (partial / "tokenizer.pt").symlink_to(run / "tokenizer.pt")
    table = {"--long": "stream", "--generator": "stream", "--unit-steps": "stream", "--steps": "positions",
             "--pool": "positions"}
    flags = {"--num": ["0", "-1", "abc", "", "nan", "1000000"],
             "--long": ["0", "-1", "1", "5", "10", "abc", "", "nan", "1000001"],   # tiny: ft 4, a trained clip of 9
             "--steps": ["0", "-1", "abc", "", "1e9", "100000000"], "--pool": ["0", "-1", "abc", "", "100000000"],
             "--generator": ["abc", "", "teacher"], "--unit-steps": ["-1", "abc", "", "nan", "1001"],
             "--seed": ["-1", "abc", "", "4294967296"], "--device": ["abc", "", "cuda:7"], "--precision": ["abc", ""],
             "--base": ["", str(files / "nowhere"), str(files / "a_file"), str(files)], "--no-such-flag": ["1"]}
    pairs = [(f"{f} {v!r}", [table.get(f, "units"), f, v]) for f, vs in flags.items() for v in vs]
    pairs += [(f"what {v!r}", [v]) for v in ("abc", "")] + [("what (none)", [])]
    pairs += [(f"{what} --base {partial.name}", [what, "--base", str(partial)]) for what in ("units", "ar", "stream")]
    pairs += [("dmd.pt missing: stream --generator dmd", ["stream", "--generator", "dmd"])]
    tripwires = [(E, "load_nets"), (E, "evaluate")]
    bad = fuzz("experiments.py", experiments.main, ["--base", str(run), "--device", "cpu"], pairs, capsys, tripwires,
               monkeypatch, [run, files])
    assert not bad, bad


@pytest.mark.parametrize("argv, unwritten", [
    (["train.py", "--config", "toy", "--tok-steps", "-5", "--out", "{tmp}/run"], "run"),
    (["sample.py", "--ckpt", "{run}", "--method", "ar", "--num", "0", "--npy", "{tmp}/x.npy"], "x.npy"),
    (["sample.py", "--ckpt", "{run}", "--method", "teacher", "--steps", "-3", "--npy", "{tmp}/x.npy"], "x.npy"),
    (["eval.py", "--videos", "{files}/float.npy", "--json", "{tmp}/r.json", "--cache", "{tmp}/cache"], "cache"),
    (["experiments.py", "units", "--base", "{run}", "--num", "0"], "{run}/units.json"),
    (["experiments.py", "stream", "--base", "{tmp}/missing"], "stream.json"),
    (["experiments.py", "suite", "--base", "{tmp}"], "suite.json"),                 # a folder without a run
])
def test_the_shell_sees_exit_status_2_and_one_line(run, files, tmp_path, argv, unwritten):
    """The issue's reports, as a user runs them: exit status 2, one line on stderr, nothing written."""
    argv = [a.format(tmp=tmp_path, run=run, files=files) for a in argv]
    r = subprocess.run([sys.executable] + argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / unwritten.format(tmp=tmp_path, run=run, files=files)).exists()   # absolute: as given


def test_figures():
    """The pairs tried and the clean errors, per script (pytest -s shows them; the target is all)."""
    for name, (tried, clean) in TALLY.items():
        print(f"[fuzz] {name}: {clean}/{tried} (flag or file, bad value) pairs give a clean error")
    tried, clean = (sum(v[i] for v in TALLY.values()) for i in (0, 1))
    print(f"[fuzz] all scripts: {clean}/{tried}")
    assert tried == clean
