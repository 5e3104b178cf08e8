"""Hostile input: every bad file, record or option ends in one line on stderr, exit code 2, nothing written.

The probes are a table: each defect against every script it reaches, on a copy of the smoke
data with the defect in record 3 (line 3). They run in-process through options.run_main, the
wrapper every script's __main__ uses, and fail before any model is loaded; one of them also
runs as a real subprocess. The parsers of task.py are fuzzed separately.
"""

import contextlib
import importlib.util
import io
import json
import os
import random
import time

import pytest
import torch

from conftest import ROOT, run_script
from tokenizer import load_tokenizer, vocab_fingerprint
from evaluate import generate_completions
import files
import grpo
import options
import rewards
import rfprm
import select_data
import sft
import task
import train_prm
import training
import tts

spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "arith", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)

# ----------------------------------------------------------------------------
# the defects: record 3 of a copy of a smoke file, or the whole file

RECORD_DEFECTS = {  # what is wrong -> how record 3 becomes wrong
    "thinking is a string": lambda r: {**r, "thinking": "first, 5 - 2 = 3"},
    "thinking is null": lambda r: {**r, "thinking": None},
    "response is a string": lambda r: {**r, "response": "Answer: 3"},
    "response holds a number": lambda r: {**r, "response": ["1. 1 + 2 = 3", 3]},
    "answer is a string": lambda r: {**r, "answer": "abc"},
    "answer is 3.7": lambda r: {**r, "answer": 3.7},
    "answer is Infinity": lambda r: {**r, "answer": float("inf")},
    "answer is true": lambda r: {**r, "answer": True},
    "question is a number": lambda r: {**r, "question": 7},
    "question has a division": lambda r: {**r, "question": "3 + 4 / 2"},   # no such operator in this world
    "question is cut short": lambda r: {**r, "question": "8 / (2 + (3"},
    "answer is missing": lambda r: {k: v for k, v in r.items() if k != "answer"},
}
QUESTION_DEFECTS = ("answer is a string", "answer is 3.7", "answer is Infinity", "answer is true",
                    "question is a number", "question has a division", "question is cut short", "answer is missing")
LINE_DEFECTS = {  # what is wrong -> line 3's bytes
    "line is not an object": lambda line: b"[1, 2, 3]",
    "line is cut short": lambda line: line[:30],
    "invalid UTF-8": lambda line: line[:12] + b"\xff\xfe" + line[12:],
    "answer has 5000 digits": lambda line: json.dumps({**json.loads(line), "answer": 0}).encode()
                                           .replace(b'"answer": 0', b'"answer": ' + b"7" * 5000),
}


def write_defects(src, folder):
    """{defect: path} of copies of the jsonl file `src` with each defect in record 3, plus whole-file defects."""
    lines = open(src, "rb").read().splitlines()
    paths = {}
    for name, breaks in RECORD_DEFECTS.items():
        rows = list(lines)
        rows[2] = json.dumps(breaks(json.loads(rows[2]))).encode()
        paths[name] = folder / f"{name.replace(' ', '_')}.jsonl"
        paths[name].write_bytes(b"\n".join(rows) + b"\n")
    for name, breaks in LINE_DEFECTS.items():
        rows = list(lines)
        rows[2] = breaks(rows[2])
        paths[name] = folder / f"{name.replace(' ', '_')}.jsonl"
        paths[name].write_bytes(b"\n".join(rows) + b"\n")
    paths["empty file"] = folder / "empty.jsonl"
    paths["empty file"].write_bytes(b"")
    paths["a directory"] = folder / "a_folder.jsonl"
    paths["a directory"].mkdir(exist_ok=True)
    paths["no such file"] = folder / "missing.jsonl"
    return paths


def expected_place(defect, path):
    """What the one-line message must name: the file, and line 3 for a defect inside it."""
    return str(path) if defect in ("empty file", "a directory", "no such file") else f"{path}:3:"


