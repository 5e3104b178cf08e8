"""
The synthetic world: arithmetic questions, a simulated distilling teacher, and the expert.

In the paper a frontier model writes thinking trajectories and final responses, and an expert
LLM judges them; here both are small seeded programs, so the course runs offline:

* a **question** is an arithmetic expression, e.g. ``3 + 4 * (5 - 2)``;
* its **solution** applies one binary operation per step in precedence order;
* the **teacher** writes a thinking trajectory (one step per line) and a response,
  injecting one of eight flaw types with configurable rates;
* the **expert** has three roles, each one small function that a user can swap for a
  real LLM call: ``judge`` (is this step right?), ``template`` (the trajectory's
  strategy as operations without results) and ``verify`` (is ``Answer: N`` right?).

One record of the pool (flaw type "self_correct"), in the teacher's training voice::

    question:  3 + 4 * (5 - 2)
    thinking:  let me work through this | first, 5 - 2 = 3 | then 4 * 3 = 13 |
               wait, 4 * 3 is 12, not 13 | next, 3 + 12 = 15 | so the answer is 15
    response:  1. 5 - 2 = 3 | 2. 4 * 3 = 12 | 3. 3 + 12 = 15 | Answer: 15

Every record keeps hidden ground truth in ``meta`` (flaw type, each step's correctness, whether
the trajectory is good): for evaluation only, never a training target.

The parsers (``judge``, ``template``, ``follow_template``, ``verify``, ``parse_answer``)
never raise on arbitrary text and take time linear in it: an expert that crashes, or hangs,
on a malformed step is no expert. They read ASCII digits only, at most MAX_DIGITS in a row.
"""

import bisect
import re
from collections import defaultdict
from dataclasses import dataclass

from voices import VOICES

# ----------------------------------------------------------------------------
# configuration

FLAWS = ("clean", "slip", "self_correct", "wrong_strategy", "rambling",
         "misaligned", "truncated", "lucky")
GOOD_FLAWS = ("clean", "self_correct")  # a self-corrected slip is a *good* trajectory
SHORT_FLAW = {"self_correct": "self-corr", "wrong_strategy": "wrong-str", "misaligned": "misalign"}  # table headers


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
    p_misread: float = 0.0      # share of slips that misread an operand (right arithmetic) instead (ours)

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
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError(f"unclosed parenthesis in {text!r}")
            pos += 1
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

    tree = expr(0)
    if pos != len(tokens) or "".join(tokens) != "".join(text.split()):
        raise ValueError(f"not an expression of this world: {text!r}")  # e.g. '3 + 4 / 2', '3 4'
    return tree


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
    """A computation as a final response writes it: '4 * 3 = 12'."""
    return f"{a} {op} {b} = {c}"


class Writer:
    """One trajectory being written, line by line, in one voice, with each line's hidden truth.

    Ground truth for a computation or check line: is it a step the correct solution makes
    (right operands, right result)? A conclusion is correct when it states the right answer;
    openers, fillers, asides and corrections of a slip are correct.
    """

    def __init__(self, rng, cfg, voice, steps):
        self.rng, self.cfg, self.bank = rng, cfg, VOICES[voice]
        self.true_set = set(steps)
        self.lines, self.ok = [], []

    def pick(self, kind, **slots):
        return self.rng.choice(self.bank[kind]).format(**slots)

    def say(self, st):
        """A computation in this voice: '4 * 3 gives 12'."""
        a, op, b, c = st
        return f"{a} {op} {b} {self.pick('equals')} {c}"

    def add(self, line, good):
        self.lines.append(line)
        self.ok.append(good)

    def compute(self, k, st):
        """Step k's computation line, sometimes followed by a check of it or by a filler."""
        self.add(self.pick("lead" if k else "first") + self.say(st), st in self.true_set)
        if self.rng.random() < self.cfg.p_check:
            self.add(self.pick("check", s=self.say(st)), st in self.true_set)
        elif self.rng.random() < self.cfg.p_hesitate:
            self.add(self.pick("filler"), True)

    def aside(self):
        """Right arithmetic that the solution does not need."""
        x, y, op = self.rng.randint(2, 9), self.rng.randint(2, 9), self.rng.choice("+*")
        self.add(self.pick("aside") + self.say((x, op, y, apply_op(op, x, y))), True)


# One function per flaw: each writes the computation lines of its trajectory (after the opener)
# and returns the steps the final response will list.

def write_clean(w, steps, question):
    for k, st in enumerate(steps):
        w.compute(k, st)
    return steps


