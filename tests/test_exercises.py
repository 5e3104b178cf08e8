"""The README's exercises, each run small (--smoke, the smoke fixtures) and checked on a
property of its result that would not hold if the option were ignored.

The PRM options are checked on the training labels they produce (rewards.targets_for, on
the reward design the smoke_prms fixture cached), then end to end: a PRM without coherence
trains and Best-of-N reads it.
"""

import importlib.util
import json
import os

import pytest
import torch

from conftest import run_script, data_args, ROOT
from files import read_jsonl, skip_long_prompts, file_digest
from tokenizer import Tokenizer, load_tokenizer, encode_prompt, encode_completion
from options import parse_config
from checkpoints import load_checkpoint
from rewards import fuse_rewards, gated_fusion
from rfprm import load_prm
import grpo
import rewards
import select_data
import sft
import task
import train_prm
import tts

# data/arith/prepare.py is a script in a folder, not a package: load it by path
spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "arith", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)


def prm_targets(smoke_data, smoke_policy, cache_dir, *options):
    """train_prm.py's per-record targets under `options`, on the records its main would read."""
    cfg = parse_config(train_prm.PRMConfig, ["--smoke", f"--policy={smoke_policy}", f"--data={smoke_data}/train.jsonl",
                                             f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                                             f"--cache_dir={cache_dir}", *options], train_prm.PRESETS)
    tok = Tokenizer(load_tokenizer(cfg.tokenizer))
    records = read_jsonl(cfg.data, ("question", "answer", "thinking", "response"))
    records, questions = records[:cfg.n_train], records[cfg.n_train:]
    block = load_checkpoint(cfg.policy, kind="policy", enc=tok.enc)["model_args"]["block_size"]
    records = skip_long_prompts(records, [len(encode_prompt(tok, r["question"])) for r in records], block)
    records, targets = rewards.targets_for(cfg, records, questions, tok)
    return targets, records, cfg


def flat(per_record):
    return torch.tensor([v for rec in per_record for v in rec])


@pytest.fixture(scope="module")
def design(smoke_data, smoke_policy, smoke_prms):
    """The smoke reward design (cached by the smoke_prms fixture) and its cache folder."""
    cache = smoke_prms["fused"].parent.parent / "rewards"
    _, records, cfg = prm_targets(smoke_data, smoke_policy, cache)
    path = cache / f"design-{rewards.cache_key(cfg, [cfg.data, cfg.policy], rewards.DESIGN_KEYS)}.pt"
    d = torch.load(path, weights_only=True)
    assert len(d["quality"]) == len(records)
    return d, cache


def test_without_coherence_the_labels_do_not_read_coherence(smoke_data, smoke_policy, design):
    d, cache = design
    a, q, c = flat(d["align"]), flat(d["quality"]), flat(d["coherence_logprob"])
    nocoh = flat(t["step"] for t in prm_targets(smoke_data, smoke_policy, cache, "--fuse=align,quality")[0])
    assert nocoh.tolist() == pytest.approx(gated_fusion(fuse_rewards(a, q)[0], q).tolist(), abs=1e-6)
    default = flat(t["step"] for t in prm_targets(smoke_data, smoke_policy, cache)[0])
    assert default.tolist() == pytest.approx(gated_fusion(fuse_rewards(a, q, c)[0], q).tolist(), abs=1e-6)
    assert not torch.allclose(nocoh, default), "dropping coherence changes the labels"


