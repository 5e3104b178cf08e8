"""
training: the training loop every script shares, and the devices it runs on.

* devices and torch.distributed (DDP through torchrun: gloo on CPU, nccl on CUDA), and the
  preamble of a training script (`start_run`: device, process group, config line, seed, tokenizer);
* the training loop: cosine schedule, AdamW, gradient clipping, one log line per
  `log_every` steps, checkpoints, batches of similar lengths drawn from (seed, step);
* language-model batches (`pack`: prompt / completion -> X, Y with the loss on the completion).

Options are parsed and checked in options.py, files read and written in files.py, checkpoints
made and read in checkpoints.py.
"""

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import time

import torch

from files import BadInput, write_text_atomic
from tokenizer import Tokenizer, load_tokenizer
from options import format_eta, print_config

# ----------------------------------------------------------------------------
# devices

def pick_device(name=""):
    """The device named, else the best there is (cuda, then mps, then cpu)."""
    if name:
        try:
            torch.device(name)
        except RuntimeError:
            raise BadInput(f"--device={name} is not a device name (cpu, cuda, cuda:1, mps)") from None
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_for(device):
    """bf16 autocast on CUDA; nothing at all elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else contextlib.nullcontext()


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


def start_run(cfg):
    """The preamble of a training script that DDP may launch: its device and process group, the
    config line (rank 0), the seed, the tokenizer. Returns (rank, world_size, device, tok)."""
    rank, world, device = init_distributed(pick_device(cfg.device))
    if rank == 0:
        print_config(cfg)
    torch.manual_seed(cfg.seed)
    return rank, world, device, Tokenizer(load_tokenizer(cfg.tokenizer))


def wrap_for_training(model, compile=False, world=1):
    """The model as the loop trains it: compiled when asked, in DDP when there are several processes."""
    train_model = torch.compile(model) if compile else model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    return train_model


def end_run():
    """End the process group of a run launched by torchrun (nothing otherwise).

    The ranks meet at a barrier first: rank 0 may still be saving or evaluating, and a gloo rank
    that tears its group down while its peer still holds the connection can abort the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over ranks (a no-op without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def map_in_processes(fn, jobs, workers=1):
    """fn(*job) for each job, in job order (a generator): run here (workers = 1) or in `workers`
    processes of one thread each.

    The course's models are too small for their matmuls to keep two threads busy, so on a small
    CPU two one-thread processes get more done than one two-thread process. The jobs must not
    depend on each other, and fn must be a module-level function. A job's floating-point results
    depend on its thread count, so --workers=1 and --workers=2 differ in the last digits.
    """
    if workers <= 1 or len(jobs) <= 1:
        yield from (fn(*job) for job in jobs)
        return
    spawn = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        yield from pool.map(fn, *zip(*jobs))


# ----------------------------------------------------------------------------
# the training loop

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if it < cfg.warmup_steps:
        return cfg.lr * (it + 1) / cfg.warmup_steps
    ratio = (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, ratio))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def target_lengths(Y):
    """The length of each example: its last target position + 1."""
    pos = torch.arange(Y.size(1)).expand_as(Y)
    return torch.where(Y != -1, pos, -1).max(1).values + 1


