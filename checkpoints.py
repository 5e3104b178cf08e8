"""
checkpoints: a model saved with what made it, and read back checked.

A checkpoint is nanoGPT's dict plus its kind and vocabulary: {kind, model, model_args, vocab,
config, ...} (`make_checkpoint`). `load_checkpoint` refuses what the caller did not ask for (another
kind, another tokenizer, weights that are not finite numbers); `model_from_checkpoint` rebuilds the
GPT; `check_resume` refuses a resume that would train something else. Written atomically by
files.save_checkpoint.
"""

import os
from dataclasses import asdict

import torch

from files import BadInput, check_input_file, is_int
from tokenizer import vocab_fingerprint
from model import GPT, GPTConfig


def load_checkpoint(path, kind=None, enc=None, map_location="cpu"):
    """Read a checkpoint safely (weights_only=True) and check that it is what the caller expects.

    kind: 'policy' or 'prm' (which script made it); enc: the tokenizer it must match.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    check_input_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise BadInput(f"{path}: not a readable rfprm checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_args"), dict):
        raise BadInput(f"{path}: not an rfprm checkpoint (no 'model' and 'model_args')")
    bad = [k for k, v in ckpt["model"].items() if not torch.is_tensor(v) or not torch.isfinite(v).all()]
    if bad:   # NaN weights score NaN and train NaN: say so here, not in a table of nan
        raise BadInput(f"{path}: {len(bad)} of {len(ckpt['model'])} weight tensors are not finite numbers, e.g. {bad[0]}")
    ckpt["path"] = path   # for the messages of model_from_checkpoint and load_prm
    if kind is not None and ckpt.get("kind") != kind:
        raise BadInput(f"{path}: is a '{ckpt.get('kind')}' checkpoint, expected a '{kind}' checkpoint")
    if enc is not None and ckpt.get("vocab") != vocab_fingerprint(enc):
        raise BadInput(f"{path}: made with vocabulary {ckpt.get('vocab')}, but the tokenizer "
                       f"loaded now is {vocab_fingerprint(enc)}; re-run the stage that made it")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild a GPT from a checkpoint dict; a state dict of another shape is refused clearly."""
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
        state = {k.removeprefix("gpt."): v for k, v in state.items() if not k.startswith("head.")}
        model.load_state_dict(state)
    except WRONG_SHAPE as e:
        raise wrong_shape(ckpt, e) from e
    return model.to(device)


# what building a model from model_args, or loading weights into it, raises when they disagree
WRONG_SHAPE = (RuntimeError, TypeError, AttributeError, ValueError, KeyError, AssertionError)


def wrong_shape(ckpt, e):
    """The BadInput of a checkpoint whose weights do not fit its model_args: the file, the shape and
    the start of torch's message (which lists the mismatched tensors)."""
    detail = " ".join(str(e).split())[:300] or type(e).__name__
    return BadInput(f"{ckpt.get('path', 'checkpoint')}: its weights do not fit its model_args "
                    f"{ckpt['model_args']}: {detail}")


# the shape of a model, in its config and in a checkpoint's model_args
SHAPE_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")


def same_option(a, b):
    """Are two values of an option the same? Paths are the same when they name the same file."""
    if isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_resume(ckpt, path, cfg, free):
    """Refuse a resume that would go on training something else than the checkpoint was.

    Every option but those in `free` (where to write, how often to log and save, when to stop,
    what to evaluate on) must be the one the checkpoint was trained with: another --data, shape,
    --lr or --seed would make a model of two runs that no config describes. --max_steps may
    grow, not fall below the step the checkpoint reached.
    """
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for name, value in asdict(cfg).items():
        if name not in free and name in saved and not same_option(saved[name], value):
            raise BadInput(f"{path}: trained with --{name}={saved[name]}, this run has --{name}={value}; "
                           f"resume with the options it was trained with, or start anew in another --out_dir")
    if not is_int(ckpt.get("step")) or not isinstance(ckpt.get("optimizer"), dict):
        raise BadInput(f"{path}: no step and optimizer state to resume from (a snapshot?)")
    if cfg.max_steps < ckpt["step"]:
        raise BadInput(f"--max_steps={cfg.max_steps} is below step {ckpt['step']}, where {path} stopped")


def make_checkpoint(kind, model, enc, config, **extra):
    """The dict we save: {kind, model, model_args, vocab, config, ...} (nanoGPT's layout plus kind and vocab)."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    gpt = raw if isinstance(raw, GPT) else raw.gpt
    return {"kind": kind, "model": raw.state_dict(), "model_args": asdict(gpt.config),
            "vocab": vocab_fingerprint(enc), "config": config, **extra}
