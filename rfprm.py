"""
rfprm: the ReasonFlux-PRM (Zou et al., 2025, arXiv 2506.18896) itself: the PRM with its readout, loss
and total, the ways of aggregating its step scores, and a command that shows what a trained PRM
thinks of each step. Its training targets, the reward design (r_align, r_qual, r_coh, r_fused,
r_step, r_final), are in rewards.py. For a question x, thinking steps s_1..s_T and a final
response a_1..a_J:

    R_φ(t)     = σ(w·h_t + b), h_t the backbone's state where step t ends  PRM (readout="plain")
    L          = λ_step mean_t (R_φ(t) − r_step(t))² + λ_final (R_φ(x, s, a) − r_final)²   prm_loss
                 (the paper's target is r_fused: --fusion=paper)
    total      = mean_t R_φ(t) + α · R_φ(x, s, a)                            prm_total (total="paper")

Four defaults depart from the paper so that its idea works at this scale; each is named in the
docstring of its function, and its paper form is an option of train_prm.py and a row of its table:
 1. readout: R_φ(t) = σ(w·h_t + a·ℓ_t + b), ℓ_t the surprise of the PRM's own LM head at step
    t's result (PRM, step_surprise);
 2. fusion: the expert's verdict decides the band, the paper's fusion ranks within it (rewards.gated_fusion);
 3. trajectory reward: r_final relative to the policy's own success on the question (rewards.relative_final);
 4. response steps: trained on the expert's judgement too; the worst one gates the total (prm_total).

    python rfprm.py score data/arith/prm_eval.jsonl --n=5    # a trained PRM's scores, step by step
    python rfprm.py design data/arith/train.jsonl --n=2      # the reward design of a record, step by step
"""

import functools
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import task
from files import read_jsonl, record_names, BadInput
from tokenizer import Tokenizer, load_tokenizer, vocab_fingerprint, encode_prompt
from model import GPT, GPTConfig
from options import argument_parser, require, run_main
from checkpoints import load_checkpoint, model_from_checkpoint, WRONG_SHAPE, wrong_shape
from training import pick_device
from rewards import design

# ----------------------------------------------------------------------------
# the PRM: the GPT backbone, a scalar head read where each step ends, and the surprise term

# Where a line states its result, read without knowing any voice's words: the number after the
# last operation 'a op b' (whatever stands for '=': '=', 'gives', '->'), else the line's last number
# ('so the answer is 15', 'Answer: 15'). The expert knows every voice; the PRM must not need to.
OPERATION_RE = re.compile(rf"{task.NUM}\s*[-+*]\s*{task.NUM}\D{{0,24}}?{task.NUM}")
NUMBER_RE = re.compile(task.NUM)


def result_span(line):
    """((lo, hi) of the result, (lo, hi) of the checked span) in characters, or None for a line
    that states no number. The checked span is the last operation, operands to result, or the
    result alone where there is none.

    >>> line = "wait, 4 * 3 is 12, not 13"
    >>> [line[lo:hi] for lo, hi in result_span(line)]
    ['12', '4 * 3 is 12']
    """
    operation = number = None
    for operation in OPERATION_RE.finditer(line):
        pass
    if operation:
        return operation.span(3), operation.span()
    for number in NUMBER_RE.finditer(line):
        pass
    return (number.span(1), number.span(1)) if number else None


@functools.lru_cache(maxsize=8)
def digit_ids(tok):
    """(10, 2) token ids of each digit 0-9 written alone and after a space ('7', ' 7'); the same
    id twice where the vocabulary has no spaced form."""
    one = lambda text: tok.enc.encode_ordinary(text)
    return torch.tensor([[one(str(d))[0], (one(f" {d}") if len(one(f" {d}")) == 1 else one(str(d)))[0]]
                         for d in range(10)])


@functools.lru_cache(maxsize=8)
def digit_set(tok):
    return set(digit_ids(tok).flatten().tolist())


