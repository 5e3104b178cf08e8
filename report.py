"""
Gather every stage's results table into out/results.md (run.sh calls it last).

    python report.py                 # reads out/*/results.json and the like, out/logs/times.txt
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


def sft_table(res, path):
    return sft.format_comparison([os.path.dirname(path)]), ""


def prm_table(pb, path):
    note = f"{pb['n_eval']} held-out records; seconds per PRM: " + ", ".join(f"{k} {v:.0f}" for k, v in pb["seconds"].items())
    tables = [train_prm.format_table(pb["rows"], "records' voice")]
    tables += [train_prm.format_table(rows, name) for name, rows in pb.get("shifted", {}).items()]
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
        if not ran[name]:
            lines += [f"(missing: stage `{name}` has not written {out} yet)", ""]
            continue
        path = os.path.join(root, out)
        table, note = table_of(json.load(open(path)), path)
        lines += ["```", table.strip("\n"), "```", ""] + ([note, ""] if note else [])
        if figure and os.path.exists(os.path.join(root, figure)):
            lines += [f"![{title}]({figure})", ""]
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "out")
    path = os.path.join(root, "results.md")
    os.makedirs(root, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(report(root)) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_main(main)
