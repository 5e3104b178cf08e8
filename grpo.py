"""
GRPO with ReasonFlux-PRM as a reward: the paper's online setting.

    python grpo.py                                    # one run, reward=mix
    python grpo.py --reward=rule                      # the outcome-only baseline
    python grpo.py --variants=rule,mix --seeds=6      # the comparison: mean ± std over seeds
    python grpo.py --variants=mix@0.25,mix@0.5,prm --seeds=6   # the β sweep
    python grpo.py --variants=rule,mix --seeds=3 --questions=data/arith/rl_questions.jsonl
                                                      # the paper's: questions of the records' distribution only
    python grpo.py --variants=mix --expert_steps=true --seeds=6   # a perfect step checker in the PRM's place

One step (Shao et al. 2024, DeepSeekMath §4.1.2-4.1.3, Algorithm 1):
  1. draw Q questions, sample G completions each at temperature τ (one batched KV-cache generation);
  2. reward every completion o_i:
       rule   r_i = verify(answer) ∈ {0, 1}
       prm    r_i = total_i / its largest value (rfprm.prm_total, rfprm.total_range), α = 1 (--alpha; 0: steps only)
       mix    r_i = (1 − β)·rule_i + β·prm_i   (the paper's mix; β is not stated, its RL code puts 0.75)
  3. group-normalised advantage Â_i = r_i − mean(r_group) (Dr. GRPO; GRPO divides by std(r_group) + ε),
     the same for all tokens;
  4. μ optimisation passes, each one AdamW step, on
       J = mean over completion tokens of  min(ρ_it Â_it, clip(ρ_it, 1 − ε, 1 + ε_high) Â_it) − β_KL·D_it
       ρ_it = π_θ(o_it | ·) / π_old(o_it | ·),  D_it = π_ref/π_θ − log(π_ref/π_θ) − 1  (the k3 estimator,
       unbiased and ≥ 0) against the frozen starting policy π_ref.

Known variants, one flag each:
  --scale_std=true      GRPO's Â_i = (r_i − mean) / (std + ε); the default is Dr. GRPO's r_i − mean (below)
  --loss_agg=sequence   GRPO's 1/G Σ_i 1/|o_i| Σ_t (each completion weighs the same); token (default): 1/Σ|o_i| Σ_i Σ_t
  --clip_high=0.28      DAPO clip-higher: a wider upper clip lets unlikely tokens grow (keeps entropy up)
  --expert_steps=true   the expert's step labels (task.judge) in place of the PRM's step and response scores:
                        what a perfect step checker would add (an upper bound, not a model; the trajectory
                        score stays the PRM's)
  --process=true        process supervision (DeepSeekMath §4.1.3, beyond the paper): the PRM's per-step scores,
                        normalised over the group, summed as a reward-to-go into each token's advantage

With μ = 1 (the default) π_old = π_θ: the ratio is 1, nothing is clipped and the printed loss sits
near zero, yet the gradient is the policy gradient. Watch reward and accuracy, not the loss.

The questions (ours) are half the records' distribution (2-3 operations, as the test's), half one
operation harder than any record (data/arith/rl_mixed.jsonl; prepare.mixed_questions). The paper trains
on questions like those the policy will be asked (--questions=data/arith/rl_questions.jsonl): there the
exact verifier separates the samples of most groups of 8 and the PRM's ranking adds little to it. On
the harder questions alone (--questions=data/arith/rl_hard.jsonl) most groups are all wrong under the
rule: the PRM's step scores are then the only signal, and the rule alone barely moves its start. Half
and half keeps both: the rule learns from the records' half, the PRM adds on the harder half what the
rule cannot see. rl_mixed.jsonl's held-out tail (its last 500, rl_questions' last quarter) is of the
records' distribution: the settings were chosen on it, not on the test questions. Fewer samples a
question for the same samples a step (--group_size=4 --questions_per_step=16, or 2 and 32) also leave
more groups equal under the rule, but the rule then learns less than with groups of 8, the default.

The advantage departs from GRPO: it is Dr. GRPO's (Liu et al. 2025), r_i − mean(r_group), with
no division by the group's std (--scale_std=true: GRPO's). The std is smallest where one sample of eight
is right, so GRPO weighs a lone right answer most; on the harder questions that makes the rule alone
fall further.

Where this departs from, or simplifies, GRPO and the paper otherwise:
  * the whole rollout batch is one minibatch: μ passes over it, one optimiser step each;
  * π_ref is the starting policy and never updated; the PRM is frozen (no iterative RL);
  * log-probs at the sampling temperature τ (as sampled), no top-k, dropout off throughout;
  * the PRM term is the total over its largest value, so that it lies in [0, 1] like the rule reward (ours);
  * the PRM reads the completion decoded and split into lines (split_completion), as at test time;
  * process supervision (ours, after DeepSeekMath): a reward per thinking line at the token that ends
    it, α·R_φ(trajectory) at the last; the token advantage is (1 − β)·Â_rule + β·(reward-to-go);
  * a tiny policy on synthetic arithmetic instead of Qwen2.5 on MATH; the metric is avg@2 (ours,
    --eval_samples=2), the mean accuracy of 2 samples per question at τ, on the test questions (the
    records' distribution) and on held-out questions: the last --heldout_questions of --questions,
    never drawn for training. avg@k is the quantity GRPO's expected reward raises and the pass@1
    DeepSeek-R1 reports; the samples come from one fixed generator, so that start, end and every run
    read the same numbers. --eval_samples=0 reads greedy accuracy: in 30 steps GRPO sharpens the
    sampled policy far more than it moves the greedy answer, which on some pipeline seeds does not move
    at all.
"""

