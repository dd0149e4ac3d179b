"""LanguageModelEnv on the tiny model: API compliance, episode rules, reference log-probs, bad input."""

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import lm_gym
from lm_gym import MultiTurn
from tests.conftest import assert_same_observations, full_forward_logprobs, observed_tokens, play, reset_prompt, stop_id

MULTI = dict(max_turns=2, context_tokens=160, max_reply_tokens=5, reply_temperature=0.8)


@pytest.mark.parametrize("multi_turn", [None, MULTI], ids=["single-turn", "multi-turn"])
def test_gymnasium_and_sb3_checkers_pass(tiny, multi_turn):
    model, tokenizer = tiny
    env = gym.make(
        "LanguageModelEnv-v0", model=model, tokenizer=tokenizer, max_new_tokens=6, max_prompt_tokens=64,
        multi_turn=multi_turn, render_mode="ansi",
    ).unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # the checkers report problems as warnings
        gym_check_env(env)
    sb3_check_env(env, warn=True)
    env.close()


def test_spaces_follow_the_model(make_tiny_env, tiny):
    model, tokenizer = tiny
    env = make_tiny_env(max_new_tokens=7, max_prompt_tokens=40)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert vocab > len(tokenizer)  # the tiny model pads its output rows, as many real models do
    assert env.action_space == gym.spaces.Discrete(vocab)
    for key in ("input_ids", "attention_mask"):
        assert env.observation_space[key].shape == (47,)
        assert env.observation_space[key].dtype == np.int64
    assert env.observation_space["input_ids"].high.max() == vocab - 1


def test_observation_is_left_padded_prompt(make_tiny_env, tiny):
    _, tokenizer = tiny
    env = make_tiny_env()
    obs, info = env.reset(seed=0, options={"prompt": "Name a fruit."})
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    mask = obs["attention_mask"]
    assert observed_tokens(obs) == list(expected)
    assert mask[-1] == 1 and (np.diff(mask) >= 0).all()  # zeros then ones
    assert info == {}
    obs, *_ = env.step(5)
    assert obs["input_ids"][-1] == 5 and observed_tokens(obs) == list(expected) + [5]
    assert reset_prompt(env, seed=0, options={"prompt": "Name a fruit."}) == "Name a fruit."


def test_same_seed_same_actions_same_episode(make_tiny_env):
    actions = [3, 17, 400, 99, 12, 8, 1000]
    for multi_turn in (None, MULTI):
        env_a, env_b = make_tiny_env(multi_turn=multi_turn), make_tiny_env(multi_turn=multi_turn)
        for _ in range(2):
            obs_a, steps_a = play(env_a, actions * 3, seed=11)
            obs_b, steps_b = play(env_b, actions * 3, seed=11)
            assert_same_observations(obs_a, obs_b)
            assert steps_a == steps_b


def test_different_seeds_draw_different_prompts(make_tiny_env):
    env = make_tiny_env()
    prompts = {reset_prompt(env, seed=seed) for seed in range(20)}
    assert len(prompts) > 10


@pytest.mark.parametrize("multi_turn", [None, MULTI], ids=["single-turn", "multi-turn"])
def test_ref_logprob_equals_full_forward(make_tiny_env, tiny, multi_turn):
    model, _ = tiny
    env = make_tiny_env(multi_turn=multi_turn, max_new_tokens=5)
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            action = int(rng.integers(env.action_space.n)) if rng.random() < 0.8 else stop_id(env)
            expected = full_forward_logprobs(model, observed_tokens(obs))[action].item()
            obs, _, terminated, truncated, info = env.step(action)
            assert info["ref_logprob"] == pytest.approx(expected, abs=1e-4)
            checked += 1
            done = terminated or truncated
    assert checked > 10


@pytest.mark.parametrize("multi_turn", [None, {"max_turns": 2, "max_reply_tokens": 4, "context_tokens": 96}],
                         ids=["single", "multi-turn"])
def test_without_reference_logprobs_the_episodes_and_rewards_are_the_same(make_tiny_env, multi_turn):
    fluency = lm_gym.rewards.FluencyReward()  # reads ref_logprobs, or scores the response itself without them
    scored = make_tiny_env(multi_turn=multi_turn, reward=fluency, max_new_tokens=5)
    unscored = make_tiny_env(multi_turn=multi_turn, reward=lm_gym.rewards.FluencyReward(), max_new_tokens=5,
                             reference_logprobs=False)
    rng = np.random.default_rng(0)
    for seed in range(4):
        actions = [int(a) for a in rng.integers(3, 900, size=20)]
        a_obs, a_steps = play(scored, actions, seed=seed)
        b_obs, b_steps = play(unscored, actions, seed=seed)
        assert_same_observations(a_obs, b_obs)
        for (a_reward, *a_flags, a_info), (b_reward, *b_flags, b_info) in zip(a_steps, b_steps):
            assert a_flags == b_flags and "ref_logprob" in a_info and "ref_logprob" not in b_info
            assert b_reward == pytest.approx(a_reward, abs=1e-4)
    with pytest.raises(RuntimeError, match="reference_logprobs=False"):
        unscored.unwrapped.next_token_logprobs()


