"""
processbench: how well a scorer finds the first wrong step: a synthetic ProcessBench (the hidden
`meta` of the records is read here, and only here), ProcessBench's own file format and metric, and
the tables and pictures train_prm.py --eval prints.

* `evaluate_scorer`: one row of the table: step AUROC (every thinking step, and computation lines
  alone), first-error F1 (ProcessBench's metric, `processbench_metric`), trajectory AUROC, the
  mean total per flaw type;
* ProcessBench's files (QwenLM/ProcessBench): `to_processbench` writes ours (data/arith/prepare.py),
  `score_processbench` scores any (python train_prm.py --processbench=FILE,...);
* `print_tables`: the table of each set, the per-flaw table, the score histograms; processbench.json.
"""

import json
import os
from dataclasses import asdict

import torch

import files
import task
from files import BadInput, read_jsonl, write_json_atomic
from training import pick_device
from rfprm import load_prm


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


GENERATORS = {"train": "teacher, training voice", "dev": "teacher, development voice", "heldout": "teacher, held-out voice"}   # by meta["voice"]


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
    label (0) and a right one's (¾ or more, rewards.gated_fusion)."""
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


# ----------------------------------------------------------------------------
# the tables and pictures of train_prm.py --eval


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
    plt = files.pyplot()
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
    return files.save_png(fig, path, dpi=100)


def trajectory_totals(scores, records):
    """Totals of good and of flawed trajectories."""
    return ([s["total"] for s, r in zip(scores, records) if r["meta"]["good"]],
            [s["total"] for s, r in zip(scores, records) if not r["meta"]["good"]])


EVAL_SETS = (("records' voice", "eval_data"), ("development voice", "eval_dev"),
             ("development, one longer", "eval_dev_longer"), ("held-out voice", "eval_heldout"),
             ("one operation longer", "eval_longer"))


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
