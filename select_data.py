"""
Offline data selection: score the distilled pool with the PRMs, keep K records, train students.

    python select_data.py                                  # 8 selectors x 3 seeds
    python select_data.py --k=1000 --seeds=5
    python select_data.py --selectors=random,rf_total,oracle --budget_tokens=200000
    python select_data.py --selectors=rf_top_k,rf_mean,rf_mean_traj,rf_min,rf_min_traj,rf_prod,rf_prod_traj,rf_last,rf_last_traj

The paper's first use of the PRM: every pool record is scored, each selector keeps K records, a
student is fine-tuned on them; its held-out accuracy says how good the selection was. Selectors:

  random              K records drawn at random
  outcome filter      records whose final answer is right (the answer key), then K at random
  response-only PRM   top-K by the baseline PRM's total (trained on final responses, MC labels)
  confidence          top-K by the policy's own confidence, no training (rfprm.untrained_scorer)
  ReasonFlux-PRM      K at random among the records the PRM accepts: every step scored >= ½ and,
                      α = 1, the trajectory >= ½ (accepted_k; select)
  ReasonFlux step     the same with α = 0, the steps only: what the trajectory reward adds
  ReasonFlux, top-K   the paper's form: top-K by total = mean(step) + min(response) + α·trajectory
  oracle              K random records whose hidden `meta` says clean: an UPPER BOUND for
                      evaluation only; it is the only selector that reads `meta`
  rf_mean, rf_min,    top-K by the thinking-step scores aggregated another way (rfprm.aggregate),
  rf_prod, rf_last    _traj adds α·trajectory; the same pool scores; the last command above runs them

Protocol. Every student starts from --init (run.sh's out/start: the policy's own SFT run at step
2000, trained only on the training records, disjoint from the pool; check_never_trained_on refuses
a start whose recorded origin includes the pool). In row s every student trains with seed s and
the random selectors draw with seed s. Every student sees the same number of target tokens: the
batch of step t depends on (seed, t) alone, so a student trains for the fewest steps whose batches
hold --budget_tokens (plan_steps, checked after training). Accuracy is greedy, on the same
held-out questions for all. Top-K is a stable sort by (-score, pool index). Selectors see the
records without `meta`; the composition table reads it only to explain results.

Why this start, K and budget: from the base model (facts only) a student learns too little to tell
good data from bad; from the policy, trained on records like these, every selection moves it down.
A start that knows the format but reasons poorly leaves room to teach, and costs no training of its
own. K is 5% of the pool, so a ranking's top is far purer than the pool; the budget is several
passes over the K records, where flawed records hurt most; a lower learning rate keeps it near its start.

Where this departs from the paper:
  * ReasonFlux-PRM selects as a filter, K at random among the records it accepts (accepted_k);
    the paper's top-K by the total is the row "ReasonFlux, top-K (paper)";
  * the students are the course's small GPT, not Qwen2.5 on 1k of 59k records; the baselines are
    our own scorers, the answer key and random, not released PRMs or human curation (s1k);
  * budgets are matched in target tokens (ours): the paper matches the number of samples;
  * seeds, the step-only row, the oracle and the aggregation rows are ours (rf_mean_traj: the paper's total).
"""

import os
import random
import statistics
import time
from dataclasses import dataclass, asdict

import torch

import files
import sft
import task
import training
from files import (file_digest, read_jsonl, write_json_atomic, save_checkpoint, lock_out_dir, check_writable,
                   load_cache, BadInput)
from tokenizer import Tokenizer, DEFAULT_VOCAB, load_tokenizer
from options import format_eta, parse_config, print_config, check_options, run_main
from checkpoints import load_checkpoint, model_from_checkpoint
from evaluate import accuracy, format_accuracy, mean_std
from training import pick_device, map_in_processes
from rfprm import load_prm, prm_total, untrained_scorer, aggregate, AGGREGATIONS, records_that_fit


