"""report.py: a fake out/ tree with results in the shapes the stages write (built with the
stages' own summary functions where they have one) becomes out/results.md."""

import json
import os
import random
import re
from dataclasses import asdict

import torch

import grpo
import processbench
import report
import select_data
import sft
import task
import tts
from conftest import ROOT


def write(root, rel, obj):
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    with open(os.path.join(root, rel), "w") as f:
        json.dump(obj, f)


def sft_eval(acc):
    res = {"acc": acc, "by_ops": {"1": acc, "2": acc / 2}, "n": 40}
    return {"greedy": res, "sampled": res, "train_seconds": 12.0, "subset": "all", "tokens": 1000, "config": {}}


def prm_results():
    row = {"step_auroc": 0.91, "computation_auroc": 0.88, "first_error_f1": 0.7, "trajectory_auroc": 0.83,
           "per_flaw": {"clean": 0.9, "slip": 0.2}}
    return {"rows": {"ReasonFlux-PRM": row, "  outcome scorer": dict(row, step_auroc=0.6)},
            "seconds": {"ReasonFlux-PRM": 30.0, "outcome scorer": 20.0}, "config": {}, "n_eval": 80}


def grpo_results():
    runs = [{"variant": v, "seed": s, "start": {"acc": 0.5, "by_ops": {}, "n": 20},
             "final": {"acc": a, "by_ops": {}, "n": 20}, "seconds": 60.0, "config": {}}
            for v, s, a in (("rule", 1, 0.55), ("rule", 2, 0.6), ("mix β=0.25", 1, 0.65), ("mix β=0.25", 2, 0.7))]
    return {"summary": grpo.summarise(runs), "runs": runs, "config": {}}


def tts_results():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(6, 4, generator=g) > 0.5
    answers = [[int(c) for c in row] for row in correct]
    scores = {"ReasonFlux-PRM": torch.rand(6, 4, generator=g)}
    curves, _ = tts.best_of_n_curves(correct, tts.answer_classes(answers), scores, [1, 2, 4], 20,
                                     torch.Generator().manual_seed(1))
    return {"curves": curves, "checks": {}, "n_questions": 6, "n_samples": 4}


def select_results():
    rng = random.Random(0)
    pool = [task.make_record(rng, task.WorldConfig(), i) for i in range(30)]
    meta = [r["meta"] for r in pool]
    rows = {key: [{"seed": seed, "acc": acc, "by_ops": {2: acc, 3: acc / 2}, "tokens": 2000 + seed, "steps": 5,
                   "composition": select_data.composition(range(k, k + 8), meta, pool)} for seed in (1, 2)]
            for key, acc, k in (("random", 0.4, 0), ("rf_total", 0.5, 10))}
    start = {"acc": 0.3, "by_ops": {2: 0.3, 3: 0.1}, "n": 16}
    return {"summary": select_data.summarise(rows), "start": start, "checks": {}, "k": 8, "pool_size": len(pool),
            "pool_composition": select_data.composition(range(len(pool)), meta, pool), "seeds": [1, 2],
            "seconds": {"total": 42.0}, "config": asdict(select_data.SelectConfig(k=8, seeds=2))}


def test_report_lists_every_run_sh_stage_in_order():
    stages = re.findall(r"^stage (\w+)", open(os.path.join(ROOT, "run.sh")).read(), re.M)
    assert stages == [name for name, *_ in report.STAGES]


def test_report_has_each_present_stage_and_lists_missing_ones(tmp_path):
    root = str(tmp_path / "out")
    write(root, "policy/eval.json", sft_eval(0.58))
    write(root, "prm/processbench.json", prm_results())
    write(root, "grpo/results.json", grpo_results())
    write(root, "tts/results.json", tts_results())
    open(os.path.join(root, "tts", "tts.png"), "wb").close()
    os.makedirs(os.path.join(root, "base"))
    open(os.path.join(root, "base", "ckpt.pt"), "wb").close()
    os.makedirs(os.path.join(root, "logs"))
    with open(os.path.join(root, "logs", "times.txt"), "w") as f:
        f.write("prepare 12\nbase 300\npolicy 250\nprm 400\ngrpo 900\ntts 60\n")

    assert report.main([f"--out_dir={root}"]) == os.path.join(root, "results.md")
    md = open(os.path.join(root, "results.md")).read()
    # each present stage: its table, as the stage's own format function prints it from the same file
    load = lambda rel: json.load(open(os.path.join(root, rel)))
    tables = [sft.format_comparison([os.path.join(root, "policy")]),
              processbench.format_table(load("prm/processbench.json")["rows"], "records' voice"),
              grpo.format_table(load("grpo/results.json")["summary"], 20),
              tts.format_table(load("tts/results.json")["curves"], [1, 2, 4])]
    for table in tables:
        assert table.strip("\n") in md
    assert "policy (all)" in md and "mix β=0.25" in md and "ReasonFlux-PRM" in md
    assert "80 held-out records" in md and "6 questions x 4 samples" in md and "![Best-of-N (tts.py)](tts/tts.png)" in md
    # the stage times, and the stages that have not run listed as missing
    for line in ("| prepare | done | 12 |", "| base | done | 300 |", "| policy | done | 250 |", "| prm | done | 400 |",
                 "| grpo | done | 900 |", "| tts | done | 60 |", "| select | missing |  |"):
        assert line in md, line
    assert "Total wall time: 32.0 min." in md
    assert "(missing: stage `select` has not written select/results.json yet)" in md


