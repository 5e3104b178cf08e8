"""prepare.py and the tokenizer: determinism, round-trips, clear errors."""

import filecmp
import os
import random

import pytest

import task
from conftest import run_script
from files import read_jsonl
from tokenizer import load_tokenizer, Tokenizer, encode_prompt, encode_completion


def test_prepare_is_deterministic(tmp_path):
    for d in ("a", "b"):
        run_script("data/arith/prepare.py", "--smoke", f"--out_dir={tmp_path / d}")
    names = sorted(os.listdir(tmp_path / "a"))
    assert "pool.jsonl" in names and "tokenizer.tiktoken" in names
    for name in names:
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False), name


def test_hard_rl_questions_have_one_operation_more_and_right_answers(smoke_data):
    # one operation more than any record also keeps them apart from the test questions
    hard = read_jsonl(smoke_data / "rl_hard.jsonl")
    assert len(hard) == len({q["question"] for q in hard}) > 0
    assert {len(task.solution_steps(task.parse(q["question"]))) for q in hard} == {task.WorldConfig().max_ops + 1}
    assert all(task.solution_steps(task.parse(q["question"]))[-1][3] == q["answer"] for q in hard)


def test_grpo_questions_are_half_harder_with_the_records_distribution_held_out_at_the_end(smoke_data):
    rl, hard = read_jsonl(smoke_data / "rl_questions.jsonl"), read_jsonl(smoke_data / "rl_hard.jsonl")
    mixed = read_jsonl(smoke_data / "rl_mixed.jsonl")
    k = len(rl) - len(rl) // 4
    head, tail = mixed[:-(len(rl) // 4)], mixed[-(len(rl) // 4):]
    assert tail == rl[k:]   # grpo.py holds out the file's tail: questions of the test's distribution, never trained on
    assert sorted(map(str, head)) == sorted(map(str, rl[:k] + hard[:k])) and head != rl[:k] + hard[:k]   # shuffled
    assert not {q["question"] for q in head} & {q["question"] for q in tail}


def test_tokenizer_round_trip_on_arbitrary_unicode(smoke_data):
    enc = load_tokenizer(str(smoke_data / "tokenizer.tiktoken"))
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x2FFF),
                                    rng.randint(0x1F300, 0x1F6FF), 10])) for _ in range(rng.randint(0, 40)))
        assert enc.decode(enc.encode_ordinary(s)) == s


def test_digits_are_one_per_token(smoke_data):
    enc = load_tokenizer(str(smoke_data / "tokenizer.tiktoken"))
    for tok in enc.encode_ordinary("123 + 4567 = 4690\nAnswer: 99"):
        piece = enc.decode([tok])
        assert sum(c.isdigit() for c in piece) <= 1, piece


def test_special_tokens_and_record_layout(smoke_data):
    tok = Tokenizer(load_tokenizer(str(smoke_data / "tokenizer.tiktoken")))
    assert len({tok.eot, tok.think, tok.end_think}) == 3
    ids = encode_prompt(tok, "1 + 2") + encode_completion(tok, ["1 + 2 = 3"], ["1. 1 + 2 = 3", "Answer: 3"])
    text = tok.enc.decode(ids)
    assert text == "Q: 1 + 2\n<|think|>1 + 2 = 3<|/think|>1. 1 + 2 = 3\nAnswer: 3<|endoftext|>"


def test_missing_vocabulary_says_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        load_tokenizer(str(tmp_path / "nope.tiktoken"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "1 + 2", "answer": 3}\n{"question": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected one JSON object"):
        read_jsonl(str(p))
    p.write_text('{"question": "1 + 2", "answer": 3}\n\n{"question": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: .*missing \['answer'\]"):
        read_jsonl(str(p))