def make_probes(D, ckpt, tmp):
    """The probe table: [(label, script, argv, what the message must contain, output folder)].

    D: a smoke data folder; ckpt: {"base", "policy", "prm"} checkpoint paths; tmp: a scratch folder.
    Every probe writes (if it wrongly writes anything) under its own output folder.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    probes, n = [], [0]
    T = f"--tokenizer={D}/tokenizer.tiktoken"
    F = f"--facts={D}/facts.txt"

    def out():
        n[0] += 1
        return tmp / f"out{n[0]}"

    def add(label, script, argv, expect, o, repeats=False):
        """A probe; an option given again replaces the earlier one (a repeated option is a probe of its own)."""
        argv = [str(a) for a in argv]
        if not repeats:
            name = lambda a: a.split("=", 1)[0] if a.startswith("--") else a
            argv = [a for k, a in enumerate(argv) if name(a) not in map(name, argv[k + 1:]) or not a.startswith("--")]
        probes.append((label, script, argv, expect, o))

    # bad records and files where the pool is read
    (tmp / "pool").mkdir(exist_ok=True)
    pool = write_defects(D / "pool.jsonl", tmp / "pool")
    for defect, bad in pool.items():
        where = expected_place(defect, bad)
        o = out()
        add(f"pool: {defect}", "sft.py", ["--smoke", f"--data={bad}", T, f"--test={D}/test.jsonl",
                                          f"--init={ckpt['base']}", f"--out_dir={o}"], where, o)
        o = out()
        add(f"pool: {defect}", "train_prm.py", ["--smoke", f"--data={bad}", T, F, f"--policy={ckpt['policy']}",
                                                f"--out_dir={o}", f"--cache_dir={o}/rewards"], where, o)
        o = out()
        add(f"pool: {defect}", "select_data.py", ["--smoke", f"--data={bad}", T, f"--test={D}/test.jsonl",
                                                  f"--init={ckpt['policy']}", f"--prm={ckpt['prm']}",
                                                  "--selectors=random,rf_total", f"--out_dir={o}"], where, o)
        if defect != "answer is missing":  # scoring needs no answer
            add(f"pool: {defect}", "rfprm.py", ["score", bad, f"--prm={ckpt['prm']}"], where, None)
    # bad ProcessBench files (train_prm.py --processbench): checked before the PRM is loaded
    (tmp / "processbench").mkdir(exist_ok=True)
    good = json.loads((D / "processbench_eval.json").read_text())
    pb_defects = {"a jsonl file": (D / "prm_eval.jsonl").read_bytes(), "an object for a list": b'{"id": 1}',
                  "an empty list": b"[]", "invalid UTF-8": b'[{"id": "\xff"}]',
                  "label past the steps": [{**good[0], "label": len(good[0]["steps"])}],
                  "label true": [{**good[0], "label": True}], "steps hold a number": [{**good[0], "steps": ["a", 3]}],
                  "no problem": [{k: v for k, v in good[0].items() if k != "problem"}]}
    for defect, content in pb_defects.items():
        bad = tmp / "processbench" / f"{defect.replace(' ', '_')}.json"
        bad.write_bytes(content if isinstance(content, bytes) else json.dumps(good[:2] + content).encode())
        add(f"processbench: {defect}", "train_prm.py", [f"--processbench={D}/processbench_eval.json,{bad}",
                                                        f"--prm={ckpt['prm']}"], str(bad), None)
    for defect, bad in (("no such file", tmp / "none.json"), ("a directory", tmp / "processbench")):
        add(f"processbench: {defect}", "train_prm.py", [f"--processbench={bad}", f"--prm={ckpt['prm']}"], str(bad), None)
    add("option --threshold without --processbench", "train_prm.py",
        ["--smoke", "--threshold=0.3", f"--policy={ckpt['policy']}", f"--out_dir={tmp / 'thr'}"], "--threshold", tmp / "thr")
    # bad records and files where questions are read
    (tmp / "questions").mkdir(exist_ok=True)
    qs = write_defects(D / "test.jsonl", tmp / "questions")
    for defect, bad in qs.items():
        if defect in RECORD_DEFECTS and defect not in QUESTION_DEFECTS:
            continue
        where = expected_place(defect, bad)
        o = out()
        add(f"questions: {defect}", "tts.py", ["--smoke", f"--test={bad}", T, f"--policy={ckpt['policy']}",
                                               f"--prm={ckpt['prm']}", "--prm_response=", "--prm_outcome=",
                                               f"--out_dir={o}"], where, o)
        o = out()
        add(f"questions: {defect}", "grpo.py", ["--smoke", f"--questions={bad}", f"--test={D}/test.jsonl", T,
                                                f"--init={ckpt['policy']}", "--reward=rule", f"--out_dir={o}"], where, o)
        o = out()
        add(f"test set: {defect}", "sft.py", ["--smoke", f"--data={D}/pool.jsonl", f"--test={bad}", T,
                                              f"--init={ckpt['base']}", f"--out_dir={o}"], where, o)

    # bad option values: the message names the option
    sft_args = lambda o: ["--smoke", f"--data={D}/pool.jsonl", f"--test={D}/test.jsonl", T,
                          f"--init={ckpt['base']}", f"--out_dir={o}"]
    for opt, expect in (("--max_steps=-1", "--max_steps"), ("--batch_size=0", "--batch_size"),
                        ("--log_every=0", "--log_every"), ("--ckpt_every=0", "--ckpt_every"),
                        ("--eval_questions=-1", "--eval_questions"), ("--preset=nonsense", "--preset"),
                        ("--max_step=5", "--max_step"), ("--eval=0", "--eval"), ("--stop_at=-3", "--stop_at")):
        o = out()
        add(f"option {opt}", "sft.py", sft_args(o) + [opt], expect, o)
    o = out()
    add("option --device=gpu0", "sft.py", sft_args(o) + ["--device=gpu0"], "--device", o)
    o = out()
    add("option --n_head=3 --n_embd=128", "sft.py",
        ["--smoke", f"--data={D}/pool.jsonl", T, "--n_head=3", "--n_embd=128", f"--out_dir={o}"], "--n_head", o)
    prm_args = lambda o: ["--smoke", f"--data={D}/pool.jsonl", T, F, f"--policy={ckpt['policy']}",
                          f"--out_dir={o}", f"--cache_dir={o}/rewards"]
    for opt in ("--max_steps=-1", "--batch_size=0", "--n_rollouts=0", "--n_train=0", "--log_every=0",
                "--preset=nonsense", "--tau=0"):
        o = out()
        add(f"option {opt}", "train_prm.py", prm_args(o) + [opt] + (["--eval"] if "max_steps" in opt else []),
            opt.split("=")[0], o)
    sel_args = lambda o: ["--smoke", f"--data={D}/pool.jsonl", f"--test={D}/test.jsonl", T,
                          f"--init={ckpt['policy']}", f"--prm={ckpt['prm']}", "--selectors=random,rf_total",
                          f"--out_dir={o}"]
    for opt in ("--batch_size=0", "--seeds=0", "--k=0", "--budget_tokens=0", "--eval_questions=-1"):
        o = out()
        add(f"option {opt}", "select_data.py", sel_args(o) + [opt], opt.split("=")[0], o)
    grpo_args = lambda o: ["--smoke", f"--questions={D}/rl_questions.jsonl", f"--test={D}/test.jsonl", T,
                           f"--init={ckpt['policy']}", f"--prm={ckpt['prm']}", f"--out_dir={o}"]
    for opt in ("--group_size=1", "--mu=0", "--seeds=0", "--questions_per_step=0", "--max_new_tokens=0",
                "--log_every=0", "--ckpt_every=0", "--chunks=0", "--temperature=0"):
        o = out()
        add(f"option {opt}", "grpo.py", grpo_args(o) + [opt], opt.split("=")[0], o)
    tts_args = lambda o: ["--smoke", f"--test={D}/test.jsonl", T, f"--policy={ckpt['policy']}",
                          f"--prm={ckpt['prm']}", "--prm_response=", "--prm_outcome=", f"--out_dir={o}"]
    for opt in ("--n_samples=0", "--batch_size=0", "--n_questions=0", "--max_new_tokens=0", "--n_subsets=0"):
        o = out()
        add(f"option {opt}", "tts.py", tts_args(o) + [opt], opt.split("=")[0], o)
    for opt in ("--n_pool=0", "--n_test=0", "--vocab_size=100"):
        o = out()
        add(f"option {opt}", "data/arith/prepare.py", ["--smoke", f"--out_dir={o}", opt], opt.split("=")[0], o)
    add("option --n=-1", "rfprm.py", ["score", D / "pool.jsonl", f"--prm={ckpt['prm']}", "--n=-1"], "--n", None)
    add("option --pr (an abbreviation)", "rfprm.py", ["score", D / "pool.jsonl", f"--pr={ckpt['prm']}"], "--pr", None)

    # bad files and folders: the message names the path
    junk = tmp / "junk.pt"
    junk.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(2000)))
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    o = out()
    add("--init: random bytes", "sft.py", sft_args(o) + [f"--init={junk}"], str(junk), o)
    o = out()
    add("--policy: random bytes", "train_prm.py", prm_args(o) + [f"--policy={junk}"], str(junk), o)
    o = out()
    add("--init: a PRM checkpoint", "grpo.py", grpo_args(o) + [f"--init={ckpt['prm']}"], str(ckpt["prm"]), o)
    o = out()
    add("--prm: random bytes", "tts.py", tts_args(o) + [f"--prm={junk}"], str(junk), o)
    o = out()
    add("--prm: random bytes", "select_data.py", sel_args(o) + [f"--prm={junk}"], str(junk), o)
    add("--prm: random bytes", "rfprm.py", ["score", D / "pool.jsonl", f"--prm={junk}"], str(junk), None)
    o = out()
    add("--tokenizer: random bytes", "sft.py", sft_args(o) + [f"--tokenizer={junk}"], str(junk), o)
    o = out()
    add("--tokenizer: no such file", "tts.py", tts_args(o) + [f"--tokenizer={tmp}/none.tiktoken"], "none.tiktoken", o)
    for script, argv in (("sft.py", sft_args), ("train_prm.py", prm_args), ("select_data.py", sel_args),
                         ("grpo.py", grpo_args), ("tts.py", tts_args)):
        add("--out_dir: inside a file", script, argv(a_file / "out"), str(a_file), a_file / "out")
    o = out()
    add("--cache_dir: inside a file", "train_prm.py", prm_args(o) + [f"--cache_dir={a_file}/rewards"], str(a_file), o)
    o = out()
    add("--cache_dir: inside a file", "select_data.py", sel_args(o) + [f"--cache_dir={a_file}/scores"], str(a_file), o)

    # float options out of their range (options.RANGES), before any work
    for script, argv, opts in (
            ("sft.py", sft_args, ("--lr=nan", "--lr=-1", "--lr=0", "--dropout=1", "--grad_clip=0",
                                  "--template_frac=1", "--sample_temperature=inf", "--weight_decay=-0.1")),
            ("grpo.py", grpo_args, ("--alpha=nan", "--alpha=-1", "--beta=2", "--beta=-1", "--grad_clip=0",
                                    "--lr=inf", "--temperature=nan", "--kl_coef=-1", "--clip_eps=0")),
            ("train_prm.py", prm_args, ("--lr=nan", "--alpha=inf", "--lam_step=-1", "--judge_noise=2",
                                        "--scramble=1.5", "--threshold=nan")),
            ("tts.py", tts_args, ("--temperature=nan", "--temperature=-1")),
            ("select_data.py", sel_args, ("--lr=0", "--min_lr=-1"))):
        for opt in opts:
            o = out()
            add(f"option {opt}", script, argv(o) + [opt], opt.split("=")[0], o)
    o = out()
    add("option --variants=mix@2 (a β of 2)", "grpo.py", grpo_args(o) + ["--variants=rule,mix@2"], "--beta", o)

    # checkpoints that load but are wrong inside: the message names the file
    for script, argv, opt, which in (("rfprm.py", None, "--prm", "prm_misfit"), ("tts.py", tts_args, "--prm", "prm_misfit"),
                                     ("grpo.py", grpo_args, "--prm", "prm_misfit"),
                                     ("select_data.py", sel_args, "--prm", "prm_misfit"),
                                     ("tts.py", tts_args, "--prm", "prm_no_tokenizer"),
                                     ("rfprm.py", None, "--prm", "prm_nan"), ("sft.py", sft_args, "--init", "policy_nan"),
                                     ("grpo.py", grpo_args, "--init", "policy_nan")):
        o = out() if argv else None
        args = argv(o) if argv else ["score", D / "pool.jsonl"]
        add(f"{opt}: {which}", script, args + [f"{opt}={ckpt[which]}"], str(ckpt[which]), o)
    o = out()
    add("option --ns= (no N)", "tts.py", tts_args(o) + ["--ns="], "--ns", o)

    # resumes that would train something else, and a second run on one folder: out_dir exists already
    for script, argv, trained, differs, expect in (
            ("sft.py", sft_args, {"data": str(D / "train.jsonl")}, [], "--data"),
            ("sft.py", sft_args, {"lr": 0.5}, [], "--lr"),
            ("sft.py", sft_args, {"seed": 7}, [], "--seed"),
            ("sft.py", sft_args, {"n_embd": 64}, [], "--n_embd"),
            ("sft.py", sft_args, {}, ["--max_steps=10"], "--max_steps"),
            ("grpo.py", grpo_args, {"questions": str(D / "rl_hard.jsonl")}, [], "--questions"),
            ("grpo.py", grpo_args, {"beta": 0.5}, [], "--beta"),
            ("train_prm.py", prm_args, {"data": str(D / "train.jsonl")}, [], "--data")):
        o = out()
        kind = "prm" if script == "train_prm.py" else "policy"
        resumable(o, kind, ckpt["fingerprint"], trained)
        add(f"--resume: trained with {trained or 'the same options'}, resumed with {differs or 'others'}", script,
            argv(o) + ["--resume"] + differs, expect, o)
    o = out()
    add("--init: a shape option it does not have", "sft.py", sft_args(o) + [f"--init={ckpt['shaped']}", "--n_embd=64"],
        "--n_embd", o)
    prepare_args = lambda o: ["--smoke", f"--out_dir={o}"]
    for script, argv in (("sft.py", sft_args), ("grpo.py", grpo_args), ("tts.py", tts_args),
                         ("data/arith/prepare.py", prepare_args)):
        o = out()
        o.mkdir()
        (o / files.LOCK_NAME).write_text(f"{os.getppid()}\n")   # a live process's lock
        add("--out_dir: another run's", script, argv(o), "in use by process", o)

    # smaller: names, empty options, files that are not files, repeats
    o = out()
    add("--tokenizer=gpt2 (a name, not a file)", "sft.py", sft_args(o) + ["--tokenizer=gpt2"], "--tokenizer", o)
    for script, argv in (("sft.py", sft_args), ("train_prm.py", prm_args), ("select_data.py", sel_args),
                         ("grpo.py", grpo_args), ("tts.py", tts_args)):
        add("--out_dir= (empty)", script, argv(""), "--out_dir", None)
    fifo = tmp / "a_fifo.jsonl"
    os.mkfifo(fifo)
    for bad in (fifo, "/dev/zero"):
        o = out()
        add(f"--data: {bad}", "sft.py", sft_args(o) + [f"--data={bad}"], str(bad), o)
        o = out()
        add(f"--test: {bad}", "tts.py", tts_args(o) + [f"--test={bad}"], str(bad), o)
        o = out()
        add(f"--init: {bad}", "sft.py", sft_args(o) + [f"--init={bad}"], str(bad), o)
        o = out()
        add(f"--tokenizer: {bad}", "sft.py", sft_args(o) + [f"--tokenizer={bad}"], str(bad), o)
    o = out()
    add("option --lr given twice", "sft.py", sft_args(o) + ["--lr=1e-3", "--lr=2e-3"], "--lr", o, repeats=True)
    add("option --n given twice", "rfprm.py", ["score", D / "pool.jsonl", f"--prm={ckpt['prm']}", "--n=1", "--n=2"],
        "--n", None, repeats=True)
    return probes


def resumable(out, kind, fingerprint, trained):
    """A checkpoint in `out` to resume from, trained with the options `trained` (and at step 15)."""
    out.mkdir(parents=True)
    torch.save({"kind": kind, "model": {}, "model_args": {"block_size": 256}, "vocab": fingerprint,
                "config": trained, "step": 15, "optimizer": {"state": {}, "param_groups": []}}, out / "ckpt.pt")


# ----------------------------------------------------------------------------
# running a probe in-process, as `python script.py ...` would

MAINS = {"sft.py": sft.main, "train_prm.py": train_prm.main, "select_data.py": select_data.main,
         "rfprm.py": rfprm.main, "tts.py": tts.main, "grpo.py": grpo.main, "data/arith/prepare.py": prepare.main}


def run_in_process(script, argv):
    """(exit code, stderr) of options.run_main(script's main) on argv, as `python script argv` ends."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            options.run_main(lambda: MAINS[script](argv))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def folder_state(folder):
    """None for no folder, else {file: (size, mtime)} under it: a probe must leave it as it was."""
    if folder is None or not os.path.exists(folder):
        return None
    return {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files_under(folder)}


def files_under(folder):
    if folder is None or not os.path.exists(folder):
        return []
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def stand_in_checkpoints(D, folder):
    """Checkpoints that pass every check of checkpoints.load_checkpoint but hold no weights.

    Every probe must fail before a model is built: one that got further would now fail on
    these with another message, and the test says so (it also keeps this file fast alone).
    """
    fingerprint = vocab_fingerprint(load_tokenizer(str(D / "tokenizer.tiktoken")))
    paths = {"fingerprint": fingerprint}
    tiny = {"block_size": 32, "vocab_size": 320, "n_layer": 1, "n_head": 1, "n_embd": 8}
    config = {"tokenizer": str(D / "tokenizer.tiktoken")}
    for name, kind, model, model_args, cfg in (
            ("base", "policy", {}, {"block_size": 256}, config), ("policy", "policy", {}, {"block_size": 256}, config),
            ("prm", "prm", {}, {"block_size": 256}, config),
            ("shaped", "policy", {}, {**{k: sft.SMOKE[k] for k in ("n_layer", "n_head", "n_embd")}, "block_size": 256}, config),   # a smoke policy's shape
            ("prm_misfit", "prm", {"gpt.wte.weight": torch.zeros(3, 5)}, tiny, config),  # weights of another shape
            ("prm_no_tokenizer", "prm", {}, tiny, {"tokenizer": str(folder / "gone.tiktoken")}),
            ("prm_nan", "prm", {"head.bias": torch.tensor([float("nan")])}, tiny, config),
            ("policy_nan", "policy", {"wte.weight": torch.full((2, 2), float("nan"))}, tiny, config)):
        paths[name] = folder / f"{name}.pt"
        torch.save({"kind": kind, "model": model, "model_args": model_args, "vocab": fingerprint, "config": cfg},
                   paths[name])
    return paths


@pytest.fixture(scope="module")
def probes(smoke_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    return make_probes(smoke_data, stand_in_checkpoints(smoke_data, tmp), tmp)


def test_every_probe_is_refused_in_one_line_and_writes_nothing(probes):
    t0, failures = time.time(), []
    for label, script, argv, expect, out in probes:
        before = folder_state(out)
        code, err = run_in_process(script, argv)
        lines = err.strip().splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]
              and folder_state(out) == before)
        if not ok:
            failures.append(f"{script} [{label}]: exit {code}, stderr {err.strip()[-300:]!r}, "
                            f"wrote {files_under(out)[:3]}")
    assert not failures, f"{len(failures)} of {len(probes)} probes:\n" + "\n".join(failures)
    assert time.time() - t0 < 45, "every probe fails before any model is loaded or trained"


