"""
rfprm: the model, the tokenizer, and checkpoints (the PRM and its rewards follow below).

* `GPT`: a small decoder-only transformer (pre-norm blocks, fused qkv projection, rotary
  position embeddings, attention through F.scaled_dot_product_attention, tied embeddings,
  GPT-2 init) with batched KV-cache generation. Rotary rather than learned absolute
  positions: with learned positions the default model sat on a plateau, attending diffusely
  and never finding "the operands 2-4 tokens back"; rotary makes relative offsets native.
* Tokenizer: tiktoken with a byte-level BPE vocabulary trained by data/arith/prepare.py
  (digits one per token) and three special tokens.
* Text layout of one record, as the policy reads and writes it:

      Q: 3 + 4 * (5 - 2)\\n<|think|>thinking line 1\\n...\\nline T<|/think|>1. 5 - 2 = 3\\n...\\nAnswer: 15<|endoftext|>
      '--------- prompt -----------''-------------------------- completion -------------------------------'

  A template-conditioned prompt (the trajectory-level reward of DESIGN §5) replaces
  the thinking by the expert's plan: `Q: ...\\nPlan: 5 - 2 ; 4 * #1 ; 3 + #2\\n<|/think|>`.
* Checkpoints: written atomically, read with torch.load(weights_only=True), refused
  with a clear message when made for another vocabulary, shape or purpose.

Run `python rfprm.py score FILE.jsonl` to see a trained PRM's per-step scores.
"""

import argparse
import hashlib
import json
import math
import os
import re
import base64
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken

# ----------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 512     # the tokenizer's n_vocab rounded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache=None, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None:   # left padding, or a chunk after a KV cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        elif T == 1:                # one new token: it may see every key in the cache
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:                       # queries == keys: the plain causal triangle is right
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


