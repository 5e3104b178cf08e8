"""Reward design and the PRM: each reward on hand-made steps, the loss, scoring edge cases, the cache."""

import json
import math

import pytest
import torch

from conftest import run_script
from model import GPTConfig, load_tokenizer, Tok
from rfprm import (TfidfEncoder, alignment_reward, coherence_reward, fuse_rewards, PRM, prm_loss, load_prm,
                   prm_tokens, score_batch_size)
import rfprm
import train_prm


@pytest.fixture(scope="module")
def tok(smoke_data):
    return Tok(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))


def vecs(tok, encoder, lines):
    return encoder.encode([tok.enc.encode_ordinary(l) for l in lines])


def test_aligned_step_scores_above_unrelated_step(tok):
    response = ["1. 5 - 2 = 3", "2. 4 * 3 = 12", "3. 3 + 12 = 15", "Answer: 15"]
    steps = ["first, 5 - 2 = 3", "hmm, let me keep going", "also, just to see, 8 * 9 = 72"]
    enc = TfidfEncoder().fit([tok.enc.encode_ordinary(l) for l in response + steps])
    r = alignment_reward(vecs(tok, enc, steps), vecs(tok, enc, response),
                         torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert r[0] > r[1] and r[0] > r[2] and r[0] > 0.5
    # a response of another record does not count
    r_other = alignment_reward(vecs(tok, enc, steps[:1]), vecs(tok, enc, response),
                               torch.zeros(1, dtype=torch.long), torch.ones(4, dtype=torch.long))
    assert r_other.item() == 0.0


def test_coherent_successor_scores_above_random_step(tok):
    prev = ["first, 5 - 2 = 3", "first, 5 - 2 = 3"]
    nxt = ["check: 5 - 2 = 3, ok", "also, just to see, 8 * 9 = 72"]
    negatives = ["Answer: 41", "so the answer is 7", "then 6 + 6 = 12", "ok, mind the order of operations"]
    enc = TfidfEncoder().fit([tok.enc.encode_ordinary(l) for l in prev + nxt + negatives])
    neg = vecs(tok, enc, negatives)[None].expand(2, -1, -1)
    logp = coherence_reward(vecs(tok, enc, prev), vecs(tok, enc, nxt), neg, tau=0.1)
    assert logp[0] > logp[1] and (logp <= 0).all()
    prob = coherence_reward(vecs(tok, enc, prev), vecs(tok, enc, nxt), neg, tau=0.1, rescaled=True)
    assert torch.allclose(prob, logp.exp()) and ((prob >= 0) & (prob <= 1)).all()


def test_fusion_weights_sum_to_one_and_favour_high_rewards():
    a, q, c = torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]), torch.tensor([-2.0, -0.1])
    fused, w = fuse_rewards(a, q, c)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert torch.allclose(fused, (w * torch.stack([a, q, c], 1)).sum(1))
    assert w[0, 1] > w[0, 2], "a high reward gets the larger weight"
    assert fused[0] > fused[1]


def test_tfidf_is_deterministic_and_normalised(tok):
    lines = ["first, 5 - 2 = 3", "then 4 * 3 = 12"]
    ids = [tok.enc.encode_ordinary(l) for l in lines]
    a, b = TfidfEncoder().fit(ids).encode(ids), TfidfEncoder().fit(ids).encode(ids)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(2))


def test_prm_loss_is_zero_at_targets_and_flows_only_through_read_positions():
    scores = torch.full((2, 6), 0.5, requires_grad=True)
    t_step = torch.full((2, 6), float("nan"))
    t_final = torch.full((2, 6), float("nan"))
    t_step[0, 1], t_step[1, 3], t_final[0, 5], t_final[1, 4] = 0.5, 0.5, 0.5, 0.5
    assert prm_loss(scores, t_step, t_final).item() == 0.0
    t_step[0, 1], t_final[1, 4] = 0.9, 0.1
    loss = prm_loss(scores, t_step, t_final, lam_step=1.0, lam_final=2.0)
    assert math.isclose(loss.item(), (0.4 ** 2 + 0) / 2 + 2 * (0 + 0.4 ** 2) / 2, rel_tol=1e-6)
    loss.backward()
    read = ~torch.isnan(t_step) | ~torch.isnan(t_final)
    assert (scores.grad[~read] == 0).all() and (scores.grad[0, 1] != 0)


