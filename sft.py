"""
Supervised fine-tuning of a policy LM on trajectory-response data ("downstream training").

    python sft.py --pretrain --out_dir=out/base                      # base model: arithmetic facts
    python sft.py --init=out/base/ckpt.pt --out_dir=out/policy      # policy: the distilled pool
    python sft.py --init=out/base/ckpt.pt --subset=clean --out_dir=out/sft_clean
    torchrun --nproc_per_node=2 sft.py --init=out/base/ckpt.pt      # DDP (gloo on CPU)

Prompt = question; completion = thinking + response; the loss is on completion tokens
only. A share of the examples is template-conditioned (question + the expert's plan ->
a response that follows the plan literally, right or wrong), so that the trajectory-level
reward of train_prm.py has a policy to instruct. The base model is pretrained once on
single-operation facts (the stand-in for a pretrained LLM), and the policy and every later
student start from it, so distilled data teaches reasoning rather than arithmetic from zero.

Evaluation: greedy (and sampled) accuracy on held-out questions through generate + verify,
by number of operations. With --target_acc the policy stops at the first checkpoint whose accuracy
on data/arith/rl_questions.jsonl (greedy, or sampled: --dev_temperature) reaches it, or with
--anneal_steps decays its learning rate from there and stops when the decay ends (ours,
checkpoint_saver), so that the policy of every world starts the later stages equally strong;
without it (the default), a fixed budget, as in the paper. Other scripts call
`train_policy(records, cfg)` to train a student under a fixed budget and `evaluate.accuracy(...)`
to score it.

`--subset=clean` reads the hidden `meta` to keep only clean records. It is a demonstration
of how much data quality matters (an upper bound), not a method: nothing else trains on meta.
"""

import json
import os
import random
import time
from dataclasses import dataclass, asdict

import torch

import task
from files import (read_lines, file_digest, save_checkpoint, read_jsonl, write_json_atomic, check_writable,
                   BadInput, lock_out_dir)
from tokenizer import (Tokenizer, DEFAULT_VOCAB, load_tokenizer, padded_vocab_size, encode_prompt,
                       encode_completion)
from model import GPT, GPTConfig
from options import parse_config, check_options, require, run_main, given_options
from checkpoints import load_checkpoint, model_from_checkpoint, make_checkpoint, check_resume, SHAPE_OPTIONS
from evaluate import accuracy, format_accuracy
from training import (start_run, wrap_for_training, end_run, make_optimizer, train, lm_batch_loss, target_lengths,
                      pack, get_lr, all_reduce_sum)


@dataclass
class SFTConfig:
    out_dir: str = "out/policy"
    data: str = "data/arith/train.jsonl"
    subset: str = "all"            # all | clean (clean reads hidden meta: a demonstration only)
    pretrain: bool = False         # train the base model on `facts` instead of SFT on `data`
    facts: str = "data/arith/facts.txt"
    test: str = "data/arith/test.jsonl"
    dev: str = "data/arith/rl_questions.jsonl"   # the stopping rule's questions (checkpoint_saver)
    init: str = ""                 # start from this checkpoint (normally out/base/ckpt.pt)
    tokenizer: str = DEFAULT_VOCAB
    # model, when not starting from --init
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    # optimisation
    max_steps: int = 6000          # the policy learns the order of operations late: 4000 steps are too few
    batch_size: int = 8            # global batch, split over DDP ranks; small batches, many steps: at equal
                                   # tokens, more updates teach this small model the order of operations sooner
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    template_frac: float = 0.25    # share of examples that are template-conditioned
    seed: int = 1337
    # the stopping rule (ours; checkpoint_saver): stop at the first checkpoint from dev_from on whose accuracy
    # on --dev reaches target_acc, so that every world's policy starts GRPO and Best-of-N equally strong;
    # 0: train all max_steps (the paper's fixed budget)
    target_acc: float = 0.0
    dev_from: int = 2000
    dev_every: int = 250           # read every dev_every steps; within NEAR of the target, at every checkpoint
    dev_temperature: float = 0.0   # the read's sampling temperature: 0 greedy; 1.0 the samples GRPO and Best-of-N read
    anneal_steps: int = 0          # once the target is reached, the lr falls to min_lr over this many steps, then the
                                   # run stops (anneal_lr); 0: it stops at the target
    # evaluation, logging, checkpoints
    eval_questions: int = 1000     # the whole test set: on 500 the s.e. alone is ~2 points; 0 = skip evaluation
    sample_temperature: float = 1.0
    log_every: int = 50
    ckpt_every: int = 50           # cheap: the stopping rule may stop at any checkpoint
    resume: bool = False
    stop_at: int = 0               # stop after this step but keep max_steps' schedule (pause; --resume later)
    snapshot_step: int = 0         # also keep the model of this step (a multiple of ckpt_every; 0 = none) ...
    snapshot_dir: str = ""         # ... as snapshot_dir/ckpt.pt (run.sh: where selection's students start)
    device: str = ""
    compile: bool = False
    preset: str = ""               # "gpu": the larger run for one GPU (GPU below)
    smoke: bool = False
    compare: str = ""              # "dirA,dirB": print the accuracy table of finished runs and exit


