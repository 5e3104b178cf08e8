"""
rewards: ReasonFlux-PRM's reward design (Zou et al., 2025, arXiv 2506.18896), what the PRM is trained
on. For a question x, thinking steps s_1..s_T and a final response a_1..a_J:

    r_align(t) = max_j cos(Φ(s_t), Φ(a_j))                                alignment_reward
    r_qual(t)  = judge(x, s_<t, s_t, a)                                     task.judge (the expert)
    r_coh(t)   = log softmax over {s_t} ∪ negatives of cos(Φ(s_{t-1}), Φ(·)) / τ   coherence_reward
    r_fused(t) = Σ_k softmax([r_align, r_qual, r_coh])_k · r_k             fuse_rewards
    r_step(t)  = 1[r_qual ≥ ½] · (¾ + ¼ · clamp(r_fused(t), 0, 1))          gated_fusion (ours, below)
    r_final    = (1/N) Σ_j verify(y_j),  y_j ~ π(· | x, template(s))       trajectory_reward

Two of rfprm.py's four departures from the paper are here, each named in its function's docstring
(its paper form is an option of train_prm.py and a row of its table):
 2. fusion: the expert's verdict decides the band, the paper's fusion ranks within it (gated_fusion);
 3. trajectory reward: r_final relative to the policy's own success on the question (relative_final).

    python rfprm.py design data/arith/train.jsonl --n=2      # the reward design of a record, step by step
"""

import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import task
from files import read_jsonl, load_cache, save_checkpoint, BadInput
from tokenizer import Tokenizer, load_tokenizer, encode_prompt, encode_completion, completion_record
from options import require
from checkpoints import load_checkpoint, model_from_checkpoint
from evaluate import generate_and_verify
from training import pick_device

# ----------------------------------------------------------------------------
# Φ and the step-level rewards: alignment, quality (task.judge), coherence, fusion


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
    if not len(resp_rec):
        return torch.zeros(len(step_rec))
    best = sims.masked_fill(~same, float("-inf")).max(1).values
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
    """r_fused(t) = Σ_k softmax([r_align, r_qual, r_coh])_k · r_k  (the paper's fusion; its r_step).

    Each step weighs its own rewards by their softmax: a reward that is high counts more.
    Called with the three components (or any subset, e.g. to drop coherence).
    Returns (r_fused (S,), weights (S, K)); the weights sum to 1 per step.
    """
    R = torch.stack(rewards, dim=-1)                                  # (S, K)
    w = F.softmax(R, dim=-1)
    return (w * R).sum(-1), w


def gated_fusion(fused, quality, floor=0.75):
    """r_step(t) = 1[r_qual(t) ≥ ½] · (f + (1 − f) · clamp(r_fused(t), 0, 1)), f = floor = ¾
    (ours; the default fusion).

    The paper's softmax fusion ranks a slipped step that the response repeats (high alignment)
    above a correct filler line that it does not, so a PRM that learns it cannot find the first
    error. Here the expert's verdict decides the band: a step it judges wrong (r_qual < ½) gets
    0, a step it judges right or harmless gets a label in [¾, 1], and within that band the
    paper's fusion ranks it (a correct computation the response repeats above a filler). So no
    step judged wrong ever ranks above a step judged right, whatever its alignment and coherence.
    The floor is how much of the scale the paper's fusion gives up. fused, quality (S,) -> (S,).

    >>> gated_fusion(torch.tensor([0.9, 0.1, -0.3]), torch.tensor([0.0, 0.5, 1.0])).tolist()
    [0.0, 0.7749999761581421, 0.75]
    """
    return torch.where(quality >= 0.5, floor + (1 - floor) * fused.clamp(0, 1), torch.zeros_like(fused))


# ----------------------------------------------------------------------------
# the reward design over records: what "previous step", "negatives" and "template" mean here