def step_result_tokens(tok, line):
    """A step's token ids, the indices of those that state its result, and of those its
    surprise term checks with checked="computation" (result_span). A filler has neither.
    Digits are one token each, so a result is one to three tokens.
    """
    ids = tok.enc.encode_ordinary(line)
    spans = result_span(line)
    if spans is None:
        return ids, [], []
    in_bytes = lambda lo, hi: (len(line[:lo].encode()), len(line[:hi].encode()))
    spans = [in_bytes(*s) for s in spans]
    out, pos = ([], []), 0
    for k, t in enumerate(ids):
        for span, chosen in zip(spans, out):
            if pos < span[1] and pos + tok.n_bytes[t] > span[0]:
                chosen.append(k)
        pos += tok.n_bytes[t]
    return ids, out[0], out[1]


def prm_tokens(tok, question, thinking, response, block_size=None):
    """Token ids of a record, where each of its steps ends, and which tokens state each step's result.

    Layout as the policy reads it (prompt, thinking, <|/think|>, response, <|endoftext|>). A
    step's score is read at the token that ends it: the newline after a line (or <|/think|>
    after the last thinking line, <|endoftext|> after the last response line); the
    trajectory's at the final <|endoftext|>. So the trajectory shares its output with the answer
    line, on purpose: r_final, from two rollouts, is a noisy label, and an output regressing both
    leans on whether the answer is right (a token of its own for the trajectory ranked records
    in their own voice worse). step_of[p] is the end position of the step that
    token p belongs to, result_of[p] the same for the tokens of the step's result only,
    checked_of[p] for the tokens the surprise term checks (step_result_tokens), operands_of[p]
    for the digits of that span that are not the result's; -1 elsewhere.
    Past block_size the ids are cut and positions clamped.
    Returns {"ids", "think", "response", "end", "step_of", "result_of", "checked_of", "operands_of", "truncated"}.
    """
    nl = tok.enc.encode_ordinary("\n")
    ids = encode_prompt(tok, question)
    of = {k: [-1] * len(ids) for k in ("step_of", "result_of", "checked_of", "operands_of")}
    ends = {"think": [], "response": []}
    for part, lines, closer in (("think", thinking, tok.end_think), ("response", response, tok.eot)):
        for i, line in enumerate(lines):
            line_ids, result, checked = step_result_tokens(tok, str(line))
            end = len(ids) + len(line_ids)
            ids += line_ids
            of["step_of"] += [end] * len(line_ids)
            of["result_of"] += [end if k in result else -1 for k in range(len(line_ids))]
            of["checked_of"] += [end if k in checked else -1 for k in range(len(line_ids))]
            of["operands_of"] += [end if k in checked and k not in result and t in digit_set(tok) else -1
                                  for k, t in enumerate(line_ids)]
            ends[part].append(end)
            sep = nl if i < len(lines) - 1 else [closer]
            ids += sep
            for v in of.values():
                v += [-1] * len(sep)
        if not lines:
            ids.append(closer)
            for v in of.values():
                v.append(-1)
    truncated = block_size is not None and len(ids) > block_size
    if truncated:
        clamp = lambda ps: [min(p, block_size - 1) for p in ps]
        ids, of = ids[:block_size], {k: clamp(v[:block_size]) for k, v in of.items()}
        ends = {k: clamp(v) for k, v in ends.items()}
    return {"ids": ids, "think": ends["think"], "response": ends["response"], "end": len(ids) - 1,
            **of, "truncated": truncated}


def encode_for_prm(tok, record, mode="full", block_size=None):
    """prm_tokens for a record as a PRM of `mode` reads it.

    mode "full" (ReasonFlux-PRM): thinking and response. "response_only" (the baseline,
    trained on final responses only): the thinking slot is left empty; the record's
    thinking lines, when scored, are read in the response slot, one step per line,
    which is how a response-trained PRM is applied to a thinking trajectory.
    """
    thinking, response = list(record.get("thinking") or []), list(record.get("response") or [])
    if mode == "full":
        return prm_tokens(tok, record["question"], thinking, response, block_size)
    if mode == "response_only":
        e = prm_tokens(tok, record["question"], [], thinking + response, block_size)
        return {**e, "think": e["response"][:len(thinking)], "response": e["response"][len(thinking):]}
    raise ValueError(f"unknown PRM mode {mode!r}")


