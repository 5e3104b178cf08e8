"""
Reward design and training of ReasonFlux-PRM, and its evaluation on a synthetic ProcessBench.

    python train_prm.py                        # reward design (cached) + PRM training
    python train_prm.py --eval                 # + baselines and ablations (out/prm_*), the ProcessBench table
    python train_prm.py --eval --rows=main,quality   # only those rows of the table
    python train_prm.py --labels=mc --out_dir=out/prm_response   # the response-only baseline alone
    python train_prm.py --final=relative --out_dir=out/prm_rel     # r_final minus the question's own difficulty (ours)
    torchrun --nproc_per_node=2 train_prm.py   # DDP (gloo on CPU)

Reward design (DESIGN §5), for each training record (question x, thinking s_1..s_T, response a):
  step level   r_align (alignment with the response), r_qual (the expert's judgement),
               r_coh (contrastive coherence with the previous step), fused by a softmax;
  trajectory   r_final: the expert's template of the thinking, N policy rollouts that
               follow it, the fraction verified correct.
The PRM (the policy's backbone plus a scalar head) regresses r_step at the end of each
thinking step and r_final at the end of the record.

Labels for baselines and ablations go through the same code (--labels):
  fused (ReasonFlux-PRM), align, quality, coherence (one component as the step reward),
  mc (response-only PRM: trained on final responses only, step labels from Math-Shepherd-
  style Monte-Carlo rollouts of the policy), outcome (one label per record: is the answer
  right, at every read position).

Where this departs from, or fills in for, the paper (its release has no PRM training code):
  * Φ is a hashed TF-IDF bag of token uni/bigrams (or the policy's mean-pooled states);
  * r_align takes the max over response steps instead of merging steps to pair them;
  * coherence negatives are K random steps of other trajectories; the first step's
    "previous step" is the question;
  * the loss is MSE on sigmoid scores, as the paper's formula, with λ_step = λ_final = 1.
The hidden `meta` of records is read only by evaluate(), never for training.
"""

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, asdict

import torch

import task
import training
from model import (GPTConfig, Tok, DEFAULT_VOCAB, load_tokenizer, encode_prompt, encode_completion,
                   split_completion)
from training import (generate_completions, load_checkpoint, model_from_checkpoint, make_checkpoint,
                      save_checkpoint, pick_device, parse_config, print_config, read_jsonl,
                      write_json_atomic, init_distributed, format_eta, check_options, require,
                      check_writable, run_main, load_cache, skip_long_prompts, record_names, BadInput)
from rfprm import (PRM, TfidfEncoder, policy_encoder, alignment_reward, coherence_reward, fuse_rewards,
                   trajectory_reward, encode_for_prm, prm_loss, load_prm)


@dataclass
class PRMConfig:
    out_dir: str = "out/prm"
    cache_dir: str = "out/rewards"   # reward designs, keyed by their inputs
    data: str = "data/arith/pool.jsonl"
    eval_data: str = "data/arith/prm_eval.jsonl"
    policy: str = "out/policy/ckpt.pt"
    init: str = ""                 # the PRM backbone's starting weights (empty: the policy's)
    tokenizer: str = DEFAULT_VOCAB
    n_train: int = 4000            # pool records given reward design and used for training
    # reward design
    labels: str = "fused"          # fused | align | quality | coherence | mc | outcome
    encoder: str = "tfidf"         # Φ: tfidf | policy
    coherence: str = "logprob"     # logprob (the paper, ≤ 0) | prob (rescaled to [0, 1])
    fuse: str = "align,quality,coherence"   # what labels=fused fuses (drop one to see what it adds)
    tau: float = 0.1               # coherence temperature
    n_negatives: int = 8           # coherence negatives from other trajectories
    n_rollouts: int = 4            # template-guided rollouts per trajectory (r_final)
    final: str = "template"        # r_final: template (the paper) | relative (ours, see relative_final)
    mc_rollouts: int = 4           # Monte-Carlo completions per response prefix (labels=mc)
    judge_noise: float = 0.0       # a noisier expert: r_qual ← (1 - noise)·judge + noise·U(0, 1)
    # training
    lam_step: float = 1.0
    lam_final: float = 1.0         # 0: "fusion without the trajectory reward"
    alpha: float = 1.0             # total = mean(step) + α·trajectory
    max_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1337
    log_every: int = 50
    ckpt_every: int = 100
    resume: bool = False
    device: str = ""
    compile: bool = False
    # evaluation
    eval: bool = False             # train the baselines and ablations too, print the table
    eval_records: int = 2000
    rows: str = ""                 # with --eval: the table's rows to train, by out_dir suffix
                                   # ("main,quality,response"; "main" is ReasonFlux-PRM); empty: all
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False


