"""Verifiable tasks: answer extraction, exact numbers, the reward's credit, disjoint splits, the env and
training on a task, reasoning-gym's datasets, and held-out accuracy with Wilson intervals."""

from fractions import Fraction

import gymnasium as gym
import pytest

import lm_gym
from lm_gym.tasks import (
    Addition, Multiplication, Reverse, TaskAccuracy, evaluate_task, evaluate_tool_task, extract_answer, make_task,
    numbers_equal, parse_number, wilson_interval,
)
from lm_gym.tasks.answers import last_number
from lm_gym.tasks.tool_evaluation import episode_record


def test_the_last_answer_span_counts():
    assert extract_answer("I think <answer>12</answer>, no: <ANSWER> 13 </answer>.") == "13"
    assert extract_answer("<answer>two\nlines</answer>") == "two\nlines"
    assert extract_answer("the answer is 12") is None
    assert extract_answer("<answer>12") is None


@pytest.mark.parametrize("response, number", [
    ("47 + 38 = 85", "85"), ("It is 1,085.", "1,085"), ("-3.5 degrees", "-3.5"), ("1/3 of it", "1/3"),
    ("x2 and 7", "7"), ("no digits here", None), ("version v2", None),
])
def test_the_last_number_is_the_answer(response, number):
    assert last_number(response) == number


@pytest.mark.parametrize("text, value", [
    ("7", 7), ("+7", 7), ("7.0", 7), ("7.", 7), (" 7 ", 7), ("7/1", 7), ("14/2", 7), ("-0", 0), ("1,000", 1000),
    ("1e3", 1000), ("0.1", Fraction(1, 10)), ("-2.50", Fraction(-5, 2)),
])
def test_numbers_read_exactly(text, value):
    assert parse_number(text) == value and numbers_equal(text, value) and numbers_equal(text, str(value))


@pytest.mark.parametrize("text", ["seven", "7 apples", "", "1,00", "7/0", "0x7", "--7", "7 7"])
def test_words_and_malformed_numbers_are_not_numbers(text):
    assert not numbers_equal(text, 7)


def test_numbers_compare_exactly_not_approximately():
    assert not numbers_equal("0.3333333", Fraction(1, 3)) and numbers_equal("1/3", Fraction(1, 3))
    assert not numbers_equal("7.000001", 7)