import json
import os
import time
from dataclasses import dataclass, asdict, replace

import torch

import files
import task
import training
from files import save_checkpoint, read_jsonl, write_json_atomic, check_writable, BadInput, lock_out_dir
from tokenizer import Tokenizer, DEFAULT_VOCAB, load_tokenizer, encode_prompt, completion_record
from options import format_eta, parse_config, print_config, check_options, require, run_main
from checkpoints import load_checkpoint, model_from_checkpoint, make_checkpoint, check_resume
from evaluate import generate_and_verify, accuracy, mean_std
from training import pick_device, map_in_processes
from rfprm import load_prm, prm_total, total_range
from grpo_objective import token_tables, advantages_for, optimise


@dataclass
class GRPOConfig:
    out_dir: str = "out/grpo"
    init: str = "out/policy/ckpt.pt"     # the starting policy, and the frozen reference π_ref
    prm: str = "out/prm/ckpt.pt"         # ReasonFlux-PRM (read only when the reward needs it)
    questions: str = "data/arith/rl_mixed.jsonl"   # half records', half harder (ours); rl_questions.jsonl: the paper's
    test: str = "data/arith/test.jsonl"
    heldout_questions: int = 500         # the last questions of --questions: never drawn, evaluated beside --test
    tokenizer: str = DEFAULT_VOCAB
    # reward
    reward: str = "mix"                  # rule | prm | mix
    beta: float = 0.75                   # weight of the PRM term in mix (the paper's RL code)
    alpha: float = 1.0                   # α of the PRM's total (rfprm.prm_total); 0: the step score alone
    process: bool = False                # process supervision from the PRM's step scores
    expert_steps: bool = False           # the expert's step labels instead of the PRM's (an upper bound)
    # GRPO
    max_steps: int = 30                  # the CPU course's time (--max_steps=100: longer)
    questions_per_step: int = 8          # Q
    group_size: int = 8                  # G completions per question
    mu: int = 1                          # optimisation passes per rollout batch
    chunks: int = 4                      # the batch goes through in chunks of similar lengths (less padding)
    clip_eps: float = 0.2
    clip_high: float = 0.0               # upper clip ε_high; 0 = clip_eps (symmetric); DAPO: 0.28
    kl_coef: float = 0.04
    scale_std: bool = False              # Dr. GRPO (ours, see the docstring); True: GRPO's Â / std
    loss_agg: str = "token"              # token | sequence
    temperature: float = 1.0
    max_new_tokens: int = 128
    # optimisation
    lr: float = 1e-4
    min_lr: float = 1e-4                 # = lr: constant after warmup
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    # several runs: "rule,mix,mix@0.5,process" x seeds seed, seed+1, ...; prints mean ± std
    variants: str = ""
    seeds: int = 1
    workers: int = 2                     # runs at a time, each in a process of one thread (training.map_in_processes)
    # evaluation, logging, checkpoints
    eval_every: int = 10
    eval_questions: int = 200            # accuracy on the first test questions, during training
    final_questions: int = 1000          # ... and at the start and the end
    eval_samples: int = 2                # k: avg@k, the mean accuracy of k samples per question at --temperature; 0: greedy
    log_every: int = 5
    sample_every: int = 25               # print a few sampled completions with their rewards
    ckpt_every: int = 10
    resume: bool = False
    device: str = ""
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False