def test_report_of_a_lone_stage_and_a_single_grpo_run(tmp_path):
    root = str(tmp_path)
    sel = select_results()
    write(root, "select/results.json", sel)
    single = grpo_results()["runs"][0]   # grpo.py without --variants/--seeds: one run's results
    write(root, "grpo/results.json", single)
    report.main([f"--out_dir={root}"])
    md = open(os.path.join(root, "results.md")).read()
    sel = json.load(open(os.path.join(root, "select", "results.json")))
    table = select_data.format_tables(sel["summary"], select_data.SelectConfig(**sel["config"]), sel["pool_size"],
                                      sel["pool_composition"], sel["start"])
    assert table.strip("\n") in md and "seeds [1, 2]; 42s" in md
    assert grpo.format_table(grpo.summarise([single]), 20).strip("\n") in md
    assert "Total wall time" not in md   # no times.txt: nothing to sum
    for name in ("prepare", "base", "policy", "prm", "tts"):
        assert f"| {name} | missing |  |" in md, name
    assert "| select | done |  |" in md and "| grpo | done |  |" in md


def test_a_damaged_results_file_is_one_line_of_the_report(tmp_path):
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "tts"))
    with open(os.path.join(root, "tts", "results.json"), "w") as f:
        f.write('{"curves": {')   # cut by a kill
    report.main([f"--out_dir={root}"])
    md = open(os.path.join(root, "results.md")).read()
    assert f"({os.path.join(root, 'tts', 'results.json')}: damaged (JSONDecodeError" in md
    assert not [f for f in os.listdir(root) if ".tmp" in f]


def test_trends_over_pipeline_seeds(tmp_path):
    """--seeds reads seed 1337 in out/ and seed n in out/seed<n>/out, one row per headline figure."""
    root = str(tmp_path)
    for seed, acc in ((1337, 0.5), (1338, 0.7)):
        at = report.seed_root(root, seed)
        write(at, "policy/eval.json", sft_eval(acc))
        pb = prm_results()
        pb["rows"]["response-only PRM (MC)"] = dict(pb["rows"]["ReasonFlux-PRM"], computation_auroc=0.5)
        write(at, "prm/processbench.json", pb)
        write(at, "grpo/results.json", grpo_results())
        bon = tts_results()
        bon["paired"] = {tts.LIKELIHOOD: {"8": [0.02, 0.01]}, "majority vote": {"8": [0.05, 0.01]}}
        bon["curves"].update({"PRM-weighted vote": [{"n": 8, "acc": 0.625, "se": 0.01}],
                              tts.LIKELIHOOD: [{"n": 8, "acc": 0.5, "se": 0.01}]})
        write(at, "tts/results.json", bon)
    report.main([f"--out_dir={root}", "--seeds=1337,1338"])
    md = open(os.path.join(root, "trends.md")).read()
    assert "| policy greedy accuracy (%) | 50.0 | 70.0 | 60.0 ± 14.1 |" in md
    # rule 57.5 from a start of 50; mix 67.5: rule + PRM − rule = +10 points on both seeds
    assert "| T2 rule − start | 7.5 | 7.5 | 7.5 ± 0.0 |" in md
    assert "| T2 (rule + PRM) − rule [mix β=0.25] | 10.0 | 10.0 | 10.0 ± 0.0 |" in md
    assert "| T3 N=8: PRM − likelihood | +2.0 (se 1.0) | +2.0 (se 1.0) |" in md
    assert "| T3 N=8: PRM-weighted vote − likelihood | 12.5 | 12.5 |" in md
    assert "| T0 records' voice: least lead over baselines | 0.000 | 0.000 |" in md   # only comp. differs
