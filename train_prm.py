"""
Reward design and training of ReasonFlux-PRM, and its evaluation on a synthetic ProcessBench.

    python train_prm.py                        # reward design (cached) + PRM training -> out/prm
    python train_prm.py --eval                 # + baselines and ablations (out/prm_*), the ProcessBench table
    python train_prm.py --eval --rows=main,quality   # only those rows of the table
    python train_prm.py --labels=mc --out_dir=out/prm_response   # the response-only baseline alone
    python train_prm.py --processbench=data/arith/processbench_eval.json,data/arith/processbench_eval_heldout.json
                                               # ProcessBench's metric on files in its format (trains nothing)
    torchrun --nproc_per_node=2 train_prm.py   # DDP (gloo on CPU)

Reward design (rfprm.design_rewards), for each training record (question x, thinking
s_1..s_T, response a): the step rewards r_align, r_qual, r_coh and their fusion; the expert's
judgement of each response step; the template-guided r_final and the policy's own success
p_0. The PRM (the policy's backbone, a scalar head and the surprise readout) regresses the
step label where each step ends and the trajectory label at the end of the record.

Every row of the table is one set of options away (VARIANTS):
  ReasonFlux-PRM           our defaults: --fusion=gated --final=relative --readout=surprise --response=true
                           --on_policy=true
  paper's fusion           --fusion=paper     the softmax fusion as written (rfprm.fuse_rewards)
  paper's trajectory rwd   --final=template   r_final itself, not relative to p_0
  paper's plain head       --readout=plain    R = σ(w·h + b)
  thinking steps only      --response=false   no response-step labels; the total over thinking steps
  distilled records only   --on_policy=false  no policy samples among the training records (sample_records)
  alignment / quality / coherence only        one component as the step label (--labels=...)
  response-only PRM (MC)   --labels=mc        trained on final responses only, Math-Shepherd-style
                                              labels from Monte-Carlo rollouts of the policy
  outcome scorer           --labels=outcome   one label per record (is the answer right) everywhere
  confidence               no training: each step scores the policy's lowest log-probability among its
                           tokens, exp'd (rfprm.untrained_scorer)
  surprise term alone      no training: σ(ℓ_t), the readout's surprise term with the head at zero

Where this departs from, or fills in for, the paper (its release has no PRM training code):
  * the four defaults named in rfprm.py's docstring (readout, fusion, trajectory reward,
    response steps), each a row of the table;
  * the policy's own samples join the distilled records (sample_records), a row of the table;
  * Φ is a hashed TF-IDF bag of token uni/bigrams (or the policy's mean-pooled states);
    r_align takes the max over response steps instead of merging steps to pair them;
  * the loss is MSE on sigmoid scores, as the paper's formula, with λ_step = λ_final = 1.
The hidden `meta` of records is read only by the evaluation, never for training.

--processbench=FILE[,FILE...] scores files in ProcessBench's own format (a JSON list of
{id, generator, problem, steps, final_answer_correct, label}; prepare.py writes our three sets so)
with the trained PRM --prm and prints ProcessBench's metric per file and its average over the
files (score_processbench). It needs no policy, no reward design and trains nothing.
"""

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, asdict

import torch

import task
import training
from model import (GPTConfig, Tok, DEFAULT_VOCAB, load_tokenizer, encode_prompt, encode_completion, generate_and_verify,
                   completion_record)
from training import (load_checkpoint, model_from_checkpoint, make_checkpoint, save_checkpoint, pick_device,
                      parse_config, print_config, read_jsonl, write_json_atomic, init_distributed,
                      check_options, require, check_writable, run_main, load_cache, skip_long_prompts,
                      record_names, BadInput, lock_out_dir, check_resume)
from rfprm import (PRM, design_rewards, fuse_rewards, gated_fusion, relative_final, encode_for_prm, batch_of,
                   prm_loss, untrained_scorer, prm_tokens, step_result_tokens, load_prm, load_prm_weights,
                   records_that_fit)


@dataclass
class PRMConfig:
    out_dir: str = "out/prm"
    cache_dir: str = "out/rewards"   # reward designs, keyed by their inputs
    data: str = "data/arith/train.jsonl"
    eval_data: str = "data/arith/prm_eval.jsonl"
    # the shifted sets: the same table on records in words, or of a length, training never saw
    eval_heldout: str = "data/arith/prm_eval_heldout.jsonl"   # empty: skip
    eval_longer: str = "data/arith/prm_eval_longer.jsonl"     # empty: skip
    policy: str = "out/policy/ckpt.pt"
    init: str = ""                 # the PRM backbone's starting weights (empty: the policy's)
    tokenizer: str = DEFAULT_VOCAB
    n_train: int = 4000            # records given reward design and used for training
    policy_samples: int = 2000     # + policy completions of the next records' questions, designed alike (ours)
    on_policy: bool = True         # train on those samples too (ours); false: the distilled records only (the paper)
    # reward design
    labels: str = "fused"          # fused | align | quality | coherence | mc | outcome
    fusion: str = "gated"          # gated (ours, rfprm.gated_fusion) | paper (rfprm.fuse_rewards)
    final: str = "relative"        # r_final: relative (ours, rfprm.relative_final) | template (the paper)
    response: bool = True          # train response steps on the expert's judgement; total over them too (ours)
    encoder: str = "tfidf"         # Φ: tfidf | policy
    coherence: str = "logprob"     # logprob (the paper, ≤ 0) | prob (rescaled to [0, 1])
    fuse: str = "align,quality,coherence"   # what the fusion fuses (drop one to see what it adds)
    tau: float = 0.1               # coherence temperature
    n_negatives: int = 8           # coherence negatives from other trajectories
    n_rollouts: int = 2            # rollouts per trajectory (r_final) and per question (p_0); 2 keeps run.sh in its time
    mc_rollouts: int = 4           # Monte-Carlo completions per response prefix (labels=mc)
    mc_records: int = 1000         # records the response-only baseline is labelled and trained on
    judge_noise: float = 0.0       # a noisier expert: r_qual ← (1 - noise)·judge + noise·U(0, 1)
    # the PRM and its training
    readout: str = "surprise"      # surprise (ours: σ(w·h + a·ℓ + b)) | plain (the paper: σ(w·h + b))
    scramble: float = 0.5          # share of training records whose words are made up anew (ours; 0: none)
    misread: float = 0.0           # share of training records copied with one operand misread (ours; 0: none)
    checked: str = "result"        # what ℓ reads: result (ours) | computation (operands, connective and result)
                                   # | numbers (ours: the result, and the operands' digits as a second term)
    lm_coef: float = 0.5           # surprise readout: LM loss on expert-approved steps' operations and results (keeps ℓ sharp)
    facts: str = "data/arith/facts.txt"
    fact_rows: int = 8             # + rows of arithmetic facts per batch, their results in the LM loss (ours; 0: none)
    lam_step: float = 1.0
    lam_final: float = 1.0
    alpha: float = 1.0             # total = mean(step) + α·trajectory
    max_steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    log_every: int = 50
    ckpt_every: int = 100
    resume: bool = False
    device: str = ""
    compile: bool = False
    # evaluation
    eval: bool = False             # train the baselines and ablations too, print the table
    eval_records: int = 2000
    rows: str = ""                 # with --eval: the table's rows, by out_dir suffix ("main,quality,response";
                                   # "main" is ReasonFlux-PRM); empty: all
    # ProcessBench's own files, scored by a trained PRM (score_processbench): no reward design, no training
    processbench: str = ""         # FILE[,FILE...] in ProcessBench's format; empty: train as above
    prm: str = "out/prm/ckpt.pt"   # the PRM that scores them
    threshold: float = -1.0        # the first-error threshold; < 0: the one --eval stored beside --prm, else 0.5
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False