GPU = dict(max_steps=500, questions_per_step=32, group_size=16, eval_questions=500, workers=1)  # larger groups, longer
SMOKE = dict(max_steps=4, workers=1, questions_per_step=2, group_size=4, max_new_tokens=48, eval_every=2,
             eval_questions=6, final_questions=6, heldout_questions=6, log_every=1, sample_every=2, ckpt_every=2,
             warmup_steps=1)
PRESETS = {"gpu": GPU, "smoke": SMOKE}  # applied in this order; options given explicitly win
# the smallest value of each size (options.check_options): a group of 1 has no advantage to learn
# from, μ = 0 never steps; and the values of a choice
AT_LEAST = dict(workers=1, max_steps=1, questions_per_step=1, group_size=2, mu=1, chunks=1, max_new_tokens=1, warmup_steps=0,
                seeds=1, eval_every=0, eval_questions=0, final_questions=0, heldout_questions=0, eval_samples=0, log_every=1, sample_every=0, ckpt_every=1)
CHOICES = dict(reward=("rule", "prm", "mix"), loss_agg=("token", "sequence"))
# what a resume may change (checkpoints.check_resume): where and how often it writes and evaluates,
# when it stops; every other option changes what is trained
RESUME_FREE = {"out_dir", "resume", "max_steps", "test", "variants", "seeds", "workers", "eval_every",
               "eval_questions", "final_questions", "eval_samples", "log_every", "sample_every", "ckpt_every", "device",
               "preset", "smoke"}


# ----------------------------------------------------------------------------
# rewards


def expert_step_scores(records, scores):
    """The PRM's scores with every thinking and response step relabelled by the expert (task.judge):
    a perfect step checker in the PRM's place, to measure what checking steps can add to the reward."""
    return [{**s, "step": [task.judge(r["question"], r["thinking"][:t], line) for t, line in enumerate(r["thinking"])],
             "response": [task.judge(r["question"], r["thinking"], line) for line in r["response"]]}
            for r, s in zip(records, scores)]


def reward_batch(tok, comps, qs, right, prm, cfg):
    """Rewards of completions of questions qs, verified right or not (the rule reward):
    {"rule" (B,), "prm" (B,) or None, "reward" (B,), "scores"}."""
    rule = torch.tensor(right, dtype=torch.float)
    out = {"rule": rule, "prm": None, "reward": rule, "scores": None}
    if cfg.reward in ("prm", "mix"):
        records = [completion_record(tok, q["question"], c) for c, q in zip(comps, qs)]
        scores = prm.score(records)   # sorted by length inside: small batches pad little
        if cfg.expert_steps:
            scores = expert_step_scores(records, scores)
        total = [prm_total(s, cfg.alpha, prm.total) for s in scores]   # this run's α, not the checkpoint's
        prm_r = torch.tensor(total) / total_range(cfg.alpha, prm.total)   # in [0, 1] like the rule reward
        beta = 1.0 if cfg.reward == "prm" else cfg.beta
        out.update(prm=prm_r, scores=scores, reward=(1 - beta) * rule + beta * prm_r)
    elif cfg.reward != "rule":
        raise ValueError(f"--reward must be rule, prm or mix; got {cfg.reward!r}")
    return out


# ----------------------------------------------------------------------------
# the training loop