# --preset=gpu: a 10M-parameter model (the policy, the PRM and every student inherit its shape)
# and more steps. With --pretrain, the pretraining schedule above still applies on top of it.
GPU = dict(n_layer=6, n_head=6, n_embd=384, batch_size=32, max_steps=8000, lr=1e-3, min_lr=1e-4)
PRETRAIN = dict(max_steps=200, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50)  # ~70 s
SMOKE = dict(max_steps=20, batch_size=8, n_layer=2, n_embd=32, n_head=2, eval_questions=16,
             log_every=5, ckpt_every=10, warmup_steps=5)
PRESETS = {"gpu": GPU, "pretrain": PRETRAIN, "smoke": SMOKE}  # applied in this order; options given explicitly win
# the smallest value of each size (options.check_options), and the values of a choice
AT_LEAST = dict(n_layer=1, n_head=1, n_embd=1, block_size=2, max_steps=1, batch_size=1, warmup_steps=0,
                eval_questions=0, log_every=1, ckpt_every=1, dev_every=1, stop_at=0, snapshot_step=0,
                anneal_steps=0)
CHOICES = dict(subset=("all", "clean"))
# what a resume may change (checkpoints.check_resume): where and how often it writes, when it stops,
# what it evaluates; every other option changes what is trained
RESUME_FREE = {"out_dir", "resume", "stop_at", "max_steps", "log_every", "ckpt_every", "snapshot_step",
               "snapshot_dir", "test", "eval_questions", "sample_temperature", "device", "compile", "preset",
               "smoke", "compare"}


# ----------------------------------------------------------------------------
# data: token ids built once, batches are index selects

def build_examples(records, tok, template_frac=0.0, seed=0):
    """(prompt ids, completion ids) for each record, plus template-conditioned examples.

    A template-conditioned example is: question + template(thinking) -> the response that
    follows that template literally (task.follow_template), right or wrong.
    """
    examples = [(encode_prompt(tok, r["question"]), encode_completion(tok, r["thinking"], r["response"]))
                for r in records]
    rng = random.Random(seed)
    n_tmpl = round(template_frac / max(1e-9, 1 - template_frac) * len(records)) if template_frac > 0 else 0
    for r in rng.sample(records, min(n_tmpl, len(records))):
        plan = task.template(r["thinking"])
        followed = task.follow_template(plan) if plan else None
        if followed:
            examples.append((encode_prompt(tok, r["question"], plan), encode_completion(tok, None, followed)))
    return examples


def fact_examples(path, tok, block_size):
    """Facts packed into rows of about block_size tokens, every token a target."""
    ids = tok.enc.encode_ordinary("\n".join(read_lines(path)) + "\n")
    step = block_size  # rows of block_size + 1 tokens, overlapping by one
    return [([], ids[i:i + step + 1]) for i in range(0, len(ids) - step, step)]


def select_subset(records, subset):
    if subset == "all":
        return records
    if subset == "clean":
        return [r for r in records if r.get("meta", {}).get("flaw") == "clean"]
    raise BadInput(f"--subset must be 'all' or 'clean', got {subset!r}")


# ----------------------------------------------------------------------------
# training

