"""Tianshou env side (``pip install lm-gym[tianshou]``): env factories for Tianshou's vector envs.

:func:`env_factories` gives the ``env_fns`` of Tianshou's ``DummyVectorEnv`` / ``SubprocVectorEnv``
(one :class:`lm_gym.LanguageModelEnv` each) and :func:`make_tianshou_envs` builds one. With
``allowed_token_ids`` the observations carry the allowed-token mask under ``"mask"``, Tianshou's key for
legal actions.

The policy side (the Transformer as Tianshou's actor and critic, and its PPO) is
:mod:`agents.integrations.tianshou`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import gymnasium as gym
from tianshou.env import BaseVectorEnv, DummyVectorEnv, SubprocVectorEnv

from lm_gym.config import EnvConfig
from lm_gym.env import LanguageModelEnv
from lm_gym.integrations._common import NumericInfos, TokenMaskObservation
from lm_gym.models import resolve_model

MASK_KEY = "mask"
VECTOR_ENVS = {"dummy": DummyVectorEnv, "subproc": SubprocVectorEnv}


def make_tianshou_env(**env_kwargs: Any) -> gym.Env:
    """One :class:`lm_gym.LanguageModelEnv` for Tianshou: infos hold ``ref_logprob`` only (Tianshou's buffers
    need the same numeric keys at every step), observations the allowed-token mask under ``"mask"`` when
    tokens are restricted (Tianshou's vector envs read attributes from ``env.unwrapped``, so their
    ``observation_space`` lists no ``"mask"``; the wrapped env's own does).

    :param env_kwargs: keywords of :class:`lm_gym.LanguageModelEnv`.
    """
    env = NumericInfos(LanguageModelEnv(**env_kwargs))
    return TokenMaskObservation(env, MASK_KEY) if env_kwargs.get("allowed_token_ids") is not None else env


def env_factories(num_envs: int, **env_kwargs: Any) -> list[Callable[[], gym.Env]]:
    """``num_envs`` env constructors for Tianshou's vector envs (picklable if ``env_kwargs`` are).

    :param num_envs: number of envs.
    :param env_kwargs: keywords of :class:`lm_gym.LanguageModelEnv`. A loaded model is shared by the envs of
        one process (each keeps its own KV cache); a model name is loaded by each env.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    return [partial(make_tianshou_env, **env_kwargs) for _ in range(num_envs)]


def make_tianshou_envs(num_envs: int, kind: str = "dummy", seed: int | None = None, **env_kwargs: Any) -> BaseVectorEnv:
    """A Tianshou vector env of ``num_envs`` LM envs.

    :param num_envs: number of envs.
    :param kind: ``"dummy"`` (``DummyVectorEnv``: one process; a model given by name is loaded once and
        shared) or ``"subproc"`` (``SubprocVectorEnv``: one process, and one model copy, per env).
    :param seed: env i draws its prompts from ``seed + i``; ``None`` leaves them unseeded.
    :param env_kwargs: keywords of :class:`lm_gym.LanguageModelEnv`.
    """
    if kind not in VECTOR_ENVS:
        raise ValueError(f"kind={kind!r}; expected one of {sorted(VECTOR_ENVS)}")
    if kind == "dummy":
        env_kwargs = shared_model(env_kwargs)
    envs = VECTOR_ENVS[kind](env_factories(num_envs, **env_kwargs))
    if seed is not None:
        envs.seed(seed)
    return envs


def shared_model(env_kwargs: dict) -> dict:
    """``env_kwargs`` with the model loaded (once) in place of its name, so that envs can share it."""
    config = EnvConfig.of(**env_kwargs)
    model, tokenizer = resolve_model(config.model, config.tokenizer, config.device, config.lm_dtype())
    return {**env_kwargs, "model": model, "tokenizer": tokenizer}
