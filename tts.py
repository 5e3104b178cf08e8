"""
Test-time scaling: Best-of-N with ReasonFlux-PRM against majority vote and baselines.

    python tts.py                                   # 500 questions x 32 samples
    python tts.py --n_questions=1000 --n_subsets=4000
    python tts.py --prm_outcome=""                  # leave a baseline out

Reproduces the paper's third use of the PRM: the policy samples N answers to
a question, a chooser keeps one, and accuracy is plotted against N. Choosers:

  ReasonFlux-PRM      the sample with the highest total (rfprm.prm_total)
    mean, min,        the same PRM's thinking-step scores aggregated another way (rfprm.aggregate),
    product,          each without and with + α·trajectory, read from the row above's scores with
    last step         no other forward pass
  response-only PRM   the same rule with the baseline PRM trained on responses only (MC labels)
  outcome scorer      the same rule with the scorer trained on final-answer correctness only
  confidence          the same rule with the policy's own lowest token log-probability per step
  mean log-likelihood the sample the policy finds most likely, per token (untrained)
  majority vote       the most frequent parsed answer (unparsable answers do not vote)
  PRM-weighted vote   the answer with the largest sum of ReasonFlux-PRM totals
  random              one sample: pass@1, the same for every N
  oracle              pass@N: right if any of the N is right (an upper bound, reads the answer key)

Protocol. Each held-out question is sampled N_max times, once (one batched KV-cache
generation), and every sample is scored once by every PRM. The accuracy of a chooser at N
is then its mean over size-N subsets of those N_max samples: all of them when there are at
most `n_subsets` (exact), otherwise `n_subsets` random subsets per question (Monte Carlo).
All choosers see the same subsets, so their differences carry less noise than their levels.
Ties are broken deterministically: the lowest sample index wins (for votes: the answer
seen first). A sample's answer is read from its response (`Answer: N`), as evaluate.accuracy does.

Where this departs from the paper:
  * the policy and the PRMs are the small models the earlier stages trained, on held-out
    arithmetic questions, instead of LLMs on AIME, MATH500 and GPQA-Diamond;
  * N samples are subsets of one pool of N_max samples per question, not fresh samples for
    each N: the same expectation, far less generation (the usual pass@k estimator trick);
  * the baselines are our own small PRMs trained on the same pool (train_prm.py --labels=mc
    and --labels=outcome), used through their `total` exactly like ReasonFlux-PRM, as the
    synthetic ProcessBench of train_prm.py does, rather than released PRMs;
  * the policy samples at τ = 0.5 (`--temperature`), chosen among 1.0, 0.7 and 0.5 on a dev
    split (the first questions of rl_questions.jsonl, never a file this script reports on) over
    two pipeline seeds: at τ = 1.0 the pool of N holds more samples whose wrong operand the PRM
    cannot see, and the PRM's pick falls as N grows;
  * the oracle and the PRM-weighted vote are our additions (an upper bound and a hybrid);
  * so are the aggregation rows: the paper aggregates by the mean (its total, "mean + α·traj").
"""

import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass, asdict

import torch

import files
import task
from files import read_jsonl, write_json_atomic, check_writable, lock_out_dir, skip_long_prompts, BadInput
from tokenizer import Tokenizer, DEFAULT_VOCAB, load_tokenizer, encode_prompt, completion_record
from options import format_eta, parse_config, print_config, check_options, require, run_main
from checkpoints import load_checkpoint, model_from_checkpoint
from evaluate import generate_completions
from training import pick_device, pack
from rfprm import load_prm, untrained_scorer, aggregate, AGGREGATIONS


@dataclass
class TTSConfig:
    out_dir: str = "out/tts"
    test: str = "data/arith/test.jsonl"
    tokenizer: str = DEFAULT_VOCAB
    policy: str = "out/policy/ckpt.pt"
    prm: str = "out/prm/ckpt.pt"                        # ReasonFlux-PRM (required)
    prm_response: str = "out/prm_response/ckpt.pt"      # response-only PRM; "" leaves it out
    prm_outcome: str = "out/prm_outcome/ckpt.pt"        # outcome scorer; "" leaves it out
    n_questions: int = 500
    n_samples: int = 32            # N_max: samples per question, drawn once
    ns: str = "1,2,4,8,16,32"      # the N of the curve, each at most n_samples
    n_subsets: int = 1000          # subsets per question and N (all of them when fewer exist)
    temperature: float = 0.5       # sampling temperature, chosen on a dev split (docstring); 1.0: the policy as trained
    max_new_tokens: int = 160      # the pool's longest record is ~140 tokens with its prompt
    batch_size: int = 128          # rows per sampling batch: a larger one waits longer on its longest sample
    seed: int = 1337
    device: str = ""
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False


