"""The PRM: its readout and surprise term, the confidence baseline, read positions, the loss,
scoring edge cases, the cache, and the ProcessBench metrics."""

import json
import math
import shutil

import pytest
import torch

from conftest import run_script
import rfprm
from files import BadInput
from tokenizer import Tokenizer, load_tokenizer, padded_vocab_size, encode_prompt
from model import GPT, GPTConfig
from rfprm import (PRM, prm_loss, load_prm, records_that_fit, prm_tokens, prm_total, batch_of, step_surprise,
                   score_batch_size, aggregate, AGGREGATIONS, total_range, TOTALS)
from train_prm import arithmetic_accuracy
import processbench
import task
import train_prm


@pytest.fixture(scope="module")
def tok(smoke_data):
    return Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))


FACTS = [(a, b) for a in range(1, 5) for b in range(1, 5)]


def fact_record(a, b, c):
    return {"question": f"{a} + {b}", "thinking": ["let me see", f"then {a} + {b} = {c}"], "response": [f"Answer: {c}"]}


@pytest.fixture(scope="module")
def arith_lm(tok):
    """A tiny GPT that has learnt sixteen sums in the PRM's record layout (a few seconds on a CPU)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=padded_vocab_size(tok.enc), n_layer=2, n_head=2, n_embd=64))
    rows = [prm_tokens(tok, **{k: v for k, v in fact_record(a, b, a + b).items()})["ids"] for a, b in FACTS]
    X = torch.tensor(rows)                   # every record has the same length
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(X[:, :-1], X[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_wrong_result_is_surprising_and_lowers_the_score(tok, arith_lm):
    right, wrong = fact_record(2, 3, 5), fact_record(2, 3, 7)
    prm = PRM(arith_lm.config)                 # readout="surprise"; head at zero: the score is σ(a·ℓ)
    prm.gpt.load_state_dict(arith_lm.state_dict())
    # an operand the question does not have: right arithmetic, wrong step
    other = {**right, "thinking": ["let me see", "then 2 + 4 = 6"], "response": ["Answer: 6"]}
    idx, checked_of = batch_of([prm_tokens(tok, **r) for r in (right, wrong, other)], tok.eot)
    ends = prm_tokens(tok, **right)["think"]
    ell = step_surprise(prm.gpt, prm.gpt.hidden(idx), idx, checked_of)
    assert ell[0, ends[1]] > -0.5 > -3 > ell[1, ends[1]], ell[:, ends]
    assert ell[2, ends[1]] < ell[0, ends[1]] - 1.5, "ℓ on the computation checks the operands too"
    assert ell[0, ends[0]] == 0 and ell[1, ends[0]] == 0, "a filler states no result: no surprise"
    idx, checked_of = idx[:2], checked_of[:2]
    scores, _ = prm(idx, checked_of)
    assert scores[0, ends[1]] > 0.45 > 0.1 > scores[1, ends[1]]       # σ(ℓ): about ½ against about 0
    # the paper's plain head cannot see it without training: the same score for both
    plain = PRM(arith_lm.config, readout="plain")
    plain.gpt.load_state_dict(arith_lm.state_dict())
    assert torch.equal(plain(idx, checked_of)[0][0, ends[1]], plain(idx, checked_of)[0][1, ends[1]])
    # the gradient reaches the backbone through ℓ alone (the head's weights are still zero)
    prm.zero_grad()
    scores[1, ends[1]].backward()
    assert prm.head.weight.abs().sum() == 0
    assert prm.gpt.h[0].attn.c_attn.weight.grad.abs().sum() > 0 and prm.gpt.wte.weight.grad.abs().sum() > 0
    assert prm.surprise_weight.grad != 0


def test_the_result_term_reads_the_result_and_not_the_words_around_it(tok, arith_lm):
    """The default ℓ (checked="result") reads the result's tokens alone: in the voice the LM learnt
    ('then a + b = c') a wrong result is surprising, and after words it never read ('following that,
    a + b yields c') a right result is far less surprising than under checked="computation", whose
    span holds the unread connective. Whether a wrong result is caught in an unread voice is a
    property of a PRM trained on many voices, not of this one-voice fixture (its margin there moves
    with the CPU's thread count), so train_prm.py's held-out-voice rows measure it."""
    lines = [f"{lead}2 + 3 {eq} {c}" for lead, eq in (("then ", "="), ("following that, ", "yields"))
             for c in (5, 7)]
    recs = [{"question": "2 + 3", "thinking": ["we should crack this one", line], "response": []} for line in lines]
    encoded = [prm_tokens(tok, **r) for r in recs]

    def surprise(checked):
        prm = PRM(arith_lm.config, checked=checked)
        prm.gpt.load_state_dict(arith_lm.state_dict())
        idx, token_of = batch_of(encoded, tok.eot, prm.read_key())
        ell = step_surprise(prm.gpt, prm.gpt.hidden(idx), idx, token_of)
        return [ell[j, e["think"][1]].item() for j, e in enumerate(encoded)]

    result, computation = surprise("result"), surprise("computation")
    assert result[0] > result[1] + 1, result                            # seen voice: right, then wrong
    assert result[2] > computation[2] + 0.5, (result, computation)      # unread words do not count


def test_the_operand_term_reads_the_number_and_not_the_words_around_it(tok, arith_lm):
    """checked="numbers": ℓ^op reads the operand digits, each among the digits alone, so a number
    the question's state does not have is surprising, and after words the LM never read a right
    one is far less surprising than under the full softmax (the unread words do not count).
    Whether a wrong operand is caught in an unread voice is a property of a PRM trained on many
    voices, not of this one-voice fixture (its margin there moves with the seed and the CPU), so
    it is measured by train_prm.py's held-out-voice rows, not asserted here."""
    prm = PRM(arith_lm.config, checked="numbers")
    prm.gpt.load_state_dict(arith_lm.state_dict())
    prm.tok = tok
    lines = [f"{lead}2 + {b} {eq} {2 + b}" for lead, eq in (("then ", "="), ("following that, ", "yields"))
             for b in (3, 4)]
    recs = [{"question": "2 + 3", "thinking": ["let me see", line], "response": []} for line in lines]
    encoded = [prm_tokens(tok, **r) for r in recs]
    idx, token_of = batch_of(encoded, tok.eot, prm.read_key())
    assert token_of.shape[-1] == 2 and prm.read_key() == ("result_of", "operands_of")
    assert [tok.enc.decode([e["ids"][p] for p, x in enumerate(e["operands_of"]) if x >= 0]) for e in encoded[:2]] \
        == [" 2 3", " 2 4"], "the operands' digits, not the operator or the result"
    h = prm.gpt.hidden(idx)
    ops = step_surprise(prm.gpt, h, idx, token_of[..., 1], rfprm.digit_ids(tok))
    full = step_surprise(prm.gpt, h, idx, token_of[..., 1])
    at = lambda ell: [ell[j, e["think"][1]].item() for j, e in enumerate(encoded)]
    assert at(ops)[0] > at(ops)[1] + 1, at(ops)                       # right operand, then wrong
    assert at(ops)[2] > at(full)[2] + 1, (at(ops), at(full))          # unread words: digits alone
    assert all(a >= b - 1e-5 for a, b in zip(at(ops), at(full))), "among the digits: never more surprising"
    scores, _ = prm(idx, token_of)
    assert scores[0, encoded[0]["think"][1]] > scores[1, encoded[1]["think"][1]] + 0.1


def test_confidence_baseline_on_a_hand_made_record(tok, arith_lm):
    scorer = PRM(arith_lm.config, readout="confidence")
    scorer.gpt.load_state_dict(arith_lm.state_dict())
    scorer.tok, scorer.alpha = tok, 0.0
    good, bad = scorer.score([fact_record(3, 4, 7), fact_record(3, 4, 8)])
    assert good["step"][0] == pytest.approx(bad["step"][0]) and good["step"][0] > 0.9, "a learnt line: confident"
    # exp(the lowest token log-probability): several times apart (an ordering with a margin; the ratio of a
    # tiny trained model moves with the CPU's float path, so no tighter ratio is asserted)
    assert good["step"][1] > 0.5 and bad["step"][1] < good["step"][1] / 3
    # every token of the step counts, not only its result: an odd word lowers the score too
    odd = scorer.score([dict(fact_record(3, 4, 7), thinking=["let me see", "zebra 3 + 4 = 7"])])[0]
    assert odd["step"][1] < good["step"][1] / 3
    assert good["response"][0] > bad["response"][0]
    assert good["total"] == pytest.approx(min(good["response"]) * sum(good["step"]) / 2)   # gate, α = 0
    assert good["total"] > bad["total"]


def test_backbone_arithmetic_accuracy(tok, arith_lm):
    # the tiny model has learnt most of its sixteen sums, not always every one: the float path of the
    # CPU (its thread count) decides the last; what must hold is that it knows them and a blank model not
    trained = arithmetic_accuracy(arith_lm, tok, [fact_record(a, b, a + b) for a, b in FACTS])
    # lines the expert judges wrong are not counted; a model that knows nothing scores 0
    assert arithmetic_accuracy(arith_lm, tok, [fact_record(1, 1, 5)]) == 0.0
    blank = GPT(arith_lm.config)
    untrained = arithmetic_accuracy(blank, tok, [fact_record(a, b, a + b) for a, b in FACTS])
    assert trained >= 0.75 and untrained <= trained - 0.5, (trained, untrained)


def test_read_positions_and_result_tokens(tok):
    e = prm_tokens(tok, "1 + 2", ["1 + 2 = 3", "hmm, ok", "so the answer is 13"], ["1. 1 + 2 = 3", "Answer: 3"])
    ids, nl = e["ids"], tok.enc.encode_ordinary("\n")[0]
    assert [ids[p] for p in e["think"]] == [nl, nl, tok.end_think]
    assert [ids[p] for p in e["response"]] == [nl, tok.eot] and e["end"] == len(ids) - 1 and not e["truncated"]
    results = {end: tok.enc.decode([ids[p] for p, x in enumerate(e["result_of"]) if x == end])
               for end in e["think"] + e["response"]}
    assert [results[p] for p in e["think"]] == [" 3", "", " 13"]
    assert [results[p] for p in e["response"]] == [" 3", " 3"]
    # the surprise term checks the whole computation where there is one, else the result
    checked = {end: tok.enc.decode([ids[p] for p, x in enumerate(e["checked_of"]) if x == end])
               for end in e["think"] + e["response"]}
    assert [checked[p] for p in e["think"]] == ["1 + 2 = 3", "", " 13"]
    assert [checked[p] for p in e["response"]] == [" 1 + 2 = 3", " 3"]
    fix = prm_tokens(tok, "4 * 3", ["wait, 4 * 3 is 12, not 13", "check: 4 * 3 = 12, ok"], [])
    assert [tok.enc.decode([fix["ids"][p] for p, x in enumerate(fix["checked_of"]) if x == end])
            for end in fix["think"]] == [" 4 * 3 is 12", " 4 * 3 = 12"]
    assert len(e["result_of"]) == len(ids) and encode_prompt(tok, "1 + 2") == ids[:len(encode_prompt(tok, "1 + 2"))]
    cut = prm_tokens(tok, "1 + 2", ["7 " * 100], ["Answer: 3"], block_size=32)
    assert cut["truncated"] and len(cut["ids"]) == 32 and max(cut["result_of"] + cut["response"]) <= 31


def test_pack_prm_puts_targets_where_steps_end(tok):
    rec = {"question": "3 + 4", "thinking": ["first, 3 + 4 = 7", "so the answer is 7"], "response": ["Answer: 7"]}
    targets = [{"step": [0.9, 0.6], "response": [1.0], "final": 0.25, "approved": [True, False, True]},
               {"step": [0.1, 0.2], "response": [], "final": float("nan"), "approved": []}]
    ids, checked_of, t_step, t_final, lm, lengths = train_prm.pack_prm([rec, rec], targets, tok, "full", 256)
    e = prm_tokens(tok, **rec)
    assert lengths.tolist() == [len(e["ids"])] * 2 and ids[0, :len(e["ids"])].tolist() == e["ids"]
    step_at = (~torch.isnan(t_step[0])).nonzero().flatten().tolist()
    assert step_at == e["think"] + e["response"] and t_step[0, step_at].tolist() == pytest.approx([0.9, 0.6, 1.0])
    assert (~torch.isnan(t_step[1])).nonzero().flatten().tolist() == e["think"], "no response targets: none read"
    assert (~torch.isnan(t_final[0])).nonzero().flatten().tolist() == [e["end"]] and t_final[0, e["end"]] == 0.25
    assert torch.isnan(t_final[1]).all()
    # the LM targets: the checked tokens of the approved steps (first thinking step's '3 + 4 = 7',
    # the answer's 7), one position early
    checked = [p for p, end in enumerate(e["checked_of"]) if end in (e["think"][0], e["response"][0])]
    assert tok.enc.decode([e["ids"][p] for p in checked]) in ("3 + 4 = 7 7", " 3 + 4 = 7 7")
    assert (lm[0] >= 0).nonzero().flatten().tolist() == [p - 1 for p in checked]
    assert lm[0, [p - 1 for p in checked]].tolist() == [e["ids"][p] for p in checked] and (lm[1] == -1).all()
    # the response-only baseline reads its labels at the response steps
    _, _, t_mc, _, _, _ = train_prm.pack_prm([rec], [{"step": [], "response": [0.5], "final": float("nan"),
                                                      "approved": []}], tok, "response_only", 256)
    assert (~torch.isnan(t_mc[0])).sum() == 1
    # a record longer than the context is left out, not trained with its later steps piled on the last position
    long = {**rec, "thinking": ["hmm, let me think"] * 40}
    ids, *_, lengths = train_prm.pack_prm([long, rec], targets, tok, "full", 64)
    assert lengths.tolist() == [len(e["ids"])] and ids[0, :len(e["ids"])].tolist() == e["ids"]


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


def test_total_gates_the_papers_total_by_the_worst_response_step():
    s = {"step": [0.2, 0.6], "response": [1.0, 0.1, 0.5], "trajectory": 0.5}
    assert prm_total(s, 1.0, "paper") == pytest.approx(0.9)                   # the paper's mean + α·traj
    assert prm_total(s, 0.0, "paper") == pytest.approx(0.4)
    assert prm_total(s, 1.0) == pytest.approx(0.1 * 0.9)                      # ours: gated by the worst response step
    assert prm_total(s, 1.0, "sum") == pytest.approx(0.4 + 0.1 + 0.5)         # before: the worst response step added
    assert prm_total({"step": [], "response": [], "trajectory": 0.5}, 1.5, "paper") == pytest.approx(0.75)
    assert prm_total({"step": [0.9], "response": [], "trajectory": 0.5}, 1.0) == 0.0   # no response: no answer
    # a wrong response sinks a pair however well it thought; the sum lets long confident thinking make up for it
    thought_well = {"step": [0.95] * 6, "response": [0.05], "trajectory": 0.9}
    good = {"step": [0.6, 0.6], "response": [0.6], "trajectory": 0.5}
    assert prm_total(good, 1.0) > prm_total(thought_well, 1.0)
    assert prm_total(good, 1.0, "sum") < prm_total(thought_well, 1.0, "sum")
    assert [total_range(1.0, t) for t in TOTALS] == [2.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="total must be one of"):
        prm_total(s, 1.0, "mean")


def test_aggregations_of_a_hand_made_score():
    """Four ways of reading the thinking steps, each with and without α · trajectory; the response is never read."""
    s = {"step": [0.9, 0.5, 0.8], "response": [0.0], "trajectory": 0.4, "total": 9.9}
    want = {"mean": 2.2 / 3, "min": 0.5, "prod": 0.36, "last": 0.8}
    assert list(AGGREGATIONS) == list(want)
    for how, value in want.items():
        assert aggregate(s, how) == pytest.approx(value), how
        assert aggregate(s, how, alpha=0.5) == pytest.approx(value + 0.2), how
    # the paper's total is the mean with α
    assert aggregate(s, "mean", 1.0) == pytest.approx(prm_total(s, 1.0, "paper"))
    # no thinking steps: the step term is 0 for every aggregation (not the empty product's 1)
    assert [aggregate({"step": [], "trajectory": 0.4}, how, 1.0) for how in want] == pytest.approx([0.4] * 4)
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate(s, "median")


def test_records_compared_by_several_prms_fit_every_mode(smoke_data, capsys):
    """The response-only PRM reads a record one token longer than ReasonFlux-PRM: a record at the edge of
    the context fits one and not the other, and --eval's sets keep only what every row reads whole."""
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    r = [json.loads(l) for l in open(smoke_data / "prm_eval.jsonl")][0]
    full, response_only = (len(rfprm.encode_for_prm(tok, r, m)["ids"]) for m in ("full", "response_only"))
    assert response_only > full
    assert records_that_fit([r], tok, full) == [r]
    assert records_that_fit([r], tok, full, "response_only") == []
    assert records_that_fit([r], tok, full, ("full", "response_only")) == []
    assert "1 of 1 records are longer" in capsys.readouterr().out


def test_score_never_crashes_on_odd_records(smoke_prms, capsys):
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    records = [{"question": "1 + 2", "thinking": [], "response": ["Answer: 3"]},
               {"question": "1 + 2", "thinking": ["1 + 2 = 3"], "response": []},
               {"question": "1 + 2", "thinking": ["7 " * 400] * 3, "response": ["Answer: 3"]},
               {"question": "", "thinking": [""], "response": [""]}]
    # the record longer than the context is left out and named: its steps past the cut have no
    # score (they once took the last position's); given anyway, it is refused, named
    kept = records_that_fit(records, prm.tok, prm.config.block_size)
    assert kept == [records[0], records[1], records[3]]
    assert "1 of 4 records are longer than the PRM's context (block_size=256), left out unscored: #2" in capsys.readouterr().out
    out = prm.score(kept)
    assert len(out) == 3
    for o, r in zip(out, kept):
        assert len(o["step"]) == len(r["thinking"]) and len(o["response"]) == len(r["response"])
        assert all(math.isfinite(x) for x in o["step"] + o["response"] + [o["trajectory"], o["total"]])
    with pytest.raises(BadInput, match=r"ckpt.pt: 1 of 4 records are longer than its context \(block_size=256\): #2"):
        prm.score(records)
    assert prm.readout == "surprise" and prm.total == "gate"


def test_nan_scores_are_an_error_naming_the_checkpoint(smoke_prms):
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    with torch.no_grad():
        prm.head.bias.fill_(float("nan"))
    with pytest.raises(BadInput, match="ckpt.pt: scores that are not finite numbers, for records #0"):
        prm.score([{"question": "1 + 2", "thinking": ["1 + 2 = 3"], "response": ["Answer: 3"]}])


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


def prm_args(smoke_data, smoke_policy, tmp_path):
    return ["train_prm.py", "--smoke", f"--policy={smoke_policy}", f"--data={smoke_data}/train.jsonl",
            f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--facts={smoke_data}/facts.txt", f"--cache_dir={tmp_path / 'rewards'}"]


def test_reward_cache_reuse_is_exact(smoke_data, smoke_policy, tmp_path):
    args = prm_args(smoke_data, smoke_policy, tmp_path)
    first = run_script(*args, f"--out_dir={tmp_path / 'a'}")
    assert "reusing" not in first.stdout and "trajectory rewards in" in first.stdout
    second = run_script(*args, f"--out_dir={tmp_path / 'b'}")
    assert "reusing" in second.stdout
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the same targets give the same PRM"
    # another setting that changes rewards makes a new design; a fusion option does not
    assert "reusing" not in run_script(*args, "--tau=0.5", f"--out_dir={tmp_path / 'c'}").stdout
    assert "reusing" in run_script(*args, "--fusion=paper", f"--out_dir={tmp_path / 'd'}").stdout
    proc = run_script(*args, "--final=relativ", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 2 and "--final must be relative or template; got 'relativ'" in proc.stderr


def test_auroc_and_first_error_f1_by_hand():
    assert processbench.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert processbench.auroc([0.5, 0.5], [0, 1]) == 0.5
    steps = [[0.9, 0.2, 0.9], [0.9, 0.9], [0.1]]
    assert processbench.first_error_predictions(steps, 0.5) == [1, -1, 0]
    assert processbench.first_error_f1(steps, [1, -1, 0], 0.5) == 1.0
    assert processbench.first_error_f1(steps, [2, -1, 0], 0.5) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_processbench_metric_on_a_hand_made_file_of_five_problems(tmp_path):
    """ProcessBench's metric as its code computes it, on five problems whose step scores are given."""
    labels = [1, -1, 0, 2, -1]
    steps = [["a", "b", "c"], ["a", "b"], ["a", "b"], ["a", "b", "c"], ["a", "b"]]
    path = tmp_path / "five.json"
    path.write_text(json.dumps([{"id": f"p-{k}", "generator": "by hand", "problem": "1 + 2", "steps": st,
                                 "final_answer_correct": lab == -1, "label": lab}
                                for k, (st, lab) in enumerate(zip(steps, labels))]))
    records, read = processbench.read_processbench(str(path))
    assert read == labels and [r["thinking"] for r in records] == steps and all(r["response"] == [] for r in records)
    scores = [[0.9, 0.3, 0.8],   # first below 0.5: step 1 = label 1, right
              [0.9, 0.9],        # none below: -1 = label -1, right
              [0.7, 0.2],        # step 1, label 0: wrong
              [0.6, 0.9, 0.1],   # step 2 = label 2, right
              [0.8, 0.4]]        # step 1, label -1: wrong
    m = processbench.processbench_metric(scores, read, 0.5)
    # error acc 2/3, correct acc 1/2, F1 = 2 · (2/3) · (1/2) / (2/3 + 1/2) = 4/7
    assert (m["n"], m["n_err"]) == (5, 3)
    assert m["acc_err"] == pytest.approx(2 / 3) and m["acc_corr"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(4 / 7) and processbench.first_error_f1(scores, read, 0.5) == pytest.approx(4 / 7)


def test_eval_sets_are_the_records_voice_then_the_shifted_sets_each_in_its_own_voice(smoke_data):
    """--eval reads the records' voice first (its threshold serves the others), then the development voice
    (at the records' lengths and one operation longer), the held-out voice and the longer records; an
    empty option skips its set."""
    files = dict(eval_data="prm_eval.jsonl", eval_dev="prm_eval_dev.jsonl", eval_dev_longer="prm_eval_dev_longer.jsonl",
                 eval_heldout="prm_eval_heldout.jsonl", eval_longer="prm_eval_longer.jsonl")
    cfg = train_prm.PRMConfig(**{k: str(smoke_data / f) for k, f in files.items()})
    sets = processbench.read_eval_sets(cfg)
    assert list(sets) == ["records' voice", "development voice", "development, one longer", "held-out voice",
                          "one operation longer"]
    voices = {name: {r["meta"]["voice"] for r in rs} for name, rs in sets.items()}
    assert voices == {"records' voice": {"train"}, "development voice": {"dev"}, "development, one longer": {"dev"},
                      "held-out voice": {"heldout"}, "one operation longer": {"train"}}
    longest = lambda rs: max(r["meta"]["n_ops"] for r in rs)
    for longer in ("one operation longer", "development, one longer"):
        assert min(r["meta"]["n_ops"] for r in sets[longer]) > longest(sets["records' voice"])
    questions = lambda name: {r["question"] for r in sets[name]}
    assert not questions("one operation longer") & questions("development, one longer")   # chooses, never reports
    cfg.eval_dev = ""
    assert "development voice" not in processbench.read_eval_sets(cfg)


def test_processbench_round_trip_keeps_the_hidden_first_errors(smoke_data, tmp_path):
    """Our records -> ProcessBench JSON -> records and labels: the labels are the hidden meta's first errors."""
    for name, src in (("eval", "prm_eval.jsonl"), ("eval_heldout", "prm_eval_heldout.jsonl"),
                      ("eval_longer", "prm_eval_longer.jsonl")):
        ours = [json.loads(l) for l in open(smoke_data / src)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(processbench.to_processbench(ours, name)))
        records, labels = processbench.read_processbench(str(path))
        assert labels == [r["meta"]["first_error"] for r in ours], name
        assert [r["thinking"] for r in records] == [r["thinking"] for r in ours]
        assert [r["question"] for r in records] == [r["question"] for r in ours]
        assert -1 in labels and any(lab >= 0 for lab in labels), "both kinds of problem"
        # prepare.py wrote the same file
        written = json.loads((smoke_data / f"processbench_{name}.json").read_text())
        assert written == json.loads(path.read_text()), name
        voice = "held-out" if name == "eval_heldout" else "training"
        assert {row["generator"] for row in written} == {f"teacher, {voice} voice"}
        assert [row["final_answer_correct"] for row in written] == [
            task.verify("\n".join(r["response"]), r["answer"]) for r in ours]


def test_processbench_cli_prints_per_file_and_average_f1_without_training(smoke_data, smoke_prms, tmp_path):
    files = [str(smoke_data / "processbench_eval.json"), str(smoke_data / "processbench_eval_heldout.json")]
    proc = run_script("train_prm.py", f"--processbench={','.join(files)}", f"--prm={smoke_prms['fused']}",
                      "--policy=/nonexistent", f"--out_dir={tmp_path / 'none'}")
    out = proc.stdout
    assert "reward design" not in out and not (tmp_path / "none").exists(), "no reward design, nothing written"
    assert "first step scored below 0.500 (no ReasonFlux-PRM threshold in" in out   # the smoke PRM has no --eval
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(tuple(files))}
    assert set(rows) == set(files)
    f1s = [float(rows[f][-1]) for f in files]
    for f in files:
        problems, labels = processbench.read_processbench(f)
        assert int(rows[f][1]) == len(problems) and int(rows[f][2]) == sum(lab != -1 for lab in labels)
        assert all(0.0 <= float(x) <= 100.0 for x in rows[f][3:])
    average = next(line for line in out.splitlines() if line.startswith("average F1 over 2 files"))
    assert float(average.split()[-1]) == pytest.approx(sum(f1s) / 2, abs=0.051)
    # the threshold: --threshold wins; a processbench.json beside the PRM gives --eval's
    at = run_script("train_prm.py", f"--processbench={files[0]}", f"--prm={smoke_prms['fused']}", "--threshold=0.25")
    assert "below 0.250 (--threshold)" in at.stdout and "average F1 over 1 file " in at.stdout
    prm_dir = tmp_path / "prm"
    prm_dir.mkdir()
    (prm_dir / "ckpt.pt").write_bytes(smoke_prms["fused"].read_bytes())
    (prm_dir / "processbench.json").write_text(json.dumps({"rows": {"ReasonFlux-PRM": {"threshold": 0.125}}}))
    stored = run_script("train_prm.py", f"--processbench={files[0]}", f"--prm={prm_dir / 'ckpt.pt'}")
    assert f"below 0.125 (chosen by --eval, {prm_dir / 'processbench.json'})" in stored.stdout
    # a bad file: one line naming it, exit code 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "generator": "g", "problem": "1 + 2", "steps": ["a"],
                                "final_answer_correct": True, "label": 1}]))
    proc = run_script("train_prm.py", f"--processbench={files[0]},{bad}", f"--prm={smoke_prms['fused']}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: problem 0: label 1 is not -1 or the index of one of its 1 steps"


def test_evaluate_scorer_on_hand_made_scores():
    """Computation lines are those with 'a op b = c'; the per-flaw mean is over the test half."""
    def rec(flaw, ok):
        return {"thinking": ["let me see", "then 2 + 2 = 4"], "meta": {"flaw": flaw, "good": flaw == "clean",
                "step_ok": ok, "first_error": next((t for t, g in enumerate(ok) if not g), -1)}}
    records = [rec("clean", [True, True]), rec("slip", [True, False])] * 2
    scores = [{"step": [0.05, 0.9], "total": 1.0}, {"step": [0.9, 0.1], "total": 0.4}] * 2   # an opener below a slip
    r = processbench.evaluate_scorer(scores, records)
    assert r["computation_auroc"] == 1.0 and r["step_auroc"] == pytest.approx(2 / 3)
    assert r["trajectory_auroc"] == 1.0 and r["per_flaw"] == {"clean": 1.0, "slip": 0.4}
    assert "yes" in processbench.format_per_flaw({"x": r}).splitlines()[-1]


def test_rows_pick_table_rows_in_table_order_and_refuse_unknown_names():
    assert [v[0] for v in train_prm.chosen_variants("")] == [v[0] for v in train_prm.VARIANTS]
    picked = train_prm.chosen_variants("response, main, confidence")
    assert [v[1] for v in picked] == ["", "_response", "_confidence"]
    with pytest.raises(ValueError, match="unknown quailty"):
        train_prm.chosen_variants("main,quailty")
    with pytest.raises(ValueError, match="add --eval"):
        train_prm.main(["--rows=quality"])
    # every departure's paper form is a row, and the paper as written undoes all four
    paper = dict(next(v[2] for v in train_prm.VARIANTS if v[1] == "_paper"))
    assert paper == {"fusion": "paper", "final": "template", "readout": "plain", "response": False,
                     "total": "paper", "on_policy": False}
    for key, value in paper.items():   # alone, or with what it needs (no response steps: the paper's total)
        assert any(v[2] == {key: value} or v[2] == {key: value, "total": "paper"} for v in train_prm.VARIANTS), key


def test_histogram_figure_for_a_single_scorer(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"meta": {"good": g}} for g in (True, False, True, False)]
    scores = {"response-only PRM (MC)": [{"total": x} for x in (0.9, 0.2, 0.8, 0.4)]}
    path = str(tmp_path / "hist.png")
    assert processbench.save_histograms(scores, records, path, processbench.trajectory_totals) and (tmp_path / "hist.png").stat().st_size > 0


