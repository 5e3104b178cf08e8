"""
tokenizer: tiktoken with our own byte-level BPE vocabulary (minbpe-style: the rank file is ours).

* the vocabulary is trained by data/arith/prepare.py (digits one per token) and read from its rank
  file (`load_tokenizer`); three special tokens mark the end of a text and the thinking;
* `Tokenizer`: the special token ids by role, and the byte length of every ordinary token;
* a record as token ids and back: `encode_prompt`, `encode_completion`, `split_completion`.

Text layout of one record, as the policy reads and writes it:

      Q: 3 + 4 * (5 - 2)\\n<|think|>thinking line 1\\n...\\nline T<|/think|>1. 5 - 2 = 3\\n...\\nAnswer: 15<|endoftext|>
      '--------- prompt -----------''-------------------------- completion -------------------------------'

A template-conditioned prompt (for the trajectory-level reward, rewards.trajectory_reward)
replaces the thinking by the expert's plan: `Q: ...\\nPlan: 5 - 2 ; 4 * #1 ; 3 + #2\\n<|/think|>`.
"""

import base64
import hashlib
import math
import os

import tiktoken

from files import BadInput, check_input_file


DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith", "tokenizer.tiktoken")


# split pattern: words with their leading space, ONE digit per piece (a leading space may stay
# with the digit: the policy learns better with it there), punctuation, spaces
SPLIT_PATTERN = r""" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"""


SPECIAL_TOKENS = ("<|endoftext|>", "<|think|>", "<|/think|>")


def read_ranks(path):
    """Read a tiktoken rank file: one 'base64(token) rank' per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()  # ValueError unless exactly two fields
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:  # binascii.Error is one too
                    raise BadInput(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def load_tokenizer(path=DEFAULT_VOCAB):
    """A tiktoken.Encoding with our special tokens, from a rank file written by data/arith/prepare.py.

    Only a file: a tiktoken name such as 'gpt2' would be downloaded, and a course run must not
    depend on the network (nor wait on it when there is none).
    """
    if not (path.endswith(".tiktoken") or os.sep in path or os.path.exists(path)):
        raise BadInput(f"--tokenizer={path}: expected the path of a .tiktoken rank file "
                       f"(data/arith/prepare.py writes one), not a tiktoken name")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no vocabulary at {path}: run `python data/arith/prepare.py` first")
    check_input_file(path)
    ranks = read_ranks(path)
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="arith", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def vocab_fingerprint(enc):
    """A short hash of a vocabulary, kept in checkpoints to refuse a mismatched tokenizer."""
    h = hashlib.sha256()
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(tok + b"\x00" + str(rank).encode())
    return f"{enc.name}:{enc.n_vocab}:{h.hexdigest()[:16]}"


def padded_vocab_size(enc):
    return 64 * math.ceil(enc.n_vocab / 64)


class Tokenizer:
    """The special token ids of an encoding, by role, and the byte length of every ordinary token."""

    def __init__(self, enc):
        self.enc = enc
        self.eot = enc.encode_single_token("<|endoftext|>")
        self.think = enc.encode_single_token("<|think|>")
        self.end_think = enc.encode_single_token("<|/think|>")
        # where each token of a line starts, in bytes: rfprm finds a step's result tokens with it
        self.n_bytes = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]


def encode_prompt(tok, question, plan=None):
    """Token ids of a prompt: the question, then <|think|>; or with a plan, the plan then <|/think|>."""
    if plan is None:
        return tok.enc.encode_ordinary(f"Q: {question}\n") + [tok.think]
    return tok.enc.encode_ordinary(f"Q: {question}\nPlan: {' ; '.join(plan)}\n") + [tok.end_think]


def encode_completion(tok, thinking, response):
    """Token ids of a completion: thinking, <|/think|>, response, <|endoftext|>.

    With thinking=None (a template-conditioned completion) only the response and eot.
    """
    ids = []
    if thinking is not None:
        ids = tok.enc.encode_ordinary("\n".join(thinking)) + [tok.end_think]
    return ids + tok.enc.encode_ordinary("\n".join(response)) + [tok.eot]


def split_completion(tok, ids):
    """Decode generated completion ids into (thinking lines, response text); never raises."""
    ids = [i for i in ids if i < tok.enc.n_vocab]
    if tok.eot in ids:
        ids = ids[:ids.index(tok.eot)]
    if tok.end_think in ids:
        k = ids.index(tok.end_think)
        think_ids, resp_ids = ids[:k], ids[k + 1:]
    else:
        think_ids, resp_ids = ids, []
    decode = lambda xs: tok.enc.decode([i for i in xs if i < tok.eot], errors="replace")
    thinking = [l for l in decode(think_ids).split("\n") if l.strip()]
    return thinking, decode(resp_ids)


def completion_record(tok, question, ids):
    """A generated completion as the record a PRM reads: {question, thinking, response}, one
    step per non-blank line (split_completion)."""
    thinking, response = split_completion(tok, ids)
    return {"question": question, "thinking": thinking, "response": [l for l in response.split("\n") if l.strip()]}