GPU = dict(n_questions=1000, n_samples=64, ns="1,2,4,8,16,32,64")  # a tighter curve, one more N
SMOKE = dict(n_questions=8, n_samples=8, ns="1,2,4,8", n_subsets=50, max_new_tokens=48, batch_size=64)
PRESETS = {"gpu": GPU, "smoke": SMOKE}  # applied in this order; options given explicitly win
AT_LEAST = dict(n_questions=1, n_samples=1, n_subsets=1, max_new_tokens=1, batch_size=1)  # options.check_options

SCORERS = {"ReasonFlux-PRM": "prm", "response-only PRM": "prm_response", "outcome scorer": "prm_outcome"}
WEIGHTS = "ReasonFlux-PRM"  # Best-of-N by each PRM's total; the weighted vote adds up this one's
CONFIDENCE, LIKELIHOOD = "confidence", "mean log-likelihood"   # the untrained choosers, from the policy


# ----------------------------------------------------------------------------
# the subset estimator: choosers pick a sample index in each of many size-N subsets


def check_sizes(ns, n_samples):
    """Every N must be between 1 and the number of samples per question."""
    for n in ns:
        if n < 1 or n > n_samples:
            raise BadInput(f"N={n} is not possible with {n_samples} samples per question: "
                           f"every N must be between 1 and {n_samples} (raise --n_samples or lower --ns)")


def subset_indices(n_samples, n, n_subsets, n_questions, generator=None):
    """Sample indices (Q, S, N) of size-N subsets of range(n_samples), S per question.

    All C(n_samples, N) subsets when there are at most n_subsets of them (exact, the same
    for every question), else n_subsets random subsets per question without replacement
    within a subset (Monte Carlo). Indices ascend within a subset. Returns (idx, exact).

    >>> subset_indices(3, 2, 10, 1)[0].tolist()
    [[[0, 1], [0, 2], [1, 2]]]
    """
    check_sizes([n], n_samples)
    if math.comb(n_samples, n) <= n_subsets:
        combos = torch.tensor(list(itertools.combinations(range(n_samples), n)), dtype=torch.long)  # (S, N)
        return combos.expand(n_questions, -1, -1), True
    keys = torch.rand(n_questions, n_subsets, n_samples, generator=generator)  # a random order per subset
    return keys.argsort(-1)[..., :n].sort(-1).values, False                     # (Q, S, N)


def gather(values, idx):
    """values (Q, M) read at idx (Q, S, N) -> (Q, S, N)."""
    return values.gather(1, idx.flatten(1)).view(idx.shape)


def argmax_lowest(values, order):
    """Position of the largest value along the last dim; ties go to the smallest `order`.

    >>> argmax_lowest(torch.tensor([1., 3., 3.]), torch.tensor([2, 1, 0]))
    tensor(2)
    """
    best = values == values.max(-1, keepdim=True).values
    return torch.where(best, order, torch.iinfo(order.dtype).max).argmin(-1)


def pick_best(scores, idx):
    """Best-of-N: the sample with the highest score in each subset, ties to the lowest index.

    scores (Q, M), idx (Q, S, N) -> chosen sample indices (Q, S).
    """
    pos = argmax_lowest(gather(scores, idx), idx)               # (Q, S)
    return idx.gather(-1, pos[..., None]).squeeze(-1)


def pick_vote(answer_ids, idx, weights=None):
    """Vote: the answer with the most votes (or the largest sum of `weights`) in each subset.

    answer_ids (Q, M): a class per distinct answer of a question, -1 for no answer (it does
    not vote). Ties go to the answer seen first (lowest sample index). Returns, per subset,
    the first sample that gave the winning answer (Q, S), so that correctness is read off
    the samples as for every other chooser; a subset without any answer returns its first.
    """
    Q, S, N = idx.shape
    M = answer_ids.size(1)
    slot = gather(answer_ids, idx)
    slot = torch.where(slot >= 0, slot, M)                      # no answer: an extra slot, dropped below
    w = torch.ones(Q, S, N) if weights is None else gather(weights.float(), idx)
    tally = torch.zeros(Q, S, M + 1).scatter_add_(-1, slot, w)[..., :M]                    # (Q, S, M)
    first = torch.full((Q, S, M + 1), M).scatter_reduce_(-1, slot, idx, "amin")[..., :M]  # (Q, S, M)
    tally = tally.masked_fill(first == M, float("-inf"))        # answers absent from the subset
    win = argmax_lowest(tally, first)                           # (Q, S) answer class
    chosen = first.gather(-1, win[..., None]).squeeze(-1)
    return torch.where(chosen < M, chosen, idx[..., 0])


