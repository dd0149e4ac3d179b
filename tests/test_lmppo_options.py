"""LMPPO's optional parts: critic warm-up, the ptx loss, the adaptive KL controller, LoRA sharing the env's LM."""

import numpy as np
import pytest
import torch
from stable_baselines3.common.logger import configure

import lm_gym
from agents import LMPPO
from agents.advantages import adaptive_kl_coef
from agents.ptx import PretrainingBatches
from lm_gym.sb3 import SB3VecEnv

TEXTS = ["The cat sat on the mat.", "Reinforcement learning from human feedback.", "A third, longer piece of text " * 5]


def length_reward(prompts, responses, **context):
    return [float(len(r)) for r in responses]


def make_env(model, tokenizer, rows=3):
    return SB3VecEnv(rows, model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=64,
                     reward=length_reward)


def make_agent(env, **kwargs):
    settings = dict(n_steps=5, batch_size=10**6, n_epochs=1, learning_rate=1e-3, seed=0, device="cpu",
                    policy_kwargs={"model": "tiny"})
    settings.update(kwargs)
    agent = LMPPO(env=env, **settings)
    agent.set_logger(configure(None, []))
    return agent


def lm_parameters(agent):
    return {name: p.detach().clone() for name, p in agent.actor_critic.lm.named_parameters()}


def changed(before, agent):
    after = dict(agent.actor_critic.lm.named_parameters())
    return [name for name, p in before.items() if not torch.equal(p, after[name].detach())]


def test_critic_warmup_trains_the_value_head_with_the_actor_frozen(tiny):
    agent = make_agent(make_env(*tiny), critic_warmup=1)
    lm_before, head_before = lm_parameters(agent), agent.actor_critic.value_net_head.weight.detach().clone()
    agent.learn(agent.n_steps * agent.n_envs)  # one rollout: the warm-up
    assert changed(lm_before, agent) == []
    assert not torch.equal(head_before, agent.actor_critic.value_net_head.weight.detach())
    assert agent.logger.name_to_value["train/actor_frozen"] == 1
    agent.learn(agent.n_steps * agent.n_envs, reset_num_timesteps=False)  # warm-up over: the actor learns
    assert changed(lm_before, agent)
    assert agent.logger.name_to_value["train/actor_frozen"] == 0


def test_pretraining_blocks_keep_every_token_and_cycle(tiny):
    _, tokenizer = tiny
    batches = PretrainingBatches(TEXTS, tokenizer, block_tokens=8, batch_size=2)
    stream = [t for text in TEXTS for t in tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    assert [t for block in batches.blocks for t in block] == stream[: sum(map(len, batches.blocks))]
    assert len(stream) - sum(map(len, batches.blocks)) <= 1  # only a final 1-token block can go
    seen = []
    for _ in range(len(batches.blocks)):  # 2 blocks per batch: twice round the blocks
        ids, mask = batches.next_batch("cpu")
        assert (ids[mask == 0] == tokenizer.pad_token_id).all()
        seen += [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert seen == batches.blocks * 2


def test_ptx_loss_pulls_the_policy_towards_the_text(tiny):
    env = make_env(*tiny)
    batches = PretrainingBatches(TEXTS, tiny[1], block_tokens=16, batch_size=4)
    losses = {}
    for coef in (0.0, 5.0):
        torch.manual_seed(0)
        agent = make_agent(env, ptx_coef=coef, ptx_texts=TEXTS, ptx_block_tokens=16)
        agent.learn(3 * agent.n_steps * agent.n_envs)
        with torch.no_grad():
            losses[coef] = float(np.mean([batches.loss(agent.actor_critic.lm).item() for _ in batches.blocks]))
        if coef:
            assert "train/ptx_loss" in agent.logger.name_to_value
    assert losses[5.0] < losses[0.0]


def test_ptx_needs_text(tiny):
    with pytest.raises(ValueError, match="ptx_texts"):
        make_agent(make_env(*tiny), ptx_coef=0.1)


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    assert adaptive_kl_coef(0.1, kl=2.0, kl_target=1.0, tokens=1000, horizon=10_000) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, kl=0.5, kl_target=1.0, tokens=1000, horizon=10_000) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, kl=1.05, kl_target=1.0, tokens=1000, horizon=10_000) == pytest.approx(0.1 * 1.005)
    assert adaptive_kl_coef(0.1, kl=1.0, kl_target=1.0, tokens=1000, horizon=10_000) == pytest.approx(0.1)


def test_lmppo_applies_the_controller_to_each_rollouts_kl(tiny):
    agent = make_agent(make_env(*tiny), learning_rate=5e-2, kl_coef=0.1, kl_target=0.05, kl_horizon=10)
    tokens = agent.n_steps * agent.n_envs
    moved = []
    for _ in range(3):
        before = agent.kl_coef
        agent.learn(tokens, reset_num_timesteps=False)
        kl = agent.logger.name_to_value["rollout/kl_per_segment"]
        assert agent.kl_coef == pytest.approx(adaptive_kl_coef(before, kl, 0.05, tokens, 10))
        moved.append(agent.kl_coef != before)
    assert all(moved)


