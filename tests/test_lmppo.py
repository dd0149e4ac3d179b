"""LMPPO: the advantage maths by hand, the recipe's placements, and equality with stock SB3 PPO's update."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import PPO
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env import DummyVecEnv

from agents import LMPPO, MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from agents.ppo import micro_batches
from agents.advantages import gae, kl_shaped_rewards, masked_whiten
from lm_gym import LanguageModelEnv
from lm_gym.padding import SHAPE_MULTIPLE
from lm_gym.sb3 import SB3VecEnv


def test_gae_by_hand_with_termination_and_truncation():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])  # 9.0 sits on padding and must not matter
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    next_values = torch.tensor([0.0, 4.0])  # row 0 terminated (no bootstrap), row 1 truncated (bootstrap V=4)
    gamma, lam = 0.9, 0.8
    # row 0: deltas d2 = 2 - 1.5, d1 = 0 + .9*1.5 - 1, d0 = 1 + .9*1 - .5
    d = [1 + 0.9 * 1.0 - 0.5, 0.9 * 1.5 - 1.0, 2.0 - 1.5]
    a2 = d[2]
    a1 = d[1] + gamma * lam * a2
    a0 = d[0] + gamma * lam * a1
    # row 1: deltas e1 = 1 + .9*4 - 2, e0 = .5 + .9*2 - 1
    e1 = 1.0 + 0.9 * 4.0 - 2.0
    e0 = 0.5 + 0.9 * 2.0 - 1.0 + gamma * lam * e1
    advantages, returns = gae(rewards, values, mask, next_values, gamma, lam)
    assert advantages.flatten().tolist() == pytest.approx([a0, a1, a2, e0, e1, 0.0])
    assert returns.flatten().tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5, e0 + 1.0, e1 + 2.0, 0.0])


def test_kl_penalty_per_token_and_sequence_reward_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    scores = torch.tensor([[0.0, 0.0, 3.0]])  # the env's reward arrives with the EOS token
    rewards = kl_shaped_rewards(scores, logprobs, ref, torch.ones(1, 3), kl_coef=0.1)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 3.0])


def test_masked_whitening_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    whitened = masked_whiten(values, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = (real - real.mean()) / (real.var() + 1e-4).sqrt()  # the std floor of 0.01
    assert whitened[:, :2].flatten().tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert whitened[:, 2].tolist() == [0.0, 0.0]
    flat = torch.full((2, 3), 0.5) + torch.randn(2, 3) * 1e-7  # no signal, only rounding noise
    assert masked_whiten(flat, torch.ones(2, 3)).abs().max() < 1e-2


@pytest.fixture
def env(tiny):
    model, tokenizer = tiny
    return SB3VecEnv(3, model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=64,
                     reward=lambda p, r, **c: [float(len(x)) for x in r])


def make_agent(env, **kwargs):
    settings = dict(n_steps=8, batch_size=10**6, n_epochs=1, learning_rate=1e-3, seed=0, device="cpu",
                    policy_kwargs={"model": "tiny", "temperature": 0.7, "optimizer_class": torch.optim.SGD},
                    max_grad_norm=1e9)
    settings.update(kwargs)
    return LMPPO(env=env, **settings)


def collect(agent):
    agent._setup_learn(total_timesteps=agent.n_steps * agent.n_envs, callback=None)
    callback = agent._init_callback(None)
    agent.collect_rollouts(agent.env, callback, None, agent.n_steps)
    return agent._prepare_batch()


def test_rollout_log_probs_match_the_one_forward_per_segment_evaluation(env):
    agent = make_agent(env)
    data = collect(agent)
    assert data.mask.sum() == agent.n_steps * agent.n_envs
    _, stats = agent.segment_loss(data, list(range(len(agent.rollout.segments))), 0.2, 0.2)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["approx_kl"] < 1e-8


def test_bf16_rollout_log_probs_match_the_training_forward_to_bf16_rounding(env):
    """bf16 rounds activations to 8 significant bits, and the incremental decode and the one forward per
    segment round differently; on the 2-layer tiny model that moves log-probs by ~1e-4 (the default model's
    30 layers: ~0.03, benchmarks/precision_ppo.py), so the ratio stays within 1e-3 of 1 here."""
    agent = make_agent(env, precision="bf16", recompute_logprobs=False)
    data = collect(agent)
    _, stats = agent.segment_loss(data, list(range(len(agent.rollout.segments))), 0.2, 0.2)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-3) and stats["approx_kl"] < 1e-5


def test_bf16_recomputed_old_log_probs_start_the_ratio_at_exactly_one(env):
    agent = make_agent(env, precision="bf16")  # recompute_logprobs defaults to on in bf16
    data = collect(agent)
    rollout = torch.tensor([lp for s in agent.rollout.segments for lp in s.logprobs])
    valid = data.mask.bool()
    assert torch.equal(rollout, data.logprobs[valid])  # the KL penalty's: the sampled log-probs
    assert not torch.equal(rollout, data.old_logprobs[valid])  # the ratio's: the training forward's
    _, stats = agent.segment_loss(data, list(range(len(agent.rollout.segments))), 0.2, 0.2)
    assert stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0 and stats["clip_fraction"] == 0.0


def test_an_untrained_bf16_policy_samples_with_exactly_the_references_log_probs():
    """In bf16 the policy acts through a bf16 copy of its float32 weights that computes as the env's bf16 LM
    does: an untrained policy's KL penalty is 0 to float32 rounding (sampling renormalises the log-probs), not
    bf16 noise (about 1e-2) that whitening would amplify."""
    env = SB3VecEnv(3, model="tiny", max_new_tokens=5, max_prompt_tokens=64, precision="bf16",
                    reward=lambda p, r, **c: [0.0] * len(r))
    agent = make_agent(env, precision="bf16", policy_kwargs={"model": "tiny", "optimizer_class": torch.optim.SGD})
    assert agent.actor_critic.lm.dtype == torch.float32  # the master weights
    data = collect(agent)
    valid = data.mask.bool()
    assert (data.logprobs[valid] - data.ref_logprobs[valid]).abs().max() < 1e-6
    assert (data.old_logprobs[valid] - data.ref_logprobs[valid]).abs().max() > 1e-4  # the training forward rounds apart


def test_segments_bootstrap_truncation_not_termination(env):
    agent = make_agent(env, n_steps=12)
    assert not agent.actor_critic.value_net_head.weight.any()  # V starts at 0: no random baseline
    torch.nn.init.normal_(agent.actor_critic.value_net_head.weight)  # a critic that has learned something
    collect(agent)
    ended = [s for s in agent.rollout.segments if s.ended]
    assert any(s.terminated is False for s in ended)  # the length limit truncates: bootstrapped
    for segment in agent.rollout.segments:
        if segment.terminated:
            assert segment.next_value == 0.0
        else:
            assert segment.next_value != 0.0
    for segment in ended:
        assert segment.scored[-1] and not any(segment.scored[:-1])  # the reward sits on the last token


def test_padding_is_masked_out_of_the_loss(env):
    agent = make_agent(env, normalize_advantage=False)
    data = collect(agent)
    lengths = data.mask.sum(dim=1)
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[short] < lengths[long]
    together, _ = agent.segment_loss(data, [short, long], 0.2, None)
    alone = [agent.segment_loss(data, [row], 0.2, None)[0] for row in (short, long)]
    weights = lengths[[short, long]]
    expected = float((weights * torch.stack(alone).detach()).sum() / weights.sum())
    assert together.item() == pytest.approx(expected, rel=1e-4)


def per_token_observations(segments, length):
    """The padded observation before every token, as stock SB3 stores them."""
    ids, masks = [], []
    for segment in segments:
        for j in range(len(segment.tokens)):
            sequence = segment.context + segment.tokens[:j]
            row = np.zeros(length, dtype=np.int64)
            mask = np.zeros(length, dtype=np.int64)
            row[length - len(sequence):], mask[length - len(sequence):] = sequence, 1
            ids.append(row)
            masks.append(mask)
    return np.stack(ids), np.stack(masks)


def test_update_equals_stock_sb3_ppo_on_the_same_batch(env):
    agent = make_agent(env)
    data = collect(agent)
    segments = agent.rollout.segments
    stock = PPO(TransformerActorCriticPolicy, env, n_steps=int(data.mask.sum()), batch_size=int(data.mask.sum()),
                n_epochs=1, learning_rate=1e-3, clip_range_vf=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=1e9,
                device="cpu", seed=0, policy_kwargs={"model": "tiny", "temperature": 0.7,
                                                     "optimizer_class": torch.optim.SGD})
    stock.policy.load_state_dict(agent.policy.state_dict())
    stock.set_logger(configure(None, []))
    ids, masks = per_token_observations(segments, env.observation_space["input_ids"].shape[0])
    valid = data.mask.bool()
    buffer = stock.rollout_buffer
    buffer.reset()
    buffer.n_envs, buffer.buffer_size = 1, len(ids)
    buffer.reset()
    for i in range(len(ids)):
        buffer.add({"input_ids": ids[i:i + 1], "attention_mask": masks[i:i + 1]}, np.array([[0]]), np.zeros(1),
                   np.zeros(1, dtype=bool), torch.zeros(1), torch.zeros(1))
    buffer.actions[:, 0, 0] = data.tokens[valid].numpy()
    buffer.values[:, 0] = data.values[valid].numpy()
    buffer.log_probs[:, 0] = data.logprobs[valid].numpy()
    buffer.advantages[:, 0] = data.advantages[valid].numpy()
    buffer.returns[:, 0] = data.returns[valid].numpy()
    before = {name: p.detach().clone() for name, p in agent.policy.named_parameters()}
    stock.train()
    agent._update(data, list(range(len(segments))), 0.2, 0.2, actor=True)
    stock_params = dict(stock.policy.named_parameters())
    worst = max((p.detach() - stock_params[name].detach()).abs().max().item() for name, p in agent.policy.named_parameters())
    moved = max((p.detach() - before[name]).abs().max().item() for name, p in agent.policy.named_parameters())
    assert moved > 1e-5 and worst < 1e-4 * max(moved, 1.0)
    assert agent.logger is not None


ALLOWED = [10, 11, 12, 13]


def fraction_of_target(prompts, responses, response_ids=None, **context):
    return [sum(token == ALLOWED[0] for token in ids) / len(ids) for ids in response_ids]


def masked_env(tiny):
    model, tokenizer = tiny
    return SB3VecEnv(8, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=64,
                     allowed_token_ids=ALLOWED, reward=fraction_of_target)


def mean_episode_reward(agent, env, episodes=64):
    obs, rewards = env.reset(), []
    while len(rewards) < episodes:
        actions, _ = agent.predict(obs, action_masks=get_action_masks(env))
        obs, reward, dones, _ = env.step(actions)
        rewards += reward[dones].tolist()
    return float(np.mean(rewards))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algorithm", ["LMPPO", "MaskablePPO"])
def test_agents_learn_to_prefer_a_token(tiny, algorithm, precision):
    torch.manual_seed(0)
    env = masked_env(tiny)
    settings = dict(n_steps=16, batch_size=128, n_epochs=4, learning_rate=3e-3, device="cpu", seed=0,
                    policy_kwargs={"model": "tiny", "precision": precision})
    if algorithm == "LMPPO":
        agent = LMPPO(env=env, **settings)  # the plain policy: LMPPO applies the env's allowed tokens itself
    else:
        agent = MaskablePPO(MaskableTransformerActorCriticPolicy, env, gamma=1.0, **settings)
    chance = mean_episode_reward(agent, masked_env(tiny))
    agent.learn(8 * 16 * 15)
    trained = mean_episode_reward(agent, masked_env(tiny))
    assert chance < 0.4  # a quarter of the tokens by chance
    assert trained > 0.7 and trained > chance + 0.3


class WithoutReference(gym.Wrapper):
    """An env that does not report ``ref_logprob`` (as most envs outside lm-gym)."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        info.pop("ref_logprob")
        return obs, reward, terminated, truncated, info


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}],
                         ids=["frozen-copy", "lora-adapters-disabled"])