def write_rambling(w, steps, question):
    n = len(steps)
    asides = set(w.rng.sample(range(n), w.rng.randint(1, min(2, n))))
    for k, st in enumerate(steps):
        w.compute(k, st)
        if k in asides:
            w.aside()
    return steps


def write_misaligned(w, steps, question):
    """A right thinking; the response drifts from it: one step slips, the answer follows."""
    write_clean(w, steps, question)
    j = w.rng.randrange(len(steps))
    return solution_steps(parse(question), {j: steps[j][3] + w.rng.choice([-2, -1, 1, 2])})


def write_truncated(w, steps, question):
    """The thinking stops early; the response reports the last value it reached, never one
    that happens to equal the answer (that would be a lucky record)."""
    answer = steps[-1][3]
    last = w.rng.choice([k for k in range(1, len(steps)) if steps[k - 1][3] != answer])
    for k in range(last):
        w.compute(k, steps[k])
    return steps[:last]


def slipped(w, steps, question, i, misread=True):
    """The steps with a slip at step i, propagated to every later step that uses it, and the wrong value.

    A slip is a miscomputed result ('4 * 3 = 13') or, with probability p_misread when `misread`,
    an operand misread with the arithmetic right ('4 * 5 = 20' where the value was 3): small
    models and tired teachers make both, and a PRM that has only read the first rates the second
    by its right result. p_misread=0, the default, gives the result slips alone and draws nothing
    more from the rng, so the world is the one without misreads (`prepare.py --misread`).
    """
    tree = parse(question)
    if misread and w.cfg.p_misread and w.rng.random() < w.cfg.p_misread:   # 0 draws nothing: the same world
        bad = misread_operand(w.rng, tree, steps, i, w.cfg)
        if bad:
            return bad, bad[i][3]
    wrong = steps[i][3] + w.rng.choice([-3, -2, -1, 1, 2, 3])
    return solution_steps(tree, {i: wrong}), wrong


def misread_operand(rng, tree, steps, i, cfg):
    """The steps with one operand of step i replaced by another of 1..max_operand, its result
    recomputed and propagated; None when no replacement changes the result and keeps every
    value in 0..max_value."""
    a, op, b, c = steps[i]
    side = rng.randrange(2)
    for v in rng.sample(range(1, cfg.max_operand + 1), cfg.max_operand):
        x, y = (v, b) if side == 0 else (a, v)
        r = apply_op(op, x, y)
        if r == c:
            continue
        bad = solution_steps(tree, {i: r})
        bad[i] = (x, op, y, r)
        if all(0 <= st[3] <= cfg.max_value for st in bad):
            return bad
    return None


def write_slip(w, steps, question):
    bad, _ = slipped(w, steps, question, w.rng.randrange(len(steps)))
    for k, st in enumerate(bad):
        w.compute(k, st)
    return bad


def write_self_correct(w, steps, question):
    """A slip of a result, caught at once ('wait, 4 * 3 is 12, not 13'); the rest is right. A good
    trajectory. Never a misread operand: the correction restates a result, and the template reads it so."""
    i = w.rng.randrange(len(steps))
    bad, wrong = slipped(w, steps, question, i, misread=False)
    for k, st in enumerate(steps):
        if k == i:
            w.add(w.pick("lead" if k else "first") + w.say(bad[k]), False)
            w.add(w.pick("fix", s=w.say(st), w=wrong), True)
        else:
            w.compute(k, st)
    return steps


def write_lucky(w, steps, question):
    """A slip, then a second error that lands on the right answer: the case an outcome filter keeps."""
    n, answer = len(steps), steps[-1][3]
    bad, _ = slipped(w, steps, question, w.rng.randrange(n - 1))
    for k in range(n - 1):
        w.compute(k, bad[k])
    a, op, b, _ = bad[-1]
    bad[-1] = (a, op, b, answer)
    w.add(w.pick("lead") + w.say(bad[-1]), bad[-1] in w.true_set)
    return bad


def write_wrong_strategy(w, steps, question):
    """Precedence ignored: operations applied left to right (parentheses kept)."""
    flat = solution_steps(parse(question, flat=True))
    for k, st in enumerate(flat):
        w.compute(k, st)
    return flat


WRITERS = {"clean": write_clean, "slip": write_slip, "self_correct": write_self_correct,
           "wrong_strategy": write_wrong_strategy, "rambling": write_rambling, "misaligned": write_misaligned,
           "truncated": write_truncated, "lucky": write_lucky}


