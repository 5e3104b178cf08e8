"""
Write the synthetic data set and its tokenizer into data/arith/.

    python data/arith/prepare.py            # 20,000 training records, a 10,000-record pool, ~15 s
    python data/arith/prepare.py --smoke    # a tiny set for tests

Files (same seed, same bytes):
    train.jsonl         distilled trajectory-response records of mixed quality: the policy and the PRMs learn from them
    pool.jsonl          more records from the same teacher: the pool data selection chooses from, which no model
                        sees before selection (select_data.py)
    prm_eval.jsonl      held-out records from the same teacher, never trained on (synthetic ProcessBench)
    prm_eval_heldout.jsonl   the same, written in the held-out voice: phrasings no training file holds
    prm_eval_dev.jsonl       the same, in a third voice, the development voice: diagnose and choose on it,
                             so that the held-out voice only reports (voices.py)
    prm_eval_longer.jsonl    the same, in the training voice, one operation longer than any record
    prm_eval_dev_longer.jsonl    the development voice one operation longer: choose on it what must hold
                             one operation longer, so that prm_eval_longer.jsonl only reports
    processbench_eval.json, processbench_eval_heldout.json, processbench_eval_longer.json
                        the three sets above in ProcessBench's own format (processbench.to_processbench):
                        `python train_prm.py --processbench=...` scores any file in it
    rl_questions.jsonl  questions for GRPO: {"id", "question", "answer", "n_ops"}
    rl_hard.jsonl       harder questions for GRPO, one operation more than any record: where the policy
                        rarely gets an answer right, so the rule reward is sparse (grpo.py, README)
    rl_mixed.jsonl      GRPO's questions: the first three quarters of rl_questions and as many of rl_hard, shuffled,
                        then rl_questions' last quarter, which GRPO holds out (mixed_questions)
    test.jsonl          held-out test questions, disjoint from everything above
    facts.txt           single-operation facts, the stand-in for a pretrained base model
    tokenizer.tiktoken  byte-level BPE ranks in tiktoken's file format (digits one per token)
"""

import collections
import json
import os
import random
import re
import statistics
import sys
import base64
import dataclasses
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import task  # noqa: E402
from files import check_writable, write_text_atomic, lock_out_dir  # noqa: E402
from tokenizer import SPLIT_PATTERN, load_tokenizer  # noqa: E402
from options import parse_config, check_options, require, run_main  # noqa: E402
from processbench import to_processbench  # noqa: E402


@dataclass
class PrepareConfig:
    out_dir: str = HERE
    seed: int = 1337
    n_train: int = 20000
    n_pool: int = 10000
    n_prm_eval: int = 2000
    n_rl: int = 2000
    n_test: int = 1000
    n_facts: int = 100000
    vocab_size: int = 512      # byte-level: 256 bytes + merges + 3 special tokens
    flaw_scale: float = 1.0    # multiplies every flaw rate against the clean rate (2: ~25% clean)
    misread: float = 0.0       # share of the teacher's slips that misread an operand (ours; 0: none)
    smoke: bool = False


SMOKE = dict(n_train=300, n_pool=200, n_prm_eval=100, n_rl=50, n_test=50, n_facts=2000)
# the smallest value of each size (options.check_options); the vocabulary holds 256 bytes and 3 special tokens
AT_LEAST = dict(n_train=1, n_pool=1, n_prm_eval=1, n_rl=1, n_test=1, n_facts=1, vocab_size=259)


# ----------------------------------------------------------------------------
# byte-level BPE, trained on counts of pre-split pieces (as minbpe does, but on counts)

