"""The env side stands alone: with ``agents`` unimportable, ``lm_gym`` and every env-side adapter work."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ENV_SIDE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoAgents(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "agents" or name.startswith("agents."):
                raise ImportError(f"{name} is made unimportable by this test")
            return None

    sys.meta_path.insert(0, NoAgents())

    import gymnasium as gym
    import numpy as np
    import lm_gym
    from lm_gym.sb3 import SB3VecEnv
    from lm_gym.integrations.rllib import make_env
    from lm_gym.integrations.torchrl import make_torchrl_env
    from lm_gym.integrations.tianshou import make_tianshou_envs

    settings = dict(model="tiny", max_new_tokens=3, max_prompt_tokens=48, truncate_prompt="left", device="cpu")
    env = gym.make("LanguageModelEnv-v0", **settings)
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    vec = SB3VecEnv(2, **settings)
    vec.reset()
    for _ in range(3):
        vec.step(np.array([5, 6]))
    rllib_env = make_env({**settings, "allowed_token_ids": [5, 6]})
    obs, _ = rllib_env.reset(seed=0)
    rllib_env.step(5)
    torchrl_env = make_torchrl_env(num_envs=2, **settings)
    assert torchrl_env.rollout(4, break_when_any_done=False).batch_size == (2, 4)
    tianshou_envs = make_tianshou_envs(2, **settings)
    tianshou_envs.reset()
    tianshou_envs.step(np.array([5, 6]))
    loaded = sorted(name for name in sys.modules if name == "agents" or name.startswith("agents."))
    assert not loaded, loaded
    print("env side ok")
    """
)


def test_env_side_runs_with_agents_unimportable():
    result = subprocess.run([sys.executable, "-c", ENV_SIDE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "env side ok" in result.stdout


def agents_imports(module: str) -> set[str]:
    """The ``agents`` modules that ``module`` imports, directly or through other ``agents`` modules."""
    seen, todo = set(), [module]
    while todo:
        path = Path(__file__).parents[1] / (todo.pop().replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("agents.") and name not in seen:
                    seen.add(name)
                    todo.append(name)
    return seen


def test_the_actor_critic_does_not_import_training_code():
    training = {"agents.reward_model", "agents.ppo", "agents.train", "agents.sft", "agents.rlhf", "agents.policy"}
    assert agents_imports("agents.actor_critic") & training == set()