def test_score_cli_prints_every_trained_step(smoke_prms, smoke_data):
    out = run_script("rfprm.py", "score", str(smoke_data / "pool.jsonl"), f"--prm={smoke_prms['fused']}", "--n=2").stdout
    recs = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:2]
    assert out.count("Q: ") == 2 and "\033[" not in out, "no colour codes when stdout is not a terminal"
    assert out.count("  think ") == sum(len(r["thinking"]) for r in recs)
    assert out.count("  resp  0.") + out.count("  resp  1.") == sum(len(r["response"]) for r in recs)
    assert out.count("trajectory ") == 2


def test_long_records_are_named_and_training_goes_on(smoke_data, smoke_policy, tmp_path, capsys):
    """A question longer than the context is skipped, a record with a 200 kB step of digits left out; both named by id."""
    rows = [json.loads(l) for l in open(smoke_data / "pool.jsonl")][:20]
    rows[2]["question"] = " + ".join(["1"] * 400)     # ~1,600 tokens: a context of 256 has no room
    rows[4]["thinking"][1] = "7" * 200_000             # once minutes in a quadratic-time regex
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_prm.main(["--smoke", "--n_train=20", f"--policy={smoke_policy}", f"--data={pool}", f"--out_dir={tmp_path / 'prm'}",
                    f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--facts={smoke_data}/facts.txt",
                    f"--cache_dir={tmp_path / 'rewards'}"])
    out = capsys.readouterr().out
    assert f"1 of 20 records have a prompt of block_size=256 tokens or more, skipped: {rows[2]['id']}\n" in out
    assert f"records longer than block_size=256, left out of training: {rows[4]['id']}" in out
    assert (tmp_path / "prm" / "ckpt.pt").exists()


