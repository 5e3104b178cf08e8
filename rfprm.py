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
import sys
import time
import base64
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken

import task

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
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k = apply_rope(qkv[:2], *rope)  # q and k rotated in one call: half the small ops of a decode step
        v = qkv[2]
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        dropout = self.dropout if self.training else 0.0
        if T == 1 and not self.training:  # one new token after a KV cache: see below
            y = attend_one_query(q, k, v, attn_mask)
        elif attn_mask is not None:  # left padding, or a chunk after a KV cache
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:                       # queries == keys: the plain causal triangle is right
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


def attend_one_query(q, k, v, attn_mask=None):
    """softmax(q k^T / sqrt(hs)) v for a single query per row: q (B, nh, 1, hs), k, v (B, nh, T, hs).

    The same numbers as F.scaled_dot_product_attention; on the CPU, for one query, two small
    batched matmuls beat the fused kernel (whose tiling is built for many queries) by ~20%.
    """
    att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)  # (B, nh, 1, T)
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return att.softmax(-1) @ v


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

    x (..., B, nh, T, hs); cos, sin (T, hs/2) or, with per-row positions, (B, 1, T, hs/2).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys and values of one layer, preallocated for the whole generation.

    Written in place at [pos, pos + T): no torch.cat per token. Left uninitialised (empty,
    not zeros): only [0, pos) is ever read, and zeroing it all costs a pass over memory.
    """

    def __init__(self, B, n_head, max_len, head_size, device, dtype):
        self.k = torch.empty(B, n_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.pos = 0

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]

    def keep_rows(self, keep):
        """Keep only the batch rows where keep (B,) is True (rows that finished are dropped)."""
        self.k, self.v = self.k[keep], self.v[keep]


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

    def hidden(self, idx, caches=None, pos=None, attn_mask=None, rope=None):
        """Final normalised hidden states (B, T, C); the PRM's reward head reads them too.

        rope: (cos, sin) already looked up for these positions (generate does it once for the
        whole generation); otherwise they are looked up from pos.
        """
        B, T = idx.shape
        if rope is None:
            rope = self.rope_for(torch.arange(T, device=idx.device) if pos is None else pos)
        x = self.drop(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, rope, caches[i] if caches is not None else None, attn_mask)
        return self.ln_f(x)

    def rope_for(self, pos):
        """cos, sin for positions pos: (T, hs/2) when shared by every row, (B, 1, T, hs/2) per row."""
        if pos.dim() == 1:
            return self.rope_cos[pos], self.rope_sin[pos]
        return self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]

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

        Everything that does not change from step to step (positions, their rotary tables,
        the attention mask, the caches) is built once here and sliced per step. Finished rows
        are dropped from the batch every so often: their keys and values are no longer read.
        """
        B, T = idx.shape
        T_total = T + max_new_tokens
        assert T_total <= self.config.block_size, "prompt + new tokens exceed block_size"
        device = idx.device
        out = torch.cat([idx, torch.full((B, max_new_tokens), eos_id if eos_id is not None else 0,
                                         dtype=idx.dtype, device=device)], 1)
        if prompt_mask is None or bool(prompt_mask.all()):
            # every row starts at position 0: one rotary table for all rows, causal attention
            cos, sin = self.rope_for(torch.arange(T_total, device=device))  # (T_total, hs/2)
            mask = None
        else:
            new_ok = torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)
            key_ok = torch.cat([prompt_mask.bool(), new_ok], 1)      # (B, T_total)
            positions = (key_ok.long().cumsum(1) - 1).clamp(min=0)  # pads do not count
            cos, sin = self.rope_for(positions)                       # (B, 1, T_total, hs/2)
            mask = attention_mask(key_ok, 0)                          # (B, 1, T_total, T_total)
        caches = self.new_caches(B, T_total, device) if use_cache else None
        live = torch.arange(B, device=device)            # the rows of `out` still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=device)  # per live row: has it emitted eos
        # asking how many rows are done waits for the device: on a GPU, ask every few steps
        check_every = 1 if device.type == "cpu" else 8
        for t in range(T, T_total):
            # with the cache: the whole prompt first, then one token per step
            s = t - 1 if (use_cache and t > T) else 0
            rope = (cos[s:t], sin[s:t]) if mask is None else (cos[:, :, s:t], sin[:, :, s:t])
            h = self.hidden(out[live, s:t], caches, rope=rope,
                            attn_mask=None if mask is None else mask[:, :, s:t, :t])  # queries [s, t), keys [0, t)
            logits = self.lm_head(h[:, -1, :]).float()  # (B_live, V)
            nxt = sample(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done = done | (nxt == eos_id)
            out[live, t] = nxt
            if eos_id is None or (t - T) % check_every != check_every - 1:
                continue
            n_done = int(done.sum())
            if n_done == len(live):
                break
            if 4 * n_done >= len(live):  # a quarter of the batch is finished: drop those rows
                keep = ~done
                live, done = live[keep], done[keep]
                for c in caches or ():
                    c.keep_rows(keep)
                if mask is not None:
                    cos, sin, mask = cos[keep], sin[keep], mask[keep]
        return out

    def new_caches(self, B, max_len, device):
        """One preallocated KVCache per layer, in the dtype the keys will come in.

        Under autocast (bf16 on CUDA) the projections return bf16: a cache in the weights'
        fp32 would convert every key on the way in and the whole cache on every read.
        """
        dtype = self.wte.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        C, nh = self.config.n_embd, self.config.n_head
        return [KVCache(B, nh, max_len, C // nh, device, dtype) for _ in self.h]


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
    # inverse-CDF sampling: one uniform number per row. torch.multinomial draws one random
    # number per vocabulary entry, which on the CPU costs more than the rest of the step's sampling.
    cdf = F.softmax(logits, -1).cumsum(-1)                                   # (B, V)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)  # the first entry whose cdf exceeds u
    return idx.clamp_(max=cdf.size(1) - 1)                   # u can round up to the total


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


@torch.no_grad()
def generate_completions(model, tok, prompts, temperature=0.0, max_new_tokens=None,
                         batch_size=256, generator=None, top_k=None, progress=""):
    """Generate a completion (list of ids, eos-trimmed) for each prompt, in batches.

    progress: a label; when given, one line per batch with the count done and an ETA.
    """
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    outs, t0 = [], time.time()
    for i in range(0, len(prompts), batch_size):
        if progress and i:
            print(f"{progress}: {i:,}/{len(prompts):,} completions | "
                  f"eta {format_eta((time.time() - t0) / i * (len(prompts) - i))}", flush=True)
        chunk = prompts[i:i + batch_size]
        idx, mask = left_pad(chunk, tok.eot, device)
        new = min(max_new_tokens or block, block - idx.size(1))
        seqs = model.generate(idx, new, temperature=temperature, top_k=top_k, eos_id=tok.eot,
                              prompt_mask=mask, generator=generator)
        outs.extend(seqs[:, idx.size(1):].tolist())
    return [o[:o.index(tok.eot) + 1] if tok.eot in o else o for o in outs]



# ----------------------------------------------------------------------------
# tokenizer: tiktoken with our own rank file

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arith", "tokenizer.tiktoken")
# split pattern: words with their leading space, ONE digit per piece (a leading space may stay
# with the digit: splitting it off measured worse, 5.8% vs 15% SFT accuracy), punctuation, spaces
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
# step-level rewards (DESIGN §5): alignment, quality, coherence, and their softmax fusion


class TfidfEncoder:
    """The fixed sentence encoder Φ: a TF-IDF-weighted bag of token unigrams and bigrams.

    Deterministic and needs no training: the inverse document frequencies are counted on
    the steps it is fitted on. Features are hashed into `dim` buckets so that a batch of
    steps becomes one dense (n, dim) matrix and every cosine is a matrix product.
    Our choice: the paper does not say which encoder Φ it uses.
    """

    def __init__(self, dim=4096):
        self.dim = dim
        self.idf = torch.ones(dim)

    def features(self, ids):
        """Hashed uni- and bigram buckets of one step's token ids."""
        uni = [i % self.dim for i in ids]
        bi = [(a * 1_000_003 + b * 7919) % self.dim for a, b in zip(ids, ids[1:])]
        return uni + bi

    def fit(self, steps_ids):
        df = torch.zeros(self.dim)
        for ids in steps_ids:
            df[list(set(self.features(ids)))] += 1
        self.idf = torch.log((1 + len(steps_ids)) / (1 + df)) + 1.0
        return self

    def encode(self, steps_ids):
        """L2-normalised TF-IDF vectors (n, dim) of a list of token-id lists."""
        rows, cols = [], []
        for r, ids in enumerate(steps_ids):
            feats = self.features(ids)
            rows += [r] * len(feats)
            cols += feats
        X = torch.zeros(len(steps_ids), self.dim)
        X.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                     torch.ones(len(rows)), accumulate=True)
        X = X * self.idf
        return F.normalize(X, dim=1)


@torch.no_grad()
def policy_encoder(model, tok):
    """The alternative Φ: the policy LM's mean-pooled final hidden states (batched)."""
    def encode(steps_ids):
        out = []
        for i in range(0, len(steps_ids), 256):
            chunk = [ids[:model.config.block_size] or [tok.eot] for ids in steps_ids[i:i + 256]]
            T = max(len(c) for c in chunk)
            idx = torch.full((len(chunk), T), tok.eot, dtype=torch.long)
            mask = torch.zeros(len(chunk), T)
            for j, c in enumerate(chunk):
                idx[j, :len(c)], mask[j, :len(c)] = torch.tensor(c), 1.0
            h = model.hidden(idx.to(next(model.parameters()).device)).float().cpu()  # (n, T, C)
            out.append(F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=1))
        return torch.cat(out)
    return encode


def alignment_reward(step_vecs, resp_vecs, step_rec, resp_rec):
    """r_align(t) = max_j cos(Φ(s_t), Φ(a_j)): how well thinking step t is reflected in the response.

    The paper pairs s_t with a_t after merging steps until the counts match; the max over
    response steps a_j of the same record is the general form, and needs no merging rule.
    step_vecs (S, D), resp_vecs (R, D) normalised; step_rec (S,), resp_rec (R,) record ids.
    A record with no response step gets 0.
    """
    sims = step_vecs @ resp_vecs.T                                   # (S, R)
    same = step_rec[:, None] == resp_rec[None, :]                    # (S, R)
    best = sims.masked_fill(~same, float("-inf")).max(1).values if len(resp_rec) else torch.full((len(step_rec),), float("-inf"))
    return torch.where(torch.isfinite(best), best, torch.zeros_like(best)).clamp(min=0)


def coherence_reward(prev_vecs, step_vecs, neg_vecs, tau=0.1, rescaled=False):
    """r_coh(t) = log softmax over {cos(s_{t-1}, s_t)/τ} ∪ {cos(s_{t-1}, n_k)/τ}, at s_t.

    A contrastive (InfoNCE-style) estimate of the mutual information between consecutive
    steps: the true successor must look more like s_{t-1} than K steps drawn from other
    trajectories. As written it is a log-probability (≤ 0). `rescaled=True` returns the
    probability itself, in [0, 1] like the other two rewards (our variant).
    prev_vecs, step_vecs (S, D); neg_vecs (S, K, D).
    """
    pos = (prev_vecs * step_vecs).sum(-1, keepdim=True)              # (S, 1)
    neg = torch.einsum("sd,skd->sk", prev_vecs, neg_vecs)             # (S, K)
    logp = F.log_softmax(torch.cat([pos, neg], 1) / tau, dim=1)[:, 0]  # (S,)
    return logp.exp() if rescaled else logp


def fuse_rewards(*rewards):
    """r_step(t) = Σ_k softmax([r_align, r_qual, r_coh])_k · r_k  (the paper's fusion).

    Each step weighs its own rewards by their softmax: a reward that is high counts more.
    Called with the three components (or any subset, e.g. to drop coherence).
    Returns (r_step (S,), weights (S, K)); the weights sum to 1 per step.
    """
    R = torch.stack(rewards, dim=-1)                                  # (S, K)
    w = F.softmax(R, dim=-1)
    return (w * R).sum(-1), w


@torch.no_grad()
def trajectory_reward(policy, tok, records, n_rollouts=4, temperature=1.0, generator=None, batch_size=512,
                      progress=""):
    """r_final = (1/N) Σ_j verify(y_j), y_j ~ π(· | x, template(s))  (template-guided reward).

    The expert turns each thinking trajectory into a template (its strategy, operations
    without results); the policy answers the question N times following that template, in
    one batched KV-cache generation across all records; the reward is the fraction of
    verified-correct answers. A trajectory with no readable strategy gets 0.
    """
    plans = [task.template(r["thinking"]) for r in records]
    prompts = [encode_prompt(tok, r["question"], p) for r, p in zip(records, plans) for _ in range(n_rollouts)]
    comps = generate_completions(policy, tok, prompts, temperature=temperature,
                                 max_new_tokens=96, generator=generator, batch_size=batch_size, progress=progress)
    right = torch.tensor([task.verify(tok.enc.decode([i for i in c if i < tok.eot]), records[k // n_rollouts]["answer"])
                          for k, c in enumerate(comps)], dtype=torch.float).view(len(records), n_rollouts)
    has_plan = torch.tensor([bool(p) for p in plans], dtype=torch.float)
    return right.mean(1) * has_plan


# ----------------------------------------------------------------------------
# the PRM: the GPT backbone plus a scalar head read at step ends


def prm_tokens(tok, question, thinking, response, block_size=None):
    """Token ids of a record and its read positions.

    Layout as the policy reads it (prompt, thinking, <|/think|>, response, <|endoftext|>).
    A step's score is read at the token that ends it: the newline after a thinking line (or
    <|/think|> after the last), the newline after a response line, and the final eot for
    the trajectory. Past block_size the ids are cut and positions clamped to the last token.
    Returns (ids, thinking positions, response positions, end position, truncated?).
    """
    nl = tok.enc.encode_ordinary("\n")
    ids = encode_prompt(tok, question)
    think_pos, resp_pos = [], []
    for i, line in enumerate(thinking):
        ids += tok.enc.encode_ordinary(str(line))
        think_pos.append(len(ids))
        ids += nl if i < len(thinking) - 1 else [tok.end_think]
    if not thinking:
        ids.append(tok.end_think)
    for i, line in enumerate(response):
        ids += tok.enc.encode_ordinary(str(line))
        resp_pos.append(len(ids))
        ids += nl if i < len(response) - 1 else [tok.eot]
    if not response:
        ids.append(tok.eot)
    end_pos = len(ids) - 1
    truncated = block_size is not None and len(ids) > block_size
    if truncated:
        ids = ids[:block_size]
        clamp = lambda ps: [min(p, block_size - 1) for p in ps]
        think_pos, resp_pos, end_pos = clamp(think_pos), clamp(resp_pos), block_size - 1
    return ids, think_pos, resp_pos, end_pos, truncated


def score_batch_size(device):
    """Rows per PRM forward when scoring. On a CPU, 16 rows of <= 256 tokens keep a layer's
    activations in cache; 64 or 256 rows stream them through memory and score 1.2-1.5x fewer
    tokens/s (README, Performance). On a GPU, large batches: fewer kernel launches."""
    return 16 if torch.device(device).type == "cpu" else 256


class PRM(nn.Module):
    """R_φ: the GPT backbone (normally initialised from the policy) and a scalar reward head.

    forward(idx) -> (B, T) scores in (0, 1), one per position; callers read step ends.
    """

    def __init__(self, cfg):
        super().__init__()
        self.gpt = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.config = cfg
        self.tok = None      # set by load_prm, for score()
        self.alpha = 1.0     # total = mean(step) + alpha * trajectory (the paper's headline α)
        self.mode = "full"   # "response_only": the baseline reads thinking steps as response steps

    def forward(self, idx):
        return torch.sigmoid(self.head(self.gpt.hidden(idx)).squeeze(-1).float())

    @torch.no_grad()
    def score(self, records, batch_size=None):
        """Score pool-format records: per thinking step, per response step, the trajectory, the total.

        Returns [{"step": [...], "response": [...], "trajectory": t, "total": mean(step) + α·t}].
        Any number of records, batched, no grad; inputs longer than the context are truncated
        (counted in `self.truncated`), so scores are always finite.
        """
        self.eval()
        device = next(self.parameters()).device
        batch_size = batch_size or score_batch_size(device)
        encoded = [encode_for_prm(self.tok, r, self.mode, self.config.block_size) for r in records]
        self.truncated = sum(e[4] for e in encoded)
        if self.truncated:
            print(f"warning: {self.truncated} of {len(records)} records longer than "
                  f"block_size={self.config.block_size}, truncated")
        order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][0]))  # similar lengths, less padding
        out = [None] * len(encoded)
        for i in range(0, len(order), batch_size):
            chunk = [encoded[k] for k in order[i:i + batch_size]]
            T = max(len(e[0]) for e in chunk)
            idx = torch.full((len(chunk), T), self.tok.eot, dtype=torch.long)
            for j, e in enumerate(chunk):  # right padding: causal attention never looks at it
                idx[j, :len(e[0])] = torch.tensor(e[0])
            s = self(idx.to(device)).cpu().tolist()
            for j, (ids, tp, rp, end, _) in enumerate(chunk):
                step = [s[j][p] for p in tp]
                traj = s[j][end]
                rec = {"step": step, "response": [s[j][p] for p in rp], "trajectory": traj}
                out[order[i + j]] = {**rec, "total": prm_total(rec, self.alpha)}
        return out