def rope_tables(head_size, max_len, base=10000.0):
    """cos and sin tables (max_len, head_size / 2) of rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of the two halves of each head by the position's angle.

    x (B, nh, T, hs); cos, sin (T, hs/2) or, with per-row positions, (B, 1, T, hs/2).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys and values of one layer, preallocated for the whole generation.

    Written in place at [pos, pos + T): no torch.cat per token.
    """

    def __init__(self, B, n_head, max_len, head_size, device, dtype):
        self.k = torch.zeros(B, n_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        cos, sin = rope_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, caches=None, pos=None, attn_mask=None):
        """Final normalised hidden states (B, T, C); the PRM's reward head reads them too."""
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, hs/2), or (B, T, hs/2) per row
        if pos.dim() == 2:
            rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hs/2)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, rope, caches[i] if caches is not None else None, attn_mask)
        return self.ln_f(x)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        """Logits (B, T, V) and, with targets (-1 = ignored), the cross-entropy loss.

        loss_reduction='none' returns the per-token loss (B, T) (0 at ignored positions),
        so that RL code gets log-probs from the same call (logp = -loss).
        """
        logits = self.lm_head(self.hidden(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(targets.shape)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None,
                 prompt_mask=None, use_cache=True, generator=None):
        """Continue each row of idx (B, T); return the whole sequences (B, T + max_new_tokens).

        Prompts of different lengths are left-padded, with prompt_mask (B, T) True at real
        tokens (see `left_pad`). temperature=0 is greedy. Rows stop independently at
        eos_id and are padded with eos_id afterwards. use_cache=False recomputes the whole
        sequence at every step (the slow reference the tests and bench.py compare with).
        """
        B, T = idx.shape
        assert T + max_new_tokens <= self.config.block_size, "prompt + new tokens exceed block_size"
        device = idx.device
        if prompt_mask is None:
            prompt_mask = torch.ones_like(idx, dtype=torch.bool)
        key_ok = torch.cat([prompt_mask, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
        positions = (key_ok.long().cumsum(1) - 1).clamp(min=0)  # (B, T_total): pads do not count
        out = torch.cat([idx, torch.full((B, max_new_tokens), eos_id if eos_id is not None else 0,
                                         dtype=idx.dtype, device=device)], 1)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        left_padded = not bool(prompt_mask.all())
        caches = None
        if use_cache:
            C, nh = self.config.n_embd, self.config.n_head
            dtype = self.wte.weight.dtype
            caches = [KVCache(B, nh, T + max_new_tokens, C // nh, device, dtype) for _ in self.h]
        for t in range(T, T + max_new_tokens):
            # with the cache: the whole prompt first, then one token per step
            start = t - 1 if (use_cache and t > T) else 0
            mask = attention_mask(key_ok[:, :t], start) if left_padded else None
            h = self.hidden(out[:, start:t], caches, positions[:, start:t], mask)
            logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
            nxt = sample(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out[:, t] = nxt
            if eos_id is not None and bool(done.all()):
                break
        return out


def attention_mask(key_ok, start):
    """Boolean mask (B, 1, T_q, T_k) for queries at positions [start, T_k): causal and no pads.

    An explicit mask, because SDPA's is_causal=True aligns the triangle top-left when the
    queries are fewer than the keys (wrong for a chunk after a KV cache). Every query also
    sees itself, so that a padded row is never fully masked (NaN in some backends).
    """
    B, Tk = key_ok.shape
    q_pos = torch.arange(start, Tk, device=key_ok.device)[:, None]  # (T_q, 1)
    k_pos = torch.arange(Tk, device=key_ok.device)[None, :]        # (1, T_k)
    mask = (k_pos <= q_pos)[None] & key_ok[:, None, :]             # (B, T_q, T_k)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]                                            # (B, 1, T_q, T_k)


def sample(logits, temperature, top_k=None, generator=None):
    """Next token ids (B,) from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)


def left_pad(seqs, pad_id, device="cpu"):
    """Left-pad token lists into (B, T) ids and a (B, T) mask that is True at real tokens."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):  # building the batch once, not a hot loop
        if s:
            idx[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = True
    return idx.to(device), mask.to(device)


# ----------------------------------------------------------------------------
# tokenizer: tiktoken with our own rank file

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith", "tokenizer.tiktoken")
# split pattern: words with their leading space, ONE digit per piece, punctuation runs, spaces
SPLIT_PATTERN = r""" ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ("<|endoftext|>", "<|think|>", "<|/think|>")


def read_ranks(path):
    """Read a tiktoken rank file: one 'base64(token) rank' per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
                ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def load_tokenizer(name=DEFAULT_VOCAB):
    """A tiktoken.Encoding with our special tokens.

    `name` is the path of a rank file written by data/arith/prepare.py (the default), or
    the name of a tiktoken encoding available offline (e.g. 'gpt2' if cached).
    """
    if name.endswith(".tiktoken") or os.sep in name:
        if not os.path.exists(name):
            raise FileNotFoundError(f"no vocabulary at {name}: run `python data/arith/prepare.py` first")
        ranks, pat, label = read_ranks(name), SPLIT_PATTERN, "arith"
    else:
        try:
            base = tiktoken.get_encoding(name)
        except Exception as e:
            raise ValueError(f"tiktoken encoding {name!r} is not available offline: {e}") from e
        ranks, pat, label = base._mergeable_ranks, base._pat_str, name
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=label, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def vocab_fingerprint(enc):
    """A short hash of a vocabulary, kept in checkpoints to refuse a mismatched tokenizer."""
    h = hashlib.sha256()
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(tok + b"\x00" + str(rank).encode())
    return f"{enc.name}:{enc.n_vocab}:{h.hexdigest()[:16]}"


def padded_vocab_size(enc):
    return 64 * math.ceil(enc.n_vocab / 64)


class Tok:
    """The special token ids of an encoding, by role."""

    def __init__(self, enc):
        self.enc = enc
        self.eot = enc.encode_single_token("<|endoftext|>")
        self.think = enc.encode_single_token("<|think|>")
        self.end_think = enc.encode_single_token("<|/think|>")


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


# ----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, ckpt):
    """torch.save to a temp file in the same folder, then rename: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None, enc=None, map_location="cpu"):
    """Read a checkpoint safely (weights_only=True) and check that it is what the caller expects.

    kind: 'policy' or 'prm' (which script made it); enc: the tokenizer it must match.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable rfprm checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not an rfprm checkpoint (no 'model' and 'model_args')")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"{path}: is a '{ckpt.get('kind')}' checkpoint, expected a '{kind}' checkpoint")
    if enc is not None and ckpt.get("vocab") != vocab_fingerprint(enc):
        raise ValueError(f"{path}: made with vocabulary {ckpt.get('vocab')}, but the tokenizer "
                         f"loaded now is {vocab_fingerprint(enc)}; re-run the stage that made it")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu"):
    """Rebuild a GPT from a checkpoint dict; a state dict of another shape is refused clearly."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    state = {k.removeprefix("gpt."): v for k, v in state.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit GPTConfig{tuple(ckpt['model_args'].values())}: {e}") from e
    return model.to(device)


def make_checkpoint(kind, model, enc, config, **extra):
    """The dict we save: {kind, model, model_args, vocab, config, ...} (nanoGPT's layout plus kind and vocab)."""
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    gpt = raw if isinstance(raw, GPT) else raw.gpt
    return {"kind": kind, "model": raw.state_dict(), "model_args": asdict(gpt.config),
            "vocab": vocab_fingerprint(enc), "config": config, **extra}


def pick_device(name=""):
    if name:
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ----------------------------------------------------------------------------
# configuration: one dataclass per script, turned into --key=value options


def str2bool(v):
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def parse_config(cls, argv=None, presets=None, doc=None):
    """Build a `cls` dataclass from --key=value options.

    Unknown keys and wrongly typed values stop with an error that names the key (argparse).
    presets = {"smoke": {...}}: when the boolean field `smoke` is set (or the field `preset`
    names it), its values replace the defaults; options given explicitly still win.
    """
    p = argparse.ArgumentParser(description=doc, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", type=str2bool, nargs="?", const=True, help=f"(default {f.default})")
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), help=f"(default {f.default!r})")
    given = vars(p.parse_args(argv))
    cfg = cls()
    for name, values in (presets or {}).items():
        if given.get(name) is True or given.get("preset") == name:
            for k, v in values.items():
                setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    return cfg


def print_config(cfg):
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))


def write_json_atomic(path, obj):
    """Write JSON next to the outputs atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path, required=("question", "answer")):
    """Read a jsonl file; a malformed line stops with file:line and what was expected."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file at {path}: run `python data/arith/prepare.py` first")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: expected one JSON object per line ({e.msg})") from None
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: expected a record with keys {list(required)}, "
                                 f"missing {missing}")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# torch.distributed: DDP through torchrun (gloo on CPU, nccl on CUDA)


def init_distributed(device):
    """Start the process group when launched by torchrun; return (rank, world_size, device)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world, device


def all_reduce_sum(t):
    """Sum a tensor over ranks (a no-op without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def format_eta(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"
