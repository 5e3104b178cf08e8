"""
Gather every stage's results table into out/results.md (run.sh calls it last).

    python report.py                 # reads out/*/results.json, out/logs/times.txt
    python report.py --out=out       # another output root

Each table is formatted by the same function that printed it during the run, from the
results file the stage wrote, so the report and the console agree by construction.
A stage that has not run yet is listed as missing, not guessed.
"""

import json
import os
import sys

import grpo
import select_data
import sft
import train_prm
import tts
from training import run_main


def stage_times(root):
    """{stage: seconds} from out/logs/times.txt (written by run.sh)."""
    path = os.path.join(root, "logs", "times.txt")
    if not os.path.exists(path):
        return {}
    return {name: int(sec) for name, sec in (line.split() for line in open(path) if line.strip())}


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def section(root, title, command, table, figure=None, note=""):
    """One markdown section: the command, the table as printed, the figure when there is one.

    figure is a path under the output root, where results.md is written."""
    out = [f"## {title}", "", f"`{command}`", ""]
    out += ["```", table.strip("\n"), "```", ""] if table else ["(not run yet)", ""]
    if note:
        out += [note, ""]
    if figure and os.path.exists(os.path.join(root, figure)):
        out += [f"![{title}]({figure})", ""]
    return out


def sections(root):
    """The report's sections, stage by stage, in run.sh order."""
    p = lambda *parts: os.path.join(root, *parts)
    out = []

    runs = [d for d in (p("sft_clean"), p("policy")) if os.path.exists(os.path.join(d, "eval.json"))]
    out += section(root, "SFT: the policy", "python sft.py --init=out/base/ckpt.pt --subset=all --out_dir=out/policy",
                   sft.format_comparison(runs) if runs else "")

    pb = load(p("prm", "processbench.json"))
    note = ""
    if pb:
        note = (f"{pb['n_eval']} held-out records; seconds per PRM: "
                + ", ".join(f"{k} {v:.0f}" for k, v in pb["seconds"].items()))
    out += section(root, "Synthetic ProcessBench (train_prm.py)", "python train_prm.py --eval",
                   train_prm.format_table(pb["rows"]) if pb else "", "prm/score_histograms.png", note)

    sel = load(p("select", "results.json"))
    if sel:
        cfg = select_data.SelectConfig(**sel["config"])
        table = select_data.format_tables(sel["summary"], cfg, sel["pool_size"], sel["pool_composition"], sel["start"])
    out += section(root, "Offline data selection (select_data.py)", "python select_data.py",
                   table if sel else "", "select/select.png",
                   f"seeds {sel['seeds']}; {sel['seconds']['total']:.0f}s" if sel else "")

    rl = load(p("grpo", "results.json"))
    out += section(root, "GRPO (grpo.py)", "python grpo.py --variants=rule,mix --seeds=3",
                   grpo.format_table(rl["summary"], rl["runs"][0]["final"]["n"]) if rl and "summary" in rl else "",
                   "grpo/grpo.png")

    bon = load(p("tts", "results.json"))
    if bon:
        ns = [r["n"] for r in next(iter(bon["curves"].values()))]
    out += section(root, "Best-of-N (tts.py)", "python tts.py",
                   tts.format_table(bon["curves"], ns) if bon else "", "tts/tts.png",
                   f"{bon['n_questions']} questions x {bon['n_samples']} samples" if bon else "")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "out")
    times = stage_times(root)
    lines = ["# rfprm results", "", "Every table below is what the stage printed in this run (`bash run.sh`).", ""]
    if times:
        lines += ["Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in times.items()) +
                  f"; total {sum(times.values()) / 60:.1f} min.", ""]
    lines += sections(root)
    path = os.path.join(root, "results.md")
    os.makedirs(root, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