GPU = dict(n_train=20000, max_steps=3000, batch_size=64)  # the whole pool, trained longer
SMOKE = dict(n_train=60, max_steps=6, batch_size=8, log_every=2, ckpt_every=3, n_rollouts=2,
             mc_rollouts=2, eval_records=80, warmup_steps=2)
PRESETS = {"gpu": GPU, "smoke": SMOKE}  # applied in this order; options given explicitly win
# the smallest value of each size (training.check_options), and the values of a choice
AT_LEAST = dict(n_train=1, n_negatives=1, n_rollouts=1, mc_rollouts=1, max_steps=1, batch_size=1,
                warmup_steps=0, log_every=1, ckpt_every=1, eval_records=1)
CHOICES = dict(labels=("fused", "align", "quality", "coherence", "mc", "outcome"), encoder=("tfidf", "policy"),
               coherence=("logprob", "prob"), final=("template", "relative"))


# ----------------------------------------------------------------------------
# reward design

def step_rewards(records, tok, cfg, encode):
    """r_align, r_qual, r_coh for every thinking step of every record (flat tensors, in record order).

    `encode` maps a list of token-id lists to normalised vectors (Φ). One pass for all records:
    the cosines are matrix products over chunks of records.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    think = [[tok.enc.encode_ordinary(l) for l in r["thinking"]] for r in records]
    resp = [[tok.enc.encode_ordinary(l) for l in r["response"]] for r in records]
    quest = [tok.enc.encode_ordinary(r["question"]) for r in records]
    all_steps = torch.cat([encode(sum(think[i:i + 500], [])) for i in range(0, len(think), 500)])
    step_rec = torch.tensor([k for k, t in enumerate(think) for _ in t], dtype=torch.long)
    S = len(step_rec)

    r_align = torch.zeros(S)
    for lo in range(0, len(records), 500):  # chunks of records keep the (S, R) matrix small
        hi = min(len(records), lo + 500)
        sel = (step_rec >= lo) & (step_rec < hi)
        rv = encode(sum(resp[lo:hi], []))
        rrec = torch.tensor([k for k in range(lo, hi) for _ in resp[k]], dtype=torch.long)
        r_align[sel] = alignment_reward(all_steps[sel], rv, step_rec[sel], rrec)

    # quality: the expert judges each step (a Python call per step: it stands for an LLM call)
    r_qual = torch.tensor([task.judge(r["question"], r["thinking"][:t], line, r["response"])
                           for r in records for t, line in enumerate(r["thinking"])])
    if cfg.judge_noise > 0:
        r_qual = (1 - cfg.judge_noise) * r_qual + cfg.judge_noise * torch.rand(S, generator=g)

    # coherence: previous step (the question for the first), K negatives from other trajectories
    qv = encode(quest)
    first = torch.ones(S, dtype=torch.bool)
    first[1:] = step_rec[1:] != step_rec[:-1]
    prev = torch.where(first[:, None], qv[step_rec], torch.roll(all_steps, 1, 0))
    neg = torch.randint(S, (S, cfg.n_negatives), generator=g)
    clash = step_rec[neg] == step_rec[:, None]
    neg = torch.where(clash, (neg + S // 2) % S, neg)  # a negative must come from another record
    r_coh = coherence_reward(prev, all_steps, all_steps[neg], cfg.tau, rescaled=cfg.coherence == "prob")
    return r_align, r_qual, r_coh, step_rec


def plain_success(policy, tok, records, cfg):
    """p_0: the fraction of n_rollouts samples the policy answers right from the question alone."""
    print(f"reward design: rollouts without a template, {cfg.n_rollouts} per question, {len(records):,} questions ...")
    prompts = [encode_prompt(tok, r["question"]) for r in records for _ in range(cfg.n_rollouts)]
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)
    comps = generate_completions(policy, tok, prompts, temperature=1.0, max_new_tokens=160, generator=g,
                                 progress="rollouts without a template")
    right = [task.verify(split_completion(tok, c)[1], records[k // cfg.n_rollouts]["answer"])
             for k, c in enumerate(comps)]
    return torch.tensor(right, dtype=torch.float).view(len(records), cfg.n_rollouts).mean(1)


def relative_final(r_final, p0):
    """(r_final − p_0 + 1) / 2: what the trajectory's template adds to the policy's own success.

    Not the paper's (ours, --final=relative). r_final alone is high on questions the policy finds
    easy whatever the trajectory (README, Results); subtracting p_0 asks instead whether
    following this trajectory's plan helps. Mapped to [0, 1] for the sigmoid head.
    """
    return [(f - p + 1) / 2 for f, p in zip(r_final, p0)]


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
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)  # where sampling runs
    comps = generate_completions(policy, tok, prompts, temperature=1.0, max_new_tokens=64, generator=g,
                                 progress="Monte-Carlo rollouts")
    right = [task.verify(tok.enc.decode([i for i in c if i < tok.eot]), records[owners[n // cfg.mc_rollouts][0]]["answer"])
             for n, c in enumerate(comps)]
    labels = [[0.0] * len(r["response"]) for r in records]
    for n, (k, j) in enumerate(owners):
        labels[k][j] = sum(right[n * cfg.mc_rollouts:(n + 1) * cfg.mc_rollouts]) / cfg.mc_rollouts
    for k, r in enumerate(records):
        labels[k][-1] = float(task.verify("\n".join(r["response"]), r["answer"]))
    return labels


DESIGN_KEYS = ("n_train", "encoder", "tau", "n_negatives", "n_rollouts", "judge_noise", "seed")
MC_KEYS = ("n_train", "mc_rollouts", "seed")
PLAIN_KEYS = ("n_train", "n_rollouts", "seed")


def cache_key(cfg, files, keys):
    """A key of a reward design's inputs: the files' contents and the settings that change it."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def design_rewards(records, tok, policy, cfg):
    """Every reward of the design, per record: the three step rewards (both coherence forms),
    both fusions, r_final and the outcome. The ablations pick from it, so it is computed once."""
    t0 = time.time()
    if cfg.encoder == "tfidf":
        steps = [tok.enc.encode_ordinary(l) for r in records for l in r["thinking"] + r["response"]]
        encode = TfidfEncoder().fit(steps).encode
    else:
        encode = policy_encoder(policy, tok)
    r_align, r_qual, r_coh, step_rec = step_rewards(records, tok, cfg, encode)
    r_coh_prob = r_coh.exp()
    _, w = fuse_rewards(r_align, r_qual, r_coh)          # the fusion itself is done in targets_for;
    _, w_prob = fuse_rewards(r_align, r_qual, r_coh_prob)  # its mean weights are reported here
    t_step = time.time() - t0
    print(f"reward design: step rewards for {len(step_rec):,} steps in {t_step:.1f}s; mean fusion weights "
          f"(align, quality, coherence) = ({w[:, 0].mean():.2f}, {w[:, 1].mean():.2f}, {w[:, 2].mean():.2f}) "
          f"as written, ({w_prob[:, 0].mean():.2f}, {w_prob[:, 1].mean():.2f}, {w_prob[:, 2].mean():.2f}) rescaled")
    print(f"reward design: template-guided rollouts, {cfg.n_rollouts} per trajectory, {len(records):,} trajectories ...")
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(cfg.seed)  # where sampling runs
    r_final = trajectory_reward(policy, tok, records, cfg.n_rollouts, generator=g, progress="template-guided rollouts")
    print(f"reward design: trajectory rewards in {time.time() - t0 - t_step:.1f}s, mean r_final {r_final.mean():.2f}")
    counts = torch.bincount(step_rec, minlength=len(records)).tolist()
    per_record = lambda x: [c.tolist() for c in torch.split(x, counts)]
    return {"align": per_record(r_align), "quality": per_record(r_qual),
            "coherence_logprob": per_record(r_coh), "coherence_prob": per_record(r_coh_prob),
            "final": r_final.tolist(),
            "outcome": [float(task.verify("\n".join(r["response"]), r["answer"])) for r in records],
            "seconds": {"step": t_step, "trajectory": time.time() - t0 - t_step},
            "fusion_weights": {"logprob": w.mean(0).tolist(), "prob": w_prob.mean(0).tolist()}}


