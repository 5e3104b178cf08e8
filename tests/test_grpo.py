"""grpo.py: advantages and the loss against hand-computed values, μ = 1, process supervision, toy and smoke runs."""

import json
import math

import pytest
import torch

from conftest import run_script
from tokenizer import Tokenizer, load_tokenizer, encode_completion, split_completion
from model import GPT, GPTConfig
import grpo
import grpo_objective
import training


def test_group_advantages_hand_computed():
    r = torch.tensor([1., 0., 0., 0., 1., 1., 0., 0.])
    # group 1: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; group 2: mean 1/2, std sqrt(1/3)
    want = [1.5, -0.5, -0.5, -0.5] + [0.5 / math.sqrt(1 / 3)] * 2 + [-0.5 / math.sqrt(1 / 3)] * 2
    assert grpo_objective.group_advantages(r, 4, scale_std=True).tolist() == pytest.approx(want, rel=1e-3)
    # Dr. GRPO: no division by the std
    assert grpo_objective.group_advantages(r, 4, scale_std=False).tolist() == pytest.approx([.75, -.25, -.25, -.25, .5, .5, -.5, -.5])
    # groups are contiguous: the same rewards grouped by 2 give other advantages
    assert grpo_objective.group_advantages(r, 2, scale_std=True).tolist()[2:4] == [0.0, 0.0]


def test_equal_rewards_give_zero_advantage_and_no_nan():
    r = torch.tensor([0.3] * 4 + [1.0] * 4 + [0.0] * 4)
    for scale in (True, False):
        a = grpo_objective.group_advantages(r, 4, scale_std=scale)
        assert torch.isfinite(a).all() and (a == 0).all()
    # process supervision: equal step rewards in a group -> zero reward-to-go everywhere
    steps = torch.full((4, 3), 0.6)
    a = grpo_objective.process_advantages(steps, torch.tensor([[1, 3, 5]] * 4), torch.ones(4, 3, dtype=torch.bool), 2, 6, True)
    assert torch.isfinite(a).all() and (a == 0).all()
    # and the loss of a batch with zero advantages and no KL is finite and exactly 0
    logp = torch.log(torch.rand(3, 5) * 0.9 + 0.05)
    loss, stats = grpo_objective.grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(3), torch.ones(3, 5))
    assert torch.isfinite(loss) and float(loss) == 0.0


def k3(ratio):
    """KL k3 with π_ref = π_old and ratio = π_θ/π_old: π_ref/π_θ − log(π_ref/π_θ) − 1."""
    return 1 / ratio + math.log(ratio) - 1


def loss_case():
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    logp = torch.log(ratios).requires_grad_()
    old = torch.zeros(2, 3)          # ratio = exp(logp − old)
    ref = torch.zeros(2, 3)          # π_ref = π_old
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, ref, adv, mask


def test_grpo_loss_hand_computed_clipped_branch_and_kl():
    logp, old, ref, adv, mask = loss_case()
    c = 0.1
    # A = +1: min(1.5, clip 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5, 1.1
    # A = −1: min(−1.5, −1.2) = −1.5, min(−0.5, −0.8) = −0.8 (clipped), third token masked
    row0 = [-(1.2 - c * k3(1.5)), -(0.5 - c * k3(0.5)), -(1.1 - c * k3(1.1))]
    row1 = [-(-1.5 - c * k3(1.5)), -(-0.8 - c * k3(0.5))]
    loss, stats = grpo_objective.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=c)
    assert float(loss.detach()) == pytest.approx((sum(row0) + sum(row1)) / 5, rel=1e-5)
    assert float(stats["kl"]) == pytest.approx((2 * k3(1.5) + 2 * k3(0.5) + k3(1.1)) / 5, rel=1e-5)
    assert float(stats["clip_frac"]) == pytest.approx(2 / 5)
    seq, _ = grpo_objective.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=c, agg="sequence")
    assert float(seq.detach()) == pytest.approx((sum(row0) / 3 + sum(row1) / 2) / 2, rel=1e-5)
    # DAPO clip-higher: ε_high = 0.6 no longer clips ratio 1.5 for A > 0; the lower side is unchanged
    hi, stats_hi = grpo_objective.grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.0, clip_high=0.6)
    assert float(hi.detach()) == pytest.approx(-(1.5 + 0.5 + 1.1 - 1.5 - 0.8) / 5, rel=1e-5)
    assert float(stats_hi["clip_frac"]) == pytest.approx(1 / 5)
    # gradient: zero on clipped tokens and masked tokens, −A·ratio/N elsewhere (no KL)
    loss, _ = grpo_objective.grpo_loss(logp, old, None, adv, mask, clip_eps=0.2, kl_coef=0.0)
    loss.backward()
    want = torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 0.0]]) / 5
    assert torch.allclose(logp.grad, want, atol=1e-6)


