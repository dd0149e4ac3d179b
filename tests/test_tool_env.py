"""Tool episodes on the tiny model: calls run between the agent's turns, results go in as ids, the agent's own
ids stay exactly where it put them, and every failure is an error result the episode goes on from."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_gym import LanguageModelEnv, LanguageModelVectorEnv
from tests.conftest import observed_tokens

CALL = '<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    return a + b


def fail(reason: str) -> str:
    """Raise an error.

    Args:
        reason: what the error says
    """
    raise RuntimeError(reason)


def slow(seconds: float) -> str:
    """Sleep for a while.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "done"


def answer_reward(prompts, responses):
    return [1.0 if response.strip() == "5" else 0.0 for response in responses]


def tool_env(tiny, **settings):
    model, tokenizer = tiny
    keywords = dict(model=model, tokenizer=tokenizer, max_new_tokens=240, max_prompt_tokens=1200, tools=[add, fail, slow],
                    reward=answer_reward, multi_turn=dict(max_turns=4, context_tokens=1800, max_reply_tokens=100,
                                                          tool_timeout=0.05, max_tool_calls=3))
    keywords.update(settings)
    return LanguageModelEnv(**keywords)


def say(env, text: str, stop: bool = True) -> tuple:
    """Take the tokens of ``text`` (then the stop token) as actions; the last step's results."""
    ids = env.tokenizer(text, add_special_tokens=False).input_ids + ([env.tokenizer.eos_token_id] if stop else [])
    for token in ids:
        result = env.step(token)
    return result


def test_a_tool_call_gets_its_result_then_the_final_answer_is_scored(tiny):
    env = tool_env(tiny)
    obs, _ = env.reset(seed=0)
    assert "You can call these tools" in env.tokenizer.decode(observed_tokens(obs))
    call = CALL.format(name="add", arguments='{"a": 2, "b": 3}')
    obs, reward, terminated, truncated, info = say(env, call, stop=False)  # the call's closing tag ends the turn
    assert (reward, terminated, truncated) == (0.0, False, False) and info["turn_ended"]
    context = env.tokenizer.decode(observed_tokens(obs))
    assert context.endswith(f"{call}<|im_end|>\n<|im_start|>tool\n<tool_response>5</tool_response><|im_end|>\n"
                            "<|im_start|>assistant\n")
    obs, reward, terminated, truncated, info = say(env, "5")
    assert (reward, terminated, truncated) == (1.0, True, False)
    agent, tool, final = info["turns"][1:]
    assert agent["tool_calls"] == [{"name": "add", "arguments": {"a": 2, "b": 3}, "result": "5", "error": None,
                                    "seconds": agent["tool_calls"][0]["seconds"]}]
    assert tool == {"role": "tool", "text": "<tool_response>5</tool_response>"}
    assert final["role"] == "assistant" and final["text"] == "5"


@pytest.mark.parametrize("text, error", [
    (CALL.format(name="add", arguments='{"a": 2}'), "invalid_arguments"),
    (CALL.format(name="multiply", arguments='{"a": 2, "b": 3}'), "unknown_tool"),
    (CALL.format(name="fail", arguments='{"reason": "no"}'), "exception"),
    (CALL.format(name="slow", arguments='{"seconds": 1}'), "timeout"),
    ("<tool_call>{not json}</tool_call>", "malformed"),
])
def test_a_failed_call_is_an_error_result_and_the_episode_goes_on(tiny, text, error):
    env = tool_env(tiny)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = say(env, text, stop=False)
    assert not (terminated or truncated)
    assert info["turns"][1]["tool_errors"] == {error: 1}
    assert info["turns"][2]["text"].startswith("<tool_response>error: ")
    assert say(env, "5")[1] == 1.0  # the agent answers after the error


def test_calls_past_the_limit_are_not_run(tiny):
    env = tool_env(tiny, multi_turn=dict(max_turns=5, context_tokens=1800, max_reply_tokens=100, max_tool_calls=3))
    env.reset(seed=0)
    call = CALL.format(name="add", arguments='{"a": 1, "b": 1}')
    for _ in range(4):  # four calls, one a turn; the limit is three
        info = say(env, call, stop=False)[-1]
    errors = [c["error"] for turn in info["turns"] for c in turn.get("tool_calls", [])]
    assert errors == [None, None, None, "call_limit"]


