"""Env-side adapters: the LM environment as other RL libraries expect it.

Each is an optional extra, imported on its own (nothing here is imported eagerly), and none imports
:mod:`agents`; the Transformer actor-critic's side of each library lives in :mod:`agents.integrations`:

- :mod:`lm_gym.integrations.rllib` (``pip install lm-gym[rllib]``): the env registered with Ray Tune, with
  RLlib's action-masking observations.
- :mod:`lm_gym.integrations.torchrl` (``pip install lm-gym[torchrl]``): TorchRL envs (``GymWrapper`` with
  categorical token actions over the single or the batched vector env).
- :mod:`lm_gym.integrations.tianshou` (``pip install lm-gym[tianshou]``): env factories for Tianshou's vector
  envs, the allowed-token mask under ``obs.mask``.
- :mod:`lm_gym.integrations.textarena` (``pip install lm-gym[textarena]``): TextArena's single-player games as
  the other party of multi-turn episodes.
- :mod:`lm_gym.integrations.openenv` (``pip install lm-gym[openenv]``): an OpenEnv environment, played through
  its client's ``reset``/``step``, as the other party of multi-turn episodes.

The SB3 ``VecEnv`` is :class:`lm_gym.sb3.SB3VecEnv`.
"""
