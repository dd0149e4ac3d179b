"""Chosen-token log-probs in chunks: the same numbers and gradients as one log-softmax over the whole
vocabulary, and no (positions, V) tensor larger than a chunk kept for backward."""

import pytest
import torch

from agents import TransformerActorCritic
from lm_gym.logprobs import check_output_logits, last_hidden_states, next_token_nll, output_logits, token_logprobs
from lm_gym.models import load_model
from lm_gym.padding import SHAPE_MULTIPLE


@pytest.fixture
def lm():
    model, tokenizer = load_model("tiny", device="cpu", seed=1)
    return model.requires_grad_(True), tokenizer


def full_vocabulary(model, hidden, tokens, temperature=1.0, allowed=None):
    logits = output_logits(model, hidden) / temperature
    if allowed is not None:
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    distribution = torch.distributions.Categorical(logits=logits)
    return distribution.log_prob(tokens), distribution.entropy()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunks_give_the_full_vocabulary_values_and_gradients(lm, chunk):
    model, _ = lm
    ids = torch.randint(0, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    allowed = torch.rand(model.config.vocab_size) < 0.5
    allowed[ids[:, 1:]] = True
    results = []
    for chunked in (True, False):
        model.zero_grad()
        hidden = last_hidden_states(model, ids, mask)[:, :-1][mask[:, 1:].bool()]
        tokens = ids[:, 1:][mask[:, 1:].bool()]
        if chunked:
            logprobs, entropy, _ = token_logprobs(model, hidden, tokens, temperature=0.7, allowed=allowed,
                                                  entropy=True, entropy_grad=True, chunk=chunk)
        else:
            logprobs, entropy = full_vocabulary(model, hidden, tokens, 0.7, allowed)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    (ours, our_entropy, our_grads), (theirs, their_entropy, their_grads) = results
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_entropy, their_entropy)
    for mine, reference in zip(our_grads, their_grads):  # float32 sums in another order: relative to the scale
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_an_entropy_statistic_carries_no_gradient(lm):
    model, _ = lm
    hidden = torch.randn(5, model.config.hidden_size, requires_grad=True)
    scored = token_logprobs(model, hidden, torch.arange(5), entropy=True, chunk=2)
    assert scored.logprobs.requires_grad and not scored.entropy.requires_grad
    torch.testing.assert_close(scored.entropy, full_vocabulary(model, hidden, torch.arange(5))[1].detach())


def test_no_vocabulary_sized_tensor_beyond_a_chunk_is_kept_for_backward(lm):
    """Whatever the batch size, what autograd saves holds at most ``chunk`` rows of vocabulary width."""
    model, tokenizer = lm
    vocab, chunk = model.get_output_embeddings().weight.shape[0], 8
    actor_critic = TransformerActorCritic(model, tokenizer, chunk=chunk, precision="fp32")
    for batch in (2, 16):
        ids = torch.randint(0, 200, (batch, 12))
        mask = torch.ones_like(ids)
        tokens = ids[:, -6:]
        columns = torch.arange(6)[None].expand(batch, -1)
        widest = []

        def pack(tensor):
            if tensor.shape and tensor.shape[-1] == vocab:
                widest.append(tensor.numel() // vocab)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            evaluation = actor_critic(ids, mask, tokens, columns, torch.ones_like(tokens, dtype=torch.bool))
        evaluation.logprobs.sum().backward()
        # the output head's own weight (V, H) is saved; no activation of more than `chunk` positions is
        assert max((rows for rows in widest if rows != model.config.hidden_size), default=0) <= chunk, (batch, widest)


def test_next_token_nll_is_the_language_modelling_loss(lm):
    model, _ = lm
    ids = torch.randint(0, 200, (2, 7))
    mask = torch.ones_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, 3:] = True
    labels = ids.masked_fill(~scored, -100)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(next_token_nll(model, ids, mask, scored, chunk=3), expected)
    with pytest.raises(ValueError, match="no tokens to score"):
        next_token_nll(model, ids, mask, torch.zeros_like(scored))


def test_token_logprobs_rejects_mismatched_shapes(lm):
    model, _ = lm
    hidden = torch.zeros(4, model.config.hidden_size)
    with pytest.raises(ValueError, match=r"hidden \(N, H\) and tokens \(N,\) must agree"):
        token_logprobs(model, hidden, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk must be a positive"):
        token_logprobs(model, hidden, torch.zeros(4, dtype=torch.long), chunk=0)


def test_an_unknown_logit_transform_is_refused(lm):
    model, _ = lm
    check_output_logits(model)  # the plain architecture passes
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0  # an architecture that rescales its logits after the head
        return out

    model.forward = scaled
    with pytest.raises(NotImplementedError, match="changes its logits after the output head"):
        check_output_logits(model)


def test_softcapped_logits_follow_the_config(lm):
    model, _ = lm
    hidden = torch.randn(2, model.config.hidden_size) * 50
    plain = output_logits(model, hidden)
    model.config.final_logit_softcapping = 5.0
    capped = output_logits(model, hidden)
    torch.testing.assert_close(capped, torch.tanh(plain / 5.0) * 5.0)
    assert capped.abs().max() <= 5.0


@pytest.mark.parametrize("rows, chunk", [(5, 1000), (70, 64), (33, 7)])
def test_the_output_head_sees_rows_in_multiples_of_the_shape_multiple(lm, rows, chunk):
    """Each chunk's rows are padded to a multiple of SHAPE_MULTIPLE (a CPU keeps kernels per shape); the
    padding's results are dropped, so values and gradients are those of the rows given."""
    model, _ = lm
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    hidden = torch.randn(rows, model.config.hidden_size, requires_grad=True)
    tokens = torch.randint(0, 200, (rows,))
    try:
        scored = token_logprobs(model, hidden, tokens, entropy=True, chunk=chunk)
    finally:
        hook.remove()
    assert seen and all(count % SHAPE_MULTIPLE == 0 for count in seen)
    assert scored.logprobs.shape == scored.entropy.shape == (rows,)
    scored.logprobs.sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    expected, expected_entropy = full_vocabulary(model, hidden, tokens)
    expected.sum().backward()
    torch.testing.assert_close(scored.logprobs, expected.detach())
    torch.testing.assert_close(scored.entropy, expected_entropy.detach())
    torch.testing.assert_close(ours, hidden.grad)


@pytest.mark.parametrize("width", [9, 32, 40])
def test_the_decoder_runs_on_widths_in_multiples_and_returns_the_columns_given(lm, width):
    """Masked columns are added on the left up to a multiple of SHAPE_MULTIPLE; the states of the given
    columns equal those of a forward on the batch as given, for left- and right-padded rows."""
    model, _ = lm
    ids = torch.randint(0, 200, (2, width))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left-padded
    mask[1, -2:] = 0  # right-padded
    widths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        hidden = last_hidden_states(model, ids, mask)
    finally:
        hook.remove()
    assert widths == [-(-width // SHAPE_MULTIPLE) * SHAPE_MULTIPLE] and hidden.shape[:2] == (2, width)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    expected = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(last_hidden_states(model, ids, mask, keep=4), hidden[:, -4:])