def step_rewards(records, tok, encode, tau=0.1, n_negatives=8, judge_noise=0.0, seed=0):
    """r_align, r_qual, r_coh (as written, ≤ 0) for every thinking step of every record, and the
    record of each step: flat tensors (S,), in record order.

    `encode` maps token-id lists to normalised vectors (Φ). A step's previous step is the line
    before it; the first step's is the question. Its K coherence negatives are random steps of
    *other* records. judge_noise > 0 makes a noisier expert: r_qual ← (1 − n)·judge + n·U(0, 1).
    """
    g = torch.Generator().manual_seed(seed)
    think = [[tok.enc.encode_ordinary(str(l)) for l in r["thinking"]] for r in records]
    resp = [[tok.enc.encode_ordinary(str(l)) for l in r["response"]] for r in records]
    steps = torch.cat([encode(sum(think[i:i + 500], [])) for i in range(0, len(think), 500)])
    step_rec = torch.tensor([k for k, t in enumerate(think) for _ in t], dtype=torch.long)
    S = len(step_rec)

    r_align = torch.zeros(S)
    for lo in range(0, len(records), 500):  # chunks of records keep the (S, R) matrix small
        hi = min(len(records), lo + 500)
        sel = (step_rec >= lo) & (step_rec < hi)
        rrec = torch.tensor([k for k in range(lo, hi) for _ in resp[k]], dtype=torch.long)
        r_align[sel] = alignment_reward(steps[sel], encode(sum(resp[lo:hi], [])), step_rec[sel], rrec)

    # quality: the expert judges each step (a Python call per step: it stands for an LLM call)
    r_qual = torch.tensor([task.judge(r["question"], r["thinking"][:t], line, r["response"])
                           for r in records for t, line in enumerate(r["thinking"])])
    if judge_noise > 0:
        r_qual = (1 - judge_noise) * r_qual + judge_noise * torch.rand(S, generator=g)

    questions = encode([tok.enc.encode_ordinary(r["question"]) for r in records])
    first = torch.ones(S, dtype=torch.bool)
    first[1:] = step_rec[1:] != step_rec[:-1]
    prev = torch.where(first[:, None], questions[step_rec], torch.roll(steps, 1, 0))
    neg = torch.randint(S, (S, n_negatives), generator=g)
    clash = step_rec[neg] == step_rec[:, None]
    neg = torch.where(clash, (neg + S // 2) % S, neg)  # a negative must come from another record
    r_coh = coherence_reward(prev, steps, steps[neg], tau)
    return r_align, r_qual, r_coh, step_rec


def response_quality(records):
    """The expert's judgement of every step of every final response (ours: the paper trains
    thinking steps only). A response that drifts from a right thinking shows only here."""
    return [[task.judge(r["question"], r["thinking"], line, r["response"]) for line in r["response"]]
            for r in records]


@torch.no_grad()
def trajectory_reward(policy, tok, records, n_rollouts=4, generator=None, progress=""):
    """r_final = (1/N) Σ_j verify(y_j), y_j ~ π(· | x, template(s))  (the paper's template-guided reward).

    The expert turns each thinking trajectory into a template (its strategy, operations
    without results); the policy answers the question N times following that template, in
    one batched KV-cache generation across all records (temperature 1); the reward is the
    fraction of verified-correct answers. A trajectory with no readable strategy gets 0.
    """
    plans = [task.template(r["thinking"]) for r in records]
    prompts = [encode_prompt(tok, r["question"], p) for r, p in zip(records, plans) for _ in range(n_rollouts)]
    answers = [r["answer"] for r in records for _ in range(n_rollouts)]
    _, right = generate_and_verify(policy, tok, prompts, answers, 1.0, 96, 512, generator, progress)
    right = torch.tensor(right, dtype=torch.float).view(len(records), n_rollouts)
    return right.mean(1) * torch.tensor([bool(p) for p in plans], dtype=torch.float)


@torch.no_grad()
def plain_success(policy, tok, records, n_rollouts=4, generator=None, progress=""):
    """p_0 = (1/N) Σ_j verify(y_j), y_j ~ π(· | x): the policy's own success on the question, no template."""
    prompts = [encode_prompt(tok, r["question"]) for r in records for _ in range(n_rollouts)]
    answers = [r["answer"] for r in records for _ in range(n_rollouts)]
    _, right = generate_and_verify(policy, tok, prompts, answers, 1.0, 160, 256, generator, progress)
    return torch.tensor(right, dtype=torch.float).view(len(records), n_rollouts).mean(1)


def relative_final(r_final, p0):
    """(r_final − p_0 + 1) / 2: what the trajectory's template adds to the policy's own success
    on the question (ours; the default trajectory reward).

    The paper's r_final is high on questions the policy finds easy whatever the trajectory, so
    a PRM that learns it pays for easy questions and small answers. Subtracting p_0
    (plain_success) asks instead whether following this trajectory's plan helps on this
    question. Mapped from [−1, 1] to [0, 1] for the sigmoid head.

    >>> relative_final([1.0, 0.5, 0.0], [1.0, 0.25, 0.5])
    [0.5, 0.625, 0.25]
    """
    return [(f - p + 1) / 2 for f, p in zip(r_final, p0)]


def design_rewards(records, tok, policy, encoder="tfidf", tau=0.1, n_negatives=8, n_rollouts=4,
                   judge_noise=0.0, seed=0):
    """Every reward of the design, per record: the three step rewards (both coherence forms),
    the expert's judgement of the response steps, r_final, p_0 and the outcome. The rows of
    train_prm.py's table pick from it, so it is computed once (and cached there)."""
    t0 = time.time()
    if encoder == "tfidf":
        lines = [tok.enc.encode_ordinary(str(l)) for r in records for l in r["thinking"] + r["response"]]
        encode = TfidfEncoder().fit(lines).encode
    else:
        encode = policy_encoder(policy, tok)
    r_align, r_qual, r_coh, step_rec = step_rewards(records, tok, encode, tau, n_negatives, judge_noise, seed)
    _, w = fuse_rewards(r_align, r_qual, r_coh)
    _, w_prob = fuse_rewards(r_align, r_qual, r_coh.exp())
    t_step = time.time() - t0
    print(f"reward design: step rewards for {len(step_rec):,} steps in {t_step:.1f}s; mean fusion weights "
          f"(align, quality, coherence) = ({w[:, 0].mean():.2f}, {w[:, 1].mean():.2f}, {w[:, 2].mean():.2f}) "
          f"as written, ({w_prob[:, 0].mean():.2f}, {w_prob[:, 1].mean():.2f}, {w_prob[:, 2].mean():.2f}) rescaled")
    device, n = next(policy.parameters()).device, len(records)
    g = torch.Generator(device=device).manual_seed(seed)  # where sampling runs
    r_final = trajectory_reward(policy, tok, records, n_rollouts, g, progress="template-guided rollouts")
    p0 = plain_success(policy, tok, records, n_rollouts, g, progress="rollouts without a template")
    t_traj = time.time() - t0 - t_step
    print(f"reward design: trajectory rewards in {t_traj:.1f}s, mean r_final {r_final.mean():.2f}, "
          f"mean p_0 {p0.mean():.2f}")
    counts = torch.bincount(step_rec, minlength=n).tolist()
    per_record = lambda x: [c.tolist() for c in torch.split(x, counts)]
    return {"align": per_record(r_align), "quality": per_record(r_qual),
            "coherence_logprob": per_record(r_coh), "coherence_prob": per_record(r_coh.exp()),
            "response_quality": response_quality(records),
            "final": r_final.tolist(), "p0": p0.tolist(),
            "outcome": [float(task.verify("\n".join(r["response"]), r["answer"])) for r in records],
            "seconds": {"step": t_step, "trajectory": t_traj},
            "fusion_weights": {"logprob": w.mean(0).tolist(), "prob": w_prob.mean(0).tolist()}}


# ----------------------------------------------------------------------------
# the PRM's labels (train_prm.py): the reward design (cached), picked and fused as the options say


def mc_response_labels(policy, tok, records, cfg):
    """Math-Shepherd-style labels for each response step: the fraction of policy completions,
    started after that step, that reach the right answer (the last step: the answer itself)."""
    prompts, owners = [], []
    for k, r in enumerate(records):
        base = encode_prompt(tok, r["question"]) + encode_completion(tok, r["thinking"], [])[:-1]
        for j in range(len(r["response"]) - 1):
            prefix = tok.enc.encode_ordinary("\n".join(r["response"][:j + 1]) + "\n")
            prompts += [base + prefix] * cfg.mc_rollouts
            owners.append((k, j))
    answers = [records[owners[n // cfg.mc_rollouts][0]]["answer"] for n in range(len(prompts))]
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)  # where sampling runs
    _, right = generate_and_verify(policy, tok, prompts, answers, 1.0, 64, 256, g, "Monte-Carlo rollouts")
    labels = [[0.0] * len(r["response"]) for r in records]
    for n, (k, j) in enumerate(owners):
        labels[k][j] = sum(right[n * cfg.mc_rollouts:(n + 1) * cfg.mc_rollouts]) / cfg.mc_rollouts
    for k, r in enumerate(records):
        labels[k][-1] = float(task.verify("\n".join(r["response"]), r["answer"]))
    return labels


DESIGN_KEYS = ("n_train", "policy_samples", "encoder", "tau", "n_negatives", "n_rollouts", "judge_noise", "seed")


MC_KEYS = ("mc_records", "mc_rollouts", "seed")


def cache_key(cfg, files, keys):
    """A key of a reward design's inputs: the files' contents and the settings that change it."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached(path, make):
    """Load a torch file if it exists and is readable, else make it and write it atomically."""
    obj = load_cache(path, "reward design")
    if obj is None:
        obj = make()
        save_checkpoint(path, obj)
    return obj


def step_labels(cfg, design):
    """The thinking-step labels of cfg.labels / cfg.fusion, per record (lists of floats)."""
    parts = {"align": design["align"], "quality": design["quality"],
             "coherence": design[f"coherence_{cfg.coherence}"]}
    if cfg.labels in parts:
        return parts[cfg.labels]
    names = [n.strip() for n in cfg.fuse.split(",") if n.strip()]
    if not names or any(n not in parts for n in names):
        raise BadInput(f"--fuse takes a comma-separated subset of align,quality,coherence; got {cfg.fuse!r}")
    counts = [len(x) for x in parts["quality"]]
    flat = lambda name: torch.tensor([v for rec in parts[name] for v in rec])
    fused, _ = fuse_rewards(*[flat(n) for n in names])
    if cfg.fusion == "gated":
        fused = gated_fusion(fused, flat("quality"))
    return [c.tolist() for c in torch.split(fused, counts)]


def sample_records(policy, tok, questions, seed):
    """One completion of the policy per question (temperature 1), as records with their answer.

    Ours: the distilled records show the teacher's flaws, but in GRPO and Best-of-N the PRM
    scores the policy's own completions, whose errors differ (an operand taken from the wrong
    place, a step done twice). Designed like the distilled records (the expert judges every
    step), they teach the PRM the errors it will meet. --on_policy=false leaves them out.
    """
    prompts = [encode_prompt(tok, q["question"]) for q in questions]
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    comps, _ = generate_and_verify(policy, tok, prompts, [q["answer"] for q in questions], 1.0, 160, 256, g,
                                   "policy samples")
    return [{"id": f"sample-{k}", **completion_record(tok, q["question"], c), "answer": q["answer"]}
            for k, (q, c) in enumerate(zip(questions, comps))]


def targets_for(cfg, records, questions, tok):
    """The training records and their targets {"step", "response", "final", "approved"} for cfg's
    labels, from the cached reward design over the distilled records and the policy's samples of
    `questions`."""
    files = [cfg.data, cfg.policy]
    load_policy = lambda: model_from_checkpoint(load_checkpoint(cfg.policy, kind="policy", enc=tok.enc),
                                                pick_device(cfg.device)).eval()
    if cfg.labels == "mc":
        path = os.path.join(cfg.cache_dir, f"mc-{cache_key(cfg, files, MC_KEYS)}.pt")
        mc = cached(path, lambda: {"response": mc_response_labels(load_policy(), tok, records[:cfg.mc_records], cfg)})
        return records[:len(mc["response"])], [{"step": [], "response": lab, "final": float("nan"), "approved": []}
                                               for lab in mc["response"]]

    def design():
        policy = load_policy()
        samples = sample_records(policy, tok, questions[:cfg.policy_samples], cfg.seed)
        return {**design_rewards(records + samples, tok, policy, cfg.encoder, cfg.tau, cfg.n_negatives,
                                 cfg.n_rollouts, cfg.judge_noise, cfg.seed), "samples": samples}
    path = os.path.join(cfg.cache_dir, f"design-{cache_key(cfg, files, DESIGN_KEYS)}.pt")
    d = cached(path, design)
    records = records + (d["samples"] if cfg.on_policy else [])
    d = {k: v[:len(records)] if isinstance(v, list) else v for k, v in d.items()}   # per-record lists
    if cfg.labels == "outcome":  # one label per record, at every read position
        return records, [{"step": [o] * len(r["thinking"]), "response": [o] * len(r["response"]), "final": o,
                          "approved": []} for o, r in zip(d["outcome"], records)]
    final = relative_final(d["final"], d["p0"]) if cfg.final == "relative" else d["final"]
    if cfg.lam_final == 0:
        final = [float("nan")] * len(records)
    response = d["response_quality"] if cfg.response else [[] for _ in records]
    # the steps the expert approved, thinking then response: the surprise readout's LM loss reads
    # their operations and results
    approved = [[q >= 0.5 for q in think + resp] for think, resp in zip(d["quality"], response)]
    return records, [{"step": s, "response": a, "final": f, "approved": ok}
                     for s, a, f, ok in zip(step_labels(cfg, d), response, final, approved)]


# ----------------------------------------------------------------------------
# python rfprm.py design FILE.jsonl: the reward design of a record, step by step


def show_design(record, d, k):
    """Record k of a design_rewards result: each step's three rewards, the paper's fusion r_fused
    and ours r_step (the PRM's step target), then r_final, p_0 and the trajectory target."""
    align, qual, coh = (torch.tensor(d[key][k]) for key in ("align", "quality", "coherence_logprob"))
    fused, _ = fuse_rewards(align, qual, coh)
    step = gated_fusion(fused, qual)
    print(f"Q: {record['question']}   (answer {record['answer']})")
    print(f"  {'r_align':>7} {'r_qual':>6} {'r_coh':>6} {'r_fused':>7} {'r_step':>6}")
    for t, line in enumerate(record["thinking"]):
        print(f"  {align[t]:7.2f} {qual[t]:6.2f} {coh[t]:6.2f} {fused[t]:7.2f} {step[t]:6.2f}  {line}")
    final, p0 = d["final"][k], d["p0"][k]
    print(f"  r_final {final:.2f} (template-guided), p_0 {p0:.2f} (no template): "
          f"trajectory target {relative_final([final], [p0])[0]:.2f}\n")


def design(file, n, policy_path, context=50, device="cpu"):
    """The reward design of the first n records of `file`, computed over its first `context`
    records (Φ's word weights and the coherence negatives come from the other records)."""
    records = read_jsonl(file, ("question", "answer", "thinking", "response"))
    require(len(records) >= 2, f"{file}: the design needs at least 2 records (coherence negatives), got {len(records)}")
    ckpt = load_checkpoint(policy_path, kind="policy")
    tok = Tokenizer(load_tokenizer(ckpt["config"]["tokenizer"]))
    policy = model_from_checkpoint(ckpt, device).eval()
    records = records[:max(n, context)]
    d = design_rewards(records, tok, policy, n_rollouts=4)
    for k in range(min(n, len(records))):
        show_design(records[k], d, k)
