"""A run's checkpoints: writing them, and building the tokenizer and generators back from them.

A run directory (train.py --out, sample.py --ckpt, experiments.py --base) holds one checkpoint per stage, <stage>.pt, each
with the Config it was trained under. A generator's checkpoint also records the fingerprint of the tokenizer it
was trained on (`tokenizer_id`): codes or latents of one tokenizer mean nothing to another, so a generator is
refused beside another tokenizer (`check_tokenizer`). train.py writes and resumes these files; sample.py and
experiments.py read them, all through this module.
"""
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch

from config import CheckError, Config
from model import Transformer
from tokenizer import LatentStats, Tokenizer


def save_checkpoint(path, **state):
    """Write atomically: a crash or a full disk mid-save leaves the previous checkpoint intact (and a failed write
    leaves no partial file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        torch.save(state, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_checkpoint(path, expect_config=None, keys=()):
    """Load a checkpoint; with expect_config, refuse one written under different config fields `keys`."""
    path = Path(path)
    if not path.exists():
        raise CheckError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                         f"delete it or point --out elsewhere") from e
    if not isinstance(state, dict) or "config" not in state:
        raise CheckError(f"{path} is not a checkpoint of this project (no config inside)")
    if expect_config is not None:
        saved = {**vars(Config()), **state["config"]}   # a field newer than the checkpoint: its default
        diff = {k: (saved.get(k), getattr(expect_config, k)) for k in keys
                if saved.get(k) != getattr(expect_config, k)}
        if diff:
            raise CheckError(f"{path} was written with a different config: "
                             + ", ".join(f"--{k.replace('_', '-')} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                             + ". Use the same flags, or another --out.")
    return state


# ------------------------------------------------------------------------------------ tokenizer fingerprints
def tokenizer_id(tok):
    """Fingerprint of a tokenizer's weights. Generator checkpoints record the one they were trained on: a model
    trained on one tokenizer's codes or latents means nothing on another's, even under the same config."""
    h = hashlib.sha1()
    for p in tok.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_tokenizer(state, tok, path):
    """Refuse a generator checkpoint written against another tokenizer (e.g. the tokenizer was retrained since)."""
    saved = state.get("tokenizer_id")   # None: written before fingerprints existed
    if tok is not None and saved is not None and saved != tokenizer_id(tok):
        raise CheckError(f"{path} was trained on another tokenizer than the one beside it (retrained since?); "
                         f"its codes / latents no longer match. Delete {path} to retrain it, or use another --out.")


# ------------------------------------------------------------------------------------- models of a run
def trained_weights(state):
    """The weights a stage ships: the moving average of its weights (train.EMA: --tok-ema, --gen-ema, --dmd-ema)
    when its checkpoint holds one, else the raw weights. Sampling, evaluation and the later stages (the student
    starts from the teacher, DMD from the student and the teacher) all take these."""
    return state.get("ema", state["model"])


def build_tokenizer(cfg):
    return Tokenizer(cfg.tokenizer_config(), cfg.frame_grid())


def build_ar(cfg, vocab):
    """Paper A's transformer: tokens carry 2c features, [next-scale input || previous frame] (model.ar_sequence)."""
    levels = len(cfg.tokenizer_config().scale_schedule(cfg.frame_grid(cfg.down)))
    return Transformer(replace(cfg.model_config(vocab=vocab), in_channels=2 * cfg.z_channels, levels=levels))


def load_tokenizer(ckpt_dir, device="cpu"):
    """Load a trained tokenizer from --ckpt DIR, with the config it was trained under."""
    state = load_checkpoint(Path(ckpt_dir) / "tokenizer.pt")
    cfg = Config(**state["config"])
    tok = build_tokenizer(cfg)
    tok.load_state_dict(trained_weights(state))
    return tok.to(device).eval(), cfg


def load_ar(ckpt_dir, device="cpu", tok=None):
    """The paper A model of a run, with its config; given `tok`, refuse it if trained on another tokenizer."""
    path = Path(ckpt_dir) / "ar.pt"
    state = load_checkpoint(path)
    check_tokenizer(state, tok, path)
    cfg = Config(**state["config"])
    model = build_ar(cfg, cfg.vocab)
    model.load_state_dict(trained_weights(state))
    return model.to(device).eval(), cfg


def load_flow(ckpt_dir, stage, device="cpu", tok=None):
    """The teacher, the causal student or the DMD generator of a run, with its config and LatentStats (given `tok`,
    refused if trained on another tokenizer)."""
    path = Path(ckpt_dir) / f"{stage}.pt"
    state = load_checkpoint(path)
    check_tokenizer(state, tok, path)
    cfg = Config(**state["config"])
    return flow_model(state, cfg.model_config(), device), cfg, LatentStats.from_state(state["z_stats"])


def flow_model(state, model_cfg, device="cpu"):
    """A trained flow model (teacher, causal student or DMD generator) built from its checkpoint's state: the
    weights it ships (trained_weights), on `device`, in eval mode."""
    model = Transformer(model_cfg)
    model.load_state_dict(trained_weights(state))
    return model.to(device).eval()
