"""Training on multi-turn episodes: the env's own ids (the other party's turns, the markers between turns) stay
in the segments where they came, as context of the agent's next tokens, never as actions."""

import math

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from agents import GRPO, LMPPO, TransformerActorCriticPolicy
from agents.kl import k3
from agents.segments import Segment, SegmentBatch
from lm_gym.sb3 import SB3VecEnv

MULTI = dict(max_turns=3, context_tokens=160, max_reply_tokens=5, reply_temperature=0.9)


@pytest.fixture
def env(tiny):
    model, tokenizer = tiny
    return SB3VecEnv(2, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=48, multi_turn=MULTI,
                     reward=lambda p, r, **c: [float(len(x)) for x in r])


def collect(agent):
    agent._setup_learn(total_timesteps=agent.n_steps * agent.n_envs, callback=None)
    agent.collect_rollouts(agent.env, agent._init_callback(None), None, agent.n_steps)
    return agent._prepare_batch()


def make_agent(env, algorithm=LMPPO, **kwargs):
    return algorithm(env=env, n_steps=12, batch_size=10**6, n_epochs=1, learning_rate=1e-3, seed=0, device="cpu",
                     policy_kwargs={"model": "tiny", "temperature": 0.7}, **kwargs)


def test_segments_hold_the_inserted_ids_and_the_update_sees_exactly_the_sampled_context(env):
    agent = make_agent(env)
    data = collect(agent)
    segments = agent.rollout.segments
    assert data.mask.sum() == agent.n_steps * agent.n_envs  # every action once, no inserted id among them
    assert all(len(s.inserts) == 2 for s in segments)  # 3 turns of 4 tokens: the env spoke twice in between
    for segment in segments:
        sequence, offsets = segment.sequence(), segment.offsets()
        assert [sequence[len(segment.context) + k] for k in offsets] == segment.tokens
        assert len(sequence) == len(segment.context) + segment.stream_length
    # the one forward per segment gives the sampled log-probs back: the context it sees is the one sampled from
    _, stats = agent.segment_loss(data, list(range(len(segments))), 0.2, 0.2)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["approx_kl"] < 1e-8


def test_reference_log_probs_scored_after_the_rollout_skip_the_inserted_ids(env):
    agent = make_agent(env)
    collect(agent)
    segments = agent.rollout.segments
    from_env = [list(s.ref_logprobs) for s in segments]
    for segment in segments:
        segment.ref_logprobs = [math.nan] * len(segment.tokens)
    agent._fill_reference_logprobs(segments)
    for segment, expected in zip(segments, from_env):
        assert segment.ref_logprobs == pytest.approx(expected, abs=1e-4)