def test_coherence_as_a_probability_gets_more_weight(smoke_data, smoke_policy, design):
    d, cache = design
    a, q, c = flat(d["align"]), flat(d["quality"]), flat(d["coherence_logprob"])
    prob = flat(t["step"] for t in prm_targets(smoke_data, smoke_policy, cache, "--coherence=prob")[0])
    assert prob.tolist() == pytest.approx(gated_fusion(fuse_rewards(a, q, c.exp())[0], q).tolist(), abs=1e-6)
    coh_prob = flat(t["step"] for t in prm_targets(smoke_data, smoke_policy, cache, "--labels=coherence",
                                                   "--coherence=prob")[0])
    coh_logp = flat(t["step"] for t in prm_targets(smoke_data, smoke_policy, cache, "--labels=coherence")[0])
    assert (coh_logp <= 0).all() and torch.allclose(coh_prob, coh_logp.exp()) and (coh_prob <= 1).all()
    # e^x > x: every step's softmax weight on coherence grows (the README's ~5% -> ~25%)
    w_logp, w_prob = fuse_rewards(a, q, c)[1][:, 2], fuse_rewards(a, q, c.exp())[1][:, 2]
    assert (w_prob > w_logp).all() and d["fusion_weights"]["prob"][2] > d["fusion_weights"]["logprob"][2]


def test_a_noisier_expert_blurs_every_quality_label(smoke_data, smoke_policy, tmp_path):
    targets, records, _ = prm_targets(smoke_data, smoke_policy, tmp_path, "--judge_noise=0.5", "--n_train=6",
                                      "--labels=quality")
    judge = [task.judge(r["question"], r["thinking"][:t], line, r["response"])
             for r in records for t, line in enumerate(r["thinking"])]
    noisy = [v for t in targets for v in t["step"]]
    assert len(noisy) == len(judge) > 6
    # r_qual = 0.5·judge + 0.5·U(0, 1): in [judge/2, judge/2 + 1/2], and never the clean verdict itself
    assert all(j / 2 <= v <= j / 2 + 0.5 for v, j in zip(noisy, judge)), (noisy, judge)
    assert all(v != j for v, j in zip(noisy, judge)), (noisy, judge)


def test_prm_without_coherence_then_best_of_n_with_it(smoke_data, smoke_policy, smoke_prms, design, tmp_path):
    _, cache = design
    out = run_script("train_prm.py", "--smoke", "--fuse=align,quality", f"--policy={smoke_policy}",
                     f"--data={smoke_data}/train.jsonl", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                     f"--facts={smoke_data}/facts.txt", f"--out_dir={tmp_path / 'prm_nocoh'}", f"--cache_dir={cache}")
    assert "reward design: reusing" in out.stdout, "--fuse picks from the same design, it does not redo it"
    nocoh = torch.load(tmp_path / "prm_nocoh" / "ckpt.pt", weights_only=True)["model"]
    fused = torch.load(smoke_prms["fused"], weights_only=True)["model"]
    assert nocoh.keys() == fused.keys() and any(not torch.equal(nocoh[k], fused[k]) for k in fused), \
        "other labels, same seed: other weights"
    # Best-of-N reads the PRM --prm names: pointed at the same file as the response-only row, the two rows agree
    run_script("tts.py", "--smoke", f"--policy={smoke_policy}", f"--prm={tmp_path / 'prm_nocoh' / 'ckpt.pt'}",
               f"--prm_response={tmp_path / 'prm_nocoh' / 'ckpt.pt'}", "--prm_outcome=",
               f"--out_dir={tmp_path / 'tts'}", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
               f"--test={smoke_data}/test.jsonl")
    curves = json.loads((tmp_path / "tts" / "results.json").read_text())["curves"]
    assert "outcome scorer" not in curves
    assert curves["ReasonFlux-PRM"] == curves["response-only PRM"]