def batch_of(encoded, pad_id, key="checked_of"):
    """Right-padded ids and encoded[key] (B, T) of prm_tokens outputs: the tokens the PRM's
    surprise term reads (checked_of, or step_of for the confidence baseline); a tuple of keys
    gives them side by side, (B, T, K). Causal attention never reads the padding."""
    keys = (key,) if isinstance(key, str) else key
    T = max(len(e["ids"]) for e in encoded)
    idx = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    token_of = torch.full((len(encoded), T, len(keys)), -1, dtype=torch.long)
    for j, e in enumerate(encoded):  # building a batch once, not a hot loop
        idx[j, :len(e["ids"])] = torch.tensor(e["ids"])
        token_of[j, :len(e["ids"])] = torch.tensor([e[k] for k in keys]).T
    return idx, token_of.squeeze(-1) if isinstance(key, str) else token_of


def step_surprise(gpt, h, idx, token_of, digits=None):
    """ℓ (B, T): at each step's end, the lowest log-probability the language-model head gave to
    one of the step's tokens, log p(token_p | tokens < p); 0 elsewhere and for a step without one.
    With digits (10, 2), the token ids of each digit without and with a leading space, every
    token read is a digit and its probability is taken among the digits alone,
    log p(digit | tokens < p, a digit comes): whether a number comes here, and with a space,
    depends on the words around it; which number comes, on the arithmetic.

    h (B, T, C) the backbone's hidden states of idx (B, T); token_of (B, T) from prm_tokens:
    result_of or checked_of (the PRM's ℓ_t: the step's result, or its whole computation; PRM.read_key)
    or step_of (every token of the step: the confidence baseline). Token p is predicted at position p − 1, so only those
    positions go through the LM head.
    """
    B, T = idx.shape
    ell = torch.zeros(B * T, device=idx.device)
    is_read = token_of[:, 1:] >= 0                                            # (B, T-1): tokens 1..T-1
    if not is_read.any():
        return ell.view(B, T)
    logits = gpt.lm_head(h[:, :-1][is_read]).float()                          # (n, V)
    target = idx[:, 1:][is_read][:, None]                                     # (n, 1)
    if digits is None:
        logp = F.log_softmax(logits, -1).gather(1, target).squeeze(1)        # (n,)
    else:
        per_digit = torch.logsumexp(logits[:, digits], -1)                   # (n, 10): either spelling
        which = (digits[None, :, :] == target[:, :, None]).any(-1).float().argmax(-1, keepdim=True)
        logp = F.log_softmax(per_digit, -1).gather(1, which).squeeze(1)
    rows = torch.arange(B, device=idx.device)[:, None].expand(B, T - 1)[is_read]
    ends = token_of[:, 1:][is_read]                                           # (n,) the end of each one's step
    return ell.scatter_reduce(0, rows * T + ends, logp, "amin").view(B, T)    # min with 0: log-probs are ≤ 0


def score_batch_size(device):
    """Rows per PRM forward when scoring. On a CPU, 16 rows of <= 256 tokens keep a layer's
    activations in cache (64 or 256 rows stream them through memory); on a GPU, large batches
    mean fewer kernel launches."""
    return 16 if torch.device(device).type == "cpu" else 256


