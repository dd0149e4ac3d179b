"""The episode batch: incremental KV-cached log-probs equal full forwards, rows are independent."""

import random

import torch

from lm_gym.sampling import sample_continuations
from lm_gym.episode_batch import EpisodeBatch
from tests.conftest import full_forward_logprobs


def random_context(rng, vocab):
    return [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]


def test_rows_match_full_forwards_through_resets_and_compaction(tiny):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    rows, max_tokens = 4, 20
    batch = EpisodeBatch(model, rows, max_tokens, tokenizer.pad_token_id)
    rng = random.Random(0)
    sequences = [random_context(rng, vocab) for _ in range(rows)]
    batch.prefill(range(rows), sequences)
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