def cached(path, make):
    """Load a torch file if it exists and is readable, else make it and write it atomically."""
    obj = load_cache(path, "reward design")
    if obj is None:
        obj = make()
        save_checkpoint(path, obj)
    return obj


def fused_steps(parts, names):
    """The softmax fusion of the named step-reward components, per record (lists of floats)."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in parts]
    if not names or unknown:
        raise BadInput(f"--fuse takes a comma-separated subset of align,quality,coherence; got {names}")
    counts = [len(x) for x in parts[names[0]]]
    flat = [torch.tensor([v for rec in parts[n] for v in rec]) for n in names]
    fused, _ = fuse_rewards(*flat)
    return [c.tolist() for c in torch.split(fused, counts)]


def targets_for(cfg, records, tok):
    """Per-record training targets {"step", "response", "final"} for cfg.labels (cached design)."""
    files = [cfg.data, cfg.policy]
    load_policy = lambda: model_from_checkpoint(load_checkpoint(cfg.policy, kind="policy", enc=tok.enc),
                                                pick_device(cfg.device)).eval()
    if cfg.labels == "mc":
        path = os.path.join(cfg.cache_dir, f"mc-{cache_key(cfg, files, MC_KEYS)}.pt")
        mc = cached(path, lambda: {"response": mc_response_labels(load_policy(), tok, records, cfg)})
        return [{"step": [], "response": lab, "final": float("nan")} for lab in mc["response"]]
    path = os.path.join(cfg.cache_dir, f"design-{cache_key(cfg, files, DESIGN_KEYS)}.pt")
    d = cached(path, lambda: design_rewards(records, tok, load_policy(), cfg))
    if cfg.labels == "outcome":  # one label per record, at every read position
        return [{"step": [o] * len(r["thinking"]), "response": [o] * len(r["response"]), "final": o}
                for o, r in zip(d["outcome"], records)]
    parts = {"align": d["align"], "quality": d["quality"], "coherence": d[f"coherence_{cfg.coherence}"]}
    step = fused_steps(parts, cfg.fuse) if cfg.labels == "fused" else parts.get(cfg.labels)
    if step is None:
        raise ValueError(f"--labels must be one of fused, align, quality, coherence, mc, outcome; got {cfg.labels!r}")
    if cfg.final not in ("template", "relative"):
        raise ValueError(f"--final must be template or relative; got {cfg.final!r}")
    final = d["final"]
    if cfg.lam_final == 0:  # "fusion without the trajectory reward"
        final = [float("nan")] * len(records)
    elif cfg.final == "relative":
        path = os.path.join(cfg.cache_dir, f"plain-{cache_key(cfg, files, PLAIN_KEYS)}.pt")
        p0 = cached(path, lambda: {"p0": plain_success(load_policy(), tok, records, cfg).tolist()})["p0"]
        final = relative_final(final, p0)
    return [{"step": s, "response": [], "final": f} for s, f in zip(step, final)]


# ----------------------------------------------------------------------------
# PRM training

def pack_prm(records, targets, tok, mode, block_size):
    """ids (N, L), step targets and final targets (N, L) with NaN where nothing is read."""
    enc = [encode_for_prm(tok, r, mode, block_size) for r in records]
    cut = [k for k, e in enumerate(enc) if e[4]]
    if cut:
        print(f"warning: {len(cut)} of {len(records)} records longer than block_size={block_size}, "
              f"truncated: {record_names(records, cut)}")
    L = max(len(e[0]) for e in enc)
    ids = torch.full((len(enc), L), tok.eot, dtype=torch.long)
    t_step = torch.full((len(enc), L), float("nan"))
    t_final = torch.full((len(enc), L), float("nan"))
    for i, ((x, tp, rp, end, _), t) in enumerate(zip(enc, targets)):  # once, before training
        ids[i, :len(x)] = torch.tensor(x)
        if mode == "full":
            pos, val = tp, t["step"]
        else:  # the response-only PRM is trained on response steps
            pos, val = rp, t["response"]
        if pos:
            t_step[i, pos] = torch.tensor(val[:len(pos)], dtype=torch.float)
        if t["final"] == t["final"]:  # not NaN
            t_final[i, end] = t["final"]
    return ids, t_step, t_final, torch.tensor([len(e[0]) for e in enc])


def prm_batch_loss(ids, t_step, t_final, lengths, cfg, device):
    def batch_loss(model, idx):
        L = int(lengths[idx].max())
        scores = model(ids[idx, :L].to(device))
        loss = prm_loss(scores, t_step[idx, :L].to(device), t_final[idx, :L].to(device),
                        cfg.lam_step, cfg.lam_final)
        return loss, int(lengths[idx].sum())   # tokens read, for the tok/s of the log line
    return batch_loss


def train_prm(cfg, records, tok, device, rank=0, world=1):
    """Reward design (cached), then PRM training from the policy's weights. Returns the PRM."""
    mode = "response_only" if cfg.labels == "mc" else "full"
    targets = targets_for(cfg, records, tok) if rank == 0 or world == 1 else None
    if world > 1:  # rank 0 designed the rewards; everyone reads the cache
        obj = [targets]
        torch.distributed.broadcast_object_list(obj, src=0)
        targets = obj[0]
    init_ckpt = load_checkpoint(cfg.init or cfg.policy, kind="policy", enc=tok.enc)
    prm = PRM(GPTConfig(**init_ckpt["model_args"]))
    prm.gpt.load_state_dict(model_from_checkpoint(init_ckpt).state_dict())
    prm.to(device)
    ids, t_step, t_final, lengths = pack_prm(records, targets, tok, mode, prm.config.block_size)

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    optimizer = training.make_optimizer(prm, cfg, device)
    start = 0
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, kind="prm", enc=tok.enc)
        prm.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start = ck["step"]
        print(f"resuming from {ckpt_path} at step {start}")

    def save(step, opt):
        if rank == 0:
            save_checkpoint(ckpt_path, make_checkpoint("prm", prm, tok.enc, asdict(cfg), mode=mode,
                                                       optimizer=opt.state_dict(), step=step))

    model = torch.compile(prm) if cfg.compile else prm
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if start == 0 and rank == 0 and os.path.exists(metrics):
        os.remove(metrics)
    training.train(model, prm_batch_loss(ids, t_step, t_final, lengths, cfg, device), lengths, cfg, device, rank, world,
              ckpt_fn=save, start_step=start, optimizer=optimizer, metrics_path=metrics)
    prm.tok, prm.alpha, prm.mode = tok, cfg.alpha, mode
    return prm.eval()


