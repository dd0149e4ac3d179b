"""The CleanRL-style single-file PPO (examples/cleanrl_ppo_lm.py) runs and learns on the tiny model."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cleanrl_ppo_lm.py"


def test_cleanrl_style_ppo_learns_the_demo_reward(capsys):
    spec = importlib.util.spec_from_file_location("cleanrl_ppo_lm", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up there
    spec.loader.exec_module(script)
    history = script.main(["--num-updates", "18", "--num-envs", "8"])
    assert len(history) == 18 and "update 18/18" in capsys.readouterr().out
    assert np.nanmean(history[:3]) < 0.4  # about 0.2 by chance
    assert np.nanmean(history[-3:]) > np.nanmean(history[:3]) + 0.3