def test_a_turn_without_a_complete_call_ends_at_the_stop_token(tiny):
    env = tool_env(tiny)
    env.reset(seed=0)
    _, _, terminated, _, info = say(env, '<tool_call>{"name": "add"', stop=False)
    assert not info.get("turn_ended")  # an unclosed call leaves the turn open
    _, _, terminated, _, info = say(env, " and more")
    assert info["turn_ended"] and info["turns"][1]["tool_errors"] == {"malformed": 1} and not terminated


def test_a_result_too_long_for_its_turn_is_cut_visibly_and_counted(tiny):
    def echo(text: str) -> str:
        """Repeat a text many times.

        Args:
            text: what to repeat
        """
        return text * 200

    env = tool_env(tiny, tools=[echo])
    env.reset(seed=0)
    info = say(env, CALL.format(name="echo", arguments='{"text": "ab"}'), stop=False)[-1]
    tool = info["turns"][2]
    assert tool["cut_tokens"] > 0 and "tokens cut]" in tool["text"]
    assert len(env.tokenizer(tool["text"], add_special_tokens=False).input_ids) <= 100


def test_the_last_turn_ends_the_episode_with_its_calls_unrun(tiny):
    env = tool_env(tiny, multi_turn=dict(max_turns=1, context_tokens=1800))
    env.reset(seed=0)
    _, reward, terminated, truncated, info = say(env, CALL.format(name="add", arguments='{"a": 2, "b": 3}'), stop=False)
    assert truncated and not terminated and reward == 0.0
    assert info["turns"][1]["unrun_calls"] == 1


def test_tools_and_other_party_are_exclusive(tiny):
    with pytest.raises(ValueError, match="tools or other_party"):
        tool_env(tiny, other_party=object())


turn_text = st.one_of(
    st.just(CALL.format(name="add", arguments='{"a": 2, "b": 3}')),
    st.just(CALL.format(name="add", arguments='{"a": "x"}')),
    st.just("<tool_call>oops"),
    st.text(st.characters(codec="ascii", min_codepoint=32, max_codepoint=126), min_size=1, max_size=12),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), turns=st.lists(st.tuples(turn_text, st.booleans()), min_size=1, max_size=5))
def test_every_agent_id_stays_where_it_was_put_and_is_marked_in_every_later_observation(tiny, seed, turns):
    env = tool_env(tiny, multi_turn=dict(max_turns=4, context_tokens=1800, max_reply_tokens=30, tool_timeout=0.05))
    obs, _ = env.reset(seed=seed)
    chosen: dict[int, int] = {}  # position in the episode -> the id the agent put there
    over = False
    for text, stop in turns:
        ids = env.tokenizer(text, add_special_tokens=False).input_ids + ([env.tokenizer.eos_token_id] if stop else [])
        for token in ids:
            chosen[len(observed_tokens(obs))] = token
            obs, _, terminated, truncated, _ = env.step(token)
            sequence = observed_tokens(obs)
            assert all(sequence[position] == token for position, token in chosen.items())
            agent_mask = obs["agent_mask"][obs["attention_mask"] == 1]  # every other id is context, not an action
            assert set(np.flatnonzero(agent_mask)) == set(chosen)
            if terminated or truncated:
                over = True
                break
        if over:
            break


def test_vector_env_rows_take_tool_turns_side_by_side(tiny):
    model, tokenizer = tiny
    envs = LanguageModelVectorEnv(2, model=model, tokenizer=tokenizer, max_new_tokens=240, max_prompt_tokens=1200,
                                  tools=[add], reward=answer_reward,
                                  multi_turn=dict(max_turns=3, context_tokens=1800, max_reply_tokens=100))
    envs.reset(seed=0)
    call = tokenizer(CALL.format(name="add", arguments='{"a": 2, "b": 3}'), add_special_tokens=False).input_ids
    chatter = tokenizer(" hello there", add_special_tokens=False).input_ids
    for step, token in enumerate(call):
        other = chatter[step % len(chatter)]  # row 1 keeps writing while row 0 calls the tool
        obs, rewards, terminated, truncated, infos = envs.step(np.array([token, other]))
    assert infos["turn_ended"][0] and not infos["_turn_ended"][1]
    row0 = tokenizer.decode(obs["input_ids"][0][obs["attention_mask"][0] == 1])
    assert row0.endswith("<tool_response>5</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert envs.single_observation_space["agent_mask"].shape == obs["agent_mask"][0].shape
    assert obs["agent_mask"].sum(axis=1).tolist() == [len(call), len(call)]  # the actions, nothing inserted

