"""sft.py: loss masking, an end-to-end smoke run, DDP, and refusing bad inputs."""

import json
import sys

import pytest
import torch

from conftest import run_script, data_args, ROOT
from tokenizer import load_tokenizer, Tokenizer
from checkpoints import load_checkpoint
import sft
import training


def test_completion_only_loss_mask(smoke_data):
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    prompt, completion = [1, 2, 3, 4], [5, 6, tok.eot]
    X, Y = training.pack([(prompt, completion), ([9, 9], [7, tok.eot])], 32, pad_id=tok.eot)
    # position i predicts token i+1: the last prompt position predicts the first completion token
    assert Y[0].tolist()[:6] == [-1, -1, -1, 5, 6, tok.eot]
    assert (Y[0, 6:] == -1).all(), "padding is not a target"
    assert Y[1].tolist()[:3] == [-1, 7, tok.eot], "the real eot is a target even though pad == eot"
    assert X[0].tolist()[:6] == [1, 2, 3, 4, 5, 6]


def test_template_conditioned_examples_follow_the_plan(smoke_data):
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    records = [json.loads(l) for l in open(smoke_data / "train.jsonl")][:40]
    examples = sft.build_examples(records, tok, template_frac=0.5)
    tmpl = examples[40:]
    assert len(tmpl) > 10
    text = tok.enc.decode(tmpl[0][0] + tmpl[0][1])
    assert "Plan: " in text and "<|think|>" not in text and text.endswith("<|endoftext|>")


def test_sft_smoke_end_to_end(smoke_data, smoke_base, tmp_path):
    out = tmp_path / "policy"
    proc = run_script("sft.py", "--smoke", f"--init={smoke_base}", f"--out_dir={out}", *data_args(smoke_data))
    assert "greedy" in proc.stdout
    ckpt = load_checkpoint(str(out / "ckpt.pt"), kind="policy")
    assert ckpt["step"] == 20 and ckpt["config"]["smoke"]
    res = json.load(open(out / "eval.json"))
    assert 0.0 <= res["greedy"]["acc"] <= 1.0 and res["tokens"] > 0
    losses = [json.loads(l)["loss"] for l in open(out / "metrics.jsonl") if '"loss"' in l]
    assert losses[-1] < losses[0], "training lowers the loss"


