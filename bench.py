"""
Throughput and memory of training, generation and PRM scoring, side by side with references.

    python bench.py                       # CPU, or CUDA when there is one
    python bench.py --device=cuda --compile
    python bench.py --smoke               # tiny shapes, one iteration: seconds (tests)

What it measures, in one process so that ratios hold on a noisy machine:

* matmul_gflops: the fp32 matmul peak of this machine (bf16 on CUDA, the dtype autocast
  trains in), best over a few square sizes, measured before and after the models (the
  best of both); the denominator of every MFU below.
* train_tok_s, train_mfu: forward + backward + grad clip + AdamW step (training.make_optimizer)
  on a random token batch, as training.train does it.
* gen_tok_s_kv, gen_tok_s_recompute, gen_tok_s_hf: new tokens/s of GPT.generate with and
  without the KV cache (temperature 1, no eos: every row runs the full length), and of Hugging
  Face's GPT2LMHeadModel.generate at the same shape when `transformers` is importable (an
  optional peer, never required).
* prm_tok_s, prm_mfu: PRM forward (no grad) on full-length batches of token ids.
* peak_rss_mb (and peak_cuda_mb on CUDA): the process's peak memory so far.

Every figure is the BEST (fastest) of `repeats` timed runs, after warmup. First at the
reference shape (4 layers, 4 heads, 256 wide, block 256, training batch 16), then at the
project's default shape (model.GPTConfig defaults, training batch 8 as in sft.py).
One JSON line per figure on stdout and in out/bench/bench.jsonl; a table at the end.
"""

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from files import check_writable, write_text_atomic
from model import GPT, GPTConfig
from options import parse_config, print_config, check_options, require, run_main
from training import make_optimizer, pick_device, autocast_for
from rfprm import PRM, score_batch_size


@dataclass
class BenchConfig:
    out_dir: str = "out/bench"
    device: str = ""
    compile: bool = False          # torch.compile the model for training and PRM scoring
    matmul_sizes: str = "1024,1536,2048"
    matmul_repeats: int = 5
    threads: int = 0               # torch intra-op threads (0 = torch's default)
    repeats: int = 3               # timed runs per figure; the best is reported
    warmup: int = 2                # untimed steps before timing
    train_steps: int = 5           # optimizer steps per timed run
    # the reference shape
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    vocab_size: int = 512
    batch_size: int = 16           # training batch at the reference shape (x block_size tokens)
    default_shape: bool = True     # also measure model.GPTConfig() ...
    default_batch_size: int = 8    # ... at sft.py's training batch
    # generation and PRM scoring
    gen_batch: int = 64
    prompt_len: int = 32
    new_tokens: int = 64
    prm_batch: int = 64            # records scored ...
    prm_rows: int = 0              # ... this many per forward (0: as PRM.score does)
    hf: bool = True                # compare with transformers' GPT-2 when importable
    seed: int = 1337
    smoke: bool = False


# one thread: on a small machine shared with other jobs, multi-threaded ops stall at their barriers
SMOKE = dict(matmul_sizes="256,512", threads=1, hf=False, repeats=1, warmup=1, train_steps=1,
             n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=2, default_batch_size=1,
             gen_batch=4, prompt_len=8, new_tokens=8, prm_batch=2, prm_rows=2)
AT_LEAST = dict(matmul_repeats=1, threads=0, repeats=1, warmup=0, train_steps=1, n_layer=1, n_head=1, n_embd=1,
                block_size=2, vocab_size=1, batch_size=1, default_batch_size=1, gen_batch=1, prompt_len=1,
                new_tokens=1, prm_batch=1, prm_rows=0)  # options.check_options


RESULT_SHARE = 0.25   # prm_tok_s: 2 of every 8 tokens are a step's result, read by the surprise term


def n_matmul_params(cfg, prm=False):
    """N: parameters that take part in a matmul (plus the layer norms, as nanoGPT counts them).

    Per block 12*C^2 (qkv 3C^2, attention projection C^2, MLP 8C^2) and two layer norms (2C),
    the final layer norm C, and the tied lm_head V*C counted once (the embedding lookup is
    no matmul). The PRM reads hidden states with a (C -> 1) head and its surprise weight, and
    reads the lm_head only at the result tokens (RESULT_SHARE of them, as prm_tok_s lays them out).
    """
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    body = L * (12 * C * C + 2 * C) + C
    return body + (C + 2 + RESULT_SHARE * V * C if prm else V * C)


def flops_per_token(cfg, T, train=True, prm=False):
    """Model FLOPs per token at context length T (nanoGPT's estimate_mfu, PaLM appendix B):

        training (forward + backward):  6*N + 12*L*H*Q*T
        forward only (PRM scoring):     2*N +  6*L*H*Q*T

    with N = n_matmul_params(cfg), L layers, H heads, Q = C/H the head size. The attention
    term counts the full T x T score and value matmuls (no discount for the causal mask).
    """
    L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    N = n_matmul_params(cfg, prm)
    return 6 * N + 12 * L * H * Q * T if train else 2 * N + 6 * L * H * Q * T