def test_mu_1_ratio_is_one_and_gradient_is_the_policy_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    ref = GPT(GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    ref.load_state_dict(model.state_dict())
    X = torch.randint(0, 16, (4, 8))
    Y = torch.randint(0, 16, (4, 8))
    Y[:, :3] = -1                    # prompt positions
    Y[1, 6:] = -1                    # a shorter completion
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    mask = Y >= 0
    grads = {}
    for name in ("grpo", "pg"):
        model.zero_grad()
        logp, _ = grpo_objective.token_logprobs(model, X, Y, temperature=0.7)
        if name == "grpo":
            loss, stats = grpo_objective.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.04)
            assert float(stats["ratio"]) == pytest.approx(1.0) and float(stats["clip_frac"]) == 0.0
            assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-7)
        else:  # REINFORCE with the group advantage: −Σ Â log π / Σ|o|
            loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads["pg"].abs().max() > 0
    assert torch.allclose(grads["grpo"], grads["pg"], atol=1e-6)
    # optimise() with μ = 1 takes the same step: ratio 1, nothing clipped
    cfg = grpo.GRPOConfig(mu=1, lr=1e-3, temperature=0.7)
    stats = grpo_objective.optimise(model, ref, training.make_optimizer(model, cfg, "cpu"), X, Y, adv, cfg)
    assert float(stats["ratio"]) == pytest.approx(1.0) and float(stats["clip_frac"]) == 0.0
    # μ = 3: later passes see ratio ≠ 1 (the policy moved since sampling)
    stats = grpo_objective.optimise(model, ref, training.make_optimizer(model, cfg, "cpu"), X, Y, adv,
                          grpo.GRPOConfig(mu=3, lr=1e-2, temperature=0.7))
    assert abs(float(stats["ratio"]) - 1.0) > 1e-4


@pytest.mark.parametrize("agg,per_token", [("token", False), ("sequence", False), ("token", True)])
def test_length_chunks_take_the_same_step_as_one_batch(agg, per_token):
    """optimise() in chunks of similar lengths: same parameters after μ = 2 steps, same stats."""
    torch.manual_seed(0)
    cfg0 = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=2, n_embd=16)
    X = torch.randint(0, 16, (6, 10))
    Y = torch.randint(0, 16, (6, 10))
    Y[:, :2] = -1
    for i, end in enumerate([10, 4, 7, 3, 9, 5]):   # ragged completions, right-padded
        Y[i, end:] = -1
    adv = torch.randn(6, 10) if per_token else torch.randn(6)
    results = []
    for chunks in (1, 3):
        torch.manual_seed(1)
        model, ref = GPT(cfg0), GPT(cfg0)
        cfg = grpo.GRPOConfig(mu=2, lr=1e-2, temperature=0.8, loss_agg=agg, chunks=chunks)
        stats = grpo_objective.optimise(model, ref, training.make_optimizer(model, cfg, "cpu"), X, Y, adv, cfg)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), stats))
    assert [w for _, w in grpo_objective.length_chunks(Y, 3)] == [10, 7, 4]   # longest first, each as wide as it needs
    (p1, s1), (p3, s3) = results
    assert torch.allclose(p1, p3, atol=1e-5)
    for k in ("loss", "entropy", "kl", "ratio", "clip_frac"):
        assert float(s1[k]) == pytest.approx(float(s3[k]), abs=1e-5), k


