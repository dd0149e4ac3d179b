"""``lm-gym rlhf --preset smoke`` end to end on the tiny model: every artefact exists and loads."""

import json

import pytest
from transformers import AutoModelForCausalLM

import lm_gym
from agents import RewardModel, train_reward_model
from agents.cli import main
from agents.rlhf import RLHFConfig, run_rlhf, split_pairs
from lm_gym.data import PreferencePair
from lm_gym.rewards import RewardModelReward


@pytest.fixture
def preferences(tmp_path):
    rows = [{"prompt": f"Question number {i}?", "chosen": "yes " * (1 + i % 3), "rejected": "no " * (1 + i % 2)}
            for i in range(40)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_smoke_pipeline_writes_every_artefact(tmp_path, preferences):
    run = tmp_path / "run"
    assert main(["rlhf", "--preset", "smoke", "--preferences", str(preferences), "--sft", "--run-dir", str(run)]) == 0
    for name in ("report.md", "reward_model.png", "curves.png", "samples.md", "metrics.csv", "checkpoint.zip"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "pairwise accuracy" in report and "before: held-out reward" in report
    AutoModelForCausalLM.from_pretrained(run / "sft")
    AutoModelForCausalLM.from_pretrained(run / "model")
    rm = RewardModel.load(run / "reward_model")
    assert RewardModelReward(run / "reward_model", normalize=True)(["Q?"], ["yes"]).shape == (1,)
    assert rm.std > 0
    env = lm_gym.LanguageModelEnv(model=str(run / "model"), max_new_tokens=4, reward=lambda p, r, **c: [0.0])
    env.reset(seed=0)

    again = tmp_path / "again"  # every stage skipped by pointing at an artefact, except PPO
    assert main(["rlhf", "--preset", "smoke", "--preferences", str(preferences), "--reward-model",
                 str(run / "reward_model"), "--policy", str(run / "sft"), "--run-dir", str(again)]) == 0
    assert not (again / "reward_model").exists() and not (again / "sft").exists()
    assert (again / "model" / "config.json").is_file() and (again / "report.md").is_file()


def test_bad_preference_input_is_named(tmp_path, preferences):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: 0 usable pairs"):
        split_pairs(RLHFConfig.preset("smoke", preferences=str(empty)))
    mismatched = tmp_path / "hh.jsonl"
    mismatched.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
                                      "rejected": "\n\nHuman: Bye\n\nAssistant: Go"}) + "\n")
    with pytest.raises(Exception, match="hh.jsonl.*line 1"):
        split_pairs(RLHFConfig.preset("smoke", preferences=str(mismatched)))
    with pytest.raises(ValueError, match="--preferences"):
        run_rlhf(RLHFConfig.preset("smoke"), tmp_path / "none")
    with pytest.raises(ValueError, match="unknown preset"):
        RLHFConfig.preset("huge")


def test_chat_prompts_need_a_chat_template():
    model, tokenizer = lm_gym.load_model("tiny")
    tokenizer.chat_template = None
    pairs = [PreferencePair("\n\nHuman: Hi?\n\nAssistant:", "yes", "no")]
    with pytest.raises(ValueError, match="chat template"):
        train_reward_model(pairs, model, tokenizer=tokenizer, progress=False)
