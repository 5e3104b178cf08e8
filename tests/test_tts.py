"""Best-of-N: the vectorised subset estimator against brute force, tie-breaking, errors, the script."""

import collections
import itertools
import json
import math

import pytest
import torch

from conftest import run_script
import tts

# a tiny hand-made case: 2 questions x 5 samples, with tied scores, tied votes and unanswered samples
SCORES = torch.tensor([[0.9, 0.2, 0.9, 0.5, 0.1],
                       [0.3, 0.3, 0.8, 0.3, 0.8]])
ANSWERS = [[7, 5, 5, None, 7],
           [None, 2, 3, 2, None]]
TRUTH = [5, 2]


def brute_force(scores, answers, truth, n):
    """Every chooser's accuracy at N by enumerating all subsets, one Python loop per subset."""
    acc = collections.defaultdict(list)
    for q, row in enumerate(answers):
        s, ok = scores[q].tolist(), [a == truth[q] for a in row]
        for sub in itertools.combinations(range(len(row)), n):
            acc["best"].append(ok[max(sub, key=lambda i: (s[i], -i))])  # ties: lowest index
            for name, w in (("vote", [1.0] * len(row)), ("weighted", s)):
                tally = collections.defaultdict(float)
                for i in sub:  # in index order, so dict order = first seen
                    if row[i] is not None:
                        tally[row[i]] += w[i]
                win = max(tally, key=tally.get) if tally else None  # max keeps the first of ties
                acc[name].append(win is not None and win == truth[q])
            acc["oracle"].append(any(ok[i] for i in sub))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def estimate(n, n_subsets=10_000, generator=None, scores=SCORES, answers=ANSWERS, truth=TRUTH):
    correct = torch.tensor([[a == t for a in row] for row, t in zip(answers, truth)])
    curves, _ = tts.best_of_n_curves(correct, tts.answer_classes(answers), {"ReasonFlux-PRM": scores},
                                     [n], n_subsets, generator)
    return {k: v[0] for k, v in curves.items()}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_subset_estimator_equals_brute_force(n):
    got, want = estimate(n), brute_force(SCORES, ANSWERS, TRUTH, n)
    assert got["ReasonFlux-PRM"]["exact"]
    assert got["ReasonFlux-PRM"]["acc"] == pytest.approx(want["best"])
    assert got["majority vote"]["acc"] == pytest.approx(want["vote"])
    assert got["PRM-weighted vote"]["acc"] == pytest.approx(want["weighted"])
    assert got["oracle (pass@N)"]["acc"] == pytest.approx(want["oracle"])
    # pass@N also has a closed form (the unbiased pass@k estimator): 1 - C(M - c, N) / C(M, N)
    closed = sum(1 - math.comb(5 - sum(a == t for a in row), n) / math.comb(5, n)
                 for row, t in zip(ANSWERS, TRUTH)) / 2
    assert got["oracle (pass@N)"]["acc"] == pytest.approx(closed)
    assert got["random (pass@1)"]["acc"] == pytest.approx((2 / 5 + 2 / 5) / 2)


def test_monte_carlo_subsets_are_valid_and_unbiased():
    idx, exact = tts.subset_indices(8, 4, 60, 3, torch.Generator().manual_seed(0))
    assert not exact and idx.shape == (3, 60, 4)
    assert (idx[..., 1:] > idx[..., :-1]).all(), "distinct sample indices, ascending"
    # 300 copies of one question, 60 random subsets each, against the exact value (C(8, 4) = 70 subsets)
    scores = torch.tensor([[0.1, 0.9, 0.4, 0.7, 0.7, 0.2, 0.3, 0.6]]).repeat(300, 1)
    answers = [[1, 2, 1, 3, 1, 2, None, 2]] * 300
    want = brute_force(scores[:1], answers[:1], [1], 4)
    got = estimate(4, 60, torch.Generator().manual_seed(0), scores, answers, [1] * 300)
    assert not got["majority vote"]["exact"]
    for key, name in (("best", "ReasonFlux-PRM"), ("vote", "majority vote"), ("oracle", "oracle (pass@N)")):
        assert abs(got[name]["acc"] - want[key]) < 0.03, name


