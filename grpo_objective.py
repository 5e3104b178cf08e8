"""
grpo_objective: what GRPO optimises (grpo.py runs it), with the equations of grpo.py's docstring.

* advantages: group-normalised outcome advantages (`group_advantages`, Dr. GRPO by default) and
  process advantages, a reward-to-go of per-step rewards (`process_advantages`);
* `grpo_loss`: the clipped surrogate with the k3 KL against the reference policy, per token;
* `token_logprobs`: log-probabilities of given tokens at the sampling temperature (the ratio and KL);
* `optimise`: μ passes over a rollout batch, one AdamW step each, in chunks of similar lengths;
* `advantages_for`: a batch's advantages from its rewards, per token with process supervision
  (`process_inputs`: a thinking line's score at the token that ends it, `thinking_step_ends`).
"""

import math

import torch
import torch.nn.functional as F

from training import autocast_for


# ----------------------------------------------------------------------------
# advantages and the loss


def group_advantages(rewards, group_size, scale_std=False, eps=1e-4):
    """Â_i = r_i − mean(r_group) (Dr. GRPO, grpo.py's default: ours, the module docstring says why);
    scale_std=True: GRPO's (r_i − mean(r_group)) / (std(r_group) + ε) (DeepSeekMath eq. 3's Â).

    rewards (N,) with N = n_groups * group_size, groups contiguous -> (N,). std is the unbiased
    one (as TRL). A group whose rewards are all equal gets 0.

    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 2).tolist()
    [0.5, -0.5, 0.0, 0.0]
    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 2, scale_std=True).tolist()
    [0.7070068..., -0.7070068..., 0.0, 0.0]
    """
    r = rewards.float().view(-1, group_size)                      # (n_groups, G)
    a = r - r.mean(1, keepdim=True)
    if scale_std:
        a = a / (r.std(1, keepdim=True) + eps)
    same = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)     # exactly 0, not rounding error / ε
    return a.masked_fill(same, 0.0).view(-1)


def process_advantages(step_rewards, step_pos, step_mask, group_size, T, scale_std=False, eps=1e-4):
    """Process supervision (DeepSeekMath §4.1.3): Â_t = Σ_{j: pos_j ≥ t} r̃_j, r̃ = step rewards normalised over the group.

    step_rewards, step_pos (B, S): the reward of step j and the token position that ends it;
    step_mask (B, S) True at real steps. r̃_j = r_j − mean(R) (Dr. GRPO; scale_std: / (std(R) + ε)), R = every step
    reward of the G completions of the question. Returns (B, T): the reward-to-go of each token.
    """
    B, S = step_rewards.shape
    r = step_rewards.float().view(-1, group_size * S)              # (n_groups, G*S)
    m = step_mask.view(-1, group_size * S).float()
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (r * m).sum(1, keepdim=True) / n
    a = r - mean
    if scale_std:
        var = ((a * m) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        a = a / (var.sqrt() + eps)
    same = r.masked_fill(m == 0, -math.inf).amax(1) == r.masked_fill(m == 0, math.inf).amin(1)
    a = (a * m).masked_fill(same[:, None], 0.0).view(B, S)          # all steps equal: exactly 0
    per_token = torch.zeros(B, T).scatter_add_(1, step_pos.clamp(0, T - 1), a)  # r̃_j at the step's last token
    return per_token.flip(1).cumsum(1).flip(1)                      # reward-to-go: Σ over positions ≥ t


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.04,
              clip_high=None, agg="token"):
    """The clipped-ratio GRPO loss with a k3 KL penalty (DeepSeekMath eq. 3 and 4), to minimise.

    logp, old_logp, ref_logp, mask (B, T): log-probs of the sampled tokens under π_θ, π_old, π_ref
    and True at completion tokens; advantages (B,) per completion or (B, T) per token.
    Per token: −[min(ρÂ, clip(ρ, 1 − ε, 1 + ε_high)Â) − β_KL·(e^{ref−logp} − (ref − logp) − 1)].
    agg="token": mean over all completion tokens of the batch; "sequence": mean per completion, then
    over completions. ref_logp may be None when kl_coef = 0.
    Returns (loss, stats) with stats detached 0-dim tensors: pg, kl, clip_frac, ratio.
    """
    mask = mask.float()
    adv = advantages[:, None] if advantages.dim() == 1 else advantages   # (B, 1) or (B, T)
    hi = clip_eps if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + hi) * adv)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1                                     # k3: unbiased, ≥ 0
    else:
        kl = torch.zeros_like(logp)
    per_token = -(surr - kl_coef * kl)

    def mean(x):
        if agg == "token":
            return (x * mask).sum() / mask.sum().clamp(min=1)
        if agg == "sequence":
            return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        raise ValueError(f"agg must be 'token' or 'sequence', got {agg!r}")

    loss = mean(per_token)
    clipped = ((adv > 0) & (ratio > 1 + hi)) | ((adv < 0) & (ratio < 1 - clip_eps))
    with torch.no_grad():
        stats = {"pg": mean(-surr), "kl": mean(kl), "clip_frac": mean(clipped.float()), "ratio": mean(ratio)}
    return loss, stats