def test_beta_zero_rewards_the_rule_alone(smoke_prms):
    prm = load_prm(str(smoke_prms["fused"]), "cpu")
    tok = prm.tok
    q = {"question": "2 + 3 * 4", "answer": 14}
    comps = [encode_completion(tok, ["first, 3 * 4 = 12", "then 2 + 12 = 14"],
                               ["1. 3 * 4 = 12", "2. 2 + 12 = 14", "Answer: 14"]),
             encode_completion(tok, ["2 + 3 = 5", "5 * 4 = 20"], ["Answer: 20"])]
    zero = grpo.parse_variant("mix@0", grpo.GRPOConfig())
    rew = grpo.reward_batch(tok, comps, [q, q], [True, False], prm, zero)
    assert rew["prm"] is not None and (rew["prm"] > 0).all(), "the PRM is read"
    assert rew["reward"].tolist() == rew["rule"].tolist() == [1.0, 0.0]
    mix = grpo.reward_batch(tok, comps, [q, q], [True, False], prm, grpo.parse_variant("mix", grpo.GRPOConfig()))
    assert mix["reward"].tolist() != [1.0, 0.0]


def test_selection_with_the_response_only_prm(smoke_data, smoke_base, smoke_prms, tmp_path):
    out = tmp_path / "select"
    run_script("select_data.py", "--smoke", "--selectors=random,response_prm,rf_total,rf_top_k", "--seeds=1",
               f"--init={smoke_base}", f"--prm={smoke_prms['fused']}", f"--prm_response={smoke_prms['mc']}",
               f"--out_dir={out}", *data_args(smoke_data, "pool.jsonl"))
    res = json.loads((out / "results.json").read_text())
    assert list(res["summary"]) == ["random", "response_prm", "rf_total", "rf_top_k"]
    selected = {key: s["runs"][0]["selected"] for key, s in res["summary"].items()}
    # each top-K selector kept the K best records by its own PRM's total (the scores cached in out_dir)
    pool = f"{smoke_data}/pool.jsonl"
    scores = {}
    for key, ckpt, name in (("response_prm", smoke_prms["mc"], "response-only"),
                            ("rf_top_k", smoke_prms["fused"], "reasonflux-prm")):
        n_columns = len(select_data.POOL_COLUMNS)
        scores[key] = torch.load(out / f"pool-scores-{file_digest(pool)}-{file_digest(str(ckpt))}-{name}-{n_columns}.pt")
        assert selected[key] == select_data.top_k(scores[key][:, 1].tolist(), res["k"]), key
    assert selected["response_prm"] != selected["rf_top_k"]
    # ReasonFlux-PRM draws among the records its PRM accepts: every step and the trajectory >= 1/2
    _, total, worst, trajectory = scores["rf_top_k"].T.tolist()[:4]   # then the aggregations
    accepted = [w >= 0.5 and t >= 0.5 for w, t in zip(worst, trajectory)]
    assert selected["rf_total"] == select_data.accepted_k(accepted, total, res["k"], res["seeds"][0])


def test_double_the_flaw_rate_halves_the_clean_share(tmp_path):
    run_script("data/arith/prepare.py", "--smoke", "--flaw_scale=2", f"--out_dir={tmp_path}")
    flaws = [json.loads(l)["meta"]["flaw"] for l in open(tmp_path / "pool.jsonl")]
    assert 0.15 < flaws.count("clean") / len(flaws) < 0.35  # 0.40 / (0.40 + 2 * 0.60) = 25%


def test_a_misreading_teacher_writes_slips_of_right_arithmetic(tmp_path):
    """--misread=1: every slip it can misread keeps right arithmetic on a wrong operand; 0: none does."""
    def right_arithmetic_slips(out, *options):
        run_script("data/arith/prepare.py", "--smoke", f"--out_dir={out}", *options)
        n = 0
        for line in open(out / "pool.jsonl"):
            r = json.loads(line)
            if r["meta"]["flaw"] == "slip":
                ok = r["meta"]["response_ok"][:-1]
                k = ok.index(False) if False in ok else None
                m = task.STEP_RE.search(r["response"][k]) if k is not None else None
                n += bool(m and task.apply_op(m[2], int(m[1]), int(m[3])) == int(m[4]))
        return n
    assert right_arithmetic_slips(tmp_path / "a", "--misread=1") >= 5
    assert right_arithmetic_slips(tmp_path / "b") == 0


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