def test_stop_token_terminates_and_reward_comes_last(make_tiny_env):
    env = make_tiny_env(reward=lambda prompts, responses, **_: [float(len(r)) + 1.0 for r in responses])
    _, steps = play(env, [40, 41, stop_id(env)])
    assert [s[0] for s in steps[:-1]] == [0.0, 0.0]
    reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert reward == len(info["response_text"]) + 1.0
    assert info["reward_components"] == {"<lambda>": reward}
    assert info["response_text"] == env.unwrapped.tokenizer.decode([40, 41])


def test_length_limit_truncates(make_tiny_env):
    env = make_tiny_env(max_new_tokens=4)
    _, steps = play(env, [40] * 10)
    assert len(steps) == 4
    assert [(s[1], s[2]) for s in steps] == [(False, False)] * 3 + [(False, True)]


def test_stop_token_on_the_last_allowed_step_terminates(make_tiny_env):
    env = make_tiny_env(max_new_tokens=2)
    _, steps = play(env, [40, stop_id(env)])
    assert steps[-1][1:3] == (True, False)


def test_custom_stop_tokens(make_tiny_env):
    env = make_tiny_env(stop_token_ids=[77])
    _, steps = play(env, [40, env.unwrapped.tokenizer.eos_token_id, 77])
    assert len(steps) == 3 and steps[-1][1]


def test_multi_turn_replies_and_rewards_every_turn(make_tiny_env):
    env = make_tiny_env(multi_turn=MultiTurn(max_turns=3, context_tokens=200, max_reply_tokens=4), max_new_tokens=3)
    stop = stop_id(env)
    _, steps = play(env, [50, stop] * 3)
    ends = [s for s in steps if "response_text" in s[3]]
    assert len(ends) == 3 and len(steps) == 6
    assert [s[1] for s in ends] == [False, False, True]
    turns = ends[-1][3]["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert all(isinstance(s[0], float) and s[0] != 0.0 for s in ends)


def test_multi_turn_budget_truncates(make_tiny_env):
    env = make_tiny_env(multi_turn=dict(max_turns=50, context_tokens=70, max_reply_tokens=8), max_new_tokens=8)
    _, steps = play(env, [60] * 200)
    assert steps[-1][2] and not steps[-1][1]
    assert len(steps) < 200


def test_plain_text_mode_without_chat_template(make_tiny_env, tiny):
    _, tokenizer = tiny
    env = make_tiny_env(use_chat_template=False)
    obs, _ = env.reset(options={"prompt": "Once upon a time"})
    assert observed_tokens(obs) == tokenizer("Once upon a time").input_ids


def test_a_system_prompt_goes_before_text_prompts_only(make_tiny_env, tiny):
    _, tokenizer = tiny

    def chat(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    env = make_tiny_env(system_prompt="Be brief.")
    obs, _ = env.reset(seed=0, options={"prompt": "Name a fruit."})
    system = {"role": "system", "content": "Be brief."}
    assert observed_tokens(obs) == chat([system, {"role": "user", "content": "Name a fruit."}])
    assert reset_prompt(env, seed=0, options={"prompt": "Name a fruit."}) == "Name a fruit."  # what rewards see
    dialogue = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "Hi"}]
    obs, _ = env.reset(options={"prompt": dialogue})
    assert observed_tokens(obs) == chat(dialogue)  # a dialogue keeps its own system message
    plain = make_tiny_env(system_prompt="Be brief.", use_chat_template=False)
    obs, _ = plain.reset(options={"prompt": "Once"})
    assert observed_tokens(obs) == tokenizer("Be brief.\n\nOnce").input_ids
    with pytest.raises(TypeError, match="system_prompt must be a string"):
        make_tiny_env(system_prompt=["Be brief."])


def test_chat_message_prompts(make_tiny_env):
    env = make_tiny_env()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert reset_prompt(env, options={"prompt": messages}) == "Hi there"


def test_render_modes(make_tiny_env, capsys):
    env = make_tiny_env(render_mode="ansi")
    env.reset(options={"prompt": "Say hello."})
    env.step(40)
    text = env.render()
    assert "[user] Say hello." in text and "[assistant]" in text
    human = make_tiny_env(render_mode="human")
    human.reset(options={"prompt": "Say hello."})
    human.step(40)
    assert "[user] Say hello." in capsys.readouterr().out


def test_close_twice_is_safe(make_tiny_env):
    env = make_tiny_env()
    env.reset()
    env.close()
    env.close()


def test_make_passes_keywords(tiny):
    model, tokenizer = tiny
    env = gym.make("LanguageModelEnv-v0", model=model, tokenizer=tokenizer, max_new_tokens=3, max_prompt_tokens=50)
    assert env.observation_space["input_ids"].shape == (53,)
    env.reset(seed=0)
    env.close()