# ----------------------------------------------------------------------------
# log-probs and one optimisation step


def token_logprobs(model, X, Y, temperature, with_entropy=False):
    """log π(Y_t | X_≤t) at the sampling temperature (B, T), and the entropy per position (detached) if asked.

    The sampler drew from softmax(logits / τ), so the ratio and the KL must use the same distribution.
    Positions with Y = −1 get log-prob 0 (masked out by the caller).
    """
    with autocast_for(X.device):
        logits, _ = model(X)                                              # (B, T, V)
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, Y.clamp(min=0)[..., None]).squeeze(-1)     # (B, T)
    logp = logp.masked_fill(Y < 0, 0.0)
    ent = None
    if with_entropy:
        with torch.no_grad():
            lp = logp_all.detach()
            ent = -(lp.exp() * lp).sum(-1)                                # (B, T)
    return logp, ent


def length_chunks(Y, n_chunks):
    """Rows sorted by length, cut into n_chunks, each with the width its longest row needs.

    Right padding to the batch's longest completion wastes about a third of the tokens of a
    rollout batch; chunks of similar lengths waste far less. Returns [(rows, width)].
    """
    lengths = torch.where(Y >= 0, torch.arange(1, Y.size(1) + 1, device=Y.device), 0).amax(1)  # (B,) last target + 1
    order = lengths.argsort(descending=True)
    return [(rows, max(1, int(lengths[rows[0]]))) for rows in order.chunk(n_chunks) if len(rows)]


def optimise(model, ref_model, optimizer, X, Y, advantages, cfg):
    """μ passes of the GRPO loss on one rollout batch, one optimiser step each; returns stats (tensors).

    π_old is the policy that sampled the batch, i.e. the model before the first pass: its
    log-probs are the first pass's, detached (no extra forward). With μ = 1 the ratio is 1.
    The batch goes through in cfg.chunks chunks of similar lengths (gradients accumulated); each
    chunk's loss is weighted by its share of the batch's tokens (token averaging) or rows
    (sequence averaging), so the step is the one the whole batch would give.
    """
    mask = Y >= 0
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(Y)   # (B, T)
    chunks = length_chunks(Y, cfg.chunks)
    # each chunk's weight: its share of the batch's tokens (token averaging) or rows (sequence averaging)
    shares = [mask[rows].sum() / mask.sum().clamp(min=1) if cfg.loss_agg == "token" else len(rows) / len(Y)
              for rows, _ in chunks]
    ref_logp = torch.zeros(Y.shape, device=Y.device)
    if cfg.kl_coef > 0:
        with torch.no_grad():
            for rows, w in chunks:
                ref_logp[rows, :w] = token_logprobs(ref_model, X[rows, :w], Y[rows, :w], cfg.temperature)[0]
    old_logp, entropy = torch.zeros(Y.shape, device=Y.device), 0.0
    for k in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        loss, stats = 0.0, {}
        for (rows, w), share in zip(chunks, shares):
            logp, ent = token_logprobs(model, X[rows, :w], Y[rows, :w], cfg.temperature, with_entropy=(k == 0))
            if k == 0:
                old_logp[rows, :w] = logp.detach()
                entropy = entropy + (ent * mask[rows, :w]).sum() / mask.sum()
            part, part_stats = grpo_loss(logp, old_logp[rows, :w], ref_logp[rows, :w] if cfg.kl_coef > 0 else None,
                                         adv[rows, :w], mask[rows, :w], cfg.clip_eps, cfg.kl_coef,
                                         cfg.clip_high or None, cfg.loss_agg)
            (part * share).backward()
            loss = loss + part.detach() * share
            stats = {n: stats.get(n, 0.0) + v * share for n, v in part_stats.items()}
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    return {"loss": loss, "entropy": entropy, "grad_norm": gnorm, **stats}


