"""The episode batch: incremental KV-cached log-probs equal full forwards, rows are independent."""

import random

import torch

from lm_gym.sampling import sample_continuations
from lm_gym.episode_batch import EpisodeBatch
from tests.conftest import full_forward_logprobs


def random_context(rng, vocab):
    return [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]


def prefilled_batch(tiny, rows: int, max_tokens: int, seed: int):
    """An episode batch of ``rows`` random contexts, with the seeded RNG that drew them and their token lists."""
    model, tokenizer = tiny
    batch = EpisodeBatch(model, rows, max_tokens, tokenizer.pad_token_id)
    rng = random.Random(seed)
    sequences = [random_context(rng, len(tokenizer)) for _ in range(rows)]
    batch.prefill(range(rows), sequences)
    return batch, rng, sequences


def test_rows_match_full_forwards_through_resets_and_compaction(tiny):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    rows, max_tokens = 4, 20
    batch, rng, sequences = prefilled_batch(tiny, rows, max_tokens, seed=0)
    worst, resets = 0.0, 0
    for _ in range(200):
        tokens = torch.tensor([rng.randrange(vocab) for _ in range(rows)])
        logprobs = batch.logprobs_of(tokens)
        for i in range(rows):
            expected = full_forward_logprobs(model, sequences[i])[tokens[i]]
            worst = max(worst, abs(float(logprobs[i] - expected)))
        finished = torch.tensor([len(s) + 1 >= max_tokens or rng.random() < 0.1 for s in sequences])
        batch.append(tokens, record=torch.ones(rows, dtype=torch.bool), forward=~finished)
        for i in range(rows):
            sequences[i].append(int(tokens[i]))
            assert batch.row_tokens(i) == sequences[i]
        restart = finished.nonzero().squeeze(1).tolist()
        if restart:
            fresh = [random_context(rng, vocab) for _ in restart]
            batch.prefill(restart, fresh)
            for row, context in zip(restart, fresh):
                sequences[row] = list(context)
            resets += len(restart)
        ids, mask = batch.observation(max_tokens)
        for i in range(rows):
            assert ids[i][mask[i].bool()].tolist() == sequences[i]
    assert worst < 1e-4
    assert resets > 20
    assert batch.cache.length <= batch.cache.capacity  # compaction kept the buffer bounded


def test_continuations_do_not_depend_on_batch_neighbours(tiny):
    model, tokenizer = tiny
    stops = torch.tensor([tokenizer.eos_token_id])
    contexts = [[5, 6, 7], [9, 10, 11, 12, 13], [40]]

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)]

    together = sample_continuations(model, contexts, [6, 3, 8], generators(), 1.0, stops, 0, 64)
    alone = [
        sample_continuations(model, [c], [limit], [g], 1.0, stops, 0, 64)[0]
        for c, limit, g in zip(contexts, [6, 3, 8], generators())
    ]
    assert together == alone
    for continuation, limit in zip(together, [6, 3, 8]):
        assert 1 <= len(continuation) <= limit
        assert len(continuation) == limit or continuation[-1] == tokenizer.eos_token_id