def test_ties_are_broken_deterministically():
    idx = torch.tensor([[[0, 1, 2, 3], [1, 2, 3, 4]]])  # (Q=1, S=2, N=4)
    flat = torch.full((1, 5), 0.5)
    assert tts.pick_best(flat, idx).tolist() == [[0, 1]], "equal scores: the lowest sample index"
    assert tts.pick_best(torch.tensor([[0.1, 0.9, 0.2, 0.9, 0.9]]), idx).tolist() == [[1, 1]]
    # answers 7 5 5 7 9: a 2-2 tie between 7 and 5 goes to 7 (seen first); in 5 5 7 9, 5 wins outright
    ids = tts.answer_classes([[7, 5, 5, 7, 9]])
    assert tts.pick_vote(ids, idx).tolist() == [[0, 1]]
    # a weighted tie goes to the answer seen first too; the vote returns that answer's first sample
    assert tts.pick_vote(ids, idx, torch.tensor([[0.25, 0.5, 0.0, 0.25, 0.0]])).tolist() == [[0, 1]]
    # weights of any sign: an answer absent from the subset never wins (5: -3, 7: -1 -> 7)
    assert tts.pick_vote(tts.answer_classes([[5, 7, 7]]), torch.tensor([[[0, 1, 2]]]),
                         torch.tensor([[-3.0, -0.5, -0.5]])).tolist() == [[1]]
    # no answer at all: the subset's first sample (whose answer is None: never counted right)
    assert tts.pick_vote(tts.answer_classes([[None] * 5]), idx).tolist() == [[0, 1]]
    # random subsets: the same generator seed gives the same subsets, hence the same estimate
    a = tts.subset_indices(10, 3, 20, 2, torch.Generator().manual_seed(3))[0]
    b = tts.subset_indices(10, 3, 20, 2, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_n_larger_than_the_samples_is_a_clear_error():
    with pytest.raises(ValueError, match=r"N=6 .*5 samples"):
        estimate(6)
    with pytest.raises(ValueError, match=r"N=64 .*8 samples"):  # before any file is read
        tts.main(["--n_samples=8", "--ns=1,2,64", "--policy=/nonexistent", "--test=/nonexistent"])


def test_picked_answers_are_those_of_the_best_scored_samples():
    questions = [{"answer": 12}, {"answer": 0}, {"answer": -3}]
    answers = [12, 0, None,   4, 0, 7,   -3, 5, 0]          # 3 samples per question
    scores = {"s": torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, 0.1], [0.3, 0.1, 0.8]])}
    text = tts.format_picked_answers(scores, answers, questions)
    # picks: 0 (score 0.9), 4 (tie 0.2/0.2 -> first), 0 (0.8): |answers| 0, 4, 0
    assert "true answers            median |answer| 3, 0 in 33%" in text
    assert "s                       median |answer| 0, 0 in 67%" in text
    assert tts.answer_sizes([None, 2]) == "median |answer| 2, 0 in 0%"


def test_aggregated_rows_read_the_scores_already_computed():
    """Two questions x two samples: each row is rfprm.aggregate of the same score dicts, in (Q, M)."""
    scores = [{"step": [0.9, 0.5], "response": [0.1], "trajectory": 0.5},
              {"step": [0.6], "response": [0.2], "trajectory": 0.25},
              {"step": [], "response": [0.3], "trajectory": 1.0},
              {"step": [0.2, 0.4, 0.8], "response": [], "trajectory": 0.0}]
    rows = tts.aggregated_rows(scores, 2.0, (2, 2))
    assert list(rows) == ["  mean", "  mean + α·traj", "  min", "  min + α·traj", "  product", "  product + α·traj",
                          "  last step", "  last step + α·traj"]
    want = {"  min": [0.5, 0.6, 0.0, 0.2], "  product + α·traj": [0.45 + 1.0, 0.6 + 0.5, 0.0 + 2.0, 0.064],
            "  last step": [0.5, 0.6, 0.0, 0.8], "  mean + α·traj": [1.7, 1.1, 2.0, 1.4 / 3]}
    for name, values in want.items():
        assert rows[name].shape == (2, 2) and rows[name].flatten().tolist() == pytest.approx(values), name


