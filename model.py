"""
model: the small GPT and its KV-cache generation (what nanoGPT keeps in model.py).

`GPT`: a decoder-only transformer (pre-norm blocks, fused qkv projection, rotary position
embeddings, attention through F.scaled_dot_product_attention, tied embeddings, GPT-2 init) with
batched KV-cache generation. Rotary rather than learned absolute positions: an operation's operands
sit a few tokens back wherever the line starts, and rotary embeddings make such relative offsets
native. The tokenizer and the text layout of a record are in tokenizer.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    batched matmuls are faster than the fused kernel, whose tiling is built for many queries
    (bench.py measures both).
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
        """Keep only the batch rows where keep (B,) is True (rows that finished are dropped).

        Only the written part [0, pos) is copied: the rest of a new cache is written before it is read.
        """
        rows = keep.nonzero().squeeze(1)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((len(rows),) + old.shape[1:])
            new[:, :, :self.pos] = old[:, :, :self.pos].index_select(0, rows)
            setattr(self, name, new)


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