def show_samples(tok, qs, comps, rew, group_size, k=3):
    """Print the first k completions of the first group with their rewards."""
    print(f"  samples for Q: {qs[0]['question']}  (answer {qs[0]['answer']})")
    for i in range(min(k, group_size)):
        text = tok.enc.decode([t for t in comps[i] if t < tok.eot], errors="replace").replace("\n", " | ")
        prm_s = f" prm {float(rew['prm'][i]):.2f}" if rew["prm"] is not None else ""
        print(f"    reward {float(rew['reward'][i]):.2f} (rule {int(rew['rule'][i])}{prm_s}): {text[:150]}")


def rollout(model, tok, questions, cfg, step, device):
    """Q questions and G completions of each (one batched KV-cache generation), seeded by step.

    A resumed run draws the same questions and samples. Returns (questions, prompts, completions,
    right), each question repeated G times, groups contiguous; right: verified, the rule reward.
    """
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    qs = [questions[i] for i in torch.randperm(len(questions), generator=g)[:cfg.questions_per_step].tolist()]
    qs = [q for q in qs for _ in range(cfg.group_size)]
    prompts = [encode_prompt(tok, q["question"]) for q in qs]
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    comps, right = generate_and_verify(model, tok, prompts, [q["answer"] for q in qs], cfg.temperature,
                                       cfg.max_new_tokens, len(prompts), gen)
    return qs, prompts, comps, right


def frac_equal_groups(rewards, group_size):
    """The share of groups whose rewards are all equal: they give zero advantage, no learning signal."""
    r = rewards.view(-1, group_size)
    return float(((r.amax(1) - r.amin(1)) < 1e-6).float().mean())


def log_row(step, rew, comps, stats, group_size, lr):
    """The numbers people debug GRPO with, as one metrics.jsonl row."""
    r = rew["reward"]
    return {"step": step, "reward": float(r.mean()), "reward_std": float(r.std()),
            "rule": float(rew["rule"].mean()),
            "prm": float(rew["prm"].mean()) if rew["prm"] is not None else None,
            "equal_groups": frac_equal_groups(r, group_size),
            "equal_rule_groups": frac_equal_groups(rew["rule"], group_size),
            "length": sum(map(len, comps)) / len(comps), "lr": lr,
            **{k: float(v) for k, v in stats.items()}}


def format_row(row, max_steps, rate):
    return (f"step {row['step']:4d}/{max_steps} | reward {row['reward']:.3f}±{row['reward_std']:.2f} | "
            f"rule {row['rule']:.2f} | equal groups {row['equal_groups']:.0%} (rule {row['equal_rule_groups']:.0%}) | "
            f"len {row['length']:.0f} | kl {row['kl']:.4f} | ent {row['entropy']:.2f} | clip {row['clip_frac']:.1%} | "
            f"gnorm {row['grad_norm']:.2f} | loss {row['loss']:+.4f} | {rate:.2f}s/step | "
            f"eta {format_eta(rate * (max_steps - row['step']))}")


