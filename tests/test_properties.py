"""Property-based test: random seeds, prompts and action sequences (valid and invalid) keep the invariants."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_gym import LanguageModelEnv
from tests.conftest import observed_tokens

VOCAB = 1024
actions = st.one_of(
    st.integers(0, VOCAB - 1),
    st.sampled_from([2, 2]),  # the stop token, often enough to end episodes early
    st.integers(-50, -1) | st.integers(VOCAB, VOCAB + 50),  # out of range
    st.sampled_from([1.5, "7", None, [3], True]),  # wrong types
)
prompts = st.none() | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def envs(tiny):
    model, tokenizer = tiny
    single = LanguageModelEnv(model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=96)
    multi = LanguageModelEnv(
        model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=96,
        multi_turn=dict(max_turns=2, context_tokens=150, max_reply_tokens=3),
    )
    return {"single": single, "multi": multi}


def check_observation(env, obs):
    assert env.observation_space.contains(obs)
    mask = obs["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1} and mask[-1] == 1
    assert (np.diff(mask) >= 0).all(), "padding must all be on the left"
    assert (obs["input_ids"][mask == 0] == env.tokenizer.pad_token_id).all()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["single", "multi"]), seed=st.integers(0, 2**31 - 1), prompt=prompts,
       sequence=st.lists(actions, min_size=1, max_size=25))
def test_invariants_hold_after_every_call(envs, mode, seed, prompt, sequence):
    env = envs[mode]
    obs, info = env.reset(seed=seed, options={"prompt": prompt} if prompt else None)
    check_observation(env, obs)
    tokens = observed_tokens(obs)
    turn: list[int] = []
    over = False
    for action in sequence:
        valid = isinstance(action, int) and not isinstance(action, bool) and 0 <= action < VOCAB
        if over or not valid:
            with pytest.raises((TypeError, ValueError, RuntimeError)):
                env.step(action)
            assert observed_tokens(env.unwrapped._observation()) == tokens, "a rejected call changed the episode"
            continue
        obs, reward, terminated, truncated, info = env.step(action)
        check_observation(env, obs)
        assert not (terminated and truncated)
        assert np.isfinite(reward) and info["ref_logprob"] <= 0.0
        turn.append(action)
        if "response_text" in info:
            text_tokens = turn[:-1] if turn[-1] == env.tokenizer.eos_token_id else turn
            assert info["response_text"] == env.tokenizer.decode(text_tokens, skip_special_tokens=True)
            assert np.isfinite(list(info["reward_components"].values())).all()
            turn = []
        else:
            assert reward == 0.0
            assert observed_tokens(obs) == tokens + [action]
        tokens = observed_tokens(obs)
        over = terminated or truncated
