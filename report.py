"""
Gather every stage's results table into out/results.md (run.sh calls it last).

    python report.py                          # reads out/*/results.json and the like, out/logs/times.txt
    python report.py --out_dir=out            # another output root
    python report.py --seeds=1337,1338,1339   # the trends over pipeline seeds (robust.sh): out/trends.md

Each table is formatted by the same function that printed it during the run, from the
results file the stage wrote, so the report and the console agree by construction.
A stage that has not run yet is listed as missing, not guessed.

The trends table reads one headline difference per trend and pipeline seed (seed 1337's outputs
in out/, seed n's in out/seed<n>/out, as run.sh writes them), then its mean ± std over the seeds:
  T0  ReasonFlux-PRM's ProcessBench figures on each evaluation set, and its smallest lead over the
      response-only PRM and the confidence baseline
  T1  selection: ReasonFlux-PRM − random, and − the best of the outcome filter, response-only PRM, confidence
  T2  GRPO: rule − start, and (rule + PRM) − rule, each a mean over that seed's GRPO seeds
  T3  Best-of-N: the paired difference ReasonFlux-PRM − mean log-likelihood (± its standard error)
      and ReasonFlux-PRM − majority vote at N = 8, 16, 32
"""

import json
import os
import sys
from dataclasses import dataclass

import grpo
import processbench
import select_data
import sft
import tts
from files import write_text_atomic, BadInput
from options import run_main, parse_config
from evaluate import mean_std


def sft_table(res, path):
    return sft.format_comparison([os.path.dirname(path)]), ""


def prm_table(pb, path):
    note = f"{pb['n_eval']} held-out records; seconds per PRM: " + ", ".join(f"{k} {v:.0f}" for k, v in pb["seconds"].items())
    tables = [processbench.format_table(pb["rows"], "records' voice")]
    tables += [processbench.format_table(rows, name) for name, rows in pb.get("shifted", {}).items()]
    return "\n".join(tables), note


def select_table(sel, path):
    cfg = select_data.SelectConfig(**sel["config"])
    table = select_data.format_tables(sel["summary"], cfg, sel["pool_size"], sel["pool_composition"], sel["start"])
    return table, f"seeds {sel['seeds']}; {sel['seconds']['total']:.0f}s"


def grpo_table(rl, path):
    runs = rl.get("runs", [rl])   # a comparison (--variants/--seeds), or a single run
    summary = rl.get("summary") or grpo.summarise(runs)
    return grpo.format_table(summary, runs[0]["final"]["n"]), ""


def tts_table(bon, path):
    ns = [r["n"] for r in next(iter(bon["curves"].values()))]
    return tts.format_table(bon["curves"], ns), f"{bon['n_questions']} questions x {bon['n_samples']} samples"


# run.sh's stages in order: (name, title, command, what it writes under the output root, its table, figure).
# prepare writes the data set outside the output root: times.txt alone says it ran.
STAGES = [
    ("prepare", "Data", "python data/arith/prepare.py", None, None, None),
    ("base", "Base model", "python sft.py --pretrain --out_dir=out/base", "base/ckpt.pt", None, None),
    ("policy", "SFT: the policy", "python sft.py --init=out/base/ckpt.pt --out_dir=out/policy "
     "--snapshot_step=2000 --snapshot_dir=out/start", "policy/eval.json", sft_table, None),
    ("prm", "Synthetic ProcessBench (train_prm.py)", "python train_prm.py --eval --rows=main,response,outcome,confidence", "prm/processbench.json",
     prm_table, "prm/score_histograms.png"),
    ("select", "Offline data selection (select_data.py)", "python select_data.py", "select/results.json",
     select_table, "select/select.png"),
    ("grpo", "GRPO (grpo.py)", "python grpo.py --variants=rule,mix --seeds=6", "grpo/results.json",
     grpo_table, "grpo/grpo.png"),
    ("tts", "Best-of-N (tts.py)", "python tts.py", "tts/results.json", tts_table, "tts/tts.png"),
]


def stage_times(root):
    """{stage: seconds} from out/logs/times.txt (written by run.sh)."""
    path = os.path.join(root, "logs", "times.txt")
    if not os.path.exists(path):
        return {}
    return {name: int(sec) for name, sec in (line.split() for line in open(path) if line.strip())}