def resume_state(cfg, model, optimizer, tok, device):
    """(start step, metrics rows so far): from the checkpoint in cfg.out_dir on --resume (its rows up
    to its step; those logged after it are replayed), else a fresh start and a fresh log."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    start, history = 0, []
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, kind="policy", enc=tok.enc)
        model.load_state_dict(model_from_checkpoint(ck, device).state_dict())
        optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        old = read_jsonl(metrics_path, ()) if os.path.exists(metrics_path) else []
        history = [r for r in old if r["step"] <= start]   # rows logged after the checkpoint are replayed
        print(f"resuming from {ckpt_path} at step {start}")
    with open(metrics_path, "w") as f:   # a fresh run starts a fresh log; a resumed one keeps steps before it
        f.writelines(json.dumps(r) + "\n" for r in history)
    return start, history


def grpo_step(model, ref_model, optimizer, tok, questions, prm, tables, cfg, step, device):
    """One GRPO step: 1. sample, 2. reward, 3. advantages, 4. μ passes of the clipped objective.
    Returns (questions, completions, rewards, optimise's stats, lr); a non-finite loss or gradient
    stops the run before the step is logged or saved."""
    lr = training.get_lr(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    qs, prompts, comps, right = rollout(model, tok, questions, cfg, step, device)
    rew = reward_batch(tok, comps, qs, right, prm, cfg)
    X, Y = training.pack(list(zip(prompts, comps)), model.config.block_size, tok.eot)  # Y = −1 off the completion
    adv = advantages_for(Y, rew, tok, tables, cfg)
    stats = optimise(model, ref_model, optimizer, X.to(device), Y.to(device), adv.to(device), cfg)
    if not (torch.isfinite(stats["loss"]) and torch.isfinite(stats["grad_norm"])):
        raise training.non_finite(step)   # before the step is logged or saved
    return qs, comps, rew, stats, lr


def train_run(cfg, tok, questions, test, prm=None, start_eval=None, device="cpu", heldout=(), start_heldout=None):
    """One GRPO run of cfg.max_steps steps in cfg.out_dir (resumable) on `questions`; the policy is
    evaluated at its start and end on test[:final_questions] and on `heldout` (questions of the RL
    distribution it never trains on). Returns its results dict."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    init_ckpt = load_checkpoint(cfg.init, kind="policy", enc=tok.enc)
    model = model_from_checkpoint(init_ckpt, device).eval()   # eval: no dropout, log-probs as sampled
    ref_model = model_from_checkpoint(init_ckpt, device).eval().requires_grad_(False)
    optimizer = training.make_optimizer(model, cfg, device)
    tables = token_tables(tok, model.config.vocab_size) if cfg.process else None
    final_qs, eval_qs = test[:cfg.final_questions], test[:cfg.eval_questions]
    start, history = resume_state(cfg, model, optimizer, tok, device)

    def log_metrics(row):
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    same_sets = eval_qs == final_qs   # then one evaluation serves both the curve and the table
    if start_eval is None:
        start_eval = policy_accuracy(ref_model, tok, final_qs, cfg)
    if heldout and start_heldout is None:
        start_heldout = policy_accuracy(ref_model, tok, heldout, cfg)
    if start == 0:
        log_metrics({"step": 0, "test_acc": start_eval["acc"] if same_sets else policy_accuracy(model, tok, eval_qs, cfg)["acc"]})

    t0 = time.time()
    for step in range(start, cfg.max_steps):
        qs, comps, rew, stats, lr = grpo_step(model, ref_model, optimizer, tok, questions, prm, tables, cfg, step, device)
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            row = log_row(step + 1, rew, comps, stats, cfg.group_size, lr)
            log_metrics(row)
            print(format_row(row, cfg.max_steps, (time.time() - t0) / (step + 1 - start)))
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            show_samples(tok, qs, comps, rew, cfg.group_size)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            acc = policy_accuracy(model, tok, eval_qs, cfg)["acc"]
            log_metrics({"step": step + 1, "test_acc": acc})
            print(f"step {step + 1:4d} | test accuracy {acc:.1%} ({len(eval_qs)} questions, {metric_name(cfg)})")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), make_checkpoint(
                "policy", model, tok.enc, asdict(cfg), optimizer=optimizer.state_dict(), step=step + 1))

    final = policy_accuracy(model, tok, final_qs, cfg)
    heldout_evals = (start_heldout, policy_accuracy(model, tok, heldout, cfg)) if heldout else None
    if not any(r["step"] == cfg.max_steps and "test_acc" in r for r in history):
        log_metrics({"step": cfg.max_steps, "test_acc": final["acc"] if same_sets else policy_accuracy(model, tok, eval_qs, cfg)["acc"]})
    return finish_run(cfg, history, start_eval, final, len(final_qs), t0, heldout_evals)


def policy_accuracy(model, tok, questions, cfg):
    """The policy's accuracy on questions: greedy (cfg.eval_samples = 0) or avg@k, the mean over k
    samples per question at the sampling temperature, the quantity GRPO's expected reward raises
    (DeepSeek-R1 reports pass@1 so). Every evaluation draws from one fixed generator, so that start
    and end, and the runs of a comparison, are read with the same random numbers."""
    k = cfg.eval_samples
    if not k:
        return accuracy(model, tok, questions)
    res = accuracy(model, tok, [q for q in questions for _ in range(k)], temperature=cfg.temperature,
                   generator=torch.Generator(device=next(model.parameters()).device).manual_seed(0))
    return {**res, "n": len(questions), "samples": res["n"]}


