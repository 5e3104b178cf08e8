"""
training: what every script shares, in one place.

* config: one dataclass per script, turned into --key=value options (`parse_config`), checked
  before any work (`check_options`, `require`, `check_writable`);
* bad input: a wrong file, record or option raises BadInput; `run_main` turns it (and a file that
  cannot be read or written) into one line on stderr and exit code 2, so a script's traceback
  always means a bug;
* files: JSONL records in (checked where they are read), JSON results and checkpoints out,
  always written atomically;
* devices and torch.distributed (DDP through torchrun: gloo on CPU, nccl on CUDA);
* the training loop: cosine schedule, AdamW, gradient clipping, one log line per
  `log_every` steps, checkpoints, batches of similar lengths drawn from (seed, step);
* language-model batches (`pack`: prompt / completion -> X, Y with the loss on the completion).
"""

import argparse
import atexit
import concurrent.futures
import contextlib
import glob
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, fields

import torch

import task
from model import GPT, GPTConfig, BadInput, vocab_fingerprint, format_eta, check_input_file

# ----------------------------------------------------------------------------
# configuration: one dataclass per script, turned into --key=value options


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


def check_writable(*folders):
    """Refuse an output folder that could not be written, before any work; nothing is created here.

    A folder that does not exist yet is checked where it would be created (its nearest existing
    parent). Empty names are skipped. (Root may write anywhere: os.access says so too.)
    """
    for folder in filter(None, folders):
        path = os.path.abspath(folder)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise BadInput(f"{folder}: cannot be a folder, {path} is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise BadInput(f"{folder}: cannot write in {path}")
        if path == os.path.abspath(folder):
            refuse_locked(folder)


def run_main(main):
    """Run a script's main(). Bad input (BadInput, or a file that cannot be read or written) ends
    as one line on stderr, `error: ...`, and exit code 2; so does a training run stopped on a
    non-finite loss (FloatingPointError, see `non_finite`). Anything else is a bug and keeps its
    traceback. The out_dir locks the run took are released either way."""
    try:
        main()
    except (BadInput, OSError, FloatingPointError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    finally:
        release_locks()


# ----------------------------------------------------------------------------
# one run per output folder: a lock file

LOCK_NAME = ".lock"
HELD_LOCKS = []   # the lock files this process holds: released by run_main, else at exit


def lock_out_dir(folder):
    """Make `folder` and take its lock, the file .lock created exclusively (O_EXCL) with our PID.

    Two runs on one folder would mix their metrics and checkpoints: the second gets a BadInput
    naming the first. The lock of a process that is gone (killed) is taken over, and so is one
    of this very process (a main called again in-process, as the tests do).
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    if path in HELD_LOCKS:
        return
    for _ in range(3):   # a try, and tries again after removing a dead process's lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            refuse_locked(folder)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        HELD_LOCKS.append(path)
        return
    raise BadInput(f"--out_dir={folder}: could not take its lock {path}")


def refuse_locked(folder):
    """A BadInput when another live process holds the lock of `folder` (check_writable asks early)."""
    path = os.path.join(folder, LOCK_NAME)
    holder = lock_holder(path) if os.path.exists(path) else None
    if holder not in (None, os.getpid()) and process_alive(holder):
        raise BadInput(f"--out_dir={folder} is in use by process {holder} (its lock {path}); "
                       f"wait for it to end, or choose another --out_dir")


def lock_holder(path):
    """The PID in a lock file, or None when there is none to read (a holder killed mid-write)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return int(f.read().strip())
    return None


@atexit.register
def release_locks():
    """Remove the lock files this process holds (not one another process has taken over since)."""
    while HELD_LOCKS:
        path = HELD_LOCKS.pop()
        if lock_holder(path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def mean_std(xs):
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_text_atomic(path, text):
    """Write a text file atomically (temp file, then rename): a kill leaves the old file or the new one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    remove_stale_temporaries(path)


def write_json_atomic(path, obj):
    """Write JSON next to the outputs atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temporaries(path):
    """Delete `path`.tmp<pid> files whose process is gone: what a save killed mid-write leaves."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp[len(path) + len(".tmp"):]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                os.remove(tmp)


def process_alive(pid):
    """Is process `pid` running? True when that cannot be told, so that nothing is removed."""
    if os.name != "posix" or pid <= 0:  # os.kill(pid, 0) asks "are you there?" on POSIX only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        pass
    return True


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not an answer


def is_lines(x):
    return isinstance(x, list) and all(isinstance(line, str) for line in x)


# what a record's keys must hold when it has them; a string where steps are expected would
# otherwise be read one character per step, and a null trains as a template example
RECORD_FIELDS = {
    "question": (task.is_question, "a whole expression of this world (integers, + - * and parentheses)"),
    "answer": (is_int, "an integer"),
    "n_ops": (is_int, "an integer"),
    "thinking": (is_lines, "a list of strings"),
    "response": (is_lines, "a list of strings"),
    "meta": (lambda x: isinstance(x, dict), "an object"),
}
# the hidden truth the evaluations read, when a script requires `meta`
META_FIELDS = {"flaw": str, "good": bool, "n_ops": int, "step_ok": list, "first_error": int}


def record_problem(row, required):
    """What is wrong with one record, as 'expected ...', or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {json.dumps(row)[:40]}"
    missing = [k for k in required if k not in row]
    if missing:
        return f"expected a record with keys {list(required)}, missing {missing}"
    for key, (ok, what) in RECORD_FIELDS.items():
        if key in row and not ok(row[key]):
            return f"expected {key!r} to be {what}, got {json.dumps(row[key])[:40]}"
    if "meta" in required:
        meta = row["meta"]
        wrong = [k for k, t in META_FIELDS.items() if not isinstance(meta.get(k), t)]
        if not wrong and "thinking" in row and len(meta["step_ok"]) != len(row["thinking"]):
            wrong = ["step_ok (one per thinking step)"]
        if wrong:
            return f"expected 'meta' with {', '.join(META_FIELDS)}; wrong or missing: {', '.join(wrong)}"
    return None


def read_lines(path):
    """The non-blank lines of a UTF-8 text file, stripped (the arithmetic facts); BadInput otherwise."""
    if not os.path.exists(path):
        raise BadInput(f"{path}: no such file (python data/arith/prepare.py writes it)")
    check_input_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [l.strip() for l in f if l.strip()]
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise BadInput(f"{path}: expected lines of text, found none")
    return lines


def read_jsonl(path, required=("question", "answer")):
    """Read a jsonl file of records, checked: `required` keys, and the types of the keys a record
    has (RECORD_FIELDS). Anything wrong stops with a BadInput `path:line: what was expected`;
    so do an empty file, a folder and bytes that are not UTF-8."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file at {path}: run `python data/arith/prepare.py` first")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a folder, expected a jsonl file")
    check_input_file(path)
    rows = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a decoding error then has a line number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(f"{path}:{lineno}: expected UTF-8 text, byte {e.start + 1} of the line is not") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # also an integer of more than 4300 digits
                raise BadInput(f"{path}:{lineno}: expected one JSON object per line "
                               f"({getattr(e, 'msg', None) or type(e).__name__})") from None
            problem = record_problem(row, required)
            if problem:
                raise BadInput(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise BadInput(f"{path}: no records, expected one JSON object per line")
    return rows


def record_names(records, indices, most=10):
    """'3, 17, #5, ...': the ids of some records (their position, #k, when they have none)."""
    names = [str(records[k].get("id", f"#{k}")) for k in indices[:most]]
    return ", ".join(names) + (", ..." if len(indices) > most else "")


def skip_long_prompts(records, prompt_lengths, block_size, what="records"):
    """The records whose prompt leaves room in the context; the others are named in one warning.

    A prompt of block_size tokens or more leaves nothing to generate and no room to read a step.
    """
    long = [k for k, n in enumerate(prompt_lengths) if n >= block_size]
    if long:
        print(f"warning: {len(long)} of {len(records)} {what} have a prompt of block_size={block_size} "
              f"tokens or more, skipped: {record_names(records, long)}")
    long = set(long)
    return [r for k, r in enumerate(records) if k not in long]


# ----------------------------------------------------------------------------
# checkpoints


def file_digest(path):
    """The first 16 hex digits of a file's sha256: what checkpoints and caches record of their inputs."""
    check_input_file(path)   # a pipe would never end
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_checkpoint(path, ckpt):
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    remove_stale_temporaries(path)


def load_cache(path, label):
    """What an earlier run saved at `path` (a torch file), or None when there is nothing to reuse.

    A file that cannot be read (cut short, overwritten) is named in a warning and the caller
    computes it again: a cache must never be the reason a run fails.
    """
    if not os.path.exists(path):
        return None
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:
        print(f"warning: {path} is not a readable cache ({type(e).__name__}); computing it again")
        return None
    print(f"{label}: reusing {path}")
    return obj


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


def given_options(argv):
    """The names of the options on a command line (argv, or sys.argv[1:] when None)."""
    argv = sys.argv[1:] if argv is None else argv
    return {str(a)[2:].split("=", 1)[0] for a in argv if str(a).startswith("--")}


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


def pick_device(name=""):
    """The device named, else the best there is (cuda, then mps, then cpu)."""
    if name:
        try:
            torch.device(name)
        except RuntimeError:
            raise BadInput(f"--device={name} is not a device name (cpu, cuda, cuda:1, mps)") from None
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed:
    figures are optional, every table is also printed as text."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig, path, dpi=110):
    """Lay out, write atomically (a temporary file, then a rename) and close a figure. Returns True."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=dpi)
    pyplot().close(fig)
    os.replace(path + ".tmp.png", path)
    return True


# ----------------------------------------------------------------------------
# torch.distributed: DDP through torchrun (gloo on CPU, nccl on CUDA)


def init_distributed(device):
    """Start the process group when launched by torchrun; return (rank, world_size, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    import torch.distributed as dist
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda") and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"torchrun started more processes per node than there are GPUs "
                         f"({torch.cuda.device_count()}): lower --nproc_per_node, or pass --device=cpu (gloo)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, world, device


def all_reduce_sum(t):
    """Sum a tensor over ranks (a no-op without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def map_in_processes(fn, jobs, workers=1):
    """fn(*job) for each job, in job order (a generator): run here (workers = 1) or in `workers`
    processes of one thread each.

    The course's models are too small for their matmuls to keep two threads busy, so on a small
    CPU two one-thread processes get more done than one two-thread process. The jobs must not
    depend on each other, and fn must be a module-level function. A job's floating-point results
    depend on its thread count, so --workers=1 and --workers=2 differ in the last digits.
    """
    if workers <= 1 or len(jobs) <= 1:
        yield from (fn(*job) for job in jobs)
        return
    spawn = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        yield from pool.map(fn, *zip(*jobs))


# ----------------------------------------------------------------------------
# the training loop

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    ratio = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, ratio))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def target_lengths(Y):
    """The length of each example: its last target position + 1."""
    pos = torch.arange(Y.size(1)).expand_as(Y)
    return torch.where(Y != -1, pos, -1).max(1).values + 1


def batch_indices(step, order, batch_size, seed, rank=0, world=1):
    """The global batch of step `step` (same on every rank and after a resume); this rank's share.

    A batch is a random window of `order` (examples sorted by length), so its rows have
    similar lengths and little padding.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(len(order), (1,), generator=g)
    idx = order[(start + torch.arange(batch_size)) % len(order)]
    return idx[rank::world]


def lm_batch_loss(X, Y, device, world=1):
    """The SFT loss of a batch: cross-entropy on target tokens (Y != -1).

    Summed over this rank's targets and divided by the *global* count (times the world
    size): after DDP averages gradients, every run sees the same global-batch mean,
    whatever the number of processes. Returns (loss, global target count).
    """
    def batch_loss(model, idx):
        y = Y[idx]
        L = int((y != -1).any(0).nonzero().max()) + 1  # trim the padded tail shared by the batch
        x, y = X[idx, :L].to(device, non_blocking=True), y[:, :L].to(device, non_blocking=True)
        n_global = all_reduce_sum((y != -1).sum().float())
        _, loss_tok = model(x, y, loss_reduction="none")
        return loss_tok.sum() / n_global * world, int(n_global)
    return batch_loss


def train(model, batch_loss, lengths, cfg, device, rank=0, world=1, log=print, ckpt_fn=None,
          start_step=0, optimizer=None, metrics_path=None, stop_at=0):
    """The training loop: cosine LR, grad clip, one log line per `log_every` steps, checkpoints.

    batch_loss(model, idx) -> (loss, targets in the global batch) for example indices idx;
    lengths (N,) orders the examples so that a batch has similar lengths. A non-finite
    loss or gradient stops the run, naming the step, before anything else is logged or saved:
    the last checkpoint on disk stays the last good one. A resumed run (start_step > 0) first
    drops the metrics rows of the steps it will log again.
    Returns {"tokens": targets seen, "loss": last logged loss}.
    """
    if metrics_path and rank == 0 and start_step > 0:
        keep_metrics_before(metrics_path, start_step)
    optimizer = optimizer or make_optimizer(model, cfg, device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    model.train()
    order = torch.argsort(lengths, stable=True)
    tokens_seen, t0, loss_val = 0, time.time(), float("nan")
    # the first step with a non-finite loss or gradient, -1 if none: kept as a tensor so that
    # checking it costs no sync per step; read only where we log or save. The gradient norm is
    # the same on every DDP rank (after the all-reduce), so every rank stops at the same step.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    last_step = min(stop_at or cfg.max_steps, cfg.max_steps)  # stop_at pauses a run, schedule unchanged
    for step in range(start_step, last_step):
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, order, cfg.batch_size, cfg.seed, rank, world)
        with autocast:
            loss, n_targets = batch_loss(model, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += n_targets
        finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        save_now = ckpt_fn and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == last_step)
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps - 1
        if (save_now or log_now) and int(first_bad) >= 0:
            raise non_finite(int(first_bad))
        if log_now:
            loss_val = float(all_reduce_sum(loss.detach().clone()) / world)
            rate = (time.time() - t0) / (step + 1 - start_step)
            if rank == 0:
                log(f"step {step:5d}/{cfg.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | "
                    f"gnorm {float(gnorm):.2f} | {tokens_seen / (time.time() - t0):,.0f} tok/s | "
                    f"eta {format_eta(rate * (cfg.max_steps - step - 1))}")
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_val, "lr": lr,
                                            "grad_norm": float(gnorm)}) + "\n")
        if save_now:
            ckpt_fn(step + 1, optimizer)
    return {"tokens": tokens_seen, "loss": loss_val}


def non_finite(step):
    """The error that stops a run at a non-finite loss or gradient, before the step is saved."""
    return FloatingPointError(f"non-finite loss or gradient at step {step}; stopped, the last good "
                              f"checkpoint is kept")


def keep_metrics_before(path, step):
    """Keep only the rows of steps before `step` in a metrics file (and drop a line cut by a kill).

    A run killed after its last checkpoint had logged a few more steps; resumed from that
    checkpoint, it logs them again.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] < step:
                kept.append(line.rstrip("\n") + "\n")
    write_text_atomic(path, "".join(kept))


def pack(examples, block_size, pad_id):
    """Right-pad examples into X, Y of shape (N, L): Y = next token, -1 on prompt and padding.

    The loss mask is by position, not by token id: the completion's own <|endoftext|> is
    a target (pad = eot would otherwise mask it and the model would never learn to stop).
    """
    L = min(block_size, max(len(p) + len(c) for p, c in examples))
    X = torch.full((len(examples), L), pad_id, dtype=torch.long)
    Y = torch.full((len(examples), L), -1, dtype=torch.long)
    n_cut = 0
    for i, (p, c) in enumerate(examples):  # once, before training
        seq = (p + c)[:L + 1]
        n_cut += len(p) + len(c) > L + 1
        x, y = seq[:-1], seq[1:]
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
        Y[i, :max(0, len(p) - 1)] = -1  # no loss on predicting the prompt
    if n_cut:
        print(f"warning: {n_cut} of {len(examples)} examples truncated to block_size={block_size}")
    return X, Y