@dataclass
class SelectConfig:
    out_dir: str = "out/select"
    data: str = "data/arith/pool.jsonl"
    test: str = "data/arith/test.jsonl"
    tokenizer: str = DEFAULT_VOCAB
    init: str = "out/start/ckpt.pt"                  # every student starts here: never trained on the pool
    policy: str = "out/policy/ckpt.pt"               # the confidence selector's model
    prm: str = "out/prm/ckpt.pt"                     # ReasonFlux-PRM
    prm_response: str = "out/prm_response/ckpt.pt"   # response-only PRM (train_prm.py --labels=mc)
    selectors: str = "random,outcome,response_prm,confidence,rf_total,rf_step,rf_top_k,oracle"
    k: int = 500                   # records kept per selector (5% of the pool, see the docstring)
    seeds: int = 3                 # rows: seeds seed, seed + 1, ...
    workers: int = 2               # students at a time, each in a process of one thread (training.map_in_processes)
    seed: int = 1337
    # the student's budget: identical for every selector
    budget_tokens: int = 300_000   # target tokens each student sees: ~8 passes over K records
    batch_size: int = 8            # small batches learn more per token (sft.py)
    lr: float = 5e-4               # a quarter of SFT's: the student stays near its start
    min_lr: float = 5e-5
    warmup_steps: int = 30
    eval_questions: int = 500      # held-out questions, the same for every student
    score_batch_size: int = 0      # rows per PRM forward (0: rfprm.score_batch_size, 16 on a CPU)
    cache_dir: str = ""            # pool scores, keyed by pool and checkpoint bytes ("" = out_dir)
    device: str = ""
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False


GPU = dict(budget_tokens=1_500_000, seeds=5, eval_questions=1000, workers=1)  # longer students, more seeds
SMOKE = dict(k=32, seeds=2, workers=1, budget_tokens=2000, warmup_steps=2, eval_questions=16)
PRESETS = {"gpu": GPU, "smoke": SMOKE}  # applied in this order; options given explicitly win
# the smallest value of each size (options.check_options); 0 batches would loop forever
AT_LEAST = dict(k=1, seeds=1, workers=1, budget_tokens=1, batch_size=1, warmup_steps=0, eval_questions=0, score_batch_size=0)

# option key -> name in the tables; "oracle" is the only selector given the hidden meta
SELECTORS = {
    "random": "random",
    "outcome": "outcome filter",
    "response_prm": "response-only PRM",
    "confidence": "confidence (policy)",
    "rf_total": "ReasonFlux-PRM",
    "rf_step": "ReasonFlux step (α=0)",
    "rf_top_k": "ReasonFlux, top-K (paper)",
    "oracle": "oracle: clean (upper bound)",
}
# ReasonFlux-PRM's scores aggregated other ways, top-K by each: selector key -> (how, with α·trajectory)
AGGREGATED = {f"rf_{how}" + ("_traj" if traj else ""): (how, traj) for how in AGGREGATIONS for traj in (False, True)}
SELECTORS.update({key: f"RF top-K: {AGGREGATIONS[how]}" + (" + α·traj" if traj else "")
                  for key, (how, traj) in AGGREGATED.items()})
HEADLINE = "rf_total"
PRM_SELECTORS = {"rf_total", "rf_step", "rf_top_k", *AGGREGATED}   # the selectors that read ReasonFlux-PRM
# the columns of a pool's scores (score_pool), one per record
POOL_COLUMNS = ("rf_step", "rf_total", "rf_worst", "rf_trajectory", *AGGREGATED)


# ----------------------------------------------------------------------------
# selection: exact top-K and the selectors


def need(n_have, k, what="pool"):
    """A set with fewer candidates than K is an error, never a silently smaller selection."""
    if k < 1:
        raise BadInput(f"K must be at least 1, got K={k}")
    if n_have < k:
        raise BadInput(f"cannot select K={k} records: the {what} has only {n_have} "
                       f"(lower --k or use a larger pool)")


def top_k(scores, k):
    """Indices of the k highest scores, best first; ties go to the lower index (exact and stable).

    >>> top_k([0.2, 0.9, 0.5, 0.9], 3)
    [1, 3, 2]
    """
    need(len(scores), k)
    bad = next((i for i, s in enumerate(scores) if s != s), None)
    if bad is not None:  # a NaN compares false with everything and would land anywhere
        raise ValueError(f"score of record {bad} is NaN")
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def prm_accepts(scores, with_trajectory):
    """Per record, does ReasonFlux-PRM accept it: every step scored >= ½ and, with_trajectory
    (α = 1), the trajectory scored >= ½ too (select explains the thresholds)."""
    return [w >= 0.5 and (t >= 0.5 or not with_trajectory)
            for w, t in zip(scores["rf_worst"], scores["rf_trajectory"])]