def timed(fn, device):
    """Seconds one call of fn takes; on CUDA, queued kernels are waited for on both sides."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_gflops(sizes, repeats, device):
    """The best GFLOP/s of an (n, n) @ (n, n) product (2 n^3 FLOPs) over the sizes."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b  # warmup
        t = min(timed(lambda: a @ b, device) for _ in range(repeats))
        best = max(best, 2 * n ** 3 / t / 1e9)
    return best, str(dtype).replace("torch.", "")


def train_tok_s(model, batch, cfg, device):
    """Training tokens/s: forward + backward + grad clip + AdamW step on a random batch."""
    T, V = model.config.block_size, model.config.vocab_size
    step_model = torch.compile(model) if cfg.compile else model
    opt = make_optimizer(model, SimpleNamespace(lr=1e-4, weight_decay=0.1), device)
    x = torch.randint(V, (batch, T + 1), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    model.train()

    def steps(n):
        for _ in range(n):
            with autocast_for(device):
                _, loss = step_model(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    steps(cfg.warmup)
    t = min(timed(lambda: steps(cfg.train_steps), device) for _ in range(cfg.repeats))
    return batch * T * cfg.train_steps / t


def hf_gpt2(gcfg, device):
    """transformers' GPT-2 at the same shape, randomly initialised; None when not importable."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    eos = gcfg.vocab_size - 1  # GPT-2's 50256 is outside our vocabulary; min_new_tokens bans it anyway
    hcfg = GPT2Config(n_layer=gcfg.n_layer, n_head=gcfg.n_head, n_embd=gcfg.n_embd, n_positions=gcfg.block_size,
                      vocab_size=gcfg.vocab_size, bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(hcfg).to(device).eval()


def gen_tok_s(model, cfg, device):
    """New tokens/s of sampled generation: KV cache, recompute, and HF GPT-2 when importable.

    The runs are interleaved, repeat by repeat, so that a slow spell of a noisy machine
    hits all of them alike. Returns {name: tokens/s}.
    """
    gcfg = model.config
    idx = torch.randint(gcfg.vocab_size, (cfg.gen_batch, cfg.prompt_len),
                        generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    new = cfg.new_tokens
    model.eval()

    def ours(use_cache):
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        return lambda: model.generate(idx, new, temperature=1.0, use_cache=use_cache, generator=g)

    runs = {"kv": ours(True), "recompute": ours(False)}
    hf = hf_gpt2(gcfg, device) if cfg.hf else None
    if hf is not None:
        mask = torch.ones_like(idx)
        runs["hf"] = lambda: hf.generate(idx, attention_mask=mask, do_sample=True, max_new_tokens=new,
                                         min_new_tokens=new, pad_token_id=0)
    best = {}
    with torch.no_grad(), autocast_for(device):
        for fn in runs.values():
            fn()  # warmup
        for _ in range(cfg.repeats):
            for name, fn in runs.items():
                best[name] = min(best.get(name, float("inf")), timed(fn, device))
    return {name: cfg.gen_batch * new / t for name, t in best.items()}


def prm_tok_s(gcfg, cfg, device, rows):
    """PRM scoring tokens/s: forward of rfprm.PRM (the surprise readout) on prm_batch rows of
    block_size token ids, no grad, `rows` at a time. As in the course's records, a step is about
    8 tokens long and ends with a result: two tokens read by the surprise term."""
    prm = PRM(gcfg).to(device).eval()
    fwd = torch.compile(prm) if cfg.compile else prm
    x = torch.randint(gcfg.vocab_size, (cfg.prm_batch, gcfg.block_size),
                      generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    pos = torch.arange(gcfg.block_size, device=device)
    step_end = (pos // 8) * 8 + 7                                            # the last token of each 8
    is_result = (pos % 8 == 5) | (pos % 8 == 6)                             # RESULT_SHARE of the tokens
    result_of = torch.where(is_result, step_end.clamp(max=gcfg.block_size - 1), -1).expand_as(x)
    score_all = lambda: [fwd(x[i:i + rows], result_of[i:i + rows]) for i in range(0, cfg.prm_batch, rows)]
    with torch.no_grad(), autocast_for(device):
        for _ in range(cfg.warmup):
            score_all()
        t = min(timed(score_all, device) for _ in range(cfg.repeats))
    return cfg.prm_batch * gcfg.block_size / t


def peak_rss_mb():
    """Peak resident memory of this process so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def bench_shape(label, gcfg, batch, cfg, device, emit):
    """Every figure for one model shape; emit(metric, value, unit, **context) records one.

    Returns the MFU inputs {"train": (tok/s, FLOPs/token), "prm": (...)}: the MFUs are
    computed at the end, against the best matmul rate seen over the whole run.
    """
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ctx = dict(shape=label, n_layer=gcfg.n_layer, n_head=gcfg.n_head, n_embd=gcfg.n_embd,
               block_size=gcfg.block_size, vocab_size=gcfg.vocab_size)
    T = gcfg.block_size
    model = GPT(gcfg).to(device)

    tok_s, fpt = train_tok_s(model, batch, cfg, device), flops_per_token(gcfg, T)
    emit("train_tok_s", tok_s, "tokens/s", batch=batch, **ctx)
    mfu = {"train_mfu": (tok_s, fpt, dict(batch=batch, **ctx))}

    gen = dict(batch=cfg.gen_batch, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, **ctx)
    rates = gen_tok_s(model, cfg, device)
    emit("gen_tok_s_kv", rates["kv"], "new tokens/s", **gen)
    emit("gen_tok_s_recompute", rates["recompute"], "new tokens/s", **gen)
    if "hf" in rates:
        emit("gen_tok_s_hf", rates["hf"], "new tokens/s", **gen)
    elif cfg.hf:
        print("note: transformers is not importable, gen_tok_s_hf skipped (pip install transformers)")

    rows = cfg.prm_rows or score_batch_size(device)  # 0: as PRM.score batches records
    tok_s, fpt = prm_tok_s(gcfg, cfg, device, rows), flops_per_token(gcfg, T, train=False, prm=True)
    emit("prm_tok_s", tok_s, "tokens/s", records_s=float(f"{tok_s / T:.6g}"), batch=cfg.prm_batch,
         rows_per_forward=rows, **ctx)
    mfu["prm_mfu"] = (tok_s, fpt, dict(batch=cfg.prm_batch, **ctx))

    emit("peak_rss_mb", peak_rss_mb(), "MB", note="process peak so far", **ctx)
    if device.startswith("cuda"):
        emit("peak_cuda_mb", torch.cuda.max_memory_allocated() / 2 ** 20, "MB", **ctx)
    return mfu


def print_table(rows):
    """Per shape: throughputs, MFUs and the generation speed-ups of the KV cache."""
    by_shape = {}
    for r in rows:
        if "shape" in r:
            by_shape.setdefault(r["shape"], {})[r["metric"]] = r["value"]
    print(f"\n{'shape':10s} {'train tok/s':>11s} {'MFU':>6s} {'gen kv':>8s} {'recomp':>8s} {'hf':>8s} "
          f"{'kv/rec':>7s} {'kv/hf':>6s} {'prm tok/s':>10s} {'MFU':>6s} {'RSS MB':>7s}")
    for shape, m in by_shape.items():
        kv, rec, hf = m["gen_tok_s_kv"], m["gen_tok_s_recompute"], m.get("gen_tok_s_hf")
        hf_s, kv_hf = (f"{hf:,.0f}", f"{kv / hf:.1f}x") if hf else ("n/a", "n/a")
        print(f"{shape:10s} {m['train_tok_s']:11,.0f} {m['train_mfu']:6.1%} {kv:8,.0f} {rec:8,.0f} "
              f"{hf_s:>8s} {kv / rec:6.1f}x {kv_hf:>6s} {m['prm_tok_s']:10,.0f} {m['prm_mfu']:6.1%} "
              f"{m['peak_rss_mb']:7,.0f}")


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, {"smoke": SMOKE}, __doc__)
    check_options(cfg, AT_LEAST)
    require(cfg.n_embd % cfg.n_head == 0 and cfg.n_embd // cfg.n_head % 2 == 0 and
            cfg.prompt_len + cfg.new_tokens <= cfg.block_size,
            "--n_embd must split into --n_head heads of an even size, and --prompt_len + --new_tokens fit --block_size")
    check_writable(cfg.out_dir)
    print_config(cfg)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = []

    def emit(metric, value, unit, **context):
        row = {"metric": metric, "value": float(f"{value:.6g}"), "unit": unit, "device": device, **context}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # The matmul peak of a shared machine moves by 30% from minute to minute: measure it before
    # and after the models and divide by the best, so that an MFU is never flattered by a slow
    # moment of the denominator.
    sizes = [int(s) for s in cfg.matmul_sizes.split(",")]
    peak_before, dtype = matmul_gflops(sizes, cfg.matmul_repeats, device)
    ref = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                    block_size=cfg.block_size, vocab_size=cfg.vocab_size)
    mfu = [bench_shape("reference", ref, cfg.batch_size, cfg, device, emit)]
    if cfg.default_shape:
        mfu.append(bench_shape("default", GPTConfig(), cfg.default_batch_size, cfg, device, emit))
    peak_after, _ = matmul_gflops(sizes, cfg.matmul_repeats, device)
    peak = max(peak_before, peak_after)
    emit("matmul_gflops", peak, "GFLOP/s", dtype=dtype, sizes=cfg.matmul_sizes,
         before=float(f"{peak_before:.6g}"), after=float(f"{peak_after:.6g}"))
    for shape in mfu:
        for metric, (tok_s, fpt, ctx) in shape.items():
            emit(metric, tok_s * fpt / (peak * 1e9), "fraction", flops_per_token=fpt, **ctx)
    write_text_atomic(os.path.join(cfg.out_dir, "bench.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    print_table(rows)
    return rows


if __name__ == "__main__":
    run_main(main)