# ----------------------------------------------------------------------------
# evaluation: a synthetic ProcessBench (hidden meta used here only)

def auroc(scores, labels):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for v in torch.unique(s[order][1:][s[order][1:] == s[order][:-1]]):  # average ranks of ties
        tie = s == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def first_error_predictions(step_scores, threshold):
    """The predicted first error: the first step scored below threshold, or -1."""
    return [next((t for t, s in enumerate(steps) if s < threshold), -1) for steps in step_scores]


def first_error_f1(step_scores, first_errors, threshold):
    """ProcessBench's F1: harmonic mean of the accuracy on erroneous and on error-free records."""
    pred = first_error_predictions(step_scores, threshold)
    err = [p == f for p, f in zip(pred, first_errors) if f != -1]
    ok = [p == f for p, f in zip(pred, first_errors) if f == -1]
    a, b = (sum(err) / len(err) if err else 0.0), (sum(ok) / len(ok) if ok else 0.0)
    return 2 * a * b / (a + b) if a + b else 0.0


def evaluate_scorer(scores, records):
    """Step AUROC (thinking steps), first-error F1 (threshold from a validation half), trajectory AUROC."""
    half = len(records) // 2
    steps = [s["step"] for s in scores]
    firsts = [r["meta"]["first_error"] for r in records]
    grid = sorted({round(x, 3) for st in steps[:half] for x in st}) or [0.5]
    grid = grid[::max(1, len(grid) // 200)]
    best = max(grid, key=lambda th: first_error_f1(steps[:half], firsts[:half], th))
    flat = [x for st in steps[half:] for x in st]
    ok = [x for r in records[half:] for x in r["meta"]["step_ok"]]
    return {"step_auroc": auroc(flat, ok),
            "first_error_f1": first_error_f1(steps[half:], firsts[half:], best),
            "trajectory_auroc": auroc([s["total"] for s in scores[half:]], [r["meta"]["good"] for r in records[half:]]),
            "threshold": best}


def text_histogram(good, bad, bins=10, width=30):
    """Two overlaid histograms of trajectory scores, as text."""
    lo, hi = min(good + bad), max(good + bad)
    span = (hi - lo) or 1.0
    count = lambda xs: [sum(1 for x in xs if min(bins - 1, int((x - lo) / span * bins)) == b) for b in range(bins)]
    cg, cb = count(good), count(bad)
    top = max(cg + cb) or 1
    lines = []
    for b in range(bins):
        edge = lo + span * b / bins
        lines.append(f"  {edge:7.3f} good {'#' * round(cg[b] / top * width):<{width}} flawed {'x' * round(cb[b] / top * width)}")
    return "\n".join(lines)


def save_histograms(all_scores, records, path):
    """The paper's score-overlap picture: clean vs flawed trajectory scores per scorer (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # squeeze=False: a row of axes even for one scorer (--rows=response), not a bare Axes
    fig, axes = plt.subplots(1, len(all_scores), figsize=(3.2 * len(all_scores), 2.6), squeeze=False)
    axes = axes[0]
    for ax, (name, scores) in zip(axes, all_scores.items()):
        good = [s["total"] for s, r in zip(scores, records) if r["meta"]["good"]]
        bad = [s["total"] for s, r in zip(scores, records) if not r["meta"]["good"]]
        ax.hist(good, bins=20, alpha=0.6, label="good")
        ax.hist(bad, bins=20, alpha=0.6, label="flawed")
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    return True


VARIANTS = [  # name, suffix of its out_dir, overrides: every row of the table is one flag away
    ("ReasonFlux-PRM", "", {}),
    ("  fusion, no trajectory", "_no_traj", {"lam_final": 0.0, "alpha": 0.0}),
    ("  alignment only", "_align", {"labels": "align"}),
    ("  quality only", "_quality", {"labels": "quality"}),
    ("  coherence only", "_coherence", {"labels": "coherence"}),
    ("  fusion, rescaled coh.", "_rescaled", {"coherence": "prob"}),
    ("response-only PRM (MC)", "_response", {"labels": "mc"}),   # out/prm_response: used by later stages
    ("outcome scorer", "_outcome", {"labels": "outcome"}),        # out/prm_outcome
]


def chosen_variants(rows):
    """The VARIANTS named in --rows (by out_dir suffix, "main" for ReasonFlux-PRM), in table order."""
    keys = {(v[1].lstrip("_") or "main"): v for v in VARIANTS}
    wanted = [r.strip() for r in rows.split(",") if r.strip()] or list(keys)
    unknown = [r for r in wanted if r not in keys]
    if unknown:
        raise BadInput(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(keys)}")
    return [v for k, v in keys.items() if k in wanted]


def main(argv=None):
    cfg = parse_config(PRMConfig, argv, PRESETS, __doc__)
    check_options(cfg, AT_LEAST, CHOICES)
    require(cfg.tau > 0 and 0 <= cfg.judge_noise <= 1, "--tau must be > 0 and --judge_noise in [0, 1]")
    if cfg.rows and not cfg.eval:
        raise BadInput("--rows picks rows of the --eval table: add --eval (without it only ReasonFlux-PRM trains)")
    variants = chosen_variants(cfg.rows) if cfg.eval else VARIANTS[:1]  # a misspelt row fails here, before any work
    check_writable(cfg.cache_dir, *(cfg.out_dir.rstrip("/") + suffix for _, suffix, _ in variants))
    device = pick_device(cfg.device)
    rank, world, device = init_distributed(device)
    if rank == 0:
        print_config(cfg)
    torch.manual_seed(cfg.seed)
    tok = Tok(load_tokenizer(cfg.tokenizer))
    records = read_jsonl(cfg.data, ("question", "answer", "thinking", "response"))[:cfg.n_train]
    eval_records = read_jsonl(cfg.eval_data, ("question", "answer", "thinking", "response", "meta"))[:cfg.eval_records] if cfg.eval else []
    # the checkpoints are read now, not after minutes of reward design; prompts must fit both contexts
    block_size = min(load_checkpoint(p, kind="policy", enc=tok.enc)["model_args"]["block_size"]
                     for p in (cfg.policy, cfg.init or cfg.policy))
    records = skip_long_prompts(records, [len(encode_prompt(tok, r["question"])) for r in records], block_size)
    require(records, f"{cfg.data}: no record fits the policy's context")
    os.makedirs(cfg.out_dir, exist_ok=True)
    times, all_scores, rows = {}, {}, {}
    for name, suffix, over in variants:
        vcfg = PRMConfig(**{**asdict(cfg), **over, "out_dir": cfg.out_dir.rstrip("/") + suffix})
        os.makedirs(vcfg.out_dir, exist_ok=True)
        t0 = time.time()
        if rank == 0:
            print(f"=== {name.strip()} (labels={vcfg.labels}) ===")
        prm = train_prm(vcfg, records, tok, device, rank, world)
        times[name.strip()] = time.time() - t0
        if rank == 0 and cfg.eval:
            all_scores[name] = prm.score(eval_records)
            rows[name] = evaluate_scorer(all_scores[name], eval_records)
    if rank == 0:
        print("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if rank == 0 and cfg.eval:
        print(format_table(rows))
        for name, scores in all_scores.items():
            good = [s["total"] for s, r in zip(scores, eval_records) if r["meta"]["good"]]
            bad = [s["total"] for s, r in zip(scores, eval_records) if not r["meta"]["good"]]
            print(f"trajectory scores, {name.strip()}:\n{text_histogram(good, bad)}")
        if save_histograms(all_scores, eval_records, os.path.join(cfg.out_dir, "score_histograms.png")):
            print(f"figure: {cfg.out_dir}/score_histograms.png")
        write_json_atomic(os.path.join(cfg.out_dir, "processbench.json"),
                          {"rows": rows, "seconds": times, "config": asdict(cfg), "n_eval": len(eval_records)})
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.destroy_process_group()


def format_table(rows):
    """The synthetic ProcessBench table, one row per scorer (as printed and in out/results.md)."""
    lines = []
    lines.append(f"\nsynthetic ProcessBench, held-out trajectories (hidden meta used for evaluation only)")
    lines.append(f"{'scorer':<26}{'step AUROC':>11}{'first-err F1':>14}{'traj AUROC':>12}")
    for name, r in rows.items():
        lines.append(f"{name:<26}{r['step_auroc']:>11.3f}{r['first_error_f1']:>14.3f}{r['trajectory_auroc']:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
