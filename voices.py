"""
voices: the teacher's phrasings (task.py writes and reads its trajectories with them).

A training voice, in which every record of training and selection is written, and two voices that
share no phrase with it nor with each other and appear only in evaluation files: a development voice,
on which a reader may diagnose a PRM and choose its settings (prm_eval_dev.jsonl), and a held-out
voice, which only reports (prm_eval_heldout.jsonl). A setting chosen by reading the held-out voice
would make its figures a measure of that choice, not of a PRM reading words it never read.
"""


def phrases(heads, tails):
    """Every head followed by every tail: a small grammar that makes dozens of lines from a few words."""
    return [h + t for h in heads for t in tails]


# Each kind of line has its own bank in each voice. `{s}` is a computation as the voice writes
# it ('4 * 3 gives 12'), `{w}` a wrong value, `{n}` the answer, `{k}` a response step's number.
# The voices share no phrase, and no head or tail either: a PRM trained on one has never
# read the words of another. Only the arithmetic ('4 * 3', the numbers) is common to both.
VOICES = {
    "train": {
        "opener": phrases(["let me ", "ok, let me ", "alright, let me ", "i will ", "now to "],
                          ["work through this", "solve this step by step", "mind the order of operations",
                           "start with the inner part", "take it one operation at a time", "think this through"]),
        "first": ["first, ", "", "to start, ", "start: ", "begin with "],
        "lead": ["then ", "next, ", "now ", "", "after that, ", "so ", "and ", "then, ", "next up, "],
        "equals": ["=", "gives", "is", "makes"],
        "filler": phrases(["hmm, ", "ok, ", "right, ", "alright, "],
                          ["let me keep going", "that looks right so far", "one more to go",
                           "let me think about the next part", "so far so good", "keep going"]),
        "aside": ["also, just to see, ", "as a side note, ", "by the way, ", "out of curiosity, ", "aside: "],
        "check": phrases(["check: ", "verify: ", "checking: ", "let me check, "],
                         ["{s}, ok", "{s}, yes", "{s}, correct", "{s} holds"]),
        "fix": phrases(["wait, ", "no, ", "oops, ", "hang on, "], ["{s}, not {w}", "{s}, not {w} as i wrote"]),
        "conclusion": ["so the answer is {n}", "the answer is {n}", "so the final answer is {n}",
                       "that makes the answer {n}", "in the end it is {n}", "final answer {n}"],
        "response_step": ["{k}. {s}", "step {k}: {s}"],
    },
    "dev": {
        "opener": phrases(["we should ", "our job: ", "the plan is to ", "here we "],
                          ["crack this one", "evaluate the expression", "respect precedence",
                           "go inside out", "handle each piece in turn", "reduce it gradually"]),
        "first": ["to begin, ", "initially, ", "opening move: ", "inner part: "],
        "lead": ["moving on, ", "following that, ", "in turn, ", "from there, ", "afterwards, ",
                 "subsequently, ", "onward: ", "continuing, "],
        "equals": ["equals", "->", "comes to", "yields"],
        "filler": phrases(["well, ", "fine, ", "good, "],
                          ["onward", "on to the rest", "nearly there", "the rest should follow",
                           "no trouble yet", "steady progress"]),
        "aside": ["unrelated, but ", "just for fun, ", "tangent: ", "idle thought: "],
        "check": phrases(["sanity test: ", "re-doing it: ", "confirming: ", "once more: "],
                         ["{s}, good", "{s}, confirmed", "{s}, agreed", "{s}, it fits"]),
        "fix": phrases(["correction: ", "scratch that, ", "my mistake, "],
                       ["{s} rather than {w}", "{s}, instead of {w}"]),
        "conclusion": ["therefore {n}", "final result: {n}", "which leaves us with {n}", "all told, {n}",
                       "the result must be {n}", "overall we get {n}"],
        "response_step": ["({k}) {s}", "{k}) {s}"],
    },
    "heldout": {
        "opener": phrases(["time to ", "goal: ", "i'll try to ", "the task: "],
                          ["simplify the whole thing", "compute it piece by piece", "untangle the brackets",
                           "get its value", "break it down", "go slowly"]),
        "first": ["starting off, ", "step one: ", "innermost: ", "we open with "],
        "lead": ["after this, ", "likewise, ", "further, ", "at this point, ", "the rest: ", "carrying on, ",
                 "along the way, ", "what remains: "],
        "equals": ["amounts to", "=>", "works out to", "totals"],
        "filler": phrases(["mm, ", "yes, ", "okay so, "],
                          ["still fine", "halfway", "nothing odd", "almost done", "all consistent", "no surprises"]),
        "aside": ["a digression: ", "for no reason, ", "random fact: ", "off topic, "],
        "check": phrases(["double-check: ", "again: ", "recheck: ", "to be sure, "],
                         ["{s}, true", "{s}, exact", "{s}, as expected", "{s}, matches"]),
        "fix": phrases(["whoops, ", "erm, ", "redo: "], ["{s}, in place of {w}", "{s}, and not {w}"]),
        "conclusion": ["hence {n}", "we end at {n}", "that settles it: {n}", "bottom line: {n}",
                       "we land on {n}", "the value: {n}"],
        "response_step": ["[{k}] {s}", "{k}: {s}"],
    },
}