def new_model(cfg, tok, device):
    """A fresh GPT from the config, or the model of cfg.init (shape and vocabulary checked)."""
    if cfg.init:
        ckpt = load_checkpoint(cfg.init, kind="policy", enc=tok.enc)
        return model_from_checkpoint(ckpt, device)
    gcfg = GPTConfig(block_size=cfg.block_size, vocab_size=padded_vocab_size(tok.enc),
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    return GPT(gcfg).to(device)


def keep_shape(cfg, parent, given):
    """A model started from --init keeps the checkpoint's shape: a shape option given on the command
    line that disagrees is refused; the others take the checkpoint's values, so that the saved
    config says what was trained."""
    for name in SHAPE_OPTIONS:
        have = parent["model_args"].get(name)
        if name in given and getattr(cfg, name) != have:
            raise BadInput(f"--{name}={getattr(cfg, name)}: --init={cfg.init} has {name}={have}, and a model "
                           f"started from it keeps its shape; drop --{name}")
        if have is not None:
            setattr(cfg, name, have)


def train_policy(records, cfg, device="cpu", log=print):
    """Train a student on `records` under cfg's budget (same init, steps and batch for everyone).

    Returns (model, {"tokens": target tokens seen, "loss": final loss}). Used by select_data.py.
    """
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(load_tokenizer(cfg.tokenizer))
    model = new_model(cfg, tok, device)
    X, Y = pack(build_examples(records, tok, cfg.template_frac, cfg.seed), model.config.block_size, tok.eot)
    info = train(model, lm_batch_loss(X, Y, device), target_lengths(Y), cfg, device, log=log)
    return model, info


def format_comparison(dirs):
    """The accuracy table of finished runs, from their eval.json (greedy, by number of operations)."""
    lines = []
    lines.append(f"{'run':<22} {'greedy':>6}   by number of operations          train time")
    for d in dirs:
        res = json.load(open(os.path.join(d, "eval.json")))
        name = f"{os.path.basename(d.rstrip('/'))} ({res['subset']})"
        lines.append(f"{format_accuracy(name, res['greedy'])}   {res['train_seconds']:.0f}s")
    return "\n".join(lines)


def check_sft_options(cfg):
    """Refuse impossible options before any work (shape, snapshot, output folders)."""
    check_options(cfg, AT_LEAST, CHOICES)
    require(cfg.n_embd % cfg.n_head == 0 and cfg.n_embd // cfg.n_head % 2 == 0,
            f"--n_embd={cfg.n_embd} must split into --n_head={cfg.n_head} heads of an even size (rotary pairs)")
    if cfg.snapshot_step:
        require(cfg.snapshot_dir, "--snapshot_step needs --snapshot_dir: where to keep the snapshot")
        require(cfg.snapshot_step < cfg.max_steps and cfg.snapshot_step % cfg.ckpt_every == 0,
                f"--snapshot_step={cfg.snapshot_step} must be below --max_steps={cfg.max_steps} and a multiple "
                f"of --ckpt_every={cfg.ckpt_every} (the snapshot is taken when a checkpoint is)")
    require(0 <= cfg.target_acc <= 1, f"--target_acc={cfg.target_acc} must lie in [0, 1] (0: no stopping rule)")
    require(not cfg.target_acc or cfg.dev_from >= cfg.snapshot_step,
            f"--dev_from={cfg.dev_from} must not come before --snapshot_step={cfg.snapshot_step}: a run that "
            f"stops earlier never takes its snapshot")
    require(not cfg.anneal_steps or (cfg.target_acc and cfg.anneal_steps % cfg.ckpt_every == 0),
            f"--anneal_steps={cfg.anneal_steps} needs --target_acc (it decays the lr once the target is reached) "
            f"and must be a multiple of --ckpt_every={cfg.ckpt_every} (the run stops at a checkpoint)")
    check_writable(cfg.out_dir, cfg.snapshot_dir)


def lineage(cfg, tok, argv):
    """(origin, resumed): what this model was trained on, run after run (select_data.py refuses a
    student start trained on its pool), and the checkpoint a --resume goes on from (None for a fresh
    run), checked now, before any work. A model started from --init keeps its shape (keep_shape)."""
    data = cfg.facts if cfg.pretrain else cfg.data
    parent = load_checkpoint(cfg.init, kind="policy", enc=tok.enc) if cfg.init else {}
    if parent:
        keep_shape(cfg, parent, given_options(argv))
    origin = parent.get("origin", []) + [{"data": data, "sha256": file_digest(data), "subset": cfg.subset}]
    resumed = None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        resumed = load_checkpoint(ckpt_path, kind="policy", enc=tok.enc)
        check_resume(resumed, ckpt_path, cfg, RESUME_FREE)
    return origin, resumed


def read_examples(cfg, tok):
    """The (prompt, completion) examples to train on: facts (--pretrain) or the records' examples."""
    if cfg.pretrain:
        examples = fact_examples(cfg.facts, tok, cfg.block_size)
    else:
        records = select_subset(read_jsonl(cfg.data, ("question", "answer", "thinking", "response")), cfg.subset)
        examples = build_examples(records, tok, cfg.template_frac, cfg.seed)
    source = cfg.facts if cfg.pretrain else f"{cfg.data} (--subset={cfg.subset})"
    require(examples, f"{source}: nothing to train on")
    return examples


def resume_or_start(model, cfg, resumed, device, rank):
    """(optimizer, start step): the resumed checkpoint's weights and optimizer state, or a fresh
    optimizer and a fresh metrics log."""
    optimizer = make_optimizer(model, cfg, device)
    if not resumed:
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        if rank == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run starts a fresh log
        return optimizer, 0
    model.load_state_dict(model_from_checkpoint(resumed, device).state_dict())
    optimizer.load_state_dict(resumed["optimizer"])
    if rank == 0:
        print(f"resuming from {os.path.join(cfg.out_dir, 'ckpt.pt')} at step {resumed['step']}")
    return optimizer, resumed["step"]


NEAR = 0.10   # within this of the target, the stopping rule reads at every checkpoint


def dev_read_due(cfg, step, last_read):
    """Whether the stopping rule reads the policy's dev accuracy at this checkpoint: every --dev_every
    steps from --dev_from on, and at every checkpoint once the last read came within NEAR of the
    target, where a few hundred steps move the accuracy by several points."""
    return bool(cfg.target_acc) and step >= cfg.dev_from and (
        step % cfg.dev_every == 0 or last_read >= cfg.target_acc - NEAR)


def dev_accuracy(cfg, model, tok, questions, step):
    """The policy's accuracy on the dev questions at --dev_temperature (0: greedy; sampled with a fixed
    generator, so that a read depends on the weights only), printed and logged (metrics.jsonl, "dev_acc")."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.dev_temperature else None
    acc = accuracy(model, tok, questions, cfg.dev_temperature, generator)["acc"]
    model.train()  # accuracy() leaves the model in eval mode
    print(f"step {step}: accuracy {acc:.1%} at τ = {cfg.dev_temperature} on {len(questions):,} questions of {cfg.dev} "
          f"(stop at {cfg.target_acc:.1%})")
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "dev_acc": acc}) + "\n")
    return acc


def anneal_lr(cfg, reached, step):
    """The learning rate after the target is reached at step `reached` (ours): from the cosine schedule's value
    there, linearly down to --min_lr over --anneal_steps steps (a warmup-stable-decay schedule's decay)."""
    lr0 = get_lr(reached, cfg)
    return lr0 + (cfg.min_lr - lr0) * min(1.0, (step - reached + 1) / cfg.anneal_steps)


def step_from_rank0(step, rank, device):
    """Rank 0's step (None: none yet), on every DDP rank: the stopping rule reads on rank 0 alone."""
    theirs = all_reduce_sum(torch.tensor(float(-1 if step is None else step) if rank == 0 else 0.0, device=device))
    return None if theirs < 0 else int(theirs)


def checkpoint_saver(cfg, model, tok, origin, rank, dev_questions=(), last_read=0.0, reached=None):
    """(ckpt_fn, lr_fn) of training.train: the checkpoint (rank 0), the snapshot at --snapshot_step, and
    the stopping rule (ours): the first checkpoint whose accuracy on the dev questions reaches
    --target_acc (read when dev_read_due) ends the run, or with --anneal_steps starts the lr's decay
    (anneal_lr), and the checkpoint where the decay ends ends the run. ckpt_fn returns True to stop.

    Why the rule: the paper fine-tunes for a fixed budget. Our small model learns the order of
    operations late and suddenly, so after a fixed budget the policies of two worlds (or of two
    CPUs' float paths) stand far apart, and every later stage inherits its start. Stopping at an
    accuracy read on questions that nothing reports makes the start a setting instead of a draw.
    Why the decay: a checkpoint taken mid-schedule, at a high learning rate, is a sharp greedy
    choice over loose samples, and GRPO, Best-of-N and the PRM's backbone read the samples; the
    decay settles it as the end of a schedule does.
    The questions are GRPO's (rl_questions.jsonl): drawn right after the test's, before any record,
    so of the test's own distribution, and never in the SFT data. (A set drawn after the records
    is not: most small questions are taken by then, and what is left is harder.)
    --target_acc=0: the paper's fixed budget."""
    rule = {"last": last_read, "reached": reached}   # the last read and the step that reached the target
    def save(step, opt):
        if rank == 0 and rule["reached"] is None and dev_read_due(cfg, step, rule["last"]):
            rule["last"] = dev_accuracy(cfg, model, tok, dev_questions, step)
            if rule["last"] >= cfg.target_acc:
                rule["reached"] = step
                print(f"step {step}: the target is reached" + (f"; the learning rate falls to {cfg.min_lr:g} over "
                      f"{cfg.anneal_steps} steps" if cfg.anneal_steps else ""))
        rule["reached"] = step_from_rank0(rule["reached"], rank, next(model.parameters()).device)   # one lr on every rank
        stop = rule["reached"] is not None and step >= rule["reached"] + cfg.anneal_steps
        if rank != 0:
            return stop
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                        make_checkpoint("policy", model, tok.enc, asdict(cfg), origin=origin,
                                        optimizer=opt.state_dict(), step=step, reached_target=stop,
                                        dev_read=rule["last"], target_step=rule["reached"]))
        if step == cfg.snapshot_step:  # the same weights, kept: an earlier model of this very run
            save_checkpoint(os.path.join(cfg.snapshot_dir, "ckpt.pt"),
                            make_checkpoint("policy", model, tok.enc, asdict(cfg), origin=origin, step=step))
            print(f"snapshot of step {step}: {cfg.snapshot_dir}/ckpt.pt")
        if stop:
            print(f"step {step}: this checkpoint is the policy")
        return stop
    def lr_at(step):
        return get_lr(step, cfg) if rule["reached"] is None else anneal_lr(cfg, rule["reached"], step)
    return save, lr_at


def evaluate_policy(model, tok, questions, cfg, device, train_s, info):
    """Greedy and sampled accuracy on the test questions: printed, in eval.json and the metrics log."""
    greedy = accuracy(model, tok, questions)
    sampled = accuracy(model, tok, questions, cfg.sample_temperature,
                       torch.Generator(device=device).manual_seed(cfg.seed))
    print(format_accuracy("greedy", greedy))
    print(format_accuracy(f"sampled (T={cfg.sample_temperature})", sampled))
    result = {"greedy": greedy, "sampled": sampled, "train_seconds": train_s, "steps": info["steps"],
              "subset": cfg.subset, "tokens": info["tokens"], "config": asdict(cfg)}
    write_json_atomic(os.path.join(cfg.out_dir, "eval.json"), result)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": info["steps"], "eval_greedy": greedy["acc"],
                            "eval_sampled": sampled["acc"]}) + "\n")


