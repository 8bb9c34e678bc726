"""Data parallel training (issue 18): `torchrun --nproc_per_node 2` on CPU processes (gloo) trains the teacher of the
tiny preset, stopped half way and resumed, and must (a) keep the two ranks' weights identical and (b) end where one
process ends with the same global batch (--grad-accum 2: the same four micro-batches per step). Each process keeps
its final weights in rank<r>.pt through a wrapper of train.train_flow (DRIVER)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
DRIVER = """import os, sys
from pathlib import Path
import torch
sys.path.insert(0, {repo!r})
import train
flow = train.train_flow
def keep(*a, **k):   # each rank's weights at the end of the stage
    model = flow(*a, **k)
    torch.save(model.state_dict(), Path(a[3]) / f"rank{{os.environ.get('RANK', 'single')}}.pt")
    return model
train.train_flow = keep
torch.set_num_threads(1)
train.main(sys.argv[1:])
"""
ARGS = ["--config", "tiny", "--device", "cpu", "--stage", "teacher", "--fm-steps", "4", "--fm-batch", "4"]


def run(driver, out, *extra, ranks=0):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                                   if ranks else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(launcher + [str(driver)] + ARGS + ["--out", str(out), *extra], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    base = tmp_path / "base"
    train.main(["--config", "tiny", "--device", "cpu", "--stage", "tokenizer", "--tok-steps", "3", "--out", str(base)])
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    runs = {}
    for name in ("ddp", "single"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        shutil.copy(base / "tokenizer.pt", runs[name])
    run(driver, runs["single"], "--grad-accum", "2")
    run(driver, runs["ddp"], "--stop-after", "2", ranks=2)       # stop half way ...
    assert not (runs["ddp"] / "rank0.pt").exists()
    run(driver, runs["ddp"], ranks=2)                             # ... and resume
    w0, w1 = (torch.load(runs["ddp"] / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(runs["single"] / "ranksingle.pt")
    saved = torch.load(runs["ddp"] / "teacher.pt", weights_only=False)
    assert saved["step"] == 4
    assert single["head.weight"].abs().max() > 1e-4               # trained: the head starts at zero
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k}: the ranks' weights differ"                    # (a)
        assert torch.allclose(w0[k], single[k], atol=2e-5, rtol=1e-4), \
            f"{k}: two ranks and one process differ by {(w0[k] - single[k]).abs().max():.2e}"  # (b)
        assert torch.equal(w0[k], saved["model"][k])              # rank 0 wrote its weights
    losses = [l for l in (runs["ddp"] / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 4                                       # rank 0 alone logs, once per step


def test_batches_must_split_over_ranks_and_accumulation(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(ARGS + ["--grad-accum", "3", "--out", "unused"])
    assert e.value.code == 2 and "--fm-batch 4: allowed a multiple of ranks x --grad-accum (3)" in capsys.readouterr().err
