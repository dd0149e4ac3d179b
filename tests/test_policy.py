"""The Transformer policy under stock SB3: incremental cache, learning rates, save/load, masks, layering."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import A2C, PPO

import lm_gym
from agents import MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from lm_gym.sb3 import SB3VecEnv


def length_reward(prompts, responses, **context):
    return [float(len(r)) for r in responses]


@pytest.fixture
def vec_env(tiny):
    model, tokenizer = tiny
    return SB3VecEnv(3, model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=64, reward=length_reward)


def make_ppo(env, **policy_kwargs):
    return PPO(TransformerActorCriticPolicy, env, n_steps=8, batch_size=12, n_epochs=1, seed=0, device="cpu",
               policy_kwargs={"model": "tiny", **policy_kwargs})


def as_tensors(obs):
    return {key: torch.as_tensor(value) for key, value in obs.items()}


def act(policy, obs):
    """(logits, values) at the latest position, through the policy's rollout cache (no gradients) or a full
    forward (gradients enabled)."""
    return policy.actor_critic.act(*policy._tokens(as_tensors(obs)), policy.rollout_cache)


@pytest.mark.parametrize("value_head", ["shared", "separate"])
def test_incremental_rollout_equals_full_forward_across_resets(vec_env, value_head):
    policy = make_ppo(vec_env, value_head=value_head, temperature=0.7).policy
    policy.set_training_mode(False)
    obs = vec_env.reset()
    worst, resets, incremental_steps = 0.0, 0, 0
    for step in range(14):
        with torch.no_grad():
            logits, values = act(policy, obs)
        with torch.enable_grad():
            full_logits, full_values = act(policy, obs)  # with gradients: a full forward
        log_probs = torch.log_softmax(logits, -1)
        worst = max(worst, (log_probs - torch.log_softmax(full_logits, -1)).abs().max().item(),
                    (values - full_values).abs().max().item())
        actions = torch.distributions.Categorical(logits=logits).sample().numpy()
        obs, _, dones, _ = vec_env.step(actions)
        resets += int(dones.sum())
        incremental_steps += step > 0
    assert worst < 1e-4
    assert resets >= 3 and incremental_steps == 13


def test_rollout_runs_one_token_per_step(vec_env, monkeypatch):
    policy = make_ppo(vec_env).policy
    policy.set_training_mode(False)
    widths = []
    decoder = policy.actor_critic.lm.get_decoder()  # acting runs the decoder, then the head on the last position
    forward = decoder.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", spy)
    obs = vec_env.reset()
    for _ in range(3):
        with torch.no_grad():
            actions, _, _ = policy(as_tensors(obs))
        obs, _, _, _ = vec_env.step(actions.numpy())
    assert widths[0] > 10 and widths[1:] == [1, 1]  # one prefill, then one new token per step


def test_an_unchanged_observation_keeps_its_log_probs_and_runs_no_forward(vec_env, monkeypatch):
    """A row waiting for its prompt group, or a second predict on one observation: the cache answers as
    before without a forward, and the rows that then move on get log-probs equal to a full forward's."""
    policy = make_ppo(vec_env).policy
    policy.set_training_mode(False)
    obs = vec_env.reset()
    with torch.no_grad():
        first = act(policy, obs)[0].clone()
    decoder = policy.actor_critic.lm.get_decoder()
    forward, calls = decoder.forward, []
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k))
    with torch.no_grad():
        again = act(policy, obs)[0]
    assert calls == [] and torch.equal(again, first)
    monkeypatch.undo()
    obs, _, _, _ = vec_env.step(np.array([7, 8, 9]))
    with torch.no_grad():
        logits = act(policy, obs)[0]
    with torch.enable_grad():
        full = act(policy, obs)[0]  # with gradients: a full forward
    assert (torch.log_softmax(logits, -1) - torch.log_softmax(full, -1)).abs().max() < 1e-4