def test_process_advantages_hand_computed_reward_to_go():
    # group 1 (rows 0, 1): step rewards 1.0 0.2 0.6 | 0.0 0.7 -> mean 0.5, unbiased std 0.4
    # normalised: 1.25 -0.75 0.25 | -1.25 0.5, read at tokens 1 3 5 | 2 4
    # group 2 (rows 2, 3): all equal -> 0
    r = torch.tensor([[1.0, 0.2, 0.6], [0.0, 0.7, 9.9], [0.3, 0.3, 0.0], [0.3, 0.0, 0.0]])
    pos = torch.tensor([[1, 3, 5], [2, 4, 0], [0, 5, 0], [2, 0, 0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    a = grpo_objective.process_advantages(r, pos, m, group_size=2, T=6, scale_std=True)
    want = [[0.75, 0.75, -0.5, -0.5, 0.25, 0.25],
            [-0.75, -0.75, -0.75, 0.5, 0.5, 0.0],
            [0.0] * 6, [0.0] * 6]
    assert a.tolist() == [pytest.approx(w, abs=1e-3) for w in want]
    # without std scaling: deviations from the mean 0.5 summed to go
    a = grpo_objective.process_advantages(r, pos, m, group_size=2, T=6, scale_std=False)
    assert a[0].tolist() == pytest.approx([0.3, 0.3, -0.2, -0.2, 0.1, 0.1])
    assert a[1].tolist() == pytest.approx([-0.3, -0.3, -0.3, 0.2, 0.2, 0.0])


def test_step_ends_match_split_completion(smoke_data):
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    thinking = ["first, 5 - 2 = 3", "  ", "then 4 * 3 = 12", "so the answer is 12"]
    ids = encode_completion(tok, thinking, ["1. 4 * 3 = 12", "Answer: 12"])
    lines, _ = split_completion(tok, ids)
    assert len(lines) == 3, "the blank line is not a step"
    Y = torch.tensor([[-1, -1] + ids])                         # two prompt positions
    tables = grpo_objective.token_tables(tok, 512)
    ends = grpo_objective.thinking_step_ends(Y, tok, tables)[0].nonzero().flatten().tolist()
    assert len(ends) == 3 and Y[0, ends[-1]] == tok.end_think
    # each end is the last token of its line: the text decoded up to it ends the line
    for end, line in zip(ends, lines):
        text = tok.enc.decode([i for i in Y[0, 2:end + 1].tolist() if i < tok.eot])
        assert text.rstrip("\n ").endswith(line.strip())
    scores = [{"step": [0.1, 0.2, 0.3], "trajectory": 0.5}]
    r, pos, m = grpo_objective.process_inputs(Y, scores, alpha=1.0, tok=tok, tables=tables)
    assert pos[0].tolist() == ends + [Y.size(1) - 1] and r[0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.5])
    assert m.all()


def test_grpo_improves_reward_on_a_toy_task():
    """A tiny GPT learns to emit token 5 after prompt [0], trained only by grpo's functions."""
    torch.manual_seed(0)
    V, G, Q, L = 8, 8, 4, 4
    model = GPT(GPTConfig(block_size=8, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    cfg = grpo.GRPOConfig(lr=2e-2, mu=2, kl_coef=0.01, temperature=1.0, group_size=G)
    opt = training.make_optimizer(model, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    curve = []
    for step in range(40):
        idx = torch.zeros(G * Q, 1, dtype=torch.long)
        out = model.generate(idx, L, temperature=1.0, generator=gen)     # (GQ, 1 + L)
        reward = (out[:, 1:] == 5).float().mean(1)                       # the fraction of 5s
        X, Y = out[:, :-1], out[:, 1:].clone()
        grpo_objective.optimise(model, ref, opt, X, Y, grpo_objective.group_advantages(reward, G, scale_std=True), cfg)
        curve.append(float(reward.mean()))
    assert curve[0] < 0.3 and sum(curve[-5:]) / 5 > 0.8, curve  # from chance (1/8) to mostly 5s


def script_args(smoke_data, smoke_policy, smoke_prms, out):
    return ["grpo.py", "--smoke", f"--init={smoke_policy}", f"--prm={smoke_prms['fused']}", f"--out_dir={out}",
            f"--tokenizer={smoke_data}/tokenizer.tiktoken", f"--questions={smoke_data}/rl_questions.jsonl",
            f"--test={smoke_data}/test.jsonl"]


def test_grpo_smoke_run_process_and_resume(smoke_data, smoke_policy, smoke_prms, tmp_path):
    out = tmp_path / "grpo"
    args = script_args(smoke_data, smoke_policy, smoke_prms, out)
    proc = run_script(*args, "--process=true", "--mu=2", "--clip_high=0.28", "--loss_agg=sequence")
    assert "equal groups" in proc.stdout and "samples for Q:" in proc.stdout and "test accuracy" in proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for k in ("reward", "reward_std", "equal_groups", "length", "kl", "entropy", "grad_norm", "clip_frac"):
            assert math.isfinite(r[k]), k
    assert [r["step"] for r in rows if "test_acc" in r] == [0, 2, 4]
    res = json.loads((out / "results.json").read_text())
    assert res["variant"] == "mix+process β=0.75" and 0.0 <= res["final"]["acc"] <= 1.0
    # resume: two more steps from the checkpoint at step 4, with the options it was trained with
    # (another --mu would be refused: checkpoints.check_resume)
    proc = run_script(*args, "--process=true", "--mu=2", "--clip_high=0.28", "--loss_agg=sequence", "--resume",
                      "--max_steps=6")
    assert "resuming from" in proc.stdout and "step    5/6" in proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4, 5, 6]


def test_grpo_variants_and_seeds_print_a_table(smoke_data, smoke_policy, smoke_prms, tmp_path):
    out = tmp_path / "sweep"
    proc = run_script(*script_args(smoke_data, smoke_policy, smoke_prms, out),
                      "--variants=rule,mix@0", "--seeds=2", "--max_steps=2", "--sample_every=0")
    assert "mean ± std over seeds" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"rule", "mix β=0"}
    assert all(s["n"] == 2 for s in res["summary"].values())
    # beside the test questions, the last --heldout_questions of --questions, which no run trains on
    assert "held-out questions of the RL questions' distribution" in proc.stdout
    assert all(s["heldout"]["n_questions"] == 6 and len(s["heldout"]["finals"]) == 2 for s in res["summary"].values())
    assert (out / "rule" / "seed1338" / "ckpt.pt").exists()
    # β = 0 is the rule reward alone (reward_batch: (1 − 0)·rule + 0·prm): with the same seed the
    # two runs take the same steps, so everything but the logged PRM mean agrees exactly
    assert res["summary"]["rule"]["finals"] == res["summary"]["mix β=0"]["finals"]
    for seed in ("seed1337", "seed1338"):
        rule = [json.loads(l) for l in (out / "rule" / seed / "metrics.jsonl").read_text().splitlines()]
        mix0 = [json.loads(l) for l in (out / "mix_b0" / seed / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("prm") for r in rule if "reward" in r] == [None, None]
        assert all(0.0 <= r["prm"] <= 1.0 for r in mix0 if "reward" in r), "the mix run did score with the PRM"
        drop = lambda rows: [{k: v for k, v in r.items() if k != "prm"} for r in rows]
        assert drop(rule) == drop(mix0), seed
        a = torch.load(out / "rule" / seed / "ckpt.pt", weights_only=True)["model"]
        b = torch.load(out / "mix_b0" / seed / "ckpt.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), seed
    with pytest.raises(ValueError, match="unknown variant"):
        grpo.parse_variant("best", grpo.GRPOConfig())


def test_the_last_rl_questions_are_held_out_and_never_drawn():
    qs = [{"question": f"{i} + 1", "answer": i + 1} for i in range(10)]
    train, held = grpo.hold_out(qs, grpo.GRPOConfig(heldout_questions=3))
    assert train == qs[:7] and held == qs[7:]
    assert grpo.hold_out(qs, grpo.GRPOConfig(heldout_questions=0)) == (qs, [])
    with pytest.raises(grpo.BadInput, match="none to train on"):
        grpo.hold_out(qs, grpo.GRPOConfig(heldout_questions=10))


def test_avg_at_k_reads_k_samples_per_question_with_the_same_random_numbers(smoke_data, smoke_policy):
    from checkpoints import load_checkpoint, model_from_checkpoint
    tok = Tokenizer(load_tokenizer(f"{smoke_data}/tokenizer.tiktoken"))
    model = model_from_checkpoint(load_checkpoint(smoke_policy, kind="policy", enc=tok.enc), "cpu").eval()
    qs = [json.loads(l) for l in (smoke_data / "test.jsonl").read_text().splitlines()][:5]
    cfg = grpo.GRPOConfig(eval_samples=3)
    a, b = grpo.policy_accuracy(model, tok, qs, cfg), grpo.policy_accuracy(model, tok, qs, cfg)
    assert a == b   # one fixed generator: a second reading draws the same samples
    assert a["n"] == 5 and a["samples"] == 15   # 5 questions, 3 samples each
    assert grpo.metric_name(cfg) == "avg@3 at τ = 1" and grpo.metric_name(grpo.GRPOConfig(eval_samples=0)) == "greedy"


def test_curves_average_seeds_and_skip_steps_a_seed_did_not_reach():
    seed_a = [{"step": 0, "test_acc": 0.5}, {"step": 1, "rule": 0.2}, {"step": 2, "rule": 0.4},
              {"step": 2, "test_acc": 0.6}, {"step": 4, "test_acc": 0.9}]
    seed_b = [{"step": 0, "test_acc": 0.5}, {"step": 1, "rule": 0.6}, {"step": 2, "rule": 0.8},
              {"step": 2, "test_acc": 0.7}]   # cut short before step 4
    text = grpo.format_curves({"rule": [seed_a, seed_b]}, every=2, n_eval=10)
    line = text.splitlines()[-1]
    assert line.split()[1:] == ["0:50.0", "2:65.0/50"], line   # sampled: mean of 0.2, 0.4, 0.6, 0.8


def test_alpha_zero_rewards_the_step_score_alone(smoke_data, smoke_prms):
    from rfprm import load_prm
    prm = load_prm(str(smoke_prms["fused"]), "cpu")
    tok = prm.tok
    q = {"question": "2 + 3 * 4", "answer": 14}
    comps = [encode_completion(tok, ["first, 3 * 4 = 12", "then 2 + 12 = 14"], ["1. 3 * 4 = 12", "2. 2 + 12 = 14",
                                                                               "Answer: 14"]),
             encode_completion(tok, ["2 + 3 = 5", "5 * 4 = 20"], ["Answer: 20"])]
    for alpha in (1.0, 0.0):   # the gated total over its largest value, 1 + α
        rew = grpo.reward_batch(tok, comps, [q, q], [True, False], prm, grpo.GRPOConfig(reward="prm", alpha=alpha))
        means = [sum(s["step"]) / len(s["step"]) for s in rew["scores"]]
        gates = [min(s["response"]) for s in rew["scores"]]
        traj = [s["trajectory"] for s in rew["scores"]]
        want = [g * (m + alpha * t) / (1 + alpha) for g, m, t in zip(gates, means, traj)]
        assert rew["prm"].tolist() == pytest.approx(want, abs=1e-6)
    assert grpo.variant_name(grpo.GRPOConfig(reward="mix", alpha=0.0)) == "mix β=0.75 α=0"
    assert grpo.variant_name(grpo.GRPOConfig(reward="rule", alpha=0.0)) == "rule"


def test_expert_steps_relabel_every_step_and_keep_the_trajectory(smoke_data, smoke_prms):
    from rfprm import load_prm
    prm = load_prm(str(smoke_prms["fused"]), "cpu")
    tok = prm.tok
    q = {"question": "2 + 3 * 4", "answer": 14}
    comps = [encode_completion(tok, ["first, 3 * 4 = 12", "then 2 + 12 = 15"], ["1. 3 * 4 = 12", "Answer: 15"]),
             encode_completion(tok, ["2 + 3 = 5", "ok"], ["Answer: 20"])]
    cfg = grpo.GRPOConfig(reward="mix", expert_steps=True)
    rew = grpo.reward_batch(tok, comps, [q, q], [False, False], prm, cfg)
    plain = grpo.reward_batch(tok, comps, [q, q], [False, False], prm, grpo.GRPOConfig(reward="mix"))
    # a right step 1, a slip 0; an operation out of precedence 0, a filler line ½; wrong answers 0
    assert [s["step"] for s in rew["scores"]] == [[1.0, 0.0], [0.0, 0.5]]
    assert [s["response"] for s in rew["scores"]] == [[1.0, 0.0], [0.0]]
    assert [s["trajectory"] for s in rew["scores"]] == [s["trajectory"] for s in plain["scores"]]
    assert grpo.variant_name(cfg) == "mix β=0.75 expert"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(smoke_data, smoke_policy, smoke_prms,
                                                                             tmp_path, monkeypatch):
    out, calls, optimise = tmp_path / "nan", [], grpo_objective.optimise

    def nan_from_the_third_step(*args):
        calls.append(1)
        stats = optimise(*args)
        return {**stats, "loss": torch.tensor(float("nan"))} if len(calls) > 2 else stats
    monkeypatch.setattr(grpo, "optimise", nan_from_the_third_step)
    argv = script_args(smoke_data, smoke_policy, smoke_prms, out)[1:] + ["--reward=rule", "--eval_every=0"]
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 2"):
        grpo.main(argv)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2, "the checkpoint of step 2 is kept"