def train_bpe(text, vocab_size, pattern=SPLIT_PATTERN):
    """Return tiktoken mergeable ranks {token bytes: rank} with vocab_size - 3 entries at most.

    The pattern splits text into pieces first (one digit per piece), so no merge ever
    crosses a piece boundary: digits stay one per token.

    >>> ranks = train_bpe("aaab aaab", 261)  # room for 2 merges
    >>> sorted(t for t, r in ranks.items() if r >= 256)
    [b'aa', b'aaa']
    """
    pieces = collections.Counter(re.findall(pattern, text))
    words = {tuple(bytes([b]) for b in p.encode("utf-8")): n for p, n in pieces.items()}
    ranks = {bytes([i]): i for i in range(256)}
    n_merges = vocab_size - 256 - 3  # room for the special tokens
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break  # every piece is a single token already
        # most frequent pair; ties broken by the bytes themselves, so the result is deterministic
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        words = {merge_pair(w, a, b): n for w, n in words.items()}
    return ranks


def merge_pair(word, a, b):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_questions(rng, wcfg, n, seen, start_id):
    rows = []
    while len(rows) < n:
        q, a, steps = task.make_question(rng, wcfg)
        if q not in seen:
            seen.add(q)
            rows.append({"id": start_id + len(rows), "question": q, "answer": a, "n_ops": len(steps)})
    return rows


def make_records(rng, wcfg, n, seen, voice="train"):
    """n teacher records in `voice` whose questions are not in `seen` (test questions stay unseen)."""
    records = []
    while len(records) < n:
        r = task.make_record(rng, wcfg, len(records), voice=voice)
        if r["question"] not in seen:
            records.append(r)
    return records


def mixed_questions(rl, rl_hard, seed):
    """GRPO's questions: rl's first three quarters and as many of rl_hard's, shuffled, then rl's last
    quarter. grpo.py holds out a file's last --heldout_questions (500, rl's last quarter at the default
    n_rl), so its held-out questions are of the records' (and the test's) distribution, never trained on:
    a read of the test's distribution to choose GRPO's settings on."""
    k = len(rl) - len(rl) // 4
    train = rl[:k] + rl_hard[:k]
    random.Random(seed).shuffle(train)   # its own generator: every other file stays as it was
    return train + rl[k:]


def prepare(cfg, wcfg=None):
    """Make every file; return a summary dict."""
    wcfg = wcfg or task.WorldConfig()
    rng = random.Random(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # held-out test questions first, so that nothing else may reuse them
    seen = set()
    test = make_questions(rng, wcfg, cfg.n_test, seen, 0)
    rl = make_questions(rng, wcfg, cfg.n_rl, seen, 0)
    records = make_records(rng, wcfg, cfg.n_train + cfg.n_pool + cfg.n_prm_eval, seen)
    train, pool, prm_eval = (records[:cfg.n_train], records[cfg.n_train:cfg.n_train + cfg.n_pool],
                             records[cfg.n_train + cfg.n_pool:])
    facts = task.fact_lines(rng, wcfg, cfg.n_facts)
    # drawn last, so that every file above stays as it was before this one existed
    hard = dataclasses.replace(wcfg, min_ops=wcfg.max_ops + 1, max_ops=wcfg.max_ops + 1)
    rl_hard = make_questions(rng, hard, cfg.n_rl, seen, 0)
    # the shifted ProcessBench sets: another voice, one operation more
    dev = make_records(rng, wcfg, cfg.n_prm_eval, seen, voice="dev")
    longer = make_records(rng, hard, cfg.n_prm_eval, seen)
    heldout = make_records(rng, wcfg, cfg.n_prm_eval, seen, voice="heldout")
    dev_longer = make_records(rng, hard, cfg.n_prm_eval, seen | {r["question"] for r in longer}, voice="dev")

    # the tokenizer is trained on everything the models will read
    corpus = "\n".join(["\n".join(r["thinking"] + r["response"]) + "\nQ: " + r["question"]
                        for r in train[:5000]] + facts[:5000])
    corpus += "\nPlan: 5 - 2 ; 4 * #1 ; 3 + #2\n"
    ranks = train_bpe(corpus, cfg.vocab_size)
    rank_file = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))

    write_text_atomic(os.path.join(cfg.out_dir, "test.jsonl"), jsonl(test))
    write_text_atomic(os.path.join(cfg.out_dir, "rl_questions.jsonl"), jsonl(rl))
    write_text_atomic(os.path.join(cfg.out_dir, "rl_hard.jsonl"), jsonl(rl_hard))
    write_text_atomic(os.path.join(cfg.out_dir, "rl_mixed.jsonl"), jsonl(mixed_questions(rl, rl_hard, cfg.seed)))
    write_text_atomic(os.path.join(cfg.out_dir, "train.jsonl"), jsonl(train))
    write_text_atomic(os.path.join(cfg.out_dir, "pool.jsonl"), jsonl(pool))
    write_text_atomic(os.path.join(cfg.out_dir, "prm_eval.jsonl"), jsonl(prm_eval))
    write_text_atomic(os.path.join(cfg.out_dir, "prm_eval_heldout.jsonl"), jsonl(heldout))
    write_text_atomic(os.path.join(cfg.out_dir, "prm_eval_longer.jsonl"), jsonl(longer))
    write_text_atomic(os.path.join(cfg.out_dir, "prm_eval_dev.jsonl"), jsonl(dev))
    write_text_atomic(os.path.join(cfg.out_dir, "prm_eval_dev_longer.jsonl"), jsonl(dev_longer))
    for name, rows in (("eval", prm_eval), ("eval_heldout", heldout), ("eval_longer", longer)):
        write_text_atomic(os.path.join(cfg.out_dir, f"processbench_{name}.json"),
                     json.dumps(to_processbench(rows, name), indent=1) + "\n")
    write_text_atomic(os.path.join(cfg.out_dir, "facts.txt"), "\n".join(facts) + "\n")
    write_text_atomic(os.path.join(cfg.out_dir, "tokenizer.tiktoken"), rank_file)
    return {"train": train, "pool": pool, "test": test}


