"""
files: what the scripts read and write, and how, safely.

* bad input: a wrong file, record or option raises BadInput (options.run_main turns it into one
  line on stderr and exit code 2); an input must be a regular file of a sane size;
* reading: JSONL records checked where they are read (`read_jsonl`), text lines, digests of inputs,
  caches of earlier runs;
* writing: text, JSON, checkpoints and figures, always atomically (`write_atomic`: a temporary file,
  then a rename);
* one run per output folder: a lock file, and `check_writable` before any work.
"""

import atexit
import contextlib
import glob
import hashlib
import json
import os

import torch

import task


class BadInput(ValueError):
    """A file, record or option the user gave is wrong: scripts end with this one line and exit code 2.

    Defined here, below the tokenizer and the options, so that every module can raise it;
    options.run_main is what turns it into the one line.
    """


MAX_INPUT_BYTES = 4 << 30   # the largest file an input may be: every input is read whole


def check_input_file(path):
    """Refuse, as BadInput, an existing path that is not a regular file of at most MAX_INPUT_BYTES.

    A FIFO would hang the read and /dev/zero would fill the memory before anything could be
    said; a folder is named as one. A missing file is left to the caller's own message.
    """
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a folder, expected a file")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: not a regular file (a pipe or a device?), expected a file")
    if os.path.getsize(path) > MAX_INPUT_BYTES:
        raise BadInput(f"{path}: {os.path.getsize(path):,} bytes, more than any input may be ({MAX_INPUT_BYTES:,})")


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


def file_digest(path):
    """The first 16 hex digits of a file's sha256: what checkpoints and caches record of their inputs."""
    check_input_file(path)   # a pipe would never end
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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


def write_atomic(path, write):
    """The one atomic writer: write(tmp) writes the file to a temporary name in the same folder, which
    is then renamed to `path`. A kill leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)
    remove_stale_temporaries(path)


def write_text_atomic(path, text):
    """Write a text file atomically (write_atomic)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def write_json_atomic(path, obj):
    """Write JSON next to the outputs atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path, ckpt):
    """torch.save, atomically (write_atomic): never a half-written checkpoint."""
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))


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
    """Lay out, write atomically (write_atomic) and close a figure. Returns True."""
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)
    return True


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
