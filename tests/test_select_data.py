"""Offline data selection: exact and stable top-K, clear errors, identical token budgets, the script."""

import itertools
import json
import random

import pytest
import torch

from conftest import run_script, data_args
from files import read_jsonl
from tokenizer import Tokenizer, load_tokenizer
import select_data


def reference_top_k(scores, k):
    """Top-K the slow way: walk the distinct scores downwards, indices upwards within a score."""
    out = []
    for v in sorted(set(scores), reverse=True):
        out += [i for i, s in enumerate(scores) if s == v]
    return out[:k]


def test_top_k_is_exact_and_stable_under_ties():
    assert select_data.top_k([0.2, 0.9, 0.5, 0.9], 3) == [1, 3, 2]
    assert select_data.top_k([0.7] * 6, 4) == [0, 1, 2, 3], "all tied: pool order"
    rng = random.Random(0)
    for trial in range(20):
        scores = [rng.randint(0, 4) / 4 for _ in range(60)]   # few distinct values: many ties
        k = rng.randint(1, 60)
        got = select_data.top_k(scores, k)
        assert got == reference_top_k(scores, k)
        # exact: nothing left out scores above anything kept
        assert min(scores[i] for i in got) >= max((s for i, s in enumerate(scores) if i not in got), default=-1)
        # stable: the same scores in another container, or computed twice, give the same answer
        assert select_data.top_k(tuple(scores), k) == got
    with pytest.raises(ValueError, match="NaN"):
        select_data.top_k([0.1, float("nan"), 0.3], 2)


def test_pool_smaller_than_k_is_a_clear_error(smoke_data):
    with pytest.raises(ValueError, match=r"K=5 .*only 3"):
        select_data.top_k([0.1, 0.2, 0.3], 5)
    records = [{"question": "1 + 1", "answer": 2, "thinking": [], "response": [f"Answer: {a}"]}
               for a in (2, 2, 3, 4)]
    with pytest.raises(ValueError, match=r"K=3 .*right final answer has only 2"):
        select_data.select("outcome", records, {}, 3, seed=0)
    with pytest.raises(ValueError, match=r"K=9 .*only 4"):
        select_data.select("random", records, {}, 9, seed=0)
    with pytest.raises(ValueError, match=r"K=2 .*clean records .*only 1"):
        select_data.select("oracle", records, {}, 2, seed=0,
                           hidden_meta=[{"flaw": f} for f in ("clean", "slip", "lucky", "slip")])
    # the script says so before it loads a PRM or trains anything (the PRM paths do not exist)
    n_pool = len(read_jsonl(str(smoke_data / "pool.jsonl")))
    with pytest.raises(ValueError, match=rf"K=100000 .*only {n_pool}"):
        select_data.main(["--smoke", "--k=100000", "--prm=/nonexistent", "--prm_response=/nonexistent",
                          "--init=/nonexistent", *data_args(smoke_data, "pool.jsonl")])


def test_selectors_see_no_meta_and_keep_what_they_promise(smoke_data):
    pool = read_jsonl(str(smoke_data / "pool.jsonl"))
    meta = [r.pop("meta") for r in pool]   # what every selector but the oracle is given
    k = 20
    right = select_data.select("outcome", pool, {}, k, seed=1)
    assert len(set(right)) == k and all(select_data.answer_right(pool[i]) for i in right)
    clean = select_data.select("oracle", pool, {}, k, seed=1, hidden_meta=meta)
    assert all(meta[i]["flaw"] == "clean" for i in clean)
    assert select_data.select("random", pool, {}, k, seed=1) == select_data.select("random", pool, {}, k, seed=1)
    assert select_data.select("random", pool, {}, k, seed=1) != select_data.select("random", pool, {}, k, seed=2)
    scores = {"rf_total": [float(i % 7) for i in range(len(pool))]}
    assert select_data.select("rf_top_k", pool, scores, k, seed=1) == select_data.select("rf_top_k", pool, scores, k, seed=2)