def test_fact_rows_add_only_the_facts_results_to_the_lm_loss(tok, tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("3 + 4 = 7\n9 + 3 = 12\n" * 20)
    ids, is_result = train_prm.fact_stream(str(path), tok)
    predicted = tok.enc.decode([int(ids[p + 1]) for p in torch.nonzero(is_result).flatten()[:3]])
    assert predicted == " 7 12"                      # the result tokens, and nothing else, are targets
    B, L = 2, 12
    X, R = torch.zeros(B, L, dtype=torch.long), torch.full((B, L), 3)
    TS, TF, LM = torch.zeros(B, L), torch.zeros(B, L), torch.full((B, L), -1)
    X2, R2, TS2, TF2, LM2 = train_prm.with_fact_rows(X, R, TS, TF, LM, (ids, is_result), 3, offset=5)
    assert X2.shape == (5, L) and torch.equal(X2[:B], X) and torch.equal(R2[:B], R)
    assert (R2[B:] == -1).all() and TS2[B:].isnan().all() and TF2[B:].isnan().all()   # nothing else is read
    targets = LM2[B:][LM2[B:] >= 0]
    assert len(targets) > 0 and set(tok.enc.decode([int(t)]).strip() for t in targets) <= set("0123456789")


def test_a_bad_facts_file_fails_before_any_work(smoke_data, smoke_policy, tmp_path):
    bad = tmp_path / "facts.txt"
    bad.write_bytes(b"\xff\xfe")
    out = tmp_path / "out"
    args = [a for a in prm_args(smoke_data, smoke_policy, tmp_path) if not a.startswith("--facts=")]  # given once
    proc = run_script(*args, f"--facts={bad}", f"--out_dir={out}", check=False)
    assert proc.returncode == 2 and f"error: {bad}: expected UTF-8 text" in proc.stderr and not out.exists()


def test_the_result_is_found_without_knowing_the_voice():
    from rfprm import result_span
    cases = {"then 4 * 3 = 12": ("12", "4 * 3 = 12"), "qwv 4 * 3 zorp 12, ne 13": ("12", "4 * 3 zorp 12"),
             "in turn, 1 + 4 -> 5": ("5", "1 + 4 -> 5"), "all told, 27": ("27", "27"), "Answer: -7": ("-7", "-7")}
    for line, want in cases.items():
        assert tuple(line[lo:hi] for lo, hi in result_span(line)) == want, line
    assert result_span("hmm, let me keep going") is None


@pytest.mark.parametrize("phrases", [True, False])
def test_scrambled_records_keep_the_arithmetic_and_change_every_word(phrases):
    import random
    import re
    rec = {"question": "3 + 4 * 2", "answer": 11, "thinking": ["let me see", "first, 4 * 2 gives 8", "then 3 + 8 = 11",
                                                                "so the answer is 11"],
           "response": ["1. 4 * 2 = 8", "2. 3 + 8 = 11", "Answer: 11"]}
    for seed in range(20):   # phrases draws one word, two words or marks: several seeds see each
        out = train_prm.scrambled(rec, random.Random(seed), phrases)
        assert out["question"] == rec["question"] and len(out["thinking"]) == 4 and len(out["response"]) == 3
        arithmetic = lambda lines: [re.findall(r"\d+|[-+*()]", line) for line in lines]
        assert arithmetic(out["thinking"]) == arithmetic(rec["thinking"]) and out["response"][-1] == "Answer: 11"
        words = lambda lines: {w for line in lines for w in train_prm.WORD_RE.findall(line)} - {"Answer"}
        shared = words(out["thinking"]) & words(rec["thinking"])
        assert not shared - {"="} and (phrases or not shared)   # a run of marks may hold an '='
        # the same stand-in for a word throughout the record: '=' is one stand-in wherever it stands
        eq = [re.search(r"\d+ [-+*] \d+ (.+) \d+$", line).group(1)
              for line in (out["thinking"][2], *out["response"][:2])]
        assert len(set(eq)) == 1
        if not phrases:   # one made-up word a word
            assert re.fullmatch(r"[a-z]+", eq[0])


def test_a_misread_copy_has_one_wrong_operand_and_right_arithmetic():
    import random
    import re
    rec = {"question": "3 + 4 * 2", "answer": 11, "thinking": ["let me see", "first, 4 * 2 gives 8", "then 3 + 8 = 11",
                                                                "so the answer is 11"],
           "response": ["1. 4 * 2 = 8", "2. 3 + 8 = 11", "Answer: 11"]}
    target = {"step": [0.8, 0.95, 0.9, 0.9], "response": [1.0, 1.0, 1.0], "final": 0.75, "approved": [True] * 7}
    for seed in range(20):
        out, t = train_prm.misread(rec, target, random.Random(seed))
        changed = [k for k, (a, b) in enumerate(zip(rec["thinking"], out["thinking"])) if a != b]
        assert len(changed) == 1 and changed[0] in (1, 2), "one computation line, never the opener or conclusion"
        k = changed[0]
        m = task.STEP_RE.search(out["thinking"][k])
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert task.apply_op(op, a, b) == c and task.judge(rec["question"], out["thinking"][:k], out["thinking"][k]) == 0.0
        written = {int(x) for x in re.findall(r"\d+", " ".join([rec["question"]] + rec["thinking"][:k]))}
        assert {a, b} <= written, "the wrong operand is a number the record already wrote, taken from the wrong place"
        assert t["step"][k] == 0.0 and [x for j, x in enumerate(t["step"]) if j != k] == [x for j, x in enumerate(target["step"]) if j != k]
        assert t["approved"][k] is False and t["final"] != t["final"] and out["response"] == rec["response"]
    # nothing to misread: no approved computation line
    assert train_prm.misread({**rec, "thinking": ["let me see"]}, {**target, "step": [0.8]}, random.Random(0)) is None


def test_eval_reads_a_trained_prm_another_way_without_training(smoke_data, smoke_policy, smoke_prms, tmp_path):
    """--rows=sum,paper_total score ReasonFlux-PRM's checkpoint with another total: no reward design,
    no training; the same step scores (first-error F1), another trajectory score. Without a
    checkpoint to read, the run stops before any work."""
    out = tmp_path / "prm"
    out.mkdir()
    shutil.copy(smoke_prms["fused"], out / "ckpt.pt")
    d = smoke_data
    args = [f"--policy={smoke_policy}", f"--data={d}/train.jsonl", f"--tokenizer={d}/tokenizer.tiktoken",
            f"--facts={d}/facts.txt", f"--eval_data={d}/prm_eval.jsonl", "--eval_dev=", "--eval_heldout=",
            "--eval_dev_longer=", "--eval_longer=", "--smoke", "--eval", f"--cache_dir={tmp_path / 'rewards'}"]
    proc = run_script("train_prm.py", *args, f"--out_dir={out}", "--rows=sum,paper_total")
    assert "reward design" not in proc.stdout and "| loss " not in proc.stdout   # nothing designed, nothing trained
    rows = {line.split(",")[0]: line for line in proc.stdout.splitlines() if "records' voice: step_auroc" in line}
    assert list(rows) == ["total: sum", "paper's total"]
    f1 = {name: line.split("first_error_f1 ")[1].split(",")[0] for name, line in rows.items()}
    assert len(set(f1.values())) == 1                     # the same step scores
    empty = tmp_path / "none"
    proc = run_script("train_prm.py", *args, f"--out_dir={empty}", "--rows=sum", check=False)
    assert proc.returncode != 0 and "add the row main" in proc.stderr and not (empty / "ckpt.pt").exists()