def test_the_output_head_sees_one_position_per_row(tiny):
    """Prefill and decode hand the output head (B, H) rows of the last position: not the LM's own forward with
    ``logits_to_keep=1``, whose strided (B, 1, H) slice torch multiplies with B copies of the head when the
    weights need no gradient (gigabytes on a real vocabulary)."""
    model, tokenizer = tiny
    shapes = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape))
    try:
        batch = EpisodeBatch(model, 3, 32, tokenizer.pad_token_id)
        batch.prefill([0, 1, 2], [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
        batch.append(torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    finally:
        hook.remove()
    assert shapes == [torch.Size([3, model.config.hidden_size])] * 2


def test_extended_rows_match_full_forwards_while_the_others_keep_decoding(tiny):
    """Inserted ids (a tool result, the other party's turn) extend a row's KV history: each row's log-probs
    equal a full forward of its tokens, whether it was forwarded last step, only recorded, or dropped."""
    model, tokenizer = tiny
    vocab = len(tokenizer)
    rows, max_tokens = 5, 48
    batch, rng, sequences = prefilled_batch(tiny, rows, max_tokens, seed=1)
    worst, extended = 0.0, 0
    for _ in range(150):
        tokens = torch.tensor([rng.randrange(vocab) for _ in range(rows)])
        for i in range(rows):
            expected = full_forward_logprobs(model, sequences[i])[tokens[i]]
            worst = max(worst, abs(float(batch.logprobs_of(tokens)[i] - expected)))
        paused = torch.tensor([rng.random() < 0.25 for _ in range(rows)])
        batch.append(tokens, record=torch.ones(rows, dtype=torch.bool), forward=~paused)
        for i in range(rows):
            sequences[i].append(int(tokens[i]))
        growing = [row for row in range(rows) if paused[row] or rng.random() < 0.1]
        additions = [random_context(rng, vocab)[: max_tokens - len(sequences[row]) - 1] for row in growing]
        growing = [row for row, ids in zip(growing, additions) if ids]
        additions = [ids for ids in additions if ids]
        if growing:
            batch.extend(growing, additions)
            extended += len(growing)
        for row, ids in zip(growing, additions):
            sequences[row] += ids
        full = [row for row in range(rows)
                if len(sequences[row]) + 1 >= max_tokens or paused[row] and row not in growing]
        if full:
            fresh = [random_context(rng, vocab) for _ in full]
            batch.prefill(full, fresh)
            for row, context in zip(full, fresh):
                sequences[row] = list(context)
        for i in range(rows):
            assert batch.row_tokens(i) == sequences[i]
    assert worst < 1e-4 and extended > 50
    assert batch.cache.length <= batch.cache.capacity


def test_extending_runs_only_the_ids_the_cache_lacks(tiny):
    model, tokenizer = tiny
    batch = EpisodeBatch(model, 3, 64, tokenizer.pad_token_id)
    batch.prefill([0, 1, 2], [list(range(5, 25)), list(range(30, 40)), [7, 8]])
    batch.append(torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.bool), torch.tensor([True, True, False]))
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: widths.append(args[0].shape))
    try:
        batch.extend([0, 1], [[41, 42, 43], [44]])  # row 0: 3 new ids; row 1: 1; row 2 keeps waiting
    finally:
        hook.remove()
    assert widths == [torch.Size([2, 3])]
    assert batch.row_tokens(0) == list(range(5, 25)) + [1, 41, 42, 43]
    assert batch.lengths.tolist() == [24, 12, 3]
    with torch.no_grad():
        expected = full_forward_logprobs(model, batch.row_tokens(1))
    assert torch.allclose(batch.next_logprobs[1], expected, atol=1e-4)


def test_compaction_packs_rows_whose_slots_have_gaps(tiny):
    """Rows extended one after another leave each other gaps in the shared slots: compaction packs every
    row's live slots at the front, and each row still scores as a full forward of its tokens."""
    model, tokenizer = tiny
    batch = EpisodeBatch(model, 3, 40, tokenizer.pad_token_id)
    batch.prefill([0, 1, 2], [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    for start in range(3):
        for row in range(3):
            batch.extend([row], [[20 + start, 30 + row]])  # 2 new slots for this row, a gap of 2 for the others
    assert batch.cache.length > batch.cache.live_span() == 10
    batch.cache.compact()
    assert batch.cache.length == 10 and batch.cache.slot_mask[:, 10:].sum() == 0
    tokens = torch.tensor([3, 4, 5])
    batch.append(tokens, torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
    for row in range(3):
        expected = full_forward_logprobs(model, batch.row_tokens(row))
        assert torch.allclose(batch.next_logprobs[row], expected, atol=1e-4)
