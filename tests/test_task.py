"""The synthetic world and the expert: judge, template, verify."""

import random

import pytest

import task
import voices


def test_judge_scores_known_steps():
    q = "3 + 4 * (5 - 2)"
    assert task.judge(q, [], "first, 5 - 2 = 3") == 1.0
    assert task.judge(q, [], "then 4 * 3 = 12") == 1.0
    assert task.judge(q, [], "then 4 * 3 = 13") == 0.0          # arithmetic slip
    assert task.judge(q, [], "3 + 4 = 7") == 0.0                 # precedence ignored
    assert task.judge(q, [], "now 4 * 4 = 16") == 0.0            # built on a wrong value
    assert task.judge(q, [], "check: 3 + 12 = 15, ok") == 1.0
    assert task.judge(q, [], "check: 3 + 12 = 16, ok") == 0.0
    assert task.judge(q, [], "wait, 4 * 3 is 12, not 13") == 1.0
    assert task.judge(q, [], "so the answer is 15") == 1.0
    assert task.judge(q, [], "so the answer is 21") == 0.0
    assert task.judge(q, [], "hmm, let me keep going") == 0.5


@pytest.mark.parametrize("voice", sorted(voices.VOICES))
def test_judge_agrees_with_hidden_labels_on_every_kind_of_line(voice):
    rng, cfg = random.Random(0), task.WorldConfig(p_check=0.5, p_hesitate=0.5)
    for flaw in task.FLAWS:
        for i in range(60):
            r = task.make_record(rng, cfg, i, flaw=flaw, voice=voice)
            for t, (line, ok) in enumerate(zip(r["thinking"], r["meta"]["step_ok"])):
                assert (task.judge(r["question"], r["thinking"][:t], line) > 0.25) == ok, (r, line)
            for j, (line, ok) in enumerate(zip(r["response"], r["meta"]["response_ok"])):
                assert (task.judge(r["question"], r["response"][:j], line) > 0.25) == ok, (r, line)


@pytest.mark.parametrize("one, other", [("train", "heldout"), ("train", "dev"), ("dev", "heldout")])
def test_no_two_voices_share_a_phrase(one, other):
    one, other = voices.VOICES[one], voices.VOICES[other]
    assert one.keys() == other.keys()
    for kind in one:
        assert not set(one[kind]) & set(other[kind]), kind
        assert len(other[kind]) >= 2 and len(one[kind]) >= 2, kind
    # nor a head or a tail of the grammar: each voice's words are new, not recombined
    for slot, kind in (("{s}", "check"), ("{s}", "fix"), ("{n}", "conclusion")):
        split = lambda voice: {part.strip(" ,:") for p in voice[kind] for part in p.split(slot)} - {""}
        assert not split(one) & split(other), kind
    assert sum(len(v) for v in voices.VOICES["train"].values()) > 100 and len(voices.VOICES["train"]["opener"]) >= 24


@pytest.mark.parametrize("voice", sorted(voices.VOICES))
def test_template_of_a_clean_trajectory_gives_the_answer_in_every_voice(voice):
    rng, cfg = random.Random(4), task.WorldConfig(p_check=0.5)
    for i in range(200):
        r = task.make_record(rng, cfg, i, flaw=rng.choice(["clean", "self_correct"]), voice=voice)
        assert task.follow_template(task.template(r["thinking"]))[-1] == f"Answer: {r['answer']}", r


def test_questions_the_world_cannot_parse_are_refused():
    for text in ("3 + 4 / 2", "8 / (2 + (3", "3 4", "(1 + 2", "1 + 2)", ""):
        assert task.safe_parse(text) is None, text
        assert task.judge(text, [], "3 + 4 = 7") == 0.5   # never 1.0 against a question it could not read


def test_template_and_follow():
    thinking = ["let me see", "first, 5 - 2 = 3", "then 4 * 3 = 13", "wait, 4 * 3 is 12, not 13",
                "check: 4 * 3 = 12, ok", "next, 3 + 12 = 15"]
    plan = task.template(thinking)
    assert plan == ["5 - 2", "4 * #1", "3 + #2"]
    assert task.follow_template(plan)[-1] == "Answer: 15"
    # a wrong strategy is followed literally, right or wrong
    assert task.follow_template(["3 + 4", "#1 * 2"])[-1] == "Answer: 14"


def test_verify():
    assert task.verify("1. 2 + 3 = 5\nAnswer: 5", 5)
    assert not task.verify("Answer: 6", 5)
    assert not task.verify("no answer here", 5)
    assert task.verify("Answer: 4\nAnswer: -7", -7)  # the last answer counts