def metric_name(cfg):
    return f"avg@{cfg.eval_samples} at τ = {cfg.temperature:g}" if cfg.eval_samples else "greedy"


def finish_run(cfg, history, start_eval, final, n_final, t0, heldout_evals=None):
    """A run's line, results.json and figure; returns its results dict. heldout_evals: (start, final)
    accuracies on the held-out RL questions, or None."""
    print(f"{variant_name(cfg)} seed {cfg.seed}: test accuracy {start_eval['acc']:.1%} -> {final['acc']:.1%} "
          f"({n_final} questions, {metric_name(cfg)}), {time.time() - t0:.0f}s")
    result = {"variant": variant_name(cfg), "seed": cfg.seed, "start": start_eval, "final": final,
              "metric": metric_name(cfg), "seconds": time.time() - t0, "config": asdict(cfg)}
    if heldout_evals:
        result["start_heldout"], result["final_heldout"] = heldout_evals
        print(f"{variant_name(cfg)} seed {cfg.seed}: held-out RL questions {heldout_evals[0]['acc']:.1%} -> "
              f"{heldout_evals[1]['acc']:.1%} ({heldout_evals[1]['n']} questions, {metric_name(cfg)})")
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"), result)
    if save_figure({variant_name(cfg): [history]}, os.path.join(cfg.out_dir, "grpo.png")):
        print(f"figure: {cfg.out_dir}/grpo.png")
    return result


# ----------------------------------------------------------------------------
# several variants and seeds, a table, a figure


def variant_name(cfg):
    name = cfg.reward + ("+process" if cfg.process else "")
    name += f" β={cfg.beta:g}" if cfg.reward == "mix" else ""
    name += " expert" if cfg.expert_steps and cfg.reward != "rule" else ""
    return name + (f" α={cfg.alpha:g}" if cfg.reward != "rule" and cfg.alpha != 1.0 else "")


def parse_variant(spec, cfg):
    """'rule' | 'prm' | 'mix' | 'mix@0.5' | 'process' | 'process@0.5' -> a config with those settings."""
    name, _, beta = spec.strip().partition("@")
    try:
        beta = float(beta) if beta else cfg.beta
    except ValueError:
        beta = None
    if name not in ("rule", "prm", "mix", "process") or beta is None:
        raise BadInput(f"unknown variant {spec!r}: expected rule, prm, mix[@β] or process[@β]")
    over = {"reward": "mix" if name == "process" else name, "process": name == "process", "beta": beta}
    return replace(cfg, **over)


def summarise(results):
    """{variant: {"final": (mean, std), "start", "n", "seconds", "finals"}} over seeds: the held-out
    accuracy at the end, mean ± std and per seed, the start's, the number of seeds, seconds per run."""
    table = {}
    for res in results:
        table.setdefault(res["variant"], []).append(res)
    summary = {v: {"final": mean_std([r["final"]["acc"] for r in rs]), "start": rs[0]["start"]["acc"],
                   "n": len(rs), "seconds": sum(r["seconds"] for r in rs) / len(rs),
                   "finals": [r["final"]["acc"] for r in rs], "metric": rs[0].get("metric", "greedy")}
               for v, rs in table.items()}
    for v, rs in table.items():   # the held-out RL questions, where every run of the variant has them
        if all("final_heldout" in r for r in rs):
            finals = [r["final_heldout"]["acc"] for r in rs]
            summary[v]["heldout"] = {"final": mean_std(finals), "start": rs[0]["start_heldout"]["acc"],
                                     "finals": finals, "n_questions": rs[0]["final_heldout"]["n"]}
    return summary


def format_table(summary, n_questions):
    """Held-out accuracy per variant, mean ± std over seeds (as printed and in out/results.md): on
    the test questions, and on the held-out questions of the RL distribution where the runs have them."""
    metric = next(iter(summary.values()))["metric"]
    lines = table_block(f"GRPO: held-out accuracy ({metric}) on {n_questions} questions, mean ± std over seeds",
                        {v: s for v, s in summary.items()}, summary)
    rl = {v: s["heldout"] for v, s in summary.items() if "heldout" in s}
    if rl:
        n = next(iter(rl.values()))["n_questions"]
        lines += table_block(f"... and on {n} held-out questions of the RL questions' distribution "
                             f"(--heldout_questions, never drawn for training)", rl, summary)
    return "\n".join(lines)


