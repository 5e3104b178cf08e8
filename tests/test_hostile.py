"""Hostile input: the parsers of task.py are linear-time and never raise, on 20,000 fuzzed strings."""

import random
import time

import task


# ----------------------------------------------------------------------------
# the parsers: linear time, never raise


def fuzzed_strings(n, seed=0):
    """Random bytes decoded, long digit runs (up to 1 MB), Unicode digits, step-shaped text."""
    rng = random.Random(seed)
    unicode_digits = "٣٤５߂০१๓"
    for i in range(n):
        kind = i % 5
        if kind == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode("utf-8", errors="replace")
        elif kind == 1:
            # three runs of 1 MB, twenty of 100 kB, the rest around the bound and int()'s 4,300 digits
            d = "7" * (1_000_000 if i < 15 else 100_000 if i % 1000 == 1 else
                       rng.choice([5, task.MAX_DIGITS, task.MAX_DIGITS + 1, 4301]))
            yield rng.choice([d, f"{d} + 1 = 2", f"Answer: {d}", f"wait, {d} * 2 is 3, not 4", f"answer is {d}",
                              f"1 + {d} = {d}", f"-{d} - -{d} = 0"])
        elif kind == 2:
            yield f"Answer: {rng.choice(unicode_digits)}" + rng.choice(["", "\n1. ٣ + ٤ = 7"])
        elif kind == 3:
            a, b = rng.randint(-10 ** 15, 10 ** 15), rng.randint(-99, 99)
            yield rng.choice([f"{a} * {b} = {a * b}", f"wait, {a} + {b} is {a + b}, not {a}", f"Answer: {a}",
                              f"so the answer is {b}", f"#{b} * #{a}"])
        else:
            yield "".join(rng.choice("0123456789 +-*=#:,Answerwaitisnot\n٣") for _ in range(rng.randint(0, 200)))


def test_parsers_are_fast_and_never_raise_on_fuzzed_strings():
    t0 = time.process_time()  # CPU time: the machine may be shared
    for s in fuzzed_strings(20_000):
        assert 0.0 <= task.judge("3 + 4 * (5 - 2)", [], s) <= 1.0
        assert 0.0 <= task.judge(s, [s], s, [s]) <= 1.0
        plan = task.template([s, s])
        assert isinstance(plan, list)
        assert task.follow_template(plan) is None or isinstance(task.follow_template(plan), list)
        assert task.follow_template([s]) is None or isinstance(task.follow_template([s]), list)
        a = task.parse_answer(s)
        assert a is None or (type(a) is int and abs(a) < 10 ** task.MAX_DIGITS)
        assert task.verify(s, 3) in (True, False) and task.verify(s, float("inf")) is False
    assert time.process_time() - t0 < 10


def test_verify_takes_integer_answers_and_ascii_digits_only():
    assert task.verify("Answer: 3", 3) and task.verify("Answer: -12", -12)
    for answer in (3.9, 3.0, "3", True, float("inf"), float("nan"), None, [3]):
        assert task.verify("Answer: 3", answer) is False, answer
    assert task.verify("Answer: 1", True) is False
    assert task.verify("Answer: ٣", 3) is False and task.parse_answer("Answer: ٣") is None
    assert task.judge("3 + 4", [], "٣ + ٤ = ٧") == 0.5   # not a computation line: an aside
    assert task.parse_answer("Answer: " + "9" * 5000) is None   # no number has that many digits


def old_template(thinking):
    """template() as it was written first (a backward search per operand): the reference."""
    import re
    step_re = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")
    fix_re = re.compile(r"wait,\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s+is\s+(-?\d+),\s*not\s+(-?\d+)")
    ops, results, consumed = [], [], set()
    for line in thinking or []:
        line = str(line)
        fix = fix_re.search(line)
        if fix:
            wrong, right = int(fix[5]), int(fix[4])
            for k in range(len(results) - 1, -1, -1):
                if results[k] == wrong:
                    results[k] = right
                    break
            continue
        m = step_re.search(line)
        if not m or line.lstrip().startswith("check"):
            continue
        operands = []
        for x in (int(m[1]), int(m[3])):
            src = next((k for k in range(len(results) - 1, -1, -1) if k not in consumed and results[k] == x), None)
            if src is None:
                operands.append(str(x))
            else:
                consumed.add(src)
                operands.append(f"#{src + 1}")
        ops.append(f"{operands[0]} {m[2]} {operands[1]}")
        results.append(int(m[4]))
    return ops


def test_template_is_unchanged_on_trajectories_and_linear_on_long_ones():
    rng, cfg = random.Random(3), task.WorldConfig()
    for i in range(2000):
        thinking = task.make_record(rng, cfg, i)["thinking"]
        assert task.template(thinking) == old_template(thinking)
    for i in range(300):  # few distinct values: many repeats, corrections of consumed results
        v = lambda: rng.randint(0, 4)
        lines = [rng.choice([f"{v()} + {v()} = {v()}", f"wait, {v()} + {v()} is {v()}, not {v()}",
                             f"check: {v()} * {v()} = {v()}"]) for _ in range(rng.randint(0, 30))]
        assert task.template(lines) == old_template(lines), lines
    t0 = time.process_time()
    many = ["1 + 1 = 2"] * 100_000 + ["wait, 1 + 1 is 3, not 2", "2 + 3 = 5"] * 20_000
    assert len(task.template(many)) == 120_000 and time.process_time() - t0 < 5