class PRM(nn.Module):
    """R_φ: the GPT backbone (initialised from the policy), a scalar reward head, and its readout.

    forward(idx, token_of, lm_targets=None) -> ((B, T) scores in (0, 1), one per position, the
    callers read step ends; the language-model loss on lm_targets (B, T), -1 = none, or None).
    token_of: prm_tokens' checked_of (step_of for the confidence readout), batched by batch_of.

    readout="surprise" (ours, the default):   R_φ(t) = σ(w·h_t + a·ℓ_t + b)
        ℓ_t (step_surprise): how surprised the backbone's own language-model head is by step t's
        result. Why: at the step's last token a small backbone would have to recompute the
        arithmetic; its next-token prediction already did, where the result begins. Why the
        result alone (checked="result", ours): what comes before it, the lead and the words for
        '=', differs from voice to voice, and in words the head never read even right operands
        surprise it; the result, given the operands, is the arithmetic itself in any voice.
        checked="computation" reads the operands and connective as well (an operand that is not
        in the question surprises a head that knows what comes next), a row of the table.
        checked="numbers" (ours) adds a second term instead, with its own weight:
            R_φ(t) = σ(w·h_t + a·ℓ_t + a_op·ℓ^op_t + b)
        ℓ^op_t: the lowest log-probability of the step's operand digits, each among the digits
        alone (step_surprise with digits): it asks which number comes, not whether the words
        around it lead to one, so it checks an operand against the question's state (a number
        misread, a step built on the wrong value), the policy's most frequent error. Its LM loss
        reads the approved steps' operands as well as their results. Why it is not the default:
        which operand comes next depends on what kind of line this is (a check repeats the last
        step, an aside picks any numbers) and on how many steps the question has, both read from
        words and lengths a shifted set changes; which result comes depends on the operands alone.
        What it is for: the policy's own errors are mostly a wrong operand with the arithmetic
        right, which the result alone cannot see (train_prm.py's "both: operands, misread" row
        also trains it on misread copies; tts.py --prm reads it). The LM
        head trains end to end with the reward head, and train_prm.py adds a language-model loss
        on the same tokens of the steps the expert approved, which keeps the head sharp (a frozen
        copy of the policy, the other way, costs a second model). a starts at 1: a lone scalar
        moves slowly.
    readout="plain" (the paper):   R_φ(t) = σ(w·h_t + b)
    readout="confidence" (a baseline, untrained): R(t) = exp(min over all the step's tokens of
        their log-probability), under the policy itself, with no head.
    """

    def __init__(self, cfg, readout="surprise", checked="result"):
        super().__init__()
        if readout not in ("surprise", "plain", "confidence"):
            raise ValueError(f"readout must be surprise, plain or confidence; got {readout!r}")
        if checked not in ("result", "computation", "numbers"):
            raise ValueError(f"checked must be result, computation or numbers; got {checked!r}")
        self.gpt = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)                   # w, b
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.surprise_weight = nn.Parameter(torch.ones(()))    # a
        if checked == "numbers":
            self.operand_weight = nn.Parameter(torch.ones(()))  # a_op
        self.config, self.readout, self.checked = cfg, readout, checked
        self.tok = None              # set by load_prm, for score()
        self.alpha = 1.0             # α · R_φ(trajectory) in the total (the paper's headline α)
        self.mode = "full"           # "response_only": the baseline reads thinking steps as response steps
        self.total = "gate"          # how prm_total reads the response steps: gate | sum | paper
        self.path = "the PRM"        # its checkpoint, for the messages (set by load_prm)

    def forward(self, idx, token_of=None, lm_targets=None):
        h = self.gpt.hidden(idx)                                               # (B, T, C)
        lm_loss = None
        if lm_targets is not None and (lm_targets >= 0).any():  # only the positions that have a target
            at = lm_targets >= 0
            lm_loss = F.cross_entropy(self.gpt.lm_head(h[at]).float(), lm_targets[at])
        if self.readout == "confidence":
            return step_surprise(self.gpt, h, idx, token_of).exp(), lm_loss
        logit = self.head(h).squeeze(-1).float()                               # (B, T): w·h_t + b
        if self.readout == "surprise" and token_of is not None and token_of.dim() == 3:   # "numbers"
            digits = digit_ids(self.tok).to(idx.device)
            logit = logit + self.surprise_weight * step_surprise(self.gpt, h, idx, token_of[..., 0]) \
                + self.operand_weight * step_surprise(self.gpt, h, idx, token_of[..., 1], digits)
        elif self.readout == "surprise" and token_of is not None:
            logit = logit + self.surprise_weight * step_surprise(self.gpt, h, idx, token_of)
        return torch.sigmoid(logit), lm_loss

    def read_key(self):
        """Which tokens of a step ℓ reads (a key of prm_tokens): all of them for the confidence
        baseline, else the result (checked="result") or the whole computation."""
        if self.readout == "confidence":
            return "step_of"
        return {"result": "result_of", "computation": "checked_of", "numbers": ("result_of", "operands_of")}[self.checked]

    @torch.no_grad()
    def score(self, records, batch_size=None):
        """Score pool-format records: each thinking step, each response step, the trajectory, the total.

        Returns [{"step": [...], "response": [...], "trajectory": t, "total": prm_total}], in the
        order given. Batched by length, no grad. A record longer than the context is refused (a
        step past the cut would have no score of its own): leave such records out first
        (records_that_fit). So is a score that is not a finite number (broken weights).
        """
        self.eval()
        device = next(self.parameters()).device
        batch_size = batch_size or score_batch_size(device)
        encoded = [encode_for_prm(self.tok, r, self.mode, self.config.block_size) for r in records]
        cut = [k for k, e in enumerate(encoded) if e["truncated"]]
        if cut:
            raise BadInput(f"{self.path}: {len(cut)} of {len(records)} records are longer than its context "
                           f"(block_size={self.config.block_size}): {record_names(records, cut)}")
        order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]["ids"]))  # similar lengths, less padding
        out = [None] * len(encoded)
        for i in range(0, len(order), batch_size):
            chunk = [encoded[k] for k in order[i:i + batch_size]]
            idx, token_of = batch_of(chunk, self.tok.eot, self.read_key())
            s = self(idx.to(device), token_of.to(device))[0].cpu().tolist()
            for j, e in enumerate(chunk):
                rec = {"step": [s[j][p] for p in e["think"]], "response": [s[j][p] for p in e["response"]],
                       "trajectory": s[j][e["end"]]}
                out[order[i + j]] = {**rec, "total": prm_total(rec, self.alpha, self.total)}
        bad = [k for k, o in enumerate(out) if not all(map(math.isfinite, o["step"] + o["response"] + [o["total"]]))]
        if bad:
            raise BadInput(f"{self.path}: scores that are not finite numbers, for records {record_names(records, bad)}")
        return out