def test_lora_policy_shares_the_env_lm_which_stays_the_reference():
    model, tokenizer = lm_gym.load_model("tiny")  # not the session's model: adapters go into this one
    reference = lm_gym.load_model("tiny")[0]
    env = make_env(model, tokenizer, rows=2)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    agent = make_agent(env, policy_kwargs={"model": model, "tokenizer": tokenizer, "lora": lora})
    assert agent.actor_critic.lm.get_base_model() is model  # one copy of the base weights
    policy_logprob, ref_logprobs = step_and_compare(agent, env, reference)
    assert policy_logprob != pytest.approx(ref_logprobs[0], abs=1e-3)  # the adapters do change the policy
    agent.learn(agent.n_steps * agent.n_envs)
    step_and_compare(agent, env, reference)  # the env's LM is still the untouched base


def step_and_compare(agent, env, reference):
    """Step the env with the policy's greedy tokens; check ``ref_logprob`` against the base model's own."""
    obs = env.reset()
    with torch.no_grad():
        policy_logits = agent.policy.get_distribution({k: torch.as_tensor(v) for k, v in obs.items()}).distribution.logits
    actions = policy_logits.argmax(-1).numpy()
    _, _, _, infos = env.step(actions)
    for row, info in enumerate(infos):
        ids = obs["input_ids"][row][obs["attention_mask"][row].astype(bool)].tolist()
        with torch.no_grad():
            expected = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1], -1)[actions[row]]
        assert info["ref_logprob"] == pytest.approx(float(expected), abs=1e-4)
    return float(torch.log_softmax(policy_logits, -1)[0, actions[0]]), [info["ref_logprob"] for info in infos]


def test_save_names_a_loaded_model_and_load_can_share_it_again(tmp_path):
    model, tokenizer = lm_gym.load_model("tiny")
    env = make_env(model, tokenizer, rows=2)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    agent = make_agent(env, policy_kwargs={"model": model, "tokenizer": tokenizer, "lora": lora})
    agent.learn(agent.n_steps * agent.n_envs)
    agent.save(tmp_path / "agent")
    assert (tmp_path / "agent.zip").stat().st_size < 5_000_000  # the model is named, not pickled
    obs = env.reset()
    with torch.no_grad():
        expected = agent.policy.get_distribution({k: torch.as_tensor(v) for k, v in obs.items()}).distribution.logits
    fresh_model, fresh_tokenizer = lm_gym.load_model("tiny")
    fresh_env = make_env(fresh_model, fresh_tokenizer, rows=2)
    loaded = LMPPO.load(tmp_path / "agent", env=fresh_env, device="cpu", custom_objects={"policy_kwargs": {
        "model": fresh_model, "tokenizer": fresh_tokenizer, "lora": lora}})
    assert loaded.actor_critic.lm.get_base_model() is fresh_model
    with torch.no_grad():
        got = loaded.policy.get_distribution({k: torch.as_tensor(v) for k, v in obs.items()}).distribution.logits
    assert torch.allclose(got, expected, atol=1e-5)
    by_name = LMPPO.load(tmp_path / "agent", env=fresh_env, device="cpu")  # rebuilt from the stored name
    with torch.no_grad():
        assert torch.allclose(by_name.policy.get_distribution({k: torch.as_tensor(v) for k, v in obs.items()}).distribution.logits,
                              expected, atol=1e-5)


def test_lmppo_scores_the_reference_itself_when_the_env_does_not(tiny):
    model, tokenizer = tiny
    segments = []
    for reference_logprobs in (True, False):
        env = SB3VecEnv(3, model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=64,
                        reward=length_reward, reference_logprobs=reference_logprobs)
        agent = make_agent(env, learning_rate=0.0)
        agent.learn(2 * agent.n_steps * agent.n_envs)
        segments.append(agent.rollout.segments)
    assert [s.tokens for s in segments[0]] == [s.tokens for s in segments[1]]
    scored = [v for s in segments[0] for v in s.ref_logprobs]
    computed = [v for s in segments[1] for v in s.ref_logprobs]
    assert len(scored) == 5 * 3 and computed == pytest.approx(scored, abs=1e-4)


def test_a_separate_critic_is_scored_once_per_episode_after_the_rollout(tiny):
    agent = make_agent(make_env(*tiny), n_steps=7, policy_kwargs={"model": "tiny", "value_head": "separate"})
    torch.nn.init.normal_(agent.actor_critic.value_net_head.weight)  # a critic with something to say
    agent._setup_learn(agent.n_steps * agent.n_envs, callback=None)
    agent.collect_rollouts(agent.env, agent._init_callback(None), None, agent.n_steps)
    assert any(s.terminated is False and s.ended for s in agent.rollout.segments)  # truncated: bootstrapped
    assert any(not s.ended for s in agent.rollout.segments)  # cut by the rollout's end: bootstrapped too
    for segment in agent.rollout.segments:
        prefixes = [segment.context + segment.tokens[:j] for j in range(len(segment.tokens) + 1)]
        with torch.no_grad():
            expected = [float(agent.actor_critic.evaluate(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                                                          logits=False).values[:, -1]) for p in prefixes]
        assert segment.values == pytest.approx(expected[:-1], abs=1e-4)
        assert segment.next_value == (0.0 if segment.terminated else pytest.approx(expected[-1], abs=1e-4))