GPU = dict(n_train=10000, max_steps=3000, batch_size=64, mc_records=5000)  # every record, trained longer
SMOKE = dict(n_train=60, policy_samples=20, max_steps=6, batch_size=8, log_every=2, ckpt_every=3, n_rollouts=2,
             mc_rollouts=2, mc_records=30, eval_records=80, warmup_steps=2)
PRESETS = {"gpu": GPU, "smoke": SMOKE}  # applied in this order; options given explicitly win
# the smallest value of each size (training.check_options), and the values of a choice
AT_LEAST = dict(n_train=1, policy_samples=0, fact_rows=0, n_negatives=1, n_rollouts=1, mc_rollouts=1, mc_records=1, max_steps=1, batch_size=1,
                warmup_steps=0, log_every=1, ckpt_every=1, eval_records=1)
CHOICES = dict(labels=("fused", "align", "quality", "coherence", "mc", "outcome"), fusion=("gated", "paper"),
               final=("relative", "template"), readout=("surprise", "plain"), checked=("result", "computation", "numbers"), encoder=("tfidf", "policy"),
               coherence=("logprob", "prob"))
# what a resume may change (training.check_resume): where and how often it writes, when it stops,
# what it evaluates; every other option changes the labels or the training
RESUME_FREE = {"out_dir", "cache_dir", "resume", "max_steps", "log_every", "ckpt_every", "device", "compile",
               "eval", "eval_records", "rows", "eval_data", "eval_heldout", "eval_longer", "processbench", "prm",
               "threshold", "preset", "smoke"}


# ----------------------------------------------------------------------------
# labels: the reward design (cached), picked and fused as the options say