def records_that_fit(records, tok, block_size, mode="full", what="records"):
    """The records a PRM with a context of block_size tokens reads whole (in `mode`, or in every mode
    of a tuple: records that several PRMs are compared on). The others are named in one warning and
    left out: a step past the cut has no score, and another position's would be a made-up one."""
    modes = (mode,) if isinstance(mode, str) else mode
    long = [k for k, r in enumerate(records)
            if any(encode_for_prm(tok, r, m, block_size)["truncated"] for m in modes)]
    if long:
        print(f"warning: {len(long)} of {len(records)} {what} are longer than the PRM's context "
              f"(block_size={block_size}), left out unscored: {record_names(records, long)}")
    long = set(long)
    return [r for k, r in enumerate(records) if k not in long]


TOTALS = ("gate", "sum", "paper")   # the forms of prm_total (train_prm.py --total)


def prm_total(score, alpha, total="gate"):
    """The record's score, one of three forms (R_φ(s_t) thinking steps, R_φ(a_j) response steps):

    gate  (ours, the default):  min_j R_φ(a_j) · (mean_t R_φ(s_t) + α · R_φ(traj)), in [0, 1 + α]
        The paper's total, gated by the response: a pair whose response goes wrong is a bad pair
        however well it thought (a response is a chain that ends in the answer, as good as its
        worst step), and among pairs whose responses hold, the thinking ranks them. Chosen over
        `sum` on the development voice and on development records one operation longer.
    sum   (ours, before):  mean_t R_φ(s_t) + min_j R_φ(a_j) + α · R_φ(traj), in [0, 2 + α]
        A response that goes wrong costs at most one unit, which a long, confident thinking can
        make up: one operation longer, such records rank above good ones.
    paper:  mean_t R_φ(s_t) + α · R_φ(traj), in [0, 1 + α]; the response is not read.

    Thinking steps are averaged, as in the paper: a trajectory that slips and corrects itself is
    a good one. A record without thinking (or response) steps counts 0 for that term; α = 0 gives
    the step score alone (the paper's α ablation).

    >>> s = {"step": [0.2, 0.6], "response": [1.0, 0.25], "trajectory": 0.5}
    >>> prm_total(s, 1.0), prm_total(s, 1.0, "sum"), prm_total(s, 1.0, "paper")
    (0.225, 1.15, 0.9)
    """
    steps, response = score["step"], score["response"]
    thinking = (sum(steps) / len(steps) if steps else 0.0) + alpha * score["trajectory"]
    worst = min(response) if response else 0.0
    if total not in TOTALS:
        raise ValueError(f"prm_total: total must be one of {', '.join(TOTALS)}; got {total!r}")
    return worst * thinking if total == "gate" else thinking + worst if total == "sum" else thinking