def test_reference_log_probs_are_computed_when_the_env_gives_none(tiny, lora):
    model, tokenizer = tiny
    settings = dict(model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=64,
                    reward=lambda p, r, **c: [1.0] * len(r))
    with_reference = DummyVecEnv([lambda: LanguageModelEnv(**settings) for _ in range(2)])
    without = DummyVecEnv([lambda: WithoutReference(LanguageModelEnv(**settings)) for _ in range(2)])
    collected = []
    for env in (with_reference, without):
        agent = make_agent(env, policy_kwargs={"model": "tiny", "temperature": 0.7, "lora": lora})
        collect(agent)
        collected.append([value for s in agent.rollout.segments for value in s.ref_logprobs])
    assert len(collected[0]) == len(collected[1]) == 16
    assert collected[1] == pytest.approx(collected[0], abs=1e-4)


def test_watchdog_warns_when_kl_runs_away(env):
    agent = make_agent(env, watchdog_kl=-1.0, learning_rate=1e-2)  # any KL is "too much"
    agent.set_logger(configure(None, []))
    with pytest.warns(RuntimeWarning, match="KL to the reference"):
        agent.learn(2 * agent.n_steps * agent.n_envs)


def test_the_update_runs_the_lm_on_widths_in_multiples_of_the_shape_multiple(env):
    """Minibatches of segments of any length reach the decoder padded to a multiple of SHAPE_MULTIPLE
    columns (a CPU builds kernels per shape), and the update still follows the masked tokens only."""
    agent = make_agent(env, batch_size=6, n_epochs=2, recompute_logprobs=True)
    collect(agent)
    widths = []
    decoder = agent.actor_critic.lm.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        agent.train()
    finally:
        hook.remove()
    segments = agent.rollout.segments
    assert len({len(s.context) + len(s.tokens) for s in segments}) > 1  # segments of several lengths
    assert len(widths) > 2 and all(width % SHAPE_MULTIPLE == 0 for width in widths)


