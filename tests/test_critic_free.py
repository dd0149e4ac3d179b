"""Critic-free agents: the advantage estimators and KL terms by hand, group filtering, learning on the tiny
model, and a first update equal to a hand-written REINFORCE step with the leave-one-out baseline."""

import math

import numpy as np
import pytest
import torch
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import configure

from agents.advantages import group_advantages, returns_to_go, uniform_groups
from agents.critic_free import GRPO, RLOO, CriticFreePPO, ReinforcePlusPlus
from agents.kl import k1, k3
from agents.segments import SegmentCollector
from lm_gym.logprobs import last_hidden_states, output_logits, token_logprobs
from lm_gym.sb3 import SB3VecEnv

ALLOWED = [10, 11, 12, 13]
RETURNS = torch.tensor([1.0, 0.0, 2.0, 2.0, 5.0])
GROUPS = ["a", "a", 7, 7, 7]


def test_grpo_advantages_by_hand():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # group a: mean 0.5, sample std sqrt(0.5)
    std_b = math.sqrt((1 + 1 + 4) / 2)  # group 7: mean 3, centred -1, -1, 2
    expected = [a, -a, -1 / (std_b + 1e-4), -1 / (std_b + 1e-4), 2 / (std_b + 1e-4)]
    assert group_advantages(RETURNS, GROUPS, "grpo").tolist() == pytest.approx(expected, rel=1e-6)


def test_dr_grpo_and_rloo_advantages_by_hand():
    assert group_advantages(RETURNS, GROUPS, "dr_grpo").tolist() == pytest.approx([0.5, -0.5, -1, -1, 2])
    # leave one out: 1 - 0, 0 - 1; 2 - (2 + 5) / 2, the same, 5 - (2 + 2) / 2
    assert group_advantages(RETURNS, GROUPS, "rloo").tolist() == pytest.approx([1, -1, -1.5, -1.5, 3])


def test_a_uniform_group_has_no_advantage_and_is_flagged():
    returns, groups = torch.tensor([1.0, 1.0, 0.0, 1.0]), [0, 0, 1, 1]
    for estimator in ("grpo", "dr_grpo", "rloo"):
        assert group_advantages(returns, groups, estimator)[:2].tolist() == [0.0, 0.0]
    assert uniform_groups(returns, groups).tolist() == [True, True, False, False]


def test_groups_of_one_and_unknown_estimators_are_refused():
    with pytest.raises(ValueError, match="at least 2 per group; got a group of 1"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 1], "grpo")
    with pytest.raises(ValueError, match="estimator='ppo'"):
        group_advantages(RETURNS, GROUPS, "ppo")


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.5, 9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert returns_to_go(rewards, mask).flatten().tolist() == pytest.approx([0.9, 0.8, 1.0, 0.5, 0.0, 0.0])