def batch_indices(step, order, batch_size, seed, rank=0, world=1):
    """The global batch of step `step` (same on every rank and after a resume); this rank's share.

    A batch is a random window of `order` (examples sorted by length), so its rows have
    similar lengths and little padding.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(len(order), (1,), generator=g)
    idx = order[(start + torch.arange(batch_size)) % len(order)]
    return idx[rank::world]


def lm_batch_loss(X, Y, device, world=1):
    """The SFT loss of a batch: cross-entropy on target tokens (Y != -1).

    Summed over this rank's targets and divided by the *global* count (times the world
    size): after DDP averages gradients, every run sees the same global-batch mean,
    whatever the number of processes. Returns (loss, global target count).
    """
    def batch_loss(model, idx):
        y = Y[idx]
        L = int((y != -1).any(0).nonzero().max()) + 1  # trim the padded tail shared by the batch
        x, y = X[idx, :L].to(device, non_blocking=True), y[:, :L].to(device, non_blocking=True)
        n_global = all_reduce_sum((y != -1).sum().float())
        _, loss_tok = model(x, y, loss_reduction="none")
        return loss_tok.sum() / n_global * world, int(n_global)
    return batch_loss


def train(model, batch_loss, lengths, cfg, device, rank=0, world=1, log=print, ckpt_fn=None,
          start_step=0, optimizer=None, metrics_path=None, stop_at=0, lr_fn=None):
    """The training loop: cosine LR, grad clip, one log line per `log_every` steps, checkpoints.

    batch_loss(model, idx) -> (loss, targets in the global batch) for example indices idx;
    lengths (N,) orders the examples so that a batch has similar lengths. A non-finite
    loss or gradient stops the run, naming the step, before anything else is logged or saved:
    the last checkpoint on disk stays the last good one. A resumed run (start_step > 0) first
    drops the metrics rows of the steps it will log again. ckpt_fn(step, optimizer) saves; when it
    returns True (sft.py's stopping rule) the run ends at that step. lr_fn(step), when given, is the
    learning rate instead of get_lr's (sft.py's decay after its target).
    Returns {"tokens": targets seen, "loss": last logged loss, "steps": the step it ended at}.
    """
    if metrics_path and rank == 0 and start_step > 0:
        keep_metrics_before(metrics_path, start_step)
    optimizer = optimizer or make_optimizer(model, cfg, device)
    model.train()
    order = torch.argsort(lengths, stable=True)
    tokens_seen, t0, loss_val = 0, time.time(), float("nan")
    # the first step with a non-finite loss or gradient, -1 if none: kept as a tensor so that
    # checking it costs no sync per step; read only where we log or save. The gradient norm is
    # the same on every DDP rank (after the all-reduce), so every rank stops at the same step.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    last_step = min(stop_at or cfg.max_steps, cfg.max_steps)  # stop_at pauses a run, schedule unchanged
    for step in range(start_step, last_step):
        lr = lr_fn(step) if lr_fn else get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, order, cfg.batch_size, cfg.seed, rank, world)
        with autocast_for(device):
            loss, n_targets = batch_loss(model, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens_seen += n_targets
        finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm)
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        save_now = ckpt_fn and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == last_step)
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps - 1
        if (save_now or log_now) and int(first_bad) >= 0:
            raise non_finite(int(first_bad))
        if log_now:
            loss_val = float(all_reduce_sum(loss.detach().clone()) / world)
            rate = (time.time() - t0) / (step + 1 - start_step)
            if rank == 0:
                log(f"step {step:5d}/{cfg.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | "
                    f"gnorm {float(gnorm):.2f} | {tokens_seen / (time.time() - t0):,.0f} tok/s | "
                    f"eta {format_eta(rate * (cfg.max_steps - step - 1))}")
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": loss_val, "lr": lr,
                                            "grad_norm": float(gnorm)}) + "\n")
        if save_now and stop_requested(ckpt_fn(step + 1, optimizer), device):
            last_step = step + 1
            break
    return {"tokens": tokens_seen, "loss": loss_val, "steps": last_step}


def stop_requested(stop, device):
    """Whether any rank's ckpt_fn asked to stop (sft.py's stopping rule runs on rank 0 only): every
    rank must leave the loop at the same step, or the next all-reduce waits forever."""
    return bool(all_reduce_sum(torch.tensor(float(bool(stop)), device=device)) > 0)


def non_finite(step):
    """The error that stops a run at a non-finite loss or gradient, before the step is saved."""
    return FloatingPointError(f"non-finite loss or gradient at step {step}; stopped, the last good "
                              f"checkpoint is kept")


def keep_metrics_before(path, step):
    """Keep only the rows of steps before `step` in a metrics file (and drop a line cut by a kill).

    A run killed after its last checkpoint had logged a few more steps; resumed from that
    checkpoint, it logs them again.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] < step:
                kept.append(line.rstrip("\n") + "\n")
    write_text_atomic(path, "".join(kept))


def pack(examples, block_size, pad_id):
    """Right-pad examples into X, Y of shape (N, L): Y = next token, -1 on prompt and padding.

    The loss mask is by position, not by token id: the completion's own <|endoftext|> is
    a target (pad = eot would otherwise mask it and the model would never learn to stop).
    """
    L = min(block_size, max(len(p) + len(c) for p, c in examples))
    X = torch.full((len(examples), L), pad_id, dtype=torch.long)
    Y = torch.full((len(examples), L), -1, dtype=torch.long)
    n_cut = 0
    for i, (p, c) in enumerate(examples):  # once, before training
        seq = (p + c)[:L + 1]
        n_cut += len(p) + len(c) > L + 1
        x, y = seq[:-1], seq[1:]
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
        Y[i, :max(0, len(p) - 1)] = -1  # no loss on predicting the prompt
    if n_cut:
        print(f"warning: {n_cut} of {len(examples)} examples truncated to block_size={block_size}")
    return X, Y