def test_read_positions_are_step_ends(tok):
    ids, tp, rp, end, cut = prm_tokens(tok, "1 + 2", ["1 + 2 = 3", "so the answer is 3"], ["1. 1 + 2 = 3", "Answer: 3"])
    nl = tok.enc.encode_ordinary("\n")[0]
    assert [ids[p] for p in tp] == [nl, tok.end_think]
    assert [ids[p] for p in rp] == [nl, tok.eot] and end == len(ids) - 1 and not cut


def test_score_never_crashes_on_odd_records(smoke_prms):
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    records = [{"question": "1 + 2", "thinking": [], "response": ["Answer: 3"]},
               {"question": "1 + 2", "thinking": ["1 + 2 = 3"], "response": []},
               {"question": "1 + 2", "thinking": ["7 " * 400] * 3, "response": ["Answer: 3"]},
               {"question": "", "thinking": [""], "response": [""]}]
    out = prm.score(records)
    assert len(out) == 4 and prm.truncated == 1
    for o, r in zip(out, records):
        assert len(o["step"]) == len(r["thinking"]) and len(o["response"]) == len(r["response"])
        assert all(math.isfinite(x) for x in o["step"] + o["response"] + [o["trajectory"], o["total"]])
    assert out[0]["total"] == pytest.approx(out[0]["trajectory"])  # no steps: mean(step) counts as 0


def test_response_only_prm_reads_thinking_as_response_steps(smoke_prms, smoke_data):
    prm = load_prm(str(smoke_prms["mc"]), device="cpu")
    assert prm.mode == "response_only"
    rec = json.loads(open(smoke_data / "pool.jsonl").readline())
    out = prm.score([rec])[0]
    assert len(out["step"]) == len(rec["thinking"]) and len(out["response"]) == len(rec["response"])


def test_score_in_length_sorted_batches_keeps_record_order(smoke_prms, smoke_data):
    """score() batches records by length; every record still gets its own scores, in input order."""
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    recs = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:12]
    recs = sorted(recs, key=lambda r: -len(r["thinking"]))[::2] + sorted(recs, key=lambda r: len(r["thinking"]))[::2]
    together = prm.score(recs, batch_size=4)
    for r, o in zip(recs, together):
        alone = prm.score([r])[0]
        assert len(o["step"]) == len(r["thinking"])
        assert o["total"] == pytest.approx(alone["total"], abs=1e-5)
        assert o["step"] == pytest.approx(alone["step"], abs=1e-5)


def test_score_forwards_cache_sized_batches_on_cpu(smoke_prms, smoke_data):
    """By default a CPU scores 16 rows per forward (rfprm.score_batch_size), not all records at once."""
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    recs = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:40]
    rows = []
    hook = prm.register_forward_hook(lambda module, args, out: rows.append(args[0].size(0)))
    try:
        prm.score(recs)
    finally:
        hook.remove()
    assert rows == [16, 16, 8] and score_batch_size("cpu") == 16 and score_batch_size("cuda") == 256


