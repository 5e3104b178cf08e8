"""
rfprm: the whole ReasonFlux-PRM — its step and trajectory rewards, the PRM and its loss.

Run `python rfprm.py score FILE.jsonl` to see a trained PRM's per-step scores.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import task
from model import GPT, GPTConfig, Tok, load_tokenizer, vocab_fingerprint, encode_prompt
from training import (load_checkpoint, pick_device, read_jsonl, generate_completions, argument_parser, require,
                      run_main, record_names, BadInput)

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
        cut = [k for k, e in enumerate(encoded) if e[4]]
        self.truncated = len(cut)
        if cut:
            print(f"warning: {len(cut)} of {len(records)} records longer than "
                  f"block_size={self.config.block_size}, truncated: {record_names(records, cut)}")
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
        raise BadInput(f"{path}: made with vocabulary {ckpt['vocab']}, but {cfg['tokenizer']} is now "
                       f"{vocab_fingerprint(tok.enc)}; retrain the PRM")
    prm = PRM(GPTConfig(**ckpt["model_args"]))
    prm.load_state_dict(ckpt["model"])
    prm.tok, prm.alpha, prm.mode = tok, cfg.get("alpha", 1.0), ckpt.get("mode", "full")
    return prm.to(device).eval()


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
    parser = argument_parser(description="Print each record of a jsonl file with a PRM's per-step scores.")
    parser.add_argument("command", choices=["score"])
    parser.add_argument("file", help="pool-format jsonl: question, thinking, response per line")
    parser.add_argument("--prm", default="out/prm/ckpt.pt", help="a checkpoint from train_prm.py")
    parser.add_argument("--n", type=int, default=10, help="how many records to show (0 = all)")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)
    require(args.n >= 0, f"--n must be at least 0 (0 = all), got {args.n}")
    records = read_jsonl(args.file, ("question", "thinking", "response"))
    records = records[:args.n] if args.n else records
    prm = load_prm(args.prm, pick_device(args.device))
    tty = sys.stdout.isatty()
    for record, s in zip(records, prm.score(records)):
        show_scores(record, s, tty)


if __name__ == "__main__":
    run_main(main)