def test_reasonflux_keeps_only_records_it_accepts_drawn_at_random():
    n, k = 100, 10
    pool = [{"question": "1 + 2", "answer": 3, "thinking": [], "response": []} for _ in range(n)]
    worst = [0.9 if i % 4 == 0 else 0.3 for i in range(n)]          # 25 records with every step >= 1/2
    traj = [0.7 if i % 8 == 0 else 0.4 for i in range(n)]           # 13 of them with a trajectory >= 1/2
    total = [float(i) for i in range(n)]                             # the paper's top-K: the last ten
    scores = {"rf_total": total, "rf_step": total, "rf_worst": worst, "rf_trajectory": traj}
    steps = select_data.select("rf_step", pool, scores, k, seed=1)
    assert all(i % 4 == 0 for i in steps) and len(set(steps)) == k
    assert steps != select_data.select("rf_step", pool, scores, k, seed=2), "drawn with the seed"
    both = select_data.select("rf_total", pool, scores, k, seed=1)
    assert all(i % 8 == 0 for i in both) and len(set(both)) == k
    assert select_data.select("rf_top_k", pool, scores, k, seed=1) == list(range(99, 89, -1))
    # fewer accepted than K: all of them, then the best of the rest by the total
    few = {**scores, "rf_worst": [0.9 if i < 3 else 0.3 for i in range(n)]}
    assert select_data.select("rf_step", pool, few, k, seed=1)[3:] == list(range(99, 92, -1))


def test_aggregation_rows_are_top_k_by_their_column_from_one_scoring(smoke_data, smoke_prms):
    """score_pool gives every aggregation of rfprm.aggregate as a column, each record forwarded once."""
    from rfprm import load_prm, aggregate
    prm = load_prm(str(smoke_prms["fused"]), device="cpu")
    pool = read_jsonl(str(smoke_data / "pool.jsonl"))[:20]
    rows = []
    hook = prm.register_forward_hook(lambda module, args, out: rows.append(args[0].size(0)))
    try:
        cols = select_data.score_pool(prm, pool, 8, "ReasonFlux-PRM")
    finally:
        hook.remove()
    assert sum(rows) == len(pool), "one forward per record for every column"
    assert all(len(c) == len(select_data.POOL_COLUMNS) for c in cols)
    scores = {name: [c[j] for c in cols] for j, name in enumerate(select_data.POOL_COLUMNS)}
    own = prm.score(pool)
    assert scores["rf_min_traj"] == pytest.approx([aggregate(s, "min", prm.alpha) for s in own], abs=1e-5)
    assert scores["rf_prod"] == pytest.approx([aggregate(s, "prod") for s in own], abs=1e-5)
    for key in select_data.AGGREGATED:
        assert key in select_data.SELECTORS and len(select_data.SELECTORS[key]) <= 30, key
        assert select_data.select(key, pool, scores, 5, seed=1) == select_data.top_k(scores[key], 5), key
    assert "rf_mean" not in select_data.SelectConfig().selectors.split(","), "opt-in: each row trains students"


def test_identical_token_budgets_across_selectors(smoke_data, smoke_base):
    """Sets of short and of long records: equal steps would give unequal tokens; the plan equalises them."""
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    pool = read_jsonl(str(smoke_data / "pool.jsonl"))
    by_len = sorted(pool, key=lambda r: len("\n".join(r["thinking"] + r["response"])))
    short, long_ = by_len[:32], by_len[-32:]
    cfg = select_data.SelectConfig(init=str(smoke_base), tokenizer=str(smoke_data / "tokenizer.tiktoken"),
                                   budget_tokens=3000, warmup_steps=2, batch_size=8)
    runs = [select_data.train_student(recs, cfg, tok, 256, 1337, "cpu", questions=[]) for recs in (short, long_)]
    a, b = runs
    assert a["steps"] > b["steps"], "short records need more steps for the same tokens"
    # train_student raises if training saw other than the planned count; a batch holds at most
    # 8 of the longest records, so every student lands in [budget, budget + one batch)
    one_batch = 8 * max(len(tok.enc.encode_ordinary("\n".join(r["thinking"] + r["response"]))) + 2 for r in long_)
    for r in runs:
        assert cfg.budget_tokens <= r["tokens"] < cfg.budget_tokens + one_batch
    assert abs(a["tokens"] - b["tokens"]) < one_batch
    # without the plan, the short set at the long set's step count would see far fewer tokens
    naive = sum(itertools.islice(select_data.batch_tokens(short, tok, 256, 8, 1337), b["steps"]))
    assert naive < 0.8 * b["tokens"]