# ----------------------------------------------------------------------------
# advantages from the rewards: outcome, or per step (process supervision)


def token_tables(tok, vocab_size):
    """Per token id: does it contain a newline, is it blank (what split_completion drops)."""
    newline = torch.zeros(vocab_size, dtype=torch.bool)
    blank = torch.ones(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, tok.eot)):  # once: the ordinary tokens
        s = tok.enc.decode([i], errors="replace")
        newline[i], blank[i] = "\n" in s, not s.strip()
    return newline, blank


def thinking_step_ends(Y, tok, tables):
    """(B, T) True at the token that ends each non-blank thinking line, as split_completion splits them.

    A line ends at a newline token or at <|/think|>; a line with no visible character is not a
    step (split_completion drops it). Y is a target tensor (−1 outside the completion).
    """
    newline, blank = tables
    ids, mask = Y.clamp(min=0), Y >= 0
    is_end_think = (Y == tok.end_think)
    in_think = mask & (is_end_think.long().cumsum(1) - is_end_think.long() == 0)   # up to </think> included
    brk = in_think & (newline[ids] | is_end_think)
    content = (in_think & ~blank[ids] & ~is_end_think).long().cumsum(1)              # visible tokens so far
    at_last_break = torch.where(brk, content, 0).cummax(1).values
    before = F.pad(at_last_break[:, :-1], (1, 0))                                    # at the previous break
    return brk & (content > before)


def process_inputs(Y, scores, alpha, tok, tables):
    """Step rewards, positions and mask (B, S+1) for process_advantages, from PRM scores of each row.

    Thinking step j's score goes to the token ending line j (a line without an end, e.g. cut by
    max_new_tokens, to the last token); α·R_φ(trajectory) to the last completion token.
    """
    B, T = Y.shape
    S = max(1, max(len(s["step"]) for s in scores))
    ar = torch.arange(T).expand(B, T)
    last = torch.where(Y >= 0, ar, -1).max(1).values                     # (B,)
    ends = thinking_step_ends(Y, tok, tables)
    pos = torch.where(ends, ar, T).sort(1).values[:, :S]                 # first S line ends, T = none
    if pos.size(1) < S:
        pos = F.pad(pos, (0, S - pos.size(1)), value=T)
    pos = torch.where(pos == T, last[:, None], pos)
    r = torch.zeros(B, S)
    n = torch.tensor([len(s["step"]) for s in scores])
    for i, s in enumerate(scores):  # padding a ragged list once per step
        r[i, :len(s["step"])] = torch.tensor(s["step"], dtype=torch.float)
    traj = torch.tensor([alpha * s["trajectory"] for s in scores])
    step_mask = torch.arange(S)[None] < n[:, None]
    return (torch.cat([r, traj[:, None]], 1), torch.cat([pos, last[:, None]], 1),
            torch.cat([step_mask, torch.ones(B, 1, dtype=torch.bool)], 1))


def advantages_for(Y, rew, tok, tables, cfg):
    """Outcome advantages (B,), or with process supervision per-token advantages (B, T)."""
    if not cfg.process:
        return group_advantages(rew["reward"], cfg.group_size, cfg.scale_std)
    if rew["scores"] is None:
        raise ValueError("--process needs --reward=prm or --reward=mix (it reads the PRM's step scores)")
    r, pos, m = process_inputs(Y, rew["scores"], cfg.alpha, tok, tables)
    a_proc = process_advantages(r, pos, m, cfg.group_size, Y.size(1), cfg.scale_std)
    beta = 1.0 if cfg.reward == "prm" else cfg.beta
    a_rule = group_advantages(rew["rule"], cfg.group_size, cfg.scale_std)
    return (1 - beta) * a_rule[:, None] + beta * a_proc
