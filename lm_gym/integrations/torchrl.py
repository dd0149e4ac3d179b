"""TorchRL env side (``pip install lm-gym[torchrl]``): the LM env as a TorchRL env.

:func:`make_torchrl_env` wraps :class:`lm_gym.LanguageModelEnv` (or, with ``num_envs``, the batched
:class:`lm_gym.LanguageModelVectorEnv`) in TorchRL's ``GymWrapper`` with a categorical action spec of size V
(token ids, no one-hot over the vocabulary). Tensordicts carry ``input_ids`` and ``attention_mask``,
``"ref_logprob"`` (log π_ref of the token just taken, under ``"next"``; 0 after a reset) and, when the env
restricts tokens, a bool ``"action_mask"`` that also masks the action spec (random actions stay allowed)::

    env = make_torchrl_env(num_envs=8, model="tiny", max_new_tokens=16)
    rollout = env.rollout(32, break_when_any_done=False)

The policy side (the Transformer as a TorchRL actor and critic) is :mod:`agents.integrations.torchrl`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorWrapper
from gymnasium.vector.utils import batch_space
from torchrl.data import Unbounded
from torchrl.envs import ActionMask, EnvBase, GymWrapper, default_info_dict_reader

from lm_gym.env import LanguageModelEnv
from lm_gym.integrations._common import REF_LOGPROB_KEY, NumericInfos, TokenMaskObservation, with_token_mask
from lm_gym.vector_env import LanguageModelVectorEnv, _autoreset_mode

ACTION_MASK_KEY = "action_mask"
TORCHRL_AUTORESET_MODES = (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED)
OBSERVATION_KEYS = ("input_ids", "attention_mask")


def make_torchrl_env(num_envs: int | None = None, autoreset_mode: AutoresetMode | str = "same_step",
                     **env_kwargs: Any) -> EnvBase:
    """The LM environment as a TorchRL env (``GymWrapper``, categorical token actions).

    :param num_envs: ``None`` for one :class:`lm_gym.LanguageModelEnv` (batch size ``()``); an int for a
        :class:`lm_gym.LanguageModelVectorEnv` of that many rows in one batched forward (batch size ``(N,)``).
    :param autoreset_mode: how the vector env restarts finished rows: ``"same_step"`` (TorchRL swaps the
        final observation back in and keeps the reset one for the next step) or ``"disabled"`` (TorchRL resets
        finished rows itself, with the env's ``reset_mask``). ``"next_step"`` is refused: TorchRL cannot
        read it. Ignored for a single env.
    :param env_kwargs: keywords of :class:`lm_gym.LanguageModelEnv` (model, prompts, reward, lengths, ...).
    :return: the TorchRL env; wrapped in ``TransformedEnv(..., ActionMask())`` when ``allowed_token_ids``
        is given.
    """
    masked = env_kwargs.get("allowed_token_ids") is not None
    if num_envs is None:
        env = _single_env(masked, **env_kwargs)
    else:
        env = _vector_env(num_envs, torchrl_autoreset_mode(autoreset_mode), masked, **env_kwargs)
    return env.append_transform(ActionMask(mask_key=ACTION_MASK_KEY)) if masked else env


def torchrl_autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    """The :class:`AutoresetMode` named by ``mode``; a ``ValueError`` for the modes TorchRL cannot read."""
    resolved = _autoreset_mode(mode)
    if resolved not in TORCHRL_AUTORESET_MODES:
        allowed = ", ".join(repr(m.name.lower()) for m in TORCHRL_AUTORESET_MODES)
        raise ValueError(
            f"autoreset_mode={mode!r} is not supported by TorchRL's GymWrapper; use one of {allowed} "
            "(the vector env's default 'next_step' returns reset observations TorchRL cannot tell apart)"
        )
    return resolved


def _single_env(masked: bool, **env_kwargs: Any) -> EnvBase:
    base = LanguageModelEnv(**env_kwargs)
    env = NumericInfos(TokenMaskObservation(base, ACTION_MASK_KEY) if masked else base)
    wrapped = GymWrapper(env, categorical_action_encoding=True)
    if base.episodes.reference_logprobs:
        _read_ref_logprob(wrapped, shape=())
    return wrapped


def _vector_env(num_envs: int, mode: AutoresetMode, masked: bool, **env_kwargs: Any) -> EnvBase:
    venv = TorchRLVectorEnv(
        LanguageModelVectorEnv(num_envs, autoreset_mode=mode, **env_kwargs),
        action_mask_key=ACTION_MASK_KEY if masked else None,
    )
    with venv.probing():  # under SAME_STEP, GymWrapper steps random tokens to learn the info specs
        wrapped = GymWrapper(venv, categorical_action_encoding=True)
    if mode == AutoresetMode.DISABLED and venv.reference_logprobs:
        _read_ref_logprob(wrapped, shape=(num_envs,))  # SAME_STEP: GymWrapper's own reader reads it
    return wrapped


def _read_ref_logprob(env: GymWrapper, shape: tuple[int, ...]) -> None:
    """Register ``"ref_logprob"`` (float32) with TorchRL's info reader, specs given (no probing steps)."""
    spec = Unbounded(shape=shape, dtype=torch.float32, device=env.device)
    env.set_info_dict_reader(default_info_dict_reader([REF_LOGPROB_KEY], spec=[spec]))


class TorchRLVectorEnv(VectorWrapper):
    """:class:`lm_gym.LanguageModelVectorEnv` as TorchRL's ``GymWrapper`` reads it.

    Infos hold numbers only: ``ref_logprob``, one float32 per row (for rows that just finished under
    SAME_STEP, the value of their final step). Under SAME_STEP, ``final_info`` carries each finished row's
    final observation by key, where TorchRL's terminal-observation reader looks for dict observations (it
    cannot read Gymnasium's ``final_obs`` array of dicts), so the transition ends in the true last
    observation and the reset observation starts the next step.

    :param env: the vector env, autoreset ``SAME_STEP`` or ``DISABLED``.
    :param action_mask_key: add the allowed-token masks, bool (N, V), to the observations under this key;
        ``None`` for none.
    """

    def __init__(self, env: LanguageModelVectorEnv, action_mask_key: str | None = None):
        super().__init__(env)
        self.action_mask_key = action_mask_key
        self.reference_logprobs = env.episodes.reference_logprobs
        self.token_masks = env.action_masks()
        if action_mask_key is not None:
            self.single_observation_space = with_token_mask(
                env.single_observation_space, action_mask_key, self.token_masks.shape[1]
            )
            self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._probing = False

    @property
    def autoreset_mode(self) -> AutoresetMode:
        """The wrapped env's autoreset mode (TorchRL reads it)."""
        return self.env.autoreset_mode

    @contextlib.contextmanager
    def probing(self):
        """Inside, disallowed tokens are replaced by an allowed one: TorchRL's construction-time probe steps
        random tokens from the whole vocabulary before the action mask is in place."""
        self._probing = True
        try:
            yield self
        finally:
            self._probing = False

    def reset(self, *, seed=None, options: dict | None = None):
        """Reset all rows (or ``options["reset_mask"]``); the infos are empty."""
        observations, _ = self.env.reset(seed=seed, options=options)
        return self._observations(observations), {}

    def step(self, actions):
        """Step every row; see the class docstring for the infos."""
        if self._probing:
            actions = np.where(self.token_masks[0][actions], actions, np.flatnonzero(self.token_masks[0])[0])
        observations, rewards, terminated, truncated, infos = self.env.step(actions)
        numeric = {}
        if self.reference_logprobs:
            numeric[REF_LOGPROB_KEY] = self._ref_logprobs(infos)
        if "final_obs" in infos:
            numeric["final_info"] = {**self._final_observations(observations, infos), **numeric}
        return self._observations(observations), rewards, terminated, truncated, numeric

    def _observations(self, observations: dict) -> dict:
        if self.action_mask_key is None:
            return observations
        return {**observations, self.action_mask_key: self.token_masks.copy()}

    def _ref_logprobs(self, infos: dict) -> np.ndarray:
        """(N,) float32: each row's ``ref_logprob``, from ``final_info`` for rows that were just reset."""
        values = np.zeros(self.num_envs, dtype=np.float32)
        for source in (infos, infos.get("final_info", {})):
            if REF_LOGPROB_KEY in source:
                rows = source[f"_{REF_LOGPROB_KEY}"]
                values[rows] = source[REF_LOGPROB_KEY][rows]
        return values

    def _final_observations(self, observations: dict, infos: dict) -> dict:
        """The observations with each finished row's final observation in place of its reset one."""
        final = {key: value.copy() for key, value in self._observations(observations).items()}
        for row in np.flatnonzero(infos["_final_obs"]):
            for key in OBSERVATION_KEYS:
                final[key][row] = infos["final_obs"][row][key]
        return final
