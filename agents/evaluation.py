"""Evaluating a Transformer policy on fixed prompts: reward, its components, KL to the reference, samples."""

from __future__ import annotations

import numpy as np
import torch

from agents.actor_critic import token_batch
from agents.ppo import LMPPO
from agents.rollout_cache import RolloutCache
from lm_gym.sampling import sample_tokens
from lm_gym.sb3 import SB3VecEnv


@torch.no_grad()
def evaluate(agent: LMPPO, env: SB3VecEnv, prompts: list, seed: int) -> dict:
    """One sampled episode per env row (row i gets ``prompts[i]``; repeat prompts for several samples each).

    Returns the mean reward with its standard error, the mean of each component, the KL to the reference,
    the mean response length in characters, and the (prompt, response) samples.
    """
    agent.policy.set_training_mode(False)
    torch.manual_seed(seed)
    env.seed(seed)
    env.set_options([{"prompt": prompt} for prompt in prompts])
    obs = env.reset()
    done, cache = np.zeros(env.num_envs, dtype=bool), RolloutCache()
    rewards, kl, infos = np.zeros(env.num_envs), np.zeros(env.num_envs), [None] * env.num_envs
    while not done.all():
        ids, mask = token_batch(obs["input_ids"], obs["attention_mask"], agent.device)
        logits, _ = agent.actor_critic.act(ids, mask, cache, values=False)
        actions, logprobs = sample_tokens(logits)
        logprobs = logprobs.cpu().numpy()
        obs, step_rewards, dones, step_infos = env.step(actions.cpu().numpy())
        for row in np.flatnonzero(~done):
            kl[row] += logprobs[row] - step_infos[row]["ref_logprob"]
            if dones[row]:
                rewards[row], infos[row], done[row] = step_rewards[row], step_infos[row], True
    names = infos[0]["reward_components"]
    return {
        "reward": float(rewards.mean()),
        "reward_stderr": float(rewards.std(ddof=1) / np.sqrt(len(rewards))) if len(rewards) > 1 else float("nan"),
        "components": {name: float(np.mean([info["reward_components"][name] for info in infos])) for name in names},
        "kl": float(kl.mean()),
        "length": float(np.mean([len(info["response_text"]) for info in infos])),
        "samples": [(info["prompt_text"], info["response_text"]) for info in infos],
    }
