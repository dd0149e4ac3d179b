"""LanguageModelVectorEnv: equal to N single envs, vector conventions, autoreset modes, bounded memory."""

import resource

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from lm_gym import LanguageModelEnv, LanguageModelVectorEnv

NUM_ENVS = 4
MULTI = dict(max_turns=2, context_tokens=150, max_reply_tokens=4, reply_temperature=0.9)


@pytest.fixture
def settings(tiny):
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, max_new_tokens=5, max_prompt_tokens=64)


def action_stream(seed, steps, num_envs, stop):
    """Random token ids with frequent stop tokens, so episodes end at different steps."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(3, 1024, size=(steps, num_envs))
    actions[rng.random((steps, num_envs)) < 0.25] = stop
    return actions


def assert_infos_close(ours, theirs, path="infos"):
    assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs {sorted(theirs)}"
    for key in ours:
        a, b = ours[key], theirs[key]
        if isinstance(a, dict):
            assert_infos_close(a, b, f"{path}[{key!r}]")
        elif key == "final_obs":
            for x, y in zip(a, b):
                assert (x is None) == (y is None)
                if x is not None:
                    for k in x:
                        np.testing.assert_array_equal(x[k], y[k])
        elif a.dtype == object:
            assert a.tolist() == b.tolist(), f"{path}[{key!r}]"
        elif np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{path}[{key!r}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{path}[{key!r}]")


def run_both(settings, mode, steps=40, multi_turn=None):
    ours = LanguageModelVectorEnv(NUM_ENVS, autoreset_mode=mode, multi_turn=multi_turn, **settings)
    theirs = SyncVectorEnv(
        [lambda: LanguageModelEnv(multi_turn=multi_turn, **settings) for _ in range(NUM_ENVS)], autoreset_mode=mode
    )
    stop = settings["tokenizer"].eos_token_id
    results = []
    for env in (ours, theirs):
        obs, info = env.reset(seed=7)
        trace = [(obs, info)]
        done = np.zeros(NUM_ENVS, dtype=bool)
        for actions in action_stream(0, steps, NUM_ENVS, stop):
            if mode == AutoresetMode.DISABLED and done.any():
                trace.append(env.reset(options={"reset_mask": done.copy()}))
            obs, reward, terminated, truncated, info = env.step(actions)
            trace.append((obs, reward, terminated, truncated, info))
            done = terminated | truncated
        results.append(trace)
    return results


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
@pytest.mark.parametrize("multi_turn", [None, MULTI], ids=["single-turn", "multi-turn"])
def test_vector_env_equals_single_envs(settings, mode, multi_turn):
    ours, theirs = run_both(settings, mode, multi_turn=multi_turn)
    assert len(ours) == len(theirs)
    episode_ends = 0
    for a, b in zip(ours, theirs):
        for key in a[0]:
            np.testing.assert_array_equal(a[0][key], b[0][key])
        if len(a) == 5:
            np.testing.assert_allclose(a[1], b[1], atol=1e-4)
            np.testing.assert_array_equal(a[2], b[2])
            np.testing.assert_array_equal(a[3], b[3])
            episode_ends += int((a[2] | a[3]).sum())
        assert_infos_close(a[-1], b[-1])
    assert episode_ends >= 8  # the streams did cross several resets


def test_vector_spaces_and_conventions(settings):
    env = gym.make_vec("LanguageModelEnv-v0", num_envs=3, **settings)
    assert isinstance(env, LanguageModelVectorEnv)
    single = LanguageModelEnv(**settings)
    assert env.single_observation_space == single.observation_space
    assert env.single_action_space == single.action_space
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs["input_ids"].shape == (3, 69) and obs["input_ids"].dtype == np.int64
    assert info == {}
    obs, reward, terminated, truncated, info = env.step(np.array([5, 6, 7]))
    assert reward.shape == (3,) and reward.dtype == np.float64
    assert terminated.dtype == np.bool_ and truncated.dtype == np.bool_
    assert info["ref_logprob"].shape == (3,) and info["_ref_logprob"].all()
    env.close()
    env.close()


def test_ended_rows_carry_their_infos_under_masks(settings):
    env = LanguageModelVectorEnv(3, autoreset_mode="same_step", **settings)
    env.reset(seed=1)
    stop = settings["tokenizer"].eos_token_id
    _, reward, terminated, _, info = env.step(np.array([stop, 9, stop]))
    assert terminated.tolist() == [True, False, True]
    assert info["_final_info"].tolist() == [True, False, True]
    final = info["final_info"]  # a dict of arrays with its own masks, as SyncVectorEnv gives
    assert final["_response_text"].tolist() == [True, False, True] and final["response_text"][0] == ""
    assert final["reward_components"]["_fluency"].tolist() == [True, False, True]
    assert "prompt_text" not in info  # the new episodes' reset infos are empty
    assert reward[1] == 0.0 and reward[0] != 0.0


def test_next_step_ignores_the_action_of_a_resetting_row(settings):
    env = LanguageModelVectorEnv(2, **settings)
    obs, _ = env.reset(seed=2)
    stop = settings["tokenizer"].eos_token_id
    env.step(np.array([stop, 5]))
    obs, reward, terminated, truncated, info = env.step(np.array([10**3, 6]))
    assert not terminated[0] and reward[0] == 0.0 and info["_ref_logprob"].tolist() == [False, True]
    assert obs["input_ids"][1, -2:].tolist() == [5, 6]


def test_disabled_mode_requires_explicit_resets(settings):
    env = LanguageModelVectorEnv(2, autoreset_mode=AutoresetMode.DISABLED, **settings)
    env.reset(seed=0)
    stop = settings["tokenizer"].eos_token_id
    env.step(np.array([stop, 5]))
    with pytest.raises(RuntimeError, match=r"rows \[0\].*reset_mask"):
        env.step(np.array([5, 5]))
    obs, info = env.reset(options={"reset_mask": np.array([True, False])})
    assert info == {}
    env.step(np.array([5, 5]))


def test_torch_output_stays_on_the_device(settings):
    env = LanguageModelVectorEnv(2, output="torch", **settings)
    obs, _ = env.reset(seed=0)
    assert isinstance(obs["input_ids"], torch.Tensor) and obs["input_ids"].device == env.episodes.device
    obs, reward, terminated, truncated, _ = env.step(torch.tensor([4, 5]))
    assert all(isinstance(x, torch.Tensor) for x in (reward, terminated, truncated))
    numpy_env = LanguageModelVectorEnv(2, **settings)
    numpy_obs, _ = numpy_env.reset(seed=0)
    numpy_obs, *_ = numpy_env.step(np.array([4, 5]))
    np.testing.assert_array_equal(obs["input_ids"].cpu().numpy(), numpy_obs["input_ids"])


def test_rewards_are_scored_once_per_step_for_all_finished_rows(settings):
    calls = []

    def reward(prompts, responses, **context):
        calls.append(len(responses))
        return [1.0] * len(responses)

    env = LanguageModelVectorEnv(4, reward=reward, **settings)
    env.reset(seed=0)
    stop = settings["tokenizer"].eos_token_id
    env.step(np.array([stop, 5, stop, stop]))
    assert calls == [3]


@pytest.mark.parametrize(
    "actions, error",
    [(np.array([1, 2]), TypeError), (np.array([1.0, 2.0, 3.0]), TypeError), (np.array([1, -2, 3]), ValueError),
     (np.array([1, 2, 5000]), ValueError), ([[1, 2, 3]], TypeError)],
)
def test_bad_vector_actions(settings, actions, error):
    env = LanguageModelVectorEnv(3, **settings)
    env.reset(seed=0)
    with pytest.raises(error, match="action"):
        env.step(actions)


def test_bad_vector_arguments(settings):
    with pytest.raises(ValueError, match="num_envs"):
        LanguageModelVectorEnv(0, **settings)
    with pytest.raises(ValueError, match="autoreset_mode"):
        LanguageModelVectorEnv(2, autoreset_mode="sometimes", **settings)
    with pytest.raises(ValueError, match="output"):
        LanguageModelVectorEnv(2, output="jax", **settings)
    env = LanguageModelVectorEnv(2, **settings)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([1, 2]))
    with pytest.raises(ValueError, match="reset_mask"):
        env.reset(options={"reset_mask": np.array([False, False])})
    with pytest.raises(ValueError, match="prompts"):
        env.reset(options={"prompts": ["only one"]})


def test_allowed_tokens_and_action_masks(settings):
    allowed = [5, 6, 7, settings["tokenizer"].eos_token_id]
    env = LanguageModelVectorEnv(2, allowed_token_ids=allowed, **settings)
    masks = env.action_masks()
    assert masks.shape == (2, env.single_action_space.n) and masks.dtype == bool
    assert sorted(np.flatnonzero(masks[0])) == sorted(allowed)
    env.reset(seed=0)
    env.step(np.array([5, 6]))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        env.step(np.array([5, 8]))
    single = LanguageModelEnv(allowed_token_ids=allowed, **settings)
    assert (single.action_masks() == masks[0]).all()


def test_memory_stays_bounded_over_many_resets(tiny):
    model, tokenizer = tiny
    length = lambda prompts, responses, **context: [float(len(r)) for r in responses]  # noqa: E731  (cheap)
    env = LanguageModelVectorEnv(8, model=model, tokenizer=tokenizer, max_new_tokens=6, max_prompt_tokens=64,
                                 reward=length)
    env.reset(seed=0)
    actions = action_stream(1, 5000, 8, tokenizer.eos_token_id)
    peaks, ends = [], 0
    for step, row in enumerate(actions):
        _, _, terminated, truncated, _ = env.step(row)
        ends += int((terminated | truncated).sum())
        if step % 500 == 499:
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert ends > 5000
    assert env.episodes.batch.cache.length <= env.episodes.batch.cache.capacity
    growth_kib = peaks[-1] - peaks[2]  # after warm-up
    assert growth_kib < 4 * 1024, f"peak RSS grew by {growth_kib} KiB after warm-up: {peaks}"


def test_released_memory_is_rebuilt_and_the_episodes_play_on(settings):
    """release_memory frees the KV cache mid-episode; the next step rebuilds it from the tokens, and the
    episodes go on as those of an env that kept its cache."""
    kept = LanguageModelVectorEnv(NUM_ENVS, **settings)
    released = LanguageModelVectorEnv(NUM_ENVS, **settings)
    stop = settings["tokenizer"].eos_token_id
    traces = []
    for env in (kept, released):
        env.reset(seed=3)
        trace = []
        for step, actions in enumerate(action_stream(1, 12, NUM_ENVS, stop)):
            if env is released and step in (2, 7):
                env.release_memory()
                assert not env.episodes.batch.cache.layers[0].is_initialized  # the buffers are gone
            obs, reward, terminated, truncated, info = env.step(actions)
            trace.append((obs["input_ids"], reward, info.get("ref_logprob")))
        traces.append(trace)
    for (ids_a, reward_a, ref_a), (ids_b, reward_b, ref_b) in zip(*traces):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(reward_a, reward_b, atol=1e-5)
        np.testing.assert_allclose(ref_a, ref_b, atol=1e-4)
