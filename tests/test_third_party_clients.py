"""Cases found when real third-party clients drive lm-gym as their users would (SB3, TorchRL, Gymnasium)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
from torchrl.collectors import Collector

import lm_gym
from agents import TransformerActorCritic, TransformerActorCriticPolicy
from agents.integrations.torchrl import LOG_PROB_KEY, make_torchrl_actor_critic
from lm_gym.integrations.torchrl import make_torchrl_env
from lm_gym.padding import trim_left

SETTINGS = dict(model="tiny", max_new_tokens=4, max_prompt_tokens=48, truncate_prompt="left", device="cpu")


@pytest.mark.parametrize("vec_env_cls, env_id, vec_env_kwargs", [
    (DummyVecEnv, lm_gym.ENV_ID, None),
    (SubprocVecEnv, lm_gym.ENV_ID, {"start_method": "fork"}),  # the children inherit the registration
    (SubprocVecEnv, f"lm_gym:{lm_gym.ENV_ID}", None),  # forkserver: Gymnasium imports lm_gym in each worker
])
def test_sb3_make_vec_env_runs_unchanged(vec_env_cls, env_id, vec_env_kwargs):
    envs = make_vec_env(env_id, n_envs=2, vec_env_cls=vec_env_cls, env_kwargs=SETTINGS, seed=0,
                        vec_env_kwargs=vec_env_kwargs)
    envs.reset()
    for _ in range(SETTINGS["max_new_tokens"]):
        _, rewards, dones, infos = envs.step(np.array([5, 6]))
    assert dones.all() and all("response_text" in info for info in infos)
    frames = envs.get_images()  # make_vec_env asked for render_mode="rgb_array": real frames come back
    assert len(frames) == 2 and frames[0].dtype == np.uint8 and frames[0].ndim == 3
    assert (frames[0] < 128).any()  # text is drawn
    envs.close()


def test_rgb_array_frames_show_the_dialogue():
    env = gym.make(lm_gym.ENV_ID, render_mode="rgb_array", **SETTINGS)
    env.reset(seed=0)
    before = env.render()
    env.step(5)
    after = env.render()
    assert before.shape == after.shape and before.shape[-1] == 3
    assert not np.array_equal(before, after)  # the new token is drawn
    env.close()


def test_a_time_limit_shorter_than_a_response_is_documented_as_cutting_it():
    assert "max_episode_steps" in lm_gym.EnvConfig.__doc__  # where max_new_tokens is documented
    env = gym.make(lm_gym.ENV_ID, max_episode_steps=2, **SETTINGS)
    env.reset(seed=0)
    env.step(5)
    _, reward, terminated, truncated, info = env.step(6)
    assert truncated and not terminated and reward == 0 and "response_text" not in info  # as documented


def full_forward_logprobs(actor_critic, ids, mask):
    """log π(· | observation) of the latest position, from a full forward of the current weights."""
    with torch.no_grad():
        logits = actor_critic.evaluate(*trim_left(ids, mask)).logits
    return torch.log_softmax(logits[:, -1], dim=-1)


def one_update(parameters, loss):
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, fused=True)  # fused: tensor versions do not move
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_acting_after_an_update_uses_the_new_weights_in_a_torchrl_collector():
    actor_critic = TransformerActorCritic.from_pretrained("tiny", device="cpu")
    env = make_torchrl_env(num_envs=2, model=actor_critic.lm, tokenizer=actor_critic.tokenizer,
                           max_new_tokens=8, max_prompt_tokens=48, truncate_prompt="left")
    actor, _ = make_torchrl_actor_critic(actor_critic, env)
    collector = Collector(env, actor, frames_per_batch=2 * 3, total_frames=2 * 6)
    for index, batch in enumerate(collector):  # 3 steps a batch: episodes of 8 tokens run on across batches
        ids, mask = (batch[key].reshape(-1, batch[key].shape[-1]) for key in ("input_ids", "attention_mask"))
        expected = full_forward_logprobs(actor_critic, ids, mask).gather(1, batch["action"].reshape(-1, 1))[:, 0]
        torch.testing.assert_close(batch[LOG_PROB_KEY].reshape(-1), expected, atol=1e-5, rtol=0)
        if index == 0:
            logits = actor_critic.evaluate(*trim_left(ids, mask)).logits
            one_update(actor_critic.parameters(), logits.logsumexp(-1).mean() - logits[..., 5].mean())
    collector.shutdown()


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict"])
def test_acting_after_a_weight_change_uses_the_new_weights_in_a_custom_sb3_loop(change):
    env = lm_gym.LanguageModelVectorEnv(2, **SETTINGS | {"max_new_tokens": 8})
    policy = TransformerActorCriticPolicy(
        env.single_observation_space, env.single_action_space, lambda _: 1e-2, model="tiny", device="cpu")
    generator = torch.Generator().manual_seed(0)  # other weights (a uniform shift would barely change them)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in policy.state_dict().items()}
    obs, _ = env.reset(seed=0)
    for step in range(4):
        tensors = {key: torch.as_tensor(value) for key, value in obs.items()}
        with torch.no_grad():
            distribution = policy.get_distribution(tensors)
        expected = full_forward_logprobs(policy.actor_critic, tensors["input_ids"], tensors["attention_mask"])
        torch.testing.assert_close(distribution.distribution.logits.log_softmax(-1), expected, atol=1e-5, rtol=0)
        if step == 1 and change == "optimizer_step":
            one_update(policy.parameters(), policy.evaluate_actions(tensors, torch.tensor([5, 6]))[1].mean())
        if step == 1 and change == "load_state_dict":
            policy.load_state_dict(other)
        obs, *_ = env.step(np.array([5, 6]))
