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

    Returns the mean reward with its standard error, the mean of each component and its standard error,
    the KL to the reference, the mean response length in characters, the fraction of responses that ended
    on their own (stop token, not the length limit), and the (prompt, response) samples. The env's reward is
    refreshed first (:meth:`lm_gym.rewards.Reward.refresh`).
    """
    agent.policy.set_training_mode(False)
    env.reward.refresh()  # an evaluation is a rollout: the reward takes in new data before it, not during it
    torch.manual_seed(seed)
    env.seed(seed)
    env.set_options([{"prompt": prompt} for prompt in prompts])
    obs = env.reset()
    done, cache = np.zeros(env.num_envs, dtype=bool), RolloutCache()
    rewards, kl, infos = np.zeros(env.num_envs), np.zeros(env.num_envs), [None] * env.num_envs
    stopped = np.zeros(env.num_envs, dtype=bool)
    while not done.all():
        ids, mask = token_batch(obs["input_ids"], obs["attention_mask"], agent.device)
        logits, _ = agent.actor_critic.act(ids, mask, cache, values=False)
        actions, logprobs = sample_tokens(logits)
        logprobs = logprobs.cpu().numpy()
        obs, step_rewards, dones, step_infos = env.step(actions.cpu().numpy())
        for row in np.flatnonzero(~done):
            kl[row] += logprobs[row] - step_infos[row]["ref_logprob"]
            rewards[row] += step_rewards[row]  # the return: every turn's reward (multi-turn episodes have several)
            if dones[row]:
                infos[row], done[row] = step_infos[row], True
                stopped[row] = not step_infos[row].get("TimeLimit.truncated", False)
    env.release_memory()  # its KV cache is not needed until the next evaluation
    names = dict.fromkeys(name for info in infos for name in info["reward_components"])  # a cut tool turn has its own
    components = {name: np.array([info["reward_components"].get(name, 0.0) for info in infos]) for name in names}
    return {
        "reward": float(rewards.mean()),
        "reward_stderr": standard_error(rewards),
        "components": {name: float(values.mean()) for name, values in components.items()},
        "component_stderrs": {name: standard_error(values) for name, values in components.items()},
        "kl": float(kl.mean()),
        "length": float(np.mean([len(info["response_text"]) for info in infos])),
        "eos_rate": float(stopped.mean()),
        "samples": [(info["prompt_text"], info["response_text"]) for info in infos],
    }


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (NaN for fewer than two)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