def total_range(alpha, total):
    """The largest value prm_total can take: 1 + α, and 1 more for the sum."""
    return 1 + alpha + (1 if total == "sum" else 0)


# the ways of turning a record's thinking-step scores into one number, and their names in the tables
AGGREGATIONS = {"mean": "mean", "min": "min", "prod": "product", "last": "last step"}


def aggregate(score, how, alpha=0.0):
    """One number from a record's scores (PRM.score's dict): its thinking-step scores aggregated
    `how`, plus α · its trajectory score.

        mean   (1/T) Σ_t R_φ(s_t)    the paper's (with α: its total)
        min    min_t R_φ(s_t)         a chain is as good as its worst step (Math-Shepherd's)
        prod   Π_t R_φ(s_t)           all steps right, read as independent probabilities (Lightman et al.'s)
        last   R_φ(s_T)               the last step's score, which has read every step before it

    Only the thinking steps are read (the paper's steps), never the response's; prm_total, our
    default total, gates by the worst response step. A record without thinking steps counts 0 for the
    step term, as in prm_total (not the empty product's 1, which would rank it first).

    >>> s = {"step": [0.5, 0.8, 0.25], "response": [0.0], "trajectory": 0.5}
    >>> [aggregate(s, how) for how in AGGREGATIONS], aggregate(s, "min", alpha=2.0)
    ([0.5166666666666667, 0.25, 0.1, 0.25], 1.25)
    """
    steps = score["step"]
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate: how must be one of {', '.join(AGGREGATIONS)}; got {how!r}")
    step_term = 0.0
    if steps:
        step_term = {"mean": lambda: sum(steps) / len(steps), "min": lambda: min(steps),
                     "prod": lambda: math.prod(steps), "last": lambda: steps[-1]}[how]()
    return step_term + alpha * score["trajectory"]


def prm_loss(scores, step_targets, final_targets, lam_step=1.0, lam_final=1.0):
    """L = λ_step · mean_t (R(step t) − r_step(t))² + λ_final · (R(traj) − r_final)².

    scores (B, T) from PRM.forward; step_targets, final_targets (B, T) hold the target at
    read positions and NaN elsewhere, so only read positions receive a gradient. The step
    mean is over all step positions of the batch (thinking and, when trained, response steps).
    """
    def masked_mse(t):
        m = ~torch.isnan(t)
        if not m.any():
            return scores.sum() * 0.0
        return ((scores[m] - t[m]) ** 2).mean()
    return lam_step * masked_mse(step_targets) + lam_final * masked_mse(final_targets)


def load_prm(path, device=None):
    """Load a trained PRM (from train_prm.py) ready to `score` records. Anything wrong with the
    checkpoint (its kind, its tokenizer, weights that do not fit its shape) is a BadInput naming it."""
    device = device or pick_device()
    ckpt = load_checkpoint(path, kind="prm")
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    vocab = cfg.get("tokenizer")
    if not isinstance(vocab, str) or not os.path.isfile(vocab):
        raise BadInput(f"{path}: its tokenizer {vocab!r} is not a file any more; "
                       f"run data/arith/prepare.py again, or retrain the PRM")
    tok = Tokenizer(load_tokenizer(vocab))
    if ckpt["vocab"] != vocab_fingerprint(tok.enc):
        raise BadInput(f"{path}: made with vocabulary {ckpt['vocab']}, but {vocab} is now "
                       f"{vocab_fingerprint(tok.enc)}; retrain the PRM")
    try:
        prm = PRM(GPTConfig(**ckpt["model_args"]), ckpt.get("readout", "plain"), ckpt.get("checked", "computation"))
    except WRONG_SHAPE as e:
        raise wrong_shape(ckpt, e) from e
    load_prm_weights(prm, ckpt)
    prm.tok, prm.alpha, prm.mode = tok, cfg.get("alpha", 1.0), ckpt.get("mode", "full")
    # the total is read when scoring, not in training: a checkpoint older than --total reads as gate
    prm.total = cfg.get("total", "gate") if cfg.get("response", False) else "paper"
    prm.path = path
    return prm.to(device).eval()


