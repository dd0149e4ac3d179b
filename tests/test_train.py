"""``lm-gym train`` on the tiny model: the run directory, exact resume after Ctrl-C, export, generate, eval."""

import csv
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import lm_gym
from agents import SampleResponsesCallback
from agents import train as training
from agents.cli import main
from agents.train import TrainConfig, run

TINY = dict(model="tiny", iterations=3, num_envs=4, max_new_tokens=5, eval_prompts=4, learning_rate=1e-3,
            batch_size=32)


def final_weights(run_dir):
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_run_directory_holds_every_artefact(tmp_path):
    state = run(TrainConfig(**TINY), tmp_path)
    for name in ("config.toml", "metrics.csv", "curves.png", "samples.md", "checkpoint.zip", "state.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tb").rglob("events.out.tfevents*"))
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(row["rollout/kl_per_segment"] for row in rows)
    samples = (tmp_path / "samples.md").read_text()
    assert "## before training" in samples and "## after training" in samples
    assert {"feedback", "fluency", "missing_eos"} == set(state["after"]["components"])
    exported = lm_gym.LanguageModelEnv(model=str(tmp_path / "model"), max_new_tokens=2, reward=lambda p, r, **c: [0.0])
    exported.reset(seed=0)
    resolved = TrainConfig(**TINY, precision="fp32", group_size=1, max_prompt_tokens=training.PROMPT_TOKENS)
    assert TrainConfig.from_toml(tmp_path / "config.toml") == resolved  # as resolved
    assert 'precision = "fp32"  # ' in (tmp_path / "config.toml").read_text()  # with the reason


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    run(TrainConfig(**TINY), tmp_path / "straight")
    original = training.train_iteration

    def interrupt_at_second(agent, env, config, iteration):
        if iteration == 1:
            original(agent, env, config, iteration)  # partly trained, then Ctrl-C: this iteration must be redone
            raise KeyboardInterrupt
        original(agent, env, config, iteration)

    monkeypatch.setattr(training, "train_iteration", interrupt_at_second)
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(**TINY), tmp_path / "interrupted")
    monkeypatch.setattr(training, "train_iteration", original)
    run(TrainConfig(**TINY), tmp_path / "interrupted", resume=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_cli_train_generate_and_eval(tmp_path, capsys):
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    assert main(["train", "--run-dir", str(tmp_path), *flags]) == 0
    assert "after: reward" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "model"), "--max-new-tokens", "4", "Say hi."]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "model"), "--reference", "tiny", "--eval-prompts", "3"]) == 0
    assert "KL" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2


def test_sample_callback_writes_responses_for_fixed_prompts(tmp_path, tiny):
    model, tokenizer = tiny
    config = TrainConfig(**TINY)
    prompts = ["Name a colour.", "Say hello."]
    env = training.make_env(config, ["Count to three."] * 4, 4, model, tokenizer)
    sample_env = training.make_env(config, prompts, 2, model, tokenizer)
    agent = training.make_agent(config, env)
    callback = SampleResponsesCallback(sample_env, prompts, tmp_path / "samples.md", every=2)
    agent.learn(4 * config.max_new_tokens * 4, callback=callback)
    text = (tmp_path / "samples.md").read_text()
    assert text.count("## after") == 2 and text.count("**Name a colour.**") == 2
    with pytest.raises(ValueError, match="one per row"):
        SampleResponsesCallback(sample_env, prompts[:1], tmp_path / "x.md")


def test_config_toml_records_what_auto_picked_and_why(tmp_path):
    config, precision = TrainConfig(precision="auto").resolved()
    assert config.precision in ("bf16", "fp32") and precision.reason.startswith("auto: ")
    text = config.to_toml({"precision": precision.reason})
    assert f'precision = "{config.precision}"  # auto: ' in text
    (tmp_path / "config.toml").write_text(text)
    assert TrainConfig.from_toml(tmp_path / "config.toml") == config  # the comment reads back as the choice


def test_the_missing_eos_penalty_joins_the_rewards_own_components():
    blend = lm_gym.BlendedReward(lm_gym.FunctionReward(lambda p, r: [1.0] * len(r), "liked"),
                                 lm_gym.FunctionReward(lambda p, r: [0.5] * len(r), "fluent"), alpha=0.5)
    reward = training.with_missing_eos_penalty(blend, 0.25)
    scored = reward.evaluate(["a", "b"], ["ended.", "cut at the lim"], stopped=[True, False])
    assert list(scored.components) == ["liked", "fluent", "missing_eos"]
    assert scored.total.tolist() == [0.75, 0.5]
    assert training.with_missing_eos_penalty(blend, 0.0) is blend


def test_samples_md_reports_each_components_change_in_standard_errors(tmp_path):
    run(TrainConfig(**TINY), tmp_path)
    table = (tmp_path / "samples.md").read_text().split("\n\n")[1]
    names = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert names == ["reward", "feedback", "fluency", "missing_eos", "EOS rate", "KL to the reference (nats)"]
    assert table.splitlines()[2].endswith(" SE) |")  # the reward's change, in combined standard errors


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce++"])
def test_critic_free_training_on_a_task(tmp_path, algo):
    config = TrainConfig(**{**TINY, "iterations": 2}, algo=algo, task="addition", group_size=2,
                         max_prompt_tokens=64)
    state = run(config, tmp_path)
    assert {"addition", "correct", "formatted", "missing_eos"} == set(state["after"]["components"])
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    saved = TrainConfig.from_toml(tmp_path / "config.toml")
    assert (saved.algo, saved.task, saved.group_size) == (algo, "addition", 2)


def test_training_on_a_tool_task_plays_multi_turn_episodes_with_its_tools(tmp_path):
    config = TrainConfig(**{**TINY, "iterations": 1}, algo="grpo", task="calculator", group_size=2, max_turns=2)
    state = run(config, tmp_path)
    assert {"calculator", "correct", "formatted", "missing_eos"} <= set(state["after"]["components"])
    saved = TrainConfig.from_toml(tmp_path / "config.toml")
    assert (saved.max_turns, saved.max_prompt_tokens) == (2, training.TOOL_PROMPT_TOKENS)  # room for the tools
    env = training.make_rank_env(saved, training.training_data(saved))
    assert env.venv.config.multi_turn.max_turns == 2 and [t.__name__ for t in env.venv.config.tools] == ["calculator"]
    assert training.rollout_steps(saved, env) == 2 * saved.max_new_tokens  # room for a whole episode
    with pytest.raises(ValueError, match="more than max_prompt_tokens=50"):  # the tools' instructions are never cut
        env = training.make_rank_env(dataclasses.replace(saved, max_prompt_tokens=50), training.training_data(saved))
        env.reset()


def test_bad_algorithm_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="algo='a2c'"):
        run(TrainConfig(**TINY, algo="a2c"), tmp_path)
    with pytest.raises(ValueError, match="ppo puts it in the reward"):
        run(TrainConfig(**TINY, kl="loss"), tmp_path)
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        run(TrainConfig(**TINY, algo="grpo", task="addition", group_size=3), tmp_path)
