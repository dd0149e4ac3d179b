"""SB3 callbacks for language-model training."""

from __future__ import annotations

import os
from pathlib import Path

from stable_baselines3.common.callbacks import BaseCallback

from agents.evaluation import evaluate
from agents.heap import release_freed_memory


class SampleResponsesCallback(BaseCallback):
    """Every ``every`` rollouts, sample responses to fixed prompts and append them to a Markdown file.

    :param env: an ``SB3VecEnv`` with one row per prompt (it scores the responses with its reward).
    :param prompts: the fixed prompts, one per env row.
    :param path: the Markdown file to append to.
    :param every: rollouts between two samples.
    :param seed: sampling seed, the same each time so the samples differ only by what was learned.
    """

    def __init__(self, env, prompts: list, path: str | os.PathLike, every: int = 5, seed: int = 0):
        super().__init__()
        if len(prompts) != env.num_envs:
            raise ValueError(f"{len(prompts)} prompts for an env of {env.num_envs} rows; give one per row")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.env, self.prompts, self.path, self.every, self.seed = env, list(prompts), Path(path), every, seed
        self.rollouts = 0

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        if self.rollouts % self.every:
            return
        record = evaluate(self.model, self.env, self.prompts, self.seed)
        lines = [f"## after {self.num_timesteps} env steps: mean reward {record['reward']:.3f}, "
                 f"KL {record['kl']:.3f}", ""]
        lines += [f"- **{prompt}**\n  {response.strip()}" for prompt, response in record["samples"]]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n\n")


class RefreshRewardCallback(BaseCallback):
    """At the start of every rollout, let the env's reward take in data that arrived since the last one
    (:meth:`lm_gym.rewards.Reward.refresh`: a live feedback store's new ratings); within a rollout the
    reward stays fixed, so its scores do not depend on when in the rollout an episode ended.

    :param env: the training env (an ``SB3VecEnv``), whose reward is refreshed.
    """

    def __init__(self, env):
        super().__init__()
        self.env = env

    def _on_rollout_start(self) -> None:
        self.env.reward.refresh()

    def _on_step(self) -> bool:
        return True


class ReleaseMemoryCallback(BaseCallback):
    """Free the training env's KV cache when each rollout ends (an lm-gym env rebuilds it at its next step,
    :meth:`lm_gym.LanguageModelEnv.release_memory`), and give freed heap memory back to the system as each
    rollout starts and ends (before the update), so that the resident memory of a long run stays near what
    it holds live (:func:`agents.heap.release_freed_memory`; a few milliseconds each time)."""

    def _on_rollout_start(self) -> None:
        release_freed_memory()

    def _on_rollout_end(self) -> None:
        if self.training_env.has_attr("release_memory"):
            self.training_env.env_method("release_memory")
        release_freed_memory()

    def _on_step(self) -> bool:
        return True
