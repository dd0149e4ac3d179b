"""The Tianshou adapter: env factories and vector envs, the Transformer actor and critic, PPO on the tiny model."""

import pickle

import numpy as np
import pytest
import torch
from tianshou.data import Batch, Collector, VectorReplayBuffer
from tianshou.trainer import OnPolicyTrainerParams

from agents.actor_critic import TransformerActorCritic
from agents.integrations.tianshou import TokenActor, TokenCritic, make_tianshou_ppo
from lm_gym.integrations.tianshou import env_factories, make_tianshou_envs

ALLOWED = [40, 41, 42, 43]
TARGET = 42


def length_reward(prompts, responses, **context):
    return [1.0 + len(r) for r in responses]  # >= 1: every final step has a visible reward


def target_reward(prompts, responses, response_ids, **context):
    """The share of the response's tokens that are TARGET."""
    return [float(np.mean(np.asarray(ids) == TARGET)) for ids in response_ids]


@pytest.fixture
def env_kwargs(tiny):
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=64, reward=length_reward)


@pytest.fixture
def actor_critic():
    return TransformerActorCritic.from_pretrained("tiny", device="cpu")


def collect(algorithm, envs, **collect_kwargs):
    """Collect with ``algorithm``'s policy; return all stored transitions and the collect stats."""
    collector = Collector(algorithm, envs, VectorReplayBuffer(256, len(envs)))
    stats = collector.collect(reset_before_collect=True, **collect_kwargs)
    batch, _ = collector.buffer.sample(0)
    return batch, stats


def test_collector_runs_the_transformer_policy(env_kwargs, tiny, actor_critic):
    stops = list(range(0, tiny[0].get_output_embeddings().weight.shape[0], 5))  # episodes of different lengths
    envs = make_tianshou_envs(3, seed=0, stop_token_ids=stops, **env_kwargs)
    ppo = make_tianshou_ppo(actor_critic, envs.action_space[0])
    torch.manual_seed(0)
    batch, stats = collect(ppo, envs, n_step=24)
    assert len(batch) == 24 and stats.n_collected_episodes >= 3
    assert np.array_equal(batch.obs_next.input_ids[:, -1], batch.act)  # each step appends the sampled token
    assert np.array_equal(batch.obs.input_ids[:, 1:], batch.obs_next.input_ids[:, :-1])
    assert batch.terminated.any() and batch.truncated.any()
    done = batch.terminated | batch.truncated
    assert (batch.rew[done] >= 1).all() and (batch.rew[~done] == 0).all()
    assert len(np.unique(batch.act)) > 5  # sampled, not argmax
    with torch.no_grad():  # same weights, temperature 1: log π(a|s) is the env's reference log-prob
        log_probs = ppo.policy(Batch(obs=batch.obs, info=batch.info)).dist.log_prob(torch.as_tensor(batch.act))
    np.testing.assert_allclose(log_probs.numpy(), batch.info.ref_logprob, atol=1e-4)


def test_allowed_tokens_mask_is_observed_and_obeyed(env_kwargs, actor_critic):
    envs = make_tianshou_envs(2, seed=0, allowed_token_ids=ALLOWED, **env_kwargs)
    ppo = make_tianshou_ppo(actor_critic, envs.action_space[0])
    torch.manual_seed(0)
    batch, _ = collect(ppo, envs, n_step=24)
    assert set(np.unique(batch.act).tolist()) <= set(ALLOWED) and len(np.unique(batch.act)) > 1
    expected = np.zeros(1024, dtype=bool)
    expected[ALLOWED] = True
    assert (batch.obs.mask == expected).all()
    assert (batch.info.ref_logprob < np.log(0.5)).all()  # env side: the unmasked reference LM


def test_critic_reuses_the_actors_training_forward(env_kwargs, actor_critic, monkeypatch):
    envs = make_tianshou_envs(2, seed=0, **env_kwargs)
    obs, _ = envs.reset()
    obs = Batch(obs)
    actor = TokenActor(actor_critic)
    critic = TokenCritic(actor)
    critic.train()
    with torch.no_grad():
        ids, mask = torch.as_tensor(obs.input_ids), torch.as_tensor(obs.attention_mask)
        expected = actor_critic.evaluate(ids, mask, logits=False).values[:, -1]
    forwards = []
    decoder = actor_critic.lm.get_decoder()  # the training forward runs the decoder, then the output head
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: forwards.append(1) or forward(*a, **k))
    actor(obs)
    values = critic(obs)
    assert len(forwards) == 1 and values.requires_grad
    torch.testing.assert_close(values, expected)
    actor(obs)
    critic(Batch(obs))  # another batch object: no reuse, a forward of its own
    assert len(forwards) == 3


def test_env_factories_pickle_for_subprocess_envs():
    factories = env_factories(2, model="tiny", max_new_tokens=2, max_prompt_tokens=64, reward=length_reward,
                              allowed_token_ids=ALLOWED)
    env = pickle.loads(pickle.dumps(factories[1]))()
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"input_ids", "attention_mask", "mask"} and obs["mask"].sum() == len(ALLOWED)
    assert env.observation_space["mask"].shape == (1024,) and env.observation_space.contains(obs)
    obs, *_ = env.step(ALLOWED[0])
    assert env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="kind"):
        make_tianshou_envs(2, kind="ray", model="tiny")


def test_ppo_learns_to_emit_the_rewarded_token(tiny):
    model, tokenizer = tiny
    envs = make_tianshou_envs(4, seed=0, model=model, tokenizer=tokenizer, max_new_tokens=2, max_prompt_tokens=64,
                              allowed_token_ids=ALLOWED, reward=target_reward)
    torch.manual_seed(0)
    ppo = make_tianshou_ppo(TransformerActorCritic.from_pretrained("tiny", device="cpu"), envs.action_space[0], lr=3e-3)
    training = Collector(ppo, envs, VectorReplayBuffer(256, len(envs)))
    training.reset()
    mean_rewards = [collect(ppo, envs, n_episode=64)[1].returns_stat.mean]
    for _ in range(3):
        ppo.run_training(OnPolicyTrainerParams(
            training_collector=training, max_epochs=1, epoch_num_steps=64, collection_step_num_env_steps=32,
            batch_size=16, update_step_num_repetitions=2, verbose=False, show_progress=False,
        ))
        mean_rewards.append(collect(ppo, envs, n_episode=64)[1].returns_stat.mean)
    assert mean_rewards[0] < 0.45, mean_rewards  # about 1 in 4 tokens at the start
    assert mean_rewards[1] > mean_rewards[0] + 0.2 and mean_rewards[-1] > 0.85, mean_rewards
