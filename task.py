"""
The synthetic world: arithmetic questions, a simulated distilling teacher, and the expert.

In the paper, a frontier reasoning model writes long *thinking trajectories* and
concise *final responses* for math problems, and an expert LLM judges them. Here both
are small, seeded programs, so the whole course runs offline on a laptop:

* a **question** is an arithmetic expression, e.g. ``3 + 4 * (5 - 2)``;
* its **solution** applies one binary operation per step in precedence order;
* the **teacher** writes a thinking trajectory (one step per line) and a response,
  injecting one of eight flaw types with configurable rates;
* the **expert** has three roles, each one small function that a user can swap for a
  real LLM call: ``judge`` (is this step right?), ``template`` (the trajectory's
  strategy as operations without results) and ``verify`` (is ``Answer: N`` right?).

Text format (one record of the pool, flaw type "self_correct")::

    question:  3 + 4 * (5 - 2)
    thinking:  let me work through this
               first, 5 - 2 = 3
               then 4 * 3 = 13
               wait, 4 * 3 is 12, not 13
               next, 3 + 12 = 15
               check: 3 + 12 = 15, ok
               so the answer is 15
    response:  1. 5 - 2 = 3
               2. 4 * 3 = 12
               3. 3 + 12 = 15
               Answer: 15

Every record also keeps hidden ground truth in ``meta`` (flaw type, whether each
thinking and response step is correct, whether the trajectory is good). It is for
evaluation only and never a training target.

The parsers (``judge``, ``template``, ``follow_template``, ``verify``, ``parse_answer``)
never raise on arbitrary text and take time linear in it: an expert that crashes, or hangs,
on a malformed step is no expert. They read ASCII digits only, at most MAX_DIGITS in a row.
"""

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass

# ----------------------------------------------------------------------------
# configuration

FLAWS = ("clean", "slip", "self_correct", "wrong_strategy", "rambling",
         "misaligned", "truncated", "lucky")
GOOD_FLAWS = ("clean", "self_correct")  # a self-corrected slip is a *good* trajectory


@dataclass
class WorldConfig:
    min_ops: int = 2            # operations per question (inclusive range)
    max_ops: int = 3
    max_operand: int = 9        # operands drawn from 1..max_operand
    max_value: int = 30         # every intermediate value must lie in 0..max_value
    # flaw rates of the simulated teacher (normalised, so they need not sum to 1)
    p_clean: float = 0.40
    p_slip: float = 0.10
    p_self_correct: float = 0.10
    p_wrong_strategy: float = 0.08
    p_rambling: float = 0.08
    p_misaligned: float = 0.08
    p_truncated: float = 0.08
    p_lucky: float = 0.08
    # style knobs of the thinking text
    p_check: float = 0.3        # a "check: ..." line after a step
    p_hesitate: float = 0.15    # a filler line ("hmm, ...") after a step

    def flaw_rates(self):
        return [getattr(self, "p_" + f) for f in FLAWS]


# ----------------------------------------------------------------------------
# expressions: a leaf is an int, a node is (op, left, right)

PREC = {"+": 1, "-": 1, "*": 2}