def prm_total(score, alpha):
    """The paper's record score: mean_t R(step t) + α · R(trajectory); a record without thinking
    steps has mean step score 0. α = 0 gives the step score alone (the paper's α ablation)."""
    step = score["step"]
    return (sum(step) / len(step) if step else 0.0) + alpha * score["trajectory"]


def encode_for_prm(tok, record, mode="full", block_size=None):
    """prm_tokens for a record as a PRM of `mode` reads it.

    mode "full" (ReasonFlux-PRM): thinking and response. "response_only" (the baseline,
    trained on final responses only): the thinking slot is left empty; the record's
    thinking lines, when scored, are read in the response slot, one step per line,
    which is how a response-trained PRM is applied to a thinking trajectory.
    """
    thinking, response = list(record.get("thinking") or []), list(record.get("response") or [])
    if mode == "full":
        return prm_tokens(tok, record["question"], thinking, response, block_size)
    if mode == "response_only":
        ids, _, rp, end, cut = prm_tokens(tok, record["question"], [], thinking + response, block_size)
        return ids, rp[:len(thinking)], rp[len(thinking):], end, cut
    raise ValueError(f"unknown PRM mode {mode!r}")


def prm_loss(scores, step_targets, final_targets, lam_step=1.0, lam_final=1.0):
    """L = λ_step · mean_t (R(step t) − r_step(t))² + λ_final · (R(traj) − r_final)².

    scores (B, T) from PRM.forward; step_targets, final_targets (B, T) hold the target at
    read positions and NaN elsewhere, so only read positions receive a gradient. The step
    mean is over all step positions of the batch.
    """
    def masked_mse(t):
        m = ~torch.isnan(t)
        if not m.any():
            return scores.sum() * 0.0
        return ((scores[m] - t[m]) ** 2).mean()
    return lam_step * masked_mse(step_targets) + lam_final * masked_mse(final_targets)