def test_reward_cache_reuse_is_exact(smoke_data, smoke_policy, tmp_path):
    args = ["train_prm.py", "--smoke", f"--policy={smoke_policy}", f"--data={smoke_data}/pool.jsonl",
            f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--cache_dir={tmp_path / 'rewards'}"]
    first = run_script(*args, f"--out_dir={tmp_path / 'a'}")
    assert "reusing" not in first.stdout
    second = run_script(*args, f"--out_dir={tmp_path / 'b'}")
    assert "reusing" in second.stdout
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the same targets give the same PRM"
    # another setting that changes rewards makes a new design
    third = run_script(*args, "--tau=0.5", f"--out_dir={tmp_path / 'c'}")
    assert "reusing" not in third.stdout


def test_relative_trajectory_reward(smoke_data, smoke_policy, tmp_path):
    assert train_prm.relative_final([1.0, 0.5, 0.0], [1.0, 0.25, 0.5]) == [0.5, 0.625, 0.25]
    args = ["train_prm.py", "--smoke", "--final=relative", f"--policy={smoke_policy}",
            f"--data={smoke_data}/pool.jsonl", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
            f"--cache_dir={tmp_path / 'rewards'}", f"--out_dir={tmp_path / 'prm'}"]
    proc = run_script(*args)
    assert "rollouts without a template" in proc.stdout and (tmp_path / "prm" / "ckpt.pt").exists()
    assert len(list((tmp_path / "rewards").glob("plain-*.pt"))) == 1
    proc = run_script(*args[:-1], "--final=relativ", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode != 0 and "--final must be template or relative" in proc.stderr


def test_auroc_and_first_error_f1_by_hand():
    assert train_prm.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert train_prm.auroc([0.5, 0.5], [0, 1]) == 0.5
    steps = [[0.9, 0.2, 0.9], [0.9, 0.9], [0.1]]
    assert train_prm.first_error_predictions(steps, 0.5) == [1, -1, 0]
    assert train_prm.first_error_f1(steps, [1, -1, 0], 0.5) == 1.0
    assert train_prm.first_error_f1(steps, [2, -1, 0], 0.5) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_total_is_mean_step_plus_alpha_trajectory():
    assert rfprm.prm_total({"step": [0.2, 0.6], "trajectory": 0.5}, 1.0) == pytest.approx(0.9)
    assert rfprm.prm_total({"step": [0.2, 0.6], "trajectory": 0.5}, 0.0) == pytest.approx(0.4)
    assert rfprm.prm_total({"step": [], "trajectory": 0.5}, 1.5) == pytest.approx(0.75)


def test_rows_pick_table_rows_in_table_order_and_refuse_unknown_names():
    assert [v[0] for v in train_prm.chosen_variants("")] == [v[0] for v in train_prm.VARIANTS]
    picked = train_prm.chosen_variants("response, main")
    assert [v[1] for v in picked] == ["", "_response"]
    with pytest.raises(ValueError, match="unknown quailty"):
        train_prm.chosen_variants("main,quailty")
    with pytest.raises(ValueError, match="add --eval"):
        train_prm.main(["--rows=quality"])


def test_histogram_figure_for_a_single_scorer(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"meta": {"good": g}} for g in (True, False, True, False)]
    scores = {"response-only PRM (MC)": [{"total": x} for x in (0.9, 0.2, 0.8, 0.4)]}
    path = str(tmp_path / "hist.png")
    assert train_prm.save_histograms(scores, records, path) and (tmp_path / "hist.png").stat().st_size > 0


def test_score_cli_prints_every_step(smoke_prms, smoke_data):
    out = run_script("rfprm.py", "score", str(smoke_data / "pool.jsonl"), f"--prm={smoke_prms['fused']}", "--n=2").stdout
    recs = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:2]
    assert out.count("Q: ") == 2 and "\033[" not in out, "no colour codes when stdout is not a terminal"
    assert out.count("  think ") == sum(len(r["thinking"]) for r in recs)
    assert out.count("trajectory ") == 2


def test_long_records_are_named_and_training_goes_on(smoke_data, smoke_policy, tmp_path, capsys):
    """A question longer than the context is skipped, a 200 kB step of digits truncated; both named by id."""
    rows = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:20]
    rows[2]["question"] = " + ".join(["1"] * 400)     # ~1,600 tokens: a context of 256 has no room
    rows[4]["thinking"][1] = "7" * 200_000             # once minutes in a quadratic-time regex
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_prm.main(["--smoke", "--n_train=20", f"--policy={smoke_policy}", f"--data={pool}", f"--out_dir={tmp_path / 'prm'}",
                    f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--cache_dir={tmp_path / 'rewards'}"])
    out = capsys.readouterr().out
    assert f"1 of 20 records have a prompt of block_size=256 tokens or more, skipped: {rows[2]['id']}\n" in out
    assert f"records longer than block_size=256, truncated: {rows[4]['id']}" in out
    assert (tmp_path / "prm" / "ckpt.pt").exists()
