"""
options: one dataclass per script, turned into --key=value options and checked before any work.

* `parse_config`: the dataclass's fields as options, presets (--smoke, --preset=gpu), no
  abbreviations, no option given twice;
* `check_options`, `require`, RANGES: impossible values refused before any work;
* `run_main`: a script's main, with bad input (files.BadInput) ending as one line and exit code 2.
"""

import argparse
import math
import sys
from dataclasses import asdict, fields

from files import BadInput, release_locks


def str2bool(v):
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def argument_parser(**kwargs):
    """An argparse parser that takes no abbreviations and reports a bad option as BadInput.

    Abbreviations off: `--max_step=5` would silently mean --max_steps, and `sft.py --eval=0`
    --eval_questions. BadInput rather than argparse's exit: one line, not the whole usage.
    """
    p = argparse.ArgumentParser(allow_abbrev=False, **kwargs)

    def refuse(message):
        raise BadInput(f"{message} (--help lists the options)")
    p.error = refuse
    parse = p.parse_args

    def parse_once(args=None, namespace=None):
        refuse_repeated(sys.argv[1:] if args is None else args)
        return parse(args, namespace)
    p.parse_args = parse_once
    return p


def refuse_repeated(argv):
    """An option given twice is an error: argparse would silently keep the last value."""
    names = [str(a).split("=", 1)[0] for a in argv if str(a).startswith("--") and str(a) != "--"]
    for name in names:
        if names.count(name) > 1:
            raise BadInput(f"{name} is given {names.count(name)} times; give it once")


def parse_config(cls, argv=None, presets=None, doc=None):
    """Build a `cls` dataclass from --key=value options.

    Unknown keys, abbreviations and wrongly typed values stop with a BadInput that names the key.
    presets = {"smoke": {...}}: when the boolean field `smoke` is set (or the field `preset`
    names it), its values replace the defaults; options given explicitly still win. An unknown
    --preset is an error, not a run with the defaults.
    """
    p = argument_parser(description=doc, argument_default=argparse.SUPPRESS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, help=f"(default {f.default})")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), help=f"(default {f.default!r})")
    given = vars(p.parse_args(argv))
    if given.get("preset") and given["preset"] not in (presets or {}):
        raise BadInput(f"--preset={given['preset']} is not a preset; choose from {', '.join(presets or {})}")
    cfg = cls()
    for name, values in (presets or {}).items():
        if given.get(name) is True or given.get("preset") == name:
            for k, v in values.items():
                setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    return cfg


def print_config(cfg):
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))


# The range of every float option of the scripts, as an interval: '[' and ']' include their end,
# '(' and ')' exclude it. A learning rate of 0 never moves, β weighs two rewards, dropout 1 drops
# everything, grad_clip 0 zeroes every gradient, a temperature of 0 divides by zero.
RANGES = {
    "lr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "grad_clip": "(0, inf)",
    "dropout": "[0, 1)", "template_frac": "[0, 1)", "temperature": "(0, inf)", "sample_temperature": "(0, inf)",
    "beta": "[0, 1]", "alpha": "[0, inf)", "clip_eps": "(0, 1)", "clip_high": "[0, inf)", "kl_coef": "[0, inf)",
    "tau": "(0, inf)", "judge_noise": "[0, 1]", "scramble": "[0, 1]", "misread": "[0, 1]", "lm_coef": "[0, inf)",
    "lam_step": "[0, inf)", "lam_final": "[0, inf)", "threshold": "(-inf, 1]", "flaw_scale": "[0, inf)",
}


def within(x, interval):
    """Is x in `interval`, written as in RANGES ('[0, 1)')?

    >>> within(1.0, "[0, 1)"), within(0.0, "[0, 1)"), within(-3.0, "(-inf, 1]")
    (False, True, True)
    """
    lo, hi = (float(end) for end in interval[1:-1].split(","))
    return (lo <= x if interval[0] == "[" else lo < x) and (x <= hi if interval[-1] == "]" else x < hi)


def check_options(cfg, at_least, one_of=None, ranges=None):
    """Refuse impossible option values before any work.

    at_least {option: smallest value}: sizes, steps, intervals (0 batches would loop forever,
    0 steps would evaluate an untrained model); one_of {option: the values it may take}. Every
    float option must be finite and within its interval of RANGES (`ranges` adds to it or
    overrides it for one script); --out_dir must name a folder.
    """
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise BadInput(f"--{name} must be at least {low}, got {getattr(cfg, name)}")
    for name, values in (one_of or {}).items():
        if getattr(cfg, name) not in values:
            *others, last = map(str, values)
            raise BadInput(f"--{name} must be {', '.join(others)} or {last}; got {getattr(cfg, name)!r}")
    for name, value in asdict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInput(f"--{name} must be a finite number, got {value}")
    for name, interval in {**RANGES, **(ranges or {})}.items():
        if hasattr(cfg, name) and not within(getattr(cfg, name), interval):
            raise BadInput(f"--{name} must be in {interval}, got {getattr(cfg, name)}")
    if hasattr(cfg, "out_dir") and not cfg.out_dir.strip():
        raise BadInput("--out_dir is empty: name the folder to write in")


def require(holds, message):
    """An option rule that check_options cannot express (e.g. n_embd divisible by n_head)."""
    if not holds:
        raise BadInput(message)


def run_main(main):
    """Run a script's main(). Bad input (BadInput, or a file that cannot be read or written) ends
    as one line on stderr, `error: ...`, and exit code 2; so does a training run stopped on a
    non-finite loss (FloatingPointError, see `training.non_finite`). Anything else is a bug and keeps its
    traceback. The out_dir locks the run took are released either way."""
    try:
        main()
    except (BadInput, OSError, FloatingPointError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    finally:
        release_locks()


def given_options(argv):
    """The names of the options on a command line (argv, or sys.argv[1:] when None)."""
    argv = sys.argv[1:] if argv is None else argv
    return {str(a)[2:].split("=", 1)[0] for a in argv if str(a).startswith("--")}


def format_eta(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"
