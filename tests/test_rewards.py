"""The reward design: each step reward on hand-made steps, the fusions, the trajectory rewards."""

import random

import torch

import task
from tokenizer import Tokenizer, load_tokenizer
from model import GPT, GPTConfig
from rewards import (TfidfEncoder, alignment_reward, coherence_reward, fuse_rewards, gated_fusion,
                     relative_final, step_rewards, trajectory_reward, response_quality)

import pytest


@pytest.fixture(scope="module")
def tok(smoke_data):
    return Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))


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


def test_previous_steps_and_negatives_over_records(tok, monkeypatch):
    """The first step's previous step is the question; every negative is a step of another record."""
    records = [task.make_record(random.Random(i), task.WorldConfig(), i) for i in range(6)]
    seen = {}
    real = coherence_reward

    def spy(prev, steps, neg, tau=0.1, rescaled=False):
        seen.update(prev=prev, steps=steps, neg=neg)
        return real(prev, steps, neg, tau, rescaled)
    monkeypatch.setattr("rewards.coherence_reward", spy)
    lines = [tok.enc.encode_ordinary(l) for r in records for l in r["thinking"] + r["response"] + [r["question"]]]
    encode = TfidfEncoder().fit(lines).encode
    r_align, r_qual, r_coh, step_rec = step_rewards(records, tok, encode, n_negatives=16, seed=3)
    assert len(r_align) == len(r_qual) == len(r_coh) == len(step_rec) == sum(len(r["thinking"]) for r in records)
    questions = encode([tok.enc.encode_ordinary(r["question"]) for r in records])
    first = [0] + [i for i in range(1, len(step_rec)) if step_rec[i] != step_rec[i - 1]]
    assert torch.allclose(seen["prev"][first], questions[step_rec[first]])
    later = [i for i in range(len(step_rec)) if i not in first]
    assert torch.allclose(seen["prev"][later], seen["steps"][[i - 1 for i in later]])
    # each negative vector is the vector of some step of another record
    owners = {}   # a line like an opener can appear in several records
    for v, k in zip(seen["steps"], step_rec):
        owners.setdefault(tuple(v.tolist()), set()).add(int(k))
    for s in range(len(step_rec)):
        for v in seen["neg"][s]:
            assert owners[tuple(v.tolist())] - {int(step_rec[s])}
    assert r_qual.tolist() == [task.judge(r["question"], [], l) for r in records for l in r["thinking"]]


def test_paper_fusion_weights_sum_to_one_and_favour_high_rewards():
    a, q, c = torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]), torch.tensor([-2.0, -0.1])
    fused, w = fuse_rewards(a, q, c)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert torch.allclose(fused, (w * torch.stack([a, q, c], 1)).sum(1))
    assert w[0, 1] > w[0, 2], "a high reward gets the larger weight"
    assert fused[0] > fused[1]


def test_gated_fusion_never_ranks_a_wrong_step_above_a_right_one():
    """Adversarial values: wrong steps with perfect alignment and coherence, right ones with none.
    The paper's fusion ranks some wrong step above some right one; the gated fusion never does."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    quality = torch.tensor([0.0, 0.5, 1.0])[torch.randint(3, (n,), generator=g)]
    wrong = quality < 0.5
    align = torch.where(wrong, torch.ones(n), torch.rand(n, generator=g) * 0.05)
    coh = torch.where(wrong, torch.zeros(n), -50 * torch.rand(n, generator=g))   # log-probabilities
    paper, _ = fuse_rewards(align, quality, coh)
    assert paper[wrong].max() > paper[~wrong].min(), "the paper's form is fooled (why the gate exists)"
    gated = gated_fusion(paper, quality)
    assert gated[wrong].max() < gated[~wrong].min()
    assert (gated[wrong] == 0).all() and (gated[~wrong] >= 0.75).all() and (gated <= 1).all()
    # any fused value at all, even outside [0, 1], keeps the bands apart
    wild = torch.randn(n, generator=g) * 100
    assert gated_fusion(wild, quality)[wrong].max() < gated_fusion(wild, quality)[~wrong].min()
    # within the right band, the paper's fusion still ranks: more alignment, higher label
    assert gated_fusion(torch.tensor([0.9, 0.3]), torch.tensor([1.0, 1.0])).tolist() == pytest.approx([0.975, 0.825])


def test_relative_trajectory_reward_by_hand():
    assert relative_final([1.0, 0.5, 0.0, 0.75], [1.0, 0.25, 0.5, 0.0]) == [0.5, 0.625, 0.25, 0.875]
    # a plan that helps as much on a hard question as on an easy one gets the same reward
    assert relative_final([0.9], [0.8]) == pytest.approx(relative_final([0.3], [0.2]))


def test_response_steps_are_judged_like_thinking_steps():
    rec = {"question": "3 + 4 * 2", "thinking": ["then 4 * 2 = 8", "next, 3 + 8 = 11"],
           "response": ["1. 4 * 2 = 8", "2. 3 + 8 = 12", "Answer: 12"]}
    assert response_quality([rec]) == [[1.0, 0.0, 0.0]]
    rec["response"] = ["1. 4 * 2 = 8", "2. 3 + 8 = 11", "Answer: 11"]
    assert response_quality([rec]) == [[1.0, 1.0, 1.0]]


class AnswerOracle(GPT):
    """A stand-in policy that follows any plan perfectly: its "generation" writes the executed plan.

    Lets trajectory_reward be tested on what it measures (is the plan right?) without training."""

    def __init__(self, tok):
        super().__init__(GPTConfig(block_size=256, vocab_size=448, n_layer=1, n_head=1, n_embd=8))
        self.tok = tok

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, prompt_mask=None,
                 use_cache=True, generator=None):
        rows = []
        for ids, mask in zip(idx.tolist(), prompt_mask.tolist()):
            text = self.tok.enc.decode([i for i, m in zip(ids, mask) if m and i < self.tok.eot])
            plan = text.split("Plan: ")[1].split("\n")[0].split(" ; ")
            done = self.tok.enc.encode_ordinary("\n".join(task.follow_template(plan) or [])) + [self.tok.eot]
            rows.append(ids + (done + [self.tok.eot] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_trajectory_reward_on_good_and_wrong_strategy_templates(tok):
    rng, cfg = random.Random(0), task.WorldConfig()
    good = [task.make_record(rng, cfg, i, flaw="clean") for i in range(4)]
    good += [task.make_record(rng, cfg, i, flaw="self_correct") for i in range(4)]   # the correction is followed
    bad = [task.make_record(rng, cfg, i, flaw="wrong_strategy") for i in range(4)]
    bad += [task.make_record(rng, cfg, i, flaw="truncated") for i in range(4)]
    r = trajectory_reward(AnswerOracle(tok), tok, good + bad, n_rollouts=2)
    assert r.tolist() == [1.0] * 8 + [0.0] * 8
    no_plan = dict(good[0], thinking=["hmm, let me keep going"])
    assert trajectory_reward(AnswerOracle(tok), tok, [no_plan], n_rollouts=2).tolist() == [0.0]