def answer_classes(answers):
    """Per question, each distinct answer -> 0, 1, ... in order of first appearance; None -> -1.

    >>> answer_classes([[7, None, 5, 7]]).tolist()
    [[0, -1, 1, 0]]
    """
    rows = []
    for row in answers:  # once, Q x M Python values
        seen = {}
        rows.append([-1 if a is None else seen.setdefault(a, len(seen)) for a in row])
    return torch.tensor(rows, dtype=torch.long)


def best_of_n_curves(correct, answer_ids, scores, ns, n_subsets=1000, generator=None):
    """Accuracy against N of every chooser, and per-question accuracies for paired comparisons.

    correct (Q, M) bool; answer_ids (Q, M) from answer_classes; scores {name: (Q, M)} PRM totals
    (the weighted vote uses scores[WEIGHTS] when present). Returns
    ({chooser: [{"n", "acc", "se", "exact"}, ...]}, {chooser: {n: per-question accuracy (Q,)}}).
    """
    Q, M = correct.shape
    check_sizes(ns, M)
    curves, per_question = {}, {}
    for n in ns:
        idx, exact = subset_indices(M, n, n_subsets, Q, generator)
        chosen = {name: pick_best(s, idx) for name, s in scores.items()}
        chosen["majority vote"] = pick_vote(answer_ids, idx)
        if WEIGHTS in scores:
            chosen["PRM-weighted vote"] = pick_vote(answer_ids, idx, scores[WEIGHTS])
        chosen["oracle (pass@N)"] = pick_best(correct.float(), idx)
        accs = {name: correct.gather(1, c).float().mean(1) for name, c in chosen.items()}  # (Q,) each
        accs["random (pass@1)"] = correct.float().mean(1)       # exact: the mean over all samples
        for name, a in accs.items():
            se = float(a.std() / math.sqrt(Q)) if Q > 1 else 0.0
            curves.setdefault(name, []).append({"n": n, "acc": float(a.mean()), "se": se, "exact": exact})
            per_question.setdefault(name, {})[n] = a
    return curves, per_question


def paired_difference(per_question, a, b):
    """{n: (mean, standard error)} of per-question accuracy of chooser a minus chooser b."""
    out = {}
    for n, acc in per_question[a].items():
        d = acc - per_question[b][n]
        out[n] = (float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0)
    return out


# ----------------------------------------------------------------------------
# sampling and scoring, once per question