def table_block(title, rows, summary):
    """One block of format_table: start, final mean ± std, change, seeds, s/run, per seed."""
    lines = ["", title, f"{'variant':<22}{'start':>8}{'final':>16}{'change':>9}{'seeds':>7}{'s/run':>7}   per seed"]
    for v, s in rows.items():
        m, sd = s["final"]
        lines.append(f"{v:<22}{s['start']:>8.1%}{100 * m:>10.1f} ± {100 * sd:<4.1f}{100 * (m - s['start']):>+8.1f}"
                     f"{summary[v]['n']:>7}{summary[v]['seconds']:>7.0f}   " + " ".join(f"{100 * x:.1f}" for x in s["finals"]))
    return lines


def format_curves(histories, every, n_eval):
    """The training curves as text (the figure needs matplotlib), mean over seeds: at each
    evaluation, held-out accuracy and the sampled accuracy (rule reward) of the steps since
    the previous one, in %."""
    lines = [f"\ncurves, mean over seeds: step:held-out accuracy ({n_eval} questions)/sampled accuracy since the last"]
    for name, runs in histories.items():
        accs = {}
        for h in runs:
            for r in h:
                if "test_acc" in r:
                    accs.setdefault(r["step"], []).append(r["test_acc"])
        cells = []
        for step in sorted(accs):
            if len(accs[step]) < len(runs):
                continue   # a step some seeds have not reached (a run cut short)
            rule = [r["rule"] for h in runs for r in h if "rule" in r and step - every < r["step"] <= step]
            sampled = f"/{100 * sum(rule) / len(rule):.0f}" if rule else ""
            cells.append(f"{step}:{100 * sum(accs[step]) / len(accs[step]):.1f}{sampled}")
        lines.append(f"{name:<22}" + " ".join(cells))
    return "\n".join(lines)


def save_figure(histories, path):
    """Reward, KL and test accuracy against step, one line per variant (mean over seeds); False without matplotlib."""
    plt = files.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for name, runs in histories.items():
        for ax, key in zip(axes, ("reward", "rule", "kl", "test_acc")):
            curves = [[(r["step"], r[key]) for r in h if r.get(key) is not None] for h in runs]
            n = min(len(c) for c in curves)
            if n:
                xs = [p[0] for p in curves[0][:n]]
                ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
                ax.plot(xs, ys, label=name)
    for ax, title in zip(axes, ("reward (mean)", "sampled accuracy (rule reward)", "KL to π_ref (k3)",
                                "held-out accuracy")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=7)
    return files.save_png(fig, path, dpi=110)


def run_configs(cfg, runs):
    """The config of each run of a comparison, seed by seed (the variants of a seed are paired, and
    finish together), each in out_dir/<variant>/seed<k>/."""
    configs = []
    for k in range(cfg.seeds):
        for run in runs:
            name = variant_name(run).replace(" β=", "_b").replace(" α=", "_a").replace("+", "_").replace(" ", "_")
            configs.append(replace(run, seed=cfg.seed + k, variants="", seeds=1,
                                   out_dir=os.path.join(cfg.out_dir, name, f"seed{cfg.seed + k}")))
    return configs


def one_run(cfg, tok, questions, test, start_eval, heldout=(), start_heldout=None):
    """One run of a comparison, a job of training.map_in_processes (its PRM is loaded here).
    Returns (results, the rows of its metrics.jsonl)."""
    device = pick_device(cfg.device)
    prm = load_prm(cfg.prm, device) if cfg.reward in ("prm", "mix") else None
    print(f"=== {variant_name(cfg)}, seed {cfg.seed} ===")
    torch.manual_seed(cfg.seed)
    res = train_run(cfg, tok, questions, test, prm, start_eval, device, heldout, start_heldout)
    return res, read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"), ())


