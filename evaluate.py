"""
evaluate: a policy's completions checked against the answer key, and the figures made of them.

* `generate_completions`: batched KV-cache generation of a completion per prompt;
* `generate_and_verify`: the course's one generate-then-verify loop (task.verify on the response);
* `accuracy`, `format_accuracy`: a policy's accuracy on questions, by number of operations;
* `mean_std`: the mean ± std of a figure over seeds.
"""

import statistics
import time

import torch

import task
from tokenizer import encode_prompt
from model import left_pad
from options import format_eta


@torch.no_grad()
def generate_completions(model, tok, prompts, temperature=0.0, max_new_tokens=None,
                         batch_size=256, generator=None, top_k=None, progress=""):
    """Generate a completion (list of ids, eos-trimmed) for each prompt, in batches.

    Every row gets max_new_tokens, or what is left of the context after its own prompt when
    that is less: such a row is generated on its own after its batch, so that one long prompt
    never shortens the other rows. A prompt that fills the context gets an empty completion
    (counted in a warning). max_new_tokens=None: up to the end of the context, for the
    longest prompt of the batch.
    progress: a label; when given, one line per batch with the count done and an ETA.
    """
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    want = max_new_tokens or block
    outs, t0 = [[] for _ in prompts], time.time()
    for i in range(0, len(prompts), batch_size):
        if progress and i:
            print(f"{progress}: {i:,}/{len(prompts):,} completions | "
                  f"eta {format_eta((time.time() - t0) / i * (len(prompts) - i))}", flush=True)
        rows = [j for j in range(i, min(i + batch_size, len(prompts))) if len(prompts[j]) < block]
        batch = [j for j in rows if not max_new_tokens or len(prompts[j]) + want <= block]
        alone = sorted(set(rows) - set(batch))
        for group in [batch] + [[j] for j in alone]:
            if not group:
                continue
            idx, mask = left_pad([prompts[j] for j in group], tok.eot, device)
            new = min(want, block - idx.size(1))
            seqs = model.generate(idx, new, temperature=temperature, top_k=top_k, eos_id=tok.eot,
                                  prompt_mask=mask, generator=generator)
            for j, out in zip(group, seqs[:, idx.size(1):].tolist()):
                outs[j] = out
    n_full = sum(len(p) >= block for p in prompts)
    if n_full:
        print(f"warning: {n_full} of {len(prompts):,} prompts fill the context (block_size={block}): "
              f"empty completions")
    return [o[:o.index(tok.eot) + 1] if tok.eot in o else o for o in outs]


def response_text(tok, prompt, completion):
    """The final response of prompt + completion: the text after its first <|/think|>.

    One rule for every prompt: after a question the completion thinks, then answers; a template
    prompt or a Monte-Carlo prefix has already closed the thinking. No <|/think|>: no response.
    """
    ids = [i for i in prompt + completion if i < tok.eot or i == tok.end_think]
    if tok.end_think not in ids:
        return ""
    return tok.enc.decode([i for i in ids[ids.index(tok.end_think) + 1:] if i < tok.eot], errors="replace")


def generate_and_verify(model, tok, prompts, answers, temperature=0.0, max_new_tokens=None, batch_size=256,
                        generator=None, progress=""):
    """Complete each prompt and check its response's `Answer: N` against the answer (task.verify).

    The course's one generate-then-verify loop: policy accuracy, the template-guided and
    Monte-Carlo rollouts of the reward design, GRPO's rule reward and Best-of-N use it.
    Returns (completions, right) with right a list of bools.
    """
    comps = generate_completions(model, tok, prompts, temperature, max_new_tokens, batch_size, generator,
                                 progress=progress)
    right = [task.verify(response_text(tok, p, c), a) for p, c, a in zip(prompts, comps, answers)]
    return comps, right


def accuracy(model, tok, questions, temperature=0.0, generator=None):
    """The policy's accuracy on questions [{question, answer, n_ops}], overall and by n_ops
    (greedy at temperature 0). No questions: NaN."""
    prompts = [encode_prompt(tok, q["question"]) for q in questions]
    _, right = generate_and_verify(model, tok, prompts, [q["answer"] for q in questions], temperature,
                                   generator=generator)
    by_ops = {}
    for q, ok in zip(questions, right):
        by_ops.setdefault(q.get("n_ops", 0), []).append(ok)
    return {"acc": sum(right) / len(right) if right else float("nan"),
            "by_ops": {k: sum(v) / len(v) for k, v in sorted(by_ops.items())}, "n": len(right)}


def format_accuracy(name, res):
    ops = "  ".join(f"{k} ops {v:6.1%}" for k, v in res["by_ops"].items())
    return f"{name:<22} {res['acc']:6.1%}   {ops}"


def mean_std(xs):
    """Mean and sample standard deviation (0 for a single value) of a list of numbers."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
