"""TextArena's single-player games as the other party of multi-turn lm-gym episodes (``pip install
lm-gym[textarena]``).

Each env row plays its own game: the game's opening observation is the prompt, every agent turn's text is
the game's action, and the game's next observation is the user's turn. The game's reward is the reward of
the agent's last turn (0 before it). Each game is seeded from the row's Gymnasium RNG and draws from a
random stream of its own (TextArena's games use Python's global ``random``, which is swapped for the
game's around every call), so rows and envs never share or disturb each other's randomness.

Example::

    from lm_gym.integrations.textarena import TextArenaGame
    env = gymnasium.make("LanguageModelEnv-v0", other_party=TextArenaGame("GuessTheNumber-v0"),
                         multi_turn={"max_turns": 10, "context_tokens": 1024})
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import textarena

from lm_gym.parties import Answer, OtherParty


class TextArenaGame(OtherParty):
    """A TextArena single-player game (``env_id``, with the game's keyword ``settings``), one per env row.

    The games' own wrappers are left out: the context already holds the dialogue, so each user turn is only
    what the game said since the agent's last action.
    """

    role = "user"

    def __init__(self, env_id: str, **settings):
        self.env_id, self.settings = env_id, settings
        self.games: dict[int, object] = {}
        self.random_states: dict[int, tuple] = {}
        self.make()  # an unknown id or bad settings fail here, not at the first reset

    def make(self):
        """A fresh game, without TextArena's default wrappers."""
        game = textarena.make(self.env_id, **self.settings)
        while isinstance(game, textarena.Wrapper):
            game = game.env
        return game

    def start(self, row: int, rng: np.random.Generator) -> str:
        game = self.games.get(row) or self.make()
        self.games[row] = game
        self.random_states[row] = random.Random(int(rng.integers(2**62))).getstate()
        with self._own_random(row):
            game.reset(num_players=1, seed=None)
            return observation_text(game.get_observation()[1])

    def answer(self, rows: Sequence[int], texts: Sequence[str], last: Sequence[bool]) -> list[Answer]:
        return [self._play(row, text, final) for row, text, final in zip(rows, texts, last)]

    def _play(self, row: int, text: str, last: bool) -> Answer:
        game = self.games[row]
        with self._own_random(row):
            done, _ = game.step(text)
            if done:
                rewards, game_info = game.close()
                return Answer(None, float(rewards[0]), terminated=True, record={"game": dict(game_info[0])})
            said = observation_text(game.get_observation()[1])
        return Answer(None if last else said, 0.0, terminated=False)

    @contextmanager
    def _own_random(self, row: int):
        """Run with Python's ``random`` in the row's game state, and put the caller's back after."""
        outside = random.getstate()
        random.setstate(self.random_states[row])
        try:
            yield
        finally:
            self.random_states[row] = random.getstate()
            random.setstate(outside)


def observation_text(messages) -> str:
    """A TextArena observation (a list of ``(sender, message, kind)``) as the text of one turn, without the
    echo of the agent's own action (the context holds it already)."""
    if isinstance(messages, str):
        return messages
    return "\n".join(str(message) for _, message, kind in messages
                     if kind != textarena.ObservationType.PLAYER_ACTION)