def test_a_probe_as_a_real_subprocess_exits_2_without_traceback(smoke_data, tmp_path):
    bad = write_defects(smoke_data / "pool.jsonl", tmp_path)["answer is 3.7"]
    proc = run_script("sft.py", "--smoke", f"--data={bad}", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                      f"--out_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}:3: expected 'answer' to be an integer, got 3.7"
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------
# the parsers: linear time, never raise


def fuzzed_strings(n, seed=0):
    """Random bytes decoded, long digit runs (up to 1 MB), Unicode digits, step-shaped text."""
    rng = random.Random(seed)
    unicode_digits = "٣٤５߂০१๓"
    for i in range(n):
        kind = i % 5
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode("utf-8", errors="replace")
        elif kind == 1:
            # three runs of 1 MB, twenty of 100 kB, the rest around the bound and int()'s 4,300 digits
            d = "7" * (1_000_000 if i < 15 else 100_000 if i % 1000 == 1 else
                       rng.choice([5, task.MAX_DIGITS, task.MAX_DIGITS + 1, 4301]))
            yield rng.choice([d, f"{d} + 1 = 2", f"Answer: {d}", f"wait, {d} * 2 is 3, not 4", f"answer is {d}",
                              f"1 + {d} = {d}", f"-{d} - -{d} = 0"])
        elif kind == 2:
            yield f"Answer: {rng.choice(unicode_digits)}" + rng.choice(["", "\n1. ٣ + ٤ = 7"])
        elif kind == 3:
            a, b = rng.randint(-10 ** 15, 10 ** 15), rng.randint(-99, 99)
            yield rng.choice([f"{a} * {b} = {a * b}", f"wait, {a} + {b} is {a + b}, not {a}", f"Answer: {a}",
                              f"so the answer is {b}", f"#{b} * #{a}"])
        else:
            yield "".join(rng.choice("0123456789 +-*=#:,Answerwaitisnot\n٣") for _ in range(rng.randint(0, 200)))


def test_parsers_are_fast_and_never_raise_on_fuzzed_strings():
    t0 = time.process_time()  # CPU time: the machine may be shared
    for s in fuzzed_strings(20_000):
        assert 0.0 <= task.judge("3 + 4 * (5 - 2)", [], s) <= 1.0
        assert 0.0 <= task.judge(s, [s], s, [s]) <= 1.0
        plan = task.template([s, s])
        assert isinstance(plan, list)
        assert task.follow_template(plan) is None or isinstance(task.follow_template(plan), list)
        assert task.follow_template([s]) is None or isinstance(task.follow_template([s]), list)
        a = task.parse_answer(s)
        assert a is None or (type(a) is int and abs(a) < 10 ** task.MAX_DIGITS)
        assert task.verify(s, 3) in (True, False) and task.verify(s, float("inf")) is False
    assert time.process_time() - t0 < 10


def test_verify_takes_integer_answers_and_ascii_digits_only():
    assert task.verify("Answer: 3", 3) and task.verify("Answer: -12", -12)
    for answer in (3.9, 3.0, "3", True, float("inf"), float("nan"), None, [3]):
        assert task.verify("Answer: 3", answer) is False, answer
    assert task.verify("Answer: 1", True) is False
    assert task.verify("Answer: ٣", 3) is False and task.parse_answer("Answer: ٣") is None
    assert task.judge("3 + 4", [], "٣ + ٤ = ٧") == 0.5   # not a computation line: an aside
    assert task.parse_answer("Answer: " + "9" * 5000) is None   # no number has that many digits


def old_template(thinking):
    """template() as it was written first (a backward search per operand): the reference. It reads
    lines with the expert's patterns (task.STEP_RE, FIX_RE, CHECK_RE), which know every voice's
    words for '=' and for a correction; the search is what is compared."""
    step_re, fix_re = task.STEP_RE, task.FIX_RE
    ops, results, consumed = [], [], set()
    for line in thinking or []:
        line = str(line)
        fix = fix_re.search(line)
        if fix:
            wrong, right = int(fix[5]), int(fix[4])
            for k in range(len(results) - 1, -1, -1):
                if results[k] == wrong:
                    results[k] = right
                    break
            continue
        m = step_re.search(line)
        if not m or task.CHECK_RE.match(line):
            continue
        operands = []
        for x in (int(m[1]), int(m[3])):
            src = next((k for k in range(len(results) - 1, -1, -1) if k not in consumed and results[k] == x), None)
            if src is None:
                operands.append(str(x))
            else:
                consumed.add(src)
                operands.append(f"#{src + 1}")
        ops.append(f"{operands[0]} {m[2]} {operands[1]}")
        results.append(int(m[4]))
    return ops


def test_template_is_unchanged_on_trajectories_and_linear_on_long_ones():
    rng, cfg = random.Random(3), task.WorldConfig()
    for i in range(2000):
        thinking = task.make_record(rng, cfg, i)["thinking"]
        assert task.template(thinking) == old_template(thinking)
    for i in range(300):  # few distinct values: many repeats, corrections of consumed results
        v = lambda: rng.randint(0, 4)
        lines = [rng.choice([f"{v()} + {v()} = {v()}", f"wait, {v()} + {v()} is {v()}, not {v()}",
                             f"check: {v()} * {v()} = {v()}"]) for _ in range(rng.randint(0, 30))]
        assert task.template(lines) == old_template(lines), lines
    t0 = time.process_time()
    many = ["1 + 1 = 2"] * 100_000 + ["wait, 1 + 1 is 3, not 2", "2 + 3 = 5"] * 20_000
    assert len(task.template(many)) == 120_000 and time.process_time() - t0 < 5


# ----------------------------------------------------------------------------
# generation: a long prompt shortens no other row; ordinary batches are generated exactly as before


@torch.no_grad()
def generate_completions_before(model, tok, prompts, temperature=0.0, max_new_tokens=None,
                                batch_size=256, generator=None, top_k=None):
    """generate_completions as it was before each row had its own budget: the reference."""
    from model import left_pad
    model.eval()
    block = model.config.block_size
    outs = []
    for i in range(0, len(prompts), batch_size):
        idx, mask = left_pad(prompts[i:i + batch_size], tok.eot, "cpu")
        new = min(max_new_tokens or block, block - idx.size(1))
        seqs = model.generate(idx, new, temperature=temperature, top_k=top_k, eos_id=tok.eot,
                              prompt_mask=mask, generator=generator)
        outs.extend(seqs[:, idx.size(1):].tolist())
    return [o[:o.index(tok.eot) + 1] if tok.eot in o else o for o in outs]


def tiny_policy(block_size=48):
    from model import GPT, GPTConfig
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, SimpleNamespace(eot=63)


def test_ordinary_batches_generate_exactly_as_before():
    model, tok = tiny_policy(block_size=32)
    rng = random.Random(0)
    prompts = [[rng.randrange(62) for _ in range(rng.randint(1, 10))] for _ in range(11)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: two threads only wait at their barriers on a shared machine
    try:
        for kwargs in (dict(), dict(max_new_tokens=12), dict(temperature=1.0, max_new_tokens=20),
                       dict(temperature=1.0), dict(temperature=0.8, top_k=5, max_new_tokens=16)):
            outs = []
            for generate in (generate_completions, generate_completions_before):
                g = torch.Generator().manual_seed(7) if kwargs.get("temperature") else None
                outs.append(generate(model, tok, prompts, batch_size=4, generator=g, **kwargs))
            assert outs[0] == outs[1], kwargs
            assert {len(o) for o in outs[0]} != {0}
    finally:
        torch.set_num_threads(threads)


def test_each_row_has_its_own_budget_and_a_full_prompt_gets_nothing(capsys):
    model, tok = tiny_policy(block_size=32)
    calls = []
    generate = model.generate
    model.generate = lambda idx, new, **kw: calls.append((idx.size(0), idx.size(1), new)) or generate(idx, new, **kw)
    prompts = [[1] * 5, [2] * 28, [3] * 6, [4] * 40, [5] * 4]
    outs = generate_completions(model, tok, prompts, max_new_tokens=10, batch_size=8)
    # the three short prompts together with all 10 tokens, the 28-token prompt alone with the 4 left
    assert calls == [(3, 6, 10), (1, 28, 4)]
    assert outs[3] == [] and all(len(o) <= 10 for o in outs) and len(outs[1]) <= 4
    assert "1 of 5 prompts fill the context (block_size=32)" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# files left by killed runs: temporaries, caches, metrics


def test_a_save_removes_the_temporaries_of_killed_saves(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "ckpt.pt"
    stale = tmp_path / f"ckpt.pt.tmp{int(dead.stdout)}"      # its process has exited
    live = tmp_path / f"ckpt.pt.tmp{os.getppid()}"            # a save in progress elsewhere
    other = tmp_path / f"other.pt.tmp{int(dead.stdout)}"       # another file's
    for f in (stale, live, other):
        f.write_bytes(b"half a checkpoint")
    files.save_checkpoint(str(path), {"step": 1})
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_an_unreadable_cache_is_named_then_made_again(tmp_path, capsys):
    path = tmp_path / "design-0123.pt"
    files.save_checkpoint(str(path), {"final": [0.5]})
    path.write_bytes(path.read_bytes()[:40])                   # cut short
    made = rewards.cached(str(path), lambda: {"final": [0.25]})
    assert made == {"final": [0.25]} and f"warning: {path} is not a readable cache" in capsys.readouterr().out
    assert rewards.cached(str(path), lambda: 1 / 0) == {"final": [0.25]}   # rewritten, now reused
    assert "reward design: reusing" in capsys.readouterr().out


def test_a_resumed_run_logs_each_step_once(tmp_path):
    cfg = sft.SFTConfig(max_steps=12, ckpt_every=4, log_every=2, warmup_steps=1, batch_size=2)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(10, 3)
    batch_loss = lambda m, idx: (m(x[idx]).pow(2).mean(), len(idx))
    metrics = tmp_path / "metrics.jsonl"
    saved = {}
    ckpt_fn = lambda step, opt: saved.update(step=step)
    training.train(model, batch_loss, torch.ones(10, dtype=torch.long), cfg, "cpu", log=lambda s: None,
                   ckpt_fn=ckpt_fn, metrics_path=str(metrics), stop_at=7)  # killed after step 6 was logged
    with open(metrics, "a") as f:
        f.write('{"step": 8, "lo')                             # and in the middle of a line
    assert saved["step"] == 7
    training.train(model, batch_loss, torch.ones(10, dtype=torch.long), cfg, "cpu", log=lambda s: None,
                   ckpt_fn=ckpt_fn, metrics_path=str(metrics), start_step=4)  # resumed from the step-4 checkpoint
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 2, 4, 6, 8, 10, 11]


# ----------------------------------------------------------------------------
# one run per output folder; a training loop that meets NaN; the expert on what it cannot parse


def test_a_lock_is_taken_refused_taken_over_and_released(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "out"
    files.lock_out_dir(str(out))
    lock = out / files.LOCK_NAME
    assert lock.read_text() == f"{os.getpid()}\n"
    files.release_locks()
    assert not lock.exists()
    lock.write_text(f"{os.getppid()}\n")                      # a live process's
    with pytest.raises(files.BadInput, match="is in use by process"):
        files.lock_out_dir(str(out))
    with pytest.raises(files.BadInput, match="is in use by process"):
        files.check_writable(str(out))                      # asked before any work
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout)                               # a killed run's
    files.lock_out_dir(str(out))
    assert lock.read_text() == f"{os.getpid()}\n"
    files.release_locks()
    assert not lock.exists()


def test_a_non_finite_loss_is_one_line_and_the_last_checkpoint_stays(tmp_path):
    cfg = sft.SFTConfig(max_steps=12, ckpt_every=4, log_every=100, warmup_steps=1, batch_size=2)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(10, 3)
    saved = []
    batch_loss = lambda m, idx: (m(x[idx]).pow(2).mean() * (float("nan") if saved else 1.0), len(idx))

    def run():
        training.train(model, batch_loss, torch.ones(10, dtype=torch.long), cfg, "cpu", log=lambda s: None,
                       ckpt_fn=lambda step, opt: saved.append(step))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        options.run_main(run)
    assert stop.value.code == 2 and saved == [4]
    assert err.getvalue() == ("error: non-finite loss or gradient at step 4; stopped, the last good checkpoint "
                              "is kept\n")


def test_the_expert_rates_no_step_right_against_a_question_it_cannot_parse():
    for question in ("3 + 4 / 2", "8 / (2 + (3", "3 4", "", "3 + 4 * 2" + ")" * 3):
        assert not task.is_question(question)
        for step in ("3 + 4 = 7", "4 / 2 = 2", "Answer: 5", "so the answer is 5", "wait, 3 + 4 is 7, not 8"):
            assert task.judge(question, [], step) != 1.0, (question, step)
    assert task.is_question("3 + 4 * (5 - 2)") and task.judge("3 + 4", [], "3 + 4 = 7") == 1.0
    assert task.follow_template(None) == [] == task.template(None)
