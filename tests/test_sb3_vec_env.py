"""SB3VecEnv: SB3's VecEnv conventions, equal to a DummyVecEnv of single envs, and stock PPO runs on it."""

import numpy as np
import pytest
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from lm_gym import LanguageModelEnv
from lm_gym.sb3 import SB3VecEnv
from tests.test_vector_env import action_stream

NUM_ENVS = 3


@pytest.fixture
def settings(tiny):
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, max_new_tokens=4, max_prompt_tokens=64)


def assert_info_lists_close(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert set(a) == set(b)
        for key in a:
            if key == "terminal_observation":
                for k in a[key]:
                    np.testing.assert_array_equal(a[key][k], b[key][k])
            elif key == "reward_components":
                assert a[key] == pytest.approx(b[key], abs=1e-4)
            elif isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-4)
            else:
                assert a[key] == b[key]


def test_sb3_vec_env_equals_dummy_vec_env(settings):
    ours = SB3VecEnv(NUM_ENVS, **settings)
    theirs = DummyVecEnv([lambda: LanguageModelEnv(**settings) for _ in range(NUM_ENVS)])
    traces = []
    for env in (ours, theirs):
        env.seed(5)
        env.set_options({"prompt": "Say something kind."})
        trace = [(env.reset(), [dict(i) for i in env.reset_infos])]
        for actions in action_stream(3, 30, NUM_ENVS, settings["tokenizer"].eos_token_id):
            obs, rewards, dones, infos = env.step(actions)
            trace.append((obs, rewards, dones, infos, [dict(i) for i in env.reset_infos]))
        traces.append(trace)
    resets = 0
    for a, b in zip(*traces):
        for key in a[0]:
            np.testing.assert_array_equal(a[0][key], b[0][key])
        if len(a) == 5:
            np.testing.assert_allclose(a[1], b[1], atol=1e-4)
            assert a[1].dtype == b[1].dtype == np.float32
            np.testing.assert_array_equal(a[2], b[2])
            assert_info_lists_close(a[3], b[3])
            resets += int(a[2].sum())
        assert_info_lists_close(a[-1], b[-1])
    assert traces[0][0][1][0] == {}  # reset infos are empty; the prompt comes with the last step
    last_step_infos = [info for step in traces[0][1:] for info in step[3] if "prompt_text" in info]
    assert last_step_infos[0]["prompt_text"] == "Say something kind."
    assert resets >= 6


def test_truncation_is_flagged_for_sb3(settings):
    env = SB3VecEnv(2, **settings)
    env.reset()
    for _ in range(4):
        _, _, dones, infos = env.step(np.array([5, 6]))
    assert dones.all() and all(info["TimeLimit.truncated"] for info in infos)
    assert infos[0]["terminal_observation"]["input_ids"][-4:].tolist() == [5, 5, 5, 5]


def test_attributes_methods_and_masks(settings):
    allowed = [5, 6, 7, settings["tokenizer"].eos_token_id]
    env = SB3VecEnv(NUM_ENVS, allowed_token_ids=allowed, **settings)
    masks = get_action_masks(env)
    assert masks.shape == (NUM_ENVS, 1024) and masks.dtype == bool and masks.sum() == NUM_ENVS * len(allowed)
    assert env.env_method("action_masks", indices=[1])[0].sum() == len(allowed)
    assert env.get_attr("num_envs") == [NUM_ENVS] * NUM_ENVS
    env.set_attr("output", "numpy")
    assert env.env_is_wrapped(object) == [False] * NUM_ENVS
    assert env.seed(3) == [3, 4, 5]
    with pytest.raises(ValueError, match="unknown reset options"):
        env.set_options({"temperature": 2})
        env.reset()
    env.close()


def test_stock_ppo_runs_a_few_updates(settings):
    env = SB3VecEnv(NUM_ENVS, **settings)
    model = PPO("MultiInputPolicy", env, n_steps=8, batch_size=12, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=3 * 8 * NUM_ENVS)
    assert model.num_timesteps == 3 * 8 * NUM_ENVS
    assert np.isfinite(model.logger.name_to_value["train/loss"])


def test_maskable_ppo_samples_only_allowed_tokens(settings):
    allowed = [5, 6, 7, settings["tokenizer"].eos_token_id]
    env = SB3VecEnv(NUM_ENVS, allowed_token_ids=allowed, **settings)
    model = MaskablePPO("MultiInputPolicy", env, n_steps=8, batch_size=12, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=2 * 8 * NUM_ENVS)  # any disallowed action would raise in the env
    obs = env.reset()
    actions, _ = model.predict(obs, action_masks=get_action_masks(env))
    assert set(actions.tolist()) <= set(allowed)