def read_results(path):
    """A stage's results file: its contents, or (None, why) when it is missing or damaged."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        with open(path) as f:
            return json.load(f), ""
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"damaged ({type(e).__name__}: {e})"


def report(root):
    """The lines of results.md: every stage's status and time, then each table stage's section."""
    times = stage_times(root)
    ran = {name: os.path.exists(os.path.join(root, out)) if out else name in times for name, _, _, out, _, _ in STAGES}
    lines = ["# rfprm results", "", "Every table below is what the stage printed in this run (`bash run.sh`).", "",
             "| stage | status | wall time (s) |", "|---|---|---|"]
    lines += [f"| {name} | {'done' if ran[name] else 'missing'} | {times.get(name, '')} |" for name, *_ in STAGES]
    if times:
        lines += ["", f"Total wall time: {sum(times.values()) / 60:.1f} min."]
    lines.append("")
    for name, title, command, out, table_of, figure in STAGES:
        if table_of is None:
            continue
        lines += [f"## {title}", "", f"`{command}`", ""]
        path = os.path.join(root, out)
        res, why = read_results(path)
        if res is None:
            lines += [f"(missing: stage `{name}` has not written {out} yet)" if why == "missing" else f"({path}: {why})", ""]
            continue
        try:
            table, note = table_of(res, path)
        except (KeyError, TypeError, ValueError, IndexError) as e:   # a results file of another shape
            lines += [f"({path}: not the results of stage `{name}`: {type(e).__name__}: {e})", ""]
            continue
        lines += ["```", table.strip("\n"), "```", ""] + ([note, ""] if note else [])
        if figure and os.path.exists(os.path.join(root, figure)):
            lines += [f"![{title}]({figure})", ""]
    return lines


# ----------------------------------------------------------------------------
# the trends over pipeline seeds

T3_NS = (8, 16, 32)


def seed_root(out_dir, seed):
    """Where run.sh put a pipeline seed's outputs: seed 1337 in out/, seed n in out/seed<n>/out."""
    return out_dir if seed == 1337 else os.path.join(out_dir, f"seed{seed}", "out")


def prm_figures(pb):
    """T0 rows: ReasonFlux-PRM's four figures on each set, and its smallest lead over the baselines."""
    out = {}
    sets = {"records' voice": pb["rows"], **pb.get("shifted", {})}
    for name, rows in sets.items():
        rows = {k.strip(): v for k, v in rows.items()}
        rf = rows["ReasonFlux-PRM"]
        rivals = [rows[k] for k in ("response-only PRM (MC)", "confidence (untrained)") if k in rows]
        for key, label in (("computation_auroc", "comp."), ("step_auroc", "step"), ("first_error_f1", "F1"),
                           ("trajectory_auroc", "traj")):
            out[f"T0 {name}: {label}"] = rf[key]
        if rivals:
            out[f"T0 {name}: least lead over baselines"] = min(rf[k] - max(r[k] for r in rivals) for k in
                                                               ("computation_auroc", "step_auroc", "first_error_f1",
                                                                "trajectory_auroc"))
    return out


def select_figures(sel):
    """T1 rows, in points: ReasonFlux-PRM minus random, and minus the best other scorer."""
    s = {k: 100 * v["acc_mean"] for k, v in sel["summary"].items()}
    rivals = [s[k] for k in ("outcome", "response_prm", "confidence") if k in s]
    out = {"T1 ReasonFlux-PRM − random": s[select_data.HEADLINE] - s["random"]}
    if rivals:
        out["T1 ReasonFlux-PRM − best other scorer"] = s[select_data.HEADLINE] - max(rivals)
    return out


def grpo_figures(rl):
    """T2 rows, in points, each the mean over the pipeline seed's GRPO seeds."""
    summary = rl.get("summary") or grpo.summarise(rl.get("runs", [rl]))
    out = {}
    if "rule" in summary:
        rule = summary["rule"]
        out["T2 rule − start"] = 100 * (rule["final"][0] - rule["start"])
        mix = next((k for k in summary if k.startswith("mix")), None)
        if mix:
            out[f"T2 (rule + PRM) − rule [{mix}]"] = 100 * (summary[mix]["final"][0] - rule["final"][0])
    return out


