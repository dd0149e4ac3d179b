"""``SB3VecEnv``: a natively batched stable-baselines3 VecEnv over :class:`LanguageModelVectorEnv`.

Not a DummyVecEnv of single envs: all rows step in one forward of the LM. It follows SB3's conventions:
``reset()`` returns observations only (infos in ``reset_infos``), ``step_wait()`` returns
``(obs, rewards, dones, infos)`` with a list of per-env info dicts, finished envs reset on the same step
with ``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from lm_gym.config import EnvConfig
from lm_gym.vector_env import LanguageModelVectorEnv

ROW_METHODS = ("action_masks",)  # methods whose result has one entry per env


class SB3VecEnv(VecEnv):
    """The LM environment as an SB3 VecEnv of ``num_envs`` rows.

    :param num_envs: number of episodes stepped together.
    :param config: an :class:`lm_gym.EnvConfig`; keyword ``settings`` (its fields: model, prompts, reward,
        lengths, ...) replace its fields.
    :param group_size: rows per prompt group (see :class:`LanguageModelVectorEnv`); a row that waits for its
        group keeps its final observation and has ``infos[i]["waiting"]``.
    """

    def __init__(self, num_envs: int = 1, config: EnvConfig | None = None, *, group_size: int = 1, **settings: Any):
        self.venv = LanguageModelVectorEnv(num_envs, config, autoreset_mode=AutoresetMode.SAME_STEP,
                                           group_size=group_size, **settings)
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self._actions: np.ndarray | None = None

    @property
    def model(self):
        """The env's LM (run as the reference)."""
        return self.venv.model

    @property
    def tokenizer(self):
        """The env's tokenizer."""
        return self.venv.tokenizer

    @property
    def reward(self):
        """The env's reward (bound to its reference)."""
        return self.venv.episodes.reward

    @property
    def reference(self):
        """The env's :class:`lm_gym.reference.ReferenceModel`."""
        return self.venv.reference

    def reset(self):
        """Reset every env with the seeds and options set by ``seed()`` / ``set_options()``, if any."""
        seeds = None if all(seed is None for seed in self._seeds) else list(self._seeds)
        prompts = [options.get("prompt") for options in self._options]
        unknown = {key for options in self._options for key in options} - {"prompt"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; SB3VecEnv takes 'prompt'")
        options = {"prompts": prompts} if any(p is not None for p in prompts) else None
        obs, self.reset_infos = self.venv.reset_with_row_infos(seed=seeds, options=options)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Store the actions of the next :meth:`step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self):
        """Step all envs in one batched forward; reset finished envs on the same step."""
        if self._actions is None:
            raise RuntimeError("call step_async(actions) before step_wait()")
        obs, rewards, terminated, truncated, row_infos = self.venv.step_with_row_infos(self._actions)
        self._actions = None
        dones = terminated | truncated
        infos = []
        for row, info in enumerate(row_infos):
            if dones[row]:
                terminal_obs, step_info = info.pop("final_obs"), info.pop("final_info")
                self.reset_infos[row] = info
                info = {**step_info, "terminal_observation": terminal_obs}
            info["TimeLimit.truncated"] = bool(truncated[row] and not terminated[row])
            infos.append(info)
        return obs, rewards.astype(np.float32), dones, infos

    def release_memory(self) -> None:
        """Free the KV cache while the env sits idle (see :meth:`LanguageModelVectorEnv.release_memory`)."""
        self.venv.release_memory()

    def close(self) -> None:
        """Free the LM and its cache."""
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        """The attribute of the underlying vector env, once per selected env (the rows share it)."""
        return [getattr(self.venv, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        """Set an attribute of the underlying vector env (shared by all rows)."""
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        """Call a method of the vector env; per-row results (``action_masks``) are split by env."""
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        rows = self._indices(indices)
        return [result[row] for row in rows] if method_name in ROW_METHODS else [result] * len(rows)

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        """The rows are not Gymnasium envs and carry no wrappers."""
        return [False] * len(self._indices(indices))

    def _indices(self, indices: None | int | Iterable[int]) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)
