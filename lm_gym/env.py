"""``LanguageModelEnv``: one episode at a time, one token per step (a :class:`gymnasium.Env`)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from lm_gym.config import EnvConfig
from lm_gym.episode_rules import TokenEpisodes, step_infos
from lm_gym.render import text_frame

RESET_OPTIONS = {"prompt"}


class EpisodesOwner:
    """The ``model`` and ``tokenizer`` of an env that steps its episodes through ``self.episodes``."""

    @property
    def tokenizer(self):
        """The env's tokenizer."""
        return self.episodes.tokenizer

    @property
    def model(self):
        """The env's LM (run as the reference: its adapters, if a LoRA policy put any in, are off)."""
        return self.episodes.reference.model

    @property
    def reference(self):
        """The env's :class:`lm_gym.reference.ReferenceModel` (it scores ``ref_logprob``; rewards bind to it)."""
        return self.episodes.reference

    def release_memory(self) -> None:
        """Free the env's KV cache while the env sits idle (for example while the policy trains on a rollout):
        the next step rebuilds it from the episodes' tokens in one batched prefill and plays on as before
        (in bf16 the rebuilt cache may round differently from the incremental one)."""
        self.episodes.batch.release_cache()


class LanguageModelEnv(EpisodesOwner, gym.Env):
    """A causal language model as an RL environment: actions are tokens, observations the ids so far.

    Each episode starts from a prompt; every step appends the agent's token. The episode terminates on a
    stop token and is truncated at ``max_new_tokens``. The reward comes on the last step (0 before), from
    ``reward`` scoring the decoded prompt and response; that step's info holds ``turn_ended`` (True),
    ``prompt_text``, ``response_text`` and ``reward_components``. Reset infos are empty. ``info["ref_logprob"]`` is log π_ref of the token
    under the env's LM, computed incrementally with a KV cache (one new token per step).

    Observations are ``{"input_ids", "attention_mask"}``, each int64 of length L = ``max_prompt_tokens +
    max_new_tokens`` (``multi_turn.context_tokens`` in multi-turn mode), left-padded so that the last
    position is always the latest token. Multi-turn observations add ``agent_mask``: 1 at the ids the agent
    chose (its actions), 0 at the prompt's and at every id the env inserted (the other party's turns, tool
    results, turn markers), which are context and never actions. The action space is ``Discrete(V)`` with V the rows of the model's
    output embedding (ids past the tokenizer's vocabulary are valid actions that decode to nothing).

    :param config: an :class:`lm_gym.EnvConfig`; keyword ``settings`` replace its fields.
    :param render_mode: ``"ansi"`` (``render()`` returns text), ``"human"`` (prints it) or ``"rgb_array"``
        (the text drawn as an RGB frame, for ``RecordVideo``).
    :param settings: the fields of :class:`lm_gym.EnvConfig` (``model``, ``prompts``, ``reward``,
        ``max_new_tokens``, ...), as ``gymnasium.make("LanguageModelEnv-v0", **settings)`` passes them.
    """

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(self, config: EnvConfig | None = None, *, render_mode: str | None = None, **settings: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; expected one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.config = EnvConfig.of(config, **settings)
        self.episodes = TokenEpisodes.from_config(self.config, 1)
        self.observation_space = observation_space(self.episodes.vocab_size, self.episodes.obs_length,
                                                   self.config.multi_turn is not None)
        self.action_space = spaces.Discrete(self.episodes.vocab_size)
        self._episode_over: bool | None = None  # None: never reset

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: draw a prompt with ``self.np_random`` (or take ``options["prompt"]``)."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - RESET_OPTIONS
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; expected keys among {sorted(RESET_OPTIONS)}")
        self.episodes.reset_rows([0], [self.np_random], [options.get("prompt")])
        self._episode_over = False
        return self._observation(), {}

    def step(self, action):
        """Append one token; see the class docstring for rewards, flags and ``info``."""
        if self._episode_over is None:
            raise RuntimeError("call reset() before step()")
        if self._episode_over:
            raise RuntimeError("the episode is over (terminated or truncated); call reset() before stepping again")
        token = validate_action(action, self.episodes.vocab_size, self.episodes.allowed)
        actions = torch.tensor([token], device=self.episodes.device)
        result = self.episodes.step(actions, torch.ones(1, dtype=torch.bool, device=self.episodes.device))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])
        self._episode_over = terminated or truncated
        info = step_infos(result, self.episodes.reference_logprobs)[0]
        if self.render_mode == "human":
            self.render()
        return self._observation(), float(result.reward[0]), terminated, truncated, info

    def next_token_logprobs(self) -> torch.Tensor:
        """log π_ref(· | observation) over the action space, on the env's device (valid until the next step)."""
        if not self.episodes.reference_logprobs:
            raise RuntimeError("this env was made with reference_logprobs=False: its LM does not run during steps")
        return self.episodes.batch.next_logprobs[0]

    def render(self):
        """``"ansi"``: return the dialogue so far as text; ``"human"``: print it; ``"rgb_array"``: return it
        drawn as a (H, W, 3) uint8 frame."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi', 'human' or 'rgb_array'")
            return None
        text = self._render_text()
        if self.render_mode == "human":
            print(text)
            return None
        return text_frame(text) if self.render_mode == "rgb_array" else text

    def _render_text(self) -> str:
        if self._episode_over is None:
            return ""
        return self.episodes.dialogue_text(0, with_partial_turn=not self._episode_over)

    def action_masks(self) -> np.ndarray:
        """Boolean (V,) mask of the allowed tokens (all True without ``allowed_token_ids``), for MaskablePPO."""
        return allowed_or_all(self.episodes.allowed, self.episodes.vocab_size).copy()

    def _observation(self) -> dict[str, np.ndarray]:
        return {key: value[0].cpu().numpy() for key, value in self.episodes.observation().items()}

    def close(self):
        """Free the LM and its cache (device memory) and close the other party; safe to call twice."""
        if getattr(self, "episodes", None) is not None:
            if self.episodes.party is not None:
                self.episodes.party.close()
            self.episodes = None
            if torch.cuda is not None and torch.cuda.is_available():  # None during interpreter shutdown
                torch.cuda.empty_cache()


def observation_space(vocab_size: int, length: int, multi_turn: bool = False) -> spaces.Dict:
    """The observation space of one episode: left-padded token ids and their attention mask, and, in
    multi-turn episodes, the mask of the ids the agent chose (``agent_mask``)."""
    keys = {
        "input_ids": spaces.Box(0, vocab_size - 1, shape=(length,), dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
    }
    if multi_turn:
        keys["agent_mask"] = spaces.Box(0, 1, shape=(length,), dtype=np.int64)
    return spaces.Dict(keys)


def allowed_or_all(allowed: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """The allowed-token mask, or an all-True mask when every token is allowed."""
    return allowed if allowed is not None else np.ones(vocab_size, dtype=bool)


def validate_action(action, vocab_size: int, allowed: np.ndarray | None = None) -> int:
    """A token id from a Python int, a numpy integer scalar or a 0-d integer array; else a clear error."""
    if isinstance(action, np.ndarray) and action.ndim == 0:
        action = action[()]
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
        raise TypeError(
            f"action {action!r:.60} of type {type(action).__name__} is not a token id; "
            f"expected an int (Python, numpy scalar or 0-d array) in [0, {vocab_size})"
        )
    if not 0 <= int(action) < vocab_size:
        raise ValueError(f"action {int(action)} is outside the action space; expected a token id in [0, {vocab_size})")
    if allowed is not None and not allowed[int(action)]:
        raise ValueError(
            f"action {int(action)} is not among the {int(allowed.sum())} allowed_token_ids; see action_masks()"
        )
    return int(action)
