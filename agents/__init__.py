"""lm-gym agents: the Transformer as the RL policy (PPO for token episodes, reward models).

The agents build on :mod:`lm_gym`; :mod:`lm_gym` never imports them.
"""
