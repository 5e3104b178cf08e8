"""The README's exercises: every flag exists, and the cheap ones run in --smoke here.

The GRPO (β = 0) and selection (response-only PRM) exercises run in test_grpo.py and
test_select_data.py, whose smoke runs use exactly those options.
"""

import importlib.util
import json
import os

from conftest import run_script, ROOT
from training import parse_config
import grpo
import select_data
import sft
import train_prm
import tts

# data/arith/prepare.py is a script in a folder, not a package: load it by path
spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "arith", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def test_every_exercise_flag_parses():
    assert parse_config(train_prm.PRMConfig, ["--fuse=align,quality"]).fuse == "align,quality"
    assert parse_config(train_prm.PRMConfig, ["--coherence=prob"]).coherence == "prob"
    assert parse_config(train_prm.PRMConfig, ["--judge_noise=0.5"]).judge_noise == 0.5
    assert parse_config(tts.TTSConfig, ["--prm=out/prm_nocoh/ckpt.pt"]).prm == "out/prm_nocoh/ckpt.pt"
    assert grpo.parse_variant("mix@0", grpo.GRPOConfig()).beta == 0.0
    assert parse_config(select_data.SelectConfig, ["--selectors=random,response_prm,rf_total"]).selectors
    assert parse_config(prepare.PrepareConfig, ["--flaw_scale=2"]).flaw_scale == 2.0


def test_double_the_flaw_rate_halves_the_clean_share(tmp_path):
    run_script("data/arith/prepare.py", "--smoke", "--flaw_scale=2", f"--out_dir={tmp_path}")
    flaws = [json.loads(l)["meta"]["flaw"] for l in open(tmp_path / "pool.jsonl")]
    assert 0.15 < flaws.count("clean") / len(flaws) < 0.35  # 0.40 / (0.40 + 2 * 0.60) = 25%


def test_prm_without_coherence_runs(smoke_data, smoke_policy, tmp_path):
    out = run_script("train_prm.py", "--smoke", "--fuse=align,quality", f"--policy={smoke_policy}",
                     f"--data={smoke_data}/train.jsonl", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                     f"--out_dir={tmp_path / 'prm'}", f"--cache_dir={tmp_path / 'rewards'}")
    assert (tmp_path / "prm" / "ckpt.pt").exists() and "step" in out.stdout


def test_gpu_preset_scales_every_stage_up():
    """`--preset=gpu` exists in every script that run.sh passes it to, and makes the run larger."""
    gpu = lambda module, cls, *more: parse_config(cls, ["--preset=gpu", *more], module.PRESETS)
    big = gpu(sft, sft.SFTConfig)
    assert big.n_embd > sft.SFTConfig().n_embd and big.max_steps >= sft.SFTConfig().max_steps
    base = gpu(sft, sft.SFTConfig, "--pretrain")
    assert base.n_embd == big.n_embd and base.max_steps == sft.PRETRAIN["max_steps"]  # same shape as the policy
    assert gpu(train_prm, train_prm.PRMConfig).n_train > train_prm.PRMConfig().n_train
    assert gpu(select_data, select_data.SelectConfig).budget_tokens > select_data.SelectConfig().budget_tokens
    assert gpu(grpo, grpo.GRPOConfig).max_steps > grpo.GRPOConfig().max_steps
    assert gpu(tts, tts.TTSConfig).n_questions > tts.TTSConfig().n_questions
    assert gpu(sft, sft.SFTConfig, "--n_layer=3").n_layer == 3  # explicit options win