def test_micro_batches_bound_the_padded_positions_and_keep_every_row():
    lengths = [10, 40, 33, 70, 5, 64, 31]  # rounded up to the shape multiple: 32, 64, 64, 96, 32, 64, 32
    groups = micro_batches([0, 1, 2, 3, 4, 5, 6], lengths, budget=130)
    assert groups == [[3], [5, 1], [2, 6], [0, 4]]  # longest first; 2 x 96 > 130, 2 x 64 fits, 3 x 64 does not
    assert micro_batches([0, 1], [200, 5], budget=64) == [[0], [1]]  # a row longer than the budget goes alone
    rows = list(range(40))
    lengths = torch.randint(1, 300, (40,)).tolist()
    groups = micro_batches(rows, lengths, budget=512)
    assert sorted(r for g in groups for r in g) == rows
    widths = [-(-lengths[g[0]] // SHAPE_MULTIPLE) * SHAPE_MULTIPLE for g in groups]
    assert all(len(g) * w <= 512 or len(g) == 1 for g, w in zip(groups, widths))


def test_micro_batched_update_equals_the_whole_minibatchs(env):
    """Gradient accumulation over micro-batches takes the same step as one forward of the minibatch: the same
    whitening, the same means over the minibatch's tokens, the same statistics."""
    steps, stats = [], []
    for micro_batch_tokens in (None, 64):
        agent = make_agent(env, micro_batch_tokens=micro_batch_tokens)
        data = collect(agent)
        rows = list(range(len(agent.rollout.segments)))
        assert len(agent._micro_batches(data, rows)) == (1 if micro_batch_tokens is None else len(rows))
        before = [p.detach().clone() for p in agent.policy.parameters()]
        stats.append(agent._update(data, rows, 0.2, 0.2, actor=True))
        steps.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(agent.policy.parameters(), before)]))
    assert steps[0].abs().max() > 1e-5
    assert (steps[1] - steps[0]).abs().max() < 1e-4 * steps[0].abs().max()
    assert stats[1] == pytest.approx(stats[0], rel=1e-4, abs=1e-7)


def test_a_count_of_minibatches_splits_each_epoch_into_equal_shares_of_segments(env):
    agent = make_agent(env, minibatches=3)
    data = collect(agent)
    segments = len(agent.rollout.segments)
    groups = agent._minibatches(data.mask)
    assert len(groups) == 3 and sorted(r for g in groups for r in g) == list(range(segments))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    steps = []
    agent.policy.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    agent.train()
    assert len(steps) == 3 * agent.n_epochs
    with pytest.raises(ValueError, match="minibatches=0"):
        make_agent(env, minibatches=0)


def test_bf16_recompute_in_micro_batches_starts_the_ratio_at_exactly_one(env):
    agent = make_agent(env, precision="bf16", batch_size=12, micro_batch_tokens=64)
    data = collect(agent)
    minibatches = agent._minibatches(data.mask)
    agent._recompute_old(data, minibatches)
    assert any(len(agent._micro_batches(data, rows)) > 1 for rows in minibatches)
    for rows in minibatches:
        for part in agent._micro_batches(data, rows):
            _, stats = agent.segment_loss(data, part, 0.2, 0.2)
            assert stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0