def write_trajectory(rng, question, steps, cfg, flaw, voice="train"):
    """Return thinking lines, response lines and the hidden correctness of each line.

    The opener, the flaw's computation lines, then the conclusion; the response lists the
    steps the flaw leaves ('1. 5 - 2 = 3' in one of the voice's formats) and 'Answer: N'.
    """
    answer = steps[-1][3]
    w = Writer(rng, cfg, voice, steps)
    w.add(w.pick("opener"), True)
    resp_steps = WRITERS[flaw](w, steps, question)
    resp_answer = resp_steps[-1][3]
    if flaw != "truncated":
        # a misaligned response drifted away from a thinking that concluded correctly
        concluded = answer if flaw == "misaligned" else resp_answer
        w.add(w.pick("conclusion", n=concluded), concluded == answer)
    form = rng.choice(w.bank["response_step"])
    response = [form.format(k=k + 1, s=fmt(*st)) for k, st in enumerate(resp_steps)]
    response.append(f"Answer: {resp_answer}")
    resp_ok = [st in w.true_set for st in resp_steps] + [resp_answer == answer]
    return w.lines, response, w.ok, resp_ok


def make_record(rng, cfg, idx, flaw=None, voice="train"):
    """One pool record: {id, question, answer, thinking, response, meta}, written in `voice`."""
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
    thinking, response, ok, resp_ok = write_trajectory(rng, question, steps, cfg, flaw, voice)
    meta = {"flaw": flaw, "good": flaw in GOOD_FLAWS, "n_ops": len(steps), "voice": voice,
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


def any_of(texts):
    """A regex alternation of literal texts, longest first (so 'checking' is tried before 'check')."""
    return "|".join(re.escape(t) for t in sorted(set(texts), key=len, reverse=True))


def bank(kind):
    """Every phrase of one kind of line, in every voice: the expert reads them all."""
    return [p for voice in VOICES.values() for p in voice[kind]]


def heads(kind, slot):
    """The text before `slot` in each phrase of a kind ('check: ' of 'check: {s}, ok')."""
    return [p.split(slot)[0] for p in bank(kind) if slot in p]


# a computation 'a op b <equals> c', with '=' or any voice's words for it ('gives', 'comes to')
EQUALS = rf"\s*(?:{any_of(w.strip() for w in bank('equals'))})\s*"
STEP_RE = re.compile(rf"{NUM}\s*([-+*])\s*{NUM}{EQUALS}{NUM}")
# a correction: the right computation, then the wrong value it replaces ('..., not 13', '... rather than 13')
FIX_RE = re.compile(rf"{STEP_RE.pattern}\s*,?\s*(?:not|rather than|instead of|in place of|and not)\s+{NUM}")
CHECK_RE = re.compile(rf"\s*(?:{any_of(heads('check', '{s}'))})")    # matched at a line's start
ASIDE_RE = re.compile(rf"\s*(?:{any_of(bank('aside'))})")
ANSWER_RE = re.compile(rf"Answer:\s*{NUM}")
CONCLUDE_RE = re.compile(rf"(?:{any_of(h.strip() for h in heads('conclusion', '{n}'))})\s*{NUM}")
PLAN_OP_RE = re.compile(rf"(#?-?[0-9]{{1,{MAX_DIGITS}}}) ([-+*]) (#?-?[0-9]{{1,{MAX_DIGITS}}})")  # '4 * #1'


def safe_parse(question):
    """Parse a question, or None when the text is not a whole expression of this world."""
    try:
        return parse(question) if len(question) < 400 else None
    except (IndexError, ValueError, TypeError, RecursionError):
        return None


def is_question(text):
    """Is `text` a whole expression of this world (integers, + - * and parentheses), one the expert can solve?

    >>> is_question("3 + 4 * (5 - 2)"), is_question("3 + 4 / 2"), is_question("8 / (2 + (3")
    (True, False, False)
    """
    if not isinstance(text, str):
        return False
    try:   # any length: a long question is still one (safe_parse, the judge's, stops at 400 characters)
        return parse(text) is not None
    except (IndexError, ValueError, TypeError, RecursionError):
        return False


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
            return 0.5 if ASIDE_RE.match(step) else 0.0
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
        if not m or CHECK_RE.match(line):
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
    if plan is None:   # no plan, no lines: as template(None) gives no operations
        return []
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
    Written with every word for '=' of the training voice ('7 * 8 gives 56'): a pretrained model
    has read a result after many words, not after one sign.
    """
    out = []
    while len(out) < n:
        _, _, steps = make_question(rng, cfg)
        out.extend(f"{a} {op} {b} {rng.choice(VOICES['train']['equals'])} {c}" for a, op, b, c in steps)
    return out[:n]