def test_critic_free_agents_train_on_multi_turn_episodes(tiny):
    model, tokenizer = tiny
    grouped = SB3VecEnv(4, group_size=2, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=48,
                        multi_turn=MULTI, reward=lambda p, r, **c: [float(len(x)) for x in r])
    agent = make_agent(grouped, GRPO)
    before = [p.detach().clone() for p in agent.policy.parameters() if p.requires_grad]
    agent.learn(total_timesteps=agent.n_steps * agent.n_envs)
    episodes = agent.rollout.segments
    assert all(s.ended and len(s.inserts) == 2 for s in episodes)
    after = [p for p in agent.policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def segment(context, tokens, inserts=()):
    zeros = [0.0] * len(tokens)
    return Segment(context=list(context), tokens=list(tokens), logprobs=list(zeros), values=list(zeros),
                   ref_logprobs=[-1.0] * len(tokens), scores=zeros[:-1] + [1.0], scored=[False] * len(tokens),
                   terminated=True, ended=True, inserts=[(after, list(ids)) for after, ids in inserts])


def test_the_training_forward_scores_each_agent_token_at_its_own_position(env):
    agent = make_agent(env)
    segments = [segment([5, 6, 7], [10, 11, 12, 13], [(2, [20, 21, 22])]), segment([5, 6, 7, 8, 9], [14, 15]),
                segment([3], [16, 17, 18], [(1, [23]), (3, [24, 25])])]  # the last ends with inserted ids
    assert segments[0].sequence() == [5, 6, 7, 10, 11, 20, 21, 22, 12, 13]
    assert segments[0].offsets() == [0, 1, 5, 6] and segments[2].offsets() == [0, 2, 3]
    batch = SegmentBatch.from_segments(segments, 0, "cpu")
    with torch.no_grad():
        evaluation = agent.actor_critic(batch.ids, batch.attention_mask, batch.tokens, batch.positions(),
                                        batch.mask.bool(), entropy=False, keep=batch.keep)
        for row, piece in enumerate(segments):
            logits = agent.actor_critic.lm(torch.tensor([piece.sequence()])).logits[0].float() / 0.7
            logprobs = torch.log_softmax(logits, dim=-1)
            expected = [logprobs[len(piece.context) + offset - 1, token].item()
                        for offset, token in zip(piece.offsets(), piece.tokens)]
            assert evaluation.logprobs[row, :len(piece.tokens)].tolist() == pytest.approx(expected, abs=1e-5)


def test_inserted_ids_carry_no_log_prob_gradient_and_no_kl(tiny):
    model, tokenizer = tiny
    grouped = SB3VecEnv(2, group_size=2, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=48,
                        multi_turn=MULTI, reward=lambda p, r, **c: [1.0] * len(r))
    agent = make_agent(grouped, GRPO)
    pieces = [segment([5, 6, 7], [10, 11, 12], [(1, [20, 21])]), segment([5, 6, 7], [13, 14], [(1, [22])])]
    data = SegmentBatch.from_segments(pieces, 0, "cpu")
    data.old_logprobs = data.logprobs.clone()
    data.advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    loss, stats = agent.segment_loss(data, [0, 1], 0.2)
    with torch.no_grad():
        logprobs = agent.actor_critic(data.ids, data.attention_mask, data.tokens, data.positions(), data.mask.bool(),
                                      entropy=False, keep=data.keep).logprobs
    # the KL term is k3 over the agent's 5 tokens (token-normalised), the inserted 3 ids nowhere in it
    expected_kl = (k3(logprobs, data.ref_logprobs) * data.mask).sum() / 5
    assert stats["kl_loss"] == pytest.approx(float(expected_kl), rel=1e-5)
    assert data.tokens.tolist() == [[10, 11, 12], [13, 14, 0]] and data.mask.sum() == 5
    loss.backward()  # the gradient flows through the agent's tokens; the inserted ids are input only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.policy.parameters())


def test_stock_sb3_ppo_with_the_transformer_policy_trains_between_inserted_turns(tiny):
    """Stock SB3 agents act one token per step, so their actions are exactly the agent's ids; the other
    party's turns reach them as observation context (``agent_mask`` 0) between two of their steps."""
    model, tokenizer = tiny
    env = SB3VecEnv(2, model=model, tokenizer=tokenizer, max_new_tokens=3, max_prompt_tokens=48,
                    reward=lambda p, r, **c: [float(len(x)) for x in r],
                    multi_turn=dict(max_turns=3, context_tokens=120, max_reply_tokens=4))
    agent = PPO(TransformerActorCriticPolicy, env, n_steps=8, batch_size=16, n_epochs=1, device="cpu", seed=0,
                policy_kwargs={"model": "tiny"})
    before = [p.detach().clone() for p in agent.policy.parameters() if p.requires_grad]
    agent.learn(16)
    observations = agent.rollout_buffer.observations
    agent_mask, attention = observations["agent_mask"], observations["attention_mask"]
    inserted_after_actions = (attention == 1) & (agent_mask == 0) & (np.cumsum(agent_mask, axis=-1) > 0)
    assert inserted_after_actions.any()  # some steps saw the other party's turn after the agent's tokens
    after = [p for p in agent.policy.parameters() if p.requires_grad]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


def test_acting_after_an_inserted_turn_runs_only_the_new_ids(tiny):
    """The rollout cache extends a row's KV history by the ids the env inserted after the agent's token (one
    forward of those ids alone), keeps a waiting row as it is, and gives the log-probs of a full forward."""
    from agents.rollout_cache import RolloutCache

    model, tokenizer = tiny
    cache, length = RolloutCache(), 24
    rows = [[5, 6, 7, 8], [9, 10, 11]]

    def latest(rows):  # observations as the env gives them: right-aligned in `length` positions
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        return cache.latest(model, tokenizer.pad_token_id, ids, mask)[0].clone()

    latest(rows)
    rows[0] = rows[0] + [12, 40, 41, 42]  # the agent's token, then the env's turn (3 ids); row 1 waits
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape))
    try:
        logprobs = latest(rows)
    finally:
        hook.remove()
    assert widths == [torch.Size([1, 4])]  # row 0's 4 new ids in one forward; row 1 runs nothing
    with torch.no_grad():
        for row, tokens in enumerate(rows):
            expected = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
            assert torch.allclose(logprobs[row], expected, atol=1e-4)


def test_turn_rewards_add_up_to_the_return_whatever_the_number_of_turns(tiny):
    """Two turns rewarded 0.5 each and one turn rewarded 1.0 are the same return: nothing is normalised by
    the number of turns the policy chose to take."""
    model, tokenizer = tiny
    grouped = SB3VecEnv(2, group_size=2, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=48,
                        multi_turn=MULTI, reward=lambda p, r, **c: [1.0] * len(r))
    agent = make_agent(grouped, GRPO)
    two_turns = segment([5, 6, 7], [10, 11, 12, 13], [(2, [20, 21])])
    two_turns.scores = [0.0, 0.5, 0.0, 0.5]  # each turn's reward on its last token
    one_turn = segment([5, 6, 7], [14, 15])
    data = SegmentBatch.from_segments([two_turns, one_turn], 0, "cpu")
    to_go = agent._returns_to_go(data)
    assert to_go[:, 0].tolist() == [1.0, 1.0]
    assert to_go[0, :4].tolist() == [1.0, 1.0, 0.5, 0.5]  # a token's return: the turn rewards after it