def main(argv=None):
    cfg = parse_config(SFTConfig, argv, PRESETS, __doc__)
    if cfg.compare:
        print(format_comparison(cfg.compare.split(",")))
        return
    check_sft_options(cfg)
    rank, world, device, tok = start_run(cfg)
    t0 = time.time()
    origin, resumed = lineage(cfg, tok, argv)
    examples = read_examples(cfg, tok)
    evaluating = rank == 0 and cfg.eval_questions and not cfg.pretrain
    questions = read_jsonl(cfg.test, ("question", "answer", "n_ops"))[:cfg.eval_questions] if evaluating else []
    stopping = rank == 0 and cfg.target_acc and not cfg.pretrain
    dev_questions = read_jsonl(cfg.dev, ("question", "answer")) if stopping else []
    model = new_model(cfg, tok, device)
    os.makedirs(cfg.out_dir, exist_ok=True)  # once every input has been read and checked
    if rank == 0:
        lock_out_dir(cfg.out_dir)
    X, Y = pack(examples, model.config.block_size, tok.eot)
    if rank == 0:
        print(f"{len(examples):,} examples, {int((Y != -1).sum()):,} target tokens, "
              f"model {model.num_params() / 1e6:.2f}M parameters, data ready in {time.time() - t0:.1f}s")
    optimizer, start_step = resume_or_start(model, cfg, resumed, device, rank)
    if resumed and resumed.get("reached_target"):
        info = {"tokens": 0, "loss": float("nan"), "steps": start_step}   # a finished run: nothing to train
    else:
        save, lr_at = checkpoint_saver(cfg, model, tok, origin, rank, dev_questions,
                                       (resumed or {}).get("dev_read", 0.0), (resumed or {}).get("target_step"))
        info = train(wrap_for_training(model, cfg.compile, world), lm_batch_loss(X, Y, device, world),
                     target_lengths(Y), cfg, device, rank, world, ckpt_fn=save, lr_fn=lr_at,
                     start_step=start_step, optimizer=optimizer,
                     metrics_path=os.path.join(cfg.out_dir, "metrics.jsonl"), stop_at=cfg.stop_at)
    train_s = time.time() - t0
    if rank == 0:
        print(f"trained {info['steps'] - start_step} steps in {train_s:.0f}s, {info['tokens']:,} target tokens")
    if evaluating:
        evaluate_policy(model, tok, questions, cfg, device, train_s, info)
    end_run()


if __name__ == "__main__":
    run_main(main)
