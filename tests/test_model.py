"""The GPT: KV-cache generation against recomputation, padding, stopping at eos."""

import torch

from model import GPT, GPTConfig, left_pad, attention_mask


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_kv_cache_greedy_equals_recompute():
    model = tiny_model()
    idx = torch.randint(0, 60, (4, 9))
    cached = model.generate(idx, 30, temperature=0, use_cache=True)
    recomputed = model.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_kv_cache_logits_match_full_forward():
    model = tiny_model(1)
    seq = torch.randint(0, 60, (3, 20))
    full = model.lm_head(model.hidden(seq))
    # the same sequence fed through the cache: 12 tokens, then one at a time
    from model import KVCache
    caches = [KVCache(3, 2, 20, 16, "cpu", torch.float32) for _ in model.h]
    parts = [model.lm_head(model.hidden(seq[:, :12], caches, torch.arange(12)))]
    for t in range(12, 20):
        parts.append(model.lm_head(model.hidden(seq[:, t:t + 1], caches, torch.arange(t, t + 1))))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model(2)
    seqs = [torch.randint(0, 60, (n,)).tolist() for n in (2, 9, 5)]
    idx, mask = left_pad(seqs, pad_id=0)
    batch = model.generate(idx, 12, temperature=0, prompt_mask=mask)
    assert torch.equal(batch, model.generate(idx, 12, temperature=0, prompt_mask=mask, use_cache=False))
    for i, s in enumerate(seqs):
        alone = model.generate(torch.tensor([s]), 12, temperature=0)
        assert torch.equal(alone[0, len(s):], batch[i, idx.size(1):])


def test_rows_stop_independently_at_eos():
    model = tiny_model(3)
    idx = torch.randint(0, 60, (6, 5))
    free = model.generate(idx, 20, temperature=0)
    eos = int(free[0, 7])  # a token row 0 emits: make it the eos
    out = model.generate(idx, 20, temperature=0, eos_id=eos)
    for row in out[:, 5:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0]:] == eos).all(), "after eos a row is padded with eos"
    assert (out[0, 7:] == eos).all()


def test_kv_cache_keeps_the_written_part_of_the_rows_it_keeps():
    from model import KVCache
    cache = KVCache(3, 2, 10, 4, "cpu", torch.float32)
    k, v = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    cache.append(k, v)
    cache.keep_rows(torch.tensor([True, False, True]))
    k2, v2 = cache.append(torch.ones(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    assert torch.equal(k2[:, :, :6], k[[0, 2]]) and torch.equal(v2[:, :, :6], v[[0, 2]])
    assert k2.shape == (2, 2, 7, 4) and (k2[:, :, 6] == 1).all() and (v2[:, :, 6] == 0).all()


def test_attention_mask_lets_every_query_see_itself():
    key_ok = torch.tensor([[False, False, True, True]])
    mask = attention_mask(key_ok, 0)[0, 0]
    assert mask.diagonal().all()
    assert not mask[3, 0] and mask[3, 2] and not mask[2, 3]
    # the two pad queries see only themselves: their rows of attention are not empty, so every
    # hidden state, pads included, is finite (a fully masked row gives NaN in some backends)
    model = tiny_model()
    h = model.hidden(torch.tensor([[5, 5, 7, 8]]), attn_mask=mask[None, None])
    assert h.shape == (1, 4, 32) and torch.isfinite(h).all()
    # and the real tokens do not see the pads: the last two states are those of [7, 8] alone
    assert torch.allclose(h[0, 2:], model.hidden(torch.tensor([[7, 8]]), pos=torch.arange(2, 4))[0], atol=1e-5)


def test_loss_reduction_none_gives_per_token_loss():
    model = tiny_model()
    x = torch.randint(0, 60, (2, 8))
    y = x.clone()
    y[:, :3] = -1
    _, mean = model(x, y)
    _, per_tok = model(x, y, loss_reduction="none")
    assert per_tok.shape == (2, 8) and (per_tok[:, :3] == 0).all()
    assert torch.allclose(per_tok.sum() / 10, mean)


def test_sample_follows_the_softmax_and_never_picks_a_masked_token():
    from model import sample
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, 1.0, generator=gen), minlength=5) / 40000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.01), freq
    top2 = torch.bincount(sample(logits, 1.0, top_k=2, generator=gen), minlength=5)
    assert top2[[0, 3, 4]].sum() == 0 and top2[1] > 0 and top2[2] > 0
    assert torch.equal(sample(logits[:3], 0.0), torch.tensor([2, 2, 2]))


def test_dropping_finished_rows_changes_no_row():
    """Rows that emit eos leave the batch (their caches are dropped); the others must not notice."""
    model = tiny_model(4)
    with torch.no_grad():  # large weights: an untrained model whose greedy outputs vary, not one token repeated
        for p in model.parameters():
            p.mul_(20)
    seqs = [torch.randint(0, 60, (n,)).tolist() for n in (3, 8, 5, 6, 2, 7, 4, 8)]
    idx, mask = left_pad(seqs, pad_id=0)
    free = model.generate(idx, 25, temperature=0, prompt_mask=mask)
    new = free[:, idx.size(1):]

    def first_hits(tok):  # the step at which each row would first emit tok (25 = never)
        hit = new == tok
        return torch.where(hit.any(1), hit.float().argmax(1), 25)
    # as eos, a token at which the rows finish at several different steps, some never
    eos = max(new.unique().tolist(), key=lambda tok: len(first_hits(tok).unique()))
    assert len(first_hits(eos).unique()) >= 3
    batch = model.generate(idx, 25, temperature=0, prompt_mask=mask, eos_id=eos)
    for i, s in enumerate(seqs):
        alone = model.generate(torch.tensor([s]), 25, temperature=0, eos_id=eos)
        assert torch.equal(alone[0, len(s):], batch[i, idx.size(1):])