def load_prm_weights(prm, ckpt):
    """Load a PRM checkpoint's weights into `prm`; weights of another shape are a BadInput naming the file."""
    try:
        prm.load_state_dict(ckpt["model"])
    except WRONG_SHAPE as e:
        raise wrong_shape(ckpt, e) from e


def untrained_scorer(policy_path, tokenizer, readout="confidence", device="cpu"):
    """A scorer with PRM.score made from the policy itself, with no training: what the backbone
    knows before any reward design. readout="confidence" (the confidence baseline): a step scores
    exp(lowest log-probability among its tokens); readout="surprise": σ(ℓ_t), the PRM's surprise
    term alone (its head at zero). The total is prm_total's (gate: the worst response step times
    the mean over the thinking steps); there is no trajectory score (α = 0)."""
    tok = Tokenizer(load_tokenizer(tokenizer))
    ckpt = load_checkpoint(policy_path, kind="policy", enc=tok.enc)
    scorer = PRM(GPTConfig(**ckpt["model_args"]), readout=readout)
    scorer.gpt.load_state_dict(model_from_checkpoint(ckpt).state_dict())
    scorer.tok, scorer.alpha, scorer.path = tok, 0.0, policy_path
    return scorer.to(device).eval()


# ----------------------------------------------------------------------------
# python rfprm.py score FILE.jsonl: see what a trained PRM thinks of each step


def colour(text, score, tty):
    """Green for a high score, yellow for a middling one, red for a low one (only on a terminal)."""
    return f"\033[{32 if score >= 0.7 else 33 if score >= 0.4 else 31}m{text}\033[0m" if tty else text


def show_scores(record, s, tty, with_response=True):
    """One record with its scores, one line per step; `meta` (hidden truth) is shown, never used.
    Response steps are shown with scores only when the PRM was trained on them."""
    truth = (record.get("meta") or {}).get("step_ok")
    print(f"Q: {record['question']}" + (f"   (answer {record['answer']})" if "answer" in record else ""))
    for t, (line, x) in enumerate(zip(record.get("thinking") or [], s["step"])):
        mark = "" if truth is None or t >= len(truth) else ("" if truth[t] else "   <- wrong (hidden truth)")
        print(f"  think {colour(f'{x:.2f}', x, tty)}  {line}{mark}")
    for line, x in zip(record.get("response") or [], s["response"]):
        print(f"  resp  {colour(f'{x:.2f}', x, tty) if with_response else '    '}  {line}")
    flaw = (record.get("meta") or {}).get("flaw")
    print(f"  trajectory {s['trajectory']:.2f}, total {s['total']:.2f}" + (f"   (flaw: {flaw})" if flaw else "") + "\n")


def main(argv=None):
    parser = argument_parser(description="Print records of a jsonl file with a PRM's per-step scores (score), "
                                         "or with their reward design, step by step (design).")
    parser.add_argument("command", choices=["score", "design"])
    parser.add_argument("file", help="pool-format jsonl: question, thinking, response per line")
    parser.add_argument("--prm", default="out/prm/ckpt.pt", help="score: a checkpoint from train_prm.py")
    parser.add_argument("--policy", default="out/policy/ckpt.pt", help="design: the policy that rolls out r_final")
    parser.add_argument("--n", type=int, default=10, help="how many records to show (0 = all)")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)
    require(args.n >= 0, f"--n must be at least 0 (0 = all), got {args.n}")
    if args.command == "design":
        return design(args.file, args.n or 10, args.policy, device=pick_device(args.device))
    records = read_jsonl(args.file, ("question", "thinking", "response"))
    records = records[:args.n] if args.n else records
    prm = load_prm(args.prm, pick_device(args.device))
    records = records_that_fit(records, prm.tok, prm.config.block_size, prm.mode)
    tty = sys.stdout.isatty()
    for record, s in zip(records, prm.score(records)):
        show_scores(record, s, tty, prm.total != "paper" or prm.mode == "response_only")


if __name__ == "__main__":
    run_main(main)