def tts_figures(bon):
    """T3 rows, in points: paired ReasonFlux-PRM − mean log-likelihood (with its standard error) and
    − majority vote at each N of T3_NS, the PRM-weighted vote − likelihood (unpaired, an extra row), and
    ReasonFlux-PRM's largest fall from N to 2N, in standard errors."""
    out = {}
    paired = bon.get("paired", {})
    for n in T3_NS:
        for rival, short in ((tts.LIKELIHOOD, "likelihood"), ("majority vote", "majority")):
            d = paired.get(rival, {}).get(str(n))
            if d is not None:
                out[f"T3 N={n}: PRM − {short}"] = (100 * d[0], 100 * d[1])
    acc = {name: {p["n"]: p["acc"] for p in curve} for name, curve in bon["curves"].items()}
    for n in T3_NS:   # an extra row, never the headline: the PRM's totals as votes
        if n in acc.get("PRM-weighted vote", {}) and n in acc.get(tts.LIKELIHOOD, {}):
            out[f"T3 N={n}: PRM-weighted vote − likelihood"] = 100 * (acc["PRM-weighted vote"][n] - acc[tts.LIKELIHOOD][n])
    curve = bon["curves"].get(tts.WEIGHTS, [])
    falls = [(a["acc"] - b["acc"]) / max(a["se"], 1e-9) for a, b in zip(curve, curve[1:]) if b["n"] == 2 * a["n"]]
    if falls:
        out["T3 largest fall N → 2N (in s.e.)"] = max(falls)
    return out


def headline_figures(root):
    """{row: figure} of one pipeline seed's outputs; a stage that has not run gives no rows."""
    figures = {}
    for rel, of in (("policy/eval.json", lambda r: {"policy greedy accuracy (%)": 100 * r["greedy"]["acc"]}),
                    ("prm/processbench.json", prm_figures), ("select/results.json", select_figures),
                    ("grpo/results.json", grpo_figures), ("grpo_records/results.json",
                                                          lambda r: {k + " (the records' questions)": v
                                                                     for k, v in grpo_figures(r).items()}),
                    ("tts/results.json", tts_figures)):
        res, _ = read_results(os.path.join(root, rel))
        if res is not None:
            figures.update(of(res))
    times = stage_times(root)
    if times:
        figures["run.sh wall time (min)"] = sum(times.values()) / 60
    return figures


def format_trends(per_seed):
    """The trends table: one row per figure, its value on each seed, mean ± std over the seeds.
    T0's figures are AUROCs and F1s (3 decimals); every other figure is in points or minutes."""
    seeds = list(per_seed)
    rows = list(dict.fromkeys(k for f in per_seed.values() for k in f))
    lines = ["| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for row in rows:
        digits = 3 if row.startswith("T0") else 1
        fmt = lambda x: f"{x:.{digits}f}"
        vals = [per_seed[s].get(row) for s in seeds]
        cells = ["—" if v is None else f"{v[0]:+.1f} (se {v[1]:.1f})" if isinstance(v, (tuple, list)) else fmt(v)
                 for v in vals]
        got = [v[0] if isinstance(v, (tuple, list)) else v for v in vals if v is not None]
        mean, std = mean_std(got)
        spread = fmt(std) if len(got) > 1 else "—"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {fmt(mean)} ± {spread} |")
    return "\n".join(lines)


@dataclass
class ReportConfig:
    out_dir: str = "out"   # the output root run.sh wrote (seed 1337's; seed n's below it, in seed<n>/out)
    seeds: str = ""        # "1337,1338,1339": the trends over these pipeline seeds, into out_dir/trends.md


def main(argv=None):
    cfg = parse_config(ReportConfig, argv, doc=__doc__)
    if not cfg.out_dir:
        raise BadInput("--out_dir is empty; give the output root run.sh wrote, such as out")
    if cfg.seeds:
        try:
            seeds = [int(s) for s in cfg.seeds.split(",")]
        except ValueError:
            raise BadInput(f"--seeds={cfg.seeds} is not a comma-separated list of integers")
        per_seed = {s: headline_figures(seed_root(cfg.out_dir, s)) for s in seeds}
        missing = [s for s, f in per_seed.items() if not f]
        if len(missing) == len(seeds):
            raise BadInput(f"no results under {cfg.out_dir} for seeds {cfg.seeds} (run SEED=n bash run.sh first)")
        table = format_trends(per_seed)
        print(table)
        path = os.path.join(cfg.out_dir, "trends.md")
        write_text_atomic(path, f"# rfprm trends over pipeline seeds {cfg.seeds}\n\n`python report.py --seeds={cfg.seeds}`"
                           f"\n\n{table}\n")
    else:
        path = os.path.join(cfg.out_dir, "results.md")
        write_text_atomic(path, "\n".join(report(cfg.out_dir)) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_main(main)
