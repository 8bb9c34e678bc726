"""The README's commands run as written (issue 19): every `python X.py ...` line of its bash blocks, in order, in a
scratch directory, through X.main in this process. The tiny preset stands in for the long runs (`--config toy`
becomes `--config tiny --out runs/toy`, `--config small` likewise, with the toy's digits and speed, so later
commands find the run where the README says it is) and eval.py gets small feature nets; pip and pytest lines are
not run."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import eval as E
from config import PRESETS, Config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands():
    """argv lists of the README's `python X.py` lines (comments dropped), in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["python"] and words[1].endswith(".py"):
                commands.append(words[1:])
    return commands


def tiny(argv):
    """The README's argv with the tiny preset in place of the toy and small ones (`--out runs/<preset>`), on the toy's
    data (its digits and speed)."""
    toy = Config(**PRESETS["toy"])

    def preset(name):
        return ["tiny", "--out", f"runs/{name}", "--num-digits", str(toy.num_digits), "--speed", str(toy.speed)]
    out = []
    for word in argv:
        out += preset(word) if word in ("toy", "small") and out[-1:] == ["--config"] else [word]
    if argv[0] == "train.py" and "--config" not in argv:
        out += ["--config"] + preset("toy")
    return out


def test_readme_lists_the_quickstart_and_the_commands_to_look_at_it():
    scripts = [c[0] for c in readme_commands()]
    assert scripts[0] == "train.py" and {"sample.py", "eval.py", "data.py"} <= set(scripts)


def test_every_readme_command_runs(tmp_path, monkeypatch, digits):
    small = E.load_nets(E.EvalNetConfig(width=8, steps=20, batch=16, clip_width=4, clip_steps=20, clip_batch=8),
                        tmp_path / "nets", digits=digits)
    monkeypatch.setattr(E, "load_nets", lambda *a, **kw: small)
    monkeypatch.chdir(tmp_path)
    for argv in readme_commands():
        argv = tiny(argv)
        module = importlib.import_module(argv[0][:-3])
        try:
            module.main(argv[1:])
        except SystemExit as e:   # a script's clean error: fail with its command line
            pytest.fail(f"`python {' '.join(argv)}` exited with {e.code}")
