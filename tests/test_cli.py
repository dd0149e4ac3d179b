"""The ``lm-gym`` command on the tiny model."""

from agents.cli import main


def test_rollout_prints_episodes_and_rewards(capsys):
    assert main(["rollout", "--model", "tiny", "--episodes", "2", "--max-new-tokens", "4", "--policy", "random"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- episode") == 2 and out.count("reward ") == 2 and "fluency=" in out
    assert "2 episodes, " in out


def test_rollout_reports_bad_input(capsys):
    assert main(["rollout", "--model", "./no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["rollout", "--model", "tiny", "--episodes", "0"]) == 2
    assert "--episodes" in capsys.readouterr().err