def test_students_never_start_from_a_checkpoint_trained_on_the_pool(smoke_data, smoke_base, tmp_path):
    """The start's recorded origin (every data file of the runs that made it) must not hold the pool."""
    on_pool = tmp_path / "on_pool"
    run_script("sft.py", "--smoke", f"--init={smoke_base}", "--eval_questions=0", f"--out_dir={on_pool}",
               *data_args(smoke_data, "pool.jsonl"))
    ckpt = torch.load(on_pool / "ckpt.pt", weights_only=True)
    assert [o["data"] for o in ckpt["origin"]] == [f"{smoke_data}/facts.txt", f"{smoke_data}/pool.jsonl"]
    with pytest.raises(ValueError, match="never seen the selection pool"):
        select_data.main(["--smoke", f"--init={on_pool / 'ckpt.pt'}", "--selectors=random",
                          *data_args(smoke_data, "pool.jsonl")])
    # a start trained on the training records passes; its origin names them
    base = torch.load(smoke_base, weights_only=True)
    select_data.check_never_trained_on(base, str(smoke_base), f"{smoke_data}/pool.jsonl")
    assert base["origin"][0]["data"].endswith("facts.txt")


def test_select_smoke_run_writes_results(smoke_data, smoke_base, smoke_policy, smoke_prms, tmp_path):
    out = tmp_path / "select"
    args = ["select_data.py", "--smoke", f"--init={smoke_base}", f"--prm={smoke_prms['fused']}",
            f"--prm_response={smoke_prms['mc']}", f"--policy={smoke_policy}", f"--out_dir={out}",
            *data_args(smoke_data, "pool.jsonl")]
    proc = run_script(*args)
    assert "composition of the selected sets" in proc.stdout and "upper bound" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    summary = res["summary"]
    assert list(summary) == ["random", "outcome", "response_prm", "confidence", "rf_total", "rf_step", "rf_top_k", "oracle"]
    assert res["k"] == 32 and len(res["seeds"]) == 2
    tokens = [t for s in summary.values() for t in s["tokens"]]
    assert min(tokens) >= 2000 and max(tokens) - min(tokens) < 8 * 256, "one budget for every student"
    for key, s in summary.items():
        assert len(s["accs"]) == 2 and all(0.0 <= a <= 1.0 for a in s["accs"]), key
        assert all(len(set(r["selected"])) == 32 for r in s["runs"]), key
        assert s["upper_bound"] == (key == "oracle")
    assert summary["oracle"]["composition"]["clean"] == 1.0
    comp = summary["random"]["composition"]
    assert 0 <= comp["answer 0"] <= 1 and comp["|answer|"] >= 0 and 0 <= comp["3 ops"] <= 1
    for key in ("rf_top_k", "response_prm", "confidence"):  # top-K is deterministic: one set for all seeds
        first, second = (r["selected"] for r in summary[key]["runs"])
        assert first == second, key
    # a second run reuses the cached pool scores and selects the same top-K
    again = run_script("select_data.py", "--smoke", f"--init={smoke_base}", f"--prm={smoke_prms['fused']}",
                       "--selectors=rf_total", "--seeds=1", f"--out_dir={tmp_path / 'again'}",
                       f"--cache_dir={out}", *data_args(smoke_data, "pool.jsonl"))
    assert "reusing" in again.stdout
    res2 = json.loads((tmp_path / "again" / "results.json").read_text())
    assert res2["summary"]["rf_total"]["runs"][0]["selected"] == summary["rf_total"]["runs"][0]["selected"]
