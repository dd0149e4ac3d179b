"""Integration: LMPPO on the default model learns a reward the real model can discover."""

import numpy as np
import pytest
import torch

from agents import LMPPO
from lm_gym.sb3 import SB3VecEnv

pytestmark = pytest.mark.integration

WORD = "Sure"
PROMPTS = ["Can you help me plan a picnic?", "Could you explain what a noun is?", "Can you suggest a name for a cat?",
           "Could you give me a tip for sleeping better?", "Can you tell me a fun fact about owls?",
           "Could you help me write a thank-you note?", "Can you recommend a board game for two?",
           "Could you describe the color blue to me?"]


def starts_with_word(prompts, responses, **context):
    return [float(r.strip().lower().startswith(WORD.lower())) for r in responses]


def success_rate(agent, env, rounds=4):
    hits = []
    for _ in range(rounds):
        obs, done = env.reset(), np.zeros(env.num_envs, dtype=bool)
        while not done.all():
            actions, _ = agent.predict(obs)
            obs, rewards, dones, _ = env.step(actions)
            hits += [rewards[i] for i in np.flatnonzero(dones & ~done)]
            done |= dones
    return float(np.mean(hits))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lmppo_learns_to_start_with_a_word(precision):
    torch.manual_seed(0)
    env = SB3VecEnv(8, prompts=PROMPTS, reward=starts_with_word, max_new_tokens=4, device="cpu", precision=precision)
    agent = LMPPO(env=env, n_steps=4, batch_size=32, n_epochs=4, learning_rate=3e-5, kl_coef=0.02, seed=0,
                  device="cpu", precision=precision, policy_kwargs={"model": "default", "device": "cpu"})
    before = success_rate(agent, env)
    for _ in range(6):
        agent.reset_episodes()
        agent.learn(4 * 8, reset_num_timesteps=False)
    after = success_rate(agent, env)
    print(f"{precision}: responses starting with {WORD!r}: {before:.0%} before, {after:.0%} after")
    assert after > before + 0.25, (before, after)