def apply_op(op, a, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def to_text(node, parent_prec=0, right_child=False):
    """Print a tree with the fewest parentheses that keep its meaning."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    p = PREC[op]
    s = f"{to_text(left, p)} {op} {to_text(right, p, right_child=True)}"
    # a right child of equal precedence needs parentheses: a - (b + c), a * (b * c) kept as written
    if p < parent_prec or (right_child and p == parent_prec):
        s = f"({s})"
    return s


TOKEN_RE = re.compile(r"\s*([0-9]+|[-+*()])")


def parse(text, flat=False):
    """Parse an expression into a tree; `flat=True` ignores precedence (left to right).

    >>> parse("3 + 4 * 2")
    ('+', 3, ('*', 4, 2))
    >>> parse("3 + 4 * 2", flat=True)
    ('*', ('+', 3, 4), 2)
    """
    tokens = TOKEN_RE.findall(text)
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            node = expr(0)
            pos += 1  # ")"
            return node
        return int(tok)

    def expr(min_prec):
        nonlocal pos
        left = atom()
        while pos < len(tokens) and tokens[pos] in PREC:
            op = tokens[pos]
            p = 1 if flat else PREC[op]
            if p < min_prec:
                break
            pos += 1
            left = (op, left, expr(p + 1))
        return left

    return expr(0)


def solution_steps(tree, override=None):
    """The steps (a, op, b, c) of a tree, children before parents, left before right.

    `override={i: v}` writes v as the result of step i (a slip); later steps that use
    it compute with v, so the error propagates exactly as in the tree.

    >>> solution_steps(parse("3 - (2 + 1)"), override={0: 4})
    [(2, '+', 1, 4), (3, '-', 4, -1)]
    """
    steps = []

    def walk(node):
        if isinstance(node, int):
            return node
        op, left, right = node
        a, b = walk(left), walk(right)
        c = apply_op(op, a, b)
        if override and len(steps) in override:
            c = override[len(steps)]
        steps.append((a, op, b, c))
        return c

    walk(tree)
    return steps


def random_tree(rng, n_ops, cfg):
    if n_ops == 0:
        return rng.randint(1, cfg.max_operand)
    k = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), random_tree(rng, k, cfg), random_tree(rng, n_ops - 1 - k, cfg))


def make_question(rng, cfg, n_ops=None):
    """A question text, its answer and its correct steps; values kept in range by rejection."""
    n_ops = n_ops if n_ops is not None else rng.randint(cfg.min_ops, cfg.max_ops)
    while True:
        text = to_text(random_tree(rng, n_ops, cfg))
        steps = solution_steps(parse(text))  # re-parse: the printed text is what counts
        if all(0 <= c <= cfg.max_value for _, _, _, c in steps):
            return text, steps[-1][3], steps


# ----------------------------------------------------------------------------
# the simulated distilling teacher

def fmt(a, op, b, c):
    return f"{a} {op} {b} = {c}"


OPENERS = ["let me work through this", "ok, mind the order of operations",
           "let me solve this step by step", "start with the inner part"]
LEADS = ["first, ", "then ", "next, ", "now ", ""]
FILLERS = ["hmm, let me keep going", "hmm, that looks right so far",
           "ok, one more to go", "let me think about the next part"]


def write_trajectory(rng, question, steps, cfg, flaw):
    """Return thinking lines, response lines and the hidden correctness of each line.

    Ground truth for a computation or check line: is it a step the correct solution
    makes (right operands, right result)? A conclusion is correct when it states the
    right answer; openers, fillers, asides and corrections of a slip are correct.
    """
    tree = parse(question)
    answer = steps[-1][3]
    true_set = set(steps)
    n = len(steps)
    lines, ok = [], []
    resp_steps = steps   # what the response will list

    def add(line, good):
        lines.append(line)
        ok.append(good)

    def add_compute(k, st, lead=None):
        lead = lead if lead is not None else rng.choice(LEADS[1:] if k else ["first, ", ""])
        add(lead + fmt(*st), st in true_set)
        if rng.random() < cfg.p_check:
            add(f"check: {fmt(*st)}, ok", st in true_set)
        elif rng.random() < cfg.p_hesitate:
            add(rng.choice(FILLERS), True)

    def add_aside():
        x, y, op = rng.randint(2, 9), rng.randint(2, 9), rng.choice("+*")
        add(f"also, just to see, {fmt(x, op, y, apply_op(op, x, y))}", True)

    add(rng.choice(OPENERS), True)

    if flaw in ("clean", "rambling", "misaligned"):
        asides = set(rng.sample(range(n), rng.randint(1, min(2, n)))) if flaw == "rambling" else set()
        for k in range(n):
            add_compute(k, steps[k])
            if k in asides:
                add_aside()  # correct arithmetic that the solution does not need
        if flaw == "misaligned":
            # the response drifts from its own thinking: one step slips, the answer follows
            j = rng.randrange(n)
            resp_steps = solution_steps(tree, {j: steps[j][3] + rng.choice([-2, -1, 1, 2])})

    elif flaw == "truncated":
        # the thinking stops early; the response reports the last value it reached,
        # never one that happens to equal the answer (that would be a lucky record)
        last = rng.choice([k for k in range(1, n) if steps[k - 1][3] != answer])
        for k in range(last):
            add_compute(k, steps[k])
        resp_steps = steps[:last]

    elif flaw in ("slip", "self_correct", "lucky"):
        i = rng.randrange(n - 1) if flaw == "lucky" else rng.randrange(n)
        wrong = steps[i][3] + rng.choice([-3, -2, -1, 1, 2, 3])
        bad = solution_steps(tree, {i: wrong})    # the slip propagates to later steps
        for k in range(n):
            if flaw == "self_correct" and k == i:
                add(rng.choice(LEADS) + fmt(*bad[k]), False)
                a, op, b, c = steps[k]
                add(f"wait, {a} {op} {b} is {c}, not {wrong}", True)
            elif flaw == "self_correct":
                add_compute(k, steps[k])
            elif flaw == "lucky" and k == n - 1:
                # a second error lands on the right answer: the case an outcome filter keeps
                a, op, b, _ = bad[k]
                bad[k] = (a, op, b, answer)
                add(rng.choice(LEADS[1:]) + fmt(*bad[k]), bad[k] in true_set)
            else:
                add_compute(k, bad[k])
        if flaw != "self_correct":
            resp_steps = bad

    elif flaw == "wrong_strategy":
        # precedence ignored: operations are applied left to right (parentheses kept)
        resp_steps = solution_steps(parse(question, flat=True))
        for k, st in enumerate(resp_steps):
            add_compute(k, st)

    resp_answer = resp_steps[-1][3]
    if flaw != "truncated":
        # a misaligned response drifted away from a thinking that concluded correctly
        concluded = answer if flaw == "misaligned" else resp_answer
        add(f"so the answer is {concluded}", concluded == answer)

    response = [f"{k + 1}. {fmt(*st)}" for k, st in enumerate(resp_steps)]
    response.append(f"Answer: {resp_answer}")
    resp_ok = [st in true_set for st in resp_steps] + [resp_answer == answer]
    return lines, response, ok, resp_ok


def make_record(rng, cfg, idx, flaw=None):
    """One pool record: {id, question, answer, thinking, response, meta}."""
    flaw = flaw or rng.choices(FLAWS, weights=cfg.flaw_rates())[0]
    while True:
        question, answer, steps = make_question(rng, cfg)
        if flaw == "wrong_strategy":
            # the flaw must show: left-to-right must give a different answer
            if solution_steps(parse(question, flat=True))[-1][3] == answer:
                continue
        if flaw == "truncated" and all(st[3] == answer for st in steps[:-1]):
            continue  # every early stop would already hold the answer: the flaw could not show
        break
    thinking, response, ok, resp_ok = write_trajectory(rng, question, steps, cfg, flaw)
    meta = {"flaw": flaw, "good": flaw in GOOD_FLAWS, "n_ops": len(steps),
            "step_ok": ok, "response_ok": resp_ok,
            "first_error": next((t for t, g in enumerate(ok) if not g), -1)}
    return {"id": idx, "question": question, "answer": answer,
            "thinking": thinking, "response": response, "meta": meta}


# ----------------------------------------------------------------------------
# the expert (stand-ins for the expert LLM's three roles)

# A number is a whole run of at most MAX_DIGITS ASCII digits. Bounded, because `\d+` in a
# search tries every start inside a run of digits (quadratic time on a long run) and int()
# refuses more than 4,300 digits; ASCII, because `\d` also matches digits like '٣'. A longer
# run is not a number: no value of this world comes near, it can only be garbage.
MAX_DIGITS = 100
NUM = rf"(-?(?<![0-9])[0-9]{{1,{MAX_DIGITS}}}(?![0-9]))"
STEP_RE = re.compile(rf"{NUM}\s*([-+*])\s*{NUM}\s*=\s*{NUM}")
FIX_RE = re.compile(rf"wait,\s*{NUM}\s*([-+*])\s*{NUM}\s+is\s+{NUM},\s*not\s+{NUM}")
ANSWER_RE = re.compile(rf"Answer:\s*{NUM}")
CONCLUDE_RE = re.compile(rf"answer is\s*{NUM}")
PLAN_OP_RE = re.compile(rf"(#?-?[0-9]{{1,{MAX_DIGITS}}}) ([-+*]) (#?-?[0-9]{{1,{MAX_DIGITS}}})")  # '4 * #1'


def safe_parse(question):
    """Parse a question, or None when the text is not an expression we know."""
    try:
        return parse(question) if len(question) < 400 else None
    except (IndexError, ValueError, TypeError, RecursionError):
        return None


def parse_answer(text):
    """The integer after the last 'Answer:' in text, or None.

    >>> parse_answer("1. 2 + 3 = 5\\nAnswer: 5")
    5
    """
    found = ANSWER_RE.findall(text) if isinstance(text, str) else []
    return int(found[-1]) if found else None


def verify(text, answer):
    """Expert role 3 (answer verifier): does the text end with the right 'Answer: N'?

    Only an integer answer can be right: 'Answer: 3' does not verify 3.9, '3' or True.
    """
    if not isinstance(answer, int) or isinstance(answer, bool):
        return False
    return parse_answer(text) == answer


def judge(question, prior_steps, step, response=None):
    """Expert role 1 (step judge, the paper's r_qual): how good is this step, in [0, 1]?

    The expert knows how to solve the question, so it checks a computation line both
    for its arithmetic and for whether it is a step of a correct solution (right
    operands in the right order). Scores: 1 a correct step, check or correction;
    0 wrong arithmetic, an operation the correct solution never makes (precedence
    ignored, or built on a wrong value), or a wrong conclusion or final answer; 0.5 a
    harmless aside or filler. It judges the steps of a final response the same way.
    `prior_steps` is unused by this expert because the solution's steps are known exactly,
    and so is `response`; an LLM judge would read both. Never raises.
    """
    try:
        tree = safe_parse(question)
        if tree is None:
            return 0.5
        truth = solution_steps(tree)
        step = step or ""
        fix = FIX_RE.search(step)
        if fix:
            a, op, b, c, _ = fix.groups()
            return 1.0 if apply_op(op, int(a), int(b)) == int(c) else 0.0
        m = STEP_RE.search(step)
        if m:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            if apply_op(op, a, b) != c:
                return 0.0
            if (a, op, b, c) in truth:
                return 1.0
            return 0.5 if step.startswith("also") else 0.0
        m = CONCLUDE_RE.search(step) or ANSWER_RE.search(step)   # "so the answer is N", "Answer: N"
        if m:
            return 1.0 if int(m[1]) == truth[-1][3] else 0.0
        return 0.5
    except Exception:  # an expert never crashes on odd text
        return 0.5


def template(thinking):
    """Expert role 2 (template extractor): the trajectory's strategy as operations without results.

    Each computation line becomes one operation; an operand that is the result of an
    earlier operation becomes a reference '#k' (1-based). Checks are skipped, and a
    'wait, ... is X, not Y' correction replaces the result it corrects.

    >>> template(["first, 5 - 2 = 3", "then 4 * 3 = 12", "check: 4 * 3 = 12, ok", "next, 3 + 12 = 15"])
    ['5 - 2', '4 * #1', '3 + #2']
    """
    ops = []
    # value -> the operations whose result (as corrected) is that value, in order: all of them,
    # and those not yet used as an operand. Looking a value up, rather than searching back
    # through every earlier result, keeps a trajectory of many lines linear.
    every, unused = defaultdict(list), defaultdict(list)
    for line in thinking or []:
        line = str(line)
        fix = FIX_RE.search(line)
        if fix:
            wrong, right = int(fix[5]), int(fix[4])
            if every[wrong]:  # the latest result equal to the wrong value is corrected
                k = every[wrong].pop()
                bisect.insort(every[right], k)
                if unused[wrong] and unused[wrong][-1] == k:
                    unused[wrong].pop()
                    bisect.insort(unused[right], k)
            continue
        m = STEP_RE.search(line)
        if not m or line.lstrip().startswith("check"):
            continue
        # an operand is the latest unused result of that value ('#k'), or the number itself
        a, b = (f"#{unused[x].pop() + 1}" if unused[x] else str(x) for x in (int(m[1]), int(m[3])))
        every[int(m[4])].append(len(ops))
        unused[int(m[4])].append(len(ops))
        ops.append(f"{a} {m[2]} {b}")
    return ops


def follow_template(plan):
    """Execute a template literally (right or wrong) as response lines; None if unreadable.

    >>> follow_template(['5 - 2', '4 * #1', '3 + #2'])
    ['1. 5 - 2 = 3', '2. 4 * 3 = 12', '3. 3 + 12 = 15', 'Answer: 15']
    """
    values, lines = [], []
    for k, op_text in enumerate(plan):
        m = PLAN_OP_RE.fullmatch(str(op_text).strip())
        if not m:
            return None
        xs = []
        for tok in (m[1], m[3]):
            if tok.startswith("#"):
                j = int(tok[1:]) - 1
                if not 0 <= j < len(values):
                    return None
                xs.append(values[j])
            else:
                xs.append(int(tok))
        c = apply_op(m[2], xs[0], xs[1])
        if abs(c) >= 10 ** MAX_DIGITS:  # no answer line could state it (and products of products explode)
            return None
        values.append(c)
        lines.append(f"{k + 1}. {fmt(xs[0], m[2], xs[1], c)}")
    if not values:
        return None
    return lines + [f"Answer: {values[-1]}"]


def fact_lines(rng, cfg, n):
    """Single-operation facts ('7 * 8 = 56'), the stand-in for a pretrained base model.

    Drawn from the steps of random questions, so the base model knows the arithmetic the
    questions need (as a pretrained LLM would), while reasoning is left to the distilled data.
    """
    out = []
    while len(out) < n:
        _, _, steps = make_question(rng, cfg)
        out.extend(fmt(*st) for st in steps)
    return out[:n]
