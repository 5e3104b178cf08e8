"""bench.py: the smoke run reports every figure as a JSON line; the FLOP count is nanoGPT's."""

import json
import math

import pytest

from conftest import run_script
from model import GPT, GPTConfig
from rfprm import PRM
import bench

REQUIRED = ["matmul_gflops", "train_tok_s", "train_mfu", "gen_tok_s_kv", "gen_tok_s_recompute",
            "prm_tok_s", "prm_mfu", "peak_rss_mb"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run `python bench.py --smoke` once (a subprocess: it sets torch's thread count)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_script("bench.py", "--smoke", f"--out_dir={out}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows, out, proc.stdout


def test_smoke_prints_every_figure(smoke_run):
    rows, out, stdout = smoke_run
    for shape in ("reference", "default"):
        names = {r["metric"] for r in rows if r.get("shape") == shape}
        missing = set(REQUIRED) - {"matmul_gflops"} - names
        assert not missing, f"{shape}: missing {missing}"
    assert [r["metric"] for r in rows].count("matmul_gflops") == 1
    for r in rows:
        assert r["metric"] in REQUIRED + ["gen_tok_s_hf", "peak_cuda_mb"], r
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        assert r["unit"], r
        if r["metric"].endswith("_mfu"):
            assert 0 < r["value"] < 1.5, r
    # the same lines in out_dir/bench.jsonl (no temp file left behind), and a table at the end
    with open(out / "bench.jsonl") as f:
        assert [json.loads(line) for line in f] == rows
    assert [p.name for p in out.iterdir()] == ["bench.jsonl"]
    assert "kv/rec" in stdout


def test_flops_per_token_by_hand():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=16)
    # N = L (12 C^2 + 2C) + C + V C = 2 (768 + 16) + 8 + 128 = 1704; attention 12 L H Q T = 768
    assert bench.n_matmul_params(cfg) == 1704
    assert bench.flops_per_token(cfg, T=4) == 6 * 1704 + 768 == 10992
    # PRM, forward only: the (C -> 1) head and the surprise weight replace the lm_head, which is read
    # at a quarter of the tokens: N = 1704 - 128 + 10 + 128 / 4 = 1618
    assert bench.n_matmul_params(cfg, prm=True) == 1618
    assert bench.flops_per_token(cfg, T=4, train=False, prm=True) == 2 * 1618 + 384 == 3620


def test_matmul_params_match_the_models():
    """N is every parameter, the tied embedding counted once (as the lm_head); PRM: the lm_head
    counted at a quarter of the tokens."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)
    assert bench.n_matmul_params(cfg) == GPT(cfg).num_params()
    prm = PRM(cfg)
    assert bench.n_matmul_params(cfg, prm=True) == sum(p.numel() for p in prm.parameters()) - 64 * 16 * 3 / 4