def sample_all(policy, tok, questions, cfg, device):
    """n_samples completions per question (Q * M id lists, question-major), batched, with ETA."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = [encode_prompt(tok, q["question"]) for q in questions for _ in range(cfg.n_samples)]
    comps, t0 = [], time.time()
    for i in range(0, len(prompts), cfg.batch_size):
        comps += generate_completions(policy, tok, prompts[i:i + cfg.batch_size], cfg.temperature,
                                      cfg.max_new_tokens, cfg.batch_size, g)
        rate = (time.time() - t0) / len(comps)
        print(f"sampling: {len(comps):,}/{len(prompts):,} completions | "
              f"eta {format_eta(rate * (len(prompts) - len(comps)))}")
    return comps


def to_records(tok, questions, comps, n_samples):
    """PRM records, parsed answers and correctness of the completions (question-major)."""
    records, answers, correct = [], [], []
    for k, c in enumerate(comps):
        q = questions[k // n_samples]
        records.append(completion_record(tok, q["question"], c))
        response = "\n".join(records[-1]["response"])
        answers.append(task.parse_answer(response))
        correct.append(task.verify(response, q["answer"]))
    return records, answers, correct


@torch.no_grad()
def mean_loglik(policy, tok, prompts, comps, batch_size=64):
    """Per completion, the policy's mean token log-likelihood of it, at the sampling temperature 1:
    an untrained chooser that prefers what the policy itself finds most likely."""
    device = next(policy.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        X, Y = pack(list(zip(prompts[i:i + batch_size], comps[i:i + batch_size])), policy.config.block_size, tok.eot)
        _, loss = policy(X.to(device), Y.to(device), loss_reduction="none")          # (B, T), 0 off targets
        out += (-loss.sum(1).cpu() / (Y != -1).sum(1).clamp(min=1)).tolist()
    return out


def score_unique(score_fn, records, keys, chunk, name):
    """score_fn(indices) -> one value per sample, called on each distinct key once, with ETA.

    A sharp policy repeats itself, so identical (question, completion) pairs are scored once;
    samples go in order of their number of lines (a proxy for length), so that a batch carries
    little padding; `chunk` samples per progress line. Returns (a value per sample, distinct count).
    """
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    uniq = sorted(first.values(), key=lambda i: len(records[i]["thinking"]) + len(records[i]["response"]))
    total, t0 = {}, time.time()
    for j in range(0, len(uniq), chunk):
        part = uniq[j:j + chunk]
        total.update(zip(part, score_fn(part)))
        done = min(len(uniq), j + chunk)
        print(f"scoring with {name}: {done:,}/{len(uniq):,} distinct samples | "
              f"eta {format_eta((time.time() - t0) / done * (len(uniq) - done))}")
    return [total[first[k]] for k in keys], len(uniq)


def aggregated_rows(prm_scores, alpha, shape):
    """{row name: (Q, M) scores}: every sample's ReasonFlux-PRM scores (PRM.score's dicts, already
    computed) aggregated each way of rfprm.aggregate, without and with α · trajectory. The names
    are indented: they are variants of the ReasonFlux-PRM row, printed below it."""
    return {f"  {name}" + (" + α·traj" if a else ""):
            torch.tensor([aggregate(s, how, a) for s in prm_scores]).view(shape)
            for how, name in AGGREGATIONS.items() for a in (0.0, alpha)}


# ----------------------------------------------------------------------------
# report: table, figure, checks


def answer_sizes(picked):
    """'median |answer| m, 0 in p%' of a list of answers (None = no parsable answer)."""
    sizes = [abs(a) for a in picked if a is not None]
    median = statistics.median(sizes) if sizes else float("nan")
    return f"median |answer| {median:g}, 0 in {sum(a == 0 for a in picked) / len(picked):.0%}"


def format_picked_answers(scores, answers, questions):
    """What each scorer picks from ALL of a question's samples, beside the true answers.

    A diagnostic, not a result: a scorer that prefers small answers (the template-guided reward
    is higher on easy questions, README) picks them whatever the question asks.
    """
    Q = len(questions)
    M = len(answers) // Q
    idx = torch.arange(M).expand(Q, 1, M)                                         # one subset: all samples
    lines = [f"answers picked from all {M} samples of each question ({Q} questions):",
             f"  {'true answers':<24}" + answer_sizes([q["answer"] for q in questions])]
    for name, s in scores.items():
        best = pick_best(s, idx)[:, 0]                                           # (Q,)
        lines.append(f"  {name:<24}" + answer_sizes([answers[q * M + int(b)] for q, b in enumerate(best)]))
    return "\n".join(lines)


def format_table(curves, ns):
    """Best-of-N accuracy ± its standard error over questions against N, one row per chooser
    (as printed and in out/results.md)."""
    lines = ["\nBest-of-N accuracy (%) ± standard error over questions, against N "
             "(mean over size-N subsets of each question's samples)",
             f"{'chooser':<22}" + "".join(f"{'N=' + str(n):>11}" for n in ns)]
    for name, rows in curves.items():
        lines.append(f"{name:<22}" + "".join(f"{100 * r['acc']:>7.1f}±{100 * r['se']:<3.1f}" for r in rows))
    return "\n".join(lines)


def text_plot(curves, ns, height=14):
    """Accuracy against N as text: one block of columns per N, one letter per chooser."""
    names = list(curves)
    letters = "".join(chr(ord("A") + i) for i in range(len(names)))
    accs = [r["acc"] for rows in curves.values() for r in rows]
    lo, hi = min(accs), max(accs)
    hi = max(hi, lo + 0.01)  # flat curves still get an axis
    span = hi - lo
    row_of = lambda a: round((hi - a) / span * (height - 1))
    lines = []
    for y in range(height):
        cells = ["".join(letters[k] if row_of(curves[name][j]["acc"]) == y else " "
                         for k, name in enumerate(names)) for j in range(len(ns))]
        lines.append(f"{100 * (hi - span * y / (height - 1)):6.1f}% |" + "  ".join(cells))
    lines.append(" " * 8 + "+" + "-" * ((len(names) + 2) * len(ns)))
    lines.append(" " * 9 + "".join(f"{'N=' + str(n):<{len(names) + 2}}" for n in ns))
    lines += [f"  {letters[k]} {name}" for k, name in enumerate(names)]
    return "\n".join(lines)


def save_figure(curves, ns, path):
    """Accuracy against N (log2 axis) as a PNG; False when matplotlib is not importable."""
    plt = files.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, rows in curves.items():
        style = ":" if name.startswith(("oracle", "random")) else "-"
        ax.plot([r["n"] for r in rows], [100 * r["acc"] for r in rows], style, marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples per question)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return files.save_png(fig, path, dpi=120)


def checks(curves, per_question, ns):
    """The claims of this stage, read off the curves: ReasonFlux-PRM never loses more than one
    standard error from one N to the next; from N = 8 on it is above majority vote and every
    other learned or untrained chooser; voting weighted by it is never below the plain vote."""
    out = {}
    rf = curves[WEIGHTS]
    out["prm_never_drops_by_more_than_one_se"] = all(b["acc"] >= a["acc"] - b["se"] for a, b in zip(rf, rf[1:]))
    for rival in ("majority vote", "response-only PRM", CONFIDENCE, LIKELIHOOD):
        if rival in curves and max(ns) >= 8:
            diff = paired_difference(per_question, WEIGHTS, rival)
            out[f"prm_above_{rival.replace(' ', '_')}_for_n_ge_8"] = all(diff[n][0] > 0 for n in ns if n >= 8)
            print(f"ReasonFlux-PRM minus {rival}: " +
                  "  ".join(f"N={n} {100 * m:+.1f}±{100 * s:.1f}" for n, (m, s) in diff.items()))
    if "PRM-weighted vote" in curves:
        out["weighted_vote_at_or_above_majority"] = all(
            w["acc"] >= v["acc"] for w, v in zip(curves["PRM-weighted vote"], curves["majority vote"]))
    print("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------


def parse_ns(cfg):
    """The Ns of --ns, checked against the samples there are, before minutes of sampling."""
    try:
        ns = [int(n) for n in cfg.ns.split(",") if n.strip()]
    except ValueError:
        raise BadInput(f"--ns must be comma-separated integers like 1,2,4,8, got {cfg.ns!r}") from None
    require(ns, f"--ns names no N; give comma-separated integers like 1,2,4,8")
    check_sizes(ns, cfg.n_samples)
    return ns


def load_scorers(cfg, device):
    """{name: PRM} of the PRMs given; every one is loaded now (its tokenizer, its weights), not after
    the sampling."""
    prm_paths = {name: getattr(cfg, opt) for name, opt in SCORERS.items() if getattr(cfg, opt) or name == WEIGHTS}
    for name, p in prm_paths.items():
        if not os.path.exists(p):
            raise FileNotFoundError(f"no {name} checkpoint at {p!r}: train it with train_prm.py, "
                                    f"or point --{SCORERS[name]} at it")
    return {name: load_prm(path, device) for name, path in prm_paths.items()}


def score_samples(scorers, policy, tok, questions, comps, records, cfg, device):
    """({scorer: scores (Q, M)}, distinct samples): every sample scored by the PRMs, the confidence
    baseline and the policy's likelihood, each distinct completion once (score_unique)."""
    keys = [(k // cfg.n_samples, tuple(c)) for k, c in enumerate(comps)]
    scorers[CONFIDENCE] = untrained_scorer(cfg.policy, cfg.tokenizer, "confidence", device)
    # each scorer gives a dict per sample ({"step", "response", "trajectory", "total"} for a PRM)
    score_fns = {name: (lambda idx, prm=prm: prm.score([records[i] for i in idx])) for name, prm in scorers.items()}
    prompts = [encode_prompt(tok, q["question"]) for q in questions for _ in range(cfg.n_samples)]
    score_fns[LIKELIHOOD] = lambda idx: [{"total": x} for x in
                                         mean_loglik(policy, tok, [prompts[i] for i in idx], [comps[i] for i in idx])]
    scores, n_unique = {}, 0
    for name, fn in score_fns.items():
        values, n_unique = score_unique(fn, records, keys, 2 * cfg.batch_size, name)
        scores[name] = torch.tensor([v["total"] for v in values]).view(len(questions), cfg.n_samples)
        if name == WEIGHTS:   # the same scores aggregated other ways: rows below it, no other forward pass
            scores.update(aggregated_rows(values, scorers[name].alpha, (len(questions), cfg.n_samples)))
    return scores, n_unique


def load_policy(cfg, tok, questions, device):
    """The policy, and the questions whose prompt leaves room in its context."""
    policy = model_from_checkpoint(load_checkpoint(cfg.policy, kind="policy", enc=tok.enc), device).eval()
    questions = skip_long_prompts(questions, [len(encode_prompt(tok, q["question"])) for q in questions],
                                  policy.config.block_size, "questions")
    require(questions, f"{cfg.test}: no question fits the policy's context")
    return policy, questions


def paired_differences(curves, per_question):
    """ReasonFlux-PRM minus each rival, per N (mean, standard error over questions): the trends
    table reads these."""
    return {rival: paired_difference(per_question, WEIGHTS, rival) for rival in curves if rival != WEIGHTS}


def show_figure(curves, ns, out_dir):
    """The headline curves as a figure, or as a text plot (printed and in tts_plot.txt) without matplotlib."""
    png = os.path.join(out_dir, "tts.png")
    headline = {k: v for k, v in curves.items() if not k.startswith("  ")}   # 17 curves would hide each other
    if save_figure(headline, ns, png):
        print(f"figure: {png}")
    else:
        plot = text_plot(headline, ns)
        print(plot)
        with open(os.path.join(out_dir, "tts_plot.txt"), "w") as f:
            f.write(plot + "\n")


def main(argv=None):
    cfg = parse_config(TTSConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST, ranges={"temperature": "[0, inf)"})   # 0: greedy, every sample alike
    check_writable(cfg.out_dir)
    print_config(cfg)
    ns = parse_ns(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(load_tokenizer(cfg.tokenizer))
    questions = read_jsonl(cfg.test, ("question", "answer"))[:cfg.n_questions]
    scorers = load_scorers(cfg, device)   # fail now, not after the sampling
    t0 = time.time()
    policy, questions = load_policy(cfg, tok, questions, device)
    lock_out_dir(cfg.out_dir)
    print(f"{len(questions)} questions x {cfg.n_samples} samples at temperature {cfg.temperature}")
    comps = sample_all(policy, tok, questions, cfg, device)
    records, answers, correct = to_records(tok, questions, comps, cfg.n_samples)
    t_sample = time.time() - t0
    scores, n_unique = score_samples(scorers, policy, tok, questions, comps, records, cfg, device)
    t_score = time.time() - t0 - t_sample
    Q, M = len(questions), cfg.n_samples
    correct = torch.tensor(correct).view(Q, M)
    answer_ids = answer_classes([answers[q * M:(q + 1) * M] for q in range(Q)])
    curves, per_question = best_of_n_curves(correct, answer_ids, scores, ns, cfg.n_subsets,
                                            torch.Generator().manual_seed(cfg.seed + 1))
    t_estimate = time.time() - t0 - t_sample - t_score
    answered = float((answer_ids >= 0).float().mean())
    print(f"samples: {n_unique:,} distinct of {Q * M:,}, {answered:.1%} with a parsable answer, "
          f"{correct.float().mean():.1%} right; sampling {t_sample:.0f}s, scoring {t_score:.0f}s, "
          f"subset estimates {t_estimate:.1f}s")
    print(format_table(curves, ns))
    print(format_picked_answers(scores, answers, questions))
    verdict = checks(curves, per_question, ns)
    show_figure(curves, ns, cfg.out_dir)
    results = {"curves": curves, "checks": verdict, "paired": paired_differences(curves, per_question),
               "n_questions": Q, "n_samples": M, "distinct_samples": n_unique, "answered": answered,
               "seconds": {"sampling": t_sample, "scoring": t_score, "estimate": t_estimate},
               "config": asdict(cfg)}
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"), results)
    print(f"results: {cfg.out_dir}/results.json ({time.time() - t0:.0f}s)")
    return results


if __name__ == "__main__":
    run_main(main)