def accepted_k(accepted, ranking, k, seed):
    """K of the records the PRM accepts, drawn at random with `seed` (ours); when fewer than K are
    accepted, all of them and then the best of the rest by `ranking` (a score per record).

    The paper keeps the top-K by the PRM's total (selector rf_top_k, a row of the table). Why
    ours: among records the PRM judges right, a higher total is the PRM's confidence, not a better
    record. It is highest where the surprise term has the fewest tokens to doubt, so a top-K fills
    with small numbers. Drawn at random, the accepted records keep the pool's variety, as the
    outcome filter keeps it among right answers.

    >>> accepted_k([True, False, True, True], [0.9, 0.8, 0.1, 0.5], 2, seed=0) in ([0, 2], [0, 3], [2, 0], [2, 3], [3, 0], [3, 2])
    True
    >>> accepted_k([True, False, False, False], [0.9, 0.8, 0.1, 0.5], 2, seed=0)
    [0, 1]
    """
    need(len(accepted), k)
    yes = [i for i, ok in enumerate(accepted) if ok]
    if len(yes) >= k:
        return random.Random(seed).sample(yes, k)
    rest = [i for i in top_k(ranking, len(ranking)) if not accepted[i]]
    return yes + rest[:k - len(yes)]


def answer_right(record):
    """The outcome filter's test: does the response end with the right 'Answer: N' (answer key)?"""
    return task.verify("\n".join(record["response"]), record["answer"])


def check_never_trained_on(ckpt, path, data):
    """Refuse a student start whose recorded origin (the data files of every training run that
    led to it, sft.py) includes the selection pool: what a student knows of reasoning must come
    from the records it is given."""
    pool = file_digest(data)
    for step in ckpt.get("origin", []):
        if step["sha256"] == pool:
            raise ValueError(f"{path} was trained on {data} ({step['data']}): students must start from a "
                             f"model that has never seen the selection pool (sft.py --data=... on other records)")


def random_k(candidates, k, seed, what):
    """K of the candidate indices, drawn at random with `seed` (ValueError when too few)."""
    need(len(candidates), k, what)
    return random.Random(seed).sample(candidates, k)


def select(key, records, scores, k, seed, hidden_meta=None):
    """Pool indices of the K records that selector `key` keeps.

    records carry no `meta`; scores {"rf_total", "rf_step", "rf_worst", "rf_trajectory",
    "response_prm", "confidence", and each key of AGGREGATED: [float]}; only the oracle receives hidden_meta. Random selectors
    draw with `seed`, top-K selectors ignore it.

    ReasonFlux-PRM (ours, accepted_k): a record is accepted when the PRM scores every step of it
    at least ½, the midpoint between the label of a wrong step (0) and of a right one (¾ or more,
    rewards.gated_fusion), and, with α = 1 (rf_total), its trajectory at least ½, the label of a
    plan that helps the policy as much as no plan (rewards.relative_final); α = 0 (rf_step) reads
    the steps only. rf_top_k is the paper's top-K by the total; each key of AGGREGATED, the top-K
    by its aggregation of the same scores.
    """
    if key == "random":
        return random_k(list(range(len(records))), k, seed, "pool")
    if key == "outcome":
        right = [i for i, r in enumerate(records) if answer_right(r)]
        return random_k(right, k, seed, "set of records with a right final answer")
    if key in ("response_prm", "confidence", "rf_top_k", *AGGREGATED):
        return top_k(scores["rf_total" if key == "rf_top_k" else key], k)
    if key in ("rf_total", "rf_step"):
        return accepted_k(prm_accepts(scores, key == "rf_total"), scores[key], k, seed)
    if key == "oracle":
        clean = [i for i, m in enumerate(hidden_meta) if m["flaw"] == "clean"]
        return random_k(clean, k, seed, "set of clean records (hidden meta)")
    raise BadInput(f"unknown selector {key!r}; choose from {', '.join(SELECTORS)}")


# ----------------------------------------------------------------------------
# scoring the pool