def test_stock_ppo_and_a2c_train(vec_env):
    ppo = make_ppo(vec_env)
    ppo.learn(48)
    assert np.isfinite(ppo.logger.name_to_value["train/value_loss"])
    a2c = A2C(TransformerActorCriticPolicy, vec_env, n_steps=4, device="cpu", policy_kwargs={"model": "tiny"})
    before = [p.detach().clone() for p in a2c.policy.actor_critic.lm.parameters()]
    a2c.learn(24)
    assert any(not torch.equal(b, p) for b, p in zip(before, a2c.policy.actor_critic.lm.parameters()))


def test_pretrained_weights_are_kept(vec_env, tiny):
    policy = make_ppo(vec_env).policy
    reference, _ = lm_gym.load_model("tiny", device="cpu")
    for (name, a), b in zip(policy.actor_critic.lm.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_per_part_learning_rates_survive_the_schedule(vec_env):
    ppo = make_ppo(vec_env, learning_rates={"head": 1e-5, "value": 3e-3})
    groups = {g["name"]: g for g in ppo.policy.optimizer.param_groups}
    assert groups["head"]["lr_scale"] == pytest.approx(1e-5 / 3e-4)
    assert groups["value"]["lr_scale"] == pytest.approx(3e-3 / 3e-4)
    ppo.learn(24)  # SB3 resets every group's lr to the schedule value before each update
    assert {g["lr"] for g in ppo.policy.optimizer.param_groups} == {3e-4}
    value_param = groups["value"]["params"][0]
    before = value_param.detach().clone()
    ppo.policy.optimizer.zero_grad()
    value_param.grad = torch.ones_like(value_param)
    adam_state = ppo.policy.optimizer.state.pop(value_param, None)  # a fresh Adam step moves by exactly lr
    ppo.policy.optimizer.step()
    assert (before - value_param.detach()).abs().max().item() == pytest.approx(3e-3, rel=1e-3)
    assert adam_state is not None


def test_save_and_load_round_trip(vec_env, tmp_path):
    ppo = make_ppo(vec_env, temperature=0.8)
    ppo.learn(24)
    ppo.save(tmp_path / "ppo")
    loaded = PPO.load(tmp_path / "ppo", device="cpu")
    obs = vec_env.reset()
    for deterministic in (True, False):
        torch.manual_seed(3)
        a, _ = ppo.predict(obs, deterministic=deterministic)
        torch.manual_seed(3)
        b, _ = loaded.predict(obs, deterministic=deterministic)
        assert a.tolist() == b.tolist()
    assert loaded.policy.actor_critic.temperature == 0.8


def test_maskable_policy_samples_allowed_tokens(tiny):
    model, tokenizer = tiny
    allowed = [5, 6, 7, tokenizer.eos_token_id]
    env = SB3VecEnv(3, model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=64,
                    allowed_token_ids=allowed, reward=length_reward)
    agent = MaskablePPO(MaskableTransformerActorCriticPolicy, env, n_steps=8, batch_size=12, n_epochs=1,
                        device="cpu", policy_kwargs={"model": "tiny"})
    agent.learn(48)
    actions, _ = agent.predict(env.reset(), action_masks=get_action_masks(env))
    assert set(actions.tolist()) <= set(allowed)


def test_lora_policy_trains_only_adapters_and_the_value_head(vec_env):
    ppo = make_ppo(vec_env, lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    frozen = {n: p.detach().clone() for n, p in ppo.policy.actor_critic.lm.named_parameters() if not p.requires_grad}
    ppo.learn(24)
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in ppo.policy.actor_critic.lm.named_parameters() if n in frozen)
    assert any("lora" in n for n, p in ppo.policy.actor_critic.lm.named_parameters() if p.requires_grad)


def test_bad_policy_arguments(vec_env):
    with pytest.raises(ValueError, match="value_head"):
        make_ppo(vec_env, value_head="both")
    with pytest.raises(ValueError, match="temperature"):
        make_ppo(vec_env, temperature=0)
    with pytest.raises(ValueError, match="learning_rates"):
        make_ppo(vec_env, learning_rates={"encoder": 1e-4})


def test_lm_gym_does_not_import_agents():
    code = "import sys, lm_gym, lm_gym.sb3; print(sorted(m for m in sys.modules if m.split('.')[0] == 'agents'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