def test_the_reward_gives_one_for_correct_a_little_for_the_format_and_nothing_else():
    task = Addition()
    problem = task.problems("train", 1)[0]
    reward = task.reward([problem])
    responses = [f"The sum is {problem.answer}", f"+{problem.answer}.0", "It is 3.", "eighty-five"]
    output = reward.evaluate([problem.prompt] * 4, responses)
    assert output.total.tolist() == pytest.approx([1.0, 1.0, 0.1, 0.0])
    assert output.components["correct"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert output.components["formatted"].tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(KeyError, match="is not one of the 1 problems of task 'addition'"):
        reward.evaluate(["What is 1 + 1?"], ["2"])
    tagged = Reverse()
    word = tagged.problems("train", 1)[0]
    scores = tagged.reward([word])([word.prompt] * 3, [f"<answer>{word.answer}</answer>", "<answer>x</answer>",
                                                       word.answer])
    assert scores.tolist() == pytest.approx([1.0, 0.1, 0.0])  # the tagged format: an untagged answer is not one


@pytest.mark.parametrize("task", [Addition(), Addition(digits=(3, 3)), Multiplication(), Reverse()], ids=repr)
def test_training_and_held_out_problems_never_overlap_and_repeat(task):
    train, held_out = task.problems("train", 500), task.problems("eval", 100)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert len({p.prompt for p in train}) == 500 and task.problems("eval", 100) == held_out
    assert ("<answer>" in train[0].prompt) == isinstance(task, Reverse)  # the answer format is part of the prompt
    assert "Answer with a number." in train[0].prompt or isinstance(task, Reverse)
    assert all(task.is_correct(p, p.answer) for p in train[:20])


def test_reverse_checks_the_reversed_string():
    task = Reverse()
    problem = task.problems("eval", 1)[0]
    assert task.is_correct(problem, f"'{problem.answer.upper()}'")
    assert not task.is_correct(problem, problem.answer[::-1] + "x")


def test_bad_task_requests_are_refused():
    with pytest.raises(ValueError, match="unknown task 'sudoku'; expected one of"):
        make_task("sudoku")
    with pytest.raises(ValueError, match="split='test'"):
        Addition().problems("test", 3)
    with pytest.raises(ValueError, match=r"has \d+ distinct eval problems, fewer than the 50 asked for"):
        Addition(digits=(1, 1)).problems("eval", 50)
    with pytest.raises(ValueError, match="go to make_task with a task name"):
        make_task(Addition(), digits=3)
    with pytest.raises(ValueError, match="leave prompts and reward unset"):
        lm_gym.EnvConfig(task="addition", prompts=["hi"])


def test_the_env_takes_a_task_and_scores_the_answer(tiny):
    model, tokenizer = tiny
    env = gym.make("LanguageModelEnv-v0", model=model, tokenizer=tokenizer, task="addition", max_new_tokens=24,
                   max_prompt_tokens=96)
    task = make_task("addition")
    by_prompt = {p.prompt: p for p in task.problems("train", lm_gym.tasks.TRAIN_PROBLEMS, at_most=True)}
    for offset, expected in ((0, 1.0), (1, 0.1)):
        env.reset(seed=offset)
        prompt = env.unwrapped.episodes.turns[0][0]["text"]
        answer = int(by_prompt[prompt].answer) + offset
        actions = tokenizer(f"<answer>{answer}</answer>", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for action in actions:
            _, reward, terminated, truncated, info = env.step(action)
        assert terminated and reward == pytest.approx(expected)
        assert info["reward_components"]["correct"] == float(offset == 0)


def test_reasoning_gym_datasets_with_disjoint_seeds_and_robust_numbers():
    task = make_task("reasoning-gym:leg_counting", min_animals=2, max_animals=3)
    train, held_out = task.problems("train", 30), task.problems("eval", 30)
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    problem = held_out[0]
    assert "leg" in problem.prompt and "<answer>" in problem.prompt
    reward = task.reward(held_out)
    scores = reward([problem.prompt] * 4, [f"<answer>{v}</answer>" for v in
                                           (problem.answer, f"+{problem.answer}", f"{problem.answer}.0", "seven")])
    assert scores.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="reasoning-gym has no dataset 'leg_count'"):
        make_task("reasoning-gym:leg_count")


def test_wilson_intervals_by_hand():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert str(TaskAccuracy(8, 10)) == "80.0% (8/10; 95% interval 49.0%-94.3%)"


def test_held_out_accuracy_of_a_model_is_reproducible(tiny):
    model, tokenizer = tiny
    task = Reverse()
    result = evaluate_task(model, tokenizer, task, problems=6, samples=2, max_new_tokens=4)
    assert result["greedy"].total == 6 and result["pass@2"].total == 6
    assert [prompt for prompt, _, _ in result["responses"]] == [p.prompt for p in task.problems("eval", 6)]
    again = evaluate_task(model, tokenizer, task, problems=6, samples=2, max_new_tokens=4, seed=1)
    assert again["responses"] == result["responses"]  # greedy: the same whatever the sampling seed


def test_greedy_only_evaluation_matches_the_greedy_part_of_a_full_one(tiny):
    model, tokenizer = tiny
    task = Reverse()
    full = evaluate_task(model, tokenizer, task, problems=5, samples=2, max_new_tokens=4)
    greedy = evaluate_task(model, tokenizer, task, problems=5, samples=0, max_new_tokens=4)
    assert "pass@0" not in greedy and "pass@2" in full
    assert greedy["responses"] == full["responses"] and greedy["greedy"] == full["greedy"]


def test_a_small_task_gives_all_its_problems_when_asked_for_at_most_more():
    task = Addition(digits=(1, 1))  # 100 sums, about a fifth of them held out
    train = task.problems("train", 1000, at_most=True)
    held_out = task.problems("eval", 1000, at_most=True)
    keys = {p.prompt for p in train} | {p.prompt for p in held_out}
    assert len(train) + len(held_out) == len(keys) == 100  # every sum, each in one split only
    assert task.problems("train", 10) == train[:10]  # the same order whatever the count


def test_the_env_trains_on_a_task_with_fewer_problems_than_it_draws_from(tiny):
    model, tokenizer = tiny
    env = gym.make("LanguageModelEnv-v0", model=model, tokenizer=tokenizer, task="multiplication", max_new_tokens=4)
    env.reset(seed=0)
    train = {p.prompt for p in make_task("multiplication").problems("train", lm_gym.tasks.TRAIN_PROBLEMS, at_most=True)}
    assert 0 < len(train) < lm_gym.tasks.TRAIN_PROBLEMS
    assert env.unwrapped.episodes.turns[0][0]["text"] in train


def test_a_tool_task_is_evaluated_in_episodes_with_its_tools(tiny):
    model, tokenizer = tiny
    task = make_task("calculator")
    first = evaluate_tool_task(model, tokenizer, task, problems=3, max_new_tokens=6, max_turns=2, batch_size=2)
    again = evaluate_tool_task(model, tokenizer, task, problems=3, max_new_tokens=6, max_turns=2, batch_size=2)
    held_out = [p.prompt for p in task.problems("eval", 3)]
    assert [e["turns"][0]["text"] for e in first["episodes"]] == held_out  # one episode per problem, in order
    assert first["accuracy"].total == 3 and first["called"].total == 3
    assert [e["turns"] for e in first["episodes"]] == [e["turns"] for e in again["episodes"]]  # greedy
    with pytest.raises(ValueError, match="has no tools"):
        evaluate_tool_task(model, tokenizer, make_task("addition"), problems=2)


def test_an_episode_record_counts_its_calls_and_checks_the_final_answer():
    call = {"name": "calculator", "arguments": {"expression": "2*3"}, "result": "6", "error": None, "seconds": 0.0}
    bad = {**call, "result": "error: ...", "error": "invalid_arguments"}
    info = {"turns": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "c", "tool_calls": [call, bad]},
                      {"role": "tool", "text": "6"}, {"role": "assistant", "text": "6"}],
            "reward_components": {"correct": 1.0, "formatted": 1.0}}
    record = episode_record(info)
    assert record["correct"] and record["tool_calls"] == [call, bad]
    assert not episode_record({**info, "reward_components": {"other_party": 0.0}})["correct"]