def score_pool(prm, records, batch_size, name):
    """[(mean step score, total, worst step score, trajectory score, *aggregations)] of every record
    under a scorer (PRM.score), batched, with ETA: POOL_COLUMNS. The worst step is over thinking and
    response steps; the aggregations (AGGREGATED, rfprm.aggregate) come from the same scores.

    Records are scored in order of length (little padding per batch), in chunks for progress.
    """
    order = sorted(range(len(records)), key=lambda i: len(records[i]["thinking"]) + len(records[i]["response"]))
    out, t0, chunk = [None] * len(records), time.time(), 4096  # records per progress line
    for j in range(0, len(order), chunk):
        part = order[j:j + chunk]
        for i, s in zip(part, prm.score([records[i] for i in part], batch_size=batch_size)):
            out[i] = (prm_total(s, 0.0, prm.total), s["total"],
                      min(s["step"] + s["response"], default=1.0), s["trajectory"],
                      *(aggregate(s, how, prm.alpha if traj else 0.0) for how, traj in AGGREGATED.values()))
        done = min(len(order), j + chunk)
        print(f"scoring with {name}: {done:,}/{len(order):,} records | "
              f"eta {format_eta((time.time() - t0) / done * (len(order) - done))}")
    return out


def cached_scores(path, make_scorer, records, cfg, name):
    """score_pool, reused from the cache when the pool file and the checkpoint are unchanged."""
    # the column count is in the key: a cache written before a column existed is not read
    key = f"{file_digest(cfg.data)}-{file_digest(path)}-{name.split()[0].lower()}-{len(POOL_COLUMNS)}"
    cache = os.path.join(cfg.cache_dir or cfg.out_dir, f"pool-scores-{key}.pt")
    reused = load_cache(cache, f"scoring with {name}")
    if reused is not None:
        return [tuple(x) for x in reused.tolist()]
    out = score_pool(make_scorer(), records, cfg.score_batch_size, name)
    save_checkpoint(cache, torch.tensor(out, dtype=torch.float64))
    return out


# ----------------------------------------------------------------------------
# students under an identical token budget


def student_config(cfg, seed, max_steps, device):
    """The SFT config of a student: same init and optimiser for all; only seed and steps vary."""
    return sft.SFTConfig(init=cfg.init, tokenizer=cfg.tokenizer, max_steps=max_steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr,
                         warmup_steps=cfg.warmup_steps, template_frac=0.0, seed=seed,
                         eval_questions=0, log_every=10 ** 9, device=device)


def batch_tokens(records, tok, block_size, batch_size, seed):
    """The target tokens of each batch training.train will draw on `records`, step after step (a generator).

    training.train packs the records as below and draws the batch of step t from (seed, t) alone
    (training.batch_indices), so every step's tokens are known before training.
    """
    X, Y = training.pack(sft.build_examples(records, tok), block_size, tok.eot)
    n_targets = (Y != -1).sum(1)                                   # (N,) target tokens per example
    order = torch.argsort(training.target_lengths(Y), stable=True)     # as training.train orders them
    step = 0
    while True:
        yield int(n_targets[training.batch_indices(step, order, batch_size, seed)].sum())
        step += 1


def plan_steps(records, tok, block_size, budget, batch_size, seed):
    """(steps, target tokens) of the shortest run of training.train on `records` that sees >= budget tokens.

    Students on sets of different lengths then see the same budget within one batch.
    """
    steps, tokens = 0, 0
    for t in batch_tokens(records, tok, block_size, batch_size, seed):
        if tokens >= budget:
            break
        steps, tokens = steps + 1, tokens + t
    return steps, tokens


def evaluate_init(cfg, tok, questions, device):
    """Greedy accuracy of the checkpoint every student starts from: the reference line of the table."""
    model = model_from_checkpoint(load_checkpoint(cfg.init, kind="policy", enc=tok.enc), device)
    return accuracy(model, tok, questions)


def train_student(records, cfg, tok, block_size, seed, device, questions):
    """Train one student on `records` under the token budget, evaluate it on `questions` (greedy)."""
    steps, planned = plan_steps(records, tok, block_size, cfg.budget_tokens, cfg.batch_size, seed)
    t0 = time.time()
    model, info = sft.train_policy(records, student_config(cfg, seed, steps, device), device, log=lambda s: None)
    if info["tokens"] != planned:  # the budget is the point of the comparison: never let it drift
        raise RuntimeError(f"student saw {info['tokens']} target tokens, planned {planned}")
    train_s = time.time() - t0
    res = accuracy(model, tok, questions)
    return {"seed": seed, "acc": res["acc"], "by_ops": res["by_ops"], "tokens": info["tokens"],
            "steps": steps, "loss": info["loss"], "train_seconds": train_s,
            "seconds": time.time() - t0}