@pytest.mark.parametrize("seed", range(5))
def test_parsers_never_raise_on_garbage(seed):
    rng = random.Random(seed)
    alphabet = "0123456789+-*=()# :,.abcxyz\n\t\u00e9\u4e2d\U0001F600Answer:waitnotischeck"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        lines = s.split("\n")
        assert 0.0 <= task.judge(s, lines, s, lines) <= 1.0
        assert 0.0 <= task.judge("3 + 4", lines, s) <= 1.0
        # a step buried in garbage is still read: the template has an operation to follow
        cut = rng.randint(0, len(s))
        step = f"{rng.randint(-99, 999)} {rng.choice('+-*')} {rng.randint(0, 999)} = {rng.randint(0, 999)}"
        buried = lines + [(s[:cut] + step + s[cut:]).replace("\n", " ")]
        for thinking in (lines, buried):
            plan = task.template(thinking)
            done = task.follow_template(plan)
            # a template is always executable: None only when it is empty (the numbers here are
            # far too short to overflow); else one line per operation, then an answer it verifies
            assert (done is None) == (not plan), (thinking, plan, done)
            if done:
                assert len(done) == len(plan) + 1 and task.verify("\n".join(done), int(done[-1][len("Answer: "):]))
        assert plan, buried
        assert task.verify(s, 7) in (True, False)
        assert task.verify(s, "not a number") is False
        assert task.follow_template([s]) is None or isinstance(task.follow_template([s]), list)
    assert task.judge(None, None, None, None) == 0.5


def test_flaw_rates_are_configurable_and_pool_mostly_clean_by_default():
    rng = random.Random(1)
    recs = [task.make_record(rng, task.WorldConfig(), i) for i in range(1000)]
    clean = sum(r["meta"]["flaw"] == "clean" for r in recs) / len(recs)
    assert 0.35 < clean < 0.45
    only_slips = task.WorldConfig(**{f"p_{f}": 0.0 for f in task.FLAWS})
    only_slips.p_slip = 1.0
    assert {task.make_record(rng, only_slips, i)["meta"]["flaw"] for i in range(50)} == {"slip"}


def test_a_slip_can_misread_an_operand_with_the_arithmetic_right():
    """A misread slip keeps right arithmetic on a wrong operand; the expert calls it wrong."""
    only_slips = task.WorldConfig(**{f"p_{f}": 0.0 for f in task.FLAWS if f != "slip"}, p_slip=1.0, p_misread=1.0)
    rng, misreads = random.Random(5), 0
    for i in range(50):
        r = task.make_record(rng, only_slips, i)
        truth = task.solution_steps(task.parse(r["question"]))
        steps = [task.STEP_RE.search(line) for line in r["response"][:-1]]
        k, m = next((k, m) for k, m in enumerate(steps) if (int(m[1]), m[2], int(m[3]), int(m[4])) not in truth)
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if task.apply_op(op, a, b) == c:   # right arithmetic, so an operand is wrong
            misreads += 1
            assert (a, op, b) != truth[k][:3]
            assert task.judge(r["question"], [], r["response"][k]) == 0.0
    assert misreads >= 40   # the rest: no operand of 1..9 changes the result (x * 0) or keeps it in range
    without = task.WorldConfig(**{f"p_{f}": 0.0 for f in task.FLAWS if f != "slip"}, p_slip=1.0, p_misread=0.0)
    for i in range(30):   # p_misread=0: every slip is a wrong result of right operands
        r = task.make_record(rng, without, i)
        truth = task.solution_steps(task.parse(r["question"]))
        for line in r["response"][:-1]:
            m = task.STEP_RE.search(line)
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            if (a, op, b, c) not in truth:
                assert task.apply_op(op, a, b) != c
                break


def test_flawed_records_show_their_flaw():
    rng, cfg = random.Random(2), task.WorldConfig()
    for flaw in task.FLAWS:
        for i in range(30):
            r = task.make_record(rng, cfg, i, flaw=flaw)
            right = task.verify("\n".join(r["response"]), r["answer"])
            errors = not all(r["meta"]["step_ok"])
            if flaw in ("clean", "self_correct", "rambling"):
                assert right
            if flaw in ("slip", "wrong_strategy", "misaligned", "truncated"):
                assert not right, (flaw, r)
            if flaw == "lucky":
                assert right and errors   # right answer, wrong steps: an outcome filter keeps it
            if flaw in ("slip", "wrong_strategy", "self_correct"):
                assert errors