def test_tts_smoke_run_writes_results(smoke_data, smoke_policy, smoke_prms, tmp_path):
    out = tmp_path / "tts"
    proc = run_script("tts.py", "--smoke", f"--policy={smoke_policy}", f"--prm={smoke_prms['fused']}",
                      f"--prm_response={smoke_prms['mc']}", f"--prm_outcome={smoke_prms['outcome']}",
                      f"--out_dir={out}", f"--tokenizer={smoke_data}/tokenizer.tiktoken",
                      f"--test={smoke_data}/test.jsonl")
    assert "Best-of-N accuracy" in proc.stdout and "majority vote" in proc.stdout
    assert "answers picked from all 8 samples" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    curves = res["curves"]
    aggregations = [f"  {a}{t}" for a in ("mean", "min", "product", "last step") for t in ("", " + α·traj")]
    assert list(curves)[:9] == ["ReasonFlux-PRM", *aggregations], "the aggregations right below their row"
    assert set(curves) == {"ReasonFlux-PRM", *aggregations, "response-only PRM", "outcome scorer", "confidence",
                           "mean log-likelihood", "majority vote", "PRM-weighted vote", "random (pass@1)",
                           "oracle (pass@N)"}
    for name, rows in curves.items():
        assert [r["n"] for r in rows] == [1, 2, 4, 8], name
        for r, oracle in zip(rows, curves["oracle (pass@N)"]):
            assert 0.0 <= r["acc"] <= oracle["acc"] + 1e-9, f"{name} above the oracle at N={r['n']}"
    assert len({r["acc"] for r in curves["random (pass@1)"]}) == 1
    assert res["n_questions"] == 8 and res["n_samples"] == 8
    assert (out / "tts.png").exists() or (out / "tts_plot.txt").exists()


def test_mean_loglik_is_the_mean_log_probability_of_the_completion():
    from model import GPT, GPTConfig

    class Tokenizer:  # the only field mean_loglik reads: the pad id
        eot = 15
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts, comps = [[1, 2, 3], [4, 5]], [[6, 7, 15], [8, 15]]
    got = tts.mean_loglik(model, Tokenizer(), prompts, comps, batch_size=1)
    for p, c, g in zip(prompts, comps, got):
        seq = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0][0], -1)
        want = sum(logp[len(p) - 1 + i, t] for i, t in enumerate(c)) / len(c)
        assert g == pytest.approx(float(want), abs=1e-5)


def test_checks_on_hand_made_curves():
    """The stage's claims read off curves: a drop of more than one standard error, a rival above."""
    def curve(accs, se=0.01):
        return [{"n": n, "acc": a, "se": se, "exact": True} for n, a in zip((1, 2, 4, 8), accs)]
    per_q = {}
    curves = {"ReasonFlux-PRM": curve([0.3, 0.4, 0.5, 0.6]), "majority vote": curve([0.3, 0.3, 0.45, 0.55]),
              "PRM-weighted vote": curve([0.3, 0.35, 0.5, 0.6])}
    for name, rows in curves.items():
        per_q[name] = {r["n"]: torch.full((4,), r["acc"]) for r in rows}
    ok = tts.checks(curves, per_q, [1, 2, 4, 8])
    assert all(ok.values()), ok
    curves["ReasonFlux-PRM"] = curve([0.3, 0.4, 0.38, 0.6])          # falls by 2 points, se 1 point
    curves["PRM-weighted vote"] = curve([0.3, 0.29, 0.5, 0.6])       # below the vote at N = 2
    ok = tts.checks(curves, per_q, [1, 2, 4, 8])
    assert not ok["prm_never_drops_by_more_than_one_se"] and not ok["weighted_vote_at_or_above_majority"]


def test_a_question_longer_than_the_context_is_skipped_by_name(smoke_data, smoke_policy, smoke_prms, tmp_path, capsys):
    questions = [json.loads(l) for l in open(smoke_data / "test.jsonl")][:3]
    questions[1]["question"] = " + ".join(["1"] * 400)   # ~1,600 tokens: a context of 256 has no room
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tts.main(["--smoke", "--n_questions=3", "--n_samples=2", "--ns=1,2", f"--policy={smoke_policy}",
              f"--prm={smoke_prms['fused']}", "--prm_response=", "--prm_outcome=", f"--out_dir={tmp_path / 'tts'}",
              f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--test={test}"])
    out = capsys.readouterr().out
    assert f"1 of 3 questions have a prompt of block_size=256 tokens or more, skipped: {questions[1]['id']}\n" in out
    assert json.loads((tmp_path / "tts" / "results.json").read_text())["n_questions"] == 2