def test_resume_continues_to_the_same_weights(smoke_data, smoke_base, tmp_path):
    args = ["sft.py", "--smoke", f"--init={smoke_base}", "--eval_questions=0", *data_args(smoke_data)]
    run_script(*args, f"--out_dir={tmp_path / 'full'}")
    # pretend the run was killed after step 10 (--stop_at keeps the 20-step schedule), then resume
    # ... and keep a snapshot of step 10 on the way (run.sh: the selection students' start)
    run_script(*args, f"--out_dir={tmp_path / 'half'}", "--ckpt_every=10", "--stop_at=10",
               "--snapshot_step=10", f"--snapshot_dir={tmp_path / 'snap'}")
    ck = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 10
    run_script(*args, f"--out_dir={tmp_path / 'half'}", "--resume")
    snap = load_checkpoint(str(tmp_path / "snap" / "ckpt.pt"), kind="policy")
    assert snap["step"] == 10 and "optimizer" not in snap
    assert all(torch.equal(snap["model"][k], ck["model"][k]) for k in ck["model"]), "the snapshot is step 10's model"
    assert snap["origin"] == ck["origin"], "its recorded origin is the run's: select_data.py reads it"
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["model"]
    assert torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["step"] == 20
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_ddp_two_processes_match_one_process(smoke_data, smoke_base, tmp_path):
    common = ["--smoke", f"--init={smoke_base}", "--eval_questions=0", "--log_every=1", "--max_steps=3",
              "--device=cpu", *data_args(smoke_data)]   # gloo on the CPU, also on a machine with one GPU
    run_script("sft.py", *common, f"--out_dir={tmp_path / 'one'}")
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
               *common, f"--out_dir={tmp_path / 'two'}", env={"OMP_NUM_THREADS": "1"})
    read = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")]
    one, two = read("one"), read("two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)


def test_bad_inputs_are_refused_clearly(smoke_data, smoke_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(smoke_data / "train.jsonl").read().splitlines()[:5]
    lines[3] = lines[3][:40]
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out_bad"
    proc = run_script("sft.py", "--smoke", f"--init={smoke_base}", f"--data={bad}", f"--out_dir={out}",
                      f"--tokenizer={smoke_data}/tokenizer.tiktoken", check=False)
    assert proc.returncode != 0 and "bad.jsonl:4" in proc.stderr
    assert not (out / "ckpt.pt").exists(), "nothing half-written"

    proc = run_script("sft.py", "--smoke", f"--tokenizer={tmp_path}/missing.tiktoken", check=False)
    assert proc.returncode != 0 and "prepare.py" in proc.stderr

    proc = run_script("sft.py", "--smoke", "--no_such_key=3", check=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = run_script("sft.py", "--smoke", "--max_steps=many", check=False)
    assert proc.returncode != 0 and "max_steps" in proc.stderr
    proc = run_script("sft.py", "--smoke", "--snapshot_step=5", f"--snapshot_dir={tmp_path / 'snap'}", check=False)
    assert proc.returncode != 0 and "--snapshot_step=5" in proc.stderr and "ckpt_every" in proc.stderr
    proc = run_script("sft.py", "--smoke", "--target_acc=70", check=False)
    assert proc.returncode != 0 and "--target_acc=70" in proc.stderr
    proc = run_script("sft.py", "--smoke", "--anneal_steps=50", check=False)   # no target to decay after
    assert proc.returncode != 0 and "--anneal_steps=50 needs --target_acc" in proc.stderr


def test_checkpoint_with_another_vocabulary_is_refused(smoke_data, smoke_base, tmp_path):
    other = tmp_path / "other"
    run_script("data/arith/prepare.py", "--smoke", "--vocab_size=300", f"--out_dir={other}")
    proc = run_script("sft.py", "--smoke", f"--init={smoke_base}", f"--tokenizer={other}/tokenizer.tiktoken",
                      f"--data={other}/train.jsonl", f"--test={other}/test.jsonl", f"--out_dir={tmp_path / 'x'}",
                      check=False)
    assert proc.returncode != 0 and "vocabulary" in proc.stderr


def test_checkpoint_with_another_shape_is_refused(smoke_base):
    from checkpoints import model_from_checkpoint
    ckpt = load_checkpoint(str(smoke_base), kind="policy")
    ckpt["model_args"]["n_embd"] = 64
    with pytest.raises(ValueError, match="do not fit"):
        model_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="expected a 'prm' checkpoint"):
        load_checkpoint(str(smoke_base), kind="prm")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint():
    cfg = sft.SFTConfig(max_steps=20, ckpt_every=5, log_every=100, warmup_steps=1, batch_size=2)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(10, 3)

    def batch_loss(m, idx, calls=[0]):
        calls[0] += 1
        loss = m(x[idx]).pow(2).mean()
        return (loss * float("nan") if calls[0] == 8 else loss), len(idx)  # step 7 goes bad

    saved = {}
    ckpt_fn = lambda step, opt: saved.update(step=step, weight=model.weight.detach().clone())
    with pytest.raises(FloatingPointError, match="at step 7"):
        training.train(model, batch_loss, torch.ones(10, dtype=torch.long), cfg, "cpu", log=lambda s: None,
                  ckpt_fn=ckpt_fn)
    assert saved["step"] == 5 and torch.isfinite(saved["weight"]).all()  # step 10 was never saved


def test_killed_run_resumes_to_the_same_weights(smoke_data, smoke_base, tmp_path):
    """SIGKILL a real run right after a checkpoint lands: the file is intact and --resume
    finishes with the weights of an uninterrupted run (atomic writes, seeded batches)."""
    import signal
    import subprocess
    import time
    args = ["sft.py", "--smoke", f"--init={smoke_base}", "--eval_questions=0", "--max_steps=30",
            "--ckpt_every=5", *data_args(smoke_data)]
    run_script(*args, f"--out_dir={tmp_path / 'full'}")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, f"--out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first checkpoint was seen: nothing to kill"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished on its own: the kill did not land mid-run"
    ck = torch.load(out / "ckpt.pt", weights_only=True)  # intact, whatever moment the kill hit
    assert ck["step"] in (5, 10, 15, 20, 25), f"killed mid-run, so the last checkpoint is before step 30: {ck['step']}"
    run_script(*args, f"--out_dir={out}", "--resume")
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 30 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_stopping_rule_stops_at_the_first_checkpoint_that_reaches_the_target(smoke_data, smoke_base, tmp_path,
                                                                              monkeypatch):
    # the dev accuracy is scripted: read every 10 steps, 0.2 at step 10, 0.45 at step 20: within 0.1 of the
    # 0.5 target, so the next checkpoint is read too: 0.6 at step 25 stops the run there
    reads = iter([0.2, 0.45, 0.6])
    monkeypatch.setattr(sft, "accuracy", lambda *a, **k: {"acc": next(reads), "by_ops": {}, "n": 1})
    out = tmp_path / "policy"
    args = ["--smoke", f"--init={smoke_base}", "--eval_questions=0", "--ckpt_every=5", "--dev_from=10",
            "--dev_every=10", "--max_steps=40",
            "--target_acc=0.5", f"--dev={smoke_data}/test.jsonl", f"--out_dir={out}", *data_args(smoke_data)]
    sft.main(args)
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 25 and ck["reached_target"], "stopped at the first read at or above the target"
    dev = [json.loads(l) for l in open(out / "metrics.jsonl") if "dev_acc" in l]
    assert [(r["step"], r["dev_acc"]) for r in dev] == [(10, 0.2), (20, 0.45), (25, 0.6)]
    assert max(json.loads(l).get("step", 0) for l in open(out / "metrics.jsonl") if '"loss"' in l) < 25
    sft.main(args + ["--resume"])  # a finished run trains nothing more (no dev read is left to script)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 25


def test_after_the_target_the_lr_decays_to_min_lr_and_a_paused_decay_resumes_to_the_same_model(
        smoke_data, smoke_base, tmp_path, monkeypatch):
    # reads at steps 10 (0.2) and 20 (0.6 >= 0.5): the lr then falls linearly to min_lr over 10 steps,
    # and the run stops at step 30; a run paused at step 25, mid-decay, resumes to the same weights
    args = ["--smoke", f"--init={smoke_base}", "--eval_questions=0", "--ckpt_every=5", "--dev_from=10",
            "--dev_every=10", "--max_steps=60", "--log_every=1", "--target_acc=0.5", "--anneal_steps=10",
            f"--dev={smoke_data}/test.jsonl", *data_args(smoke_data)]
    runs = {}
    for name, extra in (("full", []), ("paused", ["--stop_at=25"])):
        reads = iter([0.2, 0.6])
        monkeypatch.setattr(sft, "accuracy", lambda *a, **k: {"acc": next(reads), "by_ops": {}, "n": 1})
        sft.main(args + [f"--out_dir={tmp_path / name}"] + extra)
        runs[name] = tmp_path / name
    sft.main(args + [f"--out_dir={runs['paused']}", "--resume"])   # no read is left: none may happen
    full = torch.load(runs["full"] / "ckpt.pt", weights_only=True)
    assert full["step"] == 30 and full["reached_target"] and full["target_step"] == 20
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(runs["full"] / "metrics.jsonl")) if "lr" in r}
    cfg = sft.SFTConfig(max_steps=60, warmup_steps=5)   # the smoke preset's schedule
    assert max(lrs) == 29 and lrs[19] == pytest.approx(training.get_lr(19, cfg))
    assert lrs[29] == pytest.approx(cfg.min_lr) and lrs[24] == pytest.approx((training.get_lr(20, cfg) + cfg.min_lr) / 2)
    assert all(lrs[s] > lrs[s + 1] for s in range(20, 29)), "the decay falls at every step"
    resumed = torch.load(runs["paused"] / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 30 and resumed["reached_target"]
    for k in full["model"]:
        assert torch.allclose(full["model"][k], resumed["model"][k], atol=1e-6), k


def test_stopping_rule_reads_samples_at_its_temperature_with_a_fixed_generator(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sft, "accuracy", lambda model, tok, qs, temperature=0.0, generator=None:
                        seen.append((temperature, generator.initial_seed() if generator else None)) or {"acc": 0.5})
    model = torch.nn.Linear(1, 1)
    cfg = sft.SFTConfig(out_dir=str(tmp_path), target_acc=0.4, dev_temperature=1.0, seed=7)
    assert sft.dev_accuracy(cfg, model, None, [], 100) == 0.5
    cfg.dev_temperature = 0.0
    sft.dev_accuracy(cfg, model, None, [], 150)
    assert seen == [(1.0, 7), (0.0, None)], "sampled reads use the run's seed; greedy reads need no generator"