# ----------------------------------------------------------------------------
# report: composition, table, figure, checks


def composition(indices, hidden_meta, records):
    """What a selected set holds: the share of each flaw type and of good trajectories (hidden
    meta), of 3-operation questions, of answer 0, and the median size of the answers."""
    flaws = [hidden_meta[i]["flaw"] for i in indices]
    out = {f: flaws.count(f) / len(flaws) for f in task.FLAWS}
    out["good"] = sum(hidden_meta[i]["good"] for i in indices) / len(flaws)
    out["3 ops"] = sum(hidden_meta[i]["n_ops"] >= 3 for i in indices) / len(flaws)
    out["answer 0"] = sum(records[i]["answer"] == 0 for i in indices) / len(flaws)
    out["|answer|"] = statistics.median(abs(records[i]["answer"]) for i in indices)
    return out


def summarise(rows):
    """Per selector: accuracy mean ± std over seeds, by n_ops, tokens, mean composition."""
    out = {}
    for key, runs in rows.items():
        m, s = mean_std([r["acc"] for r in runs])
        ops = sorted({n for r in runs for n in r["by_ops"]})
        out[key] = {"name": SELECTORS[key], "upper_bound": key == "oracle",
                    "acc_mean": m, "acc_std": s, "accs": [r["acc"] for r in runs],
                    "by_ops_mean": {n: statistics.fmean(r["by_ops"][n] for r in runs) for n in ops},
                    "tokens": [r["tokens"] for r in runs], "steps": [r["steps"] for r in runs],
                    "composition": {f: statistics.fmean(r["composition"][f] for r in runs)
                                    for f in runs[0]["composition"]},
                    "runs": runs}
    return out


def format_tables(summary, cfg, n_pool, pool_comp, start):
    """The accuracy table (mean ± std over seeds, by n_ops, budget) and the composition table."""
    lines = []
    ops = sorted({n for s in summary.values() for n in s["by_ops_mean"]})
    lines.append(f"\noffline data selection: top K={cfg.k:,} of {n_pool:,} records; each student trained on "
          f"{cfg.budget_tokens:,} target tokens from {cfg.init}; greedy accuracy on "
          f"{cfg.eval_questions} held-out questions, mean ± std over {cfg.seeds} seeds")
    lines.append(f"{'selector':<30}{'accuracy':>15}" + "".join(f"{str(n) + ' ops':>9}" for n in ops) +
          f"{'tokens seen':>20}{'steps':>12}")
    lines.append(f"{'start: --init, no training':<30}{100 * start['acc']:>8.1f}{'':7}" +
          "".join(f"{100 * start['by_ops'].get(n, float('nan')):>9.1f}" for n in ops) + f"{0:>20}{0:>12}")
    for s in summary.values():
        tok = f"{min(s['tokens']):,}-{max(s['tokens']):,}"
        steps = f"{min(s['steps'])}-{max(s['steps'])}"
        lines.append(f"{s['name']:<30}{100 * s['acc_mean']:>8.1f} ± {100 * s['acc_std']:<4.1f}" +
              "".join(f"{100 * s['by_ops_mean'][n]:>9.1f}" for n in ops) + f"{tok:>20}{steps:>12}")
    lines.append("\ncomposition of the selected sets (% of records; flaw types read from the hidden meta, "
                 "for this table only; |answer|: median)")
    cols = list(pool_comp)
    lines.append(f"{'selector':<30}" + "".join(f"{task.SHORT_FLAW.get(c, c):>10}" for c in cols))
    for name, comp in [("pool", pool_comp)] + [(s["name"], s["composition"]) for s in summary.values()]:
        lines.append(f"{name:<30}" + "".join(f"{comp[c]:>10.1f}" if c == "|answer|" else f"{100 * comp[c]:>10.1f}"
                                             for c in cols))
    return "\n".join(lines)


def text_bars(summary, width=40):
    """Accuracy per selector as text bars, with ± std."""
    top = max(s["acc_mean"] + s["acc_std"] for s in summary.values()) or 1.0
    return "\n".join(f"{s['name']:<30}|{'#' * round(s['acc_mean'] / top * width):<{width}}| "
                     f"{100 * s['acc_mean']:.1f} ± {100 * s['acc_std']:.1f}" for s in summary.values())


