"""The CleanRL-style single-file PPO (examples/cleanrl_ppo_lm.py) runs and learns on the tiny model."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cleanrl_ppo_lm.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cleanrl_ppo_lm", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


def test_cleanrl_style_ppo_learns_the_demo_reward(capsys):
    history = load_script().main(["--num-updates", "18", "--num-envs", "8"])
    assert len(history) == 18 and "update 18/18" in capsys.readouterr().out
    assert np.nanmean(history[:3]) < 0.4  # about 0.2 by chance
    assert np.nanmean(history[-3:]) > np.nanmean(history[:3]) + 0.3


def test_cleanrl_style_ppo_trains_on_dialogues_with_the_agents_tokens_as_its_actions(monkeypatch):
    """Multi-turn: the stored observations hold the env LM's replies (agent_mask 0) after the agent's tokens,
    and each stored step is one agent token: exactly the ids the observations mark as the agent's."""
    script = load_script()
    batches = []
    update = script.ppo_update
    monkeypatch.setattr(script, "ppo_update", lambda agent, optimizer, batch, args: (
        batches.append(batch), update(agent, optimizer, batch, args))[1])
    history = script.main(["--num-updates", "2", "--num-envs", "4", "--max-turns", "2", "--num-steps", "20",
                           "--max-new-tokens", "4"])
    assert len(history) == 2 and not np.isnan(history).all()  # episodes of two turns ended and were rewarded
    ids, masks, actions = batches[0][:3]
    agent_steps, replies = 0, 0
    for step in range(1, ids.shape[0]):  # the new ids of the next observation start with the stored action
        for row in range(ids.shape[1]):
            grew = int(masks[step, row].sum() - masks[step - 1, row].sum())
            if grew >= 1 and ids[step, row, -grew] == actions[step - 1, row]:
                agent_steps, replies = agent_steps + 1, replies + (grew > 1)  # > 1: the env LM's reply followed
    assert replies > 0  # the env's ids entered the observations, never the actions
    assert agent_steps > 0.8 * (ids.shape[0] - 1) * ids.shape[1]  # the other steps: episodes restarting
