"""TextArena's single-player games as the other party: the game's messages are the user's turns, the agent's
turn text is the game's action, the game's reward is the episode's, and each row's game is seeded from the
env's RNG."""

import re

import numpy as np
import pytest
import torch

import lm_gym
from lm_gym import LanguageModelEnv, LanguageModelVectorEnv
from lm_gym.integrations.textarena import TextArenaGame
from lm_gym.sampling import sample_tokens
from tests.conftest import observed_tokens

HANOI_3 = ["[A C]", "[A B]", "[C B]", "[A C]", "[B A]", "[B C]", "[A C]"]  # the 7 moves of 3 disks


def game_env(tiny, game: str, max_turns: int = 10, **settings):
    model, tokenizer = tiny
    return LanguageModelEnv(model=model, tokenizer=tokenizer, other_party=TextArenaGame(game), max_new_tokens=40,
                            max_prompt_tokens=1200, multi_turn=dict(max_turns=max_turns, context_tokens=2000,
                                                                    max_reply_tokens=600), **settings)


def say(env, text: str) -> tuple:
    """Take the tokens of ``text`` and the stop token as actions: the last step's results."""
    for token in env.tokenizer(text, add_special_tokens=False).input_ids + [env.tokenizer.eos_token_id]:
        result = env.step(token)
    return result


def guess_the_number(env, seed: int) -> tuple[list[str], float, dict]:
    """Binary search on the game's hints: the hints seen, the final reward and info."""
    env.reset(seed=seed)
    low, high, hints = 1, 20, []
    while True:
        guess = (low + high) // 2
        _, reward, terminated, truncated, info = say(env, f"I guess [{guess}]")
        if terminated or truncated:
            return hints, reward, info
        hint = info["turns"][-1]["text"]
        hints.append(hint)
        low, high = (low, guess - 1) if "lower" in hint else (guess + 1, high)


def test_a_guessing_game_is_won_on_the_games_hints_and_rewarded(tiny):
    env = game_env(tiny, "GuessTheNumber-v0")
    obs, _ = env.reset(seed=0)
    assert "Guess The Number" in env.tokenizer.decode(observed_tokens(obs))
    hints, reward, info = guess_the_number(env, seed=0)
    assert reward == 1.0 and all(re.search("higher|lower", hint) for hint in hints)
    assert "[" not in "".join(hints)  # the user turns hold the game's words, not an echo of the agent's move
    roles = [turn["role"] for turn in info["turns"]]
    assert roles == ["user"] + ["assistant", "user"] * len(hints) + ["assistant"]
    assert info["reward_components"] == {"other_party": 1.0}


def test_the_game_is_seeded_from_the_env_rng(tiny):
    env = game_env(tiny, "GuessTheNumber-v0")
    runs = {seed: guess_the_number(env, seed)[0] for seed in range(6)}
    assert guess_the_number(env, 3)[0] == runs[3]  # the same seed, the same hidden number
    assert len({tuple(hints) for hints in runs.values()}) > 1  # other seeds, other numbers


def test_tower_of_hanoi_is_solved_move_by_move(tiny):
    env = game_env(tiny, "TowerOfHanoi-v0", max_turns=8)
    env.reset(seed=0)
    for move in HANOI_3[:-1]:
        _, reward, terminated, truncated, info = say(env, move)
        assert (reward, terminated, truncated) == (0.0, False, False)
        assert "Current Board" in info["turns"][-1]["text"]
    _, reward, terminated, truncated, info = say(env, HANOI_3[-1])
    assert terminated and not truncated and reward == 1.0


def test_an_invalid_move_is_told_and_the_game_goes_on(tiny):
    env = game_env(tiny, "TowerOfHanoi-v0", max_turns=3)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = say(env, "no idea")
    assert not (terminated or truncated) and "invalid move" in info["turns"][-1]["text"]


def test_running_out_of_turns_truncates_the_episode(tiny):
    env = game_env(tiny, "GuessTheNumber-v0", max_turns=2)
    env.reset(seed=0)
    assert "higher" in say(env, "[1]")[-1]["turns"][-1]["text"]
    _, reward, terminated, truncated, _ = say(env, "[1]")  # wrong again, and no turn left
    assert truncated and not terminated and reward == 0.0


def test_vector_env_rows_play_their_own_games(tiny):
    model, tokenizer = tiny
    envs = LanguageModelVectorEnv(2, model=model, tokenizer=tokenizer, other_party=TextArenaGame("TowerOfHanoi-v0"),
                                  max_new_tokens=40, max_prompt_tokens=1200,
                                  multi_turn=dict(max_turns=8, context_tokens=2000, max_reply_tokens=600))
    envs.reset(seed=0)
    move = tokenizer(HANOI_3[0], add_special_tokens=False).input_ids
    nonsense = tokenizer("nonsense " * 10, add_special_tokens=False).input_ids[:len(move)]
    for pair in zip(move + [tokenizer.eos_token_id], nonsense + [tokenizer.eos_token_id]):  # both turns end together
        obs, _, terminated, truncated, infos = envs.step(np.array(pair))
    assert infos["turn_ended"].all() and not (terminated.any() or truncated.any())
    moved, refused = (tokenizer.decode(obs["input_ids"][row][obs["attention_mask"][row] == 1]) for row in (0, 1))
    assert "C: [1]" in moved and "invalid move" not in moved
    assert "invalid move" in refused and "C: [1]" not in refused


def test_an_unknown_game_fails_when_the_party_is_made():
    with pytest.raises(Exception, match="NoSuchGame"):
        TextArenaGame("NoSuchGame-v0")


@pytest.fixture(scope="module")
def default_model():
    return lm_gym.load_model("default", device="cpu")


@pytest.mark.integration
def test_the_default_model_plays_a_guessing_game(default_model):
    model, tokenizer = default_model
    env = LanguageModelEnv(model=model, tokenizer=tokenizer, other_party=TextArenaGame("GuessTheNumber-v0"),
                           max_new_tokens=16, max_prompt_tokens=400,
                           multi_turn=dict(max_turns=3, context_tokens=800, max_reply_tokens=64))
    env.reset(seed=0)
    generator, done, steps = torch.Generator().manual_seed(0), False, 0
    while not done:  # the default model samples its own moves
        token, _ = sample_tokens(env.next_token_logprobs()[None], 0.7, generators=[generator])
        _, reward, terminated, truncated, info = env.step(int(token))
        done, steps = terminated or truncated, steps + 1
    roles = [turn["role"] for turn in info["turns"]]
    assert steps <= 3 * 16 and roles[:2] == ["user", "assistant"] and roles.count("assistant") <= 3
    assert -1.0 <= reward <= 1.0 and info["reward_components"] == {"other_party": reward}  # the game's own score