def save_figure(summary, path):
    """Bar chart of accuracy (mean ± std over seeds) per selector; False without matplotlib."""
    plt = files.pyplot()
    if plt is None:
        return False
    names = [s["name"] for s in summary.values()]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["0.7" if s["upper_bound"] else "C0" for s in summary.values()]
    ax.bar(range(len(names)), [100 * s["acc_mean"] for s in summary.values()],
           yerr=[100 * s["acc_std"] for s in summary.values()], color=colors, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_title("students trained on each selector's top-K (grey: upper bound)", fontsize=9)
    return files.save_png(fig, path, dpi=120)


def checks(summary):
    """The claims of this stage, as means over seeds: ReasonFlux-PRM's students beat random by
    >= 5 points and are at or above the outcome filter, the response-only PRM and the confidence
    baseline; the clean oracle beats random by >= 8 points (the data's quality must matter)."""
    out = {}
    if HEADLINE not in summary:
        return out
    rf = summary[HEADLINE]
    for key, margin in (("random", 0.05), ("outcome", 0.0), ("response_prm", 0.0), ("confidence", 0.0)):
        if key in summary:
            d = rf["acc_mean"] - summary[key]["acc_mean"]
            out[f"rf_above_{key}" + ("_by_5_points" if margin else "")] = d >= margin
            print(f"ReasonFlux-PRM minus {summary[key]['name']}: {100 * d:+.1f} points "
                  f"(std {100 * rf['acc_std']:.1f} and {100 * summary[key]['acc_std']:.1f})")
    print("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------


def chosen_selectors(cfg):
    """The selectors named by --selectors, each one known."""
    keys = [k.strip() for k in cfg.selectors.split(",") if k.strip()]
    if not keys:
        raise BadInput(f"--selectors names no selector; choose from {', '.join(SELECTORS)}")
    for key in keys:
        if key not in SELECTORS:
            raise BadInput(f"unknown selector {key!r}; choose from {', '.join(SELECTORS)}")
    return keys


def check_scorers(cfg, keys):
    """The checkpoints the selectors score with exist and are what they should be: fail now, not
    after minutes of work."""
    needed = {"prm": (PRM_SELECTORS, "prm"), "prm_response": ({"response_prm"}, "prm"),
              "policy": ({"confidence"}, "policy")}
    for opt, (users, kind) in needed.items():
        path = getattr(cfg, opt)
        if users & set(keys):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no checkpoint at {path!r}: train it first (run.sh), or point --{opt} at it")
            load_prm(path, "cpu") if kind == "prm" else load_checkpoint(path, kind=kind)  # and one that is no PRM


def pool_scores(keys, records, cfg, device):
    """{column: a score per record} of the scorers the selectors read (cached_scores)."""
    scores = {}
    if PRM_SELECTORS & set(keys):
        rf = cached_scores(cfg.prm, lambda: load_prm(cfg.prm, device), records, cfg, "ReasonFlux-PRM")
        for j, name in enumerate(POOL_COLUMNS):
            scores[name] = [x[j] for x in rf]
    if "response_prm" in keys:
        scores["response_prm"] = [x[1] for x in cached_scores(cfg.prm_response, lambda: load_prm(cfg.prm_response, device),
                                                              records, cfg, "response-only PRM")]
    if "confidence" in keys:
        scorer = lambda: untrained_scorer(cfg.policy, cfg.tokenizer, "confidence", device)
        scores["confidence"] = [x[1] for x in cached_scores(cfg.policy, scorer, records, cfg, "confidence (policy)")]
    return scores


def train_students(keys, seeds, records, scores, hidden_meta, cfg, tok, block_size, device, questions):
    """{selector: one run per seed}: every selector's set, and a student trained on each set
    (train_student), with what it selected and the set's composition."""
    # every student of a seed is one job; seed by seed, so that an interrupted run has whole rows
    chosen = [(key, seed, select(key, records, scores, cfg.k, seed, hidden_meta if key == "oracle" else None))
              for seed in seeds for key in keys]
    # a student is a function of its records and its seed: selectors that keep the same set share one
    unique = list(dict.fromkeys((seed, tuple(idx)) for _, seed, idx in chosen))
    jobs = [([records[i] for i in idx], cfg, tok, block_size, seed, device, questions) for seed, idx in unique]
    trained, t_train = {}, time.time()
    for n_done, (job, run) in enumerate(zip(unique, map_in_processes(train_student, jobs, cfg.workers)), 1):
        trained[job] = run
        names = " = ".join(SELECTORS[key] for key, seed, idx in chosen if (seed, tuple(idx)) == job)
        eta = (time.time() - t_train) / n_done * (len(unique) - n_done)
        print(f"student {n_done:2d}/{len(unique)} | {names:<28} seed {job[0]} | {run['steps']} steps, "
              f"{run['tokens']:,} tokens, loss {run['loss']:.3f} | acc {100 * run['acc']:5.1f}% | "
              f"{run['seconds']:.0f}s | eta {format_eta(eta)}")
    rows = {k: [] for k in keys}
    for key, seed, idx in chosen:   # selected: pool indices, best first for the top-K selectors
        rows[key].append({**trained[(seed, tuple(idx))], "composition": composition(idx, hidden_meta, records),
                          "selected": idx})
    tokens = [r["tokens"] for runs in rows.values() for r in runs]
    print(f"token budget: every student saw {min(tokens):,}-{max(tokens):,} target tokens "
          f"(budget {cfg.budget_tokens:,}: each trains the fewest steps that reach it)")
    return rows


def show_figure(summary, out_dir):
    """The accuracy bars as a figure, or as text when matplotlib is not installed."""
    png = os.path.join(out_dir, "select.png")
    if save_figure(summary, png):
        print(f"figure: {png}")
    else:
        print(f"\n{text_bars(summary)}")


def main(argv=None):
    cfg = parse_config(SelectConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST)
    check_writable(cfg.out_dir, cfg.cache_dir)
    print_config(cfg)
    keys = chosen_selectors(cfg)
    t0 = time.time()
    pool = read_jsonl(cfg.data, ("question", "answer", "thinking", "response", "meta"))
    need(len(pool), cfg.k)  # before any scoring or training
    check_scorers(cfg, keys)
    device = pick_device(cfg.device)
    tok = Tokenizer(load_tokenizer(cfg.tokenizer))
    start_ckpt = load_checkpoint(cfg.init, kind="policy", enc=tok.enc)
    check_never_trained_on(start_ckpt, cfg.init, cfg.data)
    block_size = start_ckpt["model_args"]["block_size"]
    pool = records_that_fit(pool, tok, block_size, what="pool records")   # the PRM reads the policy's context
    need(len(pool), cfg.k)
    hidden_meta = [r["meta"] for r in pool]
    records = [{k: v for k, v in r.items() if k != "meta"} for r in pool]  # what selectors see
    questions = read_jsonl(cfg.test, ("question", "answer", "n_ops"))[:cfg.eval_questions]
    lock_out_dir(cfg.out_dir)
    scores = pool_scores(keys, records, cfg, device)
    t_score = time.time() - t0
    if "rf_worst" in scores:
        print(f"ReasonFlux-PRM accepts {sum(prm_accepts(scores, False)):,} of {len(records):,} records "
              f"(every step >= 1/2), {sum(prm_accepts(scores, True)):,} with the trajectory >= 1/2 too")
    start = evaluate_init(cfg, tok, questions, device)
    print(format_accuracy("start (no training)", start))
    seeds, t_train = [cfg.seed + r for r in range(cfg.seeds)], time.time()
    summary = summarise(train_students(keys, seeds, records, scores, hidden_meta, cfg, tok, block_size, device, questions))
    pool_comp = composition(range(len(pool)), hidden_meta, records)
    print(format_tables(summary, cfg, len(pool), pool_comp, start))
    verdict = checks(summary)
    show_figure(summary, cfg.out_dir)
    seconds = {"scoring": t_score, "students": time.time() - t_train, "total": time.time() - t0}
    results = {"summary": summary, "start": start, "checks": verdict, "k": cfg.k, "pool_size": len(pool),
               "pool_composition": pool_comp, "seeds": seeds, "seconds": seconds,
               "config": asdict(cfg)}
    write_json_atomic(os.path.join(cfg.out_dir, "results.json"), results)
    print(f"results: {cfg.out_dir}/results.json (scoring {t_score:.0f}s, total {seconds['total']:.0f}s)")
    return results


if __name__ == "__main__":
    run_main(main)