def test_k1_and_k3_by_hand():
    logprobs, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert k1(logprobs, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    expected = [math.exp(d) - d - 1 for d in (-0.5, 1.0, 0.0)]  # r = π_ref/π, log r = ref - logp
    assert k3(logprobs, ref).tolist() == pytest.approx(expected)
    assert (k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_the_exact_kl_over_the_vocabulary_by_hand_with_its_gradient(tiny):
    model, _ = tiny
    ids = torch.randint(3, 500, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference_hidden = last_hidden_states(model, ids.flip(1), mask).reshape(-1, model.config.hidden_size)
    hidden = last_hidden_states(model, ids, mask).reshape(-1, model.config.hidden_size).detach().requires_grad_()
    tokens = ids.reshape(-1)
    ours = token_logprobs(model, hidden, tokens, temperature=0.7, chunk=5, reference=(model, reference_hidden)).kl
    log_p = torch.log_softmax(output_logits(model, hidden) / 0.7, -1)
    log_q = torch.log_softmax(output_logits(model, reference_hidden), -1)
    by_hand = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert ours.tolist() == pytest.approx(by_hand.tolist(), rel=1e-4, abs=1e-6) and (by_hand > 0).all()
    (grad_ours,) = torch.autograd.grad(ours.sum(), hidden, retain_graph=True)
    (grad_hand,) = torch.autograd.grad(by_hand.sum(), hidden)
    assert torch.allclose(grad_ours, grad_hand, rtol=1e-4, atol=1e-6)


def fraction_of_target(prompts, responses, response_ids=None, **context):
    return [sum(token == ALLOWED[0] for token in ids) / len(ids) for ids in response_ids]


def token_env(tiny, group_size=4, num_envs=16, max_new_tokens=4):
    model, tokenizer = tiny
    return SB3VecEnv(num_envs, group_size=group_size, model=model, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                     max_prompt_tokens=64, allowed_token_ids=ALLOWED, reward=fraction_of_target)


def mean_episode_reward(agent, env, episodes=64):
    obs, rewards = env.reset(), []
    while len(rewards) < episodes:
        actions, _ = agent.predict(obs, action_masks=get_action_masks(env))
        obs, reward, dones, infos = env.step(actions)
        rewards += [r for r, d, i in zip(reward, dones, infos) if d]
    return float(np.mean(rewards))


@pytest.mark.parametrize("agent_class, settings", [
    (GRPO, {}), (GRPO, {"advantage": "dr_grpo", "kl": "full", "loss_normalization": "sequence"}),
    (RLOO, {}), (ReinforcePlusPlus, {"kl": "loss"}),
], ids=["grpo", "dr_grpo-full_kl-sequence", "rloo", "reinforce++"])
def test_critic_free_agents_learn_to_prefer_a_token(tiny, agent_class, settings):
    torch.manual_seed(0)
    env = token_env(tiny)
    agent = agent_class(env=env, n_steps=4, batch_size=32, learning_rate=3e-3, device="cpu", seed=0,
                        policy_kwargs={"model": "tiny"}, **settings)
    chance = mean_episode_reward(agent, token_env(tiny, group_size=1))
    agent.learn(16 * 4 * 12)
    trained = mean_episode_reward(agent, token_env(tiny, group_size=1))
    assert chance < 0.4  # a quarter of the tokens by chance
    assert trained > 0.7 and trained > chance + 0.3


def test_group_estimators_need_prompt_groups(tiny):
    with pytest.raises(ValueError, match="give the env group_size >= 2"):
        GRPO(env=token_env(tiny, group_size=1), device="cpu", policy_kwargs={"model": "tiny"})
    ReinforcePlusPlus(env=token_env(tiny, group_size=1), device="cpu", policy_kwargs={"model": "tiny"})
    with pytest.raises(ValueError, match="kl='k2'"):
        CriticFreePPO(env=token_env(tiny), kl="k2", device="cpu", policy_kwargs={"model": "tiny"})
    with pytest.raises(ValueError, match="critic_warmup is an LMPPO setting"):
        RLOO(env=token_env(tiny), critic_warmup=1, device="cpu", policy_kwargs={"model": "tiny"})


def collect(agent):
    agent._setup_learn(total_timesteps=agent.n_steps * agent.n_envs, callback=None)
    agent.set_logger(configure(None, []))
    agent.collect_rollouts(agent.env, agent._init_callback(None), None, agent.n_steps)


def test_uniform_groups_are_left_out_and_counted(tiny):
    model, tokenizer = tiny
    env = SB3VecEnv(8, group_size=4, model=model, tokenizer=tokenizer, max_new_tokens=3, max_prompt_tokens=64,
                    allowed_token_ids=ALLOWED, reward=lambda p, r, **c: [1.0] * len(r))
    agent = GRPO(env=env, n_steps=3, device="cpu", seed=0, policy_kwargs={"model": "tiny"})
    collect(agent)
    assert agent._training_batch() is None
    assert agent.group_counts == {"groups_cut": 0, "groups_uniform": 2}
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.train()  # nothing to learn from: the update is skipped and logged
    assert agent.logger.name_to_value["train/skipped_update"] == 1
    assert agent.logger.name_to_value["rollout/reward_mean"] == 1.0  # the rollout is still reported
    assert all(torch.equal(p, b) for p, b in zip(agent.policy.parameters(), before))


@pytest.mark.parametrize("episodes_per_row, steps, episodes", [(None, 12, 32), (1, 3, 8), (2, 6, 16)])
def test_a_rollout_can_end_once_every_row_has_played_its_episodes(tiny, episodes_per_row, steps, episodes):
    env = token_env(tiny, num_envs=8, max_new_tokens=3)  # every episode takes 3 steps
    agent = GRPO(env=env, n_steps=12, episodes_per_row=episodes_per_row, device="cpu", seed=0,
                 policy_kwargs={"model": "tiny"})
    agent.learn(total_timesteps=1)  # one rollout and its update
    assert agent.num_timesteps == steps * 8
    assert agent.logger.name_to_value["rollout/episodes"] == episodes
    assert sum(s.ended for s in agent.rollout.segments) == episodes


class EpisodeEnds(BaseCallback):
    """Counts the episodes each env row ends during a rollout, kept or not."""

    def __init__(self):
        super().__init__()
        self.ends = 0

    def _on_step(self) -> bool:
        self.ends = self.ends + self.locals["dones"].astype(int)
        return True


def test_rows_that_end_early_keep_only_their_first_episode(tiny):
    model, tokenizer = tiny
    env = SB3VecEnv(16, group_size=2, model=model, tokenizer=tokenizer, max_new_tokens=8, max_prompt_tokens=64,
                    allowed_token_ids=ALLOWED + [tokenizer.eos_token_id], reward=fraction_of_target)
    agent = GRPO(env=env, n_steps=8, episodes_per_row=1, device="cpu", seed=0, policy_kwargs={"model": "tiny"})
    ends = EpisodeEnds()
    agent.learn(total_timesteps=1, callback=ends)
    assert ends.ends.min() >= 1 and ends.ends.max() >= 2  # some groups ended twice while others played on
    kept = [segment for segment in agent.rollout.segments if segment.ended]
    assert len(kept) == 16 == agent.logger.name_to_value["rollout/episodes"]
    assert sorted(np.unique([s.group for s in kept], return_counts=True)[1]) == [2] * 8  # eight whole groups


def test_the_collector_drops_what_a_row_plays_after_its_episodes():
    collector = SegmentCollector(2, episodes_per_row=1)
    for row, ended in [(0, True), (0, True), (1, True), (0, False)]:  # row 0 ends two episodes, then is cut
        collector.begin(row, [1])
        collector.add(row, 5, -1.0, 0.0, -1.0, 0.0, False)
        collector.close(row, 0.0, ended=ended)
    assert collector.episodes_ended == [2, 1]
    assert len(collector.finished) == 2 and all(segment.ended for segment in collector.finished)


def test_episodes_per_row_must_be_positive(tiny):
    with pytest.raises(ValueError, match="episodes_per_row=0: expected a positive number"):
        GRPO(env=token_env(tiny, group_size=2), episodes_per_row=0, device="cpu", policy_kwargs={"model": "tiny"})


def test_the_first_rloo_update_is_a_reinforce_step_with_the_leave_one_out_baseline(tiny):
    """One epoch, one minibatch, no KL, every group kept, SGD: the ratio is 1, so the clipped objective's gradient is
    -(1/N) Σ_i A_i Σ_t ∇ log π(a_t), A_i = R_i - the mean of the other episodes of its group, computed here
    from the episodes' rewards and a plain forward of the LM."""
    env = token_env(tiny, group_size=2, num_envs=6)
    agent = RLOO(env=env, n_steps=4, n_epochs=1, batch_size=10**6, kl_coef=0.0, learning_rate=0.5, max_grad_norm=1e9,
                 filter_groups=False, device="cpu", seed=0,
                 policy_kwargs={"model": "tiny", "optimizer_class": torch.optim.SGD})
    collect(agent)
    episodes = [s for s in agent.rollout.segments if s.ended]
    assert len(episodes) == 6
    lm = agent.actor_critic.lm
    baseline = {id(s): np.mean([o.scores[-1] for o in episodes if o.group == s.group and o is not s]) for s in episodes}
    loss = 0.0
    for s in episodes:
        ids = torch.tensor([s.context + s.tokens])
        logits = lm(input_ids=ids).logits[0, len(s.context) - 1 : -1].float()
        allowed = torch.full_like(logits, -torch.inf)
        allowed[:, ALLOWED] = 0
        logprobs = torch.log_softmax(logits + allowed, -1).gather(1, torch.tensor(s.tokens)[:, None])
        loss = loss - (s.scores[-1] - baseline[id(s)]) * logprobs.sum()
    loss = loss / sum(len(s.tokens) for s in episodes)
    grads = torch.autograd.grad(loss, [p for p in lm.parameters()])
    before = [p.detach().clone() for p in lm.parameters()]
    agent.train()
    steps = [(b - p.detach()) / 0.5 for p, b in zip(lm.parameters(), before)]
    worst = max((s - g).abs().max().item() for s, g in zip(steps, grads))
    largest = max(g.abs().max().item() for g in grads)
    assert largest > 1e-4 and worst < 1e-3 * largest


def test_a_critic_free_agent_has_the_sb3_surface(tiny, tmp_path):
    from stable_baselines3.common.callbacks import BaseCallback

    class Counts(BaseCallback):
        rollouts = steps = 0

        def _on_rollout_end(self):
            self.rollouts += 1

        def _on_step(self):
            self.steps += 1
            return True

    env = token_env(tiny, num_envs=8)
    agent = GRPO(env=env, n_steps=4, batch_size=16, learning_rate=3e-3, device="cpu", seed=0,
                 policy_kwargs={"model": "tiny"})
    agent.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    counts = Counts()
    agent.learn(8 * 4 * 2, callback=counts)
    assert (counts.rollouts, counts.steps) == (2, 8)
    assert "train/groups_uniform" in (tmp_path / "log" / "progress.csv").read_text().splitlines()[0]
    obs = env.reset()
    actions, _ = agent.predict(obs, deterministic=True, action_masks=get_action_masks(env))
    agent.save(tmp_path / "grpo")
    loaded = GRPO.load(tmp_path / "grpo", env=token_env(tiny, num_envs=8), device="cpu",
                       custom_objects={"policy_kwargs": {"model": "tiny"}})
    assert type(loaded) is GRPO and (loaded.advantage, loaded.kl, loaded.group_size) == ("grpo", "loss", 4)
    again, _ = loaded.predict(obs, deterministic=True, action_masks=get_action_masks(env))
    assert np.array_equal(actions, again)
    for mine, theirs in zip(agent.policy.parameters(), loaded.policy.parameters()):
        assert torch.equal(mine, theirs)