def test_make_by_module_path_in_fresh_interpreter():
    code = (
        "import gymnasium as gym; env = gym.make('lm_gym:LanguageModelEnv-v0', model='tiny', max_new_tokens=2);"
        "obs, info = env.reset(seed=0); obs, r, te, tr, info = env.step(5); obs, r, te, tr, info = env.step(5);"
        "assert tr and 'response_text' in info; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, error",
    [(1.0, TypeError), ("3", TypeError), ([3], TypeError), (np.array([3]), TypeError), (True, TypeError),
     (np.float32(2), TypeError), (None, TypeError), (-1, ValueError), (10**6, ValueError), (np.int64(-5), ValueError)],
)
def test_bad_actions_raise_and_leave_the_episode_unchanged(make_tiny_env, action, error):
    env, twin = make_tiny_env(), make_tiny_env()
    env.reset(seed=4)
    env.step(10)
    with pytest.raises(error, match=r"\[0, 1024\)"):
        env.step(action)
    obs_a, steps_a = play(twin, [10, 20, 30], seed=4)
    obs_b = env.step(20), env.step(30)
    np.testing.assert_array_equal(obs_b[-1][0]["input_ids"], obs_a[-1]["input_ids"])
    assert obs_b[-1][1:4] == steps_a[-1][:3]


@pytest.mark.parametrize("action", [7, np.int64(7), np.int32(7), np.array(7), np.array(7, dtype=np.uint16)])
def test_valid_action_types(make_tiny_env, action):
    env = make_tiny_env()
    env.reset(seed=0)
    obs, *_ = env.step(action)
    assert obs["input_ids"][-1] == 7


def test_step_before_reset_and_after_the_end(make_tiny_env):
    env = make_tiny_env(max_new_tokens=1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(1)
    env.reset()
    env.step(1)
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(1)


def test_long_prompt_raises_unless_truncation_is_chosen(make_tiny_env, tiny):
    _, tokenizer = tiny
    long_prompt = "please " * 80
    env = make_tiny_env(max_prompt_tokens=30)
    with pytest.raises(ValueError, match=r"max_prompt_tokens=30.*truncate_prompt"):
        env.reset(options={"prompt": long_prompt})
    full = tokenizer.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(full, add_special_tokens=False).input_ids
    for side, kept in (("left", ids[-30:]), ("right", ids[:30])):
        obs, _ = make_tiny_env(max_prompt_tokens=30, truncate_prompt=side).reset(options={"prompt": long_prompt})
        assert observed_tokens(obs) == kept


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_prompt_tokens=-3), "max_prompt_tokens"),
        (dict(truncate_prompt="middle"), "truncate_prompt"),
        (dict(render_mode="video"), "render_mode"),
        (dict(prompts=[]), "empty"),
        (dict(prompts=["ok", ""]), r"prompts\[1\]"),
        (dict(prompts="/no/such/prompts.txt"), "does not exist"),
        (dict(multi_turn=dict(max_turns=0)), "max_turns"),
        (dict(multi_turn=dict(context_tokens=50)), "context_tokens"),
    ],
)
def test_bad_constructor_arguments(make_tiny_env, kwargs, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        make_tiny_env(**kwargs)


def test_bad_reset_options(make_tiny_env):
    env = make_tiny_env()
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"promt": "typo"})
    with pytest.raises(TypeError, match="options\\['prompt'\\]"):
        env.reset(options={"prompt": 42})


def test_bad_model_arguments():
    with pytest.raises(TypeError, match="neither a model name"):
        lm_gym.LanguageModelEnv(model=123)
    with pytest.raises(lm_gym.ModelNotFoundError, match="does not exist"):
        lm_gym.LanguageModelEnv(model="./no/such/model")


@pytest.mark.parametrize("scores, match", [([float("nan")], "nan"), ([1.0, 2.0], "shape"), ([float("inf")], "inf")])
def test_bad_reward_output_is_named(make_tiny_env, scores, match):
    def broken(prompts, responses, **context):
        return scores

    env = make_tiny_env(max_new_tokens=1, reward=broken)
    env.reset()
    with pytest.raises(ValueError, match=f"broken.*{match}"):
        env.step(40)


def test_prompt_file_errors_name_the_line(tmp_path, make_tiny_env):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"prompts.jsonl, line 2: invalid JSON"):
        make_tiny_env(prompts=path)
    path.write_text('{"prompt": "fine"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2: expected a 'prompt' or 'messages' field"):
        make_tiny_env(prompts=path)


def test_prompt_sources(tmp_path, make_tiny_env):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert {reset_prompt(make_tiny_env(prompts=txt), seed=s) for s in range(10)} == {
        "first prompt", "second prompt"}
    env = make_tiny_env(prompts=lambda rng: f"count to {int(rng.integers(3, 9))}")
    assert reset_prompt(env, seed=0).startswith("count to ")
    assert len(lm_gym.data.default_prompts()) >= 200


def test_env_runs_without_gradients(make_tiny_env):
    env = make_tiny_env()
    env.reset()
    assert not torch.is_grad_enabled() or env.unwrapped.episodes.batch.next_logprobs.grad_fn is None
    assert not env.unwrapped.model.training