def mc_response_labels(policy, tok, records, cfg):
    """Math-Shepherd-style labels for each response step: the fraction of policy completions,
    started after that step, that reach the right answer (the last step: the answer itself)."""
    prompts, owners = [], []
    for k, r in enumerate(records):
        base = encode_prompt(tok, r["question"]) + encode_completion(tok, r["thinking"], [])[:-1]
        for j in range(len(r["response"]) - 1):
            prefix = tok.enc.encode_ordinary("\n".join(r["response"][:j + 1]) + "\n")
            prompts += [base + prefix] * cfg.mc_rollouts
            owners.append((k, j))
    answers = [records[owners[n // cfg.mc_rollouts][0]]["answer"] for n in range(len(prompts))]
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)  # where sampling runs
    _, right = generate_and_verify(policy, tok, prompts, answers, 1.0, 64, 256, g, "Monte-Carlo rollouts")
    labels = [[0.0] * len(r["response"]) for r in records]
    for n, (k, j) in enumerate(owners):
        labels[k][j] = sum(right[n * cfg.mc_rollouts:(n + 1) * cfg.mc_rollouts]) / cfg.mc_rollouts
    for k, r in enumerate(records):
        labels[k][-1] = float(task.verify("\n".join(r["response"]), r["answer"]))
    return labels


DESIGN_KEYS = ("n_train", "policy_samples", "encoder", "tau", "n_negatives", "n_rollouts", "judge_noise", "seed")
MC_KEYS = ("mc_records", "mc_rollouts", "seed")


def cache_key(cfg, files, keys):
    """A key of a reward design's inputs: the files' contents and the settings that change it."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached(path, make):
    """Load a torch file if it exists and is readable, else make it and write it atomically."""
    obj = load_cache(path, "reward design")
    if obj is None:
        obj = make()
        save_checkpoint(path, obj)
    return obj


def step_labels(cfg, design):
    """The thinking-step labels of cfg.labels / cfg.fusion, per record (lists of floats)."""
    parts = {"align": design["align"], "quality": design["quality"],
             "coherence": design[f"coherence_{cfg.coherence}"]}
    if cfg.labels in parts:
        return parts[cfg.labels]
    names = [n.strip() for n in cfg.fuse.split(",") if n.strip()]
    if not names or any(n not in parts for n in names):
        raise BadInput(f"--fuse takes a comma-separated subset of align,quality,coherence; got {cfg.fuse!r}")
    counts = [len(x) for x in parts["quality"]]
    flat = lambda name: torch.tensor([v for rec in parts[name] for v in rec])
    fused, _ = fuse_rewards(*[flat(n) for n in names])
    if cfg.fusion == "gated":
        fused = gated_fusion(fused, flat("quality"))
    return [c.tolist() for c in torch.split(fused, counts)]


def sample_records(policy, tok, questions, seed):
    """One completion of the policy per question (temperature 1), as records with their answer.

    Ours: the distilled records show the teacher's flaws, but in GRPO and Best-of-N the PRM
    scores the policy's own completions, whose errors differ (an operand taken from the wrong
    place, a step done twice). Designed like the distilled records (the expert judges every
    step), they teach the PRM the errors it will meet. --on_policy=false leaves them out.
    """
    prompts = [encode_prompt(tok, q["question"]) for q in questions]
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    comps, _ = generate_and_verify(policy, tok, prompts, [q["answer"] for q in questions], 1.0, 160, 256, g,
                                   "policy samples")
    return [{"id": f"sample-{k}", **completion_record(tok, q["question"], c), "answer": q["answer"]}
            for k, (q, c) in enumerate(zip(questions, comps))]


def targets_for(cfg, records, questions, tok):
    """The training records and their targets {"step", "response", "final", "approved"} for cfg's
    labels, from the cached reward design over the distilled records and the policy's samples of
    `questions`."""
    files = [cfg.data, cfg.policy]
    load_policy = lambda: model_from_checkpoint(load_checkpoint(cfg.policy, kind="policy", enc=tok.enc),
                                                pick_device(cfg.device)).eval()
    if cfg.labels == "mc":
        path = os.path.join(cfg.cache_dir, f"mc-{cache_key(cfg, files, MC_KEYS)}.pt")
        mc = cached(path, lambda: {"response": mc_response_labels(load_policy(), tok, records[:cfg.mc_records], cfg)})
        return records[:len(mc["response"])], [{"step": [], "response": lab, "final": float("nan"), "approved": []}
                                               for lab in mc["response"]]

    def design():
        policy = load_policy()
        samples = sample_records(policy, tok, questions[:cfg.policy_samples], cfg.seed)
        return {**design_rewards(records + samples, tok, policy, cfg.encoder, cfg.tau, cfg.n_negatives,
                                 cfg.n_rollouts, cfg.judge_noise, cfg.seed), "samples": samples}
    path = os.path.join(cfg.cache_dir, f"design-{cache_key(cfg, files, DESIGN_KEYS)}.pt")
    d = cached(path, design)
    records = records + (d["samples"] if cfg.on_policy else [])
    d = {k: v[:len(records)] if isinstance(v, list) else v for k, v in d.items()}   # per-record lists
    if cfg.labels == "outcome":  # one label per record, at every read position
        return records, [{"step": [o] * len(r["thinking"]), "response": [o] * len(r["response"]), "final": o,
                          "approved": []} for o, r in zip(d["outcome"], records)]
    final = relative_final(d["final"], d["p0"]) if cfg.final == "relative" else d["final"]
    if cfg.lam_final == 0:
        final = [float("nan")] * len(records)
    response = d["response_quality"] if cfg.response else [[] for _ in records]
    # the steps the expert approved, thinking then response: the surprise readout's LM loss reads
    # their operations and results
    approved = [[q >= 0.5 for q in think + resp] for think, resp in zip(d["quality"], response)]
    return records, [{"step": s, "response": a, "final": f, "approved": ok}
                     for s, a, f, ok in zip(step_labels(cfg, d), response, final, approved)]


# ----------------------------------------------------------------------------
# PRM training

WORD_RE = re.compile(r"[A-Za-z]+|=")


def scrambled(record, rng):
    """The record with every word of its thinking and response ('then', 'gives', '=') replaced by
    a made-up one, the same throughout the record, as if another author wrote it (ours).

    Why: a PRM that reads only the teacher's words learns them, and then scores a step in words
    it never read by their strangeness. Trained on records whose words mean nothing, its head
    learns to read what stays when the words change, the operations and their results, and its
    LM head learns to predict a result after any word for '='. The numbers, the operators and
    'Answer:' (the verifier's contract in every voice) are kept; the labels are the record's own.
    """
    made_up = {}

    def word(m):
        w = m[0]
        if w == "Answer":
            return w
        if w not in made_up:
            made_up[w] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        return made_up[w]
    rewrite = lambda lines: [WORD_RE.sub(word, str(line)) for line in lines]
    return {**record, "thinking": rewrite(record["thinking"]), "response": rewrite(record["response"])}



def misread_line(line, rng):
    """The line with one operand of its last computation replaced by another digit and the
    result recomputed ('7 + 3 = 10' -> '7 + 5 = 12'); None when the result would be negative."""
    m = list(task.STEP_RE.finditer(line))[-1]
    new = {1: int(m[1]), 3: int(m[3])}
    side = rng.choice((1, 3))
    new[side] = rng.choice([v for v in range(1, 10) if v != new[side]])
    c = task.apply_op(m[2], new[1], new[3])
    if c < 0:
        return None
    return line[:m.start(1)] + str(new[1]) + line[m.end(1):m.start(3)] + str(new[3]) \
        + line[m.end(3):m.start(4)] + str(c) + line[m.end(4):]


def misread(record, target, rng):
    """A copy of the record in which one approved computation line takes a wrong operand and
    keeps right arithmetic ('7 + 3 = 10' -> '7 + 5 = 12'), judged wrong by the expert: its step
    target is 0, every other target the record's own, the trajectory's not read (ours).
    None when no line can be misread.

    Why: the teacher's slips are wrong results, so its records never show the policy's most
    frequent error, a number taken from the wrong place with the arithmetic right; a PRM that
    never read one rates it by its right result.
    """
    lines = [str(x) for x in record["thinking"]]
    where = [k for k, line in enumerate(lines) if k < len(target["step"]) and target["step"][k] >= 0.5
             and task.STEP_RE.search(line) and not task.FIX_RE.search(line)
             and task.judge(record["question"], lines[:k], line) == 1.0]
    rng.shuffle(where)
    for k in where:
        line = misread_line(lines[k], rng)
        if line and task.judge(record["question"], lines[:k], line) == 0.0:   # not a right step by chance
            break
    else:
        return None
    step = list(target["step"])
    step[k] = 0.0
    approved = list(target["approved"])
    if k < len(approved):
        approved[k] = False
    return ({**record, "id": f"{record.get('id', '')}-misread", "thinking": lines[:k] + [line] + lines[k + 1:]},
            {**target, "step": step, "final": float("nan"), "approved": approved})


def pack_prm(records, targets, tok, mode, block_size, key="checked_of"):
    """Training tensors (N, L): ids, checked_of, step and final targets (NaN where nothing is read),
    language-model targets (-1 where none), and the lengths (N,). A record longer than
    block_size is left out with a warning.

    The step targets sit where each step ends (thinking steps, and response steps when their
    targets are given; the response-only PRM reads its response steps); the final target at
    the record's last token. The LM targets are the checked tokens (operation and result) of the
    approved steps, set one position early (token p is predicted at p − 1).
    """
    enc = [encode_for_prm(tok, r, mode, block_size) for r in records]
    cut = {k for k, e in enumerate(enc) if e["truncated"]}
    if cut:  # a step past the cut would be trained at another step's position: left out, not cut
        print(f"warning: {len(cut)} of {len(records)} records longer than block_size={block_size}, "
              f"left out of training: {record_names(records, sorted(cut))}")
        enc, targets = zip(*[(e, t) for k, (e, t) in enumerate(zip(enc, targets)) if k not in cut])
    ids, checked_of = batch_of(enc, tok.eot, key)
    t_step = torch.full(ids.shape, float("nan"))
    t_final = torch.full(ids.shape, float("nan"))
    lm = torch.full(ids.shape, -1, dtype=torch.long)
    for i, (e, t) in enumerate(zip(enc, targets)):  # once, before training
        for pos, val in ((e["think"], t["step"]), (e["response"], t["response"])):
            if pos and val:
                t_step[i, pos[:len(val)]] = torch.tensor(val[:len(pos)], dtype=torch.float)
        if t["final"] == t["final"]:  # not NaN
            t_final[i, e["end"]] = t["final"]
        approved = {end for end, ok in zip(e["think"] + e["response"], t["approved"]) if ok}
        for p, end in enumerate(e[key if isinstance(key, str) else "checked_of"]):   # numbers: operands too
            if p > 0 and end in approved:
                lm[i, p - 1] = e["ids"][p]
    return ids, checked_of, t_step, t_final, lm, torch.tensor([len(e["ids"]) for e in enc])


def fact_stream(path, tok):
    """The facts file as one token stream and, per position, whether the next token states a
    result (task.result_span): the LM targets of fact rows."""
    ids, is_result = [], []
    nl = tok.enc.encode_ordinary("\n")
    for line in training.read_lines(path):   # once, before training
        line_ids, result, _ = step_result_tokens(tok, line)
        ids += line_ids + nl
        is_result += [k in result for k in range(len(line_ids))] + [False] * len(nl)
    return torch.tensor(ids), torch.tensor(is_result[1:] + [False])


def with_fact_rows(X, R, TS, TF, LM, facts, n_rows, offset):
    """The batch (B, L) with n_rows rows of arithmetic facts below it (ours): the facts' results are
    LM targets, nothing else is read. Why: the policy's own slips are the facts its backbone gets
    wrong, so a PRM that inherits that backbone cannot see them by surprise; facts keep its
    language-model head a better calculator than the policy."""
    ids, is_result = facts
    L = X.size(1)
    starts = (offset + torch.arange(n_rows) * 7919) % (len(ids) - L - 1)
    pos = starts[:, None] + torch.arange(L)                                           # (n_rows, L)
    lm = torch.where(is_result[pos], ids[pos + 1], -1)
    nan = torch.full((n_rows, L), float("nan"))
    return (torch.cat([X, ids[pos]]), torch.cat([R, torch.full((n_rows, *R.shape[1:]), -1)]), torch.cat([TS, nan]),
            torch.cat([TF, nan]), torch.cat([LM, lm]))


def prm_batch_loss(ids, checked_of, t_step, t_final, lm, lengths, cfg, device, facts=None):
    """The PRM's loss on a batch: prm_loss, plus lm_coef × the LM loss when the readout reads ℓ
    (on the results of approved steps and, given `facts`, of cfg.fact_rows rows of facts)."""
    lm_coef = cfg.lm_coef if cfg.readout == "surprise" else 0.0

    def batch_loss(model, idx):
        L = int(lengths[idx].max())
        X, R, TS, TF, LM = ids[idx, :L], checked_of[idx, :L], t_step[idx, :L], t_final[idx, :L], lm[idx, :L]
        if lm_coef and facts is not None and cfg.fact_rows:   # the offset follows the batch: resumable
            X, R, TS, TF, LM = with_fact_rows(X, R, TS, TF, LM, facts, cfg.fact_rows, int(idx.sum()))
        scores, lm_loss = model(X.to(device), R.to(device), LM.to(device) if lm_coef else None)
        loss = prm_loss(scores, TS.to(device), TF.to(device), cfg.lam_step, cfg.lam_final)
        if lm_loss is not None:
            loss = loss + lm_coef * lm_loss
        return loss, int(lengths[idx].sum())   # tokens read, for the tok/s of the log line
    return batch_loss


@torch.no_grad()
def arithmetic_accuracy(gpt, tok, records, batch_size=64):
    """The backbone's single-step arithmetic: over the computation lines ('a op b = c') of the
    thinking that the expert judges right, the share whose result its language-model head
    predicts exactly (greedy, each result token given the record up to it)."""
    device = next(gpt.parameters()).device
    hits = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        encoded = [prm_tokens(tok, r["question"], r["thinking"], r["response"], gpt.config.block_size)
                   for r in chunk]
        checked = []   # (row, end position) of the lines the expert judges right
        for j, (r, e) in enumerate(zip(chunk, encoded)):
            for t, (line, end) in enumerate(zip(r["thinking"], e["think"])):
                if task.STEP_RE.search(str(line)) and task.judge(r["question"], r["thinking"][:t], line) == 1.0:
                    checked.append((j, end))
        idx, result_of = batch_of(encoded, tok.eot, "result_of")
        idx, result_of = idx.to(device), result_of.to(device)
        B, T = idx.shape
        is_result = result_of[:, 1:] >= 0
        pred = gpt.lm_head(gpt.hidden(idx)[:, :-1][is_result]).argmax(-1) == idx[:, 1:][is_result]
        rows = torch.arange(B, device=device)[:, None].expand(B, T - 1)[is_result]
        exact = torch.ones(B * T, device=device).scatter_reduce(0, rows * T + result_of[:, 1:][is_result],
                                                               pred.float(), "amin")   # every result token right
        hits += [bool(exact[j * T + end]) for j, end in checked]
    return sum(hits) / max(1, len(hits))


def train_prm(cfg, records, questions, tok, device, rank=0, world=1, probe=()):
    """Reward design (cached), then PRM training from the policy's weights. Returns the PRM.

    records: the distilled training records; questions: those the policy answers for its samples
    (sample_records); probe: records on which the backbone's single-step arithmetic is printed
    before and after.
    """
    mode = "response_only" if cfg.labels == "mc" else "full"
    obj = [targets_for(cfg, records, questions, tok) if rank == 0 or world == 1 else None]
    if world > 1:  # rank 0 designed the rewards; everyone reads the cache
        torch.distributed.broadcast_object_list(obj, src=0)
    records, targets = obj[0]
    rng = random.Random(cfg.seed)
    if cfg.misread and cfg.labels == "fused":   # the expert's verdict is what the fused labels gate on
        extra = [misread(r, t, rng) for r, t in zip(records, targets) if rng.random() < cfg.misread]
        extra = [x for x in extra if x is not None]
        records, targets = records + [r for r, _ in extra], targets + [t for _, t in extra]
    records = [scrambled(r, rng) if rng.random() < cfg.scramble else r for r in records]
    init_ckpt = load_checkpoint(cfg.init or cfg.policy, kind="policy", enc=tok.enc)
    prm = PRM(GPTConfig(**init_ckpt["model_args"]), cfg.readout, cfg.checked)
    prm.tok = tok
    prm.gpt.load_state_dict(model_from_checkpoint(init_ckpt).state_dict())
    prm.to(device)
    if probe and rank == 0:
        before = arithmetic_accuracy(prm.gpt, tok, probe)
    ids, checked_of, t_step, t_final, lm, lengths = pack_prm(records, targets, tok, mode, prm.config.block_size, prm.read_key())

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    optimizer = training.make_optimizer(prm, cfg, device)
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, kind="prm", enc=tok.enc)
        check_resume(ck, ckpt_path, cfg, RESUME_FREE)
        load_prm_weights(prm, ck)
        optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        print(f"resuming from {ckpt_path} at step {start}")

    def save(step, opt):
        if rank == 0:
            save_checkpoint(ckpt_path, make_checkpoint("prm", prm, tok.enc, asdict(cfg), mode=mode,
                                                       readout=cfg.readout, checked=cfg.checked, optimizer=opt.state_dict(), step=step))

    model = torch.compile(prm) if cfg.compile else prm
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if start == 0 and rank == 0 and os.path.exists(metrics):
        os.remove(metrics)
    facts = fact_stream(cfg.facts, tok) if cfg.fact_rows and cfg.readout == "surprise" else None
    require(facts is None or len(facts[0]) > 2 * prm.config.block_size,
            f"{cfg.facts}: too few facts for rows of {prm.config.block_size} tokens")
    training.train(model, prm_batch_loss(ids, checked_of, t_step, t_final, lm, lengths, cfg, device, facts), lengths, cfg,
                   device, rank, world, ckpt_fn=save, start_step=start, optimizer=optimizer, metrics_path=metrics)
    if probe and rank == 0:
        after = arithmetic_accuracy(prm.gpt, tok, probe)
        print(f"backbone single-step arithmetic (right results predicted exactly, {len(probe)} held-out records): "
              f"{before:.1%} before PRM training, {after:.1%} after")
    prm.tok, prm.alpha, prm.mode, prm.with_response = tok, cfg.alpha, mode, cfg.response
    return prm.eval()


# ----------------------------------------------------------------------------
# evaluation: a synthetic ProcessBench (hidden meta used here only)

def auroc(scores, labels):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for v in torch.unique(s[order][1:][s[order][1:] == s[order][:-1]]):  # average ranks of ties
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def first_error_predictions(step_scores, threshold):
    """The predicted first error: the first step scored below threshold, or -1."""
    return [next((t for t, s in enumerate(steps) if s < threshold), -1) for steps in step_scores]


def processbench_metric(step_scores, first_errors, threshold):
    """ProcessBench's metric (QwenLM/ProcessBench): the predicted first error is the first step
    scored below threshold, or -1; acc_err is the share of the problems with an error (label != -1)
    whose first error is predicted exactly, acc_corr the share of the error-free ones predicted -1,
    F1 their harmonic mean. Where ProcessBench's code would divide 0 by 0 (no problem of a kind, or
    both accuracies 0) this gives 0.

    >>> processbench_metric([[0.9, 0.2], [0.9, 0.9], [0.1]], [1, -1, 1], 0.5)["f1"]
    0.6666666666666666
    """
    pred = first_error_predictions(step_scores, threshold)
    err = [p == f for p, f in zip(pred, first_errors) if f != -1]
    ok = [p == f for p, f in zip(pred, first_errors) if f == -1]
    a, b = (sum(err) / len(err) if err else 0.0), (sum(ok) / len(ok) if ok else 0.0)
    return {"acc_err": a, "acc_corr": b, "f1": 2 * a * b / (a + b) if a + b else 0.0,
            "n": len(pred), "n_err": len(err)}


def first_error_f1(step_scores, first_errors, threshold):
    """ProcessBench's F1: harmonic mean of the accuracy on erroneous and on error-free records."""
    return processbench_metric(step_scores, first_errors, threshold)["f1"]


def evaluate_scorer(scores, records, threshold=None):
    """The ProcessBench row of a scorer: step AUROC on every thinking step and on computation
    lines ('a op b = c' in any voice), first-error F1, trajectory AUROC (total, good vs flawed),
    mean total per flaw type.

    threshold=None (the records' own voice): the first-error threshold is chosen on the first
    half of the records and every figure is measured on the second. A shifted set is measured
    whole, at the threshold chosen on the records' own voice: nothing is tuned on it.
    """
    steps = [s["step"] for s in scores]
    firsts = [r["meta"]["first_error"] for r in records]
    half = 0
    if threshold is None:
        half = len(records) // 2
        grid = sorted({round(x, 3) for st in steps[:half] for x in st}) or [0.5]
        grid = grid[::max(1, len(grid) // 200)]
        threshold = max(grid, key=lambda th: first_error_f1(steps[:half], firsts[:half], th))
    test = list(zip(scores[half:], records[half:]))
    flat = [(x, ok, bool(task.STEP_RE.search(str(line))))
            for s, r in test for x, ok, line in zip(s["step"], r["meta"]["step_ok"], r["thinking"])]
    per_flaw = {}
    for s, r in test:
        per_flaw.setdefault(r["meta"]["flaw"], []).append(s["total"])
    return {"step_auroc": auroc([x for x, _, _ in flat], [ok for _, ok, _ in flat]),
            "computation_auroc": auroc([x for x, _, c in flat if c], [ok for _, ok, c in flat if c]),
            "first_error_f1": first_error_f1(steps[half:], firsts[half:], threshold),
            "trajectory_auroc": auroc([s["total"] for s, _ in test], [r["meta"]["good"] for _, r in test]),
            "threshold": threshold,
            "per_flaw": {f: sum(v) / len(v) for f, v in sorted(per_flaw.items(), key=lambda kv: task.FLAWS.index(kv[0]))}}


def evaluate_on_sets(prm, eval_sets):
    """{set name: ProcessBench row} of one scorer, and its scores on each set. The first set is
    the records' own voice; its threshold is used on the others."""
    rows, scores = {}, {}
    for k, (name, records) in enumerate(eval_sets.items()):
        scores[name] = prm.score(records)
        threshold = rows[next(iter(rows))]["threshold"] if k else None
        rows[name] = evaluate_scorer(scores[name], records, threshold)
    return rows, scores


# ----------------------------------------------------------------------------
# ProcessBench's own file format (QwenLM/ProcessBench): a JSON list of problems

GENERATORS = {"train": "teacher, training voice", "heldout": "teacher, held-out voice"}   # by meta["voice"]
PROCESSBENCH_FIELDS = {"id": ((str, int), "a string or an integer"), "generator": (str, "a string"),
                       "problem": (str, "a string"), "steps": (list, "a list of strings"),
                       "final_answer_correct": (bool, "true or false"), "label": (int, "an integer")}


def to_processbench(records, name):
    """Our records as ProcessBench problems: {"id", "generator", "problem", "steps",
    "final_answer_correct", "label"}. steps are the thinking lines, label the hidden first error
    (meta["first_error"]: the 0-based index of the earliest wrong step, -1 when every step is
    right), final_answer_correct the expert's verdict on the response, generator the voice.

    Where it departs from ProcessBench: its steps are a whole solution, ending in its answer; ours
    are the thinking alone, so a record whose thinking is right and whose response drifts from it
    (misaligned, truncated) has label -1 and a wrong final answer.
    """
    return [{"id": f"{name}-{r['id']}", "generator": GENERATORS[r["meta"]["voice"]], "problem": r["question"],
             "steps": [str(line) for line in r["thinking"]],
             "final_answer_correct": task.verify("\n".join(r["response"]), r["answer"]),
             "label": r["meta"]["first_error"]} for r in records]


def processbench_problem(row):
    """What is wrong with one ProcessBench problem, or None."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for key, (kind, what) in PROCESSBENCH_FIELDS.items():
        if key not in row:
            return f"no '{key}'"
        if not isinstance(row[key], kind) or (kind is int and isinstance(row[key], bool)):   # True is an int
            return f"expected '{key}' to be {what}, got {json.dumps(row[key])[:40]}"
    if not all(isinstance(step, str) for step in row["steps"]):
        return "expected 'steps' to be a list of strings"
    if not -1 <= row["label"] < len(row["steps"]):
        return f"label {row['label']} is not -1 or the index of one of its {len(row['steps'])} steps"
    return None


def read_processbench(path):
    """A ProcessBench file as (records, labels): each problem as a record the PRM scores,
    {"id", "question": problem, "thinking": steps, "response": []}, and its label. Anything else
    stops with a BadInput `path: what was expected` (problem k: the k-th of the list, from 0)."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such file (python data/arith/prepare.py writes ours)")
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise BadInput(f"{path}: expected a JSON list of ProcessBench problems "
                       f"({getattr(e, 'msg', None) or type(e).__name__})") from None
    if not isinstance(rows, list) or not rows:
        raise BadInput(f"{path}: expected a non-empty JSON list of ProcessBench problems")
    for k, row in enumerate(rows):
        problem = processbench_problem(row)
        if problem:
            raise BadInput(f"{path}: problem {k}: {problem}")
    records = [{"id": row["id"], "question": row["problem"], "thinking": row["steps"], "response": []} for row in rows]
    return records, [row["label"] for row in rows]


def processbench_threshold(cfg):
    """(threshold, where it comes from) for --processbench: --threshold when given; else the one
    --eval chose for ReasonFlux-PRM on the records' own voice, in processbench.json beside --prm
    (out/prm/processbench.json for out/prm/ckpt.pt); else 0.5, the midpoint between a wrong step's
    label (0) and a right one's (¾ or more, rfprm.gated_fusion)."""
    if cfg.threshold >= 0:
        return cfg.threshold, "--threshold"
    path = os.path.join(os.path.dirname(cfg.prm), "processbench.json")
    try:
        with open(path, encoding="utf-8") as f:
            return float(json.load(f)["rows"]["ReasonFlux-PRM"]["threshold"]), f"chosen by --eval, {path}"
    except (OSError, ValueError, KeyError, TypeError):   # none stored: the label scale's midpoint
        return 0.5, f"no ReasonFlux-PRM threshold in {path}"


def score_processbench(cfg):
    """--processbench: ProcessBench's metric (processbench_metric) of the PRM --prm on each file
    (read_processbench), and the average of the per-file F1s, as ProcessBench averages its subsets.
    Returns {file: metric}.

    A problem has no response: the PRM reads its steps as thinking lines, then <|/think|> and
    <|endoftext|> at once (rfprm.prm_tokens); each step's score is read where it ends, and the
    trajectory score is still read at the end, though the metric needs the step scores only.
    The threshold (processbench_threshold) is fixed before any file is read: nothing is tuned on
    them. On our own sets the F1 is over the whole file, where --eval's is over the records not
    used to choose the threshold (and at most --eval_records of them), so the two differ a little.
    """
    paths = [p.strip() for p in cfg.processbench.split(",") if p.strip()]
    sets = {path: read_processbench(path) for path in paths}   # every file is checked before the PRM loads
    threshold, source = processbench_threshold(cfg)
    prm = load_prm(cfg.prm, pick_device(cfg.device))
    results = {path: processbench_metric([s["step"] for s in prm.score(records)], labels, threshold)
               for path, (records, labels) in sets.items()}
    print(format_processbench(results, threshold, source, cfg.prm))
    return results


def format_processbench(results, threshold, source, prm_path):
    """ProcessBench's table: per file the problems, those with an error, error acc, correct acc and
    F1 in percent, as ProcessBench prints them; then the F1 averaged over the files."""
    w = max(len("file"), *(len(p) for p in results))
    lines = [f"\nProcessBench's metric, {prm_path}: the predicted first error is the first step scored below "
             f"{threshold:.3f} ({source})",
             f"{'file':<{w}}{'problems':>10}{'with error':>12}{'error acc':>11}{'correct acc':>13}{'F1':>7}"]
    for path, r in results.items():
        lines.append(f"{path:<{w}}{r['n']:>10}{r['n_err']:>12}{100 * r['acc_err']:>11.1f}"
                     f"{100 * r['acc_corr']:>13.1f}{100 * r['f1']:>7.1f}")
    mean_f1 = sum(r["f1"] for r in results.values()) / len(results)
    files = f"{len(results)} file" + ("s" if len(results) > 1 else "")
    lines.append(f"{f'average F1 over {files}':<{w + 46}}{100 * mean_f1:>7.1f}")
    return "\n".join(lines)


def text_histogram(good, bad, bins=10, width=30, labels=("good", "flawed")):
    """Two overlaid histograms of scores, as text."""
    lo, hi = min(good + bad), max(good + bad)
    span = (hi - lo) or 1.0
    count = lambda xs: [sum(1 for x in xs if min(bins - 1, int((x - lo) / span * bins)) == b) for b in range(bins)]
    cg, cb = count(good), count(bad)
    top = max(cg + cb) or 1
    lines = []
    for b in range(bins):
        edge = lo + span * b / bins
        lines.append(f"  {edge:7.3f} {labels[0]} {'#' * round(cg[b] / top * width):<{width}} "
                     f"{labels[1]} {'x' * round(cb[b] / top * width)}")
    return "\n".join(lines)


def step_scores_by_truth(scores, records):
    """The scores of right and of wrong thinking steps (hidden truth), over a set."""
    right, wrong = [], []
    for s, r in zip(scores, records):
        for x, ok in zip(s["step"], r["meta"]["step_ok"]):
            (right if ok else wrong).append(x)
    return right, wrong


def print_step_histograms(named_scores, records, title):
    """The paper's motivating picture as text: right vs wrong thinking-step scores, per scorer."""
    for name, scores in named_scores.items():
        right, wrong = step_scores_by_truth(scores, records)
        print(f"\nthinking-step scores, {title}, {name.strip()} (hidden truth):\n"
              f"{text_histogram(right, wrong, labels=('right', 'wrong'))}")


def save_histograms(named_scores, records, path, score_of):
    """Overlaid histograms of good vs bad items, one panel per scorer (PNG). score_of(scores,
    records) -> (good values, bad values)."""
    plt = training.pyplot()
    if plt is None:
        return False
    # squeeze=False: a row of axes even for one scorer (--rows=response), not a bare Axes
    fig, axes = plt.subplots(1, len(named_scores), figsize=(3.2 * len(named_scores), 2.6), squeeze=False)
    axes = axes[0]
    for ax, (name, scores) in zip(axes, named_scores.items()):
        good, bad = score_of(scores, records)
        ax.hist(good, bins=20, alpha=0.6, label="good")
        ax.hist(bad, bins=20, alpha=0.6, label="bad")
        ax.set_title(name.strip(), fontsize=9)
    axes[0].legend(fontsize=8)
    return training.save_png(fig, path, dpi=100)


def trajectory_totals(scores, records):
    """Totals of good and of flawed trajectories."""
    return ([s["total"] for s, r in zip(scores, records) if r["meta"]["good"]],
            [s["total"] for s, r in zip(scores, records) if not r["meta"]["good"]])


PAPER = {"fusion": "paper", "final": "template", "readout": "plain", "response": False, "on_policy": False}
VARIANTS = [  # name, suffix of its out_dir, overrides: every row of the table is a set of options
    ("ReasonFlux-PRM", "", {}),
    ("  paper's fusion", "_paper_fusion", {"fusion": "paper"}),
    ("  paper's trajectory rwd", "_paper_final", {"final": "template"}),
    ("  paper's plain head", "_plain", {"readout": "plain"}),
    ("  ℓ on the computation", "_computation", {"checked": "computation"}),
    ("  ℓ on result and operands", "_numbers", {"checked": "numbers"}),
    ("  no made-up words", "_unscrambled", {"scramble": 0.0}),
    ("  thinking steps only", "_thinking", {"response": False}),
    ("  distilled records only", "_distilled", {"on_policy": False}),
    ("  the paper as written", "_paper", PAPER),
    ("  alignment only", "_align", {"labels": "align"}),
    ("  quality only", "_quality", {"labels": "quality"}),
    ("  coherence only", "_coherence", {"labels": "coherence"}),
    ("response-only PRM (MC)", "_response", {"labels": "mc"}),   # out/prm_response: used by later stages
    ("outcome scorer", "_outcome", {"labels": "outcome"}),        # out/prm_outcome
    ("confidence (untrained)", "_confidence", "confidence"),     # the policy itself: nothing to train
    ("surprise term alone", "_surprise", "surprise"),
]


def chosen_variants(rows):
    """The VARIANTS named in --rows (by out_dir suffix, "main" for ReasonFlux-PRM), in table order."""
    keys = {(v[1].lstrip("_") or "main"): v for v in VARIANTS}
    wanted = [r.strip() for r in rows.split(",") if r.strip()] or list(keys)
    unknown = [r for r in wanted if r not in keys]
    if unknown:
        raise BadInput(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(keys)}")
    return [v for k, v in keys.items() if k in wanted]


def format_table(rows, title="held-out trajectories"):
    """The synthetic ProcessBench table, one row per scorer (as printed and in out/results.md)."""
    lines = [f"\nsynthetic ProcessBench, {title} (hidden meta used for evaluation only)",
             f"{'scorer':<27}{'step AUROC':>11}{'comp. lines':>12}{'first-err F1':>13}{'traj AUROC':>11}"]
    for name, r in rows.items():
        lines.append(f"{name:<27}{r['step_auroc']:>11.3f}{r['computation_auroc']:>12.3f}"
                     f"{r['first_error_f1']:>13.3f}{r['trajectory_auroc']:>11.3f}")
    return "\n".join(lines)


def format_per_flaw(rows):
    """Mean total score per flaw type, one row per scorer; good types first."""
    flaws = [f for f in task.FLAWS if any(f in r["per_flaw"] for r in rows.values())]
    order = [f for f in flaws if f in task.GOOD_FLAWS] + [f for f in flaws if f not in task.GOOD_FLAWS]
    lines = ["\nmean total score per flaw type (good: clean, self-corr; every other type is flawed)",
             f"{'scorer':<27}" + "".join(f"{task.SHORT_FLAW.get(f, f):>10}" for f in order) + "  good > flawed"]
    for name, r in rows.items():
        pf = r["per_flaw"]
        ok = min(pf[f] for f in order if f in task.GOOD_FLAWS) > max(pf[f] for f in order if f not in task.GOOD_FLAWS)
        lines.append(f"{name:<27}" + "".join(f"{pf.get(f, float('nan')):>10.3f}" for f in order) +
                     f"  {'yes' if ok else 'NO'}")
    return "\n".join(lines)


EVAL_SETS = (("records' voice", "eval_data"), ("held-out voice", "eval_heldout"), ("one operation longer", "eval_longer"))


def read_eval_sets(cfg):
    """{name: records} of the ProcessBench sets named by the options, the records' own voice first."""
    need = ("question", "answer", "thinking", "response", "meta")
    return {name: read_jsonl(getattr(cfg, key), need)[:cfg.eval_records]
            for name, key in EVAL_SETS if key == "eval_data" or getattr(cfg, key)}


def print_tables(cfg, rows, all_scores, eval_sets, times):
    """The ProcessBench table of each set, the per-flaw table and the score pictures; processbench.json."""
    for set_name, set_rows in rows.items():
        print(format_table(set_rows, f"{set_name}, {len(eval_sets[set_name])} trajectories"))
    first = next(iter(rows))
    print(format_per_flaw(rows[first]))
    main_name = next(iter(all_scores[first]))
    good, bad = trajectory_totals(all_scores[first][main_name], eval_sets[first])
    print(f"\ntrajectory scores, {main_name.strip()}:\n{text_histogram(good, bad)}")
    # the paper's motivating picture: right and wrong thinking steps in words the PRMs never read
    shifted = "held-out voice" if "held-out voice" in rows else first
    pictured = {k: v for k, v in all_scores[shifted].items() if k.strip() in ("ReasonFlux-PRM", "response-only PRM (MC)")}
    print_step_histograms(pictured, eval_sets[shifted], shifted)
    figures = {"score_histograms.png": (all_scores[first], eval_sets[first], trajectory_totals),
               "step_histograms_heldout.png": (pictured, eval_sets[shifted], step_scores_by_truth)}
    for file, (named, records, score_of) in figures.items():
        if named and save_histograms(named, records, os.path.join(cfg.out_dir, file), score_of):
            print(f"figure: {cfg.out_dir}/{file}")
    write_json_atomic(os.path.join(cfg.out_dir, "processbench.json"),
                      {"rows": rows[first], "shifted": {k: v for k, v in rows.items() if k != first},
                       "seconds": times, "config": asdict(cfg), "n_eval": len(eval_sets[first]),
                       "n_shifted": {k: len(v) for k, v in eval_sets.items() if k != first}})


def variant_config(cfg, suffix, over):
    """The config of a trained row of the table (its options `over` cfg's, in out_dir + suffix);
    None for an untrained row (`over` names how the policy is read)."""
    if isinstance(over, str):
        return None
    return PRMConfig(**{**asdict(cfg), **over, "out_dir": cfg.out_dir.rstrip("/") + suffix})


def main(argv=None):
    cfg = parse_config(PRMConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST, CHOICES)
    if cfg.processbench:   # a trained PRM scores files: no reward design, no training
        require(not cfg.eval and not cfg.rows, "--processbench scores files with a trained PRM (--prm) and "
                                               "trains nothing: drop --eval and --rows")
        return score_processbench(cfg)
    require(cfg.threshold < 0, "--threshold is read by --processbench only")
    if cfg.rows and not cfg.eval:
        raise BadInput("--rows picks rows of the --eval table: add --eval (without it only ReasonFlux-PRM trains)")
    variants = chosen_variants(cfg.rows) if cfg.eval else VARIANTS[:1]  # a misspelt row fails here, before any work
    check_writable(cfg.cache_dir, *(cfg.out_dir.rstrip("/") + suffix for _, suffix, _ in variants))
    device = pick_device(cfg.device)
    rank, world, device = init_distributed(device)
    if rank == 0:
        print_config(cfg)
    torch.manual_seed(cfg.seed)
    tok = Tok(load_tokenizer(cfg.tokenizer))
    records = read_jsonl(cfg.data, ("question", "answer", "thinking", "response"))
    records, questions = records[:cfg.n_train], records[cfg.n_train:]   # the rest: questions for policy samples
    # the checkpoints are read now, not after minutes of reward design; prompts must fit both contexts
    block_size = min(load_checkpoint(p, kind="policy", enc=tok.enc)["model_args"]["block_size"]
                     for p in (cfg.policy, cfg.init or cfg.policy))
    eval_sets = {name: records_that_fit(rs, tok, block_size, what=f"{name} records")   # the PRMs read them whole
                 for name, rs in (read_eval_sets(cfg) if cfg.eval else {}).items()}
    eval_records = next(iter(eval_sets.values()), [])
    records = skip_long_prompts(records, [len(encode_prompt(tok, r["question"])) for r in records], block_size)
    questions = skip_long_prompts(questions[:cfg.policy_samples],
                                  [len(encode_prompt(tok, r["question"])) for r in questions[:cfg.policy_samples]],
                                  block_size, "questions for policy samples")
    require(records, f"{cfg.data}: no record fits the policy's context")
    if cfg.fact_rows:
        training.read_lines(cfg.facts)   # a bad facts file fails now, not after minutes of reward design
    for _, suffix, over in variants:    # and so does a resume that would train something else
        vcfg = variant_config(cfg, suffix, over)
        ckpt_path = vcfg and os.path.join(vcfg.out_dir, "ckpt.pt")
        if vcfg and vcfg.resume and os.path.exists(ckpt_path):
            check_resume(load_checkpoint(ckpt_path, kind="prm", enc=tok.enc), ckpt_path, vcfg, RESUME_FREE)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        lock_out_dir(cfg.out_dir)
    times, all_scores, rows = {}, {}, {}   # rows[set][scorer], all_scores[set][scorer]
    # the backbone's arithmetic, measured on held-out records (the expert judges; meta is not read)
    probe = [{k: v for k, v in r.items() if k != "meta"} for r in eval_records[:500]]
    for name, suffix, over in variants:
        t0 = time.time()
        if rank == 0:
            print(f"=== {name.strip()} ===")
        if isinstance(over, str):   # an untrained row: the policy itself, read as `over` says
            prm = untrained_scorer(cfg.policy, cfg.tokenizer, over, device)
        else:
            vcfg = variant_config(cfg, suffix, over)
            os.makedirs(vcfg.out_dir, exist_ok=True)
            if rank == 0:
                lock_out_dir(vcfg.out_dir)
            prm = train_prm(vcfg, records, questions, tok, device, rank, world, probe if suffix == "" else ())
        times[name.strip()] = time.time() - t0
        if rank == 0 and cfg.eval:
            by_set, scores = evaluate_on_sets(prm, eval_sets)
            for set_name in eval_sets:
                rows.setdefault(set_name, {})[name] = by_set[set_name]
                all_scores.setdefault(set_name, {})[name] = scores[set_name]
                print(f"{name.strip()}, {set_name}: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in by_set[set_name].items() if k != "per_flaw"))
    if rank == 0:
        print("time per row: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if rank == 0 and cfg.eval:
        print_tables(cfg, rows, all_scores, eval_sets, times)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
