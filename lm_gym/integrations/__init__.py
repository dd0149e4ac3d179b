"""Adapters of the LM environment and the Transformer actor-critic to other RL libraries.

Each adapter is an optional extra, imported on its own (nothing here is imported eagerly):

- :mod:`lm_gym.integrations.rllib` (``pip install lm-gym[rllib]``): Ray RLlib.
- :mod:`lm_gym.integrations.torchrl` (``pip install lm-gym[torchrl]``): TorchRL envs (``GymWrapper``) and a
  ``ProbabilisticActor`` / ``ValueOperator`` pair around a :class:`agents.actor_critic.TransformerActorCritic`.
- :mod:`lm_gym.integrations.tianshou` (``pip install lm-gym[tianshou]``): env factories for Tianshou's vector
  envs, actor and critic networks for Tianshou's PPO.
"""
