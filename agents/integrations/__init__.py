"""Agent-side adapters: the Transformer actor-critic inside other RL libraries.

Each is an optional extra, imported on its own (nothing here is imported eagerly); the env side of each
library lives in :mod:`lm_gym.integrations`:

- :mod:`agents.integrations.rllib` (``pip install lm-gym[rllib]``): an RLlib ``RLModule``, its PPO learner
  with per-part learning rates, and ``ppo_config``.
- :mod:`agents.integrations.torchrl` (``pip install lm-gym[torchrl]``): a ``ProbabilisticActor`` /
  ``ValueOperator`` pair and GAE set up for a Transformer.
- :mod:`agents.integrations.tianshou` (``pip install lm-gym[tianshou]``): actor and critic networks sharing one
  forward, and Tianshou's PPO with LM defaults.
"""