def checked_runs(cfg, tok, device):
    """(variant specs, every run's config): --variants and --seeds as runs, each
    checked now: a resume that would train something else, a bad starting policy, a PRM that is
    missing or no PRM fail before out_dir is made."""
    specs = [s for s in cfg.variants.split(",") if s.strip()]
    runs = [parse_variant(s, cfg) for s in specs] if specs else [cfg]
    require(not any(r.process and r.reward == "rule" for r in runs),
            "--process needs --reward=prm or --reward=mix (it reads the PRM's step scores)")
    for run in runs:
        check_options(run, {})   # the β of a variant too: mix@2 is no mix
    jobs = run_configs(cfg, runs) if specs or cfg.seeds > 1 else [cfg]
    for run in jobs:   # a resume that would train something else fails now
        ckpt_path = os.path.join(run.out_dir, "ckpt.pt")
        if run.resume and os.path.exists(ckpt_path):
            check_resume(load_checkpoint(ckpt_path, kind="policy", enc=tok.enc), ckpt_path, run, RESUME_FREE)
    load_checkpoint(cfg.init, kind="policy", enc=tok.enc)  # a bad starting policy fails before out_dir is made
    if any(r.reward in ("prm", "mix") for r in runs):
        if not os.path.exists(cfg.prm):
            raise FileNotFoundError(f"no PRM at {cfg.prm!r}: train it with train_prm.py, or use --reward=rule")
        load_prm(cfg.prm, device)   # a file that is not a PRM fails now
    return specs, jobs


def compare(cfg, jobs, tok, questions, test, device, heldout=()):
    """Several runs, out_dir/<variant>/seed<k>/, from the starting policy evaluated once: the table
    (mean ± std over seeds), the curves, results.json and the figure. Returns the summary."""
    start_model = model_from_checkpoint(load_checkpoint(cfg.init, kind="policy", enc=tok.enc), device).eval()
    start_eval = policy_accuracy(start_model, tok, test[:cfg.final_questions], cfg)
    start_heldout = policy_accuracy(start_model, tok, heldout, cfg) if heldout else None
    print(f"starting policy {cfg.init}: test accuracy {start_eval['acc']:.1%}" +
          (f", held-out RL questions {start_heldout['acc']:.1%}" if heldout else ""))
    results, histories = [], {}
    jobs = [(rcfg, tok, questions, test, start_eval, heldout, start_heldout) for rcfg in jobs]
    for res, history in map_in_processes(one_run, jobs, cfg.workers):
        results.append(res)
        histories.setdefault(res["variant"], []).append(history)
    summary = summarise(results)
    print(format_table(summary, len(test[:cfg.final_questions])))
    print(format_curves(histories, cfg.eval_every or cfg.max_steps, len(test[:cfg.eval_questions])))
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"),
                      {"summary": summary, "runs": results, "config": asdict(cfg)})
    if save_figure(histories, os.path.join(cfg.out_dir, "grpo.png")):
        print(f"figure: {cfg.out_dir}/grpo.png")
    return summary


def main(argv=None):
    cfg = parse_config(GRPOConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST, CHOICES)
    check_writable(cfg.out_dir)
    print_config(cfg)
    device = pick_device(cfg.device)
    tok = Tokenizer(load_tokenizer(cfg.tokenizer))
    questions, heldout = hold_out(read_jsonl(cfg.questions, ("question", "answer")), cfg)
    test = read_jsonl(cfg.test, ("question", "answer", "n_ops"))
    specs, jobs = checked_runs(cfg, tok, device)
    lock_out_dir(cfg.out_dir)
    if not specs and cfg.seeds == 1:   # one run, straight into out_dir
        return one_run(cfg, tok, questions, test, None, heldout)[0]
    return compare(cfg, jobs, tok, questions, test, device, heldout)


def hold_out(questions, cfg):
    """(questions to train on, held-out questions): the last cfg.heldout_questions of the file are
    never drawn, so that the policy is also evaluated on questions of the distribution it trains on
    that it has never seen (the test questions come from another one: the records')."""
    k = cfg.heldout_questions
    require(k < len(questions), f"{cfg.questions}: {len(questions)} questions leave none to train on with "
                                f"--heldout_questions={k} (the last {k} are held out); lower it")
    return (questions[:-k], questions[-k:]) if k else (questions, [])


if __name__ == "__main__":
    run_main(main)