def load_prm(path, device=None):
    """Load a trained PRM (from train_prm.py) ready to `score` records."""
    device = device or pick_device()
    ckpt = load_checkpoint(path, kind="prm")
    cfg = ckpt["config"]
    tok = Tok(load_tokenizer(cfg["tokenizer"]))
    if ckpt["vocab"] != vocab_fingerprint(tok.enc):
        raise ValueError(f"{path}: made with vocabulary {ckpt['vocab']}, but {cfg['tokenizer']} is now "
                         f"{vocab_fingerprint(tok.enc)}; retrain the PRM")
    prm = PRM(GPTConfig(**ckpt["model_args"]))
    prm.load_state_dict(ckpt["model"])
    prm.tok, prm.alpha, prm.mode = tok, cfg.get("alpha", 1.0), ckpt.get("mode", "full")
    return prm.to(device).eval()


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
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda") and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"torchrun started more processes per node than there are GPUs "
                         f"({torch.cuda.device_count()}): lower --nproc_per_node, or pass --device=cpu (gloo)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
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


# ----------------------------------------------------------------------------
# python rfprm.py score FILE.jsonl: see what a trained PRM thinks of each step


def colour(text, score, tty):
    """Green for a high score, yellow for a middling one, red for a low one (only on a terminal)."""
    if not tty:
        return text
    code = 32 if score >= 0.7 else 33 if score >= 0.4 else 31
    return f"\033[{code}m{text}\033[0m"