def print_summary(train, test, out_dir):
    """Flaw types and lengths of the training records, questions by size, the vocabulary."""
    enc = load_tokenizer(os.path.join(out_dir, "tokenizer.tiktoken"))
    flaws = collections.Counter(r["meta"]["flaw"] for r in train)
    print(f"training records: {len(train)} (the selection pool is drawn the same way)")
    print(f"  {'flaw type':<16}{'count':>7}{'share':>8}")
    for f in task.FLAWS:
        print(f"  {f:<16}{flaws[f]:>7}{flaws[f] / len(train):>8.1%}")
    lens = [len(enc.encode_ordinary("Q: " + r["question"] + "\n" + "\n".join(r["thinking"] + r["response"])))
            for r in train]
    q = statistics.quantiles(lens, n=100)
    print(f"tokens per record: mean {statistics.mean(lens):.0f}, p50 {q[49]:.0f}, p99 {q[98]:.0f}, max {max(lens)}")
    ops = collections.Counter(r["n_ops"] for r in test)
    print(f"test: {len(test)} questions by operations: {dict(sorted(ops.items()))}")
    print(f"vocabulary: {enc.n_vocab} tokens (with 3 special), written to {out_dir}")


def main(argv=None):
    cfg = parse_config(PrepareConfig, argv, {"smoke": SMOKE}, __doc__)
    check_options(cfg, AT_LEAST)
    require(cfg.flaw_scale >= 0, f"--flaw_scale must be >= 0, got {cfg.flaw_scale}")
    require(0 <= cfg.misread <= 1, f"--misread must be in [0, 1], got {cfg.misread}")
    check_writable(cfg.out_dir)
    lock_out_dir(cfg.out_dir)   # two prepares writing one world would interleave its files
    base = task.WorldConfig()
    flawed = {f"p_{f}": getattr(base, f"p_{f}") * cfg.flaw_scale for f in task.FLAWS if f != "clean"}
    out = prepare(cfg, dataclasses.replace(base, **flawed, p_misread=cfg.misread))
    print_summary(out["train"], out["test"], cfg.out_dir)


if __name__ == "__main__":
    run_main(main)
