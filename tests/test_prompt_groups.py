"""Prompt groups: G consecutive rows share a prompt, wait for each other and restart together, in every
autoreset mode, through SB3VecEnv and into LMPPO's segments."""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from lm_gym import LanguageModelVectorEnv
from lm_gym.sb3 import SB3VecEnv

GROUP, NUM_ENVS = 3, 6
PROMPTS = [f"Prompt number {i} is here." for i in range(40)]


@pytest.fixture
def settings(tiny):
    model, tokenizer = tiny
    return dict(model=model, tokenizer=tokenizer, max_new_tokens=6, max_prompt_tokens=64, prompts=PROMPTS)


def actions_with_stops(rng, num_envs, stop):
    """Random tokens, a stop token a quarter of the time: the rows of a group end at different steps."""
    actions = rng.integers(3, 1024, size=num_envs)
    actions[rng.random(num_envs) < 0.25] = stop
    return actions


def step_group_ids(infos, playing):
    """The group id each playing row reported this step (``final_info``'s for a row that just ended)."""
    ids = {}
    for row in np.flatnonzero(playing):
        info = infos[row].get("final_info", infos[row])
        ids[row] = info["group"]
    return ids


def row_prompt(env, row):
    return env.episodes.turns[row][0]["text"]


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
def test_groups_share_prompts_wait_and_restart_together(settings, mode):
    env = LanguageModelVectorEnv(NUM_ENVS, autoreset_mode=mode, group_size=GROUP, **settings)
    stop = settings["tokenizer"].eos_token_id
    rng = np.random.default_rng(0)
    env.reset(seed=11)
    episodes = [[] for _ in range(NUM_ENVS)]  # the group ids of each row's episodes, in order
    waits = 0
    needs_reset = np.zeros(NUM_ENVS, dtype=bool)
    for _ in range(80):
        if mode == AutoresetMode.DISABLED and needs_reset.any():
            env.reset(options={"reset_mask": needs_reset.copy()})
        before = {row: row_prompt(env, row) for row in range(NUM_ENVS)}
        waiting_before, resetting = env._waiting.copy(), env._needs_reset.copy()
        obs, reward, terminated, truncated, infos = env.step_with_row_infos(actions_with_stops(rng, NUM_ENVS, stop))
        waiting = np.array([bool(info.get("waiting")) for info in infos])
        np.testing.assert_array_equal(waiting, waiting_before)
        waits += int(waiting.sum())
        assert not (reward[waiting].any() or terminated[waiting].any() or truncated[waiting].any())
        playing = ~(waiting | resetting)
        for row, group_id in step_group_ids(infos, playing).items():
            if not episodes[row] or episodes[row][-1] != group_id:
                episodes[row].append(group_id)
        for start in range(0, NUM_ENVS, GROUP):
            group = range(start, start + GROUP)
            assert len({before[row] for row in group}) == 1  # one prompt per group
            assert len({row_prompt(env, row) for row in group}) == 1
            ended = (terminated | truncated)[start : start + GROUP] | waiting_before[start : start + GROUP]
            if not ended.all():  # a row that ended waits while the others play on
                assert env._waiting[start : start + GROUP].tolist() == ended.tolist()
        needs_reset = env._needs_reset.copy()
    assert waits > 10
    for start in range(0, NUM_ENVS, GROUP):
        sequences = [episodes[row] for row in range(start, start + GROUP)]
        assert all(seq == sequences[0] for seq in sequences)  # the group's rows play the same episodes
        assert len(sequences[0]) >= 3  # several restarts
    all_ids = [i for row in range(0, NUM_ENVS, GROUP) for i in episodes[row]]
    assert len(all_ids) == len(set(all_ids))  # no two group episodes share an id


def test_a_waiting_row_keeps_its_final_observation_in_same_step_mode(settings):
    env = LanguageModelVectorEnv(NUM_ENVS, autoreset_mode="same_step", group_size=GROUP, **settings)
    stop = settings["tokenizer"].eos_token_id
    obs, _ = env.reset(seed=3)
    actions = np.full(NUM_ENVS, 5)
    actions[0] = stop  # row 0 ends at once; rows 1 and 2 of its group play on
    obs, _, terminated, _, infos = env.step_with_row_infos(actions)
    assert terminated[0] and env._waiting[0]
    final = infos[0]["final_obs"]["input_ids"]
    np.testing.assert_array_equal(obs["input_ids"][0], final)
    for _ in range(3):
        obs, _, _, _, infos = env.step_with_row_infos(np.full(NUM_ENVS, 5))
        if not infos[0].get("waiting"):
            break
        if env._waiting[0]:
            np.testing.assert_array_equal(obs["input_ids"][0], final)


def test_group_settings_are_checked(settings):
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        LanguageModelVectorEnv(6, group_size=4, **settings)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        LanguageModelVectorEnv(6, group_size=0, **settings)
    env = LanguageModelVectorEnv(NUM_ENVS, autoreset_mode="disabled", group_size=GROUP, **settings)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="part of the group of rows 0..2"):
        env.reset(options={"reset_mask": np.array([True, False, False, False, False, False])})
    with pytest.raises(ValueError, match="share one prompt"):
        env.reset(options={"prompts": ["a", "b", "a", "c", "c", "c"]})
    env.reset(options={"prompts": ["a", "a", "a", "c", "c", "c"]})
    assert [row_prompt(env, row) for row in range(NUM_ENVS)] == ["a"] * 3 + ["c"] * 3


def test_groups_draw_different_prompts_with_seeded_rows(settings):
    env = LanguageModelVectorEnv(12, group_size=GROUP, **settings)
    env.reset(seed=5)
    prompts = [row_prompt(env, row) for row in range(0, 12, GROUP)]
    assert len(set(prompts)) > 1
    again = LanguageModelVectorEnv(12, group_size=GROUP, **settings)
    again.reset(seed=5)
    assert [row_prompt(again, row) for row in range(0, 12, GROUP)] == prompts  # reproducible from the seed


def test_lmppo_segments_carry_their_group_and_share_its_context(tiny):
    from agents import LMPPO

    model, tokenizer = tiny
    stops = list(range(0, model.get_output_embeddings().weight.shape[0], 4))  # episodes end at random lengths
    env = SB3VecEnv(NUM_ENVS, group_size=GROUP, model=model, tokenizer=tokenizer, max_new_tokens=5,
                    max_prompt_tokens=64, prompts=PROMPTS, stop_token_ids=stops,
                    reward=lambda p, r, **c: [float(len(x)) for x in r])
    agent = LMPPO(env=env, n_steps=12, batch_size=10**6, n_epochs=1, seed=0, device="cpu",
                  policy_kwargs={"model": "tiny", "optimizer_class": torch.optim.SGD})
    agent._setup_learn(total_timesteps=agent.n_steps * agent.n_envs, callback=None)
    agent.collect_rollouts(agent.env, agent._init_callback(None), None, agent.n_steps)
    ended = [s for s in agent.rollout.segments if s.ended]
    groups = {}
    for segment in ended:
        groups.setdefault(segment.group, []).append(segment)
    assert None not in groups and len(groups) >= 2
    for members in groups.values():
        assert len({tuple(s.context) for s in members}) == 1  # one prompt per group
    assert sum(len(s.tokens) for s in agent.rollout.segments) < agent.n_steps * NUM_ENVS  # waiting takes no token
    complete = [members for members in groups.values() if len(members) == GROUP]
    assert complete
