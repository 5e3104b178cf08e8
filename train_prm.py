"""
Reward design and training of ReasonFlux-PRM, and its evaluation on a synthetic ProcessBench.

    python train_prm.py                        # reward design (cached) + PRM training -> out/prm
    python train_prm.py --eval                 # + baselines and ablations (out/prm_*), the ProcessBench table
    python train_prm.py --eval --rows=main,quality   # only those rows of the table
    python train_prm.py --labels=mc --out_dir=out/prm_response   # the response-only baseline alone
    python train_prm.py --processbench=data/arith/processbench_eval.json,data/arith/processbench_eval_heldout.json
                                               # ProcessBench's metric on files in its format (trains nothing)
    torchrun --nproc_per_node=2 train_prm.py   # DDP (gloo on CPU)

Reward design (rewards.design_rewards), for each training record (question x, thinking
s_1..s_T, response a): the step rewards r_align, r_qual, r_coh and their fusion; the expert's
judgement of each response step; the template-guided r_final and the policy's own success
p_0. The PRM (the policy's backbone, a scalar head and the surprise readout) regresses the
step label where each step ends and the trajectory label at the end of the record.

Every row of the table is one set of options away (VARIANTS):
  ReasonFlux-PRM           our defaults: --fusion=gated --final=relative --readout=surprise --response=true
                           --total=gate --on_policy=true
  total: sum, not gate     --total=sum        the same PRM's scores; the worst response step added, not gating
  paper's total            --total=paper      the same PRM's scores; the response not read (rfprm.prm_total)
  paper's fusion           --fusion=paper     the softmax fusion as written (rewards.fuse_rewards)
  paper's trajectory rwd   --final=template   r_final itself, not relative to p_0
  paper's plain head       --readout=plain    R = σ(w·h + b)
  thinking steps only      --response=false --total=paper   no response-step labels, nor response in the total
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

import os
import random
import re
import time
from dataclasses import dataclass, asdict

import torch

import files
import task
import training
from files import (save_checkpoint, read_jsonl, check_writable, skip_long_prompts, record_names, BadInput,
                   lock_out_dir)
from tokenizer import DEFAULT_VOCAB, encode_prompt
from model import GPTConfig
from options import parse_config, check_options, require, run_main
from checkpoints import load_checkpoint, model_from_checkpoint, make_checkpoint, check_resume
from training import start_run, wrap_for_training, end_run
from rewards import targets_for
from rfprm import (PRM, encode_for_prm, batch_of, prm_loss, untrained_scorer, prm_tokens, step_result_tokens,
                   load_prm_weights, records_that_fit, load_prm, TOTALS)
from processbench import score_processbench, read_eval_sets, evaluate_on_sets, print_tables


@dataclass
class PRMConfig:
    out_dir: str = "out/prm"
    cache_dir: str = "out/rewards"   # reward designs, keyed by their inputs
    data: str = "data/arith/train.jsonl"
    eval_data: str = "data/arith/prm_eval.jsonl"
    # the shifted sets: the same table on records in words, or of a length, training never saw
    eval_dev: str = "data/arith/prm_eval_dev.jsonl"           # a voice to diagnose and choose settings on; empty: skip
    eval_dev_longer: str = "data/arith/prm_eval_dev_longer.jsonl"   # ... and in it, one operation longer; empty: skip
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
    fusion: str = "gated"          # gated (ours, rewards.gated_fusion) | paper (rewards.fuse_rewards)
    final: str = "relative"        # r_final: relative (ours, rewards.relative_final) | template (the paper)
    response: bool = True          # train response steps on the expert's judgement (ours)
    total: str = "gate"            # gate (ours) | sum (ours, before) | paper: rfprm.prm_total; read when scoring
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
    made_up: str = "phrases"       # what a word becomes there: phrases (ours: one or two made-up words, or marks) | words (one)
    misread: float = 0.0           # share of training records copied with one operand misread (ours; 0: none)
    checked: str = "result"        # what ℓ reads: result (ours) | computation (operands, connective and result)
                                   # | numbers (ours: the result, and the operands' digits as a second term)
    lm_coef: float = 0.5           # surprise readout: LM loss on the tokens ℓ reads of expert-approved steps (keeps ℓ sharp)
    facts: str = "data/arith/facts.txt"
    fact_rows: int = 8             # + rows of arithmetic facts per batch, their results in the LM loss (ours; 0: none)
    lam_step: float = 1.0
    lam_final: float = 1.0
    alpha: float = 1.0             # α of the total (rfprm.prm_total): α · R_φ(trajectory)
    max_steps: int = 800           # 400 left it undertrained: Best-of-N's pick fell as N grew
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
# the smallest value of each size (options.check_options), and the values of a choice
AT_LEAST = dict(n_train=1, policy_samples=0, fact_rows=0, n_negatives=1, n_rollouts=1, mc_rollouts=1, mc_records=1, max_steps=1, batch_size=1,
                warmup_steps=0, log_every=1, ckpt_every=1, eval_records=1)
CHOICES = dict(labels=("fused", "align", "quality", "coherence", "mc", "outcome"), fusion=("gated", "paper"),
               final=("relative", "template"), readout=("surprise", "plain"), checked=("result", "computation", "numbers"), encoder=("tfidf", "policy"),
               coherence=("logprob", "prob"), made_up=("phrases", "words"), total=TOTALS)
# what a resume may change (checkpoints.check_resume): where and how often it writes, when it stops,
# what it evaluates; every other option changes the labels or the training
RESUME_FREE = {"out_dir", "cache_dir", "resume", "max_steps", "log_every", "ckpt_every", "device", "compile",
               "eval", "eval_records", "rows", "eval_data", "eval_dev", "eval_dev_longer", "eval_heldout", "eval_longer", "processbench", "prm",
               "threshold", "preset", "smoke", "total"}
# options read when scoring, not in training: a row of the table that changes only these reads the
# ReasonFlux-PRM row's checkpoint another way instead of training one
SCORING_ONLY = {"total"}


# ----------------------------------------------------------------------------
# PRM training

WORD_RE = re.compile(r"[A-Za-z]+|=")


def made_up_phrase(rng, phrases=True):
    """A made-up stand-in for one of the teacher's words: one made-up word ('qzvu'); with phrases,
    sometimes two shorter ones ('qz ab') or a run of marks ('~>'), as other authors write '='
    ('comes to', '->'). No digit and no operator: the arithmetic stays the record's own; about
    as many tokens as one word, so that records still fit the context."""
    def made_up(letters, shortest, longest):
        return "".join(rng.choice(letters) for _ in range(rng.randint(shortest, longest)))
    if not phrases or rng.random() < 0.6:   # one word, 60%
        return made_up("abcdefghijklmnopqrstuvwxyz", 2, 8)
    if rng.random() < 0.4:                  # marks, 16%
        return made_up(":~>|<=", 1, 2)
    return made_up("abcdefghijklmnopqrstuvwxyz", 2, 4) + " " + made_up("abcdefghijklmnopqrstuvwxyz", 2, 4)   # two words, 24%


def scrambled(record, rng, phrases=True):
    """The record with every word of its thinking and response ('then', 'gives', '=') replaced by
    a made-up one (made_up_phrase), the same throughout the record, as if another author wrote it (ours).

    Why: a PRM that reads only the teacher's words learns them, and then scores a step in words
    it never read by their strangeness. Trained on records whose words mean nothing, its head
    learns to read what stays when the words change, the operations and their results, and its
    LM head learns to predict a result after any word for '='. The numbers, the operators and
    'Answer:' (the verifier's contract in every voice) are kept; the labels are the record's own.
    Why a word may become several, or marks (phrases=True, --made_up=phrases): trained on one
    made-up word per word, the LM head learns that one word stands between an operation and its
    result, and is surprised by a right result after 'comes to' or '->' (--made_up=words).
    """
    made_up = {}

    def word(m):
        w = m[0]
        if w == "Answer":
            return w
        if w not in made_up:
            made_up[w] = made_up_phrase(rng, phrases)
        return made_up[w]
    rewrite = lambda lines: [WORD_RE.sub(word, str(line)) for line in lines]
    return {**record, "thinking": rewrite(record["thinking"]), "response": rewrite(record["response"])}


def misread_line(line, rng, seen=()):
    """The line with one operand of its last computation replaced by another number and the
    result recomputed ('7 + 3 = 10' -> '7 + 5 = 12'); None when the result would be negative.
    The number is one the record has already written (`seen`: the question's and the earlier
    lines'), taken from the wrong place as the policy does, else a digit."""
    m = list(task.STEP_RE.finditer(line))[-1]
    new = {1: int(m[1]), 3: int(m[3])}
    side = rng.choice((1, 3))
    others = sorted({v for v in seen if v != new[side]}) or [v for v in range(1, 10) if v != new[side]]
    new[side] = rng.choice(others)
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
        seen = [int(x) for x in re.findall(r"\d+", " ".join([record["question"]] + lines[:k]))]
        line = misread_line(lines[k], rng, seen)
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
    the record's last token. The LM targets are the tokens `key` names (PRM.read_key: the result, or
    the whole computation for checked=computation and numbers) of the approved steps, set one
    position early (token p is predicted at p − 1).
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
    result (rfprm.result_span): the LM targets of fact rows."""
    ids, is_result = [], []
    nl = tok.enc.encode_ordinary("\n")
    for line in files.read_lines(path):   # once, before training
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
    records = [scrambled(r, rng, cfg.made_up == "phrases") if rng.random() < cfg.scramble else r for r in records]
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

    model = wrap_for_training(prm, cfg.compile, world)
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
    prm.tok, prm.alpha, prm.mode, prm.total = tok, cfg.alpha, mode, cfg.total
    return prm.eval()


# ----------------------------------------------------------------------------
# the rows of the --eval table (processbench.py evaluates them)

PAPER = {"fusion": "paper", "final": "template", "readout": "plain", "response": False, "total": "paper",
         "on_policy": False}
VARIANTS = [  # name, suffix of its out_dir, overrides: every row of the table is a set of options
    ("ReasonFlux-PRM", "", {}),
    ("  paper's fusion", "_paper_fusion", {"fusion": "paper"}),
    ("  paper's trajectory rwd", "_paper_final", {"final": "template"}),
    ("  paper's plain head", "_plain", {"readout": "plain"}),
    ("  ℓ on the computation", "_computation", {"checked": "computation"}),
    ("  ℓ on result and operands", "_numbers", {"checked": "numbers"}),
    ("  + misread operands", "_misread", {"misread": 0.25}),
    ("  both: operands, misread", "_numbers_misread", {"checked": "numbers", "misread": 0.25}),
    ("  no made-up words", "_unscrambled", {"scramble": 0.0}),
    ("  one made-up word a word", "_words", {"made_up": "words"}),
    ("  total: sum, not gate", "_sum", {"total": "sum"}),              # the same PRM, read another way
    ("  paper's total", "_paper_total", {"total": "paper"}),           # the same PRM, response not read
    ("  thinking steps only", "_thinking", {"response": False, "total": "paper"}),
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


def scoring_only(over):
    """Whether a row only reads the ReasonFlux-PRM row's checkpoint another way (SCORING_ONLY options)."""
    return isinstance(over, dict) and bool(over) and set(over) <= SCORING_ONLY


def variant_config(cfg, suffix, over):
    """The config of a trained row of the table (its options `over` cfg's, in out_dir + suffix);
    None for an untrained row (`over` names how the policy is read)."""
    if isinstance(over, str):
        return None
    return PRMConfig(**{**asdict(cfg), **over, "out_dir": cfg.out_dir.rstrip("/") + suffix})


def chosen_rows(cfg):
    """The rows this run trains and scores (all of --rows with --eval, else ReasonFlux-PRM alone),
    its options checked and its output folders writable, before any work."""
    require(cfg.threshold < 0, "--threshold is read by --processbench only")
    require(cfg.response or cfg.total == "paper", "--response=false trains no response step: "
                                                   "its total can only be --total=paper")
    if cfg.rows and not cfg.eval:
        raise BadInput("--rows picks rows of the --eval table: add --eval (without it only ReasonFlux-PRM trains)")
    variants = chosen_variants(cfg.rows) if cfg.eval else VARIANTS[:1]  # a misspelt row fails here, before any work
    reads_main = [name.strip() for name, _, over in variants if scoring_only(over)]
    if reads_main and variants[0] is not VARIANTS[0] and not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise BadInput(f"--rows: {', '.join(reads_main)} read ReasonFlux-PRM's checkpoint, and there is none in "
                       f"{cfg.out_dir}: add the row main")
    check_writable(cfg.cache_dir, *(cfg.out_dir.rstrip("/") + suffix for _, suffix, over in variants
                                    if not scoring_only(over)))
    return variants


def read_inputs(cfg, tok):
    """(training records, questions for policy samples, {name: evaluation records}), each record's
    prompt within both checkpoints' contexts; a bad facts file fails now, not after minutes of
    reward design."""
    records = read_jsonl(cfg.data, ("question", "answer", "thinking", "response"))
    records, questions = records[:cfg.n_train], records[cfg.n_train:]   # the rest: questions for policy samples
    # the checkpoints are read now, not after minutes of reward design; prompts must fit both contexts
    block_size = min(load_checkpoint(p, kind="policy", enc=tok.enc)["model_args"]["block_size"]
                     for p in (cfg.policy, cfg.init or cfg.policy))
    # every row reads the same records whole, the response-only PRM too (its encoding is longer)
    eval_sets = {name: records_that_fit(rs, tok, block_size, ("full", "response_only"), f"{name} records")
                 for name, rs in (read_eval_sets(cfg) if cfg.eval else {}).items()}
    records = skip_long_prompts(records, [len(encode_prompt(tok, r["question"])) for r in records], block_size)
    questions = skip_long_prompts(questions[:cfg.policy_samples],
                                  [len(encode_prompt(tok, r["question"])) for r in questions[:cfg.policy_samples]],
                                  block_size, "questions for policy samples")
    require(records, f"{cfg.data}: no record fits the policy's context")
    if cfg.fact_rows:
        files.read_lines(cfg.facts)
    return records, questions, eval_sets


def check_resumes(cfg, variants, tok):
    """A resume that would train something else fails now, for every row, before any work."""
    for _, suffix, over in variants:
        vcfg = variant_config(cfg, suffix, over)
        ckpt_path = vcfg and os.path.join(vcfg.out_dir, "ckpt.pt")
        if vcfg and vcfg.resume and os.path.exists(ckpt_path):
            check_resume(load_checkpoint(ckpt_path, kind="prm", enc=tok.enc), ckpt_path, vcfg, RESUME_FREE)


def row_scorer(cfg, suffix, over, records, questions, tok, device, rank, world, probe):
    """The scorer of one row: the policy itself, read as `over` says (an untrained row), or a PRM
    trained with the row's options in its own out_dir."""
    if isinstance(over, str):
        return untrained_scorer(cfg.policy, cfg.tokenizer, over, device)
    if scoring_only(over):   # trained above in this run, or before it (chosen_rows checked)
        prm = load_prm(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        prm.total = over["total"]
        return prm
    vcfg = variant_config(cfg, suffix, over)
    os.makedirs(vcfg.out_dir, exist_ok=True)
    if rank == 0:
        lock_out_dir(vcfg.out_dir)
    return train_prm(vcfg, records, questions, tok, device, rank, world, probe if suffix == "" else ())


def add_rows(rows, all_scores, name, prm, eval_sets):
    """Score every evaluation set with one row's scorer: its rows[set][name] and all_scores[set][name]."""
    by_set, scores = evaluate_on_sets(prm, eval_sets)
    for set_name in eval_sets:
        rows.setdefault(set_name, {})[name] = by_set[set_name]
        all_scores.setdefault(set_name, {})[name] = scores[set_name]
        print(f"{name.strip()}, {set_name}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in by_set[set_name].items() if k != "per_flaw"))


def main(argv=None):
    cfg = parse_config(PRMConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST, CHOICES)
    if cfg.processbench:   # a trained PRM scores files: no reward design, no training
        require(not cfg.eval and not cfg.rows, "--processbench scores files with a trained PRM (--prm) and "
                                               "trains nothing: drop --eval and --rows")
        return score_processbench(cfg)
    variants = chosen_rows(cfg)
    rank, world, device, tok = start_run(cfg)
    records, questions, eval_sets = read_inputs(cfg, tok)
    check_resumes(cfg, variants, tok)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0:
        lock_out_dir(cfg.out_dir)
    times, all_scores, rows = {}, {}, {}   # rows[set][scorer], all_scores[set][scorer]
    # the backbone's arithmetic, measured on held-out records (the expert judges; meta is not read)
    probe = [{k: v for k, v in r.items() if k != "meta"} for r in next(iter(eval_sets.values()), [])[:500]]
    for name, suffix, over in variants:
        t0 = time.time()
        if rank == 0:
            print(f"=== {name.strip()} ===")
        prm = row_scorer(cfg, suffix, over, records, questions, tok, device, rank, world, probe)
        times[name.strip()] = time.time() - t0
        if rank == 0 and cfg.eval:
            add_rows(rows, all_scores, name, prm, eval_sets)
    if rank == 0:
        print("time per row: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if rank == 0 and cfg.eval:
        print_tables(cfg, rows, all_scores, eval_sets, times)
    end_run()


if __name__ == "__main__":
    run_main(main)