def show_scores(record, s, tty):
    """One record with its scores, one line per step; `meta` (hidden truth) is shown, never used."""
    truth = (record.get("meta") or {}).get("step_ok")
    print(f"Q: {record['question']}" + (f"   (answer {record['answer']})" if "answer" in record else ""))
    for t, (line, x) in enumerate(zip(record.get("thinking") or [], s["step"])):
        mark = "" if truth is None or t >= len(truth) else ("" if truth[t] else "   <- wrong (hidden truth)")
        print(f"  think {colour(f'{x:.2f}', x, tty)}  {line}{mark}")
    for line, x in zip(record.get("response") or [], s["response"]):
        print(f"  resp  {colour(f'{x:.2f}', x, tty)}  {line}")
    flaw = (record.get("meta") or {}).get("flaw")
    print(f"  trajectory {s['trajectory']:.2f}, total {s['total']:.2f}" + (f"   (flaw: {flaw})" if flaw else "") + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print each record of a jsonl file with a PRM's per-step scores.")
    parser.add_argument("command", choices=["score"])
    parser.add_argument("file", help="pool-format jsonl: question, thinking, response per line")
    parser.add_argument("--prm", default="out/prm/ckpt.pt", help="a checkpoint from train_prm.py")
    parser.add_argument("--n", type=int, default=10, help="how many records to show (0 = all)")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)
    records = read_jsonl(args.file, ("question", "thinking", "response"))
    records = records[:args.n] if args.n else records
    prm = load_prm(args.prm, pick_device(args.device))
    tty = sys.stdout.isatty()
    for record, s in zip(records, prm.score(records)):
        show_scores(record, s, tty)


if __name__ == "__main__":
    main()
