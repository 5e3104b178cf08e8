"""Shared fixtures: a smoke-sized data set and base model, made once per test session."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_script(*args, check=True, env=None, cwd=ROOT):
    """Run a python script of the repo in a subprocess; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """A smoke data set: pool, questions, facts, tokenizer (data/arith/prepare.py --smoke)."""
    d = tmp_path_factory.mktemp("arith")
    run_script("data/arith/prepare.py", "--smoke", f"--out_dir={d}")
    return d


def data_args(d, data="train.jsonl"):
    """The options that point a script at the smoke data set (--data: the training records, or the pool)."""
    return [f"--tokenizer={d}/tokenizer.tiktoken", f"--data={d}/{data}", f"--test={d}/test.jsonl"]


@pytest.fixture(scope="session")
def smoke_base(smoke_data, tmp_path_factory):
    """A smoke base model pretrained on the smoke facts; returns its checkpoint path."""
    out = tmp_path_factory.mktemp("base")
    run_script("sft.py", "--smoke", "--pretrain", f"--facts={smoke_data}/facts.txt",
               f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--out_dir={out}")
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def smoke_policy(smoke_data, smoke_base, tmp_path_factory):
    """A smoke policy fine-tuned from the smoke base; returns its checkpoint path."""
    out = tmp_path_factory.mktemp("policy")
    run_script("sft.py", "--smoke", f"--init={smoke_base}", "--eval_questions=0", f"--out_dir={out}",
               *data_args(smoke_data))
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def smoke_prms(smoke_data, smoke_policy, tmp_path_factory):
    """Smoke PRMs: {"fused": ReasonFlux-PRM, "mc": response-only, "outcome": outcome scorer} checkpoint paths."""
    root = tmp_path_factory.mktemp("prms")
    paths = {}
    for labels in ("fused", "mc", "outcome"):
        run_script("train_prm.py", "--smoke", f"--labels={labels}", f"--policy={smoke_policy}",
                   f"--data={smoke_data}/train.jsonl", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                   f"--facts={smoke_data}/facts.txt", f"--out_dir={root / labels}", f"--cache_dir={root / 'rewards'}")
        paths[labels] = root / labels / "ckpt.pt"
    return paths
